import chex
import jax
import jax.numpy as jnp
import numpy as np
import torch
import torchvision

from frcnn_jax import ops
from tests.ops import numpy_reference
from tests.ops.helpers import random_boxes


class BoxAreaTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_hand_worked(self):
        boxes = np.array(
            [
                [0, 0, 10, 20],  # 10 x 20
                [5, 5, 5, 9],  # zero width
                [10, 10, 0, 0],  # inverted: empty
                [0, 0, 0, 0],  # padding row
                [1.5, 2.0, 2.0, 4.0],  # fractional, continuous convention: 0.5 x 2
            ],
            np.float32,
        )
        np.testing.assert_array_equal(self.variant(ops.box_area)(boxes), [200, 0, 0, 0, 1.0])

    def test_matches_torchvision_on_proper_boxes(self):
        boxes = random_boxes(np.random.default_rng(1), 50)
        want = torchvision.ops.box_area(torch.from_numpy(boxes)).numpy()
        np.testing.assert_array_equal(ops.box_area(boxes), want)


class PairwiseIouTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_hand_worked(self):
        boxes1 = np.array([[0, 0, 10, 10]], np.float32)
        boxes2 = np.array(
            [
                [0, 0, 10, 10],  # identical: 1
                [5, 0, 15, 10],  # half overlap: 50 / 150
                [10, 0, 20, 10],  # touching edge: 0
                [20, 20, 30, 30],  # disjoint: 0
                [2, 2, 4, 4],  # contained: 4 / 100
                [5, 5, 5, 5],  # zero area inside: 0
                [8, 8, 2, 2],  # inverted: 0
            ],
            np.float32,
        )
        want = [[1.0, 1 / 3, 0, 0, 0.04, 0, 0]]
        np.testing.assert_allclose(self.variant(ops.pairwise_iou)(boxes1, boxes2), want, rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_empty_boxes_give_zero_not_nan(self):
        zero = np.zeros((3, 4), np.float32)
        iou = self.variant(ops.pairwise_iou)(zero, zero)
        np.testing.assert_array_equal(iou, np.zeros((3, 3)))

    @chex.variants(with_jit=True, without_jit=True)
    def test_empty_inputs(self):
        iou = self.variant(ops.pairwise_iou)(np.zeros((0, 4)), np.ones((5, 4)))
        chex.assert_shape(iou, (0, 5))

    def test_matches_numpy_reference(self):
        rng = np.random.default_rng(2)
        boxes1 = random_boxes(rng, 30, size=100, max_side=60)
        boxes2 = np.concatenate([random_boxes(rng, 20, size=100, max_side=60), boxes1[:5]])
        np.testing.assert_allclose(
            ops.pairwise_iou(boxes1, boxes2),
            numpy_reference.pairwise_iou(boxes1, boxes2),
            rtol=1e-6,
            atol=1e-7,
        )

    def test_matches_torchvision_bit_for_bit(self):
        rng = np.random.default_rng(3)
        boxes1 = random_boxes(rng, 200, size=500, max_side=200)
        boxes2 = random_boxes(rng, 100, size=500, max_side=200)
        want = torchvision.ops.box_iou(torch.from_numpy(boxes1), torch.from_numpy(boxes2))
        np.testing.assert_array_equal(ops.pairwise_iou(boxes1, boxes2), want.numpy())

    def test_vmap_over_images(self):
        rng = np.random.default_rng(4)
        boxes1 = np.stack([random_boxes(rng, 7), random_boxes(rng, 7)])
        boxes2 = np.stack([random_boxes(rng, 3), random_boxes(rng, 3)])
        batched = jax.vmap(ops.pairwise_iou)(boxes1, boxes2)
        for b in range(2):
            np.testing.assert_array_equal(batched[b], ops.pairwise_iou(boxes1[b], boxes2[b]))


class ClipAndConvertTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_clip_hand_worked_with_traced_size(self):
        boxes = np.array([[-5, -5, 50, 70], [10, 10, 20, 20], [90, 5, 120, 10]], np.float32)
        clipped = self.variant(lambda b, h, w: ops.clip_boxes(b, height=h, width=w))(
            boxes, jnp.float32(60), jnp.float32(100)
        )
        want = [[0, 0, 50, 60], [10, 10, 20, 20], [90, 5, 100, 10]]
        np.testing.assert_array_equal(clipped, want)

    def test_clip_matches_torchvision(self):
        boxes = random_boxes(np.random.default_rng(5), 100, size=700, max_side=400) - 50
        want = torchvision.ops.clip_boxes_to_image(torch.from_numpy(boxes), (480, 640))
        np.testing.assert_array_equal(ops.clip_boxes(boxes, height=480, width=640), want.numpy())

    def test_clip_per_image_sizes_under_vmap(self):
        boxes = np.full((2, 1, 4), [-1, -1, 500, 500], np.float32)
        clipped = jax.vmap(lambda b, h, w: ops.clip_boxes(b, height=h, width=w))(
            boxes, jnp.array([100.0, 200.0]), jnp.array([300.0, 400.0])
        )
        np.testing.assert_array_equal(clipped[:, 0], [[0, 0, 300, 100], [0, 0, 400, 200]])

    @chex.variants(with_jit=True, without_jit=True)
    def test_cxcywh_hand_worked_and_round_trip(self):
        boxes = np.array([[0, 0, 10, 20], [5, 5, 5, 5]], np.float32)
        cxcywh = self.variant(ops.xyxy_to_cxcywh)(boxes)
        np.testing.assert_array_equal(cxcywh, [[5, 10, 10, 20], [5, 5, 0, 0]])
        np.testing.assert_array_equal(self.variant(ops.cxcywh_to_xyxy)(cxcywh), boxes)

    def test_cxcywh_matches_torchvision(self):
        boxes = random_boxes(np.random.default_rng(6), 50)
        want = torchvision.ops.box_convert(torch.from_numpy(boxes), "xyxy", "cxcywh").numpy()
        np.testing.assert_allclose(ops.xyxy_to_cxcywh(boxes), want, rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_normalized_yxyx_hand_worked_and_round_trip(self):
        # A TFDS box (ymin, xmin, ymax, xmax) on a 200 (h) x 400 (w) image.
        tfds_box = np.array([[0.25, 0.5, 0.75, 1.0]], np.float32)
        to_xyxy = self.variant(lambda b: ops.normalized_yxyx_to_xyxy(b, height=200, width=400))
        xyxy = to_xyxy(tfds_box)
        np.testing.assert_array_equal(xyxy, [[200, 50, 400, 150]])
        back = ops.xyxy_to_normalized_yxyx(xyxy, height=200, width=400)
        np.testing.assert_array_equal(back, tfds_box)


class BadInputTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_wrong_last_dimension_names_argument_and_shape(self):
        with self.assertRaisesRegex(ValueError, r"boxes2 .*last dimension of 4.*\(5, 3\)"):
            self.variant(ops.pairwise_iou)(np.zeros((2, 4)), np.zeros((5, 3)))

    @chex.variants(with_jit=True, without_jit=True)
    def test_wrong_rank_names_argument_and_shape(self):
        with self.assertRaisesRegex(ValueError, r"boxes1 must have shape \[N, 4\].*\(2, 2, 4\)"):
            self.variant(ops.pairwise_iou)(np.zeros((2, 2, 4)), np.zeros((5, 4)))

    def test_elementwise_ops_check_last_dimension(self):
        for fn in (ops.box_area, ops.xyxy_to_cxcywh, ops.cxcywh_to_xyxy):
            with self.assertRaisesRegex(ValueError, r"boxes .*\(7, 5\)"):
                fn(np.zeros((7, 5)))
        with self.assertRaisesRegex(ValueError, r"boxes .*\(3,\)"):
            ops.clip_boxes(np.zeros(3), height=1, width=1)
