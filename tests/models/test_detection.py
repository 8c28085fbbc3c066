import functools

import jax
import numpy as np
import pytest
import torch
from torchvision.models.detection.roi_heads import RoIHeads

from frcnn_jax.models import roi_heads
from tests import paper_settings
from tests.ops.helpers import random_boxes


def test_detect_equals_torchvision_postprocess_detections():
    rng = np.random.default_rng(0)
    num, classes = 300, 6
    proposals = random_boxes(rng, num, size=400, min_side=8, max_side=150)
    logits = (rng.normal(size=(num, classes + 1)) * 2.5).astype(np.float32)
    deltas = rng.normal(0, 0.5, (num, classes + 1, 4)).astype(np.float32)
    heads = RoIHeads(None, None, None, 0.5, 0.5, 512, 0.25, None, 0.05, 0.5, 100)
    (boxes,), (scores,), (labels,) = heads.postprocess_detections(
        torch.from_numpy(logits),
        torch.from_numpy(deltas.reshape(num, -1)),
        [torch.from_numpy(proposals)],
        [(420, 500)],
    )
    got = jax.jit(
        functools.partial(
            paper_settings.detect, image_height=420, image_width=500, nms_threshold=0.5
        )
    )(logits, deltas, proposals, np.ones(num, bool))
    count = int(np.asarray(got.valid).sum())
    assert count == len(scores) == 100  # enough candidates to fill every slot
    np.testing.assert_array_equal(got.classes[:count], labels.numpy())
    np.testing.assert_allclose(got.scores[:count], scores.numpy(), rtol=1e-5)
    np.testing.assert_allclose(got.boxes[:count], boxes.numpy(), atol=1e-3)


def test_detect_scales_to_original_pixels_and_pads():
    proposals = np.array([[10, 10, 50, 50], [0, 0, 0, 0]], np.float32)
    logits = np.array([[0.0, 9.0, 0.0], [0.0, 9.0, 0.0]], np.float32)
    deltas = np.zeros((2, 2, 4), np.float32)  # classes 1..K layout
    got = paper_settings.detect(
        logits,
        deltas,
        proposals,
        np.array([True, False]),
        image_height=100,
        image_width=100,
        scale=2.0,
        max_detections=3,
    )
    np.testing.assert_array_equal(got.valid, [True, False, False])
    np.testing.assert_allclose(got.boxes[0], [5, 5, 25, 25])  # back to original pixels
    np.testing.assert_array_equal(got.classes, [1, 0, 0])
    assert not np.asarray(got.boxes[1:]).any()


def _detections(rows, size):
    """Detections with `size` slots from (x1, y1, x2, y2, score, class) rows."""
    boxes = np.zeros((size, 4), np.float32)
    scores, classes, valid = (
        np.zeros(size, np.float32),
        np.zeros(size, np.int32),
        np.zeros(size, bool),
    )
    for i, (x1, y1, x2, y2, score, cls) in enumerate(rows):
        boxes[i], scores[i], classes[i], valid[i] = (x1, y1, x2, y2), score, cls, True
    return roi_heads.Detections(boxes, scores, classes, valid)


@pytest.mark.parametrize("jit", [False, True])
def test_merging_scales_suppresses_repeats_of_one_class_only(jit):
    small = _detections([(10, 10, 50, 50, 0.9, 1), (60, 60, 90, 90, 0.4, 2)], 3)
    large = _detections(
        [(11, 10, 51, 50, 0.7, 1), (12, 12, 50, 50, 0.8, 2), (200, 200, 220, 220, 0.3, 1)], 4
    )
    merge = functools.partial(roi_heads.merge_detections, nms_threshold=0.5, max_detections=4)
    if jit:
        merge = jax.jit(merge)
    got = merge([small, large])
    # 0.7 (class 1) repeats 0.9's box: suppressed; 0.8 (class 2) overlaps a class-1 box: kept
    np.testing.assert_allclose(got.scores, [0.9, 0.8, 0.4, 0.3])
    np.testing.assert_array_equal(got.classes, [1, 2, 2, 1])
    np.testing.assert_array_equal(got.boxes[3], [200, 200, 220, 220])
    fewer = roi_heads.merge_detections([small, large], nms_threshold=0.5, max_detections=2)
    np.testing.assert_allclose(fewer.scores, [0.9, 0.8])  # the best D
    same = roi_heads.merge_detections([small, small], nms_threshold=0.5, max_detections=3)
    np.testing.assert_array_equal(same.boxes, small.boxes)  # a scale twice changes nothing
    np.testing.assert_array_equal(same.valid, small.valid)


def test_merging_only_padding_gives_no_detections():
    got = roi_heads.merge_detections(
        [_detections([], 2), _detections([], 3)], nms_threshold=0.5, max_detections=4
    )
    assert not got.valid.any() and not got.boxes.any() and not got.classes.any()
