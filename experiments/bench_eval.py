"""Evaluation speed: VOC metrics over a VOC-07-test-sized split, beside pycocotools.

    python experiments/bench_eval.py [--images 5000] [--detections 100] [--no-coco]

Feeds `--images` images with `--detections` detections each (20 classes, jittered copies of the
ground truth plus random boxes) through the streaming evaluators and prints wall-clock seconds
for adding all images and computing the result. pycocotools' COCOeval on the same detections
is the reference measured in the same run. Target (issue 5): VOC metrics for 5000 x 100 in
under 10 s on the 2-core CPU.
"""

import argparse
import platform
import time

import numpy as np

from frcnn_jax.evaluation import COCOEvaluator, VOCEvaluator


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
    parser.add_argument("--no-coco", action="store_true", help="skip the pycocotools reference")
    args = parser.parse_args()
    names = [f"class{k}" for k in range(1, args.classes + 1)]
    split = list(make_split(np.random.default_rng(0), args.images, args.detections, args.classes))
    print(
        f"{platform.processor() or platform.machine()}, {args.images} images x "
        f"{args.detections} detections, {args.classes} classes"
    )
    rows = [
        ("VOC07 11-point (frcnn_jax)", *time_voc(split, names, use_07=True), "mAP"),
        ("VOC area (frcnn_jax)", *time_voc(split, names, use_07=False), "mAP"),
    ]
    if not args.no_coco:
        rows.append(("COCO bbox (pycocotools)", *time_coco(split, args.classes), "AP50"))
    print(f"| {'evaluator':28} | add s | total s | metric |")
    print(f"|{'-' * 30}|-------|---------|--------|")
    for name, added, total, value, metric in rows:
        print(f"| {name:28} | {added:5.2f} | {total:7.2f} | {metric} {value:.3f} |")


if __name__ == "__main__":
    main()
