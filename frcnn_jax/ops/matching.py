"""Matching anchors (or proposals) to ground-truth boxes by IoU (the paper's section 3.1.2)."""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from frcnn_jax.ops import _checks

POSITIVE = 1
NEGATIVE = 0
IGNORE = -1


class MatchResult(NamedTuple):
    """Per-anchor assignment.

    matched_gt: int32 [A] the ground-truth slot with the highest IoU among valid slots (the
      first on ties); meaningful where `labels == POSITIVE`, and 0 when no slot is valid.
    labels: int32 [A] POSITIVE (1), NEGATIVE (0) or IGNORE (-1).
    """

    matched_gt: jax.Array
    labels: jax.Array


def match_boxes(
    iou, gt_valid, *, high_threshold, low_threshold, allow_low_quality, anchor_valid=None
):
    """Labels each anchor positive, negative or ignored from its IoU with the ground truth.

    The paper's rule, with torchvision `Matcher` semantics: an anchor whose best IoU is
    >= `high_threshold` is positive, < `low_threshold` negative, in between ignored. With
    `allow_low_quality`, every anchor that attains a ground-truth box's highest IoU is also
    positive, ties included (the paper's "anchor/anchors with the highest IoU"), matched to its
    own best box as torchvision does. Unlike torchvision, a ground-truth box whose highest IoU is
    0 (it overlaps no anchor, or has zero area) makes nothing positive, and padded slots are
    never matched.

    Args:
      iou: float32 [A, G] IoU of every anchor with every ground-truth slot.
      gt_valid: bool [G] true for real ground truth, false for padding.
      high_threshold: positive at or above this best IoU (0.7 RPN, 0.5 Fast R-CNN).
      low_threshold: negative below this best IoU (0.3 RPN, 0.5 Fast R-CNN).
      allow_low_quality: apply the best-anchor-per-ground-truth rule (True for the RPN).
      anchor_valid: optional bool [A]; anchors marked False are removed before matching, as
        py-faster-rcnn removes cross-boundary anchors: they are labelled IGNORE and are never a
        box's best anchor, so each box's forced positive is chosen among the others.

    Returns:
      `MatchResult(matched_gt int32 [A], labels int32 [A])`. With no valid ground truth (an
      empty image) every (valid) anchor is negative.
    """
    _checks.check_rank("iou", iou, 2)
    _checks.check_rank("gt_valid", gt_valid, 1)
    if iou.shape[1] != gt_valid.shape[0]:
        raise ValueError(
            f"iou [A, G] and gt_valid [G] disagree on G: iou {iou.shape}, gt_valid {gt_valid.shape}"
        )
    _checks.check_unit_interval("high_threshold", high_threshold)
    _checks.check_unit_interval("low_threshold", low_threshold)
    if (
        isinstance(high_threshold, (int, float))
        and isinstance(low_threshold, (int, float))
        and low_threshold > high_threshold
    ):
        raise ValueError(
            f"low_threshold ({low_threshold}) must not exceed high_threshold ({high_threshold})"
        )
    num_anchors, num_gt = iou.shape
    if anchor_valid is None:
        anchor_valid = jnp.ones((num_anchors,), bool)
    else:
        _checks.check_rank("anchor_valid", anchor_valid, 1)
        if anchor_valid.shape[0] != num_anchors:
            raise ValueError(
                f"iou [A, G] and anchor_valid [A] disagree on A: iou {iou.shape}, "
                f"anchor_valid {anchor_valid.shape}"
            )
        anchor_valid = jnp.asarray(anchor_valid, bool)
    if num_gt == 0:
        return MatchResult(
            jnp.zeros((num_anchors,), jnp.int32),
            jnp.where(anchor_valid, NEGATIVE, IGNORE).astype(jnp.int32),
        )
    gt_valid = jnp.asarray(gt_valid, bool)
    # Padded slots and removed anchors get -1, below any real IoU, so they are never anyone's
    # best.
    iou = jnp.where(gt_valid[None, :], jnp.asarray(iou, jnp.float32), -1.0)
    iou = jnp.where(anchor_valid[:, None], iou, -1.0)
    matched_gt = jnp.argmax(iou, axis=1).astype(jnp.int32)  # [A]
    best_iou = jnp.max(iou, axis=1)  # [A]; -1 when no slot is valid
    labels = jnp.where(
        best_iou >= high_threshold,
        POSITIVE,
        jnp.where(best_iou < low_threshold, NEGATIVE, IGNORE),
    )
    if allow_low_quality:
        best_per_gt = jnp.max(iou, axis=0)  # [G]
        is_best = (iou == best_per_gt[None, :]) & (best_per_gt > 0)[None, :] & gt_valid[None, :]
        labels = jnp.where(is_best.any(axis=1), POSITIVE, labels)
    labels = jnp.where(anchor_valid, labels, IGNORE)
    return MatchResult(matched_gt, labels.astype(jnp.int32))
