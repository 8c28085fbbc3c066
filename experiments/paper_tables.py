"""The paper's experiments (Tables 2, 8, 9, 10, Figure 4, the training schemes) on any config.

    python experiments/paper_tables.py --table 2|8|9|10|fig4|schemes[,...]|all
        [--config configs/shapes_tiny.py] [--steps 2000] [--seeds 0,1,2]
        [--rows experiments/results_paper.jsonl] [--runs runs/paper_tables]

Each table is a list of rows; a row names a training (the config with some fields changed) and
test-time settings (more fields changed, weights unchanged), and carries the paper's number
(VOC 2007 test mAP, %) where it has one. Trainings are shared between tables (the config as it
is serves Table 8's 3x3 anchors, Table 9's lambda = 10, Table 10's two-stage row and Figure
4) and resumable (`runs/.../<training>/seed<k>`, `frcnn_jax.training.train_and_evaluate`);
every finished row is a line of `--rows`, and a rerun skips finished rows, so a table can be
completed over several sittings. The Markdown tables (ours beside the paper's, the spread over
seeds, the command) are printed and written next to the rows (`.md`).

`--steps` sets every training's length (decay and warm-up scaled alike); the default suits the
shapes configs on a 2-core CPU (a few minutes per training). On VOC, pass the VOC config and
its own length (`--steps 40000`) on a GPU/TPU. Table 5 (time per stage) is
`experiments/stage_times.py`.
"""

import argparse
import dataclasses
import hashlib
import json
import pathlib
import statistics
import time

from frcnn_jax.runtime import configure_runtime

configure_runtime()

import jax  # noqa: E402
from result_rows import Rows  # noqa: E402

from frcnn_jax import checkpointing, sharding, training  # noqa: E402
from frcnn_jax.cli import setup_logging  # noqa: E402
from frcnn_jax.config import check_config, config_from_file  # noqa: E402
from frcnn_jax.models import build_model  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Row:
    label: str
    train: tuple = ()  # (dotted config field, value) pairs that change the weights
    test: tuple = ()  # (dotted config field, value) pairs set at test time only
    paper: float | None = None  # the paper's mAP (%), VOC 2007 test


