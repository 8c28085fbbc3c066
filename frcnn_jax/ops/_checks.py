"""Trace-time argument checks shared by the ops.

Shapes are static under `jax.jit`, so these run at trace time and raise a `ValueError` naming the
argument and the shape seen, instead of letting XLA fail deep inside a fused computation.
"""

from collections.abc import Sequence

import numpy as np


def shape_of(x) -> tuple[int, ...]:
    return tuple(np.shape(x))


def check_boxes(name: str, boxes, *, rank: int | None = None) -> None:
    """Checks that `boxes` ends in a dimension of 4 and, if given, has `rank` dimensions."""
    shape = shape_of(boxes)
    if not shape or shape[-1] != 4:
        raise ValueError(
            f"{name} must have a last dimension of 4 (x1, y1, x2, y2); got shape {shape}"
        )
    if rank is not None and len(shape) != rank:
        want = "[N, 4]" if rank == 2 else f"rank {rank}"
        raise ValueError(f"{name} must have shape {want}; got shape {shape}")


def check_rank(name: str, x, rank: int) -> None:
    shape = shape_of(x)
    if len(shape) != rank:
        raise ValueError(f"{name} must have rank {rank}; got shape {shape}")


def check_same_length(names: Sequence[str], arrays: Sequence) -> None:
    """Checks that the leading dimensions of `arrays` agree."""
    lengths = [shape_of(a)[0] for a in arrays]
    if len(set(lengths)) > 1:
        seen = ", ".join(f"{n} {shape_of(a)}" for n, a in zip(names, arrays, strict=True))
        raise ValueError(f"{', '.join(names)} must have the same length; got {seen}")


def check_non_negative_int(name: str, value) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be a non-negative Python int; got {value!r}")


def check_unit_interval(name: str, value) -> None:
    """Checks a probability/IoU-like hyper-parameter when it is a concrete number."""
    if isinstance(value, (int, float, np.floating, np.integer)) and not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1]; got {value!r}")
