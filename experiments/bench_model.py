"""Detector timings beside torchvision's equivalent model, measured in the same run.

    python experiments/bench_model.py [--models vgg16,r50_fpn] [--repeats 3]

For each model: inference latency (batch 1) and one SGD training step (batch 1 and 2) for
frcnn_jax and a torchvision model with the same backbone, frozen layers (VGG-16: conv1-conv2;
ResNet: stem and layer1), anchors, proposal counts and RoI op (RoIAlign 7x7, sampling 2),
random weights; plus frcnn_jax's compile times and each process's peak memory. Medians of
`--repeats` runs after a warm-up.

torchvision runs in a child process of its own (the same allocator setting, same inputs), before
frcnn_jax's cases: in one process each side inherits the other's heap. On the 2-core CPU (with
`frcnn_jax.runtime`'s earlier allocator setting), frcnn_jax's ResNet-50-FPN batch-2 step took
6.0-6.3 s before torchvision had run in the process and 6.8-7.2 s after it, while
torchvision's took 7.7-8.1 s alone and 6.1-6.4 s after frcnn_jax's.
"""

import argparse
import functools
import json
import os
import resource
import subprocess
import sys
import time

from frcnn_jax.runtime import configure_runtime, describe_runtime

configure_runtime()  # before JAX starts: see frcnn_jax/runtime.py

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402
from synthetic import ground_truth  # noqa: E402
from torch_timing import TORCH_DEVICE, median_s, tensor  # noqa: E402
from torchvision.models.detection import FasterRCNN as TorchFasterRCNN  # noqa: E402
from torchvision.models.detection.anchor_utils import AnchorGenerator  # noqa: E402
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone  # noqa: E402
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead  # noqa: E402
from torchvision.ops import MultiScaleRoIAlign  # noqa: E402
from torchvision.ops.misc import FrozenBatchNorm2d  # noqa: E402

from frcnn_jax.config import model_config  # noqa: E402
from frcnn_jax.models import FasterRCNN, build_model  # noqa: E402


def peak_rss_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


BATCHES = (1, 2)  # training-step batch sizes
NUM_CLASSES = {"vgg16": 20, "r50_fpn": 90}

# -- the two models, configured alike -----------------------------------------------------------

SETUPS = {
    "vgg16": dict(
        image=(600, 1000),
        ours={
            "backbone": "vgg16",
            "rpn": {
                "channels": 512,
                "objectness": "sigmoid",
                "allowed_border": None,
                "train_pre_nms_top_n": 12000,
                "train_post_nms_top_n": 2000,
                "test_pre_nms_top_n": 6000,
                "test_post_nms_top_n": 300,
                "min_size": 1e-3,
                "box_weight": 1.0,
                "box_normalizer": None,
            },
            "head": {
                "pooler": "align",
                "widths": (4096, 4096),
                "dropout": 0.0,
                "batch_size": 128,
                "nms_threshold": 0.3,
                "background_iou": (0.0, 0.5),
            },
        },
    ),
    "r50_fpn": dict(
        image=(800, 1344),
        ours={
            "backbone": "resnet50_fpn",
            "rpn": {
                "anchor_sizes": ((32,), (64,), (128,), (256,), (512,)),
                "channels": 256,
                "objectness": "sigmoid",
                "allowed_border": None,
                "train_pre_nms_top_n": 2000,
                "train_post_nms_top_n": 2000,
                "test_pre_nms_top_n": 1000,
                "test_post_nms_top_n": 1000,
                "min_size": 1e-3,
                "box_weight": 1.0,
                "box_normalizer": None,
            },
            "head": {
                "pooler": "align",
                "widths": (1024, 1024),
                "dropout": 0.0,
                "batch_size": 512,
                "nms_threshold": 0.5,
                "background_iou": (0.0, 0.5),
            },
        },
    ),
}


def torchvision_model(name, image):
    common = dict(min_size=image[0], max_size=image[1], box_detections_per_img=100)
    if name == "vgg16":
        backbone = torchvision.models.vgg16().features[:-1]
        backbone.out_channels = 512
        for layer in backbone[:10]:  # conv1_x and conv2_x frozen, as in the paper (and ours)
            layer.requires_grad_(False)
        return TorchFasterRCNN(
            backbone,
            rpn_anchor_generator=AnchorGenerator(((128, 256, 512),), ((0.5, 1.0, 2.0),)),
            box_roi_pool=MultiScaleRoIAlign(["0"], 7, 2),
            box_head=TwoMLPHead(512 * 7 * 7, 4096),
            box_predictor=FastRCNNPredictor(4096, NUM_CLASSES[name] + 1),
            rpn_pre_nms_top_n_train=12000,
            rpn_post_nms_top_n_train=2000,
            rpn_pre_nms_top_n_test=6000,
            rpn_post_nms_top_n_test=300,
            box_batch_size_per_image=128,
            box_nms_thresh=0.3,
            **common,
        )
    backbone = resnet_fpn_backbone(
        backbone_name="resnet50", weights=None, norm_layer=FrozenBatchNorm2d, trainable_layers=3
    )
    return TorchFasterRCNN(backbone, num_classes=NUM_CLASSES[name] + 1, **common)


