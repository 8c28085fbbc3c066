"""Run a detector over a split and write the evaluation report (used by `frcnn_jax.evaluate`
and by training's periodic evaluation)."""

import json
import logging
import pathlib
import time

import numpy as np

from frcnn_jax.evaluation.coco import COCOEvaluator
from frcnn_jax.evaluation.recall import ProposalRecall
from frcnn_jax.evaluation.report import markdown_table, plot_precision_recall, plot_recall_vs_iou
from frcnn_jax.evaluation.voc import VOCEvaluator

log = logging.getLogger(__name__)


def evaluate_detections(
    detect_fn,
    batches,
    info,
    *,
    use_07_metric=True,
    iou_threshold=0.5,
    coco=True,
    proposals=False,
    workdir=None,
    title=None,
    log_every_s=10.0,
):
    """Streams `batches` through `detect_fn` and the evaluators; optionally writes a report.

    Args:
      detect_fn: `Batch` -> (`Detections` with a leading batch axis, boxes in original-image
        pixels; proposals float [B, P, 4] in the resized frame with valid [B, P], or None).
      batches: iterable of `frcnn_jax.data.loader.Batch`es from `make_batches(train=False)`.
      info: the split's `DatasetInfo` (class names, COCO category ids, size).
      use_07_metric, iou_threshold: VOC metric settings.
      coco: also compute pycocotools' 12 numbers (ground truth streamed from the batches).
      proposals: also compute proposal recall (`detect_fn` must return proposals).
      workdir: where to write metrics.json, table.md, pr/*.png, recall.png,
        detections_coco.json (nothing is written if None).

    Returns:
      dict of metrics (JSON-ready): "voc" (mAP, AP per class), "coco" (12 numbers), "recall".

    Raises:
      ValueError naming `title` when the images hold no ground truth at all (mAP undefined).
    """
    voc = VOCEvaluator(info.class_names, iou_threshold=iou_threshold, use_07_metric=use_07_metric)
    coco_eval = COCOEvaluator(info.category_ids, category_names=info.class_names) if coco else None
    recall = ProposalRecall() if proposals else None
    start = last_log = time.perf_counter()
    seen = 0
    for batch in batches:
        detections, batch_proposals = detect_fn(batch)
        detections = [np.asarray(x) for x in detections]
        for i in np.flatnonzero(np.asarray(batch.inputs.valid)):
            _add_image(voc, coco_eval, recall, batch, i, detections, batch_proposals)
            seen += 1
        now = time.perf_counter()
        if now - last_log >= log_every_s:
            rate = seen / (now - start)
            eta = (info.num_examples - seen) / max(rate, 1e-9)
            log.info(
                "evaluated %d/%d images, %.1f images/s, ETA %.0f s",
                seen,
                info.num_examples,
                rate,
                eta,
            )
            last_log = now
    voc_result = voc.result()
    if seen and not sum(c.num_gt for c in voc_result.classes):
        raise ValueError(
            f"{title or 'evaluation'}: no ground-truth box in {seen} images, so there is "
            "nothing to measure (a split without public labels? set config.eval.split or "
            "config.eval.data_name)"
        )
    metrics = {"voc": voc_result.as_dict(), "num_images": seen}
    if coco_eval is not None:
        metrics["coco"] = coco_eval.result()
    recall_result = recall.result() if recall is not None else None
    if recall_result is not None:
        metrics["recall"] = recall_result.as_dict()
    log.info(
        "evaluated %d images in %.1f s: mAP@%g %s",
        seen,
        time.perf_counter() - start,
        iou_threshold,
        _fmt(voc_result.mean_ap),
    )
    if workdir is not None:
        write_report(workdir, metrics, voc_result, recall_result, coco_eval, title=title)
    return metrics


def _add_image(voc, coco_eval, recall, batch, i, detections, proposals):
    boxes, scores, classes, valid = (x[i] for x in detections)
    inputs = batch.inputs
    scale = float(inputs.scale[i])
    gt_valid = inputs.gt_valid[i]
    gt_boxes = inputs.gt_boxes[i] / scale  # resized frame -> original pixels
    gt_classes, gt_difficult = inputs.gt_classes[i], inputs.gt_difficult[i]
    voc.add(
        boxes,
        scores,
        classes,
        gt_boxes,
        gt_classes,
        det_valid=valid,
        gt_valid=gt_valid,
        gt_difficult=gt_difficult,
    )
    if coco_eval is not None:
        coco_eval.add(
            int(batch.image_id[i]),
            boxes,
            scores,
            classes,
            det_valid=valid,
            gt_boxes=gt_boxes,
            gt_classes=gt_classes,
            gt_valid=gt_valid,
            gt_difficult=gt_difficult,
            image_size=tuple(batch.original_size[i]),
        )
    if recall is not None:
        proposal_boxes, proposal_valid = (np.asarray(x[i]) for x in proposals)
        recall.add(
            proposal_boxes,
            inputs.gt_boxes[i],
            proposal_valid=proposal_valid,
            gt_valid=gt_valid,
            gt_difficult=gt_difficult,
        )


def _fmt(value):
    return "n/a" if value is None else f"{value:.4f}"


def write_report(workdir, metrics, voc_result, recall_result=None, coco_eval=None, *, title=None):
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (workdir / "table.md").write_text(markdown_table(voc_result, title=title))
    plot_precision_recall(voc_result, workdir / "pr")
    if recall_result is not None:
        plot_recall_vs_iou(recall_result, workdir / "recall.png")
    if coco_eval is not None:
        (workdir / "detections_coco.json").write_text(json.dumps(coco_eval.results))
