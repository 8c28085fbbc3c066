"""The GPU measurements of a session that is lent a GPU machine, in one run of under 8 minutes.

    python experiments/gpu_check.py [--out experiments/results_gpu_h200.txt] [--minutes 7.5]

1. `bench_model.py`: VGG-16 and ResNet-50-FPN, inference (batch 1) and the training step
   (batch 1 and 2) at 600x1000, each side in a process of its own: time, peak device memory of
   each side, frcnn_jax's compiled buffers.
2. `step_time.py --config configs/voc07_vgg16.py`: the training step `frcnn_jax.train` runs,
   images/s in float32 and bfloat16, batch 1 and 2.
3. `bench_ops.py --only roi,nms`: RoIPool, RoIAlign and NMS against torchvision's CUDA kernels.

Each part runs in a subprocess with its share of the time (`SHARES`); what it printed is
appended to `--out` under one header (date, commit, device, versions), a part that ran out of
time or failed says so with its last output. Without a GPU it stops before measuring anything.
"""

import argparse
import datetime
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
HERE = ROOT / "experiments"
PARTS = (
    ("bench_model.py", ["--models", "vgg16,r50_fpn", "--repeats", "5"]),
    (
        "step_time.py",
        ["--config", "configs/voc07_vgg16.py", "--batch", "1,2", "--dtypes", "float32,bfloat16"],
    ),
    ("bench_ops.py", ["--only", "roi,nms", "--repeats", "30"]),
)
SHARES = (0.55, 0.3, 0.15)  # of --minutes, in PARTS' order


def describe_machine():
    """One line: the commit, JAX's devices and the library versions, from a child process (this
    process never starts a backend: each part needs the GPU's memory to itself)."""
    code = (
        "import jax, torch, torchvision; d = jax.devices()\n"
        "print(d[0].platform, len(d), d[0].device_kind, 'jax', jax.__version__, 'torch',"
        " torch.__version__, 'torchvision', torchvision.__version__)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"cannot start JAX and torch:\n{done.stderr[-2000:]}")
    platform, *rest = done.stdout.split()
    return platform, " ".join(rest)


def commit():
    done = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    )
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    name = done.stdout.strip() or "unknown"
    return name + (" + uncommitted changes" if dirty.stdout.strip() else "")


def run_part(script, args, seconds):
    """(status, output) of one part: "done", "failed (rc N)" or "out of time (N s)"."""
    command = [sys.executable, str(HERE / script), *args]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{HERE}"}
    try:
        done = subprocess.run(
            command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=seconds
        )
    except subprocess.TimeoutExpired as stopped:
        output = stopped.stdout or b""
        output = output.decode() if isinstance(output, bytes) else output
        return f"out of time ({seconds:.0f} s)", output
    if done.returncode:
        return f"failed (rc {done.returncode})", done.stdout + done.stderr[-3000:]
    return "done", done.stdout


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(HERE / "results_gpu_h200.txt"))
    parser.add_argument("--minutes", type=float, default=7.5)
    args = parser.parse_args()
    platform, machine = describe_machine()
    if platform != "gpu":
        raise SystemExit(f"no GPU: JAX's devices are {platform} ({machine})")
    today = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    sections = [f"\n## experiments/gpu_check.py, {today}, commit {commit()}\n# {machine}\n"]
    for (script, part_args), share in zip(PARTS, SHARES, strict=True):
        start = time.perf_counter()
        status, output = run_part(script, part_args, share * args.minutes * 60)
        took = time.perf_counter() - start
        sections.append(
            f"\n$ python experiments/{script} {' '.join(part_args)}   # {status}, {took:.0f} s\n"
            + output.rstrip()
            + "\n"
        )
        print(sections[-1], flush=True)
    with open(args.out, "a") as out:
        out.write("".join(sections))
    print(f"appended to {args.out}")


if __name__ == "__main__":
    main()