def inputs(name):
    """The images and ground truth both sides time, the same NumPy arrays in either process:
    {"detect": (images [1, H, W, 3], sizes [1, 2]), 1: (images, sizes, boxes, classes), 2: ...}."""
    height, width = SETUPS[name]["image"]
    rng = np.random.default_rng(0)
    sizes1 = np.array([[height, width]], np.int32)
    batches = {"detect": (rng.uniform(0, 255, (1, height, width, 3)).astype(np.float32), sizes1)}
    for batch in BATCHES:
        images = rng.uniform(0, 255, (batch, height, width, 3)).astype(np.float32)
        boxes, classes = ground_truth(rng, batch, (height, width), NUM_CLASSES[name])
        batches[batch] = (images, np.tile(sizes1, (batch, 1)), boxes, classes)
    return batches


def time_ours(name, repeats):
    """frcnn_jax's inference and training-step times (s) and compile times (s), as
    [(case, seconds, compile seconds)]."""
    data = inputs(name)
    model = build_model(
        ml_collections.ConfigDict(
            {"model": model_config(**SETUPS[name]["ours"], num_classes=NUM_CLASSES[name])}
        )
    )
    images1, sizes1 = (jnp.asarray(a) for a in data["detect"])
    params = jax.jit(functools.partial(model.init, method=FasterRCNN.detect))(
        jax.random.key(0), images1, sizes1
    )
    detect = jax.jit(lambda p, x, s: model.apply(p, x, s, method=FasterRCNN.detect))
    start = time.perf_counter()
    detect.lower(params, images1, sizes1).compile()
    detect_compile = time.perf_counter() - start
    detect_s = median_s(lambda: jax.block_until_ready(detect(params, images1, sizes1)), repeats)
    rows = [("inference, batch 1", detect_s, detect_compile)]
    optimizer = optax.sgd(1e-3, momentum=0.9)

    # Parameters and optimizer state are donated and updated in place, as frcnn_jax.train does.
    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def train_step(p, opt_state, x, s, boxes, classes, key):
        def loss_fn(p):
            terms = model.apply(
                p,
                x,
                s,
                boxes,
                classes,
                jnp.ones(classes.shape, bool),
                key,
                method=FasterRCNN.losses,
            )
            return sum(terms.values())

        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, opt_state = optimizer.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, loss

    for batch in BATCHES:
        state = [jax.tree.map(jnp.copy, params)]  # the step consumes it: keep `params`
        state.append(optimizer.init(state[0]))
        args = tuple(jnp.asarray(a) for a in data[batch])
        start = time.perf_counter()
        train_step.lower(*state, *args, jax.random.key(0)).compile()
        compile_s = time.perf_counter() - start

        def our_step(state=state, args=args):
            new_params, new_opt_state, loss = train_step(*state, *args, jax.random.key(1))
            state[:] = [new_params, new_opt_state]
            jax.block_until_ready(loss)

        rows.append((f"training step, batch {batch}", median_s(our_step, repeats), compile_s))
    return rows


def time_torchvision(name, repeats):
    """torchvision's times (s) for the same cases, in `time_ours`'s order."""
    height, width = SETUPS[name]["image"]
    data = inputs(name)
    torch_model = torchvision_model(name, (height, width)).to(TORCH_DEVICE)
    torch_images = [tensor(data["detect"][0][0]).permute(2, 0, 1) / 255.0]
    torch_model.eval()
    with torch.no_grad():
        times = [median_s(lambda: torch_model(torch_images), repeats)]
    torch_optimizer = torch.optim.SGD(torch_model.parameters(), lr=1e-3, momentum=0.9)
    torch_model.train()
    for batch in BATCHES:
        images, _, boxes, classes = data[batch]
        torch_batch = [tensor(image).permute(2, 0, 1) / 255.0 for image in images]
        torch_targets = [
            {"boxes": tensor(box), "labels": tensor(label).long()}
            for box, label in zip(boxes, classes, strict=True)
        ]

        def torch_step(inputs=torch_batch, targets=torch_targets):
            torch_optimizer.zero_grad()
            loss = sum(torch_model(inputs, targets).values())
            loss.backward()
            torch_optimizer.step()

        times.append(median_s(torch_step, repeats))
    return times


