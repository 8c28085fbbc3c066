"""Evaluation speed: VOC mAP over a VOC-07-test-sized split against the same metric computed
by the reference procedure, and COCO AP against pycocotools.

    python experiments/bench_eval.py [--images 5000] [--detections 100] [--no-coco]

Feeds `--images` images with `--detections` detections each (20 classes, jittered copies of the
ground truth plus random boxes) through frcnn_jax's streaming evaluators and times adding all
images and computing the result. The references, on the same detections in the same run:
- VOC mAP (VOC07 11-point and area): the devkit's procedure as py-faster-rcnn's
  `voc_eval.py` and detectron2's PascalVOCDetectionEvaluator compute it (vectorised over each
  image's ground truth; `tests/py_faster_rcnn.py::voc_eval`), which also checks the values;
- COCO AP: pycocotools' COCOeval (evaluate + accumulate + summarize: all 12 numbers, ten IoU
  thresholds, three areas) beside frcnn_jax's `COCOEvaluator`, which calls that same COCOeval
  after collecting the detections: the two compute the same thing.
The table goes to `experiments/results_eval.md`.
"""

import argparse
import pathlib
import sys
import time

import numpy as np
import result_rows

from frcnn_jax.evaluation import COCOEvaluator, VOCEvaluator

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests import py_faster_rcnn  # noqa: E402


def make_split(rng, num_images, num_detections, num_classes):
    for image_id in range(num_images):
        g = int(rng.integers(1, 12))
        xy = rng.uniform(0, 400, (g, 2))
        gt = np.concatenate([xy, xy + rng.uniform(8, 200, (g, 2))], 1).astype(np.float32)
        gt_classes = rng.integers(1, num_classes + 1, g)
        difficult = rng.random(g) < 0.1
        src = rng.integers(0, g, num_detections // 2)
        near = gt[src] + rng.normal(0, 10, (len(src), 4))
        m = num_detections - len(src)
        xy = rng.uniform(0, 400, (m, 2))
        far = np.concatenate([xy, xy + rng.uniform(8, 200, (m, 2))], 1)
        det = np.concatenate([near, far]).astype(np.float32)
        det_classes = np.concatenate([gt_classes[src], rng.integers(1, num_classes + 1, m)])
        scores = rng.random(num_detections).astype(np.float32)
        yield image_id, det, scores, det_classes, gt, gt_classes, difficult


def time_voc(split, names, use_07):
    evaluator = VOCEvaluator(names, use_07_metric=use_07)
    start = time.perf_counter()
    for _, det, scores, det_classes, gt, gt_classes, difficult in split:
        evaluator.add(det, scores, det_classes, gt, gt_classes, gt_difficult=difficult)
    added = time.perf_counter() - start
    result = evaluator.result()
    return added, time.perf_counter() - start, result.mean_ap


def time_reference(split, num_classes, use_07):
    """The devkit procedure (py-faster-rcnn's voc_eval), from the same per-image arrays."""
    start = time.perf_counter()
    detections = [(det, scores, det_classes) for _, det, scores, det_classes, *_ in split]
    truth = [(gt, gt_classes, difficult) for *_, gt, gt_classes, difficult in split]
    aps = py_faster_rcnn.voc_eval(detections, truth, num_classes, use_07=use_07)
    values = [ap for ap in aps.values() if ap is not None]
    return None, time.perf_counter() - start, float(np.mean(values))


def time_coco(split, num_classes):
    evaluator = COCOEvaluator(range(1, num_classes + 1))
    start = time.perf_counter()
    for image_id, det, scores, det_classes, gt, gt_classes, difficult in split:
        evaluator.add(
            image_id,
            det,
            scores,
            det_classes,
            gt_boxes=gt,
            gt_classes=gt_classes,
            gt_difficult=difficult,
            image_size=(600, 600),
        )
    added = time.perf_counter() - start
    result = evaluator.result()
    return added, time.perf_counter() - start, result["AP50"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--detections", type=int, default=100)
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--no-coco", action="store_true", help="skip the COCO rows")
    args = parser.parse_args()
    names = [f"class{k}" for k in range(1, args.classes + 1)]
    split = list(make_split(np.random.default_rng(0), args.images, args.detections, args.classes))
    rows = {}
    for use_07, metric in ((True, "VOC07 11-point mAP"), (False, "VOC area mAP")):
        rows[f"{metric}: frcnn_jax VOCEvaluator"] = time_voc(split, names, use_07)
        rows[f"{metric}: the devkit procedure (py-faster-rcnn voc_eval)"] = time_reference(
            split, args.classes, use_07
        )
    if not args.no_coco:
        rows["COCO AP, 12 numbers: frcnn_jax COCOEvaluator (pycocotools inside)"] = time_coco(
            split, args.classes
        )
    body = [
        f"{args.images} images x {args.detections} detections, {args.classes} classes; add s: "
        "streaming each image in; total s: adding and computing the result.",
        "",
        "| evaluator | add s | total s | value |",
        "|---|---:|---:|---:|",
    ]
    for name, (added, total, value) in rows.items():
        body.append(
            f"| {name} | {'-' if added is None else f'{added:.2f}'} | {total:.2f} | {value:.4f} |"
        )
    print("\n".join(body))
    ours = rows["VOC07 11-point mAP: frcnn_jax VOCEvaluator"]
    reference = rows["VOC07 11-point mAP: the devkit procedure (py-faster-rcnn voc_eval)"]
    if abs(ours[2] - reference[2]) > 1e-9:
        raise SystemExit(f"the two VOC07 mAPs differ: {ours[2]} vs {reference[2]}")
    result_rows.write_results(
        ROOT / "experiments" / "results_eval.md",
        "Evaluation speed: VOC mAP and COCO AP",
        body,
        f"VOC07 mAP of {args.images} images x {args.detections} detections in {ours[1]:.2f} s, "
        f"the devkit procedure (py-faster-rcnn's voc_eval, same value) {reference[1]:.2f} s",
    )


if __name__ == "__main__":
    main()
