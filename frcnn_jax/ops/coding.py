"""Box coding: regression deltas between boxes and their anchors (or proposals).

torchvision's `BoxCoder` semantics (the paper's equation (2) parameterization): continuous
coordinates, centers at x1 + 0.5 * width, deltas multiplied by `weights` when encoding, and dw/dh
clamped at `max_log_scale` before `exp` when decoding. Weights (1, 1, 1, 1) are the RPN's;
(10, 10, 5, 5) are the Fast R-CNN head's (the paper's target stds 0.1 / 0.2).
"""

import math

import jax.numpy as jnp

from frcnn_jax.ops._checks import check_boxes

# Smallest width/height used when encoding, so degenerate boxes (zero-area ground truth, all-zero
# padded rows) give large but finite deltas, not inf/NaN that would leak through a masked loss.
_MIN_SIZE = 1e-6

# torchvision's `bbox_xform_clip`: decoded boxes grow at most 1000/16 times their anchor.
DEFAULT_MAX_LOG_SCALE = math.log(1000 / 16)


def _split_centers(boxes):
    widths = boxes[..., 2] - boxes[..., 0]
    heights = boxes[..., 3] - boxes[..., 1]
    ctr_x = boxes[..., 0] + 0.5 * widths
    ctr_y = boxes[..., 1] + 0.5 * heights
    return widths, heights, ctr_x, ctr_y


def encode_boxes(boxes, anchors, *, weights=(1.0, 1.0, 1.0, 1.0)):
    """Regression targets that move each anchor onto its box.

    Args:
      boxes: float32 [..., 4] (x1, y1, x2, y2) target (e.g. matched ground-truth) boxes.
      anchors: float32 [..., 4] (x1, y1, x2, y2), broadcastable against `boxes`.
      weights: (wx, wy, ww, wh) multipliers of the four deltas.

    Returns:
      float32 [..., 4] deltas (dx, dy, dw, dh), equal to torchvision's `BoxCoder.encode_single`.
      Widths and heights below 1e-6 px are raised to 1e-6 px, so degenerate or padded rows give
      finite (meaningless) deltas; mask them with the ground truth's `valid` mask.
    """
    check_boxes("boxes", boxes)
    check_boxes("anchors", anchors)
    boxes = jnp.asarray(boxes, jnp.float32)
    anchors = jnp.asarray(anchors, jnp.float32)
    wx, wy, ww, wh = weights
    ex_widths, ex_heights, ex_ctr_x, ex_ctr_y = _split_centers(anchors)
    gt_widths, gt_heights, gt_ctr_x, gt_ctr_y = _split_centers(boxes)
    ex_widths = jnp.maximum(ex_widths, _MIN_SIZE)
    ex_heights = jnp.maximum(ex_heights, _MIN_SIZE)
    # Operation order as in torchvision's `encode_boxes`: weight * difference, then divide.
    dx = wx * (gt_ctr_x - ex_ctr_x) / ex_widths
    dy = wy * (gt_ctr_y - ex_ctr_y) / ex_heights
    dw = ww * jnp.log(jnp.maximum(gt_widths, _MIN_SIZE) / ex_widths)
    dh = wh * jnp.log(jnp.maximum(gt_heights, _MIN_SIZE) / ex_heights)
    return jnp.stack([dx, dy, dw, dh], axis=-1)


def decode_boxes(
    deltas, anchors, *, weights=(1.0, 1.0, 1.0, 1.0), max_log_scale=DEFAULT_MAX_LOG_SCALE
):
    """Applies regression deltas to anchors; the inverse of `encode_boxes`.

    Args:
      deltas: float [..., 4] (dx, dy, dw, dh). Class-specific deltas [P, K, 4] decode against
        anchors [P, 1, 4] by broadcasting.
      anchors: float32 [..., 4] (x1, y1, x2, y2), broadcastable against `deltas`.
      weights: (wx, wy, ww, wh) the deltas were multiplied by when encoding.
      max_log_scale: dw and dh (after dividing by the weights) are clamped to at most this before
        `exp`, so a wild prediction cannot overflow (torchvision's `bbox_xform_clip`).

    Returns:
      float32 [..., 4] boxes (x1, y1, x2, y2), equal to torchvision's `BoxCoder.decode_single`.
      Not clipped to the image: use `clip_boxes`.
    """
    check_boxes("deltas", deltas)
    check_boxes("anchors", anchors)
    deltas = jnp.asarray(deltas, jnp.float32)
    anchors = jnp.asarray(anchors, jnp.float32)
    wx, wy, ww, wh = weights
    widths, heights, ctr_x, ctr_y = _split_centers(anchors)
    dx = deltas[..., 0] / wx
    dy = deltas[..., 1] / wy
    dw = jnp.minimum(deltas[..., 2] / ww, max_log_scale)
    dh = jnp.minimum(deltas[..., 3] / wh, max_log_scale)
    pred_ctr_x = dx * widths + ctr_x
    pred_ctr_y = dy * heights + ctr_y
    half_w = 0.5 * (jnp.exp(dw) * widths)
    half_h = 0.5 * (jnp.exp(dh) * heights)
    return jnp.stack(
        [pred_ctr_x - half_w, pred_ctr_y - half_h, pred_ctr_x + half_w, pred_ctr_y + half_h],
        axis=-1,
    )
