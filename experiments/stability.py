"""Does a training of the paper tables' setting diverge, and does a change keep it from doing so?
One training per (seed, change): the config in `paper_tables`' setting (`--steps` long, from the
committed pretrained backbone), with `--change` fields set (e.g. `train.grad_clip_norm=10`) or
none; each row records the step of a non-finite loss, or the test mAP, and the largest gradient
norms of the first 200 steps (logged every step). Resumable: a rerun skips finished rows.

    python experiments/stability.py --seeds 1 --change ''
    python experiments/stability.py --seeds 0,1 --change train.grad_clip_norm=10
"""

import argparse
import ast
import json
import pathlib
import shlex
import sys

import paper_report
import paper_tables  # sets up the CPU runtime before JAX is imported
import result_rows
from result_rows import Rows

from frcnn_jax.config import check_config, config_from_file

ROOT = pathlib.Path(__file__).resolve().parents[1]
EARLY = 200  # steps whose gradient norms a row keeps


def parse_change(text):
    """'a.b=1,c.d=x' -> (("a.b", 1), ("c.d", "x")); '' -> ()."""
    pairs = []
    for item in filter(None, text.split(",")):
        key, value = item.split("=", 1)
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            pass
        pairs.append((key, value))
    return tuple(pairs)


def early_gradients(workdir):
    """(largest gradient norm, [(step, norm) over 10]) of the first `EARLY` steps."""
    norms = []
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "train/grad_norm" in row and row["step"] <= EARLY:
            norms.append((row["step"], row["train/grad_norm"]))
    return max(n for _, n in norms), [(s, round(n, 1)) for s, n in norms if n > 10]


def table(rows):
    lines = [
        "| seed | change | outcome | test mAP@0.5 (%) | largest grad norm, first "
        f"{EARLY} steps | steps over 10 | minutes | commit |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows.all:
        outcome = f"diverged at step {r['diverged_at']}" if r.get("diverged_at") else "finished"
        value = "-" if r.get("map") is None else f"{100 * r['map']:.1f}"
        lines.append(
            f"| {r['seed']} | {r['change'] or 'none'} | {outcome} | {value} | "
            f"{r['largest_grad_norm']:.3g} | {len(r['over_10'])} | {r['minutes']:.1f} | "
            f"{r['commit']} |"
        )
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "shapes_tiny.py"))
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--change", default="", help="fields set, e.g. train.grad_clip_norm=10")
    parser.add_argument(
        "--backbone",
        default=str(ROOT / "experiments" / "backbones" / "pretrain_shapes_tiny_fpn-steps3000.npz"),
        help="the pretrained backbone's weights file; 'none': from random weights",
    )
    parser.add_argument("--rows", default=str(ROOT / "experiments" / "results_stability.jsonl"))
    parser.add_argument("--runs", default=str(ROOT / "runs" / "stability"))
    args = parser.parse_args()
    change = parse_change(args.change)
    base = paper_tables.paper_setting(config_from_file(args.config))
    base = paper_tables.scaled(base, args.steps)
    base.model.init_checkpoint = None if args.backbone == "none" else args.backbone
    digest = paper_tables.config_digest(base)
    rows = Rows(args.rows)
    for seed in (int(s) for s in args.seeds.split(",")):
        if rows.find(seed=seed, change=args.change, config_digest=digest, steps=args.steps):
            continue
        config = paper_tables.with_fields(base, (*change, ("train.seed", seed)))
        config.train.log_every = 1  # every step's gradient norm (the step's math is the same)
        check_config(config)
        name = paper_tables.training_name(change)
        workdir = pathlib.Path(args.runs) / f"steps{args.steps}-{digest}" / name / f"seed{seed}"
        minutes, result, diverged_at = paper_tables.train(config, workdir)
        outcome = {"map": result["voc"]["mAP"]} if result else {"diverged_at": diverged_at}
        largest, over = early_gradients(workdir)
        row = rows.add(
            {
                "seed": seed,
                "change": args.change,
                "config": args.config,
                "steps": args.steps,
                "config_digest": digest,
                "backbone": args.backbone,
                **outcome,
                "largest_grad_norm": largest,
                "over_10": over,
                "minutes": round(minutes, 2),
            }
        )
        print(json.dumps(row), flush=True)
    start = (
        "random weights"
        if args.backbone == "none"
        else f"the pretrained backbone `{pathlib.Path(args.backbone).name}`"
    )
    command = shlex.join(["python", "experiments/stability.py", *sys.argv[1:]])
    lines = [
        "# Training stability in the paper tables' setting",
        "",
        *result_rows.provenance(command),
        f"{paper_report.repo_name(args.config)}, {args.steps} steps, from {start} "
        "(`paper_tables`' setting); gradient norms before "
        "clipping, as the training logs them. Each row: `python experiments/stability.py "
        "--seeds <seed> --change '<change>'`.",
        "",
        *table(rows),
        "",
    ]
    pathlib.Path(args.rows).with_suffix(".md").write_text("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
