import numpy as np
import pytest

from frcnn_jax.data import shapes


def test_same_seed_same_bytes_and_splits_differ():
    a = shapes.render(3, "train", 7, image_size=(128, 160))
    b = shapes.render(3, "train", 7, image_size=(128, 160))
    for key in a:
        assert a[key].tobytes() == b[key].tobytes(), key
    other_split = shapes.render(3, "test", 7, image_size=(128, 160))
    other_seed = shapes.render(4, "train", 7, image_size=(128, 160))
    assert other_split["image"].tobytes() != a["image"].tobytes()
    assert other_seed["image"].tobytes() != a["image"].tobytes()
    assert a["image"].shape == (128, 160, 3) and a["image"].dtype == np.uint8


def test_difficulty_as_specified():
    """Statistics over many images: the properties the data issue fixes."""
    sides, ratios, counts, labels = [], [], [], []
    for index in range(120):
        ex = shapes.render(0, "train", index)
        boxes = ex["boxes"]
        w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        assert np.all(w > 0) and np.all(h > 0)
        assert (
            np.all(boxes[:, :2] >= 0) and np.all(boxes[:, 2] <= 512) and np.all(boxes[:, 3] <= 512)
        )
        full = ~ex["difficult"]
        sides.extend(np.maximum(w, h)[full])
        ratios.extend((w / h)[full])
        counts.append(len(boxes))
        labels.extend(ex["labels"])
    sides, ratios = np.array(sides), np.array(ratios)
    assert max(counts) <= shapes.MAX_OBJECTS and min(counts) == 0
    assert 2.5 < np.mean(counts) < 5.0
    assert np.percentile(sides, 5) < 24 and np.percentile(sides, 95) > 180 and sides.max() <= 301
    assert ratios.min() < 0.45 and ratios.max() > 2.2  # 1:3 .. 3:1 (visible part)
    assert set(labels) == set(range(len(shapes.CLASS_NAMES)))


def test_boxes_are_the_visible_part():
    def rect(x1, y1, x2, y2):
        m = np.zeros((40, 40), bool)
        m[y1:y2, x1:x2] = True
        return m

    masks = [
        rect(0, 0, 20, 20),  # bottom: its right half is covered by the next one
        rect(10, 0, 30, 20),  # middle: fully visible except where nothing covers it
        rect(0, 30, 10, 40),  # mostly covered by the next one -> difficult
        rect(0, 30, 10, 38),  # top
        rect(35, 35, 37, 37),  # 4 pixels: too small to label
    ]
    totals = [m.sum() for m in masks]
    boxes, labelled, difficult = shapes.visible_boxes(masks, totals)
    np.testing.assert_array_equal(labelled, [True, True, True, True, False])
    np.testing.assert_array_equal(
        boxes, [[0, 0, 10, 20], [10, 0, 30, 20], [0, 38, 10, 40], [0, 30, 10, 38]]
    )
    np.testing.assert_array_equal(difficult, [False, False, True, False])
    # an object partly outside the frame: its total counts the hidden part
    _, _, difficult = shapes.visible_boxes([rect(0, 0, 10, 10)], [400])
    assert difficult.tolist() == [True]
    assert shapes.visible_boxes([], [])[0].shape == (0, 4)


def test_bad_split_is_reported():
    with pytest.raises(ValueError, match="split must be one of"):
        shapes.render(0, "val", 0)
