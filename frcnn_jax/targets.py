"""Training targets and proposals for one image, composed from `frcnn_jax.ops` (static shapes).

- `generate_proposals` / `generate_multilevel_proposals`: the RPN's boxes for the next stage.
- `rpn_targets`: the paper's anchor labelling (section 3.1.2) and 1:1 sampling of 256 anchors.
- `sample_proposals`: Fast R-CNN's RoI sampling (ground truth appended, 25% foreground).

Both take `batch_size=None` for "no sampling": every labelled candidate enters the loss. That
makes a training step a deterministic function of the weights and the batch, which is what a
parity test against a reference implementation needs (torchvision's samplers take every
candidate when their batch size exceeds the candidate count); training uses sampling.

All functions work on one image; batch them with `jax.vmap`. Ground truth is padded to G slots
with a `valid` mask; padded or zero-area ground truth never makes a positive.
"""

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from frcnn_jax import ops

RPN_BOX_WEIGHTS = (1.0, 1.0, 1.0, 1.0)
HEAD_BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)  # the paper's target stds 0.1 / 0.2


class Proposals(NamedTuple):
    """boxes float32 [P, 4] (x1, y1, x2, y2) in resized-image pixels, scores float32 [P]
    (objectness logits), valid bool [P]; in descending score order, padding last."""

    boxes: jax.Array
    scores: jax.Array
    valid: jax.Array


def _take_all_or_sample(key, positive, negative, *, batch_size, positive_fraction):
    """`ops.sample_balanced`, or with `batch_size=None` every candidate in index order (R = N:
    positives and negatives valid, the rest padding)."""
    if batch_size is None:
        return ops.SampleResult(jnp.arange(positive.shape[0], dtype=jnp.int32), positive | negative)
    return ops.sample_balanced(
        key, positive, negative, num_samples=batch_size, positive_fraction=positive_fraction
    )


def _select_proposals(
    boxes, scores, levels, *, image_height, image_width, post_nms_top_n, nms_threshold, min_size
):
    """Clip, mask small boxes, NMS (per level when `levels` is given; none when
    `nms_threshold` is None), keep the best P."""
    boxes = ops.clip_boxes(boxes, height=image_height, width=image_width)
    sides = boxes[:, 2:] - boxes[:, :2]
    large_enough = jnp.all(sides >= min_size, axis=-1)  # torchvision's remove_small_boxes
    valid = large_enough & jnp.isfinite(scores)
    if nms_threshold is None:  # the best P valid boxes by score (ties: lower position first)
        count = min(post_nms_top_n, scores.shape[0])
        best = jax.lax.top_k(jnp.where(valid, scores, -jnp.inf), count)[1]
        padding = (0, post_nms_top_n - count)
        kept = ops.NMSResult(indices=jnp.pad(best, padding), valid=jnp.pad(valid[best], padding))
    elif levels is None:
        kept = ops.nms(
            boxes,
            scores,
            iou_threshold=nms_threshold,
            max_output_size=post_nms_top_n,
            valid=valid,
        )
    else:
        kept = ops.batched_nms(
            boxes,
            scores,
            levels,
            iou_threshold=nms_threshold,
            max_output_size=post_nms_top_n,
            valid=valid,
        )
    return Proposals(
        boxes=jnp.where(kept.valid[:, None], boxes[kept.indices], 0.0),
        scores=jnp.where(kept.valid, scores[kept.indices], -jnp.inf),
        valid=kept.valid,
    )


