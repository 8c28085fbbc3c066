"""Box geometry: areas, IoU, clipping and format conversions.

Boxes are float32 `[..., 4]` as (x1, y1, x2, y2) in absolute pixels of the resized image, continuous
(width = x2 - x1, no "+1"), as in torchvision and pycocotools. A box with x2 < x1 or y2 < y1
("inverted") is treated as empty: its area is 0 and it overlaps nothing.
"""

import jax.numpy as jnp

from frcnn_jax.ops._checks import check_boxes


def box_area(boxes):
    """Area of each box.

    Args:
      boxes: float [..., 4] (x1, y1, x2, y2).

    Returns:
      float [...]: (x2 - x1) * (y2 - y1), with negative sides clamped to 0, so zero-area and
      inverted boxes (and all-zero padded rows) have area 0. torchvision's `box_area` returns a
      negative area for inverted boxes; for every proper box the two agree exactly.
    """
    check_boxes("boxes", boxes)
    boxes = jnp.asarray(boxes)
    width = jnp.maximum(boxes[..., 2] - boxes[..., 0], 0)
    height = jnp.maximum(boxes[..., 3] - boxes[..., 1], 0)
    return width * height


def intersection_and_union(boxes1, boxes2):
    """Intersection and union areas of aligned boxes (broadcasting over leading dimensions).

    Args:
      boxes1: float [..., 4] (x1, y1, x2, y2).
      boxes2: float [..., 4], broadcastable against `boxes1`.

    Returns:
      (intersection, union), each float of the broadcast leading shape.
    """
    return overlap_from_coords(
        unstack_coords(boxes1), box_area(boxes1), unstack_coords(boxes2), box_area(boxes2)
    )


def unstack_coords(boxes):
    """(x1, y1, x2, y2) as four arrays of shape [...] from float [..., 4] boxes."""
    return tuple(boxes[..., i] for i in range(4))


def overlap_from_coords(coords1, area1, coords2, area2):
    """Intersection and union from unstacked coordinates and areas (`box_area`), broadcasting.

    The core of every IoU here. Taking one array per coordinate (rather than [..., 4]) lets XLA
    vectorize a [N, M] block over contiguous rows; NMS keeps its boxes in this layout.
    """
    x1a, y1a, x2a, y2a = coords1
    x1b, y1b, x2b, y2b = coords2
    width = jnp.maximum(jnp.minimum(x2a, x2b) - jnp.maximum(x1a, x1b), 0)
    height = jnp.maximum(jnp.minimum(y2a, y2b) - jnp.maximum(y1a, y1b), 0)
    intersection = width * height
    # Same operation order as torchvision's `_box_inter_union`, so IoU values agree bit for bit.
    union = area1 + area2 - intersection
    return intersection, union


def safe_iou(intersection, union):
    """inter / union, defined as 0 where the union is empty (two empty boxes), never NaN."""
    positive = union > 0
    return jnp.where(positive, intersection / jnp.where(positive, union, 1), 0)


def pairwise_iou(boxes1, boxes2):
    """Intersection over union of every pair of boxes.

    Args:
      boxes1: float32 [N, 4] (x1, y1, x2, y2).
      boxes2: float32 [M, 4] (x1, y1, x2, y2).

    Returns:
      float32 [N, M]. Pairs whose union is empty (both boxes empty) have IoU 0, where torchvision's
      `box_iou` gives NaN; everywhere else the values equal torchvision's.
    """
    check_boxes("boxes1", boxes1, rank=2)
    check_boxes("boxes2", boxes2, rank=2)
    boxes1 = jnp.asarray(boxes1, jnp.float32)
    boxes2 = jnp.asarray(boxes2, jnp.float32)
    intersection, union = intersection_and_union(boxes1[:, None, :], boxes2[None, :, :])
    return safe_iou(intersection, union)  # [N, M]


def clip_boxes(boxes, *, height, width):
    """Clips boxes to the image rectangle [0, width] x [0, height].

    Args:
      boxes: float [..., 4] (x1, y1, x2, y2).
      height, width: image size in pixels; Python numbers or (traced) scalars, e.g. the true,
        unpadded size from `image_info`, or arrays broadcastable to `boxes.shape[:-1]`.

    Returns:
      float [..., 4], same dtype as `boxes`; torchvision's `clip_boxes_to_image` semantics.
    """
    check_boxes("boxes", boxes)
    boxes = jnp.asarray(boxes)
    height = jnp.asarray(height, boxes.dtype)[..., None]
    width = jnp.asarray(width, boxes.dtype)[..., None]
    xs = jnp.clip(boxes[..., 0::2], 0, width)
    ys = jnp.clip(boxes[..., 1::2], 0, height)
    return jnp.stack([xs[..., 0], ys[..., 0], xs[..., 1], ys[..., 1]], axis=-1)


def xyxy_to_cxcywh(boxes):
    """(x1, y1, x2, y2) -> (center x, center y, width, height); float [..., 4] -> [..., 4]."""
    check_boxes("boxes", boxes)
    boxes = jnp.asarray(boxes)
    wh = boxes[..., 2:] - boxes[..., :2]
    return jnp.concatenate([boxes[..., :2] + 0.5 * wh, wh], axis=-1)


def cxcywh_to_xyxy(boxes):
    """(center x, center y, width, height) -> (x1, y1, x2, y2); float [..., 4] -> [..., 4]."""
    check_boxes("boxes", boxes)
    boxes = jnp.asarray(boxes)
    half = 0.5 * boxes[..., 2:]
    return jnp.concatenate([boxes[..., :2] - half, boxes[..., :2] + half], axis=-1)


def normalized_yxyx_to_xyxy(boxes, *, height, width):
    """TFDS boxes -> pixel boxes.

    Args:
      boxes: float [..., 4] (ymin, xmin, ymax, xmax) normalized to [0, 1] by the image size, the
        order `tfds.features.BBoxFeature` uses.
      height, width: the image size in pixels the result should be expressed in.

    Returns:
      float32 [..., 4] (x1, y1, x2, y2) in pixels.
    """
    check_boxes("boxes", boxes)
    boxes = jnp.asarray(boxes, jnp.float32)
    height = jnp.asarray(height, jnp.float32)[..., None]
    width = jnp.asarray(width, jnp.float32)[..., None]
    ys = boxes[..., 0::2] * height
    xs = boxes[..., 1::2] * width
    return jnp.stack([xs[..., 0], ys[..., 0], xs[..., 1], ys[..., 1]], axis=-1)


def xyxy_to_normalized_yxyx(boxes, *, height, width):
    """Pixel boxes -> TFDS boxes; the inverse of `normalized_yxyx_to_xyxy`.

    Args:
      boxes: float [..., 4] (x1, y1, x2, y2) in pixels.
      height, width: the image size in pixels the boxes are expressed in.

    Returns:
      float32 [..., 4] (ymin, xmin, ymax, xmax) divided by the image size.
    """
    check_boxes("boxes", boxes)
    boxes = jnp.asarray(boxes, jnp.float32)
    height = jnp.asarray(height, jnp.float32)[..., None]
    width = jnp.asarray(width, jnp.float32)[..., None]
    xs = boxes[..., 0::2] / width
    ys = boxes[..., 1::2] / height
    return jnp.stack([ys[..., 0], xs[..., 0], ys[..., 1], xs[..., 1]], axis=-1)
