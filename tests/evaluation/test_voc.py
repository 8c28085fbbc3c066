import numpy as np
import pytest

from frcnn_jax.evaluation import VOCEvaluator, average_precision, voc_iou
from tests import py_faster_rcnn


def _hand_case():
    """One image, class 1: GT A, B, C and a difficult D; class 2 has no ground truth."""
    gt_boxes = np.array(
        [
            [0, 0, 10, 10],  # A
            [20, 0, 30, 10],  # B
            [40, 0, 50, 10],  # C: never found
            [60, 0, 70, 10],  # D: difficult
        ],
        np.float32,
    )
    gt_classes = np.array([1, 1, 1, 1])
    gt_difficult = np.array([False, False, False, True])
    det_boxes = np.array(
        [
            [0, 0, 10, 10],  # .9 -> A: TP
            [0, 0, 10, 9],  # .8 -> A again: duplicate, FP
            [60, 0, 70, 10],  # .7 -> D: difficult, ignored
            [20, 0, 30, 10],  # .6 -> B: TP
            [100, 100, 110, 110],  # .5 -> nothing: FP
            [0, 0, 10, 10],  # .95, class 2 (no ground truth): reported as n/a
        ],
        np.float32,
    )
    det_scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.95])
    det_classes = np.array([1, 1, 1, 1, 1, 2])
    return det_boxes, det_scores, det_classes, gt_boxes, gt_classes, gt_difficult


@pytest.mark.parametrize(
    ("use_07", "expected"),
    [
        # P/R points (rec, prec): (1/3, 1), (1/3, .5), (1/3, .5) ignored row, (2/3, 2/3), (2/3, .5)
        # 11-point: t = 0, .1, .2, .3 -> 1; t = .4, .5, .6 -> 2/3; t = .7 .. 1 -> 0.
        (True, (4 * 1 + 3 * 2 / 3) / 11),
        # area: recall 0 -> 1/3 at precision 1, 1/3 -> 2/3 at 2/3, 2/3 -> 1 at 0.
        (False, 1 / 3 + 2 / 9),
    ],
)
def test_hand_worked_ap(use_07, expected):
    det_boxes, det_scores, det_classes, gt_boxes, gt_classes, gt_difficult = _hand_case()
    evaluator = VOCEvaluator(["thing", "other"], use_07_metric=use_07)
    evaluator.add(
        det_boxes, det_scores, det_classes, gt_boxes, gt_classes, gt_difficult=gt_difficult
    )
    result = evaluator.result()
    thing, other = result.classes
    assert thing.ap == pytest.approx(expected, abs=1e-12)
    assert thing.num_gt == 3  # the difficult box is not counted
    np.testing.assert_allclose(thing.recall, [1 / 3, 1 / 3, 1 / 3, 2 / 3, 2 / 3])
    np.testing.assert_allclose(thing.precision, [1, 1 / 2, 1 / 2, 2 / 3, 1 / 2])
    assert other.ap is None and other.num_gt == 0 and other.num_detections == 1
    assert result.mean_ap == pytest.approx(expected)  # n/a classes are not averaged
    assert result.as_dict()["AP"] == {"thing": thing.ap, "other": None}


def test_best_match_is_difficult_means_ignored():
    # The detection overlaps a normal box (IoU 0.6) but a difficult one more (IoU 1): ignored,
    # exactly as the devkit does; the normal box stays unfound.
    gt_boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 6]], np.float32)
    evaluator = VOCEvaluator(["a"])
    evaluator.add(
        np.array([[0, 0, 10, 6]], np.float32),
        np.array([0.9]),
        np.array([1]),
        gt_boxes,
        np.array([1, 1]),
        gt_difficult=np.array([False, True]),
    )
    (a,) = evaluator.result().classes
    assert a.num_gt == 1 and a.ap == 0.0
    np.testing.assert_array_equal(a.precision, [0.0])


def test_plus_one_convention_changes_iou():
    # [0, 0, 9, 9] vs [3, 0, 12, 9]: continuous 54 / 108 = 0.5; inclusive pixels 70 / 130.
    a = np.array([[0, 0, 9, 9]], np.float32)
    b = np.array([[3, 0, 12, 9]], np.float32)
    assert voc_iou(a, b)[0, 0] == pytest.approx(0.5)
    assert voc_iou(a, b, plus_one=True)[0, 0] == pytest.approx(70 / 130)
    for plus_one, ap in [(False, 0.0), (True, 1.0)]:
        evaluator = VOCEvaluator(["a"], iou_threshold=0.52, plus_one=plus_one)
        evaluator.add(a, np.array([0.5]), np.array([1]), b, np.array([1]))
        assert evaluator.result().mean_ap == ap
    # threshold is inclusive (the devkit's ovmax >= minoverlap)
    evaluator = VOCEvaluator(["a"], iou_threshold=0.5)
    evaluator.add(a, np.array([0.5]), np.array([1]), b, np.array([1]))
    assert evaluator.result().mean_ap == 1.0


