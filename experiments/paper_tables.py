"""The paper's experiments (Tables 2, 8, 9, 10, Figure 4, the training schemes) on any config,
in the paper's setting: from a classification-pretrained backbone.

    python experiments/paper_tables.py --table 2|8|9|10|fig4|schemes[,...]|all
        [--config configs/shapes_tiny.py] [--steps 2000] [--seeds 0,1,2,3,4]
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
completed over several sittings. A training whose weights are gone is trained again as a new
training record, and the rows computed from it name it: an earlier row keeps its own record.
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
minutes, the command) are printed and written next to the rows (`.md`).

`--steps` sets every joint training's length (decay and warm-up scaled alike); 4-step
alternating training runs the paper's phase lengths relative to it (80k/40k/80k/40k against
70k joint iterations: 3.43x in all, each phase's rate decayed after 3/4 of it, phases 1 and 2
from the pretrained weights). The default suits the shapes configs on a 2-core CPU (a few
minutes per joint training). On VOC, pass the VOC config and its own length (`--steps 70000`)
on a GPU/TPU, with `--pretrain` an ImageNet pretraining config of the backbone, or `--start
config` to keep the config's own `model.init_checkpoint` (e.g. imported torchvision weights).
Table 5 (time per stage) is `experiments/stage_times.py`.
"""

import argparse
import dataclasses
import hashlib
import json
import math
import pathlib
import re
import shutil
import statistics
import time

from frcnn_jax.runtime import configure_runtime

configure_runtime()

import jax  # noqa: E402
import result_rows  # noqa: E402
from result_rows import Rows  # noqa: E402
from scipy import stats  # noqa: E402

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
                "4-step alternating, the paper's phase lengths (80k/40k/80k/40k per 70k joint)",
                paper_alternating(config),
            ),
            # the paper's steps 1-4 are phases 1-4 in frcnn_jax (the names key saved rows)
            Row("4-step alternating", (("train.scheme", "alternating"),)),  # joint's steps
        ]
    raise ValueError(f"unknown table {table!r}; one of {TABLES}")


def paper_alternating(config):
    """The fields of 4-step alternating training with the paper's phase lengths relative to
    `config`'s joint training (py-faster-rcnn: 80k, 40k, 80k, 40k iterations against 70k for
    end-to-end training, each phase's rate x0.1 after 60k / 30k)."""
    steps = int(config.train.num_steps)
    phases = tuple(max(1, round(steps * n / 70)) for n in (80, 40, 80, 40))
    return (
        ("train.scheme", "alternating"),
        ("train.alternating_phase_steps", phases),
        ("train.alternating_phase_lr_steps", tuple(max(1, round(n * 3 / 4)) for n in phases)),
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
    "schemes": "Training schemes (section 3.2; the paper: approximate joint training gives "
    "results close to 4-step alternating training in 25-50% less training time; no table)",
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
    """Whether `workdir` holds `config`'s final checkpoint."""
    latest = checkpointing.Checkpoints(workdir).latest_step()
    return latest is not None and latest >= training.alternating.final_step(config.train)


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
    return [r for r in rows.find(pretrain=pretrain, pretrain_steps=steps) if "table" not in r]


LEGACY_BACKBONE = "unrecorded"  # rows from before backbones were recorded: the first record's


def backbone_of(row):
    return row.get("backbone", LEGACY_BACKBONE) if row.get("start") == "pretrained" else None


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


# ---------------------------------------------------------------- statistics

CONFIDENCE = 0.95
MIN_SEEDS = {"shared weights": 3, "own training": 5}


def compare(differences, shared):
    """The paired differences (points, one per seed) of a row and its table's reference:
    {"n", "mean", "low", "high" (the 95% t-interval of the mean), "p" (two-sided one-sample
    t-test of mean 0), "finding"}. A finding: the interval excludes 0 and at least
    `MIN_SEEDS` seeds back it (3 when the row tests the reference's own weights, whose
    difference holds no training noise of its own; 5 when the row has a training of its own)."""
    n = len(differences)
    mean = statistics.mean(differences) if n else float("nan")
    needed = MIN_SEEDS["shared weights" if shared else "own training"]
    out = {"n": n, "needed": needed, "mean": mean, "low": None, "high": None, "p": None}
    out["finding"] = False
    if n < 2:
        return out
    spread = statistics.stdev(differences) / math.sqrt(n)
    if spread == 0:
        out.update(low=mean, high=mean, p=0.0 if mean else 1.0)
    else:
        half = stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1) * spread
        p = 2 * stats.t.sf(abs(mean) / spread, n - 1)
        out.update(low=mean - half, high=mean + half, p=float(p))
    out["finding"] = n >= needed and (out["low"] > 0 or out["high"] < 0)
    return out


