import chex
import jax
import numpy as np
import torch
import torch.nn.functional as F
from torchvision.models.detection.roi_heads import fastrcnn_loss

from frcnn_jax import ops
from frcnn_jax.models import roi_heads, rpn


def test_smooth_l1_hand_worked():
    x = np.array([-2.0, -0.05, 0.0, 0.05, 0.5, 3.0], np.float32)
    # beta = 0.1: quadratic 0.5 x^2 / 0.1 inside |x| < 0.1, linear |x| - 0.05 outside.
    want = [1.95, 0.0125, 0.0, 0.0125, 0.45, 2.95]
    np.testing.assert_allclose(ops.smooth_l1(x, beta=0.1), want, rtol=1e-6)
    np.testing.assert_allclose(ops.smooth_l1(x, beta=0.0), np.abs(x))
    np.testing.assert_allclose(
        ops.smooth_l1(x, beta=0.1),
        F.smooth_l1_loss(torch.from_numpy(x), torch.zeros(6), beta=0.1, reduction="none").numpy(),
        rtol=1e-6,
    )


def test_rpn_loss_equals_torchvision_computation():
    rng = np.random.default_rng(0)
    num = 500
    labels = rng.choice([-1, 0, 1], num, p=[0.5, 0.4, 0.1]).astype(np.int32)
    logits = rng.normal(size=num).astype(np.float32)
    deltas = rng.normal(size=(num, 4)).astype(np.float32)
    box_targets = np.where((labels == 1)[:, None], rng.normal(size=(num, 4)), 0).astype(np.float32)
    tv = dict(box_weight=1.0, box_normalizer=None, beta=1 / 9)  # torchvision's settings
    got = rpn.rpn_loss(logits, deltas, rpn.RPNTargets(labels, box_targets), **tv)
    # torchvision's RegionProposalNetwork.compute_loss on the same sampled anchors.
    sampled = labels >= 0
    positive = labels == 1
    want_box = (
        F.smooth_l1_loss(
            torch.from_numpy(deltas[positive]),
            torch.from_numpy(box_targets[positive]),
            beta=1 / 9,
            reduction="sum",
        )
        / sampled.sum()
    )
    want_cls = F.binary_cross_entropy_with_logits(
        torch.from_numpy(logits[sampled]), torch.from_numpy(positive[sampled].astype(np.float32))
    )
    np.testing.assert_allclose(got["rpn_box"], want_box.item(), rtol=1e-5)
    np.testing.assert_allclose(got["rpn_objectness"], want_cls.item(), rtol=1e-5)
    # The paper's 2-way softmax head: logits (0, l) give the same loss as a sigmoid of l.
    two_way = np.stack([np.zeros(num, np.float32), logits], -1)
    got2 = rpn.rpn_loss(two_way, deltas, rpn.RPNTargets(labels, box_targets), **tv)
    np.testing.assert_allclose(got2["rpn_objectness"], want_cls.item(), rtol=1e-5)


def test_fast_rcnn_loss_equals_torchvision():
    rng = np.random.default_rng(1)
    num, classes = 64, 5
    labels = rng.integers(0, classes + 1, num).astype(np.int32)
    logits = rng.normal(size=(num, classes + 1)).astype(np.float32)
    deltas = rng.normal(size=(num, classes + 1, 4)).astype(np.float32)
    box_targets = rng.normal(size=(num, 4)).astype(np.float32)
    roi_targets = roi_heads.RoITargets(
        rois=np.zeros((num, 4), np.float32),
        classes=labels,
        box_targets=np.where((labels > 0)[:, None], box_targets, 0),
        valid=np.ones(num, bool),
    )
    got = roi_heads.fast_rcnn_loss(logits, deltas, roi_targets, beta=1 / 9)
    want_cls, want_box = fastrcnn_loss(
        torch.from_numpy(logits),
        torch.from_numpy(deltas.reshape(num, -1)),
        [torch.from_numpy(labels).long()],
        [torch.from_numpy(box_targets)],
    )
    np.testing.assert_allclose(got["fast_rcnn_class"], want_cls.item(), rtol=1e-5)
    np.testing.assert_allclose(got["fast_rcnn_box"], want_box.item(), rtol=1e-5)
    # Deltas for classes 1..K only ([R, K, 4]) give the same loss.
    got_k = roi_heads.fast_rcnn_loss(logits, deltas[:, 1:], roi_targets, beta=1 / 9)
    np.testing.assert_allclose(got_k["fast_rcnn_box"], want_box.item(), rtol=1e-5)


