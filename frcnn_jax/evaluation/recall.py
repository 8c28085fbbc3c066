"""Proposal recall against IoU for the top N proposals (the paper's Figure 4)."""

import dataclasses

import numpy as np

from frcnn_jax.evaluation.voc import voc_iou

DEFAULT_NUM_PROPOSALS = (100, 300, 1000, 2000)
DEFAULT_IOU_THRESHOLDS = tuple(np.round(np.arange(0.5, 0.951, 0.05), 2).tolist())


@dataclasses.dataclass(frozen=True)
class RecallResult:
    """recall[n][t]: fraction of ground-truth boxes whose best IoU with the top
    `num_proposals[n]` proposals is >= `iou_thresholds[t]`; `average_recall[n]` is its mean
    over the thresholds (AR, Hosang et al.)."""

    num_proposals: tuple[int, ...]
    iou_thresholds: tuple[float, ...]
    recall: np.ndarray  # float64 [len(num_proposals), len(iou_thresholds)]
    average_recall: np.ndarray  # float64 [len(num_proposals)]
    num_gt: int

    def as_dict(self):
        return {
            f"recall@{n}": {
                f"{t:.2f}": float(r) for t, r in zip(self.iou_thresholds, row, strict=True)
            }
            | {"AR": float(ar)}
            for n, row, ar in zip(self.num_proposals, self.recall, self.average_recall, strict=True)
        } | {"num_gt": self.num_gt}


class ProposalRecall:
    """Streams proposals per image; keeps only one best-IoU value per (ground truth, N)."""

    def __init__(self, num_proposals=DEFAULT_NUM_PROPOSALS, iou_thresholds=DEFAULT_IOU_THRESHOLDS):
        self.num_proposals = tuple(int(n) for n in num_proposals)
        self.iou_thresholds = tuple(float(t) for t in iou_thresholds)
        self._best = []  # per image: float64 [len(num_proposals), G]

    def add(self, proposals, gt_boxes, *, proposal_valid=None, gt_valid=None, gt_difficult=None):
        """One image.

        Args:
          proposals: [P, 4] (x1, y1, x2, y2) in descending objectness order (as
            `generate_proposals` returns them); proposal_valid: optional bool [P].
          gt_boxes: [G, 4] in the same frame; gt_valid / gt_difficult: optional bool [G];
            difficult boxes are left out, as in the VOC evaluation.
        """
        proposals = np.asarray(proposals)
        if proposal_valid is not None:
            proposals = proposals[np.asarray(proposal_valid, bool)]
        gt_boxes = np.asarray(gt_boxes)
        keep = np.ones(len(gt_boxes), bool) if gt_valid is None else np.asarray(gt_valid, bool)
        if gt_difficult is not None:
            keep &= ~np.asarray(gt_difficult, bool)
        gt_boxes = gt_boxes[keep]
        best = np.zeros((len(self.num_proposals), len(gt_boxes)))
        if len(gt_boxes) and len(proposals):
            iou = voc_iou(gt_boxes, proposals)  # [G, P]
            # best IoU among the first n proposals, for every n at once
            running = np.maximum.accumulate(iou, axis=1)
            for i, n in enumerate(self.num_proposals):
                best[i] = running[:, min(n, len(proposals)) - 1]
        self._best.append(best)

    def result(self):
        best = np.concatenate(self._best, axis=1) if self._best else np.zeros((0, 0))
        best = best.reshape(len(self.num_proposals), -1)
        thresholds = np.asarray(self.iou_thresholds)
        num_gt = best.shape[1]
        if num_gt:
            recall = (best[:, :, None] >= thresholds).mean(axis=1)
        else:
            recall = np.zeros((len(self.num_proposals), len(thresholds)))
        return RecallResult(
            self.num_proposals, self.iou_thresholds, recall, recall.mean(axis=1), num_gt
        )