def test_padding_masks_and_empty_inputs():
    evaluator = VOCEvaluator(["a", "b"])
    # padded detections/ground truth are ignored, even with garbage class ids
    evaluator.add(
        np.array([[0, 0, 10, 10], [0, 0, 0, 0]], np.float32),
        np.array([0.9, 0.0]),
        np.array([1, 0]),
        np.array([[0, 0, 10, 10], [0, 0, 0, 0]], np.float32),
        np.array([1, 0]),
        det_valid=np.array([True, False]),
        gt_valid=np.array([True, False]),
    )
    # an image with nothing at all, and one with ground truth but no detections
    evaluator.add(np.zeros((0, 4)), np.zeros(0), np.zeros(0, int), np.zeros((0, 4)), np.zeros(0))
    evaluator.add(
        np.zeros((0, 4)), np.zeros(0), np.zeros(0, int), np.array([[0, 0, 5, 5.0]]), np.array([2])
    )
    result = evaluator.result()
    assert result.num_images == 3
    a, b = result.classes
    assert a.ap == 1.0 and b.ap == 0.0 and b.num_detections == 0
    assert result.mean_ap == 0.5
    assert VOCEvaluator(["a"]).result().mean_ap is None  # nothing added: no class has GT


def test_bad_class_ids_are_reported():
    evaluator = VOCEvaluator(["a", "b"])
    with pytest.raises(ValueError, match=r"det_classes must lie in 1..2.*\[3\]"):
        evaluator.add(
            np.zeros((1, 4)), np.ones(1), np.array([3]), np.zeros((0, 4)), np.zeros(0, int)
        )


def _random_split(rng, num_images, num_classes):
    dets, gts = [], []
    for _ in range(num_images):
        g = rng.integers(0, 6)
        xy = rng.uniform(0, 400, (g, 2))
        wh = rng.uniform(5, 150, (g, 2))
        gt_boxes = np.concatenate([xy, xy + wh], axis=1).astype(np.float32)
        gt_classes = rng.integers(1, num_classes + 1, g)
        difficult = rng.random(g) < 0.15
        # detections: jittered copies of ground truth (often duplicated) plus random boxes
        src = rng.integers(0, max(g, 1), rng.integers(0, 3 * g + 1)) if g else np.zeros(0, int)
        jitter = rng.normal(0, 8, (len(src), 4))
        near = gt_boxes[src] + jitter if g else np.zeros((0, 4))
        near_classes = np.where(
            rng.random(len(src)) < 0.85, gt_classes[src] if g else 0, rng.integers(1, 21)
        )
        m = rng.integers(0, 10)
        xy = rng.uniform(0, 400, (m, 2))
        far = np.concatenate([xy, xy + rng.uniform(5, 150, (m, 2))], axis=1)
        boxes = np.concatenate([near, far]).astype(np.float32)
        classes = np.concatenate([near_classes, rng.integers(1, num_classes + 1, m)])
        scores = rng.random(len(boxes))
        dets.append((boxes, scores, classes.astype(int)))
        gts.append((gt_boxes, gt_classes, difficult))
    return dets, gts


@pytest.mark.parametrize(
    ("use_07", "plus_one", "threshold"),
    [(True, False, 0.5), (False, False, 0.5), (True, True, 0.5), (False, False, 0.7)],
)
def test_matches_devkit_reimplementation_on_random_data(use_07, plus_one, threshold):
    rng = np.random.default_rng(1)
    names = [f"class{k}" for k in range(1, 21)]
    dets, gts = _random_split(rng, 60, 20)
    evaluator = VOCEvaluator(
        names, iou_threshold=threshold, use_07_metric=use_07, plus_one=plus_one
    )
    for (boxes, scores, classes), (gt_boxes, gt_classes, difficult) in zip(dets, gts, strict=True):
        evaluator.add(boxes, scores, classes, gt_boxes, gt_classes, gt_difficult=difficult)
    result = evaluator.result()
    one = 1.0 if plus_one else 0.0
    expected = py_faster_rcnn.voc_eval(dets, gts, 20, threshold=threshold, use_07=use_07, one=one)
    got = {k: c.ap for k, c in enumerate(result.classes, start=1)}
    assert got.keys() == expected.keys()
    for k in expected:
        if expected[k] is None:
            assert got[k] is None
        else:
            assert got[k] == pytest.approx(expected[k], abs=1e-12), k
    assert 0.05 < result.mean_ap < 0.95  # the data exercises both hits and misses


def test_average_precision_edges():
    assert average_precision([], [], use_07_metric=True) == 0.0
    assert average_precision([], [], use_07_metric=False) == 0.0
    assert average_precision([1.0], [1.0], use_07_metric=True) == pytest.approx(1.0)
    assert average_precision([1.0], [1.0], use_07_metric=False) == 1.0
    # half the objects found at precision 1: area 0.5; 11-point 6/11 (t = 0 .. 0.5)
    assert average_precision([0.5], [1.0], use_07_metric=False) == 0.5
    assert average_precision([0.5], [1.0], use_07_metric=True) == pytest.approx(6 / 11)
