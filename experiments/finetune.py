"""Fine-tuning a trained detector on other classes against training from scratch.

    python experiments/finetune.py [--workdir /tmp/finetune] [--pretrain_steps 1500]
        [--finetune_steps 600] [--seeds 0 1]

1. Pretrain `configs/shapes_tiny.py` (8 classes, shapes/320) for `--pretrain_steps`.
2. On a variant with fewer classes and other images (shapes/512, 4 of the 8 classes via
   `data.class_subset`, `model.num_classes=4`), train `--finetune_steps` twice from the same
   seed: from the pretrained run (`model.init_checkpoint=<its workdir>`: everything loads
   except the predictor, re-initialised because the class count differs) and from scratch.
Prints a Markdown table of test mAP@0.5 and minutes. Every run is resumable: a rerun skips
finished rows.
"""

import argparse
import pathlib
import time

from frcnn_jax.runtime import configure_runtime

configure_runtime()

from frcnn_jax import training  # noqa: E402
from frcnn_jax.cli import setup_logging  # noqa: E402
from frcnn_jax.config import check_config, config_from_file  # noqa: E402

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


def run(config, workdir):
    start = time.perf_counter()
    result = training.train_and_evaluate(config, workdir)
    return result["voc"]["mAP"], (time.perf_counter() - start) / 60


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/finetune")
    parser.add_argument("--pretrain_steps", type=int, default=1500)
    parser.add_argument("--finetune_steps", type=int, default=600)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = parser.parse_args()
    setup_logging()
    root = pathlib.Path(args.workdir)
    pretrained = root / "pretrain"
    config = schedule(config_from_file(ROOT / "configs" / "shapes_tiny.py"), args.pretrain_steps)
    check_config(config)
    pretrain_map, pretrain_minutes = run(config, pretrained)
    rows = []
    for seed in args.seeds:
        for name, init in (("fine-tuned", str(pretrained)), ("from scratch", None)):
            workdir = root / f"{name.replace(' ', '_')}_seed{seed}"
            rows.append((name, seed, *run(target_config(args.finetune_steps, seed, init), workdir)))
    print(
        f"\nPretrained: shapes_tiny (8 classes, shapes/320), {args.pretrain_steps} steps: "
        f"test mAP@0.5 {pretrain_map:.3f} ({pretrain_minutes:.1f} min)."
    )
    print(
        f"Target: shapes/512 with classes {', '.join(SUBSET)} (num_classes 4), "
        f"{args.finetune_steps} steps of batch 4, test split (300 images).\n"
    )
    print("| start | seed | mAP@0.5 | minutes |")
    print("|---|---|---|---|")
    for name, seed, mean_ap, minutes in rows:
        print(f"| {name} | {seed} | {mean_ap:.3f} | {minutes:.1f} |")


if __name__ == "__main__":
    main()