def time_torchvision_in_child(name, repeats):
    """`time_torchvision` in a fresh Python process (same allocator setting: the child calls
    `configure_runtime` too): {"times": [s], "peak_rss_gb": its peak resident memory,
    "device_gb": torch's peak GPU memory or None}."""
    command = [sys.executable, os.path.abspath(__file__), "--torchvision-side", "--models", name]
    command += ["--repeats", str(repeats)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"torchvision's side failed ({name}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def time_import():
    """Seconds to convert a full `fasterrcnn_resnet50_fpn` weight file (read with
    weights_only, convert, write the .npz: `python -m frcnn_jax.import_weights`) and to load
    the .npz into the model's variables; and the file's size in MB."""
    import tempfile

    from frcnn_jax import weights
    from frcnn_jax.import_weights import read_state_dict

    reference = torchvision.models.detection.fasterrcnn_resnet50_fpn(
        weights=None, weights_backbone=None
    )
    with tempfile.TemporaryDirectory() as directory:
        source, output = os.path.join(directory, "r50.pth"), os.path.join(directory, "r50.npz")
        torch.save(reference.state_dict(), source)
        start = time.perf_counter()
        flat, covers = weights.from_torchvision(
            read_state_dict(source), arch="fasterrcnn_resnet50_fpn"
        )
        weights.save(output, flat, covers)
        convert_s = time.perf_counter() - start
        model = build_model(
            ml_collections.ConfigDict(
                {
                    "model": model_config(
                        **SETUPS["r50_fpn"]["ours"], num_classes=NUM_CLASSES["r50_fpn"]
                    )
                }
            )
        )
        shapes = jax.eval_shape(
            lambda k: model.init(
                k, jnp.zeros((1, 64, 64, 3)), jnp.array([[64, 64]]), method=FasterRCNN.detect
            ),
            jax.random.key(0),
        )
        variables = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), shapes)
        start = time.perf_counter()
        weights.restore_into(variables, *weights.load(output))
        load_s = time.perf_counter() - start
        size_mb = os.path.getsize(source) / 1e6
    return convert_s, load_s, size_mb


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="vgg16,r50_fpn")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--torchvision-side", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    names = args.models.split(",")
    if args.torchvision_side:  # the child process of `time_torchvision_in_child`
        times = time_torchvision(names[0], args.repeats)
        device_gb = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
        print(json.dumps({"times": times, "peak_rss_gb": peak_rss_gb(), "device_gb": device_gb}))
        return
    # torchvision's children run first: on a GPU they exit before JAX reserves its memory.
    theirs = {name: time_torchvision_in_child(name, args.repeats) for name in names}
    print(
        f"# jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} "
        f"on {TORCH_DEVICE.type} ({torch.get_num_threads()} CPU threads); random weights; "
        f"{describe_runtime()}; torchvision timed in a separate process"
    )
    print("| case | frcnn_jax s | torchvision s | ratio | frcnn_jax compile s |")
    print("|---|---:|---:|---:|---:|")
    for name in names:
        for (case, our_s, compile_s), their_s in zip(
            time_ours(name, args.repeats), theirs[name]["times"], strict=True
        ):
            print(
                f"| {name} {case} | {our_s:.3f} | {their_s:.3f} | {our_s / their_s:.2f} "
                f"| {compile_s:.1f} |",
                flush=True,
            )
    print(
        f"# peak resident memory: frcnn_jax's process {peak_rss_gb():.1f} GB, torchvision's "
        f"{max(t['peak_rss_gb'] for t in theirs.values()):.1f} GB"
    )
    if "r50_fpn" in names:
        convert_s, load_s, size_mb = time_import()
        print(
            f"# importing a fasterrcnn_resnet50_fpn file ({size_mb:.0f} MB): read, convert and "
            f"write {convert_s:.1f} s; load into the model {load_s:.1f} s"
        )
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        print(f"# frcnn_jax peak device memory: {stats['peak_bytes_in_use'] / 2**30:.1f} GiB")
    if TORCH_DEVICE.type == "cuda":
        peak = max(t["device_gb"] for t in theirs.values())
        print(f"# torchvision peak device memory: {peak:.1f} GiB")


if __name__ == "__main__":
    main()
