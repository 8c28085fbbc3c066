"""Fine-tuning a trained detector on other classes, against the alternatives a user has.

    python experiments/finetune.py [--workdir runs/finetune] [--source_steps 1500]
        [--finetune_steps 600] [--seeds 0,1,2]
        [--pretrain configs/pretrain_shapes_tiny_fpn.py] [--pretrain-steps N]
        [--scratch-recipe adamw:0.001]

Target: shapes/512 (other images than the source's, objects 16-300 px) with 4 of the 8 shapes
classes (`data.class_subset`, `model.num_classes=4`), `configs/shapes_512.py`'s recipe
shortened to `--finetune_steps` of batch 4, 2000 training images, a 300-image test split.
Starts, each over `--seeds`:
- "fine-tuned": from a detector trained on the source task (`configs/shapes_tiny.py`, 8
  classes, shapes/320, `--source_steps`, seed 0; `model.init_checkpoint=<its workdir>`: every
  tensor loads but the predictor's, re-initialised for 4 classes);
- "pretrained backbone": from a classification-pretrained backbone (`--pretrain`'s weights
  file, `python -m frcnn_jax.pretrain`; the one `experiments/paper_tables.py` starts from,
  committed in `experiments/backbones/` with its record, or pretrained here when missing; its
  pretraining, like ImageNet's, is not counted), the usual start, for the same steps;
- "from scratch, equal time, <recipe>": from random weights for the time the source training
  and the fine-tuning took together: a run with a time budget (`train.budget_minutes`, its
  schedule stretched to end with the budget) of those minutes less the minutes a fine-tuned
  run spent outside its training loop (compilation before, the final evaluation after), so
  that the whole run takes what the fine-tuned side took; its first guess of steps from the
  fine-tuned runs' training loop. In the target's recipe (SGD with a step decay, as the
  fine-tuning), and in `--scratch-recipe`, the best from-scratch recipe of the
  time-to-accuracy search on shapes/512 (`experiments/results_time_to_map.md`: AdamW lr 1e-3
  with a cosine to zero), its schedule fitted as that search fits it (`budget.fit_schedule`):
  what a user training from scratch in this time would pick.
The datasets are made first, outside every run's minutes. Every run is resumable, its minutes
summed over the sittings that trained it (a rerun skips finished trainings,
`--workdir/code-<last commit of CODE>/<start>_seed<k>`: changed code trains anew); the table
(mean and standard deviation over the seeds, each run's minutes) goes to
`experiments/results_finetune.md`.
"""

import argparse
import pathlib
import statistics

import paper_tables  # sets up the CPU runtime before JAX is imported
import result_rows
import time_to_map
from paper_report import repo_name
from result_rows import Rows

from frcnn_jax import checkpointing
from frcnn_jax.cli import exit_on_sigterm, setup_logging
from frcnn_jax.config import check_config, config_from_file
from frcnn_jax.data import sources
from frcnn_jax.training.budget import fit_schedule

# what the figure measures (experiments/reproduce.py keys it on the same paths)
CODE = (
    "frcnn_jax",
    "setup.cfg",
    "requirements.txt",
    "experiments/finetune.py",
    "experiments/paper_tables.py",
    "experiments/time_to_map.py",
    "experiments/backbones",
    "configs",
)

ROOT = pathlib.Path(__file__).resolve().parents[1]
SUBSET = ("rectangle", "triangle", "star", "ring")