def generate_proposals(
    objectness,
    deltas,
    anchors,
    *,
    image_height,
    image_width,
    pre_nms_top_n,
    post_nms_top_n,
    nms_threshold=0.7,
    min_size=0.0,
):
    """RPN proposals from one feature level (the paper: 12000 -> NMS 0.7 -> 2000 when training,
    6000 -> 300 when testing).

    Args:
      objectness: float32 [A] objectness logits (or foreground-minus-background logits for a
        2-way softmax head, which orders anchors the same way).
      deltas: float32 [A, 4] regression deltas (weights 1, 1, 1, 1).
      anchors: float32 [A, 4] (x1, y1, x2, y2).
      image_height, image_width: the true (unpadded) resized image size; traced scalars work.
      pre_nms_top_n: anchors kept, by score, before NMS (static).
      post_nms_top_n: P, proposals returned (static).
      nms_threshold: IoU above which a lower-scoring proposal is suppressed; None: no NMS, the
        P best-scored boxes (the paper's Table 2 "no NMS" ablation).
      min_size: proposals narrower or shorter than this (resized pixels) are dropped; the paper
        uses 16 px at the original scale, torchvision 1e-3.

    Returns:
      `Proposals` with P rows. The order of operations is torchvision's `filter_proposals`
      (top-k, decode, clip, drop small, NMS, top-P); small boxes are masked, never removed.
    """
    top_scores, top = jax.lax.top_k(objectness, min(pre_nms_top_n, objectness.shape[0]))
    boxes = ops.decode_boxes(deltas[top], anchors[top], weights=RPN_BOX_WEIGHTS)
    return _select_proposals(
        boxes,
        top_scores,
        None,
        image_height=image_height,
        image_width=image_width,
        post_nms_top_n=post_nms_top_n,
        nms_threshold=nms_threshold,
        min_size=min_size,
    )


def generate_multilevel_proposals(
    objectness: Sequence,
    deltas: Sequence,
    anchors: Sequence,
    *,
    image_height,
    image_width,
    pre_nms_top_n,
    post_nms_top_n,
    nms_threshold=0.7,
    min_size=0.0,
):
    """FPN proposals: top `pre_nms_top_n` per level, NMS within each level, best P overall.

    Args: per-level lists of the arguments of `generate_proposals` ([A_l], [A_l, 4], [A_l, 4]).
    Returns: `Proposals` with P rows, as torchvision's `RegionProposalNetwork` for FPN.
    """
    boxes, scores, levels = [], [], []
    for level, (logits, level_deltas, level_anchors) in enumerate(
        zip(objectness, deltas, anchors, strict=True)
    ):
        top_scores, top = jax.lax.top_k(logits, min(pre_nms_top_n, logits.shape[0]))
        boxes.append(ops.decode_boxes(level_deltas[top], level_anchors[top]))
        scores.append(top_scores)
        levels.append(jnp.full(top.shape, level, jnp.int32))
    return _select_proposals(
        jnp.concatenate(boxes),
        jnp.concatenate(scores),
        jnp.concatenate(levels),
        image_height=image_height,
        image_width=image_width,
        post_nms_top_n=post_nms_top_n,
        nms_threshold=nms_threshold,
        min_size=min_size,
    )


class RPNTargets(NamedTuple):
    """labels int32 [A]: 1 sampled positive, 0 sampled negative, -1 not in the loss;
    box_targets float32 [A, 4]: deltas (weights 1, 1, 1, 1) to the matched ground truth, zeros
    where the anchor is not a sampled positive."""

    labels: jax.Array
    box_targets: jax.Array


def rpn_targets(
    key,
    anchors,
    gt_boxes,
    gt_valid,
    *,
    image_height,
    image_width,
    positive_iou=0.7,
    negative_iou=0.3,
    batch_size=256,
    positive_fraction=0.5,
    allowed_border=0.0,
):
    """The RPN's training targets for one image (the paper's section 3.1.2 and 3.1.3).

    Args:
      key: PRNG key for the sampling.
      anchors: float32 [A, 4] (x1, y1, x2, y2).
      gt_boxes: float32 [G, 4]; padded rows are zeros.
      gt_valid: bool [G] real ground truth (false for padding and ignored, e.g. difficult, boxes).
      image_height, image_width: the true resized image size.
      positive_iou, negative_iou: 0.7 / 0.3 in the paper.
      batch_size, positive_fraction: 256 anchors, up to half positive; `batch_size=None`:
        no sampling, every positive and negative anchor is labelled (deterministic).
      allowed_border: anchors sticking out of the image by more than this are removed before
        matching (0 in the paper and py-faster-rcnn's `anchor_target_layer`), so each box's
        best anchor is chosen among those that remain; None keeps every anchor, like
        torchvision.

    Returns:
      `RPNTargets`. An image without ground truth gets `batch_size` negatives.
    """
    gt_valid = gt_valid & (ops.box_area(gt_boxes) > 0)  # degenerate boxes never match
    usable = None
    if allowed_border is not None:  # removed before matching, as py-faster-rcnn does
        usable = ops.anchors_inside(
            anchors, height=image_height, width=image_width, allowed_border=allowed_border
        )
    iou = ops.pairwise_iou(anchors, gt_boxes)  # [A, G]
    match = ops.match_boxes(
        iou,
        gt_valid,
        high_threshold=positive_iou,
        low_threshold=negative_iou,
        allow_low_quality=True,
        anchor_valid=usable,
    )
    positive = match.labels == ops.POSITIVE
    negative = match.labels == ops.NEGATIVE
    sample = _take_all_or_sample(
        key, positive, negative, batch_size=batch_size, positive_fraction=positive_fraction
    )
    sampled = jnp.zeros(anchors.shape[0], bool).at[sample.indices].max(sample.valid)
    labels = jnp.where(sampled, positive.astype(jnp.int32), -1)
    deltas = ops.encode_boxes(gt_boxes[match.matched_gt], anchors, weights=RPN_BOX_WEIGHTS)
    box_targets = jnp.where((labels == 1)[:, None], deltas, 0.0)
    return RPNTargets(labels=labels, box_targets=box_targets)


