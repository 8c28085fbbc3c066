"""The Region Proposal Network (the paper's section 3.1): its settings, head, anchors, proposals,
training targets and loss, as torchvision's `rpn.py` + `anchor_utils.py`.

- `RPNSettings`: every hyper-parameter, paper values as defaults (torchvision's in comments).
- `RPNHead`: 3x3 conv, then sibling 1x1 convs (objectness and box deltas for k anchors).
- `anchors_per_level`: each feature level's anchors; `propose`: the proposals of a batch
  (top-k, decode, clip, drop small, NMS, best P), from `generate_proposals` /
  `generate_multilevel_proposals`.
- `rpn_targets`: the paper's anchor labelling and sampling for one image; `loss`: equation (1)
  over a batch (targets, then `rpn_loss`).

Per-image functions take one image and are batched with `jax.vmap`; `propose` and `loss` take
the batch. Ground truth is padded to G slots with a `valid` mask; padded or zero-area ground
truth never makes a positive.
"""

import dataclasses
import math
from collections.abc import Sequence
from typing import ClassVar, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from frcnn_jax import fields, ops
from frcnn_jax import kernels as kernels_lib
from frcnn_jax.errors import ConfigError

RPN_BOX_WEIGHTS = (1.0, 1.0, 1.0, 1.0)
ANCHOR_STYLES = ("torchvision", "py-faster-rcnn")
OBJECTNESS = ("softmax", "sigmoid")
TEST_RANKINGS = ("objectness", "random")


def _anchor_sizes(value):
    """Positive sizes, or one non-empty tuple of positive sizes per pyramid level."""
    size = fields.number(above=0)
    if all(isinstance(v, (tuple, list)) for v in value):
        return len(value) > 0 and all(fields.sequence(size, min_length=1).test(v) for v in value)
    return fields.sequence(size, min_length=1).test(value)


