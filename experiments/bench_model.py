"""Detector time and memory beside torchvision's equivalent model, case by case.

    python experiments/bench_model.py [--models vgg16,r50_fpn] [--cases inference,train1,train2]
        [--repeats 3] [--torchvision-malloc huge_pages,retain,default]

For each model (VGG-16, ResNet-50-FPN) at the paper's 600x1000: inference latency (batch 1)
and one SGD training step (batch 1 and 2) for frcnn_jax and a torchvision model with the same
backbone, frozen layers (VGG-16: conv1-conv2; ResNet: stem and layer1), anchors, proposal
counts and RoI op (RoIAlign 7x7, sampling 2), random weights (frcnn_jax's inference case: made
on the host as loaded weights would be, `loaded_weights`). Medians of `--repeats` runs after a
warm-up. The training step is frcnn_jax.train's: parameters and optimizer state donated and
updated in place.

Every case runs in a process of its own on each side (torchvision's first), so that a peak
belongs to one case: each side's peak resident memory (CPU) or peak device memory (GPU), the
resident memory the process had before building its model (its libraries: torch's alone are
~0.7 GB, which is why frcnn_jax's side never imports torch), and for frcnn_jax the compiled
program's own buffers (`memory_analysis()`: arguments, outputs less those aliased to donated
arguments, temporaries; they hold on any backend) and its compile time.

frcnn_jax runs with its entry points' allocator setting (`frcnn_jax.runtime`). torchvision's
CPU tensors come from the same malloc, and which setting suits it best differs by measure: it
runs under each of `--torchvision-malloc`, and the table sets frcnn_jax against its shortest
time and, separately, its lowest peak memory (each with the setting that gave it).
"""

import argparse
import functools
import json
import os
import pathlib
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
import result_rows  # noqa: E402
from synthetic import ground_truth  # noqa: E402
from timing import median_s  # noqa: E402

from frcnn_jax.config import model_config  # noqa: E402
from frcnn_jax.models import FasterRCNN, build_model  # noqa: E402


def peak_rss_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def rss_gb():
    """The process's resident memory now (GB), from /proc (0 where there is none)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    except OSError:
        return 0.0


BATCHES = (1, 2)  # training-step batch sizes
ROOT = pathlib.Path(__file__).resolve().parents[1]
CASES = {
    "inference": "inference, batch 1",
    **{f"train{batch}": f"training step, batch {batch}" for batch in BATCHES},
}
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
        image=(600, 1000),
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
    import torchvision
    from torchvision.models.detection import FasterRCNN as TorchFasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.ops import MultiScaleRoIAlign
    from torchvision.ops.misc import FrozenBatchNorm2d

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


def our_model(name, **extra):
    return build_model(
        ml_collections.ConfigDict(
            {"model": model_config(**SETUPS[name]["ours"], **extra, num_classes=NUM_CLASSES[name])}
        )
    )


def compiled_buffers(compiled):
    """A compiled program's own buffers in GB: arguments, outputs (less those aliased to
    donated arguments) and temporaries."""
    analysis = compiled.memory_analysis()
    if analysis is None:  # a backend without it
        return None
    return {
        "arguments": analysis.argument_size_in_bytes / 2**30,
        "outputs": (analysis.output_size_in_bytes - analysis.alias_size_in_bytes) / 2**30,
        "temporaries": analysis.temp_size_in_bytes / 2**30,
    }


def our_case(name, case, repeats):
    """frcnn_jax's side of one case: {"seconds", "compile_s", "buffers_gb"}."""
    data = inputs(name)
    model = our_model(name)
    images1, sizes1 = (jnp.asarray(a) for a in data["detect"])
    init = functools.partial(model.init, method=FasterRCNN.detect)
    if case == "inference":
        return our_inference(model, loaded_weights(init, images1, sizes1), images1, sizes1, repeats)
    params = jax.jit(init)(jax.random.key(0), images1, sizes1)
    return our_training_step(model, params, data[int(case.removeprefix("train"))], repeats)


def loaded_weights(init, images, sizes):
    """Random variables as a detector that detects has them: loaded from a file (a checkpoint,
    imported weights; `Detector.from_workdir` restores without initialising), made here on the
    host one array at a time: kernels normal(0, 0.01), biases zero, the frozen BatchNorm
    statistics as initialised. Not jax's jitted initialisation, which the training cases run
    (as `python -m frcnn_jax.train` does): its temporaries (the random bits of VGG-16's fc6,
    three [25088, 4096] uint32 arrays) would make the peak of an inference case."""
    key = jax.random.key(0)
    shapes = jax.eval_shape(init, key, images, sizes)
    rng = np.random.default_rng(0)

    def made(shape):  # on the host, then to the device, one array at a time
        if len(shape.shape) < 2:
            return jnp.zeros(shape.shape, shape.dtype)
        return jnp.asarray(rng.standard_normal(shape.shape, np.float32) * 0.01)

    # the other collections alone (XLA drops the parameters' initialisation from this program)
    others = jax.jit(lambda k: {c: v for c, v in init(k, images, sizes).items() if c != "params"})
    return {"params": jax.tree.map(made, shapes["params"]), **others(key)}


