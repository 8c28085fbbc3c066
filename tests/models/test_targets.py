import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import torch
from torchvision.models.detection._utils import BoxCoder, Matcher
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.rpn import RegionProposalNetwork

from frcnn_jax import ops
from frcnn_jax.models import roi_heads
from tests import paper_settings, py_faster_rcnn
from tests.ops.helpers import random_boxes


def paper_anchors(feature_hw=(12, 20), stride=16):
    base = ops.base_anchors(sizes=(32, 64, 128), aspect_ratios=(0.5, 1.0, 2.0))
    return ops.anchor_grid(
        base, feature_height=feature_hw[0], feature_width=feature_hw[1], stride=stride
    )


def torchvision_rpn(pre_nms_top_n, post_nms_top_n, nms=0.7, min_size=1e-3):
    rpn = RegionProposalNetwork(
        AnchorGenerator(),
        None,
        0.7,
        0.3,
        256,
        0.5,
        dict(training=pre_nms_top_n, testing=pre_nms_top_n),
        dict(training=post_nms_top_n, testing=post_nms_top_n),
        nms,
    )
    rpn.min_size = min_size
    return rpn.eval()


def test_generate_proposals_equals_torchvision_filter_proposals():
    rng = np.random.default_rng(0)
    anchors = np.array(paper_anchors())
    num = len(anchors)
    logits = rng.permutation(num).astype(np.float32) / num * 8 - 4  # distinct scores
    deltas = rng.normal(0, 0.3, (num, 4)).astype(np.float32)
    height, width = 190, 310
    got = jax.jit(
        functools.partial(
            paper_settings.generate_proposals,
            image_height=height,
            image_width=width,
            pre_nms_top_n=1000,
            post_nms_top_n=300,
            nms_threshold=0.7,
            min_size=1e-3,
        )
    )(logits, deltas, anchors)
    decoded = BoxCoder((1.0, 1.0, 1.0, 1.0)).decode_single(
        torch.from_numpy(deltas), torch.from_numpy(anchors)
    )
    (want_boxes,), (want_scores,) = torchvision_rpn(1000, 300).filter_proposals(
        decoded[None], torch.from_numpy(logits)[None], [(height, width)], [num]
    )
    count = int(np.asarray(got.valid).sum())
    assert count == len(want_boxes) and count > 50
    np.testing.assert_allclose(got.boxes[:count], want_boxes.numpy(), atol=1e-3)
    np.testing.assert_allclose(jax.nn.sigmoid(got.scores[:count]), want_scores.numpy(), rtol=1e-5)
    assert not np.asarray(got.boxes[count:]).any()


def test_generate_multilevel_proposals_equals_torchvision():
    rng = np.random.default_rng(1)
    levels = [np.array(paper_anchors((16, 24), 8)), np.array(paper_anchors((8, 12), 16))]
    logits = [rng.normal(size=len(a)).astype(np.float32) for a in levels]
    deltas = [rng.normal(0, 0.2, (len(a), 4)).astype(np.float32) for a in levels]
    got = paper_settings.generate_proposals(
        logits,
        deltas,
        levels,
        image_height=128,
        image_width=192,
        pre_nms_top_n=500,
        post_nms_top_n=400,
    )
    decoded = BoxCoder((1.0, 1.0, 1.0, 1.0)).decode_single(
        torch.from_numpy(np.concatenate(deltas)), torch.from_numpy(np.concatenate(levels))
    )
    (want_boxes,), _ = torchvision_rpn(500, 400, min_size=0.0).filter_proposals(
        decoded[None],
        torch.from_numpy(np.concatenate(logits))[None],
        [(128, 192)],
        [len(a) for a in levels],
    )
    count = int(np.asarray(got.valid).sum())
    assert count == len(want_boxes)
    np.testing.assert_allclose(got.boxes[:count], want_boxes.numpy(), atol=1e-3)


def test_small_proposals_are_masked_not_kept():
    anchors = np.array([[0, 0, 10, 10], [20, 20, 60, 60]], np.float32)
    proposals = paper_settings.generate_proposals(
        np.array([5.0, 1.0], np.float32),
        np.zeros((2, 4), np.float32),
        anchors,
        image_height=100,
        image_width=100,
        pre_nms_top_n=2,
        post_nms_top_n=2,
        min_size=16,
    )
    np.testing.assert_array_equal(proposals.valid, [True, False])
    np.testing.assert_array_equal(proposals.boxes[0], [20, 20, 60, 60])


