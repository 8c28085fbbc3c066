"""The Fast R-CNN head (the paper's section 3.2, Girshick 2015): its settings, RoI sampling,
pooling, box head, loss and detection, as torchvision's `roi_heads.py`.

- `HeadSettings`: every hyper-parameter, paper values as defaults (torchvision's in comments).
- `sample_proposals`: RoI sampling for one image (ground truth appended, 25% foreground);
  `sample`: a batch's, re-gathered differentiably for non-approximate joint training.
- `pool`: RoIPool / RoIAlign / FPN's level mapping; `MLPHead` (fc6/fc7) and
  `FastRCNNPredictor` (class logits, class-specific deltas); the C4 head is
  `frcnn_jax.models.resnet.Res5Head`.
- `fast_rcnn_loss`: the multi-task loss over a batch.
- `detect`: one image's detections (torchvision's `postprocess_detections`); `postprocess`: a
  batch's; `merge_detections`: one image's detections from several test scales.
"""

import dataclasses
import functools
from typing import ClassVar, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from frcnn_jax import fields, ops
from frcnn_jax.errors import ConfigError

HEAD_BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)  # the paper's target stds 0.1 / 0.2
POOLERS = ("pool", "align")
BOX_HEADS = ("mlp", "res5")
ROI_SOURCES = ("proposals", "anchors")
MIN_DETECTION_SIZE = 1e-2  # detections narrower or shorter (resized pixels) are dropped


@dataclasses.dataclass(frozen=True)
class HeadSettings:
    """The Fast R-CNN head's hyper-parameters; paper values as defaults. Values that cannot work
    raise `ConfigError` naming the field (`config.model.head.<field>`): each field's type and
    range are in `RULES`."""

    pooler: str = "pool"  # the paper's RoIPool; "align" for RoIAlign (torchvision)
    output_size: int = 7  # 14 for the C4 head (res5 halves it)
    box_head: str = "mlp"  # fc layers; "res5": a ResNet C4 backbone's last stage
    sampling_ratio: int = 2
    aligned: bool = False
    widths: tuple = (4096, 4096)  # fc6 / fc7; FPN: (1024, 1024)
    dropout: float = 0.5
    # RoIs per image; torchvision: 512. None: every foreground and background candidate
    # (proposals + ground truth), no sampling (deterministic, for parity tests)
    batch_size: int | None = 128
    positive_fraction: float = 0.25
    foreground_iou: float = 0.5
    background_iou: tuple = (0.1, 0.5)  # torchvision: (0.0, 0.5)
    beta: float = 1.0  # smooth-L1 beta of the box loss (Fast R-CNN's sigma 1); torchvision: 1/9
    score_threshold: float = 0.05
    nms_threshold: float = 0.3  # torchvision: 0.5
    max_detections: int = 100
    proposal_gradients: bool = False  # True: non-approximate joint training (needs "align")
    # "proposals": the RPN's (two-stage, the paper's design); "anchors": every anchor is a RoI
    # and there is no RPN, i.e. class-specific detection on dense sliding windows (the paper's
    # one-stage variant, Table 10); at test the best rpn.test_pre_nms_top_n (anchor, class)
    # pairs enter the class-wise NMS
    rois: str = "proposals"

    RULES: ClassVar[dict] = {
        "pooler": fields.choice(*POOLERS),
        "output_size": fields.count(),
        "box_head": fields.choice(*BOX_HEADS),
        "sampling_ratio": fields.count(low=0),
        "aligned": fields.flag(),
        "widths": fields.sequence(fields.count()),
        "dropout": fields.number(low=0, below=1),
        "batch_size": fields.optional(fields.count()),
        "positive_fraction": fields.fraction(),
        "foreground_iou": fields.fraction(),
        "background_iou": fields.sequence(fields.fraction(), length=2),
        "beta": fields.number(low=0),
        "score_threshold": fields.number(high=1),  # <= 0 keeps every candidate
        "nms_threshold": fields.fraction(),
        "max_detections": fields.count(),
        "proposal_gradients": fields.flag(),
        "rois": fields.choice(*ROI_SOURCES),
    }

    def __post_init__(self):
        fields.check_section(self, self.RULES, "config.model.head")
        low, high = self.background_iou
        if low > high:
            raise ConfigError(
                f"config.model.head.background_iou must be (low, high) with low <= high, got "
                f"{self.background_iou}"
            )
        if self.proposal_gradients and self.pooler != "align":
            raise ConfigError(
                "config.model.head.proposal_gradients needs config.model.head.pooler='align' "
                "(RoIPool rounds)"
            )
        if self.proposal_gradients and self.rois == "anchors":
            raise ConfigError(
                "config.model.head.proposal_gradients: the one-stage variant "
                "(config.model.head.rois='anchors') has no proposals to differentiate"
            )


