import chex
import jax
import numpy as np
import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList

from frcnn_jax import ops


def torchvision_anchors(sizes, ratios, image_hw, feature_hw):
    generator = AnchorGenerator(sizes=(tuple(sizes),), aspect_ratios=(tuple(ratios),))
    images = ImageList(torch.zeros(1, 3, *image_hw), [image_hw])
    features = [torch.zeros(1, 1, *feature_hw)]
    return generator(images, features)[0].numpy()


@pytest.mark.parametrize(
    "sizes, ratios, image_hw, feature_hw",
    [
        ((128, 256, 512), (0.5, 1.0, 2.0), (600, 1000), (38, 63)),  # paper, VGG-16 at 600 x 1000
        ((32,), (0.5, 1.0, 2.0), (800, 1344), (200, 336)),  # FPN level P2
        ((40, 70, 133), (0.3, 0.77, 1.9, 3.1), (320, 448), (20, 28)),  # odd values, rounding
        ((64,), (1.0,), (96, 160), (7, 13)),  # stride 13 x 12 (image // feature per axis)
    ],
)
def test_anchor_grid_equals_torchvision_anchor_generator(sizes, ratios, image_hw, feature_hw):
    base = ops.base_anchors(sizes=sizes, aspect_ratios=ratios)
    stride = (image_hw[0] // feature_hw[0], image_hw[1] // feature_hw[1])
    grid = jax.jit(
        lambda b: ops.anchor_grid(
            b, feature_height=feature_hw[0], feature_width=feature_hw[1], stride=stride
        )
    )(base)
    np.testing.assert_array_equal(grid, torchvision_anchors(sizes, ratios, image_hw, feature_hw))


def test_base_anchors_hand_worked():
    # Ratio-major: for each height/width ratio, every size; 0.5 -> width sqrt(2) * size.
    want = [
        [-45, -23, 45, 23],  # ratio 0.5, size 64: w = 90.5 -> +-45.25, h = 45.25 -> +-22.6
        [-91, -45, 91, 45],  # ratio 0.5, size 128
        [-32, -32, 32, 32],  # ratio 1, size 64
        [-64, -64, 64, 64],  # ratio 1, size 128
    ]
    np.testing.assert_array_equal(ops.base_anchors(sizes=(64, 128), aspect_ratios=(0.5, 1)), want)


def test_legacy_base_anchors_reproduce_py_faster_rcnn():
    # py-faster-rcnn's generate_anchors() with its defaults, as printed by the original code.
    want = [
        [-84, -40, 99, 55],
        [-176, -88, 191, 103],
        [-360, -184, 375, 199],
        [-56, -56, 71, 71],
        [-120, -120, 135, 135],
        [-248, -248, 263, 263],
        [-36, -80, 51, 95],
        [-80, -168, 95, 183],
        [-168, -344, 183, 359],
    ]
    np.testing.assert_array_equal(ops.legacy_base_anchors(), want)
    # ZF/VGG share these; a different stride scales the reference box.
    np.testing.assert_array_equal(
        ops.legacy_base_anchors(base_size=8, ratios=(1,), scales=(2,)), [[-4, -4, 11, 11]]
    )


class AnchorGridTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_order_is_location_major(self):
        base = np.array([[-1, -1, 1, 1], [-2, -2, 2, 2]], np.float32)
        grid = self.variant(
            lambda b: ops.anchor_grid(b, feature_height=2, feature_width=3, stride=10)
        )(base)
        chex.assert_shape(grid, (2 * 3 * 2, 4))
        np.testing.assert_array_equal(grid[0], [-1, -1, 1, 1])  # (y0, x0), anchor 0
        np.testing.assert_array_equal(grid[1], [-2, -2, 2, 2])  # (y0, x0), anchor 1
        np.testing.assert_array_equal(grid[2], [9, -1, 11, 1])  # (y0, x1), anchor 0
        np.testing.assert_array_equal(grid[6], [-1, 9, 1, 11])  # (y1, x0), anchor 0
        np.testing.assert_array_equal(grid[11], [18, 8, 22, 12])  # (y1, x2), anchor 1

    @chex.variants(with_jit=True, without_jit=True)
    def test_anchors_inside(self):
        anchors = np.array(
            [
                [0, 0, 100, 50],  # exactly the image: inside
                [-1, 0, 10, 10],  # one pixel out on the left
                [90, 40, 100.5, 50],  # half a pixel out on the right
                [10, 10, 20, 20],  # well inside
            ],
            np.float32,
        )
        inside = self.variant(lambda a: ops.anchors_inside(a, height=50, width=100))(anchors)
        np.testing.assert_array_equal(inside, [True, False, False, True])
        loose = ops.anchors_inside(anchors, height=50, width=100, allowed_border=1)
        np.testing.assert_array_equal(loose, [True, True, True, True])


def test_base_anchors_reject_bad_arguments():
    with pytest.raises(ValueError, match="positive"):
        ops.base_anchors(sizes=(128, -1), aspect_ratios=(1.0,))
    with pytest.raises(ValueError, match="non-empty"):
        ops.base_anchors(sizes=(), aspect_ratios=(1.0,))
    with pytest.raises(ValueError, match=r"base .*\(3, 3\)"):
        ops.anchor_grid(np.zeros((3, 3)), feature_height=2, feature_width=2, stride=16)