@dataclasses.dataclass(frozen=True)
class RPNSettings:
    """The RPN's hyper-parameters; paper values as defaults (torchvision's in comments). Values
    that cannot work raise `ConfigError` naming the field (`config.model.rpn.<field>`): each
    field's type and range are in `RULES`."""

    anchor_sizes: tuple = (128, 256, 512)  # or one tuple per pyramid level: ((32,), (64,), ...)
    aspect_ratios: tuple = (0.5, 1.0, 2.0)
    # "torchvision": anchors centred on each cell's top-left pixel corner, sides rounded as
    # torchvision; "py-faster-rcnn": its `generate_anchors` (centred stride/2 further in, sides
    # rounded per ratio first), for paper fidelity
    anchor_style: str = "torchvision"
    channels: int = 512  # 3x3 conv width (256 for ZF / FPN)
    objectness: str = "softmax"  # 2k scores; torchvision: "sigmoid"
    positive_iou: float = 0.7
    negative_iou: float = 0.3
    # anchors sampled per image; None: every positive and negative anchor enters the loss, no
    # sampling (a deterministic step, for parity tests against a reference implementation)
    batch_size: int | None = 256
    positive_fraction: float = 0.5
    allowed_border: float | None = 0.0  # cross-boundary anchors ignored; torchvision: None
    train_pre_nms_top_n: int = 12000  # torchvision: 2000
    train_post_nms_top_n: int = 2000
    test_pre_nms_top_n: int = 6000  # torchvision: 1000
    test_post_nms_top_n: int = 300  # torchvision: 1000
    nms_threshold: float = 0.7
    min_size: float = 16.0  # smallest proposal side; torchvision: 1e-3
    # min_size in original-image pixels (py-faster-rcnn: 16 x the image's scale); False:
    # resized pixels (torchvision)
    min_size_original: bool = True
    box_weight: float = 10.0  # lambda in equation (1); torchvision: 1 with box_normalizer None
    box_normalizer: float | None = 2400.0  # N_reg ~ anchor locations; None: sampled anchors
    beta: float = 1 / 9  # py-faster-rcnn's sigma = 3
    # False: the RPN has its own copy of the backbone, trained by the RPN's loss only (the
    # paper's "unshared" ablation, Table 2); True: one backbone feeds both (the paper's design)
    shared_features: bool = True
    # Test-time ablations of the paper's Table 2 (training is unchanged):
    test_nms: bool = True  # False: the best test_post_nms_top_n by score, no NMS
    # "objectness" (the cls layer's scores) or "random": proposals drawn at random from the
    # (regressed) anchors, with no NMS, as without the cls layer
    test_ranking: str = "objectness"
    test_regression: bool = True  # False: the anchors themselves are the proposals (no reg layer)

    RULES: ClassVar[dict] = {
        "anchor_sizes": fields.Rule(
            _anchor_sizes, "positive sizes, or a tuple of positive sizes per level"
        ),
        "aspect_ratios": fields.sequence(fields.number(above=0), min_length=1),
        "anchor_style": fields.choice(*ANCHOR_STYLES),
        "channels": fields.count(),
        "objectness": fields.choice(*OBJECTNESS),
        "positive_iou": fields.fraction(),
        "negative_iou": fields.fraction(),
        "batch_size": fields.optional(fields.count()),
        "positive_fraction": fields.fraction(),
        "allowed_border": fields.optional(fields.number()),
        "train_pre_nms_top_n": fields.count(),
        "train_post_nms_top_n": fields.count(),
        "test_pre_nms_top_n": fields.count(),
        "test_post_nms_top_n": fields.count(),
        "nms_threshold": fields.fraction(),
        "min_size": fields.number(low=0),
        "min_size_original": fields.flag(),
        "box_weight": fields.number(low=0),
        "box_normalizer": fields.optional(fields.number(above=0)),
        "beta": fields.number(low=0),
        "shared_features": fields.flag(),
        "test_nms": fields.flag(),
        "test_ranking": fields.choice(*TEST_RANKINGS),
        "test_regression": fields.flag(),
    }

    def __post_init__(self):
        fields.check_section(self, self.RULES, "config.model.rpn")
        if self.negative_iou > self.positive_iou:
            raise ConfigError(
                "config.model.rpn.negative_iou must be <= positive_iou, got "
                f"{self.negative_iou} > {self.positive_iou}"
            )

    @property
    def anchors_per_location(self):
        """k: anchor sizes x aspect ratios (per level for a pyramid)."""
        return len(level_anchor_sizes(self, 0)) * len(self.aspect_ratios)


class RPNHead(nn.Module):
    """3x3 conv then sibling 1x1 convs: objectness and box deltas for k anchors per location.

    Attributes:
      num_anchors: k (9 in the paper).
      channels: width of the 3x3 conv (512 for VGG-16, 256 for ZF and FPN).
      objectness: "softmax" (the paper: 2k scores) or "sigmoid" (torchvision: k scores).

    Returns from __call__ on features [B, Hf, Wf, C]: (logits, deltas) flattened in anchor
    order (`ops.anchor_grid`'s: location-major, anchor-minor): float32 logits [B, A] for
    "sigmoid" or [B, A, 2] (background, object) for "softmax", and deltas [B, A, 4], with
    A = Hf * Wf * k.
    """

    num_anchors: int
    channels: int
    objectness: str
    dtype: jnp.dtype
    kernels: str

    @nn.compact
    def __call__(self, features):
        init = nn.initializers.normal(stddev=0.01)  # the paper's and torchvision's init
        conv = kernels_lib.conv_layer(self.kernels)
        x = conv(self.channels, (3, 3), kernel_init=init, dtype=self.dtype, name="conv")(features)
        x = kernels_lib.relu(x, kernels=self.kernels)
        batch = features.shape[0]
        per_anchor = 2 if self.objectness == "softmax" else 1
        logits = conv(
            self.num_anchors * per_anchor, (1, 1), kernel_init=init, dtype=self.dtype, name="cls"
        )(x)
        deltas = conv(
            self.num_anchors * 4, (1, 1), kernel_init=init, dtype=self.dtype, name="bbox"
        )(x)
        logits = logits.astype(jnp.float32).reshape(batch, -1, per_anchor)
        if per_anchor == 1:
            logits = logits[..., 0]  # [B, A]
        deltas = deltas.astype(jnp.float32).reshape(batch, -1, 4)  # [B, A, 4]
        return logits, deltas


