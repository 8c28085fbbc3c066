"""From head outputs to a fixed number of detections per image (static shapes)."""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from frcnn_jax import ops
from frcnn_jax.targets import HEAD_BOX_WEIGHTS


class Detections(NamedTuple):
    """boxes float32 [D, 4] (x1, y1, x2, y2) in original-image pixels; scores float32 [D];
    classes int32 [D] in 1..K; valid bool [D]. Descending score, padding (zeros) last."""

    boxes: jax.Array
    scores: jax.Array
    classes: jax.Array
    valid: jax.Array


def detect(
    class_logits,
    box_deltas,
    proposals,
    proposal_valid,
    *,
    image_height,
    image_width,
    scale=1.0,
    score_threshold=0.05,
    nms_threshold=0.3,
    max_detections=100,
    min_size=1e-2,
    pre_nms_top_n=None,
):
    """Detections of one image: torchvision's `RoIHeads.postprocess_detections` semantics.

    Softmax, class-specific decoding of every proposal, clip to the image, drop scores <=
    `score_threshold` and boxes smaller than `min_size`, NMS per class, best D overall.

    Args:
      class_logits: float [P, K + 1], background first.
      box_deltas: float [P, K, 4] or [P, K + 1, 4] (weights 10, 10, 5, 5).
      proposals: float32 [P, 4]; proposal_valid: bool [P].
      image_height, image_width: true resized image size, for clipping.
      scale: resized / original image size; boxes are divided by it at the end.
      score_threshold: 0.05 (paper and torchvision).
      nms_threshold: 0.3 in the paper, 0.5 in torchvision.
      max_detections: D.
      pre_nms_top_n: optionally keep only the best this many (class, proposal) candidates
        before NMS (static), to bound the work for many classes; exact whenever no more than
        that many pass the score threshold.

    Returns:
      `Detections` with D rows.
    """
    num_classes = class_logits.shape[-1] - 1
    probs = jax.nn.softmax(class_logits.astype(jnp.float32), axis=-1)[:, 1:]  # [P, K]
    if box_deltas.shape[1] == num_classes + 1:
        box_deltas = box_deltas[:, 1:]
    boxes = ops.decode_boxes(box_deltas, proposals[:, None, :], weights=HEAD_BOX_WEIGHTS)
    boxes = ops.clip_boxes(boxes, height=image_height, width=image_width).reshape(-1, 4)
    scores = probs.reshape(-1)
    classes = jnp.tile(jnp.arange(1, num_classes + 1, dtype=jnp.int32), proposals.shape[0])
    sides = boxes[:, 2:] - boxes[:, :2]
    valid = (
        jnp.repeat(proposal_valid, num_classes)
        & (scores > score_threshold)
        & jnp.all(sides >= min_size, axis=-1)
    )
    if pre_nms_top_n is not None and pre_nms_top_n < scores.shape[0]:
        _, top = jax.lax.top_k(jnp.where(valid, scores, -1.0), pre_nms_top_n)
        boxes, scores, classes, valid = boxes[top], scores[top], classes[top], valid[top]
    kept = ops.batched_nms(
        boxes,
        scores,
        classes,
        iou_threshold=nms_threshold,
        max_output_size=max_detections,
        valid=valid,
    )
    mask = kept.valid
    return Detections(
        boxes=jnp.where(mask[:, None], boxes[kept.indices] / scale, 0.0),
        scores=jnp.where(mask, scores[kept.indices], 0.0),
        classes=jnp.where(mask, classes[kept.indices], 0),
        valid=mask,
    )


def merge_detections(detections, *, nms_threshold, max_detections):
    """One image's detections from several test scales (image-pyramid testing) as one set:
    all of them, in original-image pixels, through class-wise NMS again, the best D kept.

    Args:
      detections: a sequence of `Detections` of one image (any numbers of rows).
      nms_threshold: the head's class NMS threshold; max_detections: D.

    Returns:
      `Detections` with D rows, descending score, padding last.
    """
    boxes, scores, classes, valid = (
        jnp.concatenate([getattr(d, name) for d in detections])
        for name in ("boxes", "scores", "classes", "valid")
    )
    kept = ops.batched_nms(boxes, scores, classes, iou_threshold=nms_threshold,
                           max_output_size=max_detections, valid=valid)  # fmt: skip
    mask = kept.valid
    return Detections(
        boxes=jnp.where(mask[:, None], boxes[kept.indices], 0.0),
        scores=jnp.where(mask, scores[kept.indices], 0.0),
        classes=jnp.where(mask, classes[kept.indices], 0),
        valid=mask,
    )
