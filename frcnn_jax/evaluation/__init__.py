"""Detection and proposal evaluation: VOC AP, COCO metrics (pycocotools), proposal recall."""

from frcnn_jax.evaluation.coco import (
    COCO_METRIC_NAMES,
    COCOEvaluator,
    coco_metrics,
    to_coco_results,
    xywh_to_xyxy,
    xyxy_to_xywh,
)
from frcnn_jax.evaluation.recall import ProposalRecall, RecallResult
from frcnn_jax.evaluation.report import markdown_table, plot_precision_recall, plot_recall_vs_iou
from frcnn_jax.evaluation.voc import VOCEvaluator, VOCResult, average_precision, voc_iou

__all__ = [
    "COCO_METRIC_NAMES",
    "COCOEvaluator",
    "ProposalRecall",
    "RecallResult",
    "VOCEvaluator",
    "VOCResult",
    "average_precision",
    "coco_metrics",
    "markdown_table",
    "plot_precision_recall",
    "plot_recall_vs_iou",
    "to_coco_results",
    "voc_iou",
    "xywh_to_xyxy",
    "xyxy_to_xywh",
]
