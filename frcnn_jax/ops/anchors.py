"""Anchors: the reference boxes the RPN classifies and regresses (the paper's section 3.1.1).

The anchors of one feature level are `anchor_grid(base_anchors(...), ...)`: k base anchors
centred at the origin, shifted to every feature-map location. Order is location-major (row by
row, left to right), anchor-minor, exactly as torchvision's `AnchorGenerator`, so an RPN head's
[Hf, Wf, k] outputs flatten onto the same [Hf * Wf * k] axis.
"""

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from frcnn_jax.ops._checks import check_boxes


def base_anchors(*, sizes: Sequence[float], aspect_ratios: Sequence[float]):
    """Anchors centred at (0, 0) for every (aspect ratio, size) pair.

    Args:
      sizes: anchor sizes in pixels (sqrt of the area), e.g. (128, 256, 512) in the paper.
      aspect_ratios: height / width ratios, e.g. (0.5, 1.0, 2.0).

    Returns:
      float32 [k, 4] (x1, y1, x2, y2) with k = len(aspect_ratios) * len(sizes), ratio-major,
      rounded to whole pixels: bit for bit torchvision's `AnchorGenerator.generate_anchors`.
    """
    scales = np.asarray(sizes, np.float32)
    ratios = np.asarray(aspect_ratios, np.float32)
    if scales.ndim != 1 or ratios.ndim != 1 or not scales.size or not ratios.size:
        raise ValueError(
            f"sizes and aspect_ratios must be non-empty sequences; got {sizes!r}, {aspect_ratios!r}"
        )
    if (scales <= 0).any() or (ratios <= 0).any():
        raise ValueError(
            f"sizes and aspect_ratios must be positive; got {sizes!r}, {aspect_ratios!r}"
        )
    # float32 throughout and round-half-to-even, in torchvision's order of operations.
    h_ratios = np.sqrt(ratios)
    w_ratios = np.float32(1) / h_ratios
    ws = (w_ratios[:, None] * scales[None, :]).reshape(-1)
    hs = (h_ratios[:, None] * scales[None, :]).reshape(-1)
    anchors = np.stack([-ws, -hs, ws, hs], axis=1) / np.float32(2)
    return jnp.asarray(np.round(anchors))


def legacy_base_anchors(*, base_size=16, ratios=(0.5, 1, 2), scales=(8, 16, 32)):
    """The original py-faster-rcnn `generate_anchors` output, for paper fidelity.

    py-faster-rcnn uses inclusive pixel boxes (width = x2 - x1 + 1) and rounds the ratio
    anchors' sides to whole pixels before scaling, so its anchors differ from `base_anchors`
    by a pixel here and there; the defaults give its 9 anchors, e.g. [-84, -40, 99, 55] first.

    Args:
      base_size: side of the reference box, the feature stride (16 for VGG-16).
      ratios: height / width ratios.
      scales: multiples of `base_size` (8, 16, 32 -> 128, 256, 512 px).

    Returns:
      float32 [k, 4] (x1, y1, x2, y2) in py-faster-rcnn's inclusive convention, ratio-major.
      Add 1 to x2 and y2 to express them in this package's continuous convention.
    """
    base = np.array([0, 0, base_size - 1, base_size - 1], np.float64)
    width = base[2] - base[0] + 1
    height = base[3] - base[1] + 1
    ctr_x = base[0] + 0.5 * (width - 1)
    ctr_y = base[1] + 0.5 * (height - 1)
    ratios = np.asarray(ratios, np.float64)
    scales = np.asarray(scales, np.float64)
    # Same area, new aspect ratio, sides rounded to whole pixels (`_ratio_enum`) ...
    ratio_ws = np.round(np.sqrt(width * height / ratios))
    ratio_hs = np.round(ratio_ws * ratios)
    # ... then each scaled about the same centre (`_scale_enum`).
    ws = (ratio_ws[:, None] * scales[None, :]).reshape(-1)
    hs = (ratio_hs[:, None] * scales[None, :]).reshape(-1)
    anchors = np.stack(
        [
            ctr_x - 0.5 * (ws - 1),
            ctr_y - 0.5 * (hs - 1),
            ctr_x + 0.5 * (ws - 1),
            ctr_y + 0.5 * (hs - 1),
        ],
        axis=1,
    )
    return jnp.asarray(anchors, jnp.float32)


def anchor_grid(base, *, feature_height: int, feature_width: int, stride):
    """Shifts base anchors to every location of a feature map.

    Args:
      base: float32 [k, 4] base anchors centred at the origin (`base_anchors`).
      feature_height, feature_width: feature-map size Hf, Wf (static ints).
      stride: feature stride in image pixels, an int or (stride_y, stride_x); torchvision uses
        image_size // feature_size per axis.

    Returns:
      float32 [Hf * Wf * k, 4] (x1, y1, x2, y2): anchor j at location (y, x) is row
      (y * Wf + x) * k + j, with the location's top-left pixel (x * stride_x, y * stride_y)
      added: torchvision's `AnchorGenerator` output for one level.
    """
    check_boxes("base", base, rank=2)
    stride_y, stride_x = (stride, stride) if np.isscalar(stride) else stride
    shifts_x = jnp.arange(feature_width, dtype=jnp.float32) * stride_x
    shifts_y = jnp.arange(feature_height, dtype=jnp.float32) * stride_y
    shift_y, shift_x = jnp.meshgrid(shifts_y, shifts_x, indexing="ij")
    shifts = jnp.stack([shift_x, shift_y, shift_x, shift_y], axis=-1).reshape(-1, 1, 4)
    return (shifts + jnp.asarray(base, jnp.float32)[None]).reshape(-1, 4)


def anchors_inside(anchors, *, height, width, allowed_border=0.0):
    """Which anchors lie inside the image (the paper ignores cross-boundary anchors in training).

    Args:
      anchors: float32 [A, 4] (x1, y1, x2, y2).
      height, width: true (unpadded) image size in pixels; scalars, traced ones included.
      allowed_border: pixels an anchor may stick out on each side (0 in the paper).

    Returns:
      bool [A]: x1 >= -border, y1 >= -border, x2 <= width + border, y2 <= height + border.
    """
    check_boxes("anchors", anchors, rank=2)
    anchors = jnp.asarray(anchors, jnp.float32)
    return (
        (anchors[:, 0] >= -allowed_border)
        & (anchors[:, 1] >= -allowed_border)
        & (anchors[:, 2] <= width + allowed_border)
        & (anchors[:, 3] <= height + allowed_border)
    )
