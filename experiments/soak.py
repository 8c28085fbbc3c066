"""A long training run watched for creeping memory and slowing steps.

    python experiments/soak.py [--config configs/shapes_tiny.py] [--steps 3000] [--every 100]
        [--warmup 500] [--output experiments/results_soak.md]

Runs `python -m frcnn_jax.train` as a user would (grain workers included) for `--steps`
steps, samples the resident memory of the trainer and of all its processes (the grain workers)
every second from /proc, and reads the step rate the trainer logs every `--every` steps
(`metrics.jsonl`). Writes a Markdown table (step, ms per step over the last interval,
resident MB) and the least-squares slopes after `--warmup` steps: MB and ms per step per 1000
steps. A flat run has slopes near 0. Linux only (/proc). Not part of CI (about 15 minutes on
2 cores for shapes_tiny's 3000 steps).
"""

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]


def rss_mb(pid):
    """Resident memory of process `pid` in MB (0 when it is gone)."""
    try:
        for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def descendants(pid):
    parents = {}
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def sample(pid, samples, stop):
    """Append (time, trainer MB, all processes MB) every second until `stop` is set."""
    while not stop.is_set():
        trainer = rss_mb(pid)
        samples.append((time.time(), trainer, trainer + sum(map(rss_mb, descendants(pid)))))
        stop.wait(1.0)


def slope_per_1000(steps, values):
    return float(np.polyfit(np.asarray(steps, float), np.asarray(values, float), 1)[0] * 1000)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "shapes_tiny.py"))
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--workdir", help="default: a temporary directory")
    parser.add_argument("--output", default=str(ROOT / "experiments" / "results_soak.md"))
    parser.add_argument("overrides", nargs="*", help="extra --config.field=value flags")
    args = parser.parse_args()
    workdir = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="soak_"))
    command = [
        sys.executable,
        "-m",
        "frcnn_jax.train",
        f"--config={args.config}",
        f"--workdir={workdir}",
        f"--config.train.num_steps={args.steps}",
        f"--config.train.log_every={args.every}",
        *args.overrides,
    ]
    samples, stop = [], threading.Event()
    start = time.time()
    process = subprocess.Popen(command, cwd=ROOT)
    watcher = threading.Thread(target=sample, args=(process.pid, samples, stop), daemon=True)
    watcher.start()
    code = process.wait()
    stop.set()
    watcher.join()
    if code:
        raise SystemExit(f"training failed with exit status {code}: {' '.join(command)}")

    logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in logged if "train/steps_per_s" in r and r["time"] >= start]
    times = np.array([t for t, _, _ in samples])
    rows, previous = [], None
    for record in logged:
        near = int(np.argmin(np.abs(times - record["time"])))
        _, trainer, total = samples[near]
        interval = (
            (record["time"] - previous["time"]) / (record["step"] - previous["step"])
            if previous is not None
            else 1 / record["train/steps_per_s"]
        )
        rows.append((record["step"], 1000 * interval, trainer, total))
        previous = record
    settled = [r for r in rows if r[0] > args.warmup]
    slopes = {
        name: slope_per_1000([r[0] for r in settled], [r[column] for r in settled])
        for name, column in (("ms per step", 1), ("trainer MB", 2), ("all processes MB", 3))
    }
    lines = [
        "# experiments/soak.py: a long run's memory and step time",
        "",
        f"`python experiments/soak.py --config {pathlib.Path(args.config).relative_to(ROOT)} "
        f"--steps {args.steps}` ({time.strftime('%Y-%m-%d')}, {len(samples)} memory samples, "
        f"{(time.time() - start) / 60:.1f} minutes in all). Slopes after step {args.warmup}, "
        "per 1000 steps (least squares over the rows below):",
        "",
        *(f"- {name}: {value:+.2f}" for name, value in slopes.items()),
        "",
        "| step | ms per step (last interval) | trainer resident MB | all processes MB |",
        "|---:|---:|---:|---:|",
        *(f"| {s} | {ms:.0f} | {t:.0f} | {a:.0f} |" for s, ms, t, a in rows),
        "",
    ]
    pathlib.Path(args.output).write_text("\n".join(lines))
    print("\n".join(lines[:10]))


if __name__ == "__main__":
    main()