class Level(NamedTuple):
    """The RPN's output on one feature level: anchors float32 [A_l, 4], logits [B, A_l] or
    [B, A_l, 2], deltas [B, A_l, 4] (weights 1, 1, 1, 1)."""

    anchors: jax.Array
    logits: jax.Array
    deltas: jax.Array


def objectness_scores(logits):
    """Scores that rank anchors: sigmoid logits [B, A] as they are, softmax pairs [B, A, 2] as
    object minus background logit (same order as the softmax probability)."""
    if logits.ndim == 3:
        return logits[..., 1] - logits[..., 0]
    return logits


# -- anchors ----------------------------------------------------------------------------------


def level_anchor_sizes(rpn, level):
    """The anchor sizes of pyramid `level` (one tuple for every level when not nested)."""
    sizes = rpn.anchor_sizes
    return sizes[level] if isinstance(sizes[0], (tuple, list)) else sizes


def level_anchors(rpn, level, feature_height, feature_width, stride, canvas=None):
    """float32 [Hf * Wf * k, 4] anchors of one feature level for `RPNSettings` `rpn`.

    "torchvision" anchors step by canvas size // feature size per axis when `canvas` (H, W) is
    given, as torchvision's `AnchorGenerator` does: the nominal stride wherever the canvas is
    a multiple of it, but e.g. (61, 64) for FPN's P6 (13 x 17) of an 800 x 1088 image."""
    sizes = level_anchor_sizes(rpn, level)
    if rpn.anchor_style == "py-faster-rcnn":  # inclusive boxes -> continuous: x2, y2 + 1
        base = ops.legacy_base_anchors(
            base_size=stride, ratios=rpn.aspect_ratios, scales=[s / stride for s in sizes]
        ) + jnp.array([0.0, 0.0, 1.0, 1.0])
    else:
        base = ops.base_anchors(sizes=sizes, aspect_ratios=rpn.aspect_ratios)
        if canvas is not None:
            stride = (canvas[0] // feature_height, canvas[1] // feature_width)
    return ops.anchor_grid(
        base, feature_height=feature_height, feature_width=feature_width, stride=stride
    )


def anchors_per_level(rpn, features, strides, canvas):
    """Per level: anchors float32 [A_l, 4] of the feature maps `features` ([B, Hf, Wf, C], one
    per level, finest first) at `strides`; `canvas`: the images' padded (H, W)."""
    return [
        level_anchors(rpn, level, feature.shape[1], feature.shape[2], stride, canvas)
        for level, (feature, stride) in enumerate(zip(features, strides, strict=True))
    ]


# -- proposals --------------------------------------------------------------------------------


class Proposals(NamedTuple):
    """boxes float32 [P, 4] (x1, y1, x2, y2) in resized-image pixels, scores float32 [P]
    (objectness logits), valid bool [P]; in descending score order, padding last."""

    boxes: jax.Array
    scores: jax.Array
    valid: jax.Array


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
    nms_threshold,
    min_size,
):
    """RPN proposals from one feature level of one image (the paper: 12000 -> NMS 0.7 -> 2000
    when training, 6000 -> 300 when testing).

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
    return generate_multilevel_proposals(
        [objectness],
        [deltas],
        [anchors],
        image_height=image_height,
        image_width=image_width,
        pre_nms_top_n=pre_nms_top_n,
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
    nms_threshold,
    min_size,
):
    """FPN proposals of one image: top `pre_nms_top_n` per level, NMS within each level (plain
    NMS for a single level), best P overall.

    Args: per-level lists of the arguments of `generate_proposals` ([A_l], [A_l, 4], [A_l, 4]).
    Returns: `Proposals` with P rows, as torchvision's `RegionProposalNetwork` for FPN.
    """
    boxes, scores, levels = [], [], []
    for level, (logits, level_deltas, level_anchors) in enumerate(
        zip(objectness, deltas, anchors, strict=True)
    ):
        top_scores, top = jax.lax.top_k(logits, min(pre_nms_top_n, logits.shape[0]))
        boxes.append(
            ops.decode_boxes(level_deltas[top], level_anchors[top], weights=RPN_BOX_WEIGHTS)
        )
        scores.append(top_scores)
        levels.append(jnp.full(top.shape, level, jnp.int32))
    return _select_proposals(
        jnp.concatenate(boxes),
        jnp.concatenate(scores),
        jnp.concatenate(levels) if len(levels) > 1 else None,
        image_height=image_height,
        image_width=image_width,
        post_nms_top_n=post_nms_top_n,
        nms_threshold=nms_threshold,
        min_size=min_size,
    )


def propose(rpn, levels, image_sizes, scales=None, *, train):
    """The RPN's proposals of a batch: `Proposals` with [B, P] rows.

    Args:
      rpn: `RPNSettings` (the train or test counts by `train`).
      levels: the RPN's `Level`s, finest first.
      image_sizes: int32 [B, 2] true (height, width) on the canvas.
      scales: float32 [B] resized / original size, which turns `rpn.min_size` into resized
        pixels when `rpn.min_size_original` (1 when omitted).
      train: False applies the test-time ablations `rpn.test_nms`, `test_ranking` and
        `test_regression` (the paper's Table 2), which switch off NMS, the objectness ranking
        or the box regression.
    """
    if train:
        pre, post, nms = rpn.train_pre_nms_top_n, rpn.train_post_nms_top_n, rpn.nms_threshold
    else:
        pre, post = rpn.test_pre_nms_top_n, rpn.test_post_nms_top_n
        nms = rpn.nms_threshold if rpn.test_nms and rpn.test_ranking != "random" else None
    counts = dict(pre_nms_top_n=pre, post_nms_top_n=post, nms_threshold=nms)
    level_anchors = [level.anchors for level in levels]
    if scales is None or not rpn.min_size_original:
        scales = jnp.ones(image_sizes.shape[0], jnp.float32)

    def one_image(scores, deltas, size, scale):
        image = dict(image_height=size[0], image_width=size[1], min_size=rpn.min_size * scale)
        return generate_multilevel_proposals(scores, deltas, level_anchors, **image, **counts)

    scores = [objectness_scores(level.logits) for level in levels]
    deltas = [level.deltas for level in levels]
    if not train and rpn.test_ranking == "random":  # a fixed draw: detection stays a function
        keys = jax.random.split(jax.random.key(0), len(scores))
        scores = [jax.random.uniform(k, s.shape) for k, s in zip(keys, scores, strict=True)]
    if not train and not rpn.test_regression:
        deltas = [jnp.zeros_like(d) for d in deltas]
    return jax.vmap(one_image)(scores, deltas, image_sizes, scales)


def anchor_proposals(anchors, image_sizes):
    """The one-stage variant's "proposals" (`head.rois="anchors"`, no RPN): every anchor ([A, 4],
    all levels) clipped to each image (`image_sizes` int32 [B, 2]), as `Proposals` with [B, A]
    rows (scores 0; boxes that clip to nothing are not valid)."""

    def one_image(size):
        boxes = ops.clip_boxes(anchors, height=size[0], width=size[1])
        valid = jnp.all(boxes[:, 2:] - boxes[:, :2] >= 1.0, axis=-1)
        return Proposals(boxes, jnp.zeros(len(anchors), jnp.float32), valid)

    return jax.vmap(one_image)(image_sizes)


# -- training targets and loss ----------------------------------------------------------------


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
    positive_iou,
    negative_iou,
    batch_size,
    positive_fraction,
    allowed_border,
):
    """The RPN's training targets for one image (the paper's sections 3.1.2 and 3.1.3).

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
    sample = ops.sample_balanced(
        key, positive, negative, num_samples=batch_size, positive_fraction=positive_fraction
    )
    sampled = jnp.zeros(anchors.shape[0], bool).at[sample.indices].max(sample.valid)
    labels = jnp.where(sampled, positive.astype(jnp.int32), -1)
    deltas = ops.encode_boxes(gt_boxes[match.matched_gt], anchors, weights=RPN_BOX_WEIGHTS)
    box_targets = jnp.where((labels == 1)[:, None], deltas, 0.0)
    return RPNTargets(labels=labels, box_targets=box_targets)


