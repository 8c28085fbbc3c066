"""The paper's experiments (Tables 2, 8, 9, 10, Figure 4, the training schemes) on any config,
in the paper's setting: from a classification-pretrained backbone.

    python experiments/paper_tables.py --table 2|8|9|10|fig4|schemes[,...]|all
        [--config configs/shapes_tiny.py] [--steps 2000] [--seeds 0,1,2,3,4] [--row TEXT ...]
        [--start pretrained|scratch|config] [--pretrain configs/pretrain_shapes_tiny_fpn.py]
        [--pretrain-steps N] [--rows experiments/results_paper.jsonl] [--runs runs/paper_tables]
        [--backbones experiments/backbones]

The paper fine-tunes ImageNet-pretrained networks; `--start pretrained` (the default) starts
every detector from the config's backbone pretrained with `--pretrain`: the committed file
`<backbones>/<pretraining config>-steps<N>.npz` when there is one, otherwise a pretraining run
first (`python -m frcnn_jax.pretrain`, resumable, its top-1 and minutes recorded as a row) whose
file is copied there to be committed; `--start scratch` trains
from random weights (the earlier tables' setting, kept as their second column).

Each table is a list of rows; a row names a training (the config with some fields changed) and
test-time settings (more fields changed, weights unchanged), and carries the paper's number
(VOC 2007 test mAP, %) where it has one. Trainings are shared between tables (the config as it
is serves Table 8's 3x3 anchors, Table 9's lambda = 10, Table 10's two-stage row and Figure
4) and resumable (`runs/.../<training>/seed<k>`, `frcnn_jax.training.train_and_evaluate`);
every finished row is a line of `--rows`, and a rerun skips finished rows, so a table can be
completed over several sittings (`--row TEXT`: only the rows whose label contains it). A
training whose weights are gone is trained again as a new training record, and the rows
computed from it name it: an earlier row keeps its own record.
A training that meets a non-finite loss stops there and is recorded as diverged (the step): its
rows say so, carry no mAP and leave their seed out of the comparisons; a rerun does not train
it again (it would diverge at the same step).
The same holds for the pretrained backbone: each weights file is recorded by its SHA-256, the
rows trained from it carry it (`backbone`), and a seed's rows all come from one backbone (a
seed whose rows came from a backbone that is gone is skipped, saying so; other seeds run).

The tables hold the paper's lambda and optimizer (SGD, momentum 0.9, step decays) whatever the
config's own RPN box weight and optimizer are (`paper_recipe`),
and every row records a digest of the config's values: rows of one setting are never trained
from different values (a config retuned since is refused with the commit to compare with).

Every row but a table's reference is compared with the reference row of the same seed (paired
differences, `compare`): the mean difference, its 95% t-interval over the seeds and the
t-test's p-value. A difference is a finding when the interval excludes zero (wrong at most 1
time in 20 when there is no effect) and, for a row with a training of its own (its difference
includes training noise), at least 5 seeds back it; the verdict then says whether its sign is
the paper's. The Markdown tables (ours beside the paper's, the test, the verdict, training
minutes, the command) are printed and written next to the rows (`.md`); the statistics and
the Markdown are `experiments/paper_report.py`'s.

`--steps` sets every joint training's length (decay and warm-up scaled alike); 4-step
alternating training runs the paper's phase lengths and batch sizes relative to it
(80k/40k/80k/40k iterations of 1/2/1/2 images against 70k joint iterations of 2: 3.43x the
steps, 2.29x the images, each phase's rate decayed after 3/4 of it, phases 1 and 2 from the
pretrained weights). The default suits the shapes configs on a 2-core CPU (a few
minutes per joint training). On VOC, pass the VOC config and its own length (`--steps 70000`)
on a GPU/TPU, with `--pretrain` an ImageNet pretraining config of the backbone, or `--start
config` to keep the config's own `model.init_checkpoint` (e.g. imported torchvision weights).
Table 5 (time per stage) is `experiments/stage_times.py`.
"""

import argparse
import dataclasses
import hashlib
import json
import pathlib
import shutil
import time

