"""Does a change to a config's defaults help? For each seed, the config as it is and the config
with `--change` set are trained (the pair shares its initialisation and data order) and
evaluated on the test split; the table gives each seed's pair and the paired differences of
mAP@0.5: their mean, 95% t-interval and p (`paper_report.compare`: a finding needs the interval
to exclude 0 over at least 5 seeds). A training that diverges counts as mAP 0. Rows are keyed
by the config's values and the library's last commit; a rerun skips finished rows, so the
seeds can be spread over sittings.

    python experiments/defaults_check.py --config configs/shapes_tiny.py --seeds 0,1,2,3,4 \\
        --change train.optimizer=adamw,train.lr_schedule=cosine,train.learning_rate=0.001
"""

import argparse
import json
import pathlib
import shlex
import statistics
import sys

import paper_report
import paper_tables  # sets up the CPU runtime before JAX is imported
import result_rows
from reproduce import LIBRARY
from result_rows import Rows
from stability import parse_change

from frcnn_jax.config import check_config, config_from_file

ROOT = pathlib.Path(__file__).resolve().parents[1]


def value(row):
    """A row's test mAP@0.5 in points (a diverged training: 0)."""
    return 0.0 if row.get("map") is None else 100 * row["map"]


def table(rows, match, change):
    """Markdown lines: each seed's pair (rows matching `match`) and the paired summary."""
    pairs = []
    for seed in sorted({r["seed"] for r in rows.find(**match)}):
        base = rows.find(**match, seed=seed, change="")
        changed = rows.find(**match, seed=seed, change=change)
        if base and changed:
            pairs.append((seed, base[-1], changed[-1]))
    lines = [
        "| seed | as configured: mAP@0.5 (%) | changed: mAP@0.5 (%) | difference | minutes |",
        "|---|---|---|---|---|",
    ]
    for seed, base, changed in pairs:
        cells = []
        for row in (base, changed):
            step = row.get("diverged_at")
            cells.append(f"{value(row):.1f}" if step is None else f"diverged at step {step}")
        lines.append(
            f"| {seed} | {cells[0]} | {cells[1]} | {value(changed) - value(base):+.1f} | "
            f"{base['minutes']:.1f} / {changed['minutes']:.1f} |"
        )
    result = paper_report.compare([value(c) - value(b) for _, b, c in pairs], shared=False)
    means = [statistics.mean(value(p[i]) for p in pairs) if pairs else 0.0 for i in (1, 2)]
    summary = (
        f"Over {result['n']} seed{'s' * (result['n'] != 1)}: {means[0]:.1f} as configured, "
        f"{means[1]:.1f} changed; paired difference (mean [95% t-interval] (p)) "
        f"{paper_report.described(result)}: {verdict(result)}."
    )
    return [*lines, "", summary]


def verdict(result):
    if result["n"] < result["needed"]:
        return f"too few seeds for a finding ({result['n']} of {result['needed']})"
    if not result["finding"]:
        return "no difference found"
    return "the change helps" if result["mean"] > 0 else "the change hurts"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/shapes_tiny.py")
    parser.add_argument("--change", required=True, help="fields set, e.g. train.optimizer=adamw")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--steps", type=int, default=None, help="default: the config's own")
    parser.add_argument("--rows", default=str(ROOT / "experiments" / "results_defaults.jsonl"))
    parser.add_argument("--runs", default=str(ROOT / "runs" / "defaults"))
    args = parser.parse_args()
    base = config_from_file(ROOT / args.config)
    steps = args.steps or base.train.num_steps
    base = paper_tables.scaled(base, steps)
    match = {
        "config": args.config,
        "config_digest": paper_tables.config_digest(base),
        "steps": steps,
        "code": result_rows.code_version(LIBRARY),
    }
    rows = Rows(args.rows)
    for seed in (int(s) for s in args.seeds.split(",")):
        for change in ("", args.change):  # the pair back to back: drifts fall on both
            if rows.find(**match, seed=seed, change=change):
                continue
            pairs = parse_change(change)
            config = paper_tables.with_fields(base, (*pairs, ("train.seed", seed)))
            check_config(config)
            name = paper_tables.training_name(pairs)
            # the code in the name too: a rerun at other code never resumes these checkpoints
            workdir = pathlib.Path(args.runs) / "-".join(
                (f"steps{steps}", match["config_digest"], match["code"])
            )
            minutes, result, diverged_at = paper_tables.train(
                config, workdir / name / f"seed{seed}"
            )
            outcome = {"map": result["voc"]["mAP"]} if result else {"diverged_at": diverged_at}
            row = rows.add(
                {**match, "seed": seed, "change": change, **outcome, "minutes": round(minutes, 2)}
            )
            print(json.dumps(row), flush=True)
    command = shlex.join(["python", "experiments/defaults_check.py", *sys.argv[1:]])
    lines = [
        f"# A change to {paper_report.repo_name(args.config)}'s defaults",
        "",
        *result_rows.provenance(command),
        f"{paper_report.repo_name(args.config)}, {steps} steps, library code {match['code']}, "
        f"test mAP@0.5 of the final checkpoint; changed: `{args.change}`.",
        "",
        *table(rows, match, args.change),
        "",
    ]
    pathlib.Path(args.rows).with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
