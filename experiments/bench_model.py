"""Detector timings beside torchvision's equivalent model, measured in the same run.

    python experiments/bench_model.py [--models vgg16,r50_fpn] [--repeats 3]

For each model: inference latency (batch 1) and one SGD training step (batch 1 and 2) for
frcnn_jax and a torchvision model with the same backbone, frozen layers (VGG-16: conv1-conv2;
ResNet: stem and layer1), anchors, proposal counts and RoI op (RoIAlign 7x7, sampling 2),
random weights; plus frcnn_jax's compile times and the process's peak memory. Medians of
`--repeats` runs after a warm-up.
"""

import argparse
import functools
import resource
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

from frcnn_jax.models import FasterRCNN, build_model  # noqa: E402


def peak_rss_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


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
            box_predictor=FastRCNNPredictor(4096, 21),
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
    return TorchFasterRCNN(backbone, num_classes=91, **common)


def bench(name, repeats):
    setup = SETUPS[name]
    height, width = setup["image"]
    rng = np.random.default_rng(0)
    num_classes = 20 if name == "vgg16" else 90
    config = ml_collections.ConfigDict({"model": {**setup["ours"], "num_classes": num_classes}})
    model = build_model(config)
    rows = []

    # frcnn_jax
    images1 = jnp.asarray(rng.uniform(0, 255, (1, height, width, 3)).astype(np.float32))
    sizes1 = jnp.array([[height, width]], jnp.int32)
    params = jax.jit(functools.partial(model.init, method=FasterRCNN.detect))(
        jax.random.key(0), images1, sizes1
    )
    detect = jax.jit(lambda p, x, s: model.apply(p, x, s, method=FasterRCNN.detect))
    start = time.perf_counter()
    detect.lower(params, images1, sizes1).compile()
    detect_compile = time.perf_counter() - start
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

    ours_infer = median_s(lambda: jax.block_until_ready(detect(params, images1, sizes1)), repeats)
    torch_model = torchvision_model(name, (height, width)).to(TORCH_DEVICE)
    torch_images = [tensor(images1[0]).permute(2, 0, 1) / 255.0]
    torch_model.eval()
    with torch.no_grad():
        theirs_infer = median_s(lambda: torch_model(torch_images), repeats)
    rows.append((f"{name} inference, batch 1", ours_infer, theirs_infer, detect_compile))

    torch_optimizer = torch.optim.SGD(torch_model.parameters(), lr=1e-3, momentum=0.9)
    for batch in (1, 2):
        images = jnp.asarray(rng.uniform(0, 255, (batch, height, width, 3)).astype(np.float32))
        sizes = jnp.tile(sizes1, (batch, 1))
        boxes, classes = ground_truth(rng, batch, (height, width), num_classes)
        state = [jax.tree.map(jnp.copy, params)]  # the step consumes it: keep `params`
        state.append(optimizer.init(state[0]))
        args = (images, sizes, jnp.asarray(boxes), jnp.asarray(classes))
        start = time.perf_counter()
        train_step.lower(*state, *args, jax.random.key(0)).compile()
        compile_s = time.perf_counter() - start

        def our_step(state=state, args=args):
            new_params, new_opt_state, loss = train_step(*state, *args, jax.random.key(1))
            state[:] = [new_params, new_opt_state]
            jax.block_until_ready(loss)

        ours = median_s(our_step, repeats)
        torch_batch = [tensor(images[i]).permute(2, 0, 1) / 255.0 for i in range(batch)]
        torch_targets = [
            {"boxes": tensor(boxes[i]), "labels": tensor(classes[i]).long()} for i in range(batch)
        ]
        torch_model.train()

        def torch_step(inputs=torch_batch, targets=torch_targets):
            torch_optimizer.zero_grad()
            loss = sum(torch_model(inputs, targets).values())
            loss.backward()
            torch_optimizer.step()

        rows.append(
            (f"{name} training step, batch {batch}", ours, median_s(torch_step, repeats), compile_s)
        )
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="vgg16,r50_fpn")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(
        f"# jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} "
        f"on {TORCH_DEVICE.type} ({torch.get_num_threads()} CPU threads); random weights; "
        f"{describe_runtime()}"
    )
    print("| case | frcnn_jax s | torchvision s | ratio | frcnn_jax compile s |")
    print("|---|---:|---:|---:|---:|")
    for name in args.models.split(","):
        for case, ours, theirs, compile_s in bench(name, args.repeats):
            print(
                f"| {case} | {ours:.3f} | {theirs:.3f} | {ours / theirs:.2f} | {compile_s:.1f} |",
                flush=True,
            )
    print(f"# peak resident memory of this process: {peak_rss_gb():.1f} GB")
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        print(f"# frcnn_jax peak device memory: {stats['peak_bytes_in_use'] / 2**30:.1f} GiB")
    if TORCH_DEVICE.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
        print(f"# torchvision peak device memory: {peak:.1f} GiB")


if __name__ == "__main__":
    main()
