import numpy as np
import pytest

from frcnn_jax import canvas as canvas_lib
from frcnn_jax.data import preprocess


@pytest.mark.parametrize(
    ("size", "canvas", "expected_scale", "expected_size"),
    [
        ((375, 500), (600, 1000), 600 / 375, (600, 800)),  # VOC landscape: short side -> 600
        ((300, 1500), (600, 1000), 1000 / 1500, (200, 1000)),  # long side capped at 1000
        ((500, 375), (600, 1000), 600 / 500, (600, 450)),  # portrait must fit the canvas height
        ((600, 1000), (600, 1000), 1.0, (600, 1000)),  # already the right size
    ],
)
def test_resize_rule(size, canvas, expected_scale, expected_size):
    scale = canvas_lib.resize_scale(*size, min_size=600, max_size=1000, canvas=canvas)
    assert scale == pytest.approx(expected_scale)
    assert canvas_lib.resized_size(*size, scale) == expected_size


def test_hand_worked_example():
    image = np.zeros((100, 200, 3), np.uint8)
    image[:, :100] = 255  # left half white
    boxes = np.array([[10, 20, 50, 60], [0, 0, 200, 100], [150, 10, 160, 90]], np.float32)
    out, dropped = preprocess.preprocess(
        image,
        boxes,
        np.array([1, 2, 3]),
        np.array([False, False, True]),
        min_size=50,
        max_size=1000,
        canvas=(64, 128),
        max_boxes=2,
        flip=True,
    )
    # scale 0.5: the image becomes 50 x 100, flipped, then padded to 64 x 128
    assert out["scale"] == 0.5 and dropped == 1
    np.testing.assert_array_equal(out["image_size"], [50, 100])
    np.testing.assert_array_equal(out["original_size"], [100, 200])
    assert out["image"].shape == (64, 128, 3)
    assert out["image"][:50, 60:100].min() == 255 and out["image"][:50, :40].max() == 0
    assert out["image"][50:].max() == 0 and out["image"][:, 100:].max() == 0  # padding
    # box [10, 20, 50, 60] * 0.5 = [5, 10, 25, 30]; flipped in width 100: [75, 10, 95, 30]
    np.testing.assert_allclose(out["gt_boxes"][0], [75, 10, 95, 30])
    np.testing.assert_allclose(out["gt_boxes"][1], [0, 0, 100, 50])
    np.testing.assert_array_equal(out["gt_classes"], [1, 2])
    np.testing.assert_array_equal(out["gt_valid"], [True, True])  # third box over max_boxes


def test_flip_twice_is_identity_and_difficult_exclusion(rng):
    xy = rng.uniform(0, 300, (20, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(1, 100, (20, 2))], 1).astype(np.float32)
    # exact on a 1/64-pixel grid (every float32 subtraction is then exact) ...
    boxes = np.round(boxes * 64) / 64
    np.testing.assert_array_equal(
        preprocess.flip_boxes(preprocess.flip_boxes(boxes, 417.0), 417.0), boxes
    )
    # ... and within float32 rounding anywhere
    any_boxes = boxes + rng.uniform(0, 1 / 64, boxes.shape).astype(np.float32)
    twice = preprocess.flip_boxes(preprocess.flip_boxes(any_boxes, 417.0), 417.0)
    np.testing.assert_allclose(twice, any_boxes, rtol=0, atol=1e-4)
    image = rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)
    difficult = np.array([True, False])
    kwargs = dict(min_size=40, max_size=60, canvas=(40, 60), max_boxes=4)
    for exclude, valid in [
        (True, [False, True, False, False]),
        (False, [True, True, False, False]),
    ]:
        out, _ = preprocess.preprocess(
            image, boxes[:2] / 10, [1, 2], difficult, exclude_difficult=exclude, **kwargs
        )
        np.testing.assert_array_equal(out["gt_valid"], valid)
        np.testing.assert_array_equal(out["gt_difficult"], [True, False, False, False])
        np.testing.assert_array_equal(out["image"], image)  # scale 1: untouched
    flipped, _ = preprocess.preprocess(
        image, boxes[:2] / 10, [1, 2], difficult, flip=True, **kwargs
    )
    np.testing.assert_array_equal(flipped["image"], image[:, ::-1])


def test_normalized_boxes_to_pixels():
    out = preprocess.boxes_to_pixels(np.array([[0.1, 0.2, 0.5, 1.0]]), 200, 100)
    np.testing.assert_allclose(out, [[20, 20, 100, 100]])
    assert preprocess.boxes_to_pixels(np.zeros((0, 4)), 5, 5).shape == (0, 4)


def test_empty_image_has_no_valid_boxes():
    out, dropped = preprocess.preprocess(
        np.zeros((10, 10, 3), np.uint8),
        np.zeros((0, 4)),
        np.zeros(0, int),
        np.zeros(0, bool),
        min_size=20,
        max_size=20,
        canvas=(20, 20),
        max_boxes=3,
    )
    assert dropped == 0 and not out["gt_valid"].any() and out["gt_boxes"].shape == (3, 4)


def test_canvas_follows_the_images_orientation():
    landscape = (600, 1000)
    assert canvas_lib.canvas_for(375, 500, landscape) == (600, 1000)
    assert canvas_lib.canvas_for(500, 375, landscape) == (1000, 600)
    assert canvas_lib.canvas_for(400, 400, landscape) == (600, 1000)  # square: as configured
    assert canvas_lib.canvas_for(500, 375, landscape, orient=False) == (600, 1000)
    assert canvas_lib.canvas_for(500, 375, (512, 512)) == (512, 512)
    assert canvas_lib.canvases(landscape) == [(600, 1000), (1000, 600)]
    assert canvas_lib.canvases((512, 512)) == [(512, 512)]
    assert canvas_lib.canvases(landscape, orient=False) == [(600, 1000)]
    portrait = canvas_lib.canvas_for(500, 375, landscape)
    scale = canvas_lib.resize_scale(500, 375, min_size=600, max_size=1000, canvas=portrait)
    assert canvas_lib.resized_size(500, 375, scale) == (800, 600)  # the paper's scale kept