from frcnn_jax.runtime import configure_runtime

configure_runtime()

import jax  # noqa: E402
import result_rows  # noqa: E402
from paper_report import (  # noqa: E402
    TABLES,
    TITLES,
    backbone_of,
    markdown,
    repo_name,
    setting_rows,
    training_summaries,
    write_tables,
)
from result_rows import Rows  # noqa: E402

from frcnn_jax import checkpointing, pretraining, sharding, training  # noqa: E402
from frcnn_jax.cli import exit_on_sigterm, setup_logging  # noqa: E402
from frcnn_jax.config import check_config, config_from_file  # noqa: E402
from frcnn_jax.models import build_model  # noqa: E402
from frcnn_jax.training.phase import NonFinite  # noqa: E402

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


def chosen_rows(rows, texts):
    """`rows` whose label contains any of `texts` (all of them when `texts` is empty)."""
    return [r for r in rows if not texts or any(text in r.label for text in texts)]


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
            # 1000: beyond the paper's range, where ours still rose at its edge (100)
            for lam, p in ((0.1, 67.2), (1, 68.9), (10, 69.9), (100, 69.1), (1000, None))
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
            Row(
                "4-step alternating, the paper's phase lengths and batch sizes (80k/40k/80k/40k "
                "steps of 1/2/1/2 images per 70k of 2)",
                paper_alternating(config),
            ),
            # the paper's steps 1-4 are phases 1-4 in frcnn_jax (the names key saved rows)
            Row("4-step alternating", (("train.scheme", "alternating"),)),  # joint's steps
        ]
    raise ValueError(f"unknown table {table!r}; one of {TABLES}")


