"""Slow, obvious NumPy versions of the ops, written from the definitions, for the tests only."""

import numpy as np


def iou_one(a, b):
    """IoU of two (x1, y1, x2, y2) boxes; float32 arithmetic, 0 for an empty union."""
    a = np.asarray(a, np.float32)
    b = np.asarray(b, np.float32)

    def area(r):
        return max(r[2] - r[0], np.float32(0)) * max(r[3] - r[1], np.float32(0))

    iw = max(min(a[2], b[2]) - max(a[0], b[0]), np.float32(0))
    ih = max(min(a[3], b[3]) - max(a[1], b[1]), np.float32(0))
    inter = iw * ih
    union = area(a) + area(b) - inter
    return np.float32(inter / union) if union > 0 else np.float32(0)


def pairwise_iou(boxes1, boxes2):
    out = np.zeros((len(boxes1), len(boxes2)), np.float32)
    for i, a in enumerate(boxes1):
        for j, b in enumerate(boxes2):
            out[i, j] = iou_one(a, b)
    return out


def nms(boxes, scores, iou_threshold, classes=None, valid=None):
    """Greedy NMS over a stable descending sort; returns kept input positions in order."""
    n = len(scores)
    classes = np.zeros(n, int) if classes is None else np.asarray(classes)
    valid = np.ones(n, bool) if valid is None else np.asarray(valid, bool)
    order = sorted(range(n), key=lambda i: (-scores[i], i))
    kept = []
    for i in order:
        if not valid[i] or np.isnan(scores[i]):
            continue
        if all(
            classes[k] != classes[i] or iou_one(boxes[k], boxes[i]) <= iou_threshold for k in kept
        ):
            kept.append(i)
    return np.array(kept, dtype=np.int64)


def match(iou, gt_valid, high, low, allow_low_quality):
    """The paper's labelling with torchvision Matcher semantics and the zero-IoU guard."""
    num_anchors, num_gt = iou.shape
    matched = np.zeros(num_anchors, int)
    labels = np.zeros(num_anchors, int)
    valid_cols = [g for g in range(num_gt) if gt_valid[g]]
    for a in range(num_anchors):
        if not valid_cols:
            labels[a] = 0
            continue
        best = max(valid_cols, key=lambda g: (iou[a, g], -g))  # first among ties
        matched[a] = best
        value = iou[a, best]
        labels[a] = 1 if value >= high else (0 if value < low else -1)
    if allow_low_quality:
        for g in valid_cols:
            best_for_gt = iou[:, g].max()
            if best_for_gt <= 0:
                continue
            for a in range(num_anchors):
                if iou[a, g] == best_for_gt:
                    labels[a] = 1
    return matched, labels
