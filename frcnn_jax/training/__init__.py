"""Training: `train_and_evaluate(config, workdir)` (what `python -m frcnn_jax.train` runs) and
`evaluate_checkpoint(config, workdir)` (`python -m frcnn_jax.evaluate`).

One concept per module: `optim` (optimizer, schedule), `budget` (a schedule fitted to a time
budget), `step` (the jitted training step), `initial` (initial state, imported weights), `phase`
(a resumable run of optimizer steps with one objective, with checkpoints), `alternating` (the
paper's 4-step scheme, as four phases),
`evaluation`, `metrics` (JSONL, TensorBoard, progress lines) and `loop` (the whole run).
"""

from frcnn_jax.training import (
    alternating,
    budget,
    evaluation,
    initial,
    metrics,
    optim,
    phase,
    step,
)
from frcnn_jax.training.evaluation import evaluate_checkpoint
from frcnn_jax.training.loop import train_and_evaluate

__all__ = [
    "alternating",
    "budget",
    "evaluate_checkpoint",
    "evaluation",
    "initial",
    "metrics",
    "optim",
    "phase",
    "step",
    "train_and_evaluate",
]