class MLPHead(nn.Module):
    """Flatten, then fully connected layers with ReLU (and dropout when training).

    VGG-16's fc6/fc7 (4096, 4096, dropout 0.5, the paper) or FPN's two 1024-wide layers
    (torchvision's `TwoMLPHead`, no dropout).
    """

    widths: tuple
    dropout: float
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, pooled, *, train):
        x = pooled.reshape(pooled.shape[0], -1).astype(self.dtype)
        for i, width in enumerate(self.widths):
            x = nn.relu(nn.Dense(width, dtype=self.dtype, name=f"fc{i + 6}")(x))
            if self.dropout:
                x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return x


class FastRCNNPredictor(nn.Module):
    """K + 1 class logits (background first) and deltas [R, K + 1, 4] (torchvision's layout)."""

    num_classes: int  # K, without background
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        logits = nn.Dense(
            self.num_classes + 1,
            kernel_init=nn.initializers.normal(0.01),
            dtype=self.dtype,
            name="cls_score",
        )(x)
        deltas = nn.Dense(
            4 * (self.num_classes + 1),
            kernel_init=nn.initializers.normal(0.001),
            dtype=self.dtype,
            name="bbox_pred",
        )(x)
        return logits.astype(jnp.float32), deltas.astype(jnp.float32).reshape(x.shape[0], -1, 4)