def rpn_loss(objectness, deltas, targets, *, box_weight, box_normalizer, beta):
    """The RPN loss of equation (1) over a batch: classification over the sampled anchors plus
    lambda-weighted regression over the positive ones.

    Normalised over the whole batch, as torchvision's `RegionProposalNetwork.compute_loss`
    does: N_cls is the number of sampled anchors of all images together, so an image with
    fewer candidates weighs less (py-faster-rcnn, one image per pass, normalises per image:
    the same whenever every image fills its sample, as in practice).

    Args:
      objectness: float [..., A] logits of a sigmoid head (torchvision) or [..., A, 2] logits
        (background, object) of the paper's softmax head; leading dimensions: images.
      deltas: float [..., A, 4] predicted deltas (weights 1, 1, 1, 1).
      targets: `RPNTargets` with labels [..., A].
      box_weight: lambda; 10 in the paper (with box_normalizer = anchor locations, ~2400),
        1 in torchvision (with the default normalizer).
      box_normalizer: N_reg per image (multiplied by the number of images). None divides by
        the number of sampled anchors (torchvision).
      beta: smooth-L1 beta; 1/9 is py-faster-rcnn's sigma = 3 for the RPN, and torchvision's.

    Returns:
      {"rpn_objectness": mean classification loss over sampled anchors (N_cls),
       "rpn_box": box_weight * sum of positive smooth-L1 / N_reg}; zero, not NaN, when nothing
       was sampled.
    """
    labels = targets.labels
    num_images = math.prod(labels.shape[:-1])
    sampled = labels >= 0
    num_sampled = jnp.maximum(jnp.sum(sampled), 1)
    is_object = labels == 1
    if objectness.ndim == labels.ndim + 1:
        per_anchor = optax.softmax_cross_entropy_with_integer_labels(
            objectness.astype(jnp.float32), is_object.astype(jnp.int32)
        )
    else:
        per_anchor = optax.sigmoid_binary_cross_entropy(
            objectness.astype(jnp.float32), is_object.astype(jnp.float32)
        )
    cls = jnp.sum(jnp.where(sampled, per_anchor, 0.0)) / num_sampled
    box = jnp.sum(
        jnp.where(is_object[..., None], ops.smooth_l1(deltas - targets.box_targets, beta=beta), 0.0)
    )
    normalizer = num_sampled if box_normalizer is None else box_normalizer * num_images
    return {"rpn_objectness": cls, "rpn_box": box_weight * box / normalizer}


