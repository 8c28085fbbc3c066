"""Pure, jittable box operations with static shapes; needs only jax and numpy.

Conventions: boxes are float32 [..., 4] (x1, y1, x2, y2) in absolute pixels (width = x2 - x1);
ops work on one image and are batched with `jax.vmap`; variable-length sets are padded to a
static size with a boolean `valid` mask. See each function for shapes and padding.
"""

from frcnn_jax.ops.anchors import anchor_grid, anchors_inside, base_anchors, legacy_base_anchors
from frcnn_jax.ops.boxes import (
    box_area,
    clip_boxes,
    cxcywh_to_xyxy,
    normalized_yxyx_to_xyxy,
    pairwise_iou,
    xyxy_to_cxcywh,
    xyxy_to_normalized_yxyx,
)
from frcnn_jax.ops.coding import decode_boxes, encode_boxes
from frcnn_jax.ops.losses import smooth_l1
from frcnn_jax.ops.matching import IGNORE, NEGATIVE, POSITIVE, MatchResult, match_boxes
from frcnn_jax.ops.nms import NMSResult, batched_nms, nms
from frcnn_jax.ops.roi import map_levels, multilevel_roi_align, roi_align, roi_pool
from frcnn_jax.ops.sampling import SampleResult, sample_balanced

__all__ = [
    "IGNORE",
    "NEGATIVE",
    "POSITIVE",
    "MatchResult",
    "NMSResult",
    "SampleResult",
    "anchor_grid",
    "anchors_inside",
    "base_anchors",
    "batched_nms",
    "box_area",
    "clip_boxes",
    "cxcywh_to_xyxy",
    "decode_boxes",
    "encode_boxes",
    "legacy_base_anchors",
    "map_levels",
    "match_boxes",
    "multilevel_roi_align",
    "nms",
    "normalized_yxyx_to_xyxy",
    "pairwise_iou",
    "roi_align",
    "roi_pool",
    "sample_balanced",
    "smooth_l1",
    "xyxy_to_cxcywh",
    "xyxy_to_normalized_yxyx",
]