# -- RoIs and their training targets ----------------------------------------------------------


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
    batch_size,
    positive_fraction,
    foreground_iou,
    background_iou,
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
    sample = ops.sample_balanced(
        key, foreground, background, num_samples=batch_size, positive_fraction=positive_fraction
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


def sample(head, keys, boxes, valid, gt_boxes, gt_classes, gt_valid):
    """A batch's training RoIs and targets: `sample_proposals` per image with `head`'s
    settings, on proposals `boxes` [B, P, 4] / `valid` [B, P] and ground truth [B, G].

    Gradients reach `boxes` through the returned RoIs only with `head.proposal_gradients`
    (non-approximate joint training: the sampled RoIs are re-gathered from the differentiable
    boxes, so that gradients flow through RoIAlign into them).

    Returns: (rois float32 [B, R, 4], `RoITargets` with [B, R] rows).
    """
    if not head.proposal_gradients:
        boxes = jax.lax.stop_gradient(boxes)
    targets = jax.vmap(
        functools.partial(
            sample_proposals,
            batch_size=head.batch_size,
            positive_fraction=head.positive_fraction,
            foreground_iou=head.foreground_iou,
            background_iou=head.background_iou,
        )
    )(keys, jax.lax.stop_gradient(boxes), valid, gt_boxes, gt_classes, gt_valid)
    rois = targets.rois
    if head.proposal_gradients:
        candidates = jnp.concatenate([boxes, gt_boxes], axis=1)  # [B, P + G, 4]
        rois = jnp.take_along_axis(candidates, targets.sources[..., None], axis=1)
        rois = jnp.where(targets.valid[..., None], rois, 0.0)
    return rois, targets


def pool(head, features, rois, strides, roi_levels):
    """Pooled RoI features [B, R, S, S, C] of RoIs [B, R, 4] (S = `head.output_size`).

    One feature map ([B, Hf, Wf, C] in a one-element list): RoIPool (Caffe's rounding) or
    RoIAlign by `head.pooler`. Several (FPN, finest first, at `strides`): RoIAlign from the
    level each RoI maps to among the first `roi_levels` (torchvision's `MultiScaleRoIAlign`).
    """
    if len(features) > 1:
        one_image = functools.partial(
            ops.multilevel_roi_align,
            output_size=head.output_size,
            spatial_scales=[1.0 / s for s in strides[:roi_levels]],
            sampling_ratio=head.sampling_ratio,
            aligned=head.aligned,
        )
        return jax.vmap(one_image)(features[:roi_levels], rois)
    if head.pooler == "align":
        one_image = functools.partial(
            ops.roi_align,
            output_size=head.output_size,
            spatial_scale=1.0 / strides[0],
            sampling_ratio=head.sampling_ratio,
            aligned=head.aligned,
        )
    else:
        one_image = functools.partial(
            ops.roi_pool, output_size=head.output_size, spatial_scale=1.0 / strides[0]
        )
    return jax.vmap(one_image)(features[0], rois)


def fast_rcnn_loss(class_logits, box_deltas, targets, *, beta):
    """Fast R-CNN's multi-task loss over a batch: softmax cross-entropy over K + 1 classes and
    smooth L1 on the deltas of each foreground RoI's own class, both normalised by the number
    of sampled RoIs of all images together (torchvision's `fastrcnn_loss`).

    Args:
      class_logits: float [..., R, K + 1], background first; leading dimensions: images.
      box_deltas: float [..., R, K, 4] (classes 1..K) or [..., R, K + 1, 4] (torchvision's
        layout, with a background slot that is never used); weights 10, 10, 5, 5.
      targets: `RoITargets` with classes / valid [..., R].
      beta: smooth-L1 beta (`HeadSettings.beta`: 1 in the paper, 1/9 in torchvision).

    Returns:
      {"fast_rcnn_class": mean cross-entropy over valid RoIs,
       "fast_rcnn_box": sum of foreground smooth-L1 / number of valid RoIs} (both terms
       weighted 1, as in the paper and torchvision).
    """
    num_classes = class_logits.shape[-1]
    class_logits = class_logits.reshape(-1, num_classes)  # [N, K + 1] over the batch
    box_deltas = box_deltas.reshape(-1, *box_deltas.shape[-2:])
    classes, valid = targets.classes.reshape(-1), targets.valid.reshape(-1)
    box_targets = targets.box_targets.reshape(-1, 4)
    count = jnp.maximum(jnp.sum(valid), 1)
    ce = optax.softmax_cross_entropy_with_integer_labels(class_logits.astype(jnp.float32), classes)
    cls = jnp.sum(jnp.where(valid, ce, 0.0)) / count
    slot = classes if box_deltas.shape[1] == num_classes else classes - 1
    slot = jnp.clip(slot, 0, box_deltas.shape[1] - 1)
    own = jnp.take_along_axis(box_deltas, slot[:, None, None], axis=1)[:, 0]  # [N, 4]
    foreground = valid & (classes > 0)
    box = jnp.sum(jnp.where(foreground[:, None], ops.smooth_l1(own - box_targets, beta=beta), 0.0))
    return {"fast_rcnn_class": cls, "fast_rcnn_box": box / count}


# -- detection --------------------------------------------------------------------------------


class Detections(NamedTuple):
    """boxes float32 [D, 4] (x1, y1, x2, y2) in original-image pixels; scores float32 [D];
    classes int32 [D] in 1..K; valid bool [D]. Descending score, padding (zeros) last."""

    boxes: jax.Array
    scores: jax.Array
    classes: jax.Array
    valid: jax.Array


def _class_nms(boxes, scores, classes, valid, *, nms_threshold, max_detections, scale=1.0):
    """Class-wise NMS of candidate detections, the best `max_detections` kept, boxes divided by
    `scale`: `Detections` in descending score, padding last."""
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


def detect(
    class_logits,
    box_deltas,
    proposals,
    proposal_valid,
    *,
    image_height,
    image_width,
    scale,
    score_threshold,
    nms_threshold,
    max_detections,
    pre_nms_top_n,
):
    """Detections of one image: torchvision's `RoIHeads.postprocess_detections` semantics.

    Softmax, class-specific decoding of every proposal, clip to the image, drop scores <=
    `score_threshold` and boxes smaller than `MIN_DETECTION_SIZE`, NMS per class, best D
    overall.

    Args:
      class_logits: float [P, K + 1], background first.
      box_deltas: float [P, K, 4] or [P, K + 1, 4] (weights 10, 10, 5, 5).
      proposals: float32 [P, 4]; proposal_valid: bool [P].
      image_height, image_width: true resized image size, for clipping.
      scale: resized / original image size; boxes are divided by it at the end.
      score_threshold: 0.05 (paper and torchvision).
      nms_threshold: 0.3 in the paper, 0.5 in torchvision.
      max_detections: D.
      pre_nms_top_n: None, or keep only the best this many (class, proposal) candidates
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
        & jnp.all(sides >= MIN_DETECTION_SIZE, axis=-1)
    )
    if pre_nms_top_n is not None and pre_nms_top_n < scores.shape[0]:
        _, top = jax.lax.top_k(jnp.where(valid, scores, -1.0), pre_nms_top_n)
        boxes, scores, classes, valid = boxes[top], scores[top], classes[top], valid[top]
    return _class_nms(
        boxes,
        scores,
        classes,
        valid,
        nms_threshold=nms_threshold,
        max_detections=max_detections,
        scale=scale,
    )


def postprocess(head, class_logits, box_deltas, proposals, image_sizes, scales, *, pre_nms_top_n):
    """A batch's `Detections` [B, D] with `head`'s thresholds: `detect` per image on the head's
    outputs ([B, P, K + 1], [B, P, K + 1, 4]) for `proposals` (`Proposals` [B, P])."""
    one_image = functools.partial(
        detect,
        score_threshold=head.score_threshold,
        nms_threshold=head.nms_threshold,
        max_detections=head.max_detections,
        pre_nms_top_n=pre_nms_top_n,
    )
    return jax.vmap(
        lambda c, d, p, v, size, s: one_image(
            c, d, p, v, image_height=size[0], image_width=size[1], scale=s
        )
    )(class_logits, box_deltas, proposals.boxes, proposals.valid, image_sizes, scales)


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
    return _class_nms(
        boxes, scores, classes, valid, nms_threshold=nms_threshold, max_detections=max_detections
    )
