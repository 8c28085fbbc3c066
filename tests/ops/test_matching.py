import functools

import chex
import jax
import numpy as np
import pytest
import torch
from torchvision.models.detection._utils import Matcher

from frcnn_jax import ops
from tests.ops import numpy_reference
from tests.ops.helpers import random_boxes

RPN = dict(high_threshold=0.7, low_threshold=0.3, allow_low_quality=True)


def torchvision_labels(iou, high, low, allow_low_quality):
    matcher = Matcher(high, low, allow_low_quality_matches=allow_low_quality)
    matches = matcher(torch.from_numpy(np.ascontiguousarray(iou.T))).numpy()
    labels = np.where(matches >= 0, 1, np.where(matches == Matcher.BELOW_LOW_THRESHOLD, 0, -1))
    return matches, labels


class MatchBoxesTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_hand_worked(self):
        iou = np.array(
            [
                # gt0  gt1  gt2 (padding)
                [0.80, 0.10, 0.99],  # 0: >= 0.7 with gt0 -> positive; padding never counts
                [0.50, 0.55, 0.00],  # 1: between 0.3 and 0.7 -> ignored, best is gt1
                [0.10, 0.29, 0.00],  # 2: < 0.3 -> negative
                [
                    0.30,
                    0.60,
                    0.00,
                ],  # 3: gt1's best anchor (0.6) -> positive by the low-quality rule
                [0.20, 0.60, 0.00],  # 4: ties with 3 for gt1 -> positive too
                [0.70, 0.00, 0.00],  # 5: exactly 0.7 -> positive
                [0.00, 0.30, 0.00],  # 6: exactly 0.3 -> ignored (not below)
            ],
            np.float32,
        )
        gt_valid = np.array([True, True, False])
        match = self.variant(functools.partial(ops.match_boxes, **RPN))
        matched_gt, labels = match(iou, gt_valid)
        np.testing.assert_array_equal(labels, [1, -1, 0, 1, 1, 1, -1])
        np.testing.assert_array_equal(matched_gt, [0, 1, 1, 1, 1, 0, 1])
        no_low_quality = ops.match_boxes(iou, gt_valid, **{**RPN, "allow_low_quality": False})
        np.testing.assert_array_equal(no_low_quality.labels, [1, -1, 0, -1, -1, 1, -1])

    @chex.variants(with_jit=True, without_jit=True)
    def test_ground_truth_overlapping_nothing_matches_nothing(self):
        # gt1 overlaps no anchor (e.g. a zero-area or far-away box): torchvision would make every
        # anchor "its best" and mark them all positive; here it makes nothing positive.
        iou = np.array([[0.9, 0.0], [0.1, 0.0], [0.0, 0.0]], np.float32)
        match = self.variant(functools.partial(ops.match_boxes, **RPN))
        np.testing.assert_array_equal(match(iou, np.array([True, True])).labels, [1, 0, 0])

    @chex.variants(with_jit=True, without_jit=True)
    def test_empty_image(self):
        iou = np.full((5, 3), 0.9, np.float32)  # stale values in padded slots
        match = self.variant(functools.partial(ops.match_boxes, **RPN))
        result = match(iou, np.zeros(3, bool))
        np.testing.assert_array_equal(result.labels, np.zeros(5))
        np.testing.assert_array_equal(result.matched_gt, np.zeros(5))
        no_slots = ops.match_boxes(np.zeros((5, 0), np.float32), np.zeros(0, bool), **RPN)
        np.testing.assert_array_equal(no_slots.labels, np.zeros(5))

    def test_matches_numpy_reference_with_padding(self):
        rng = np.random.default_rng(0)
        anchors = random_boxes(rng, 300, size=300, max_side=120)
        gt = random_boxes(rng, 12, size=300, max_side=120)
        gt[9:] = 0  # padded slots
        gt_valid = np.arange(12) < 9
        iou = np.array(ops.pairwise_iou(anchors, gt))
        iou[:3, 2] = iou[:, 2].max()  # force a tie for gt2's best anchor
        for high, low, low_quality in ((0.7, 0.3, True), (0.5, 0.5, False), (0.5, 0.1, True)):
            got = ops.match_boxes(
                iou, gt_valid, high_threshold=high, low_threshold=low, allow_low_quality=low_quality
            )
            want_matched, want_labels = numpy_reference.match(iou, gt_valid, high, low, low_quality)
            np.testing.assert_array_equal(got.labels, want_labels)
            positive = want_labels == 1
            np.testing.assert_array_equal(
                np.asarray(got.matched_gt)[positive], want_matched[positive]
            )

    def test_equals_torchvision_matcher(self):
        for high, low, low_quality in ((0.7, 0.3, True), (0.5, 0.5, False)):
            rng = np.random.default_rng(1)
            anchors = random_boxes(rng, 500, size=400, max_side=150)
            gt = random_boxes(rng, 8, size=400, max_side=150)
            iou = np.asarray(ops.pairwise_iou(anchors, gt))
            assert (iou.max(axis=0) > 0).all()  # where torchvision's rule is well defined
            got = ops.match_boxes(
                iou,
                np.ones(8, bool),
                high_threshold=high,
                low_threshold=low,
                allow_low_quality=low_quality,
            )
            want_matches, want_labels = torchvision_labels(iou, high, low, low_quality)
            np.testing.assert_array_equal(got.labels, want_labels)
            positive = want_labels == 1
            np.testing.assert_array_equal(
                np.asarray(got.matched_gt)[positive], want_matches[positive]
            )

    @chex.variants(with_jit=True, without_jit=True)
    def test_removed_anchors_are_ignored_and_never_a_boxs_best(self):
        iou = np.array(
            [
                # gt0   gt1
                [0.90, 0.10],  # 0: removed: would be positive, and gt0's best
                [0.60, 0.05],  # 1: gt0's best among the kept anchors -> forced positive
                [0.20, 0.40],  # 2: removed: gt1's best
                [0.10, 0.35],  # 3: gt1's best among the kept ones -> positive
                [0.10, 0.10],  # 4: negative
            ],
            np.float32,
        )
        kept = np.array([False, True, False, True, True])
        match = self.variant(functools.partial(ops.match_boxes, **RPN))
        result = match(iou, np.array([True, True]), anchor_valid=kept)
        np.testing.assert_array_equal(result.labels, [-1, 1, -1, 1, 0])
        np.testing.assert_array_equal(np.asarray(result.matched_gt)[[1, 3]], [0, 1])
        # Removing nothing is the plain rule; an empty image leaves removed anchors ignored.
        everything = match(iou, np.array([True, True]), anchor_valid=np.ones(5, bool))
        np.testing.assert_array_equal(everything.labels, match(iou, np.array([True, True]))[1])
        empty = match(iou, np.zeros(2, bool), anchor_valid=kept)
        np.testing.assert_array_equal(empty.labels, [-1, 0, -1, 0, 0])
        no_slots = ops.match_boxes(np.zeros((5, 0)), np.zeros(0, bool), anchor_valid=kept, **RPN)
        np.testing.assert_array_equal(no_slots.labels, [-1, 0, -1, 0, 0])
        with pytest.raises(ValueError, match=r"disagree on A.*\(5, 2\).*\(4,\)"):
            ops.match_boxes(iou, np.ones(2, bool), anchor_valid=np.ones(4, bool), **RPN)

    def test_vmap_over_images(self):
        rng = np.random.default_rng(2)
        iou = rng.uniform(size=(2, 50, 4)).astype(np.float32)
        gt_valid = np.array([[True, True, False, False], [True, True, True, True]])
        batched = jax.vmap(functools.partial(ops.match_boxes, **RPN))(iou, gt_valid)
        for b in range(2):
            single = ops.match_boxes(iou[b], gt_valid[b], **RPN)
            np.testing.assert_array_equal(batched.labels[b], single.labels)

    def test_bad_input(self):
        with pytest.raises(ValueError, match=r"disagree on G.*\(5, 3\).*\(4,\)"):
            ops.match_boxes(np.zeros((5, 3)), np.ones(4, bool), **RPN)
        with pytest.raises(ValueError, match="must not exceed"):
            ops.match_boxes(
                np.zeros((5, 3)),
                np.ones(3, bool),
                high_threshold=0.3,
                low_threshold=0.7,
                allow_low_quality=False,
            )