def verdict(result, paper_difference):
    """The comparison's verdict against the paper's own difference (None if it has none)."""
    if result["n"] < result["needed"]:
        return f"too few seeds ({result['n']} of {result['needed']})"
    if not result["finding"]:
        return "no difference found"
    if paper_difference is None:
        return "finding (the paper has no figure)"
    if paper_difference == 0 or (paper_difference > 0) == (result["mean"] > 0):
        return "agrees in sign"
    return "disagrees in sign"


# ---------------------------------------------------------------- tables


THRESHOLDS = ("0.50", "0.60", "0.70", "0.80", "0.90")  # Figure 4's IoUs


def summaries(table, mine):
    """{row label: its summary over the seeds} of one setting's rows `mine` of `table`: seeds,
    mean and range of mAP (%), the paired comparison with the reference row (`test`, `said`),
    the paper's figure and difference, training minutes; Figure 4's rows: recall cells. Seeds
    whose training diverged (no mAP) are named and left out of the means and comparisons."""
    diverged = {(r["row"], r["seed"]): r["diverged_at"] for r in mine if r["map"] is None}
    paper_of = {r["row"]: r["paper"] for r in mine}
    mine = [r for r in mine if r["map"] is not None]
    reference = {r["seed"]: 100 * r["map"] for r in mine if is_reference(table, r["row"])}
    reference_weights = {r["seed"]: r["workdir"] for r in mine if is_reference(table, r["row"])}
    paper_reference = next(
        (r["paper"] for r in mine if is_reference(table, r["row"]) and r["paper"] is not None),
        None,
    )
    out = {}
    for label in dict.fromkeys([*(r["row"] for r in mine), *(row for row, _ in diverged)]):
        found = [r for r in mine if r["row"] == label]
        seeds = ",".join(str(r["seed"]) for r in found)
        failed = [f"{seed} (step {step})" for (row, seed), step in diverged.items() if row == label]
        if failed:
            seeds += f"{'; ' if seeds else ''}diverged: {', '.join(failed)}"
        summary = {"seeds": seeds, "n": len(found), "diverged": len(failed)}
        out[label] = summary
        if not found:  # every seed diverged
            summary.update(cells=None, mean=None, spread="-", test="-", said="-", minutes=None)
            summary.update(paper=paper_of[label], paper_difference=None)
            continue
        if table == "fig4":
            recall = [r["recall"] for r in found]
            summary["cells"] = [statistics.mean(x[t] for x in recall) for t in (*THRESHOLDS, "AR")]
            continue
        values = [100 * r["map"] for r in found]
        paper = found[0]["paper"]
        paper_difference = (
            None if paper is None or paper_reference is None else paper - paper_reference
        )
        if is_reference(table, label):
            test, said, paper_difference = "reference", "-", None
        else:
            result = compare(
                [100 * r["map"] - reference[r["seed"]] for r in found if r["seed"] in reference],
                shared=all(r["workdir"] == reference_weights.get(r["seed"]) for r in found),
            )
            test, said = described(result), verdict(result, paper_difference)
        summary.update(
            mean=statistics.mean(values),
            spread=f"{min(values):.1f}-{max(values):.1f}" if len(values) > 1 else "-",
            test=test,
            said=said,
            paper=paper,
            paper_difference=paper_difference,
            minutes=statistics.mean(r["train_minutes"] for r in found),
        )
    return out


def setting_rows(table, rows, setting):
    return [r for r in rows.all if r.get("table") == table and r["setting"] == setting]