def loss(rpn, levels, image_sizes, gt_boxes, gt_valid, keys):
    """Equation (1) over a batch: each image's `rpn_targets` over the anchors of every level,
    then `rpn_loss` with `rpn`'s weights.

    Args:
      rpn: `RPNSettings`; levels: the RPN's `Level`s; image_sizes: int32 [B, 2].
      gt_boxes: float32 [B, G, 4]; gt_valid: bool [B, G]; keys: [B] PRNG keys for sampling.
    """
    all_anchors = jnp.concatenate([level.anchors for level in levels])  # [A, 4]
    logits = jnp.concatenate([level.logits for level in levels], axis=1)
    deltas = jnp.concatenate([level.deltas for level in levels], axis=1)

    def image_targets(key, boxes, valid, size):
        return rpn_targets(
            key,
            all_anchors,
            boxes,
            valid,
            image_height=size[0],
            image_width=size[1],
            positive_iou=rpn.positive_iou,
            negative_iou=rpn.negative_iou,
            batch_size=rpn.batch_size,
            positive_fraction=rpn.positive_fraction,
            allowed_border=rpn.allowed_border,
        )

    targets = jax.vmap(image_targets)(keys, gt_boxes, gt_valid, image_sizes)
    return rpn_loss(
        logits,
        deltas,
        targets,
        box_weight=rpn.box_weight,
        box_normalizer=rpn.box_normalizer,
        beta=rpn.beta,
    )