def anchor_rows(config):
    """Table 8's anchor settings, for the config's anchors: one scale (the first of each
    level, or of the single list) or all, one ratio (1:1) or all."""
    sizes = config.model.rpn.anchor_sizes
    nested = isinstance(sizes[0], (tuple, list))
    one = tuple((level[0],) for level in sizes) if nested else (sizes[len(sizes) // 2],)
    ratios = tuple(config.model.rpn.aspect_ratios)
    return [
        Row(
            "1 scale, 1 ratio",
            (("model.rpn.anchor_sizes", one), ("model.rpn.aspect_ratios", (1.0,))),
            paper=66.7,
        ),
        Row("1 scale, 3 ratios", (("model.rpn.anchor_sizes", one),), paper=67.9),
        Row("3 scales, 1 ratio", (("model.rpn.aspect_ratios", (1.0,)),), paper=69.8),
        Row(f"3 scales, 3 ratios (the config's: {len(ratios)} ratios)", (), paper=69.9),
    ]


def table_rows(table, config):
    rpn = config.model.rpn
    unshared = [("model.rpn.shared_features", False)]
    if config.train.scheme == "alternating":  # the paper's: stop after phase 2
        unshared.append(("train.alternating_phases", 2))
    if table == "2":
        levels = len(rpn.anchor_sizes) if isinstance(rpn.anchor_sizes[0], (tuple, list)) else 1
        every = rpn.test_pre_nms_top_n * levels  # no NMS: every pre-NMS candidate
        counts = {100: 55.1, 300: 59.9, 1000: 56.3}
        return [
            *[
                Row(
                    f"{n} proposals" + (" (shared features)" if n == 300 else ""),
                    test=(("model.rpn.test_post_nms_top_n", n),),
                    paper=p,
                )
                for n, p in counts.items()
            ],
            Row(
                "unshared features, 300 proposals",
                tuple(unshared),
                (("model.rpn.test_post_nms_top_n", 300),),
                paper=58.7,
            ),
            Row(
                f"no NMS, {every} proposals",
                test=(("model.rpn.test_nms", False), ("model.rpn.test_post_nms_top_n", every)),
                paper=55.2,
            ),
            *[
                Row(
                    f"no cls (random proposals), {n}",
                    test=(
                        ("model.rpn.test_ranking", "random"),
                        ("model.rpn.test_post_nms_top_n", n),
                    ),
                    paper=p,
                )
                for n, p in ((100, 44.6), (300, 51.4), (1000, 55.8))
            ],
            Row(
                "no reg (anchors as proposals), 300",
                test=(("model.rpn.test_regression", False), ("model.rpn.test_post_nms_top_n", 300)),
                paper=52.1,
            ),
        ]
    if table == "8":
        return anchor_rows(config)
    if table == "9":  # lambda relative to the config's balanced weight (the paper's 10)
        weight = float(rpn.box_weight)
        return [
            Row(
                f"lambda = {lam:g} (rpn.box_weight {weight * lam / 10:g})",
                (("model.rpn.box_weight", weight * lam / 10),) if lam != 10 else (),
                paper=p,
            )
            for lam, p in ((0.1, 67.2), (1, 68.9), (10, 69.9), (100, 69.1))
        ]
    if table == "10":  # the paper's 5 test scales (480 ... 1200 for 600) scaled to the config
        scales = tuple(round(config.data.min_size * s / 600) for s in (480, 576, 688, 864, 1200))
        pyramid, multi = (("eval.scales", scales),), (("data.train_scales", scales),)
        one_stage = (("model.head.rois", "anchors"),)
        return [
            Row("two-stage (RPN proposals + Fast R-CNN), 1 scale", paper=58.7),
            Row("two-stage, 5 test scales", test=pyramid),
            Row("two-stage, trained on 5 scales (one per image), 5 test scales", multi, pyramid),
            Row("one-stage (Fast R-CNN on every anchor, no RPN), 1 scale", one_stage, paper=53.8),
            Row("one-stage, 5 test scales", one_stage, pyramid, paper=53.9),
        ]
    if table == "fig4":
        return [
            Row(
                f"{n} proposals: recall vs IoU",
                test=(("model.rpn.test_post_nms_top_n", n), ("eval.proposal_recall", True)),
            )
            for n in (300, 1000, 2000)
        ]
    if table == "schemes":  # gradients through the boxes need RoIAlign (RoIPool rounds them)
        pool = config.model.head.pooler == "pool"
        return [
            Row("approximate joint"),
            Row(
                "non-approximate joint" + (" (RoIAlign)" if pool else ""),
                (
                    ("train.scheme", "non_approximate_joint"),
                    *((("model.head.pooler", "align"),) if pool else ()),
                ),
            ),
            Row("4-step alternating", (("train.scheme", "alternating"),)),
            Row(
                # the paper's steps 1-4 are phases 1-4 in frcnn_jax (the name keys saved rows)
                "4-step alternating, step 2 from step 1",
                (("train.scheme", "alternating"), ("train.alternating_phase2_init", "phase1")),
            ),
        ]
    raise ValueError(f"unknown table {table!r}; one of {TABLES}")


TABLES = ("2", "8", "9", "10", "fig4", "schemes")
TITLES = {
    "2": "Table 2: proposals and ablations (the paper: ZF; its rows other than shared / unshared "
    "test a detector trained on Selective Search proposals, 56.8 at 300; ours test the "
    "joint detector's own RPN)",
    "8": "Table 8: anchors (the paper: VGG-16; 1-scale rows at 256, its 128 rows: 65.8 / 68.8)",
    "9": "Table 9: lambda in equation (1) (the paper: VGG-16)",
    "10": "Table 10: one-stage vs two-stage (the paper, ZF: one stage 53.8 at 1 scale and 53.9 "
    "with 5 test scales against two stages 58.7 at 1 scale, the figures its text compares; "
    "its two-stage RPN has unshared features; it has no two-stage pyramid rows)",
    "fig4": "Figure 4: proposal recall vs IoU (the paper: RPN's recall stays high from 2000 down "
    "to 300 proposals)",
    "schemes": "Training schemes (section 3.2)",
}
# each table's reference row (the start of its label): the config as it is, or the paper's
# choice; every other row is also shown as its difference from it, seed by seed
REFERENCE = {
    "2": "300 proposals",
    "8": "3 scales, 3 ratios",
    "9": "lambda = 10 ",
    "10": "two-stage (",
    "schemes": "approximate joint",
}


def is_reference(table, label):
    return table in REFERENCE and label.startswith(REFERENCE[table])


# ---------------------------------------------------------------- runs


def with_fields(config, pairs):
    config = config.copy_and_resolve_references()
    for dotted, value in pairs:
        *path, last = dotted.split(".")
        node = config
        for key in path:
            node = node[key]
        node[last] = value
    return config


def scaled(config, steps):
    """`config` trained for `steps` steps, decays and warm-up scaled alike."""
    config = config.copy_and_resolve_references()
    train, scale = config.train, steps / config.train.num_steps
    train.lr_steps = tuple(max(1, round(s * scale)) for s in train.lr_steps)
    train.warmup_steps = round(train.warmup_steps * scale)
    train.num_steps, train.checkpoint_every = steps, max(steps // 4, 1)
    return config


def training_name(pairs):
    if not pairs:
        return "config"
    text = json.dumps(sorted((k, list(v) if isinstance(v, tuple) else v) for k, v in pairs))
    return (
        "-".join(f"{k.split('.')[-1]}" for k, _ in sorted(pairs))
        + "-"
        + hashlib.sha1(text.encode()).hexdigest()[:8]
    )


def train(config, workdir):
    """Train (or resume) `config` in `workdir`; its wall-clock minutes."""
    start = time.perf_counter()
    training.train_and_evaluate(config, workdir)
    return (time.perf_counter() - start) / 60


# ---------------------------------------------------------------- tables


def markdown(table, rows, setting, config_file):
    mine = [r for r in rows.all if r.get("table") == table and r["setting"] == setting]
    seeds = ",".join(str(s) for s in sorted({r["seed"] for r in mine}))
    steps = mine[0]["steps"] if mine else "?"
    config_file = pathlib.Path(config_file)  # a repo config as the repo names it
    if config_file.parent.name == "configs":
        config_file = pathlib.Path("configs", config_file.name)
    command = (
        f"python experiments/paper_tables.py --table {table} --config {config_file} "
        f"--steps {steps} --seeds {seeds}"
    )
    lines = [f"## {TITLES[table]}", "", f"{setting}: `{command}`", ""]
    if table == "fig4":
        thresholds = ("0.50", "0.60", "0.70", "0.80", "0.90")
        lines += [
            "| proposals | seeds | " + " | ".join(f"recall@{t}" for t in thresholds) + " | AR |",
            "|---" * (len(thresholds) + 3) + "|",
        ]
    else:
        lines += [
            "| row | seeds | ours mAP@0.5 (%) | spread | vs reference, by seed | "
            "paper (%) | training min |",
            "|---|---|---|---|---|---|---|",
        ]
    reference = {r["seed"]: 100 * r["map"] for r in mine if is_reference(table, r["row"])}
    for label in dict.fromkeys(r["row"] for r in mine):
        found = [r for r in mine if r["row"] == label]
        seeds = ",".join(str(r["seed"]) for r in found)
        if table == "fig4":
            recall = [r["recall"] for r in found]
            cells = [statistics.mean(x[t] for x in recall) for t in thresholds]
            cells.append(statistics.mean(x["AR"] for x in recall))
            lines.append(
                f"| {label.split(':')[0]} | {seeds} | "
                + " | ".join(f"{c:.3f}" for c in cells)
                + " |"
            )
            continue
        values = [100 * r["map"] for r in found]
        spread = f"{min(values):.1f}-{max(values):.1f}" if len(values) > 1 else "-"
        paper = "-" if found[0]["paper"] is None else f"{found[0]['paper']:.1f}"
        minutes = statistics.mean(r["train_minutes"] for r in found)
        lines.append(
            f"| {label} | {seeds} | {statistics.mean(values):.1f} | {spread} | "
            f"{versus(table, found, reference)} | {paper} | {minutes:.1f} |"
        )
    return "\n".join(lines) + "\n"


def versus(table, found, reference):
    """The row's mAP minus the reference row's of the same seed: their mean and range (points),
    "reference" for the reference row itself, "-" where no seed has both."""
    if is_reference(table, found[0]["row"]):
        return "reference"
    differences = [100 * r["map"] - reference[r["seed"]] for r in found if r["seed"] in reference]
    if not differences:
        return "-"
    mean = f"{statistics.mean(differences):+.1f}"
    if len(differences) == 1:
        return mean
    return f"{mean} ({min(differences):+.1f} to {max(differences):+.1f})"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", required=True, help=f"one or more of {TABLES} (a,b), or all")
    parser.add_argument("--config", default=str(ROOT / "configs" / "shapes_tiny.py"))
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--rows", default=str(ROOT / "experiments" / "results_paper.jsonl"))
    parser.add_argument("--runs", default=str(ROOT / "runs" / "paper_tables"))
    args = parser.parse_args()
    setup_logging()
    base = scaled(config_from_file(args.config), args.steps)
    setting = f"{pathlib.Path(args.config).stem}, {args.steps} steps"
    rows = Rows(args.rows)
    tables = TABLES if args.table == "all" else tuple(args.table.split(","))
    unknown = sorted(set(tables) - set(TABLES))
    if unknown:
        parser.error(f"--table: unknown {unknown}; known: {', '.join(TABLES)} or all")
    seeds = [int(s) for s in args.seeds.split(",")]
    runs = pathlib.Path(args.runs) / pathlib.Path(args.config).stem / f"steps{args.steps}"
    mesh = sharding.data_mesh()
    for table in tables:
        for row in table_rows(table, base):
            for seed in seeds:
                if rows.find(table=table, row=row.label, seed=seed, setting=setting):
                    continue
                config = with_fields(base, (*row.train, ("train.seed", seed)))
                check_config(config)
                workdir = runs / training_name(row.train) / f"seed{seed}"
                trained = rows.find(training=str(workdir))
                if trained:  # the training of an earlier row (the run returns at once)
                    training.train_and_evaluate(config, workdir)
                    minutes = trained[0]["minutes"]
                else:
                    minutes = train(config, workdir)
                    rows.add({"training": str(workdir), "minutes": round(minutes, 2)})
                config = with_fields(config, row.test)
                result = training.evaluation.evaluate(
                    config, build_model(config), restore(workdir, mesh), mesh
                )
                record = {
                    "table": table,
                    "row": row.label,
                    "seed": seed,
                    "setting": setting,
                    "config": args.config,
                    "steps": args.steps,
                    "map": result["voc"]["mAP"],
                    "paper": row.paper,
                    "train_minutes": round(minutes, 2),
                    "workdir": str(workdir),
                }
                if "recall" in result:
                    count = config.model.rpn.test_post_nms_top_n
                    record["recall"] = result["recall"][f"recall@{count}"]
                rows.add(record)
                print(
                    f"{table} | {row.label} | seed {seed}: mAP@0.5 {record['map']:.4f}", flush=True
                )
    for table in tables:
        print("\n" + markdown(table, rows, setting, args.config))
    written = [t for t in TABLES if any(r.get("table") == t for r in rows.all)]
    pathlib.Path(args.rows).with_suffix(".md").write_text(
        "\n".join(markdown(t, rows, s, c) for t in written for s, c in settings(rows, t))
    )


def settings(rows, table):
    """(setting, config file) pairs of `table`'s rows, in order."""
    return dict.fromkeys((r["setting"], r["config"]) for r in rows.all if r.get("table") == table)


def restore(workdir, mesh):
    """The latest checkpoint's variables of `workdir`, replicated over `mesh`."""
    checkpoints = checkpointing.Checkpoints(workdir)
    variables = checkpoints.restore_variables(checkpoints.latest_step())
    return jax.device_put(variables, sharding.replicated(mesh))


if __name__ == "__main__":
    main()
