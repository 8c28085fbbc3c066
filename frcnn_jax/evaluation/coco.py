"""COCO box metrics through pycocotools, and the one conversion to COCO results format.

pycocotools is imported lazily so the rest of the package works without it.
"""

import contextlib
import io

import numpy as np

# The 12 numbers `COCOeval.summarize()` prints, in its order.
COCO_METRIC_NAMES = (
    "AP",
    "AP50",
    "AP75",
    "APs",
    "APm",
    "APl",
    "AR1",
    "AR10",
    "AR100",
    "ARs",
    "ARm",
    "ARl",
)


def xyxy_to_xywh(boxes):
    """float [..., 4] (x1, y1, x2, y2) -> (x, y, width, height), COCO's box format."""
    boxes = np.asarray(boxes, np.float64)
    return np.concatenate([boxes[..., :2], boxes[..., 2:] - boxes[..., :2]], axis=-1)


def xywh_to_xyxy(boxes):
    """float [..., 4] COCO (x, y, width, height) -> (x1, y1, x2, y2)."""
    boxes = np.asarray(boxes, np.float64)
    return np.concatenate([boxes[..., :2], boxes[..., :2] + boxes[..., 2:]], axis=-1)


def to_coco_results(image_id, boxes, scores, classes, *, category_ids, valid=None):
    """Detections of one image as COCO results entries.

    Args:
      image_id: the image's COCO id.
      boxes: [D, 4] (x1, y1, x2, y2) in original-image pixels; scores: [D]; classes: int [D]
        in 1..K; valid: optional bool [D] (padding rows are dropped).
      category_ids: sequence of K COCO category ids; class k is `category_ids[k - 1]`.

    Returns:
      list of {"image_id", "category_id", "bbox": [x, y, w, h], "score"} with plain Python
      numbers (JSON-ready).
    """
    boxes, scores, classes = np.asarray(boxes), np.asarray(scores), np.asarray(classes)
    if valid is not None:
        keep = np.asarray(valid, bool)
        boxes, scores, classes = boxes[keep], scores[keep], classes[keep]
    category_ids = np.asarray(category_ids)
    if classes.size and (classes.min() < 1 or classes.max() > len(category_ids)):
        raise ValueError(f"classes must lie in 1..{len(category_ids)}, got {classes.tolist()}")
    xywh = xyxy_to_xywh(boxes)
    return [
        {
            "image_id": int(image_id),
            "category_id": int(category_ids[c - 1]),
            "bbox": [float(v) for v in box],
            "score": float(s),
        }
        for box, s, c in zip(xywh, scores, classes.astype(np.int64), strict=True)
    ]


class COCOEvaluator:
    """Streaming COCO box evaluation.

    Ground truth comes either from a COCO annotation file (`annotation_file`, the right choice
    for COCO itself: its areas and crowd regions are used as published) or from `add` (any
    dataset: area = box area, "difficult" boxes become crowd regions, which COCOeval ignores).
    """

    def __init__(self, category_ids, *, category_names=None, annotation_file=None):
        self.category_ids = tuple(int(c) for c in category_ids)
        names = category_names or [str(c) for c in self.category_ids]
        self.category_names = tuple(names)
        self.annotation_file = annotation_file
        self.results = []
        self._images = []
        self._annotations = []

    def add(
        self,
        image_id,
        det_boxes,
        det_scores,
        det_classes,
        *,
        det_valid=None,
        gt_boxes=None,
        gt_classes=None,
        gt_valid=None,
        gt_difficult=None,
        image_size=None,
    ):
        """One image; boxes (x1, y1, x2, y2) in original-image pixels.

        `gt_*` and `image_size` ((height, width)) are needed only without an annotation file.
        """
        self.results += to_coco_results(
            image_id,
            det_boxes,
            det_scores,
            det_classes,
            category_ids=self.category_ids,
            valid=det_valid,
        )
        if self.annotation_file is not None:
            return
        if gt_boxes is None or gt_classes is None:
            raise ValueError("COCOEvaluator without an annotation_file needs gt_boxes, gt_classes")
        height, width = image_size if image_size is not None else (0, 0)
        self._images.append({"id": int(image_id), "height": int(height), "width": int(width)})
        gt_boxes, gt_classes = np.asarray(gt_boxes), np.asarray(gt_classes)
        keep = np.ones(len(gt_classes), bool) if gt_valid is None else np.asarray(gt_valid, bool)
        crowd = (
            np.zeros(len(gt_classes), bool)
            if gt_difficult is None
            else np.asarray(gt_difficult, bool)
        )
        for box, cls, is_crowd in zip(
            xyxy_to_xywh(gt_boxes[keep]), gt_classes[keep], crowd[keep], strict=True
        ):
            self._annotations.append(
                {
                    "id": len(self._annotations) + 1,
                    "image_id": int(image_id),
                    "category_id": self.category_ids[int(cls) - 1],
                    "bbox": [float(v) for v in box],
                    "area": float(box[2] * box[3]),
                    "iscrowd": int(is_crowd),
                }
            )

    def ground_truth(self):
        """The ground truth as a COCO dataset dict (built from `add`)."""
        return {
            "images": self._images,
            "annotations": self._annotations,
            "categories": [
                {"id": c, "name": n}
                for c, n in zip(self.category_ids, self.category_names, strict=True)
            ],
        }

    def result(self, *, verbose=False):
        """dict of the 12 standard numbers (`COCO_METRIC_NAMES`); -1 where undefined."""
        return coco_metrics(
            self.annotation_file or self.ground_truth(), self.results, verbose=verbose
        )


def coco_metrics(ground_truth, results, *, verbose=False):
    """pycocotools' bbox COCOeval on a ground-truth file or dict and a results list.

    Only the images present in the ground truth are evaluated (pycocotools' default).
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with quiet:
        if isinstance(ground_truth, dict):
            gt = COCO()
            gt.dataset = ground_truth
            gt.createIndex()
        else:
            gt = COCO(str(ground_truth))
        if not results:
            return dict.fromkeys(COCO_METRIC_NAMES, -1.0)
        dt = gt.loadRes(list(results))
        evaluator = COCOeval(gt, dt, iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: float(v) for name, v in zip(COCO_METRIC_NAMES, evaluator.stats, strict=True)}
