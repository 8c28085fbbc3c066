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


def voc_eval(detections, ground_truth, num_classes, *, threshold=0.5, use_07=True, one=0.0):
    """VOC AP per class by the devkit's procedure as py-faster-rcnn's lib/datasets/voc_eval.py
    (and detectron2's PascalVOCDetectionEvaluator) run it, vectorised over each image's
    ground truth: a class's detections sorted by score (stable, as MATLAB's sort), each
    matched to the unclaimed ground-truth box it overlaps most if that IoU >= `threshold`
    (the devkit's test; py-faster-rcnn's copy writes >), difficult boxes neither true nor false
    positives. `one`: 1.0 for the devkit's inclusive pixel widths.

    detections: list over images of (boxes [N, 4], scores [N], classes [N]); ground_truth: list
    of (boxes [G, 4], classes [G], difficult [G]). Returns {class: AP, or None without
    positives}."""
    aps = {}
    for k in range(1, num_classes + 1):
        records, npos = [], 0
        for boxes, classes, difficult in ground_truth:
            mine = classes == k
            records.append([boxes[mine], difficult[mine], np.zeros(mine.sum(), bool)])
            npos += int((~difficult[mine]).sum())
        ids = [np.full(int((c == k).sum()), i) for i, (_, _, c) in enumerate(detections)]
        image_ids = np.concatenate(ids) if ids else np.zeros(0, int)
        scores = np.concatenate([s[c == k] for _, s, c in detections])
        boxes = np.concatenate([b[c == k] for b, _, c in detections]).reshape(-1, 4)
        order = np.argsort(-scores, kind="stable")
        tp, fp = np.zeros(len(order)), np.zeros(len(order))
        for d, j in enumerate(order):
            gt, difficult, claimed = records[image_ids[j]]
            best, match = -np.inf, -1
            if len(gt):
                bb = boxes[j]
                iw = np.maximum(np.minimum(gt[:, 2], bb[2]) - np.maximum(gt[:, 0], bb[0]) + one, 0)
                ih = np.maximum(np.minimum(gt[:, 3], bb[3]) - np.maximum(gt[:, 1], bb[1]) + one, 0)
                inter = iw * ih
                union = (
                    (bb[2] - bb[0] + one) * (bb[3] - bb[1] + one)
                    + (gt[:, 2] - gt[:, 0] + one) * (gt[:, 3] - gt[:, 1] + one)
                    - inter
                )
                overlaps = inter / union
                best, match = overlaps.max(), int(overlaps.argmax())
            if best >= threshold:
                if not difficult[match]:
                    if not claimed[match]:
                        tp[d], claimed[match] = 1, True
                    else:
                        fp[d] = 1
            else:
                fp[d] = 1
        if npos == 0:
            aps[k] = None
            continue
        tp, fp = np.cumsum(tp), np.cumsum(fp)
        recall = tp / npos
        precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
        if use_07:  # the 11-point interpolated AP of VOC 2007
            aps[k] = sum(
                (precision[recall >= t].max() if (recall >= t).any() else 0.0) / 11
                for t in np.arange(0.0, 1.1, 0.1)
            )
        else:  # the area under the monotone precision envelope (VOC 2010+)
            mrec = np.concatenate(([0.0], recall, [1.0]))
            mpre = np.maximum.accumulate(np.concatenate(([0.0], precision, [0.0]))[::-1])[::-1]
            steps = np.flatnonzero(mrec[1:] != mrec[:-1])
            aps[k] = float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))
    return aps
