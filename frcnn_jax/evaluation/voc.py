"""PASCAL VOC detection AP: the VOC2007 11-point metric and the VOC2010+ area metric.

Follows the official MATLAB devkit (`VOCevaldet.m`): detections of a class sorted by descending
confidence over the whole split; each is matched to the ground-truth box of its class, in its
image, with the highest IoU; at IoU >= threshold it is a true positive if that box is not yet
detected, a false positive (duplicate) if it is; a detection whose best box is "difficult" counts
as neither; below the threshold it is a false positive. Difficult boxes are not counted in the
number of positives.

Streaming: `VOCEvaluator.add` matches one image at a time (which detection claims which box
depends only on the order inside the image) and keeps one (score, class, tp, fp) row per
detection; memory does not grow with anything else.
"""

import dataclasses

import numpy as np


def voc_iou(boxes_a, boxes_b, *, plus_one=False):
    """IoU float64 [N, M] of boxes (x1, y1, x2, y2) in pixels.

    With `plus_one` a box covers x1..x2 inclusive (width x2 - x1 + 1), the devkit's convention
    and the one published VOC numbers use.
    """
    a = np.asarray(boxes_a, np.float64)[:, None, :]
    b = np.asarray(boxes_b, np.float64)[None, :, :]
    one = 1.0 if plus_one else 0.0
    iw = np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]) + one
    ih = np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]) + one
    inter = np.where((iw > 0) & (ih > 0), iw * ih, 0.0)
    area_a = (a[..., 2] - a[..., 0] + one) * (a[..., 3] - a[..., 1] + one)
    area_b = (b[..., 2] - b[..., 0] + one) * (b[..., 3] - b[..., 1] + one)
    union = area_a + area_b - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def average_precision(recall, precision, *, use_07_metric):
    """AP of one precision/recall curve (points in descending-score order).

    `use_07_metric`: the VOC2007 11-point interpolated AP (mean over recall 0, 0.1, ..., 1 of
    the best precision at that recall or above); otherwise the VOC2010+ area under the
    monotone (interpolated) precision envelope.
    """
    recall = np.asarray(recall, np.float64)
    precision = np.asarray(precision, np.float64)
    if use_07_metric:
        points = []
        for t in np.linspace(0.0, 1.0, 11):
            above = precision[recall >= t]
            points.append(above.max() if above.size else 0.0)
        return float(np.mean(points))
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    steps = np.flatnonzero(mrec[1:] != mrec[:-1]) + 1
    return float(np.sum((mrec[steps] - mrec[steps - 1]) * mpre[steps]))


@dataclasses.dataclass(frozen=True)
class ClassResult:
    """One class: `ap` is None when the class has no (non-difficult) ground truth in the split."""

    name: str
    ap: float | None
    num_gt: int
    num_detections: int
    recall: np.ndarray  # float64 [N] after each detection, descending score
    precision: np.ndarray  # float64 [N]


@dataclasses.dataclass(frozen=True)
class VOCResult:
    """`mean_ap` averages the classes that have ground truth (None if none has)."""

    classes: tuple[ClassResult, ...]
    mean_ap: float | None
    iou_threshold: float
    use_07_metric: bool
    num_images: int

    def as_dict(self):
        return {
            "mAP": self.mean_ap,
            "AP": {c.name: c.ap for c in self.classes},
            "num_gt": {c.name: c.num_gt for c in self.classes},
            "iou_threshold": self.iou_threshold,
            "metric": "voc07_11point" if self.use_07_metric else "voc_area",
            "num_images": self.num_images,
        }