def paper_alternating(config):
    """The fields of 4-step alternating training with the paper's phase lengths and batch sizes
    relative to `config`'s joint training (py-faster-rcnn: 80k, 40k, 80k, 40k iterations of 1,
    2, 1, 2 images (its RPN stages one image each) against 70k iterations of 2 images for
    end-to-end training, each phase's rate x0.1 after 60k / 30k, the same rate in every
    phase): the RPN phases take half the joint batch, the Fast R-CNN phases all of it."""
    steps, batch = int(config.train.num_steps), int(config.train.batch_size)
    phases = tuple(max(1, round(steps * n / 70)) for n in (80, 40, 80, 40))
    half = max(1, batch // 2)
    return (
        ("train.scheme", "alternating"),
        ("train.alternating_phase_steps", phases),
        ("train.alternating_phase_lr_steps", tuple(max(1, round(n * 3 / 4)) for n in phases)),
        ("train.alternating_phase_batch_sizes", (half, batch, half, batch)),
    )


def paper_recipe(config):
    """The paper's choices that a config's tuned defaults may leave (issue 36 item 5 tunes the
    shapes configs' RPN box weight and optimizer), as field pairs: the tables test the paper's
    recipe whatever the config's defaults are. lambda = 10 with N_reg the ~2400 anchor
    locations; with N_reg the 256 sampled anchors (torchvision's normaliser, `box_normalizer`
    None) that is a weight of about 1 (10 x 256 / 2400). SGD with momentum 0.9 and step decays;
    the rate, its decay steps and the weight decay stay the config's (they depend on its batch
    and length), so a config moved to another optimizer must keep an SGD rate in
    `learning_rate` or the tables' digest check refuses its rows."""
    sampled = config.model.rpn.box_normalizer is None
    return (
        ("model.rpn.box_weight", 1.0 if sampled else 10.0),
        ("train.optimizer", "sgd"),
        ("train.momentum", 0.9),
        ("train.lr_schedule", "step"),
    )


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


def paper_setting(config):
    return with_fields(config, paper_recipe(config))


def scaled(config, steps):
    """`config` trained for `steps` steps, decays and warm-up scaled alike."""
    config = config.copy_and_resolve_references()
    train, scale = config.train, steps / config.train.num_steps
    train.lr_steps = tuple(max(1, round(s * scale)) for s in train.lr_steps)
    train.warmup_steps = round(train.warmup_steps * scale)
    train.num_steps, train.checkpoint_every = steps, max(steps // 4, 1)
    return config


def config_digest(config):
    """`config`'s fingerprint but its initial weights' path (the setting string names those):
    rows trained from different values are never mixed in one table."""
    return result_rows.config_digest(config, ignore=("model.init_checkpoint",))


def check_digest(rows, setting, digest, config_file):
    """Refuse to add rows to `setting` when its earlier rows came from other config values
    (e.g. the config file's defaults were retuned since)."""
    other = next(
        (
            r
            for r in rows.all
            if r.get("setting") == setting and r.get("config_digest", digest) != digest
        ),
        None,
    )
    if other is not None:
        raise SystemExit(
            f"{config_file} now gives other values (config digest {digest}) than the rows of "
            f"setting {setting!r} were trained with ({other['config_digest']}, commit "
            f"{other['commit']}): compare with "
            f"`git show {other['commit']}:{repo_name(config_file)}`, restore the values, or pass "
            "another --rows file"
        )


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
    """Train (or resume) `config` in `workdir`: (the minutes its training took, summed over the
    sittings that trained it (`<workdir>/paper_minutes.txt`), its final evaluation's metrics,
    the step of a non-finite loss that stopped it); metrics None when it diverged, the step
    None when it did not."""
    record = pathlib.Path(workdir) / "paper_minutes.txt"
    before = float(record.read_text()) if record.is_file() else 0.0
    done = trained_to_the_end(config, workdir)
    start = time.perf_counter()
    diverged_at = None
    try:
        result = training.train_and_evaluate(config, workdir)
    except NonFinite as error:
        result, diverged_at = None, error.step
        print(f"{workdir}: diverged ({error})", flush=True)
    finally:
        if not done:
            record.parent.mkdir(parents=True, exist_ok=True)
            record.write_text(f"{before + (time.perf_counter() - start) / 60:.3f}")
    if result is None and diverged_at is None:  # stopped by a signal: no row from it
        raise SystemExit(f"stopped while training {workdir}; rerun the same command to resume")
    return float(record.read_text()) if record.is_file() else 0.0, result, diverged_at


def trained_to_the_end(config, workdir):
    """Whether `workdir` holds `config`'s final checkpoint (with `train.budget_minutes`: the
    one at the step its budget ended, which that checkpoint's metadata records)."""
    checkpoints = checkpointing.Checkpoints(workdir)
    latest = checkpoints.latest_step()
    if latest is None:
        return False
    if config.train.budget_minutes:
        return checkpoints.meta(latest).get("budget_end_step") == latest
    return latest >= training.alternating.final_step(config.train)


def pretrained_backbone(args, rows):
    """(the weights file of `args.pretrain`'s pretraining; its backbone id, the file's SHA-256
    (12 hex)). The file is `<backbones>/<config>-steps<N>.npz` when that exists (committed, so
    that every machine starts its seeds from the same backbone); otherwise the pretraining runs
    or resumes in `<runs>/pretrain/<config>-steps<N>` and its file is copied there, to be
    committed with its record. Each distinct weights file is recorded in `rows` with its top-1
    and minutes: a pretraining run again (its workdir gone, e.g. on another machine) gets a
    record of its own, `retrained`, and the rows trained from it say so (`backbone`)."""
    config = pretraining_config(args)
    steps = config.train.num_steps
    name = f"{pathlib.Path(args.pretrain).stem}-steps{steps}"
    shipped = pathlib.Path(args.backbones) / f"{name}.npz"
    records = pretraining_records(rows, args.pretrain, steps)
    if shipped.is_file():
        backbone = hashlib.sha256(shipped.read_bytes()).hexdigest()[:12]
        if not any(r.get("backbone") == backbone for r in records):
            raise SystemExit(
                f"{shipped}: no pretraining record of backbone {backbone} in {args.rows} (its "
                "top-1 and minutes); move the file away to pretrain again"
            )
        return shipped, backbone
    workdir = pathlib.Path(args.runs) / "pretrain" / name
    minutes, result = timed_pretraining(config, workdir)
    weights_file = workdir / pretraining.WEIGHTS_FILE
    backbone = hashlib.sha256(weights_file.read_bytes()).hexdigest()[:12]
    shipped.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(weights_file, shipped)
    if not any(r.get("backbone") == backbone for r in records):
        rows.add(
            {
                "pretrain": args.pretrain,
                "pretrain_steps": steps,
                "top1": result["top1"],
                "top5": result["top5"],
                "examples": result["examples"],
                "minutes": None if minutes is None else round(minutes, 2),
                "weights": str(
                    shipped.relative_to(ROOT) if shipped.is_relative_to(ROOT) else shipped
                ),
                "backbone": backbone,
                **({"retrained": True} if records else {}),
            }
        )
    return shipped, backbone


def pretraining_records(rows, pretrain, steps):
    """The records of `pretrain`'s pretrainings of `steps` steps; a repo config matches by its
    name in the repo (`configs/<name>`), so a checkout elsewhere finds the committed records."""
    return [
        r
        for r in rows.find(pretrain_steps=steps)
        if "table" not in r and repo_name(r.get("pretrain", "")) == repo_name(pretrain)
    ]


def pretraining_config(args):
    config = config_from_file(args.pretrain)
    if args.pretrain_steps:
        config.train.update(
            num_steps=args.pretrain_steps,
            warmup_steps=min(config.train.warmup_steps, args.pretrain_steps // 10),
            checkpoint_every=max(args.pretrain_steps // 4, 1),
        )
    return config


def timed_pretraining(config, workdir):
    """(minutes summed over the sittings that trained it, or None for a workdir trained
    elsewhere, result) of the pretraining of `config` in `workdir` (run or resumed first)."""
    record = workdir / "paper_minutes.txt"
    before = float(record.read_text()) if record.is_file() else 0.0
    report = workdir / "eval" / f"step_{config.train.num_steps}" / "metrics.json"
    done = report.is_file() and (workdir / pretraining.WEIGHTS_FILE).is_file()
    start = time.perf_counter()
    result = pretraining.pretrain_and_evaluate(config, workdir)
    if not done:
        record.write_text(f"{before + (time.perf_counter() - start) / 60:.3f}")
    if result is None:
        raise SystemExit("pretraining stopped; rerun the same command to resume")
    return (float(record.read_text()) if record.is_file() else None), result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", help=f"one or more of {TABLES} (a,b), or all")
    parser.add_argument(
        "--summaries",
        action="store_true",
        help="only add a summary (final losses, loop times) of every recorded training that has "
        "none and whose metrics.jsonl is still here, then exit",
    )
    parser.add_argument("--config", default=str(ROOT / "configs" / "shapes_tiny.py"))
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument(
        "--row",
        action="append",
        default=[],
        help="only the rows whose label contains this text (repeatable: any of them)",
    )
    parser.add_argument("--start", choices=STARTS, default="pretrained")
    parser.add_argument("--pretrain", default=str(ROOT / "configs" / "pretrain_shapes_tiny_fpn.py"))
    parser.add_argument("--pretrain-steps", type=int, default=None, help="default: the config's")
    parser.add_argument("--rows", default=str(ROOT / "experiments" / "results_paper.jsonl"))
    parser.add_argument("--runs", default=str(ROOT / "runs" / "paper_tables"))
    parser.add_argument(
        "--backbones",
        default=str(ROOT / "experiments" / "backbones"),
        help="pretrained backbones, one per pretraining config and length (committed)",
    )
    args = parser.parse_args()
    if args.summaries:
        rows = Rows(args.rows)
        for record in add_summaries(rows):
            print(f"summarised {record['summary_of']}: {record['final_losses']}", flush=True)
        write_tables(rows, pathlib.Path(args.rows).with_suffix(".md"))
        return
    if not args.table:
        parser.error("--table is required (or --summaries)")
    tables = TABLES if args.table == "all" else tuple(args.table.split(","))
    unknown = sorted(set(tables) - set(TABLES))
    if unknown:
        parser.error(f"--table: unknown {unknown}; known: {', '.join(TABLES)} or all")
    setup_logging()
    exit_on_sigterm()
    rows = Rows(args.rows)
    base = scaled(paper_setting(config_from_file(args.config)), args.steps)
    every = {table: table_rows(table, base) for table in tables}
    labels = [row.label for table_of in every.values() for row in table_of]
    unmatched = [text for text in args.row if not any(text in label for label in labels)]
    if unmatched:
        parser.error(f"--row {unmatched} matches no row of --table {args.table}; rows: {labels}")
    stem = pathlib.Path(args.config).stem
    setting = f"{stem}, {args.steps} steps"  # from scratch: the earlier rows' setting
    start_dir = ""  # from scratch
    start_fields = {"start": args.start}
    if args.start == "pretrained":
        weights_file, backbone = pretrained_backbone(args, rows)
        pretrain_steps = pretraining_config(args).train.num_steps
        base.model.init_checkpoint = str(weights_file)
        setting += f", pretrained ({pathlib.Path(args.pretrain).stem}, {pretrain_steps} steps)"
        start_dir = f"pretrained-{pathlib.Path(args.pretrain).stem}-{pretrain_steps}-{backbone}"
        start_fields.update(
            pretrain=args.pretrain, pretrain_steps=pretrain_steps, backbone=backbone
        )
    elif args.start == "scratch":
        base.model.init_checkpoint = None
    else:
        setting += ", the config's init_checkpoint"
        start_dir = "config-init"
    digest = config_digest(base)
    check_digest(rows, setting, digest, args.config)
    # the config's values in the path: a retuned config never resumes the earlier trainings
    runs = pathlib.Path(args.runs) / stem / f"steps{args.steps}-{digest}" / start_dir
    seeds = [int(s) for s in args.seeds.split(",")]
    mesh = sharding.data_mesh()
    for table in tables:
        for row in chosen_rows(every[table], args.row):
            for seed in seeds:
                if rows.find(table=table, row=row.label, seed=seed, setting=setting):
                    continue
                if other_backbone(rows, table, seed, setting, start_fields.get("backbone")):
                    continue
                config = with_fields(base, (*row.train, ("train.seed", seed)))
                check_config(config)
                workdir = runs / training_name(row.train) / f"seed{seed}"
                record = training_record(rows, config, workdir)
                # every row also measures its RPN's proposal recall (a host-side count over the
                # proposals the evaluation computes anyway): the check behind RPN verdicts
                config = with_fields(config, (*row.test, ("eval.proposal_recall", True)))
                if "diverged_at" in record:
                    result = {"voc": {"mAP": None}}
                else:
                    result = training.evaluation.evaluate(
                        config, build_model(config), restore(workdir, mesh), mesh
                    )
                out = {
                    "table": table,
                    "row": row.label,
                    "seed": seed,
                    "setting": setting,
                    "config": args.config,
                    "steps": args.steps,
                    "config_digest": digest,
                    **start_fields,
                    "map": result["voc"]["mAP"],
                    "paper": row.paper,
                    "train_minutes": record["minutes"],
                    "workdir": str(workdir),
                    "training_id": record["id"],
                }
                if "diverged_at" in record:
                    out["diverged_at"] = record["diverged_at"]
                if table == "fig4":
                    count = config.model.rpn.test_post_nms_top_n
                    out["recall"] = result["recall"][f"recall@{count}"]
                elif "recall" in result and config.model.head.rois != "anchors":
                    out["proposal_recall"] = result["recall"]  # one-stage: anchors, no RPN
                rows.add(out)
                said = "diverged" if out["map"] is None else f"mAP@0.5 {out['map']:.4f}"
                print(f"{table} | {row.label} | seed {seed}: {said}", flush=True)
    for table in tables:
        if setting_rows(table, rows, setting):  # none: every row of it left out by --row
            print(f"\n## {TITLES[table]}\n\n" + markdown(table, rows, setting))
    write_tables(rows, pathlib.Path(args.rows).with_suffix(".md"))


STARTS = ("pretrained", "scratch", "config")


def other_backbone(rows, table, seed, setting, backbone):
    """Whether `seed`'s rows of `table` in `setting` came from another pretrained backbone than
    this run's (`backbone`; None from scratch), which would leave the seed's differences from
    its reference unpaired: the row is skipped, with a line saying so."""
    earlier = {backbone_of(r) for r in setting_rows(table, rows, setting) if r["seed"] == seed}
    if earlier <= {backbone}:
        return False
    print(
        f"table {table}, seed {seed}: skipped; its rows in this setting came from backbone "
        f"{', '.join(sorted(map(str, earlier)))}, this run's is {backbone} (a seed's rows "
        "share one backbone; run other seeds, or restore that backbone's weights file)",
        flush=True,
    )
    return True


def training_record(rows, config, workdir):
    """The training record of `workdir` (trained or resumed first; `diverged_at`: the step
    of a non-finite loss that stopped it). A record whose weights are gone is not reused: the
    training runs again and gets a new record (its `id` counts the earlier ones), so rows
    computed before keep theirs. A diverged training is not run again."""
    earlier = rows.find(training=str(workdir))
    if earlier and "diverged_at" in earlier[-1]:
        return earlier[-1]
    if earlier and trained_to_the_end(config, workdir):
        training.train_and_evaluate(config, workdir)  # the final evaluation, if it is missing
        return earlier[-1] if "id" in earlier[-1] else {**earlier[-1], "id": str(workdir)}
    minutes, _, diverged_at = train(config, workdir)
    outcome = {} if diverged_at is None else {"diverged_at": diverged_at}
    if diverged_at is None:
        outcome.update(training_summary(workdir))
    number = len(earlier)
    return rows.add(
        {
            "training": str(workdir),
            "id": f"{workdir}#{number}" if number else str(workdir),
            "minutes": round(minutes, 2),
            **outcome,
            **({"retrained": True} if number else {}),
        }
    )


def add_summaries(rows):
    """Append a summary record (`summary_of`: the training's id; `training_summary`'s
    fields) for each training recorded without one whose metrics.jsonl is still on this
    machine (trainings recorded before summaries existed; of a folder trained again, only its
    latest record: the folder's metrics are that training's); returns the records added."""
    summarised = {i for i, x in training_summaries(rows.all).items() if "final_losses" in x}
    latest = {r["training"]: r for r in rows.all if "training" in r}  # a retrained folder's
    added = []
    for r in list(latest.values()):
        key = r.get("id") or r["training"]
        metrics = pathlib.Path(r["training"]) / "metrics.jsonl"
        if key not in summarised and metrics.is_file():
            summary = training_summary(r["training"])
            if summary["final_losses"]:
                added.append(rows.add({"summary_of": key, **summary, "from": str(metrics)}))
                summarised.add(key)
    return added


def training_summary(workdir):
    """From `workdir`'s metrics.jsonl: `final_losses`, the loss terms and gradient norm of its
    last progress record (their means over its last `log_every` steps; the RPN box term
    weighted as in the objective; an alternating scheme's: its last phase's), and
    `loop_seconds`, each phase's training loop time, summed over the sittings that trained it
    ({"": s} for joint training)."""
    last, loops = {}, {}
    for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if any(k.startswith("train/") and k.endswith("/loss") for k in record):
            last = record
        for k, v in record.items():
            if k.startswith("train/") and k.endswith("loop_s"):  # one per sitting
                phase = k.removeprefix("train/").removesuffix("loop_s")
                loops[phase] = round(loops.get(phase, 0.0) + v, 1)
    final = {
        k.rsplit("/", 1)[-1]: round(v, 6)
        for k, v in last.items()
        if k.startswith("train/") and not k.endswith(("steps_per_s", "learning_rate", "_s"))
    }
    return {"final_losses": final, "loop_seconds": loops}


def restore(workdir, mesh):
    """The latest checkpoint's variables of `workdir`, replicated over `mesh`."""
    checkpoints = checkpointing.Checkpoints(workdir)
    variables = checkpoints.restore_variables(checkpoints.latest_step())
    return jax.device_put(variables, sharding.replicated(mesh))


if __name__ == "__main__":
    main()
