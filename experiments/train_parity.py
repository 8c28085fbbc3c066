"""frcnn_jax and its reference trained side by side: the same starting weights, the same batches,
deterministic sampling (experiments/parity_references.py), each side with its own optimizer
(frcnn_jax: the config's; the reference: torch.optim.SGD with the recipe's groups) and the
config's learning rate at every step. Both sides' heads take frcnn_jax's proposals (their top-k /
NMS choice between near-tied scores is the one discontinuous step, see parity_references; how
many of the reference's own proposals differ is counted): frcnn_jax's step is `train_step`'s
update of `rpn_losses` + `head_losses` on them, the gradient of approximate joint training.
Prints, per step, the four losses of each side and the largest parameter difference, and writes
them with a summary to a results file.

    python experiments/train_parity.py                       # coco_r50_fpn, 50 steps
    python experiments/train_parity.py --detector voc07_vgg16

`--precision highest` (the default) gives frcnn_jax direct convolutions, as torch's;
`--precision default` its CPU kernels (Winograd: rounding of ~1e-5 of an output's magnitude).
"""

import argparse
import os
import pathlib
import sys
import tempfile
import time

import flax
import jax
import numpy as np
import optax
import torch

from frcnn_jax.training.optim import learning_rate_schedule

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import result_rows
from parity_references import (
    DETECTORS,
    LOSS_NAMES,
    batch,
    differing_proposals,
    losses_on_proposals,
    reference_and_ours,
    relative_errors,
    training_proposals,
)

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHORT = {
    "rpn_objectness": "rpn_obj",
    "rpn_box": "rpn_box",
    "fast_rcnn_class": "frcnn_cls",
    "fast_rcnn_box": "frcnn_box",
}


def largest_difference(got, want):
    """(largest |got - want| over every parameter, the same relative to each tensor's largest
    |want|, the tensor where that relative difference is largest)."""
    absolute = max(np.abs(got[k] - w).max() for k, w in want.items())
    relative = relative_errors(got, want)
    worst = max(relative, key=relative.get)
    return float(absolute), float(relative[worst]), worst


def run(detector, steps, precision, warmup, clear_kinks):
    num_classes = DETECTORS[detector][2]
    with tempfile.TemporaryDirectory() as directory:
        reference, model, state, tx = reference_and_ours(
            detector, directory, warmup=warmup, clear_kinks=clear_kinks
        )
    config_train = DETECTORS[detector][1]().train
    if not warmup:
        config_train.warmup_steps = 0
    schedule = learning_rate_schedule(config_train)
    named = list(reference.module.named_parameters())
    trained = [(k, p) for k, p in named if p.requires_grad]
    sgd = reference.optimizer(trained)
    base_rates = [group["lr"] for group in sgd.param_groups]

    def objective(params, state, b, boxes, valid):
        terms = losses_on_proposals(model, params, state.frozen, b, boxes, valid)
        return sum(terms.values()), terms

    @jax.jit
    def step_fn(state, b, boxes, valid):
        """`train_step`'s update, on the proposals given to the reference."""
        (_, terms), grads = jax.value_and_grad(objective, has_aux=True)(
            state.params, state, b, boxes, valid
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), terms, grads

    rows = []
    for step in range(steps):
        ours_batch, (images, targets) = batch(num_classes, seed=step)
        rate = float(schedule(step)) / config_train.learning_rate
        for group, base in zip(sgd.param_groups, base_rates, strict=True):
            group["lr"] = base * rate
        # the proposals: frcnn_jax's, and how many of the reference's own differ (near-ties)
        padded, ours_proposals = training_proposals(model, state, ours_batch, precision)
        with torch.no_grad():
            reference.losses(images, targets)
        differing = differing_proposals(ours_proposals, reference.proposals)
        # the reference's step, on frcnn_jax's proposals (see parity_references)
        start = time.perf_counter()
        sgd.zero_grad()
        want = reference.losses(images, targets, ours_proposals)
        sum(want.values()).backward()
        if step == 0:
            their_grads = reference.convert({k: p.grad for k, p in trained})
        sgd.step()
        torch_seconds = time.perf_counter() - start
        start = time.perf_counter()
        with jax.default_matmul_precision(precision):
            state, metrics, grads = step_fn(state, ours_batch, *padded)
        got = {k: float(metrics[k]) for k in LOSS_NAMES}
        if step == 0:  # the first step's gradients, as tests/models/test_training_parity.py
            ours = flax.traverse_util.flatten_dict(grads, sep="/")
            ours = {k: np.asarray(v) for k, v in ours.items()}
            trained_paths = {k for k, v in their_grads.items() if np.any(v)}
            first_gradients = largest_difference(ours, {k: their_grads[k] for k in trained_paths})
        jax_seconds = time.perf_counter() - start
        ours = {
            k: np.asarray(v)
            for k, v in flax.traverse_util.flatten_dict(state.params, sep="/").items()
        }
        theirs = reference.convert({k: p.detach() for k, p in named})
        absolute, relative, worst = largest_difference(ours, theirs)
        row = {
            "step": step,
            "lr": float(schedule(step)),
            "absolute": absolute,
            "relative": relative,
            "worst": worst,
            "torch_s": torch_seconds,
            "jax_s": jax_seconds,
            "differing": differing,
        }
        for name in LOSS_NAMES:
            row[f"ours_{name}"], row[f"theirs_{name}"] = got[name], float(want[name].detach())
        rows.append(row)
        print(format_row(row), flush=True)
    return rows, first_gradients, reference.kinks_cleared


