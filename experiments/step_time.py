"""Training-step time and images/s of a config's real train step, on whatever devices JAX sees.

    python experiments/step_time.py --config configs/voc07_vgg16.py [--batch 1,2]
        [--dtypes float32,bfloat16] [--steps 10]

Runs `frcnn_jax.training.step.jit_train_step` (the step `frcnn_jax.train` runs: same model,
optimizer, mesh and shardings) on a synthetic batch of the config's canvas size (random image, 5
boxes per image), so no dataset is needed. Prints compile time, the median step time over
`--steps` steps after a warm-up, images/s and the compiled step's temporary memory (XLA's own
estimate; a GPU's peak use also holds the autotuner's scratch), one row per (dtype, batch size).
"""

import argparse
import statistics
import time

from frcnn_jax.runtime import configure_runtime, describe_runtime

configure_runtime()  # before JAX starts: see frcnn_jax/runtime.py

import jax  # noqa: E402
import numpy as np  # noqa: E402
from synthetic import ground_truth  # noqa: E402

from frcnn_jax import sharding, training  # noqa: E402
from frcnn_jax.config import config_from_file  # noqa: E402
from frcnn_jax.data.loader import Inputs  # noqa: E402
from frcnn_jax.models import build_model  # noqa: E402


def synthetic_batch(rng, batch_size, canvas, max_boxes, num_classes, num=5):
    height, width = canvas
    boxes = np.zeros((batch_size, max_boxes, 4), np.float32)
    classes = np.zeros((batch_size, max_boxes), np.int32)
    boxes[:, :num], classes[:, :num] = ground_truth(rng, batch_size, canvas, num_classes, num)
    gt_valid = np.arange(max_boxes)[None].repeat(batch_size, 0) < num
    return Inputs(
        image=rng.uniform(0, 255, (batch_size, height, width, 3)).astype(np.float32),
        image_size=np.tile(np.array([[height, width]], np.int32), (batch_size, 1)),
        scale=np.ones(batch_size, np.float32),
        gt_boxes=boxes,
        gt_classes=classes,
        gt_valid=gt_valid,
        gt_difficult=np.zeros_like(gt_valid),
        valid=np.ones(batch_size, bool),
    )


def time_steps(config, batch_size, steps):
    config.train.batch_size = batch_size
    model = build_model(config)
    mesh = sharding.data_mesh()
    state, tx = training.initial.init_state(config, model)
    state = jax.device_put(state, sharding.replicated(mesh))
    step_fn = training.step.jit_train_step(model, tx, mesh)
    rng = np.random.default_rng(0)
    batch = synthetic_batch(
        rng, batch_size, config.data.canvas, config.data.max_boxes, config.model.num_classes
    )
    batch = sharding.shard_batch(batch, mesh)
    key = jax.random.key(0)
    start = time.perf_counter()
    compiled = step_fn.lower(state, batch, key, None).compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    temp_gib = getattr(memory, "temp_size_in_bytes", float("nan")) / 2**30
    state, metrics = compiled(state, batch, key, None)  # warm-up
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = compiled(state, batch, key, None)
        jax.block_until_ready((state.step, metrics))
        times.append(time.perf_counter() - start)
    loss = float(metrics["loss"])
    return compile_s, statistics.median(times), loss, temp_gib


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/voc07_vgg16.py")
    parser.add_argument("--batch", default="1,2", help="global batch sizes, comma-separated")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    device = jax.devices()[0]
    print(
        f"# {args.config}; jax {jax.__version__}, {jax.device_count()} x "
        f"{getattr(device, 'device_kind', device.platform)}; "
        f"{describe_runtime()}"
    )
    print("| dtype | batch | canvas | compile s | step s (median) | images/s | loss | temp GiB |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for dtype in args.dtypes.split(","):
        for batch_size in map(int, args.batch.split(",")):
            config = config_from_file(args.config)
            config.model.dtype = dtype
            compile_s, step_s, loss, temp_gib = time_steps(config, batch_size, args.steps)
            canvas = "x".join(map(str, config.data.canvas))
            print(
                f"| {dtype} | {batch_size} | {canvas} | {compile_s:.1f} | {step_s:.4f} | "
                f"{batch_size / step_s:.1f} | {loss:.3f} | {temp_gib:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