def markdown(table, rows, setting):
    """`table`'s rows in one setting: the command, each row over the seeds, its test and
    verdict, the paper's figure, training minutes."""
    mine = setting_rows(table, rows, setting)
    first = mine[0] if mine else {}
    seeds = ",".join(str(s) for s in sorted({r["seed"] for r in mine}))
    start = first.get("start", "scratch")
    command = (
        f"python experiments/paper_tables.py --table {table} --config "
        f"{repo_name(first.get('config', '?'))} --steps {first.get('steps', '?')} "
        f"--seeds {seeds} --start {start}"
    )
    if start == "pretrained":
        command += (
            f" --pretrain {repo_name(first['pretrain'])} --pretrain-steps {first['pretrain_steps']}"
        )
    commits = list(dict.fromkeys(r.get("commit") for r in mine))
    made = f"rows made at {commits[0]}" + (f" to {commits[-1]}" if len(commits) > 1 else "")
    backbones = {}
    for r in mine:
        if backbone := backbone_of(r):
            backbones.setdefault(backbone, set()).add(r["seed"])
    if len(backbones) > 1:  # each seed's rows share one (`other_backbone`)
        made += "; backbones: " + ", ".join(
            f"{b} (seeds {','.join(map(str, sorted(s)))})" for b, s in backbones.items()
        )
    lines = [f"### {setting}", "", f"`{command}` ({made})", ""]
    if table == "fig4":
        lines += [
            "| proposals | seeds | " + " | ".join(f"recall@{t}" for t in THRESHOLDS) + " | AR |",
            "|---" * (len(THRESHOLDS) + 3) + "|",
        ]
    else:
        lines += [
            "| row | seeds | ours mAP@0.5 (%) | range | minus reference, 95% CI (p) | verdict | "
            "paper (%) | paper minus reference | training min | RPN box / objectness loss, end "
            f"| {RECALL_COLUMN} |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
    balances, recalls = rpn_balances(rows, mine), proposal_recalls(mine)
    for label, x in summaries(table, mine).items():
        if table == "fig4":
            values = x["cells"] or [None] * (len(THRESHOLDS) + 1)
            cells = " | ".join("-" if c is None else f"{c:.3f}" for c in values)
            lines.append(f"| {label.split(':')[0]} | {x['seeds']} | {cells} |")
            continue
        paper, paper_difference = x["paper"], x["paper_difference"]
        lines.append(
            f"| {label} | {x['seeds']} | {shown(x['mean'])} | {x['spread']} | {x['test']} | "
            f"{x['said']} | {'-' if paper is None else f'{paper:.1f}'} | "
            f"{'-' if paper_difference is None else f'{paper_difference:+.1f}'} | "
            f"{shown(x['minutes'])} | {balances.get(label, '-')} | {recalls.get(label, '-')} |"
        )
    if table == "schemes" and (saving := time_saving(mine)):
        lines += ["", saving]
    return "\n".join(lines) + "\n"


PAPER_ALTERNATING = "4-step alternating, the paper's phase lengths"
PAPER_SAVING = (25.0, 50.0)  # % less training time for approximate joint (section 3.2)


def time_saving(mine):
    """The paper's time claim, tested: how much less training time (%) approximate joint
    training took than 4-step alternating training with the paper's phase lengths, paired by
    seed (both on this machine in one setting), with the 95% t-interval, and whether that
    interval lies inside the paper's 25-50% ("" when no seed has both trainings)."""
    joint, alternating = {}, {}
    for r in mine:
        if r["map"] is None:
            continue
        if is_reference("schemes", r["row"]):
            joint[r["seed"]] = r["train_minutes"]
        elif r["row"].startswith(PAPER_ALTERNATING):
            alternating[r["seed"]] = r["train_minutes"]
    savings = [100 * (1 - joint[s] / alternating[s]) for s in joint if s in alternating]
    result = compare(savings, shared=False)
    low, high = PAPER_SAVING
    if result["n"] < result["needed"]:
        said = f"too few seeds ({result['n']} of {result['needed']})"
    elif low <= result["low"] and result["high"] <= high:
        said = f"inside the paper's {low:.0f}-{high:.0f}%"
    elif result["high"] < low or result["low"] > high:
        side = "below" if result["high"] < low else "above"
        said = f"{side} the paper's {low:.0f}-{high:.0f}%"
    else:
        said = f"not decided: the interval crosses an edge of the paper's {low:.0f}-{high:.0f}%"
    if not result["n"]:
        return ""
    if result["low"] is None:
        figure = f"{result['mean']:.1f}% less (1 seed)"
    else:
        figure = f"{result['mean']:.1f}% less [{result['low']:.1f}, {result['high']:.1f}]"
    return (
        f"Training time: approximate joint took {figure} than 4-step alternating with the "
        f"paper's phase lengths, paired by seed; {said}."
    )


RECALL_COLUMN = "RPN recall@0.70, top 300 proposals"


def proposal_recalls(mine):
    """{row label: the recall at IoU 0.7 of the RPN's top 300 test proposals, mean over the
    seeds that measured it (rows made before every row measured it have none; the count is
    shown when it is not every seed)}: whether a row's mAP moved with its proposals."""
    found = {}
    for r in mine:
        if "proposal_recall" in r:
            found.setdefault(r["row"], []).append(r["proposal_recall"]["recall@300"]["0.70"])
    seeds = {}
    for r in mine:
        if r["map"] is not None:
            seeds[r["row"]] = seeds.get(r["row"], 0) + 1
    return {
        label: f"{statistics.mean(x):.3f}"
        + ("" if len(x) == seeds.get(label) else f" ({len(x)} seeds)")
        for label, x in found.items()
    }


def rpn_balances(rows, mine):
    """{row label: the ratio of the RPN's box loss (weighted, as in the objective) to its
    objectness loss at the end of each seed's training, mean (range) over the seeds} for the
    rows whose trainings recorded their final losses and have an RPN: whether the two terms
    are about equally weighted, the paper's rule for lambda."""
    losses = {r["id"]: r["final_losses"] for r in rows.all if "final_losses" in r}
    ratios = {}
    for r in mine:
        final = losses.get(r.get("training_id")) or {}
        if final.get("rpn_objectness"):
            ratios.setdefault(r["row"], []).append(final["rpn_box"] / final["rpn_objectness"])
    return {
        label: f"{statistics.mean(x):.2f}" + (f" ({min(x):.2f}-{max(x):.2f})" if len(x) > 1 else "")
        for label, x in ratios.items()
    }


def shown(value):
    """A mean as the tables print it: one decimal, '-' for none (every seed diverged)."""
    return "-" if value is None else f"{value:.1f}"


def column_name(setting):
    """A setting's short name for a side-by-side column: its start ('pretrained', 'from
    scratch', ...) and, for rows of earlier code, 'code before <commit>'."""
    rest = setting.split(" steps", 1)[-1].lstrip(", ")
    start = "from scratch" if not rest or rest.startswith("code before") else rest.split(" (")[0]
    code = re.search(r"code before \w+", rest)
    return start + (f", {code.group()}" if code else "")


def side_by_side(table, rows, columns=None):
    """`table` in the settings `columns` (default: every setting it was run in), one column
    pair per setting: mean mAP (seeds) and the difference from the reference with its
    verdict; the paper's figures first."""
    # the paper's setting first, then from scratch at the current code, then earlier code
    columns = columns or sorted(
        settings(rows, table), key=lambda s: ("pretrained" not in s, "code " in s)
    )
    found = {s: summaries(table, setting_rows(table, rows, s)) for s in columns}
    labels = list(dict.fromkeys(label for s in columns for label in found[s]))
    if table == "fig4":
        head = "| proposals | " + " | ".join(
            f"{column_name(s)}: recall@0.50 / 0.70 / 0.90, AR (seeds)" for s in columns
        )
        lines = [head + " |", "|---" * (len(columns) + 1) + "|"]
        for label in labels:
            cells = []
            for s in columns:
                x = found[s].get(label)
                cells.append(
                    "-"
                    if x is None or x["cells"] is None
                    else " / ".join(f"{x['cells'][i]:.3f}" for i in (0, 2, 4))
                    + f", {x['cells'][5]:.3f} ({x['n']})"
                )
            lines.append(f"| {label.split(':')[0]} | " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"
    head = "| row | paper (%) | paper minus reference | " + " | ".join(
        f"{column_name(s)}: mAP (seeds) | {column_name(s)}: minus reference, verdict"
        for s in columns
    )
    lines = [head + " |", "|---" * (2 * len(columns) + 3) + "|"]
    for label in labels:
        any_row = next(found[s][label] for s in columns if label in found[s])
        paper, difference = any_row["paper"], any_row["paper_difference"]
        cells = [
            "-" if paper is None else f"{paper:.1f}",
            "-" if difference is None else f"{difference:+.1f}",
        ]
        for s in columns:
            x = found[s].get(label)
            if x is None:
                cells += ["-", "-"]
            else:
                said = "" if x["said"] == "-" else f", {x['said']}"
                failed = f", {x['diverged']} diverged" if x["diverged"] else ""
                cells += [f"{shown(x['mean'])} ({x['n']}{failed})", f"{x['test']}{said}"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def repo_name(path):
    """A repo config file as the repo names it (configs/<name>), another path as it is."""
    path = pathlib.Path(path)
    return str(pathlib.Path("configs", path.name)) if path.parent.name == "configs" else str(path)


def described(result):
    """'+2.4 [+0.9, +3.9] (p 0.01)', or the mean alone for one seed, '-' for none."""
    if not result["n"]:
        return "-"
    if result["low"] is None:
        return f"{result['mean']:+.1f} (1 seed)"
    return (
        f"{result['mean']:+.1f} [{result['low']:+.1f}, {result['high']:+.1f}] (p {result['p']:.3f})"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", required=True, help=f"one or more of {TABLES} (a,b), or all")
    parser.add_argument("--config", default=str(ROOT / "configs" / "shapes_tiny.py"))
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--seeds", default="0,1,2,3,4")
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
    tables = TABLES if args.table == "all" else tuple(args.table.split(","))
    unknown = sorted(set(tables) - set(TABLES))
    if unknown:
        parser.error(f"--table: unknown {unknown}; known: {', '.join(TABLES)} or all")
    setup_logging()
    exit_on_sigterm()
    rows = Rows(args.rows)
    base = scaled(paper_setting(config_from_file(args.config)), args.steps)
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
        for row in table_rows(table, base):
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
        print(f"\n## {TITLES[table]}\n\n" + markdown(table, rows, setting))
    write_tables(rows, pathlib.Path(args.rows).with_suffix(".md"))


def write_tables(rows, path):
    """Every table of `rows` as Markdown to `path`: its settings side by side, then each
    setting's own table with its command. A RESULTS.md beside `path` gets its generated
    blocks rewritten (`write_results_blocks`)."""
    written = [t for t in TABLES if any(r.get("table") == t for r in rows.all)]
    sections = []
    for table in written:
        parts = [f"## {TITLES[table]}\n", side_by_side(table, rows)]
        parts += [markdown(table, rows, s) for s in settings(rows, table)]
        sections.append("\n".join(parts))
    path.write_text(pretraining_markdown(rows) + "\n".join(sections))
    write_results_blocks(rows, path.parent / "RESULTS.md")


BLOCK = re.compile(r"(<!-- paper_tables: (\w+) -->\n).*?(<!-- /paper_tables -->)", re.S)


def latest_settings(rows, table):
    """The settings RESULTS.md shows for `table`: for each start (pretrained, from scratch),
    the one its newest row belongs to (earlier code's settings stay in results_paper.md)."""
    latest = {}
    for r in rows.all:
        if r.get("table") == table:
            latest[column_name(r["setting"]).split(",")[0]] = r["setting"]
    return [latest[start] for start in ("pretrained", "from scratch") if start in latest]


def results_block(table, rows):
    """RESULTS.md's generated block of `table`: the paper beside the latest pretrained and
    from-scratch settings, and for the schemes each setting's time comparison."""
    columns = latest_settings(rows, table)
    text = side_by_side(table, rows, columns)
    if table == "schemes":
        for setting in columns:
            if saving := time_saving(setting_rows(table, rows, setting)):
                text += f"\n{column_name(setting)}: {saving}\n"
    return text


def write_results_blocks(rows, path):
    """Rewrite each `<!-- paper_tables: T -->` ... `<!-- /paper_tables -->` block of `path`
    (if it exists) with `results_block(T)`: RESULTS.md's tables always equal the rows."""
    if path.is_file():
        text = path.read_text()
        path.write_text(BLOCK.sub(lambda m: m[1] + block_body(m[2], rows) + m[3], text))


def block_body(table, rows):
    """What RESULTS.md holds between `table`'s markers (blank lines keep the table apart from
    the HTML comments in every Markdown renderer)."""
    return "\n" + results_block(table, rows) + "\n"


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


def pretraining_markdown(rows):
    found = [r for r in rows.all if "pretrain" in r and "table" not in r]
    if not found:
        return ""
    lines = [
        "## Pretraining (the paper's ImageNet step)",
        "",
        "| pretraining config | steps | backbone (weights' SHA-256) | top-1 | top-5 | "
        "held-out images | minutes | made at |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in found:
        again = " (pretrained again)" if r.get("retrained") else ""
        lines.append(
            f"| {repo_name(r['pretrain'])} | {r['pretrain_steps']} | "
            f"{r.get('backbone', LEGACY_BACKBONE)}{again} | {r['top1']:.4f} | "
            f"{r['top5']:.4f} | {r['examples']} | "
            f"{'-' if r['minutes'] is None else format(r['minutes'], '.1f')} | "
            f"{r.get('commit', '?')} |"
        )
    return "\n".join(lines) + "\n\n"


def settings(rows, table):
    """The settings of `table`'s rows, in order."""
    return dict.fromkeys(r["setting"] for r in rows.all if r.get("table") == table)


def restore(workdir, mesh):
    """The latest checkpoint's variables of `workdir`, replicated over `mesh`."""
    checkpoints = checkpointing.Checkpoints(workdir)
    variables = checkpoints.restore_variables(checkpoints.latest_step())
    return jax.device_put(variables, sharding.replicated(mesh))


if __name__ == "__main__":
    main()
