"""Per-example preprocessing to static shapes (NumPy, runs in the loader's workers).

decode -> resize (short side to `min_size`, long side <= `max_size`, and the result must fit the
canvas of the image's orientation) -> optional horizontal flip -> pad bottom/right to the
canvas; boxes converted once from TFDS's normalized (ymin, xmin, ymax, xmax) to absolute
(x1, y1, x2, y2) in the resized frame and padded to `max_boxes` with `valid` and `difficult`
masks.
"""

import numpy as np
from PIL import Image

from frcnn_jax.canvas import canvas_for, resize_scale, resized_size


def boxes_to_pixels(normalized_yxyx, height, width):
    """float [N, 4] normalized (ymin, xmin, ymax, xmax) -> (x1, y1, x2, y2) pixels."""
    b = np.asarray(normalized_yxyx, np.float32).reshape(-1, 4)
    return np.stack([b[:, 1] * width, b[:, 0] * height, b[:, 3] * width, b[:, 2] * height], axis=1)


def flip_boxes(boxes, width):
    """Mirror (x1, y1, x2, y2) boxes in an image of `width`: applying it twice is the identity."""
    boxes = np.asarray(boxes, np.float32)
    return np.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], axis=1)


def preprocess(
    image,
    boxes,
    labels,
    difficult,
    *,
    min_size,
    max_size,
    canvas,
    max_boxes,
    flip=False,
    exclude_difficult=False,
    orient=True,
):
    """One example to fixed shapes.

    Args:
      image: uint8 [h, w, 3] RGB.
      boxes: float [N, 4] (x1, y1, x2, y2) pixels of `image`; labels: int [N] in 1..K;
        difficult: bool [N].
      min_size, max_size: 600 / 1000 in the paper; canvas: (H, W) static output size, used
        transposed for images of the other orientation when `orient` (see `canvas_for`).
      max_boxes: G; boxes beyond it are dropped (the count is returned).
      flip: mirror image and boxes horizontally.
      exclude_difficult: mark difficult boxes not `gt_valid` (training targets skip them).

    Returns:
      (dict with image uint8 [H, W, 3] (zero padded), image_size int32 [2] (resized h, w),
      original_size int32 [2], scale float32 [], gt_boxes float32 [G, 4], gt_classes int32 [G],
      gt_valid bool [G], gt_difficult bool [G]; number of boxes dropped by `max_boxes`).
    """
    height, width = image.shape[:2]
    canvas = canvas_for(height, width, canvas, orient=orient)
    scale = resize_scale(height, width, min_size=min_size, max_size=max_size, canvas=canvas)
    new_h, new_w = resized_size(height, width, scale)
    if (new_h, new_w) != (height, width):
        image = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4) * np.float32(scale)
    boxes = np.minimum(boxes, np.array([new_w, new_h, new_w, new_h], np.float32))
    if flip:
        image = image[:, ::-1]
        boxes = flip_boxes(boxes, new_w)
    out = np.zeros((*canvas, 3), np.uint8)
    out[:new_h, :new_w] = image

    n = min(len(boxes), max_boxes)
    gt_boxes = np.zeros((max_boxes, 4), np.float32)
    gt_classes = np.zeros(max_boxes, np.int32)
    gt_difficult = np.zeros(max_boxes, bool)
    gt_boxes[:n] = boxes[:n]
    gt_classes[:n] = np.asarray(labels)[:n]
    gt_difficult[:n] = np.asarray(difficult, bool)[:n]
    gt_valid = np.arange(max_boxes) < n
    if exclude_difficult:
        gt_valid &= ~gt_difficult
    return {
        "image": out,
        "image_size": np.array([new_h, new_w], np.int32),
        "original_size": np.array([height, width], np.int32),
        "scale": np.float32(scale),
        "gt_boxes": gt_boxes,
        "gt_classes": gt_classes,
        "gt_valid": gt_valid,
        "gt_difficult": gt_difficult,
    }, len(boxes) - n
