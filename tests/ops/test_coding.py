import math

import chex
import numpy as np
import torch
from torchvision.models.detection._utils import BoxCoder

from frcnn_jax import ops
from tests.ops.helpers import random_boxes

RPN_WEIGHTS = (1.0, 1.0, 1.0, 1.0)
HEAD_WEIGHTS = (10.0, 10.0, 5.0, 5.0)


class BoxCodingTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_hand_worked(self):
        anchors = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10]], np.float32)
        boxes = np.array(
            [
                [5, 5, 15, 15],  # shifted by half a side: dx = dy = 0.5, same size
                [0, 0, 10, 10],  # identical: all zero
                [-5, 0, 15, 10],  # twice as wide, same centre: dw = log 2
            ],
            np.float32,
        )
        encode = self.variant(lambda b, a: ops.encode_boxes(b, a, weights=HEAD_WEIGHTS))
        want = [[5, 5, 0, 0], [0, 0, 0, 0], [0, 0, 5 * math.log(2), 0]]
        np.testing.assert_allclose(encode(boxes, anchors), want, rtol=1e-6, atol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_round_trip(self):
        rng = np.random.default_rng(0)
        boxes, anchors = random_boxes(rng, 100), random_boxes(rng, 100)
        for weights in (RPN_WEIGHTS, HEAD_WEIGHTS):
            deltas = ops.encode_boxes(boxes, anchors, weights=weights)
            decode = self.variant(lambda d, a, w=weights: ops.decode_boxes(d, a, weights=w))
            np.testing.assert_allclose(decode(deltas, anchors), boxes, rtol=1e-4, atol=1e-3)

    def test_matches_torchvision_box_coder(self):
        rng = np.random.default_rng(1)
        boxes, anchors = random_boxes(rng, 500), random_boxes(rng, 500)
        deltas = rng.normal(0, 1.0, (500, 4)).astype(np.float32)
        for weights in (RPN_WEIGHTS, HEAD_WEIGHTS):
            coder = BoxCoder(weights)
            want_enc = coder.encode_single(torch.from_numpy(boxes), torch.from_numpy(anchors))
            got_enc = ops.encode_boxes(boxes, anchors, weights=weights)
            np.testing.assert_allclose(got_enc, want_enc.numpy(), rtol=1e-5, atol=1e-6)
            want_dec = coder.decode_single(torch.from_numpy(deltas), torch.from_numpy(anchors))
            got_dec = ops.decode_boxes(deltas, anchors, weights=weights)
            np.testing.assert_allclose(got_dec, want_dec.numpy(), rtol=1e-5, atol=1e-4)

    def test_class_specific_deltas_broadcast_like_torchvision(self):
        rng = np.random.default_rng(2)
        proposals = random_boxes(rng, 20)
        deltas = rng.normal(0, 1.0, (20, 5, 4)).astype(np.float32)  # [P, K, 4]
        got = ops.decode_boxes(deltas, proposals[:, None, :], weights=HEAD_WEIGHTS)
        coder = BoxCoder(HEAD_WEIGHTS)
        # torchvision decodes [P, K * 4] codes against [P, 4] boxes.
        want = coder.decode_single(
            torch.from_numpy(deltas.reshape(20, 20)), torch.from_numpy(proposals)
        )
        np.testing.assert_allclose(got, want.numpy().reshape(20, 5, 4), rtol=1e-5, atol=1e-4)

    def test_scale_is_clamped_before_exp(self):
        anchors = np.array([[0, 0, 16, 16]], np.float32)
        huge = np.array([[0, 0, 100.0, 100.0]], np.float32)
        box = ops.decode_boxes(huge, anchors)
        # exp(log(1000 / 16)) * 16 = 1000 pixels, centred on the anchor's centre (8, 8).
        np.testing.assert_allclose(box, [[8 - 500, 8 - 500, 8 + 500, 8 + 500]], rtol=1e-5)
        small = ops.decode_boxes(huge, anchors, max_log_scale=0.0)
        np.testing.assert_allclose(small, anchors, rtol=1e-6)

    def test_degenerate_boxes_stay_finite(self):
        anchors = np.array([[0, 0, 16, 16], [3, 3, 3, 3]], np.float32)
        padded = np.zeros((2, 4), np.float32)  # padded ground truth rows, zero-area anchor
        assert np.isfinite(np.asarray(ops.encode_boxes(padded, anchors))).all()

    def test_bad_shapes(self):
        with self.assertRaisesRegex(ValueError, r"anchors .*\(3, 5\)"):
            ops.encode_boxes(np.zeros((3, 4)), np.zeros((3, 5)))
        with self.assertRaisesRegex(ValueError, r"deltas .*\(3, 8\)"):
            ops.decode_boxes(np.zeros((3, 8)), np.zeros((3, 4)))