def our_inference(model, params, images, sizes, repeats):
    detect = jax.jit(lambda p, x, s: model.apply(p, x, s, method=FasterRCNN.detect))
    start = time.perf_counter()
    compiled = detect.lower(params, images, sizes).compile()
    compile_s = time.perf_counter() - start
    seconds = median_s(lambda: jax.block_until_ready(compiled(params, images, sizes)), repeats)
    return {"seconds": seconds, "compile_s": compile_s, "buffers_gb": compiled_buffers(compiled)}


def our_training_step(model, params, batch, repeats):
    train_step, optimizer = jitted_training_step(model)
    state = [params, optimizer.init(params["params"])]  # the step consumes both
    del params
    args = tuple(jnp.asarray(a) for a in batch)
    start = time.perf_counter()
    compiled = train_step.lower(*state, *args, jax.random.key(0)).compile()
    compile_s = time.perf_counter() - start

    def step():
        new_params, new_opt_state, loss = compiled(*state, *args, jax.random.key(1))
        state[:] = [new_params, new_opt_state]
        jax.block_until_ready(loss)

    seconds = median_s(step, repeats)
    return {"seconds": seconds, "compile_s": compile_s, "buffers_gb": compiled_buffers(compiled)}


def jitted_training_step(model):
    """(the jitted SGD step (variables, opt_state, images, sizes, boxes, classes, key) ->
    (variables, opt_state, loss), its optimizer): the gradient of the parameters only (not of
    the frozen BatchNorm statistics, as `frcnn_jax.training` and torchvision's
    FrozenBatchNorm2d), variables and optimizer state (of `variables["params"]`) donated and
    updated in place, as frcnn_jax.train does."""
    optimizer = optax.sgd(1e-3, momentum=0.9)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def train_step(variables, opt_state, x, s, boxes, classes, key):
        def loss_fn(params):
            terms = model.apply(
                {**variables, "params": params},
                x,
                s,
                boxes,
                classes,
                jnp.ones(classes.shape, bool),
                key,
                method=FasterRCNN.losses,
            )
            return sum(terms.values())

        params = variables["params"]
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return {**variables, "params": optax.apply_updates(params, updates)}, opt_state, loss

    return train_step, optimizer


def torchvision_case(name, case, repeats):
    """torchvision's side of one case: {"seconds"}."""
    import torch
    from torch_timing import TORCH_DEVICE, tensor
    from torch_timing import median_s as torch_median_s

    height, width = SETUPS[name]["image"]
    data = inputs(name)
    torch_model = torchvision_model(name, (height, width)).to(TORCH_DEVICE)
    if case == "inference":
        torch_images = [tensor(data["detect"][0][0]).permute(2, 0, 1) / 255.0]
        torch_model.eval()
        with torch.no_grad():
            return {"seconds": torch_median_s(lambda: torch_model(torch_images), repeats)}
    torch_optimizer = torch.optim.SGD(torch_model.parameters(), lr=1e-3, momentum=0.9)
    torch_model.train()
    images, _, boxes, classes = data[int(case.removeprefix("train"))]
    torch_batch = [tensor(image).permute(2, 0, 1) / 255.0 for image in images]
    torch_targets = [
        {"boxes": tensor(box), "labels": tensor(label).long()}
        for box, label in zip(boxes, classes, strict=True)
    ]

    def torch_step():
        torch_optimizer.zero_grad()
        loss = sum(torch_model(torch_batch, torch_targets).values())
        loss.backward()
        torch_optimizer.step()

    return {"seconds": torch_median_s(torch_step, repeats)}


def device_peak_gb(side):
    """The side's peak device memory (GB) on a GPU, else None."""
    if side == "torchvision":
        import torch

        return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    stats = jax.devices()[0].memory_stats() or {}
    return stats["peak_bytes_in_use"] / 2**30 if "peak_bytes_in_use" in stats else None


def run_case(side, name, case, repeats):
    """One side of one case in this process (the child): its figures as a dict."""
    if side == "torchvision":
        import torch  # noqa: F401  (its libraries counted in the baseline, as frcnn_jax's)
    else:
        jnp.zeros(()).block_until_ready()  # JAX's backend up before the baseline
    baseline = rss_gb()
    result = (torchvision_case if side == "torchvision" else our_case)(name, case, repeats)
    return {
        **result,
        "platform": "-" if side == "torchvision" else jax.devices()[0].platform,
        "baseline_rss_gb": baseline,
        "peak_rss_gb": peak_rss_gb(),
        "device_gb": device_peak_gb(side),
    }


