"""Fine-tuning a trained detector on other classes, against the alternatives a user has.

    python experiments/finetune.py [--workdir runs/finetune] [--source_steps 1500]
        [--finetune_steps 600] [--seeds 0,1,2]
        [--backbone configs/pretrain_shapes_tiny_fpn.py]

Target: shapes/512 (other images than the source's, objects 16-300 px) with 4 of the 8 shapes
classes (`data.class_subset`, `model.num_classes=4`), `configs/shapes_512.py`'s recipe
shortened to `--finetune_steps` of batch 4, 2000 training images, a 300-image test split.
Starts, each over `--seeds`:
- "fine-tuned": from a detector trained on the source task (`configs/shapes_tiny.py`, 8
  classes, shapes/320, `--source_steps`, seed 0; `model.init_checkpoint=<its workdir>`: every
  tensor loads but the predictor's, re-initialised for 4 classes);
- "pretrained backbone": from a classification-pretrained backbone (`--backbone`, `python -m
  frcnn_jax.pretrain`'s weights file; its pretraining, like ImageNet's, is not counted), the
  usual start, for the same steps;
- "from scratch, equal time": from random weights for as many steps as the source training
  and the fine-tuning took together (the fine-tuned runs' minutes per step, which this config
  shares): the alternative with the same training time.
Every run is resumable (a rerun skips finished trainings, `--workdir/<start>_seed<k>`); the
table (mean and standard deviation over the seeds, each run's minutes) goes to
`experiments/results_finetune.md`.
"""

import argparse
import pathlib
import statistics
import time

from frcnn_jax.runtime import configure_runtime

configure_runtime()

import result_rows  # noqa: E402

from frcnn_jax import pretraining, training  # noqa: E402
from frcnn_jax.cli import exit_on_sigterm, setup_logging  # noqa: E402
from frcnn_jax.config import check_config, config_from_file  # noqa: E402
from frcnn_jax.pretraining.config import check_pretrain_config  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
SUBSET = ("rectangle", "triangle", "star", "ring")


def schedule(config, steps):
    """`config.train` shortened to `steps`, decay and warm-up scaled alike."""
    scale = steps / config.train.num_steps
    config.train.lr_steps = tuple(max(round(s * scale), 1) for s in config.train.lr_steps)
    config.train.warmup_steps = round(config.train.warmup_steps * scale)
    config.train.num_steps = steps
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


def timed(train, config, workdir):
    """(mAP, minutes) of `train(config, workdir)`; the minutes are recorded in the workdir the
    first time, so a rerun that finds the training done reports them again."""
    record = pathlib.Path(workdir) / "finetune_minutes.txt"
    start = time.perf_counter()
    result = train(config, workdir)
    if result is None:
        raise SystemExit(f"stopped while training {workdir}; rerun the same command to resume")
    if not record.is_file():
        record.write_text(f"{(time.perf_counter() - start) / 60:.3f}")
    value = result["voc"]["mAP"] if "voc" in result else result["top1"]
    return value, float(record.read_text())


def mean_sd(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=str(ROOT / "runs" / "finetune"))
    parser.add_argument("--source_steps", type=int, default=1500)
    parser.add_argument("--finetune_steps", type=int, default=600)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--backbone", default=str(ROOT / "configs" / "pretrain_shapes_tiny_fpn.py"))
    args = parser.parse_args()
    setup_logging()
    exit_on_sigterm()
    root = pathlib.Path(args.workdir)
    seeds = [int(s) for s in args.seeds.split(",")]

    source = schedule(config_from_file(ROOT / "configs" / "shapes_tiny.py"), args.source_steps)
    check_config(source)
    source_map, source_minutes = timed(training.train_and_evaluate, source, root / "source")
    backbone = config_from_file(args.backbone)
    check_pretrain_config(backbone)
    backbone_top1, backbone_minutes = timed(
        pretraining.pretrain_and_evaluate, backbone, root / "backbone"
    )
    weights = root / "backbone" / pretraining.WEIGHTS_FILE

    runs = {}  # start -> [(seed, mAP, minutes, steps)]
    for name, init in (("fine-tuned", str(root / "source")), ("pretrained backbone", weights)):
        for seed in seeds:
            config = target_config(args.finetune_steps, seed, str(init))
            workdir = root / f"{name.replace(' ', '_')}_seed{seed}"
            runs.setdefault(name, []).append(
                (seed, *timed(training.train_and_evaluate, config, workdir), args.finetune_steps)
            )
    per_step = statistics.mean(m for _, _, m, _ in runs["fine-tuned"]) / args.finetune_steps
    equal_steps = round(args.finetune_steps + source_minutes / per_step)
    for seed in seeds:
        config = target_config(equal_steps, seed)
        workdir = root / f"scratch_{equal_steps}_seed{seed}"
        runs.setdefault("from scratch, equal time", []).append(
            (seed, *timed(training.train_and_evaluate, config, workdir), equal_steps)
        )

    body = [
        f"Source detector: `configs/shapes_tiny.py` (8 classes, shapes/320), {args.source_steps} "
        f"steps, seed 0: test mAP@0.5 {source_map:.3f} ({source_minutes:.1f} min). Backbone: "
        f"`{pathlib.Path(args.backbone).relative_to(ROOT)}` (`python -m frcnn_jax.pretrain`), "
        f"top-1 {backbone_top1:.3f} ({backbone_minutes:.1f} min, not counted).",
        f"Target: shapes/512 with classes {', '.join(SUBSET)} (num_classes 4), batch 4, test "
        "split (300 images); minutes are each run's training and final evaluation.",
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
        body.append(
            f"| {name} | {results[0][3]} | {mean:.3f} +- {sd:.3f} | "
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
        f"({equal_steps} steps: the source training's and the fine-tuning's time)",
    )


if __name__ == "__main__":
    main()