def schedule(config, steps):
    """`config.train` shortened to `steps` as `budget.fit_schedule` shortens a schedule (the
    decays at the same fractions of the run, the warm-up kept), one checkpoint at its end."""
    config.train.update(fit_schedule(config.train, steps))
    config.train.checkpoint_every = steps
    config.train.log_every = max(steps // 10, 1)
    return config


def target_config(steps, seed, init=None):
    config = schedule(config_from_file(ROOT / "configs" / "shapes_512.py"), steps)
    config.data.shapes_num_examples = {"train": 2000, "validation": 100, "test": 300}
    config.data.class_subset = SUBSET
    config.model.num_classes = len(SUBSET)
    config.model.init_checkpoint = init
    config.train.seed = seed
    check_config(config)
    return config


def scratch_config(steps, seed, recipe):
    """`target_config` from random weights in `recipe` ("optimizer:learning_rate", a recipe of
    time_to_map's search) with the config's schedule fitted to `steps` as that search fits it."""
    optimizer, learning_rate = recipe.split(":")
    base = config_from_file(ROOT / "configs" / "shapes_512.py").train
    return time_to_map.recipe_config(
        target_config(steps, seed), optimizer, float(learning_rate), fit_schedule(base, steps)
    )


def recipe_label(config):
    train = config.train
    return f"{train.optimizer} lr {train.learning_rate:g}, {train.lr_schedule} schedule"


def trained(config, workdir):
    """(test mAP@0.5, minutes summed over the sittings that trained it, the steps it trained)
    of `config` trained, or resumed, in `workdir` (`paper_tables.train`: a finished training
    is not run again)."""
    minutes, result, diverged_at = paper_tables.train(config, workdir)
    if result is None:
        raise SystemExit(f"{workdir}: the loss became non-finite at step {diverged_at}")
    return result["voc"]["mAP"], minutes, checkpointing.Checkpoints(workdir).latest_step()


def loop_minutes(workdir):
    """The minutes of `workdir`'s training loop, summed over its sittings (`train/loop_s`)."""
    return paper_tables.training_summary(workdir)["loop_seconds"][""] / 60


def pretrained_backbone(args):
    """(weights file, its pretraining record: top-1, minutes) of `args.pretrain`'s backbone,
    as `paper_tables` finds or makes it (records in `args.rows`)."""
    rows = Rows(args.rows)
    weights, backbone = paper_tables.pretrained_backbone(args, rows)
    steps = paper_tables.pretraining_config(args).train.num_steps
    records = paper_tables.pretraining_records(rows, args.pretrain, steps)
    return weights, [r for r in records if r.get("backbone") == backbone][-1]


def shown_minutes(value):
    return "unrecorded minutes" if value is None else f"{value:.1f} min"


def mean_sd(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=str(ROOT / "runs" / "finetune"))
    parser.add_argument("--source_steps", type=int, default=1500)
    parser.add_argument("--finetune_steps", type=int, default=600)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--pretrain", default=str(ROOT / "configs" / "pretrain_shapes_tiny_fpn.py"))
    parser.add_argument("--pretrain-steps", type=int, default=None, help="default: the config's")
    parser.add_argument(
        "--backbones",
        default=str(ROOT / "experiments" / "backbones"),
        help="committed pretrained backbones (paper_tables.py's)",
    )
    parser.add_argument(
        "--rows",
        default=str(ROOT / "experiments" / "results_paper.jsonl"),
        help="the backbones' pretraining records (top-1, minutes)",
    )
    parser.add_argument(
        "--scratch-recipe",
        default="adamw:0.001",
        help="optimizer:learning_rate of the second from-scratch start (default: the best "
        "from-scratch recipe of experiments/time_to_map.py's search on shapes/512)",
    )
    args = parser.parse_args()
    setup_logging()
    exit_on_sigterm()
    args.runs = args.workdir  # a missing backbone is pretrained in <workdir>/pretrain
    # each code version trains in its own folder: a rerun at the same code resumes or finds
    # its runs done; changed code trains them again
    root = pathlib.Path(args.workdir) / f"code-{result_rows.code_version(CODE)}"
    seeds = [int(s) for s in args.seeds.split(",")]

    source = schedule(config_from_file(ROOT / "configs" / "shapes_tiny.py"), args.source_steps)
    check_config(source)
    for data in (source.data, target_config(args.finetune_steps, 0).data):
        sources.prepare_all(data)  # made once, before any run's minutes are counted
    source_map, source_minutes, _ = trained(source, root / "source")
    weights, backbone = pretrained_backbone(args)

    runs = {}  # start -> [(seed, mAP, minutes, steps)]
    for name, init in (("fine-tuned", str(root / "source")), ("pretrained backbone", weights)):
        for seed in seeds:
            config = target_config(args.finetune_steps, seed, str(init))
            workdir = root / f"{name.replace(' ', '_')}_seed{seed}"
            runs.setdefault(name, []).append((seed, *trained(config, workdir)))
    # the from-scratch side's time: the fine-tuned side's (source training + fine-tuning),
    # its training loop's share a budget, the rest (compilation, final evaluation) as a
    # fine-tuned run spent it
    fine_tuned = [
        (m, loop_minutes(root / f"fine-tuned_seed{s}")) for s, _, m, _ in runs["fine-tuned"]
    ]
    equal_minutes = source_minutes + statistics.mean(m for m, _ in fine_tuned)
    budget = round(equal_minutes - statistics.mean(m - loop for m, loop in fine_tuned), 2)
    per_step = statistics.mean(loop for _, loop in fine_tuned) / args.finetune_steps
    guess = round(budget / per_step)  # the budget re-fits it to the speed the run sustains
    recipe = args.scratch_recipe
    scratch = (  # (workdir prefix, config of a seed): the target's recipe, then `recipe`
        ("scratch", lambda seed: target_config(guess, seed)),
        (f"scratch_{recipe.replace(':', '-')}", lambda seed: scratch_config(guess, seed, recipe)),
    )
    for prefix, config_of in scratch:
        for seed in seeds:
            config = config_of(seed)
            config.train.budget_minutes = budget
            workdir = root / f"{prefix}_{budget:g}min_seed{seed}"
            runs.setdefault(f"from scratch, equal time, {recipe_label(config)}", []).append(
                (seed, *trained(config, workdir))
            )

    body = [
        f"Source detector: `configs/shapes_tiny.py` (8 classes, shapes/320), {args.source_steps} "
        f"steps, seed 0: test mAP@0.5 {source_map:.3f} ({source_minutes:.1f} min). Backbone: "
        f"`{repo_name(args.pretrain)}`, {backbone['pretrain_steps']} steps (`python -m "
        f"frcnn_jax.pretrain`; `{backbone['weights']}`, recorded in "
        f"`{pathlib.Path(args.rows).name}`), top-1 {backbone['top1']:.3f} "
        f"({shown_minutes(backbone['minutes'])}, not counted).",
        f"Target: shapes/512 with classes {', '.join(SUBSET)} (num_classes 4), batch 4, test "
        "split (300 images); minutes are each run's training and final evaluation. From "
        f"scratch for the same time ({equal_minutes:.1f} min: a {budget:g}-minute budget "
        "for the training loop, `train.budget_minutes`, plus a fine-tuned run's minutes "
        "outside it): in the fine-tuning's recipe, and in the best from-scratch recipe of the "
        f"time-to-accuracy search on shapes/512 (`--scratch-recipe {recipe}`, "
        "`results_time_to_map.md`), its schedule fitted as that search fits it.",
        "",
        "| start | steps | mAP@0.5, mean +- sd over seeds | per seed (minutes) | training minutes "
        "counted |",
        "|---|---|---|---|---|",
    ]
    summary = {}
    for name, results in runs.items():
        mean, sd = mean_sd([v for _, v, _, _ in results])
        summary[name] = (mean, sd)
        minutes = statistics.mean(m for _, _, m, _ in results)
        counted = minutes + (source_minutes if name == "fine-tuned" else 0.0)
        low, high = min(k for *_, k in results), max(k for *_, k in results)
        body.append(
            f"| {name} | {low if low == high else f'{low}-{high}'} | {mean:.3f} +- {sd:.3f} | "
            + ", ".join(f"{v:.3f} ({m:.1f})" for _, v, m, _ in results)
            + f" | {counted:.1f} |"
        )
    print("\n".join(body))
    readme = "; ".join(f"{name} {m:.3f} +- {sd:.3f}" for name, (m, sd) in summary.items())
    result_rows.write_results(
        ROOT / "experiments" / "results_finetune.md",
        "Fine-tuning a trained detector on other classes, against the alternatives",
        body,
        f"mAP@0.5 over {len(seeds)} seeds, {args.finetune_steps} fine-tuning steps: {readme} "
        f"(from scratch: {equal_minutes:.1f} minutes, the source training's and the "
        "fine-tuning's time)",
    )


if __name__ == "__main__":
    main()
