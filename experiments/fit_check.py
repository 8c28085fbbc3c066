"""Does a budgeted run end when its budget is spent? `python -m frcnn_jax.fit_budget`, then the
run it fitted (its printed flags: the fitted steps and `train.budget_minutes`, so the run
re-fits its steps to the speed it sustains), for two settings, as a user runs them (separate
processes).

    python experiments/fit_check.py [--minutes 10] [--settings shapes_tiny,voc_folder]
        [--rows experiments/results_fit_budget.jsonl]

Settings: `shapes_tiny` (configs/shapes_tiny.py, the offline shapes set), and `voc_folder`
(the same model on a VOC-layout folder of 500x375 JPEGs written for this run, which neither the
fit nor the run has seen before: TFDS prepares it first). Each row: what fit_budget measured
and predicted, the steps the run took, and the training loop's wall time of the run
(`train/loop_s` in its metrics.jsonl: compilation, steps, loader, logging and checkpoint saves;
the final evaluation is not training). Rows of code before `train.budget_minutes` ran exactly
the fitted steps ("re-fit: no"). A rerun skips rows measured at the current code (`CODE`'s
last commit); the table is written next to the rows (.md).
"""

import argparse
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile

import result_rows

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "shapes_tiny.py"
CODE = ("frcnn_jax", "setup.cfg", "requirements.txt", "configs", "experiments/fit_check.py")
LOGS = pathlib.Path(tempfile.gettempdir()) / "fit_check_logs"  # each command's stderr


def voc_overrides(folder, tfds_dir):
    from bench_input import write_voc_folder

    from frcnn_jax.data import shapes

    if not (folder / "ImageSets").exists():
        write_voc_folder(folder, 600)
    ids = (folder / "ImageSets/Main/train.txt").read_text().split()
    (folder / "ImageSets/Main/test.txt").write_text("\n".join(ids[:100]))  # only timed: any 100
    return [
        "--config.data.name=voc_folder",
        f"--config.data.path={folder}",
        f"--config.data.data_dir={tfds_dir}",
        f"--config.data.class_names={json.dumps(list(shapes.CLASS_NAMES))}",
        "--config.data.train_split=train",
        "--config.eval.split=test",
    ]


def run(command, log):
    LOGS.mkdir(exist_ok=True)
    with open(log, "w") as out:
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=out, text=True, cwd=ROOT)
    if done.returncode:
        sys.exit(f"{' '.join(command)} failed (rc {done.returncode}); see {log}")
    return done.stdout


def check(setting, minutes, probe_minutes, scratch):
    overrides = []
    if setting == "voc_folder":
        overrides = voc_overrides(scratch / "voc", scratch / "tfds")
    base = [f"--config={CONFIG}", *overrides]
    fitted = run(
        [
            sys.executable,
            "-m",
            "frcnn_jax.fit_budget",
            *base,
            f"--minutes={minutes}",
            f"--probe_minutes={probe_minutes}",
        ],
        LOGS / f"{setting}_fit.log",
    )
    lines = fitted.strip().splitlines()
    speed = float(re.search(r"measured ([\d.]+) steps/s", lines[-3]).group(1))
    first_s = float(re.search(r"first step ([\d.]+) s", lines[-3]).group(1))
    save_s = float(re.search(r"([\d.]+) s per checkpoint save", lines[-3]).group(1))
    error = float(re.search(r"standard error ([\d.]+)%", lines[-3]).group(1)) / 100
    predicted = float(re.search(r"end ([\d.]+) minutes", lines[-2]).group(1))
    flags = lines[-1].split()
    workdir = scratch / f"{setting}_run"
    run(
        [sys.executable, "-m", "frcnn_jax.train", *base, *flags, f"--workdir={workdir}"],
        LOGS / f"{setting}_train.log",
    )
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    loop_s, steps_run = next((r["train/loop_s"], r["step"]) for r in records if "train/loop_s" in r)
    num_steps = int(flags[0].split("=")[1])
    refit = any(flag.startswith("--config.train.budget_minutes=") for flag in flags)
    progress = [r for r in records if "train/steps_per_s" in r]
    return {
        "setting": setting,
        "budget_minutes": minutes,
        "probe_minutes": probe_minutes,
        "fit_steps_per_second": speed,
        "fit_first_step_s": first_s,
        "fit_save_s": save_s,
        "fit_standard_error": error,
        "fit_predicted_minutes": predicted,
        "num_steps": num_steps,
        "flags": flags,
        "refit": refit,
        "steps_run": steps_run,
        "loop_minutes": round(loop_s / 60, 3),
        "sustained_steps_per_second": round(steps_run / loop_s, 3),
        "first_log": [progress[0]["step"], round(progress[0]["train/elapsed_s"], 1)],
        "steps_per_second_after_first_log": round(
            (progress[-1]["step"] - progress[0]["step"])
            / (progress[-1]["train/elapsed_s"] - progress[0]["train/elapsed_s"]),
            3,
        ),
        "off_by": round(loop_s / 60 / minutes - 1, 4),
        "load_average": round(os.getloadavg()[0], 2),
    }


def table(rows, command):
    lines = ["# Runs with a time budget: where they end", ""]
    lines += result_rows.provenance(command)
    lines += [
        "Re-fit: whether the run re-fitted its steps to its speed (`train.budget_minutes`; "
        "code before it ran exactly the fitted steps).",
        "",
        "| setting | budget min | fit: steps/s sustained | fitted steps | predicted end min "
        "| re-fit | steps run | the run's loop min | off by | commit | finished |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        refit = r.get("refit", False)
        lines.append(
            f"| {r['setting']} | {r['budget_minutes']:g} | {r['fit_steps_per_second']:.3f} | "
            f"{r['num_steps']} | {r['fit_predicted_minutes']:.2f} | {'yes' if refit else 'no'} "
            f"| {r.get('steps_run', r['num_steps'])} | {r['loop_minutes']:.2f} | "
            f"{100 * r['off_by']:+.1f}% | {r['commit']} | {r['finished']} |"
        )
    latest = {r["setting"]: r for r in rows}  # each setting's last row
    if latest:
        ends = ", ".join(
            f"{r['setting']} {r['loop_minutes']:.2f} min ({100 * r['off_by']:+.1f}%)"
            for r in latest.values()
        )
        budgets = sorted({r["budget_minutes"] for r in latest.values()})
        lines += [
            "",
            f"README: a budget of {' / '.join(f'{b:g}' for b in budgets)} minutes, the runs' "
            f"training loops took {ends}",
        ]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--probe-minutes", type=float, default=3.0)
    parser.add_argument("--settings", default="shapes_tiny,voc_folder")
    parser.add_argument("--rows", default=str(ROOT / "experiments" / "results_fit_budget.jsonl"))
    args = parser.parse_args()
    rows = result_rows.Rows(args.rows)
    code = result_rows.code_version(CODE)
    for setting in args.settings.split(","):
        if rows.find(setting=setting, budget_minutes=args.minutes, code=code):
            continue
        with tempfile.TemporaryDirectory() as scratch:
            row = check(setting, args.minutes, args.probe_minutes, pathlib.Path(scratch))
        rows.add({**row, "code": code})
        print(json.dumps(row), flush=True)
    command = "python experiments/fit_check.py " + " ".join(sys.argv[1:])
    text = table(rows.all, command.strip())
    print(text)
    pathlib.Path(args.rows).with_suffix(".md").write_text(text)


if __name__ == "__main__":
    main()