def test_a_batch_is_normalised_as_a_whole_as_torchvision_does():
    """Two images with different sampled counts: the losses over the batch [2, ...] are
    torchvision's `compute_loss` / `fastrcnn_loss` on the images together (one normaliser for
    the batch), not the mean of per-image losses."""
    rng = np.random.default_rng(2)
    num = 300
    labels = np.stack(
        [rng.choice([-1, 0, 1], num, p=p) for p in ([0.8, 0.15, 0.05], [0.2, 0.6, 0.2])]
    )
    labels = labels.astype(np.int32)
    logits = rng.normal(size=(2, num)).astype(np.float32)
    deltas = rng.normal(size=(2, num, 4)).astype(np.float32)
    box_targets = np.where((labels == 1)[..., None], rng.normal(size=(2, num, 4)), 0)
    box_targets = box_targets.astype(np.float32)
    got = rpn.rpn_loss(
        logits,
        deltas,
        rpn.RPNTargets(labels, box_targets),
        box_weight=1.0,
        box_normalizer=None,
        beta=1 / 9,
    )
    flat = labels.reshape(-1)
    sampled, positive = flat >= 0, flat == 1
    want_box = (
        F.smooth_l1_loss(
            torch.from_numpy(deltas.reshape(-1, 4)[positive]),
            torch.from_numpy(box_targets.reshape(-1, 4)[positive]),
            beta=1 / 9,
            reduction="sum",
        )
        / sampled.sum()
    )
    want_cls = F.binary_cross_entropy_with_logits(
        torch.from_numpy(logits.reshape(-1)[sampled]),
        torch.from_numpy(positive[sampled].astype(np.float32)),
    )
    np.testing.assert_allclose(got["rpn_box"], want_box.item(), rtol=1e-5)
    np.testing.assert_allclose(got["rpn_objectness"], want_cls.item(), rtol=1e-5)
    per_image = [
        rpn.rpn_loss(
            logits[i],
            deltas[i],
            rpn.RPNTargets(labels[i], box_targets[i]),
            box_weight=1.0,
            box_normalizer=None,
            beta=1 / 9,
        )
        for i in range(2)
    ]
    assert abs(np.mean([t["rpn_objectness"] for t in per_image]) - want_cls.item()) > 1e-3
    # The paper's N_reg is per image: 2 images divide by 2 x 2400.
    paper = rpn.rpn_loss(
        logits,
        deltas,
        rpn.RPNTargets(labels, box_targets),
        box_weight=10.0,
        box_normalizer=2400.0,
        beta=1 / 9,
    )
    np.testing.assert_allclose(
        paper["rpn_box"], 10 * want_box.item() * sampled.sum() / 4800, rtol=1e-5
    )

    classes = 4
    counts = (20, 7)  # valid RoIs per image; the rest padding
    roi_classes = rng.integers(0, classes + 1, (2, 24)).astype(np.int32)
    valid = np.arange(24)[None, :] < np.array(counts)[:, None]
    class_logits = rng.normal(size=(2, 24, classes + 1)).astype(np.float32)
    box_deltas = rng.normal(size=(2, 24, classes + 1, 4)).astype(np.float32)
    roi_box_targets = rng.normal(size=(2, 24, 4)).astype(np.float32)
    roi_targets = roi_heads.RoITargets(
        np.zeros((2, 24, 4), np.float32), roi_classes, roi_box_targets, valid
    )
    got = roi_heads.fast_rcnn_loss(class_logits, box_deltas, roi_targets, beta=1 / 9)
    want_cls, want_box = fastrcnn_loss(
        torch.from_numpy(class_logits[valid]),
        torch.from_numpy(box_deltas[valid].reshape(sum(counts), -1)),
        [torch.from_numpy(roi_classes[i][valid[i]]).long() for i in range(2)],
        [torch.from_numpy(roi_box_targets[i][valid[i]]) for i in range(2)],
    )
    np.testing.assert_allclose(got["fast_rcnn_class"], want_cls.item(), rtol=1e-5)
    np.testing.assert_allclose(got["fast_rcnn_box"], want_box.item(), rtol=1e-5)


class DegenerateLossTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_nothing_sampled_gives_zero_and_finite_gradients(self):
        num = 10
        anchor_targets = rpn.RPNTargets(np.full(num, -1, np.int32), np.zeros((num, 4), np.float32))
        roi = roi_heads.RoITargets(
            np.zeros((num, 4), np.float32),
            np.zeros(num, np.int32),
            np.zeros((num, 4), np.float32),
            np.zeros(num, bool),
        )

        def total(logits, deltas, class_logits, box_deltas):
            terms = {
                **rpn.rpn_loss(
                    logits,
                    deltas,
                    anchor_targets,
                    box_weight=10.0,
                    box_normalizer=2400.0,
                    beta=1 / 9,
                ),
                **roi_heads.fast_rcnn_loss(class_logits, box_deltas, roi, beta=1.0),
            }
            return sum(terms.values())

        args = (
            np.ones(num, np.float32),
            np.ones((num, 4), np.float32),
            np.ones((num, 3), np.float32),
            np.ones((num, 2, 4), np.float32),
        )
        value, grads = self.variant(jax.value_and_grad(total, argnums=(0, 1, 2, 3)))(*args)
        self.assertEqual(float(value), 0.0)
        for g in grads:
            self.assertTrue(np.isfinite(np.asarray(g)).all())
