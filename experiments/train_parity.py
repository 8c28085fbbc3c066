"""frcnn_jax and its reference trained side by side: the same starting weights, the same batches,
deterministic sampling (experiments/parity_references.py), each side with its own optimizer
(frcnn_jax: the config's; the reference: torch.optim.SGD with the recipe's groups) and the
config's learning rate at every step. Prints, per step, the four losses of each side and the
largest parameter difference, and writes them with a summary to a results file.

    python experiments/train_parity.py                       # coco_r50_fpn, 50 steps
    python experiments/train_parity.py --no-warmup           # lr 0.02 from the first step
    python experiments/train_parity.py --detector voc07_vgg16

`--precision highest` (the default) gives frcnn_jax direct convolutions, as torch's;
`--precision default` its CPU kernels (Winograd: rounding of ~1e-5 of an output's magnitude).
"""

import argparse
import datetime
import os
import platform
import subprocess
import sys
import tempfile
import time

import flax
import jax
import numpy as np
import torch

from frcnn_jax.models import FasterRCNN
from frcnn_jax.training.optim import learning_rate_schedule
from frcnn_jax.training.step import train_step

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from parity_references import DETECTORS, LOSS_NAMES, batch, reference_and_ours

SHORT = {"rpn_objectness": "rpn_obj", "rpn_box": "rpn_box", "fast_rcnn_class": "frcnn_cls",
         "fast_rcnn_box": "frcnn_box"}  # fmt: skip


def largest_difference(got, want):
    """(largest |got - want| over every parameter, the same relative to each tensor's largest
    |want|, the tensor where that relative difference is largest)."""
    absolute = max(np.abs(got[k] - w).max() for k, w in want.items())
    relative = {k: np.abs(got[k] - w).max() / max(np.abs(w).max(), 1e-30) for k, w in want.items()}
    worst = max(relative, key=relative.get)
    return float(absolute), float(relative[worst]), worst


def run(detector, steps, precision, warmup):
    num_classes = DETECTORS[detector][2]
    with tempfile.TemporaryDirectory() as directory:
        reference, model, state, tx = reference_and_ours(detector, directory, warmup=warmup)
    config_train = DETECTORS[detector][1]().train
    if not warmup:
        config_train.warmup_steps = 0
    schedule = learning_rate_schedule(config_train)
    named = list(reference.module.named_parameters())
    trained = [(k, p) for k, p in named if p.requires_grad]
    sgd = reference.optimizer(trained)
    base_rates = [group["lr"] for group in sgd.param_groups]
    step_fn = jax.jit(lambda s, b: train_step(s, b, jax.random.key(0), model=model, tx=tx))

    @jax.jit
    def proposals_fn(state, b):
        variables = {"params": state.params, **state.frozen}
        inputs = (b["image"], b["image_size"], b["scale"])
        return model.apply(variables, *inputs, method=FasterRCNN.training_proposals)

    rows = []
    for step in range(steps):
        ours_batch, (images, targets) = batch(num_classes, seed=step)
        rate = float(schedule(step)) / config_train.learning_rate
        for group, base in zip(sgd.param_groups, base_rates, strict=True):
            group["lr"] = base * rate
        start = time.perf_counter()
        sgd.zero_grad()
        want = reference.losses(images, targets)
        sum(want.values()).backward()
        sgd.step()
        torch_seconds = time.perf_counter() - start
        differing = 0  # proposals in one side's set only (the step's RoI candidates)
        with jax.default_matmul_precision(precision):
            boxes, valid = proposals_fn(state, ours_batch)
        for i, theirs in enumerate(reference.proposals):
            ours = np.asarray(boxes[i])[np.asarray(valid[i])]
            distance = np.abs(ours[:, None] - theirs[None]).max(-1)  # [ours, theirs]
            differing += int((distance.min(1) > 1e-3).sum() + (distance.min(0) > 1e-3).sum())
        start = time.perf_counter()
        with jax.default_matmul_precision(precision):
            state, metrics = step_fn(state, ours_batch)
        got = {k: float(metrics[k]) for k in LOSS_NAMES}
        jax_seconds = time.perf_counter() - start
        ours = {
            k: np.asarray(v)
            for k, v in flax.traverse_util.flatten_dict(state.params, sep="/").items()
        }
        theirs = reference.convert({k: p.detach() for k, p in named})
        absolute, relative, worst = largest_difference(ours, theirs)
        row = {"step": step, "lr": float(schedule(step)), "absolute": absolute,
               "relative": relative, "worst": worst, "torch_s": torch_seconds,
               "jax_s": jax_seconds, "differing": differing}  # fmt: skip
        for name in LOSS_NAMES:
            row[f"ours_{name}"], row[f"theirs_{name}"] = got[name], float(want[name].detach())
        rows.append(row)
        print(format_row(row), flush=True)
    return rows