def test_rpn_labels_and_targets_equal_torchvision_before_sampling():
    rng = np.random.default_rng(2)
    anchors = np.array(paper_anchors())
    gt = random_boxes(rng, 6, size=250, min_side=20, max_side=120)
    gt_padded = np.concatenate([gt, np.zeros((4, 4), np.float32)])
    gt_valid = np.arange(10) < 6
    # With room for every candidate, sampling keeps them all: the labels are the matcher's.
    result = paper_settings.rpn_targets(
        jax.random.key(0),
        anchors,
        gt_padded,
        gt_valid,
        image_height=192,
        image_width=320,
        batch_size=len(anchors),
        positive_fraction=1.0,
        allowed_border=None,
    )
    matcher = Matcher(0.7, 0.3, allow_low_quality_matches=True)
    matches = matcher(
        torch.from_numpy(np.array(ops.pairwise_iou(anchors, gt))).T.contiguous()
    ).numpy()
    want_labels = np.where(matches >= 0, 1, np.where(matches == -1, 0, -1))
    np.testing.assert_array_equal(result.labels, want_labels)
    positive = want_labels == 1
    want_targets = BoxCoder((1.0, 1.0, 1.0, 1.0)).encode_single(
        torch.from_numpy(gt[matches[positive]]), torch.from_numpy(anchors[positive])
    )
    np.testing.assert_allclose(result.box_targets[positive], want_targets.numpy(), atol=1e-5)
    assert not np.asarray(result.box_targets[~positive]).any()


class RpnTargetsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_sampling_quota_border_and_empty_image(self):
        anchors = np.array(paper_anchors())
        gt = np.array([[40, 40, 120, 100], [0, 0, 0, 0]], np.float32)
        fn = self.variant(
            functools.partial(
                paper_settings.rpn_targets, image_height=192, image_width=320, batch_size=64
            )
        )
        result = fn(jax.random.key(1), anchors, gt, np.array([True, True]))
        labels = np.asarray(result.labels)
        self.assertLessEqual((labels == 1).sum(), 32)
        self.assertEqual((labels >= 0).sum(), 64)
        outside = ~np.asarray(ops.anchors_inside(anchors, height=192, width=320))
        self.assertTrue((labels[outside] == -1).all())  # cross-border anchors ignored
        # The zero-area "ground truth" in slot 1 (valid but degenerate) matches nothing.
        positives = np.flatnonzero(labels == 1)
        self.assertGreater(len(positives), 0)
        empty = fn(jax.random.key(1), anchors, gt, np.array([False, False]))
        self.assertEqual(int((np.asarray(empty.labels) == 0).sum()), 64)
        self.assertTrue(np.isfinite(np.asarray(empty.box_targets)).all())


