"""The paper's three training schemes side by side, same budget (steps x batch), same data.

    python experiments/compare_schemes.py [--config configs/shapes_tiny.py] [--steps 4000]
        [--workdir /tmp/compare_schemes]

Trains approximate joint, non-approximate joint (gradients through RoIAlign into the proposal
boxes) and 4-step alternating training (the same total number of steps, split 1/3, 1/6, 1/3, 1/6 as
in the paper's VOC schedule; step 2 restarts from the initial weights as in the paper, and, as a
fourth row, from step 1's network, which is what a from-scratch run needs) from the same
initialization and seed, evaluates each on the config's test split, and prints mAP@0.5 and
wall-clock minutes. Whether non-approximate joint training is at least as good as approximate
joint is the hypothesis this tests.
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
# (row name, config.train overrides)
VARIANTS = (
    ("approximate_joint", {"scheme": "approximate_joint"}),
    ("non_approximate_joint", {"scheme": "non_approximate_joint"}),
    ("alternating", {"scheme": "alternating"}),
    ("alternating, step 2 from step 1",
     {"scheme": "alternating", "alternating_step2_init": "step1"}),
)  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "shapes_tiny.py"))
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--workdir", default="/tmp/compare_schemes")
    args = parser.parse_args()
    setup_logging()
    rows = []
    for name, overrides in VARIANTS:
        config = config_from_file(args.config)
        scale = args.steps / config.train.num_steps
        config.train.update(overrides)
        config.train.num_steps = args.steps
        config.train.lr_steps = tuple(round(s * scale) for s in config.train.lr_steps)
        config.train.warmup_steps = round(config.train.warmup_steps * scale)
        config.train.checkpoint_every = args.steps
        check_config(config)
        start = time.perf_counter()
        workdir = pathlib.Path(args.workdir) / name.replace(", ", "_").replace(" ", "_")
        result = training.train_and_evaluate(config, workdir)
        rows.append((name, result["voc"]["mAP"], (time.perf_counter() - start) / 60))
    print(f"\n{pathlib.Path(args.config).name}, {args.steps} steps of "
          f"{config.train.batch_size} images each, test split")  # fmt: skip
    print("| scheme | mAP@0.5 | minutes |")
    print("|---|---|---|")
    for name, mean_ap, minutes in rows:
        print(f"| {name} | {mean_ap:.3f} | {minutes:.1f} |")


if __name__ == "__main__":
    main()
