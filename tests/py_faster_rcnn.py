"""NumPy ports of py-faster-rcnn's RPN layers (lib/rpn/generate_anchors.py and
anchor_target_layer.py), the paper's reference code, for the tests to compare against where
torchvision has no counterpart (its anchors, cross-boundary anchor removal, 2k softmax)."""

import numpy as np
import torch
import torchvision

# py-faster-rcnn's `generate_anchors()`: 9 inclusive boxes around (7.5, 7.5), ratios 0.5, 1, 2
# by scales 8, 16, 32 of a 16 px base.
GENERATE_ANCHORS = np.array(
    [
        [-84, -40, 99, 55],
        [-176, -88, 191, 103],
        [-360, -184, 375, 199],
        [-56, -56, 71, 71],
        [-120, -120, 135, 135],
        [-248, -248, 263, 263],
        [-36, -80, 51, 95],
        [-80, -168, 95, 183],
        [-168, -344, 183, 359],
    ],
    np.float32,
)


def anchors(feature_height, feature_width, stride=16):
    """`GENERATE_ANCHORS` shifted by `stride` per cell, location-major (anchor_target_layer's
    `all_anchors`), as continuous boxes (x2, y2 + 1): float32 [Hf * Wf * 9, 4]."""
    shift_y, shift_x = np.meshgrid(
        np.arange(feature_height) * stride, np.arange(feature_width) * stride, indexing="ij"
    )
    shifts = np.stack([shift_x, shift_y, shift_x, shift_y], -1).reshape(-1, 1, 4)
    grid = (shifts + GENERATE_ANCHORS[None]).reshape(-1, 4)
    return (grid + np.array([0, 0, 1, 1])).astype(np.float32)


def anchor_labels(anchors, gt, height, width, allowed_border=0.0):
    """anchor_target_layer's labelling before sampling: anchors crossing the border are removed
    first; among the rest, negatives below 0.3, each box's best anchor(s) positive, then >= 0.7
    positive; removed anchors -1. Returns (labels int [A], argmax_overlaps int [A]: the matched
    box of each anchor, for its regression target). (Continuous pixel convention, and a box
    overlapping no kept anchor forces nothing, as in frcnn_jax's `match_boxes`.)"""
    inside = np.flatnonzero(
        (anchors[:, 0] >= -allowed_border)
        & (anchors[:, 1] >= -allowed_border)
        & (anchors[:, 2] <= width + allowed_border)
        & (anchors[:, 3] <= height + allowed_border)
    )
    overlaps = torchvision.ops.box_iou(
        torch.from_numpy(np.asarray(anchors[inside], np.float32)),
        torch.from_numpy(np.asarray(gt, np.float32)),
    ).numpy()
    argmax = overlaps.argmax(axis=1)
    max_overlaps = overlaps.max(axis=1)
    gt_max = overlaps.max(axis=0)
    labels = np.full(len(inside), -1)
    labels[max_overlaps < 0.3] = 0
    labels[np.flatnonzero(((overlaps == gt_max) & (gt_max > 0)).any(axis=1))] = 1
    labels[max_overlaps >= 0.7] = 1
    out, matched = np.full(len(anchors), -1), np.zeros(len(anchors), int)
    out[inside], matched[inside] = labels, argmax
    return out, matched