def vgg_anchors(height, width):
    base = ops.base_anchors(sizes=(128, 256, 512), aspect_ratios=(0.5, 1.0, 2.0))
    return np.asarray(
        ops.anchor_grid(base, feature_height=height // 16, feature_width=width // 16, stride=16)
    )


def all_labels(anchors, gt, height, width):
    """`rpn_targets` labels with a sample as large as the anchor set (nothing dropped)."""
    result = paper_settings.rpn_targets(
        jax.random.key(0),
        anchors,
        gt,
        np.ones(len(gt), bool),
        image_height=height,
        image_width=width,
        batch_size=len(anchors),
        positive_fraction=1.0,
    )
    return np.asarray(result.labels)


def test_border_boxes_get_positives_among_the_anchors_that_remain():
    # An 800 x 600 image (VGG-16, stride 16): a box along the left edge and its mirror on the
    # right. Each box's best anchor overall crosses the border; py-faster-rcnn removes those
    # anchors first and picks the box's best among the rest, so the box still gets positives.
    height, width = 600, 800
    anchors = vgg_anchors(height, width)
    inside = np.asarray(ops.anchors_inside(anchors, height=height, width=width))
    for box in ([0, 100, 100, 500], [700, 100, 800, 500]):
        gt = np.array([box], np.float32)
        iou = np.asarray(ops.pairwise_iou(anchors, gt))[:, 0]
        assert not inside[np.argmax(iou)]  # the best anchor overall crosses the border
        labels = all_labels(anchors, gt, height, width)
        positives = np.flatnonzero(labels == 1)
        assert len(positives) > 0 and inside[positives].all()
        assert (labels[~inside] == -1).all()
        want, _ = py_faster_rcnn.anchor_labels(anchors, gt, height, width)
        np.testing.assert_array_equal(labels, want)


def test_rpn_labels_equal_py_faster_rcnn_on_random_boxes():
    rng = np.random.default_rng(3)
    height, width = 384, 512
    anchors = vgg_anchors(height, width)
    for _ in range(3):
        gt = random_boxes(rng, 6, size=512, max_side=300)
        gt[:, [1, 3]] = np.minimum(gt[:, [1, 3]], height)
        gt = gt[(gt[:, 2] - gt[:, 0] > 1) & (gt[:, 3] - gt[:, 1] > 1)]
        labels = all_labels(anchors, gt, height, width)
        want, _ = py_faster_rcnn.anchor_labels(anchors, gt, height, width)
        np.testing.assert_array_equal(labels, want)


class SampleProposalsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_foreground_background_rules(self):
        rng = np.random.default_rng(3)
        gt = np.array([[50, 50, 150, 150], [200, 40, 260, 200], [0, 0, 0, 0]], np.float32)
        gt_classes = np.array([3, 7, 0], np.int32)
        gt_valid = np.array([True, True, False])
        proposals = random_boxes(rng, 400, size=300, min_side=10, max_side=150)
        fn = self.variant(functools.partial(paper_settings.sample_proposals, batch_size=64))
        result = fn(jax.random.key(2), proposals, np.ones(400, bool), gt, gt_classes, gt_valid)
        valid = np.asarray(result.valid)
        classes = np.asarray(result.classes)
        iou = np.asarray(ops.pairwise_iou(result.rois, gt[:2])).max(axis=1)
        fg = valid & (classes > 0)
        self.assertLessEqual(fg.sum(), 16)  # 25% of 64
        self.assertTrue((iou[fg] >= 0.5).all())
        bg = valid & (classes == 0)
        self.assertTrue(((iou[bg] >= 0.1) & (iou[bg] < 0.5)).all())
        self.assertTrue(set(classes[fg].tolist()) <= {3, 7})
        # Targets decode back to the matched ground truth.
        matched = gt[np.argmax(np.asarray(ops.pairwise_iou(result.rois, gt[:2])), axis=1)]
        decoded = ops.decode_boxes(
            result.box_targets, result.rois, weights=roi_heads.HEAD_BOX_WEIGHTS
        )
        np.testing.assert_allclose(np.asarray(decoded)[fg], matched[fg], atol=1e-3)

    def test_ground_truth_is_appended_and_empty_images_give_background(self):
        gt = np.array([[10, 10, 50, 50]], np.float32)
        proposals = np.zeros((5, 4), np.float32)
        result = paper_settings.sample_proposals(
            jax.random.key(0),
            proposals,
            np.zeros(5, bool),
            gt,
            np.array([2]),
            np.array([True]),
            batch_size=8,
        )
        # No valid proposal: the appended ground truth is the one foreground RoI.
        np.testing.assert_array_equal(result.classes, [2, 0, 0, 0, 0, 0, 0, 0])
        np.testing.assert_array_equal(result.valid, [True] + [False] * 7)
        np.testing.assert_array_equal(result.rois[0], gt[0])
        proposals = random_boxes(np.random.default_rng(4), 20, size=100)
        empty = paper_settings.sample_proposals(
            jax.random.key(0),
            proposals,
            np.ones(20, bool),
            gt,
            np.array([2]),
            np.array([False]),
            batch_size=8,
        )
        np.testing.assert_array_equal(empty.valid, [True] * 8)
        np.testing.assert_array_equal(empty.classes, np.zeros(8))
        assert not np.asarray(jnp.abs(empty.box_targets)).any()


def test_batch_size_none_takes_every_labelled_candidate_deterministically():
    """The parity mode: no sampling, so the targets do not depend on the key."""
    rng = np.random.default_rng(5)
    height, width = 192, 256
    anchors = vgg_anchors(height, width)
    gt = np.array([[0, 30, 120, 150], [140, 20, 250, 190], [0, 0, 0, 0]], np.float32)
    gt_valid = np.array([True, True, False])
    every = [
        paper_settings.rpn_targets(
            key,
            anchors,
            gt,
            gt_valid,
            image_height=height,
            image_width=width,
            batch_size=None,
            allowed_border=None,
        )
        for key in (jax.random.key(0), jax.random.key(1))
    ]
    np.testing.assert_array_equal(every[0].labels, every[1].labels)
    match = ops.match_boxes(
        ops.pairwise_iou(anchors, gt),
        gt_valid,
        high_threshold=0.7,
        low_threshold=0.3,
        allow_low_quality=True,
    )
    np.testing.assert_array_equal(every[0].labels, match.labels)  # -1 only between thresholds
    assert (np.asarray(every[0].labels) == 0).sum() > 256  # more than a sample would take

    proposals = random_boxes(rng, 300, size=256, min_side=8, max_side=160)
    proposal_valid = np.arange(300) < 280  # 20 padded rows
    result = [
        paper_settings.sample_proposals(
            key,
            proposals,
            proposal_valid,
            gt,
            np.array([4, 9, 0]),
            gt_valid,
            batch_size=None,
            background_iou=(0.0, 0.5),
        )
        for key in (jax.random.key(0), jax.random.key(1))
    ]
    for field in ("rois", "classes", "valid", "box_targets"):
        np.testing.assert_array_equal(getattr(result[0], field), getattr(result[1], field))
    valid = np.asarray(result[0].valid)
    assert valid.shape == (303,)  # R = P + G
    np.testing.assert_array_equal(valid, np.concatenate([proposal_valid, gt_valid]))
    np.testing.assert_array_equal(
        np.asarray(result[0].rois)[:300][proposal_valid], proposals[proposal_valid]
    )
    np.testing.assert_array_equal(np.asarray(result[0].classes)[300:], [4, 9, 0])