def in_child(side, name, case, repeats, malloc=None):
    """`run_case` in a fresh Python process with the allocator setting `malloc`
    (FRCNN_JAX_MALLOC, `frcnn_jax.runtime.configure_malloc`; None: this process's own)."""
    command = [sys.executable, os.path.abspath(__file__), "--side", side, "--models", name]
    command += ["--cases", case, "--repeats", str(repeats)]
    env = dict(os.environ)
    if malloc is not None:
        if env.pop("FRCNN_JAX_HUGE_PAGES", None):  # set by configure_malloc, with the tunable
            env.pop("GLIBC_TUNABLES", None)
        env["FRCNN_JAX_MALLOC"] = malloc
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"{side}'s side failed ({name}, {case}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def torchvision_best(name, case, repeats, settings):
    """torchvision's side under each allocator setting: (its shortest time, the setting; its
    lowest peak memory, the setting; its baseline memory), memory on the GPU if it ran there."""
    runs = {malloc: in_child("torchvision", name, case, repeats, malloc) for malloc in settings}
    key = "device_gb" if next(iter(runs.values()))["device_gb"] is not None else "peak_rss_gb"
    fastest = min(runs, key=lambda m: runs[m]["seconds"])
    smallest = min(runs, key=lambda m: runs[m][key])
    baseline = next(iter(runs.values()))["baseline_rss_gb"]
    return (runs[fastest]["seconds"], fastest), (runs[smallest][key], smallest), baseline


def time_import():
    """Seconds to convert a full `fasterrcnn_resnet50_fpn` weight file (read with
    weights_only, convert, write the .npz: `python -m frcnn_jax.import_weights`) and to load
    the .npz into the model's variables; and the file's size in MB."""
    import tempfile

    import torch
    import torchvision

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
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--torchvision-malloc",
        default="huge_pages,retain,default",
        help="allocator settings torchvision runs under (its best time and memory are shown)",
    )
    parser.add_argument("--side", choices=("frcnn_jax", "torchvision"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    names, cases = args.models.split(","), args.cases.split(",")
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        parser.error(f"--cases: unknown {unknown}; known: {', '.join(CASES)}")
    if args.side:  # a child of `in_child`
        print(json.dumps(run_case(args.side, names[0], cases[0], args.repeats)))
        return
    settings = args.torchvision_malloc.split(",")
    body, time_ratios, memory_ratios = [], [], []
    for name in names:
        for case in cases:
            # torchvision's children first: on a GPU they exit before JAX reserves its memory
            (their_s, fastest), (their_gb, smallest), their_base = torchvision_best(
                name, case, args.repeats, settings
            )
            ours = in_child("frcnn_jax", name, case, args.repeats)
            on_gpu = ours["device_gb"] is not None
            if not body:  # with the first result: this process never starts JAX's backend
                header = "peak device memory" if on_gpu else "peak resident memory"
                body += [
                    f"jax {jax.__version__} on {ours['platform']}; random weights; frcnn_jax: "
                    f"{describe_runtime()}; torchvision: its shortest time and its lowest peak "
                    f"over the allocator settings {', '.join(settings)} (FRCNN_JAX_MALLOC, "
                    "frcnn_jax.runtime); each side of each case in a process of its own; "
                    f"medians of {args.repeats} runs.",
                    "",
                    f"| case | frcnn_jax s | torchvision s (setting) | time ratio | frcnn_jax "
                    f"{header} GB | torchvision {header} GB (setting) | memory ratio | "
                    "frcnn_jax compiled: arguments / outputs / temporaries GB | frcnn_jax "
                    "compile s | processes before the model: frcnn_jax / torchvision GB |",
                    "|---|---:|---:|---:|---:|---:|---:|---|---:|---|",
                ]
                print("\n".join(body))
            ours_gb = ours["device_gb" if on_gpu else "peak_rss_gb"]
            buffers = ours["buffers_gb"]
            compiled = (
                "-"
                if buffers is None
                else " / ".join(
                    f"{buffers[k]:.2f}" for k in ("arguments", "outputs", "temporaries")
                )
            )
            time_ratios.append(ours["seconds"] / their_s)
            memory_ratios.append(ours_gb / their_gb)
            body.append(
                f"| {name} {CASES[case]} | {ours['seconds']:.3f} | {their_s:.3f} ({fastest}) | "
                f"{ours['seconds'] / their_s:.2f} | {ours_gb:.2f} | {their_gb:.2f} ({smallest}) | "
                f"{ours_gb / their_gb:.2f} | {compiled} | {ours['compile_s']:.1f} | "
                f"{ours['baseline_rss_gb']:.2f} / {their_base:.2f} |"
            )
            print(body[-1], flush=True)
    if "r50_fpn" in names:
        convert_s, load_s, size_mb = time_import()
        body += [
            "",
            f"Importing a fasterrcnn_resnet50_fpn file ({size_mb:.0f} MB): read, convert and "
            f"write {convert_s:.1f} s; load into the model {load_s:.1f} s.",
        ]
        print(body[-1])
    if names == ["vgg16", "r50_fpn"] and cases == list(CASES):  # the README's figure
        result_rows.write_results(
            ROOT / "experiments" / "results_model.md",
            "The detector against torchvision's, case by case: time and peak memory",
            body,
            f"time {min(time_ratios):.2f}-{max(time_ratios):.2f}x torchvision's, {header} "
            f"{min(memory_ratios):.2f}-{max(memory_ratios):.2f}x, in {len(time_ratios)} cases "
            "(each side in a process of its own; torchvision's best time and lowest memory over "
            "three allocator settings)",
        )


if __name__ == "__main__":
    main()