def header():
    names = " | ".join(f"{SHORT[n]} ours | {SHORT[n]} ref" for n in LOSS_NAMES)
    columns = 5 + 2 * len(LOSS_NAMES)
    return (
        f"| step | lr | {names} | proposals differing | largest param diff | "
        f"largest rel. diff (tensor) |\n" + "|" + "---|" * columns
    )


def format_row(row):
    losses = " | ".join(f"{row[f'ours_{n}']:.7g} | {row[f'theirs_{n}']:.7g}" for n in LOSS_NAMES)
    return (
        f"| {row['step']} | {row['lr']:.3g} | {losses} | {row['differing']} | "
        f"{row['absolute']:.2e} | "
        f"{row['relative']:.2e} ({row['worst']}) |"
    )


def loss_differences(rows, name):
    """The relative difference of loss `name` between the two sides, step by step."""
    return [
        abs(r[f"ours_{name}"] - r[f"theirs_{name}"]) / max(abs(r[f"theirs_{name}"]), 1e-30)
        for r in rows
    ]


def summary(rows, first_gradients, kinks_cleared):
    _, relative, worst = first_gradients
    lines = [
        f"- step 0 gradients: largest difference {relative:.1e} of that tensor's largest "
        f"gradient ({worst}); {kinks_cleared} ReLU units moved off the kink beforehand "
        f"(parity_references.clear_relu_kinks)"
    ]
    for name in LOSS_NAMES:
        diffs = loss_differences(rows, name)
        worst = int(np.argmax(diffs))
        lines.append(
            f"- {name}: largest relative difference {diffs[worst]:.1e} (step "
            f"{worst}); first 10 steps {max(diffs[:10]):.1e}"
        )
    for at in sorted({0, 9, 24, len(rows) - 1} & set(range(len(rows)))):
        r = rows[at]
        lines.append(
            f"- parameters after step {at}: largest difference {r['absolute']:.1e}, "
            f"{r['relative']:.1e} of that tensor's largest ({r['worst']})"
        )
    counts = [r["differing"] for r in rows]
    lines.append(
        f"- proposals in one side's own choice only (near-tied scores; both sides then "
        f"train on frcnn_jax's): median {np.median(counts):.0f} per step, largest "
        f"{max(counts)}"
    )
    ratio = np.median([r["jax_s"] for r in rows[1:]]) / np.median([r["torch_s"] for r in rows[1:]])
    lines.append(f"- median step time frcnn_jax / reference (steps 1+, this machine): {ratio:.2f}")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--detector", choices=sorted(DETECTORS), default="coco_r50_fpn")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--precision", choices=("highest", "default"), default="highest")
    parser.add_argument(
        "--no-warmup",
        dest="warmup",
        action="store_false",
        help="the recipe's rate after its warm-up from the first step",
    )
    parser.add_argument(
        "--keep-kinks",
        dest="clear_kinks",
        action="store_false",
        help="leave ReLU inputs near their kink (parity_references)",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="results file (default: experiments/results_train_parity_<detector>.md)",
    )
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())
    print(header(), flush=True)
    rows, first_gradients, kinks_cleared = run(
        args.detector, args.steps, args.precision, args.warmup, args.clear_kinks
    )
    text = summary(rows, first_gradients, kinks_cleared)
    name = args.detector + ("" if args.warmup else "_no_warmup")
    name += "" if args.clear_kinks else "_kinks"
    out = args.out or ROOT / "experiments" / f"results_train_parity_{name}.md"
    body = [
        f"Matmul precision {args.precision}, warm-up "
        f"{'as the recipe' if args.warmup else 'off'}; torch {torch.__version__}, jax "
        f"{jax.__version__}.",
        "",
        "## Summary",
        "",
        text,
        "",
        "## Per step",
        "",
        header(),
        *(format_row(r) for r in rows),
    ]
    result_rows.write_results(
        out,
        f"Training side by side: {args.detector}, {args.steps} steps",
        body,
        readme(rows, first_gradients),
    )
    print(text)
    print(f"wrote {out}")


def readme(rows, first_gradients):
    """Step 0 and the last step in a sentence."""

    def loss_difference(selected):
        return max(max(loss_differences(selected, name)) for name in LOSS_NAMES)

    return (
        f"step 0: losses within {loss_difference(rows[:1]):.1e} relative, every gradient "
        f"within {first_gradients[1]:.1e} of its tensor's largest, parameters after the update "
        f"within {rows[0]['absolute']:.1e}; after {len(rows)} steps: losses within "
        f"{loss_difference(rows):.1e}, parameters within {rows[-1]['absolute']:.1e}"
    )


if __name__ == "__main__":
    main()