class VOCEvaluator:
    """Accumulates detections and ground truth image by image; `result()` gives AP per class.

    Classes are 1..K as in `Detections.classes` (0 is background); `class_names[k - 1]` names
    class k.
    """

    def __init__(self, class_names, *, iou_threshold=0.5, use_07_metric=True, plus_one=False):
        self.class_names = tuple(class_names)
        self.iou_threshold = float(iou_threshold)
        self.use_07_metric = use_07_metric
        self.plus_one = plus_one
        self._rows = []  # per image: (scores, classes, tp, fp)
        self._num_gt = np.zeros(len(self.class_names) + 1, np.int64)
        self.num_images = 0

    def add(
        self,
        det_boxes,
        det_scores,
        det_classes,
        gt_boxes,
        gt_classes,
        *,
        det_valid=None,
        gt_valid=None,
        gt_difficult=None,
    ):
        """One image. Boxes (x1, y1, x2, y2) in the same pixel frame for both.

        Args:
          det_boxes: [D, 4]; det_scores: [D]; det_classes: int [D] in 1..K.
          gt_boxes: [G, 4]; gt_classes: int [G] in 1..K.
          det_valid, gt_valid: optional bool masks (padding rows are dropped).
          gt_difficult: optional bool [G]; difficult boxes are neither needed nor penalized.
        """
        det_boxes, det_scores, det_classes = _take(det_valid, det_boxes, det_scores, det_classes)
        gt_difficult = np.zeros(len(gt_classes), bool) if gt_difficult is None else gt_difficult
        gt_boxes, gt_classes, gt_difficult = _take(gt_valid, gt_boxes, gt_classes, gt_difficult)
        det_classes = det_classes.astype(np.int64)
        gt_classes = gt_classes.astype(np.int64)
        gt_difficult = gt_difficult.astype(bool)
        self._check_classes(det_classes, "det_classes")
        self._check_classes(gt_classes, "gt_classes")
        self.num_images += 1
        np.add.at(self._num_gt, gt_classes[~gt_difficult], 1)

        order = np.argsort(-det_scores, kind="stable")
        det_boxes, det_scores, det_classes = det_boxes[order], det_scores[order], det_classes[order]
        tp = np.zeros(len(det_scores), bool)
        fp = np.ones(len(det_scores), bool)
        if len(gt_classes) and len(det_classes):
            iou = voc_iou(det_boxes, gt_boxes, plus_one=self.plus_one)  # [D, G]
            iou = np.where(det_classes[:, None] == gt_classes[None, :], iou, -1.0)
            best = iou.argmax(axis=1)  # first of equal maxima, like the devkit's loop
            hit = iou[np.arange(len(best)), best] >= self.iou_threshold
            # Among detections claiming the same box, the highest-scoring one (first in
            # order) is the true positive, the rest are duplicates.
            claimed = np.where(hit, best, -1)
            first = np.zeros(len(best), bool)
            _, first_index = np.unique(claimed, return_index=True)
            first[first_index] = True
            difficult = hit & gt_difficult[best]
            tp = hit & first & ~difficult
            fp = ~hit | (hit & ~first & ~difficult)
        self._rows.append((det_scores.astype(np.float64), det_classes, tp, fp))

    def _check_classes(self, classes, name):
        bad = (classes < 1) | (classes > len(self.class_names))
        if bad.any():
            raise ValueError(
                f"{name} must lie in 1..{len(self.class_names)} (one per class name; 0 is "
                f"background), got {classes[bad][:5].tolist()}"
            )

    def result(self):
        if self._rows:
            scores, classes, tp, fp = (np.concatenate(x) for x in zip(*self._rows, strict=True))
        else:
            scores, classes = np.zeros(0), np.zeros(0, np.int64)
            tp = fp = np.zeros(0, bool)
        per_class = []
        for k, name in enumerate(self.class_names, start=1):
            mine = classes == k
            order = np.argsort(-scores[mine], kind="stable")
            ctp = np.cumsum(tp[mine][order])
            cfp = np.cumsum(fp[mine][order])
            num_gt = int(self._num_gt[k])
            precision = ctp / np.maximum(ctp + cfp, np.finfo(np.float64).eps)
            if num_gt == 0:
                recall, ap = np.zeros_like(precision), None
            else:
                recall = ctp / num_gt
                ap = average_precision(recall, precision, use_07_metric=self.use_07_metric)
            per_class.append(ClassResult(name, ap, num_gt, int(mine.sum()), recall, precision))
        aps = [c.ap for c in per_class if c.ap is not None]
        return VOCResult(
            classes=tuple(per_class),
            mean_ap=float(np.mean(aps)) if aps else None,
            iou_threshold=self.iou_threshold,
            use_07_metric=self.use_07_metric,
            num_images=self.num_images,
        )


def _take(valid, *arrays):
    arrays = [np.asarray(a) for a in arrays]
    if valid is None:
        return arrays
    valid = np.asarray(valid, bool)
    return [a[valid] for a in arrays]