def header():
    names = " | ".join(f"{SHORT[n]} ours | {SHORT[n]} ref" for n in LOSS_NAMES)
    columns = 5 + 2 * len(LOSS_NAMES)
    return (f"| step | lr | {names} | proposals differing | largest param diff | "
            f"largest rel. diff (tensor) |\n"
            + "|" + "---|" * columns)  # fmt: skip


def format_row(row):
    losses = " | ".join(f"{row[f'ours_{n}']:.7g} | {row[f'theirs_{n}']:.7g}" for n in LOSS_NAMES)
    return (f"| {row['step']} | {row['lr']:.3g} | {losses} | {row['differing']} | "
            f"{row['absolute']:.2e} | "
            f"{row['relative']:.2e} ({row['worst']}) |")  # fmt: skip


def summary(rows):
    lines = []
    for name in LOSS_NAMES:
        diffs = [abs(r[f"ours_{name}"] - r[f"theirs_{name}"]) / max(abs(r[f"theirs_{name}"]),
                 1e-30) for r in rows]  # fmt: skip
        worst = int(np.argmax(diffs))
        lines.append(f"- {name}: largest relative difference {diffs[worst]:.1e} (step "
                     f"{worst}); first 10 steps {max(diffs[:10]):.1e}")  # fmt: skip
    for at in sorted({0, 9, 24, len(rows) - 1} & set(range(len(rows)))):
        r = rows[at]
        lines.append(f"- parameters after step {at}: largest difference {r['absolute']:.1e}, "
                     f"{r['relative']:.1e} of that tensor's largest ({r['worst']})")  # fmt: skip
    same = [r["step"] for r in rows if r["differing"] == 0]
    first = next((r["step"] for r in rows if r["differing"]), None)
    lines.append(f"- steps whose proposals (RoI candidates) are the same on both sides: "
                 f"{len(same)} of {len(rows)}; first step with a difference: {first}")  # fmt: skip
    ratio = np.median([r["jax_s"] for r in rows[1:]]) / np.median([r["torch_s"] for r in rows[1:]])
    lines.append(f"- median step time frcnn_jax / reference (steps 1+, this machine): {ratio:.2f}")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--detector", choices=sorted(DETECTORS), default="coco_r50_fpn")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--precision", choices=("highest", "default"), default="highest")
    parser.add_argument("--no-warmup", dest="warmup", action="store_false",
                        help="the recipe's rate after its warm-up from the first step")  # fmt: skip
    parser.add_argument("--out", default=None, help="results file (default: "
                        "experiments/results_train_parity_<detector>.md)")  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())
    print(header(), flush=True)
    rows = run(args.detector, args.steps, args.precision, args.warmup)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=os.path.dirname(__file__)).stdout.strip()  # fmt: skip
    name = f"{args.detector}{'' if args.warmup else '_no_warmup'}"
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                   f"results_train_parity_{name}.md")  # fmt: skip
    command = " ".join(["python experiments/train_parity.py", *sys.argv[1:]])
    with open(out, "w") as f:
        f.write(
            f"# Training side by side: {args.detector}, {args.steps} steps\n\n"
            f"- command: `{command}`\n- commit: {commit}\n"
            f"- date: {datetime.date.today()}\n- machine: {platform.machine()}, "
            f"{os.cpu_count()} CPUs, torch {torch.__version__}, jax {jax.__version__}, "
            f"matmul precision {args.precision}, "
            f"warm-up {'as the recipe' if args.warmup else 'off'}"
            f"\n\n## Summary\n\n{summary(rows)}\n\n"
            f"## Per step\n\n{header()}\n" + "\n".join(format_row(r) for r in rows) + "\n"
        )
    print(summary(rows))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
