import contextlib
import io
import json

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from frcnn_jax.evaluation import (
    COCO_METRIC_NAMES,
    COCOEvaluator,
    to_coco_results,
    xywh_to_xyxy,
    xyxy_to_xywh,
)

CATEGORY_IDS = (1, 3, 7, 12)  # COCO ids are not contiguous


def _pycocotools_stats(gt_file, results_file):
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_file))
        dt = gt.loadRes(str(results_file))
        e = COCOeval(gt, dt, iouType="bbox")
        e.evaluate()
        e.accumulate()
        e.summarize()
    return e.stats


def _random_images(rng, num_images):
    images = []
    for image_id in range(100, 100 + num_images):
        g = rng.integers(0, 7)
        xy = rng.uniform(0, 500, (g, 2))
        gt = np.concatenate([xy, xy + rng.uniform(4, 200, (g, 2))], axis=1)
        gt_classes = rng.integers(1, len(CATEGORY_IDS) + 1, g)
        crowd = rng.random(g) < 0.1
        src = rng.integers(0, max(g, 1), 2 * g) if g else np.zeros(0, int)
        det = gt[src] + rng.normal(0, 6, (len(src), 4)) if g else np.zeros((0, 4))
        m = rng.integers(0, 5)
        xy = rng.uniform(0, 500, (m, 2))
        det = np.concatenate([det, np.concatenate([xy, xy + rng.uniform(4, 200, (m, 2))], 1)])
        det_classes = np.concatenate(
            [gt_classes[src] if g else np.zeros(0, int), rng.integers(1, 5, m)]
        )
        scores = rng.random(len(det))
        images.append((image_id, gt, gt_classes, crowd, det, scores, det_classes))
    return images


def test_matches_pycocotools_on_the_written_files(tmp_path):
    rng = np.random.default_rng(0)
    evaluator = COCOEvaluator(CATEGORY_IDS, category_names=["a", "b", "c", "d"])
    for image_id, gt, gt_classes, crowd, det, scores, det_classes in _random_images(rng, 40):
        evaluator.add(
            image_id,
            det,
            scores,
            det_classes,
            gt_boxes=gt,
            gt_classes=gt_classes,
            gt_difficult=crowd,
            image_size=(600, 800),
        )
    ours = evaluator.result()
    assert tuple(ours) == COCO_METRIC_NAMES
    gt_file, results_file = tmp_path / "gt.json", tmp_path / "results.json"
    gt_file.write_text(json.dumps(evaluator.ground_truth()))
    results_file.write_text(json.dumps(evaluator.results))
    direct = _pycocotools_stats(gt_file, results_file)
    np.testing.assert_array_equal([ours[n] for n in COCO_METRIC_NAMES], direct)
    assert 0.1 < ours["AP50"] < 1.0

    # The same ground truth given as an annotation file gives the same numbers.
    from_file = COCOEvaluator(CATEGORY_IDS, annotation_file=gt_file)
    from_file.results = list(evaluator.results)
    assert from_file.result() == ours


def test_ground_truth_fields_are_coco_shaped():
    evaluator = COCOEvaluator([5, 9])
    evaluator.add(
        42,
        np.zeros((0, 4)),
        np.zeros(0),
        np.zeros(0, int),
        gt_boxes=np.array([[10, 20, 40, 30], [0, 0, 1, 1], [0, 0, 0, 0]], np.float32),
        gt_classes=np.array([2, 1, 0]),
        gt_valid=np.array([True, True, False]),
        gt_difficult=np.array([False, True, False]),
        image_size=(100, 200),
    )
    gt = evaluator.ground_truth()
    assert gt["images"] == [{"id": 42, "height": 100, "width": 200}]
    first, second = gt["annotations"]
    assert first["bbox"] == [10, 20, 30, 10] and first["area"] == 300
    assert first["category_id"] == 9 and first["iscrowd"] == 0
    assert second["category_id"] == 5 and second["iscrowd"] == 1
    # no detections at all: every metric is undefined (-1), as pycocotools reports it
    assert set(evaluator.result().values()) == {-1.0}


def test_box_format_round_trip():
    rng = np.random.default_rng(3)
    xy = rng.uniform(0, 100, (50, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(0, 50, (50, 2))], axis=1)
    np.testing.assert_allclose(xywh_to_xyxy(xyxy_to_xywh(boxes)), boxes, rtol=0, atol=1e-12)
    entries = to_coco_results(
        7,
        boxes.astype(np.float32),
        np.linspace(1, 0, 50),
        np.full(50, 2),
        category_ids=[11, 22],
        valid=np.arange(50) < 30,
    )
    assert len(entries) == 30
    assert all(e["image_id"] == 7 and e["category_id"] == 22 for e in entries)
    back = xywh_to_xyxy(np.array([e["bbox"] for e in entries]))
    np.testing.assert_allclose(back, boxes[:30], rtol=1e-6)
    json.dumps(entries)  # plain Python numbers only
    with pytest.raises(ValueError, match=r"classes must lie in 1\.\.2"):
        to_coco_results(1, boxes[:1], [0.5], [3], category_ids=[11, 22])
