"""The README's main command, run as a user runs it: `python -m frcnn_jax.train --config
configs/shapes_tiny.py` in a fresh workdir, timed, its printed test mAP@0.5 recorded.

    python experiments/main_command.py [--config configs/shapes_tiny.py]

Writes `experiments/results_main_command.md` (the command's wall time, the training loop's
steps/s from its metrics.jsonl, the mAP line it printed).
"""

import argparse
import json
import pathlib
import re
import subprocess
import sys
import tempfile
import time

import result_rows

ROOT = pathlib.Path(__file__).resolve().parents[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/shapes_tiny.py")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        command = [sys.executable, "-m", "frcnn_jax.train", f"--config={args.config}"]
        start = time.perf_counter()
        done = subprocess.run(
            [*command, f"--workdir={workdir}"], cwd=ROOT, capture_output=True, text=True
        )
        minutes = (time.perf_counter() - start) / 60
        if done.returncode:
            raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
        printed = next(line for line in done.stdout.splitlines() if "mAP@0.5 =" in line)
        printed = printed.split(" (report:")[0]  # the temporary folder's path
        records = [json.loads(x) for x in (pathlib.Path(workdir) / "metrics.jsonl").open()]
    value = float(re.search(r"mAP@0.5 = ([\d.]+)", printed).group(1))
    loop = next(r for r in records if "train/loop_s" in r)
    body = [
        f"`python -m frcnn_jax.train --config={args.config} --workdir=<a new folder>`: "
        f"{minutes:.1f} minutes in all (preparing the data, training {loop['step']} steps in "
        f"{loop['train/loop_s'] / 60:.1f} minutes, {loop['step'] / loop['train/loop_s']:.2f} "
        "steps/s with compilation and checkpoint saves, the final evaluation). It printed:",
        "",
        f"    {printed}",
    ]
    print("\n".join(body))
    result_rows.write_results(
        ROOT / "experiments" / "results_main_command.md",
        "The README's main command",
        body,
        f"test mAP@0.5 {value:.4f} ({minutes:.0f} minutes on this CPU)",
    )


if __name__ == "__main__":
    main()
