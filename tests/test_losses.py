import chex
import jax
import numpy as np
import torch
import torch.nn.functional as F
from torchvision.models.detection.roi_heads import fastrcnn_loss

from frcnn_jax import losses, targets


def test_smooth_l1_hand_worked():
    x = np.array([-2.0, -0.05, 0.0, 0.05, 0.5, 3.0], np.float32)
    # beta = 0.1: quadratic 0.5 x^2 / 0.1 inside |x| < 0.1, linear |x| - 0.05 outside.
    want = [1.95, 0.0125, 0.0, 0.0125, 0.45, 2.95]
    np.testing.assert_allclose(losses.smooth_l1(x, beta=0.1), want, rtol=1e-6)
    np.testing.assert_allclose(losses.smooth_l1(x, beta=0.0), np.abs(x))
    np.testing.assert_allclose(
        losses.smooth_l1(x, beta=0.1),
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
    got = losses.rpn_loss(logits, deltas, targets.RPNTargets(labels, box_targets))
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
    got2 = losses.rpn_loss(two_way, deltas, targets.RPNTargets(labels, box_targets))
    np.testing.assert_allclose(got2["rpn_objectness"], want_cls.item(), rtol=1e-5)


def test_fast_rcnn_loss_equals_torchvision():
    rng = np.random.default_rng(1)
    num, classes = 64, 5
    labels = rng.integers(0, classes + 1, num).astype(np.int32)
    logits = rng.normal(size=(num, classes + 1)).astype(np.float32)
    deltas = rng.normal(size=(num, classes + 1, 4)).astype(np.float32)
    box_targets = rng.normal(size=(num, 4)).astype(np.float32)
    roi_targets = targets.RoITargets(
        rois=np.zeros((num, 4), np.float32),
        classes=labels,
        box_targets=np.where((labels > 0)[:, None], box_targets, 0),
        valid=np.ones(num, bool),
    )
    got = losses.fast_rcnn_loss(logits, deltas, roi_targets, beta=1 / 9)
    want_cls, want_box = fastrcnn_loss(
        torch.from_numpy(logits),
        torch.from_numpy(deltas.reshape(num, -1)),
        [torch.from_numpy(labels).long()],
        [torch.from_numpy(box_targets)],
    )
    np.testing.assert_allclose(got["fast_rcnn_class"], want_cls.item(), rtol=1e-5)
    np.testing.assert_allclose(got["fast_rcnn_box"], want_box.item(), rtol=1e-5)
    # Deltas for classes 1..K only ([R, K, 4]) give the same loss.
    got_k = losses.fast_rcnn_loss(logits, deltas[:, 1:], roi_targets, beta=1 / 9)
    np.testing.assert_allclose(got_k["fast_rcnn_box"], want_box.item(), rtol=1e-5)


class DegenerateLossTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_nothing_sampled_gives_zero_and_finite_gradients(self):
        num = 10
        rpn = targets.RPNTargets(np.full(num, -1, np.int32), np.zeros((num, 4), np.float32))
        roi = targets.RoITargets(
            np.zeros((num, 4), np.float32),
            np.zeros(num, np.int32),
            np.zeros((num, 4), np.float32),
            np.zeros(num, bool),
        )

        def total(logits, deltas, class_logits, box_deltas):
            return losses.total_loss(
                {
                    **losses.rpn_loss(logits, deltas, rpn),
                    **losses.fast_rcnn_loss(class_logits, box_deltas, roi),
                }
            )

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