class RoITargets(NamedTuple):
    """rois float32 [R, 4] sampled boxes; classes int32 [R] 1..K foreground, 0 background;
    box_targets float32 [R, 4] deltas (weights 10, 10, 5, 5) to the matched ground truth, zeros
    for background; valid bool [R] (padding when too few candidates); sources int32 [R] the
    row of each RoI in concat(proposals, gt_boxes), to re-gather it differentiably."""

    rois: jax.Array
    classes: jax.Array
    box_targets: jax.Array
    valid: jax.Array
    sources: jax.Array | None = None


def sample_proposals(
    key,
    proposals,
    proposal_valid,
    gt_boxes,
    gt_classes,
    gt_valid,
    *,
    batch_size=128,
    positive_fraction=0.25,
    foreground_iou=0.5,
    background_iou=(0.1, 0.5),
):
    """Fast R-CNN's RoI sampling for one image (the paper: 128 RoIs, 25% foreground).

    Ground-truth boxes are appended to the proposals as candidates. Foreground: IoU >=
    `foreground_iou` with some ground truth; background: IoU in [lo, hi) of `background_iou`
    (paper 0.1-0.5; torchvision 0.0-0.5). In an image without ground truth every valid proposal
    is a background candidate, whatever `lo`. `batch_size=None` takes every foreground and
    background candidate (R = P + G rows, in candidate order; deterministic).

    Args:
      key: PRNG key.
      proposals: float32 [P, 4]; proposal_valid: bool [P].
      gt_boxes: float32 [G, 4]; gt_classes: int32 [G] in 1..K; gt_valid: bool [G].

    Returns:
      `RoITargets` with R = batch_size rows: foreground first, then background, then padding
      (R = P + G in candidate order, the others padding, when `batch_size` is None).
    """
    gt_valid = gt_valid & (ops.box_area(gt_boxes) > 0)
    candidates = jnp.concatenate([proposals, gt_boxes])  # [P + G, 4]
    candidate_valid = jnp.concatenate([proposal_valid, gt_valid])
    iou = ops.pairwise_iou(candidates, gt_boxes)  # [P + G, G]
    match = ops.match_boxes(
        iou,
        gt_valid,
        high_threshold=foreground_iou,
        low_threshold=foreground_iou,
        allow_low_quality=False,
    )
    best_iou = jnp.max(jnp.where(gt_valid[None, :], iou, 0.0), axis=1, initial=0.0)
    low, high = background_iou
    foreground = candidate_valid & (match.labels == ops.POSITIVE)
    background = candidate_valid & (best_iou < high) & ((best_iou >= low) | ~jnp.any(gt_valid))
    sample = _take_all_or_sample(
        key, foreground, background, batch_size=batch_size, positive_fraction=positive_fraction
    )
    rois = candidates[sample.indices]
    matched = match.matched_gt[sample.indices]
    is_foreground = sample.valid & foreground[sample.indices]
    classes = jnp.where(is_foreground, gt_classes[matched], 0).astype(jnp.int32)
    deltas = ops.encode_boxes(gt_boxes[matched], rois, weights=HEAD_BOX_WEIGHTS)
    return RoITargets(
        rois=jnp.where(sample.valid[:, None], rois, 0.0),
        classes=classes,
        box_targets=jnp.where(is_foreground[:, None], deltas, 0.0),
        valid=sample.valid,
        sources=sample.indices,
    )
