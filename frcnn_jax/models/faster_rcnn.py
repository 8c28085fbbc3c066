"""The Faster R-CNN detector (Ren et al., 2015) as one Flax module with static shapes.

`FasterRCNN.losses` gives the training losses of a padded batch and `FasterRCNN.detect` a fixed
number of detections per image; both trace once per input shape. Images are float [B, H, W, 3]
RGB in 0-255 on a padded canvas; `image_sizes` int32 [B, 2] gives each image's true (height,
width) on that canvas. Ground truth is padded to G slots with a `valid` mask.
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from frcnn_jax import losses as losses_lib
from frcnn_jax import ops, postprocess, targets
from frcnn_jax.models.backbones import IMAGENET_MEAN, IMAGENET_STD
from frcnn_jax.models.resnet import Res5Head, ResNet
from frcnn_jax.models.roi_heads import FastRCNNPredictor, MLPHead
from frcnn_jax.models.rpn import RPNHead, objectness_scores


@dataclasses.dataclass(frozen=True)
class RPNSettings:
    """The RPN's hyper-parameters; paper values as defaults (torchvision's in comments)."""

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


TEST_RANKINGS = ("objectness", "random")
ROI_SOURCES = ("proposals", "anchors")


@dataclasses.dataclass(frozen=True)
class HeadSettings:
    """The Fast R-CNN head's hyper-parameters; paper values as defaults."""

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


ANCHOR_STYLES = ("torchvision", "py-faster-rcnn")


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
    elif rpn.anchor_style == "torchvision":
        base = ops.base_anchors(sizes=sizes, aspect_ratios=rpn.aspect_ratios)
        if canvas is not None:
            stride = (canvas[0] // feature_height, canvas[1] // feature_width)
    else:
        raise ValueError(
            f"rpn.anchor_style must be one of {ANCHOR_STYLES}; got {rpn.anchor_style!r}"
        )
    return ops.anchor_grid(
        base, feature_height=feature_height, feature_width=feature_width, stride=stride
    )


class FasterRCNN(nn.Module):
    backbone: nn.Module
    num_classes: int  # K object classes, background excluded
    rpn: RPNSettings = RPNSettings()
    head: HeadSettings = HeadSettings()
    pixel_mean: tuple = IMAGENET_MEAN  # of the channels in `channel_order`, 0-255 units
    pixel_std: tuple = IMAGENET_STD
    channel_order: str = "rgb"  # "bgr": the images' RGB channels are reversed first (Caffe)
    dtype: jnp.dtype = jnp.float32
    rpn_backbone: nn.Module | None = None  # the RPN's own backbone when not rpn.shared_features

    def setup(self):
        if self.channel_order not in ("rgb", "bgr"):
            raise ValueError(f"channel_order must be 'rgb' or 'bgr'; got {self.channel_order!r}")
        if self.head.pooler not in ("pool", "align"):
            raise ValueError(f"head.pooler must be 'pool' or 'align'; got {self.head.pooler!r}")
        if self.head.proposal_gradients and self.head.pooler != "align":
            raise ValueError("head.proposal_gradients needs head.pooler='align' (RoIPool rounds)")
        if self.rpn.test_ranking not in TEST_RANKINGS:
            raise ValueError(
                f"rpn.test_ranking must be one of {TEST_RANKINGS}; got {self.rpn.test_ranking!r}"
            )
        if self.head.rois not in ROI_SOURCES:
            raise ValueError(f"head.rois must be one of {ROI_SOURCES}; got {self.head.rois!r}")
        if (self.rpn_backbone is None) != self.rpn.shared_features:
            raise ValueError(
                "rpn.shared_features=False needs the RPN's own backbone (rpn_backbone; "
                "build_model makes it), and only then is one given"
            )
        if self.head.rois == "anchors" and (self.rpn_backbone is not None or
                                            self.head.proposal_gradients):  # fmt: skip
            raise ValueError(
                "head.rois='anchors' (one-stage) has no RPN: it cannot be combined with "
                "rpn.shared_features=False or head.proposal_gradients"
            )
        if self.head.rois == "proposals":
            num_anchors = len(self._anchor_sizes(0)) * len(self.rpn.aspect_ratios)
            self.rpn_head = RPNHead(
                num_anchors, self.rpn.channels, self.rpn.objectness, dtype=self.dtype
            )
        if self.head.box_head == "res5":
            if not isinstance(self.backbone, ResNet):
                raise ValueError("head.box_head='res5' needs a ResNet C4 backbone")
            self.box_head = Res5Head(self.backbone.depth, dtype=self.dtype)
        elif self.head.box_head == "mlp":
            self.box_head = MLPHead(self.head.widths, self.head.dropout, dtype=self.dtype)
        else:
            raise ValueError(f"head.box_head must be 'mlp' or 'res5'; got {self.head.box_head!r}")
        self.predictor = FastRCNNPredictor(self.num_classes, dtype=self.dtype)

    # -- shared pieces ---------------------------------------------------------------------

    def _strides(self):
        """Stride of each feature map the backbone returns."""
        strides = getattr(self.backbone, "strides", None)  # multi-level backbones
        return tuple(strides) if strides is not None else (self.backbone.stride,)

    def _anchor_sizes(self, level):
        return level_anchor_sizes(self.rpn, level)

    def _features(self, images, image_sizes=None, *, train):
        """(the backbone's maps as a list, finest first (one entry for single-level
        backbones), the RPN's maps: the same list unless `rpn.shared_features` is False).

        Images are normalized, then the canvas outside each image (`image_sizes`) is set to
        zero, as torchvision and py-faster-rcnn pad normalized images with zeros."""
        mean = jnp.asarray(self.pixel_mean, jnp.float32)
        std = jnp.asarray(self.pixel_std, jnp.float32)
        images = images.astype(jnp.float32)
        if self.channel_order == "bgr":
            images = images[..., ::-1]
        images = (images - mean) / std
        if image_sizes is not None:
            rows = jnp.arange(images.shape[1])[None, :, None] < image_sizes[:, 0, None, None]
            cols = jnp.arange(images.shape[2])[None, None, :] < image_sizes[:, 1, None, None]
            images = jnp.where((rows & cols)[..., None], images, 0.0)

        def maps(backbone):
            out = backbone(images, train=train)
            return list(out) if isinstance(out, (list, tuple)) else [out]

        features = maps(self.backbone)
        return features, (features if self.rpn_backbone is None else maps(self.rpn_backbone))

    def _anchors(self, features, canvas):
        """Per level: anchors [A_l, 4]; `canvas`: the images' padded (H, W)."""
        return [
            level_anchors(self.rpn, level, feature.shape[1], feature.shape[2], stride, canvas)
            for level, (feature, stride) in enumerate(zip(features, self._strides(), strict=True))
        ]

    def _rpn(self, features, canvas):
        """Per level: (anchors [A_l, 4], logits [B, A_l] or [B, A_l, 2], deltas [B, A_l, 4]);
        `canvas`: the images' padded (H, W)."""
        anchors = self._anchors(features, canvas)  # one head shared by all levels:
        return [(a, *self.rpn_head(f)) for a, f in zip(anchors, features, strict=True)]

    def _proposals(self, levels, image_sizes, scales=None, *, train):
        """The RPN's proposals per image; `scales` (float32 [B], resized / original) turn
        `rpn.min_size` into resized pixels when `rpn.min_size_original` (1 when omitted). At
        test, `rpn.test_nms`, `test_ranking` and `test_regression` switch off NMS, the
        objectness ranking or the box regression (the paper's Table 2 ablations)."""
        rpn = self.rpn
        if train:
            pre, post, nms = rpn.train_pre_nms_top_n, rpn.train_post_nms_top_n, rpn.nms_threshold
        else:
            pre, post = rpn.test_pre_nms_top_n, rpn.test_post_nms_top_n
            nms = rpn.nms_threshold if rpn.test_nms and rpn.test_ranking != "random" else None
        kwargs = dict(pre_nms_top_n=pre, post_nms_top_n=post, nms_threshold=nms)
        anchors = [a for a, _, _ in levels]
        if scales is None or not rpn.min_size_original:
            scales = jnp.ones(image_sizes.shape[0], jnp.float32)

        def one_image(scores, deltas, size, scale):
            hw = dict(image_height=size[0], image_width=size[1], min_size=rpn.min_size * scale)
            if len(anchors) == 1:
                return targets.generate_proposals(scores[0], deltas[0], anchors[0], **hw, **kwargs)
            return targets.generate_multilevel_proposals(scores, deltas, anchors, **hw, **kwargs)

        scores = [objectness_scores(logits) for _, logits, _ in levels]
        deltas = [d for _, _, d in levels]
        if not train and rpn.test_ranking == "random":  # a fixed draw: detection stays a function
            keys = jax.random.split(jax.random.key(0), len(scores))
            scores = [jax.random.uniform(k, s.shape) for k, s in zip(keys, scores, strict=True)]
        if not train and not rpn.test_regression:
            deltas = [jnp.zeros_like(d) for d in deltas]
        return jax.vmap(one_image)(scores, deltas, image_sizes, scales)

    def _anchor_rois(self, features, image_sizes, canvas):
        """The one-stage variant's RoIs (`head.rois="anchors"`): every anchor of every level,
        clipped to its image, as `Proposals` [B, A] (scores 0; boxes that clip to nothing are
        not valid)."""
        anchors = jnp.concatenate(self._anchors(features, canvas))

        def one_image(size):
            boxes = ops.clip_boxes(anchors, height=size[0], width=size[1])
            valid = jnp.all(boxes[:, 2:] - boxes[:, :2] >= 1.0, axis=-1)
            return targets.Proposals(boxes, jnp.zeros(len(anchors), jnp.float32), valid)

        return jax.vmap(one_image)(image_sizes)

    def _box_predictions(self, features, rois, *, train):
        """Pool [B, R, 4] RoIs from the feature maps; logits [B, R, K+1], deltas
        [B, R, K+1, 4]."""
        size = self.head.output_size
        strides = self._strides()
        if len(features) > 1:  # FPN: each RoI from its own level (P2-P5)
            num_levels = getattr(self.backbone, "roi_levels", len(features))
            pool = functools.partial(
                ops.multilevel_roi_align,
                output_size=size,
                spatial_scales=[1.0 / s for s in strides[:num_levels]],
                sampling_ratio=self.head.sampling_ratio,
                aligned=self.head.aligned,
            )
            pooled = jax.vmap(pool)(features[:num_levels], rois)
        elif self.head.pooler == "align":
            pool = functools.partial(
                ops.roi_align,
                output_size=size,
                spatial_scale=1.0 / strides[0],
                sampling_ratio=self.head.sampling_ratio,
                aligned=self.head.aligned,
            )
            pooled = jax.vmap(pool)(features[0], rois)  # [B, R, S, S, C]
        else:
            pool = functools.partial(ops.roi_pool, output_size=size, spatial_scale=1.0 / strides[0])
            pooled = jax.vmap(pool)(features[0], rois)
        batch, num_rois = rois.shape[:2]
        x = self.box_head(pooled.reshape(batch * num_rois, *pooled.shape[2:]), train=train)
        logits, deltas = self.predictor(x)
        return logits.reshape(batch, num_rois, -1), deltas.reshape(batch, num_rois, -1, 4)

    # -- entry points ----------------------------------------------------------------------

    def _rpn_terms(self, levels, image_sizes, gt_boxes, gt_valid, keys):
        """Equation (1) over the batch for the RPN outputs `levels`, with sampled anchor
        targets."""
        anchors = jnp.concatenate([a for a, _, _ in levels])  # [A, 4] over all levels
        logits = jnp.concatenate([lg for _, lg, _ in levels], axis=1)
        deltas = jnp.concatenate([d for _, _, d in levels], axis=1)

        def rpn_image_targets(k, boxes, valid, size):
            return targets.rpn_targets(
                k,
                anchors,
                boxes,
                valid,
                image_height=size[0],
                image_width=size[1],
                positive_iou=self.rpn.positive_iou,
                negative_iou=self.rpn.negative_iou,
                batch_size=self.rpn.batch_size,
                positive_fraction=self.rpn.positive_fraction,
                allowed_border=self.rpn.allowed_border,
            )

        rpn_targets = jax.vmap(rpn_image_targets)(keys, gt_boxes, gt_valid, image_sizes)
        return losses_lib.rpn_loss(
            logits,
            deltas,
            rpn_targets,
            box_weight=self.rpn.box_weight,
            box_normalizer=self.rpn.box_normalizer,
            beta=self.rpn.beta,
        )

    def _head_terms(self, features, boxes, valid, gt_boxes, gt_classes, gt_valid, keys):
        """Fast R-CNN losses on RoIs sampled from proposals `boxes` [B, P, 4]; gradients reach
        the boxes only with `head.proposal_gradients` (non-approximate joint training)."""
        if not self.head.proposal_gradients:
            boxes = jax.lax.stop_gradient(boxes)
        roi_targets = jax.vmap(
            functools.partial(
                targets.sample_proposals,
                batch_size=self.head.batch_size,
                positive_fraction=self.head.positive_fraction,
                foreground_iou=self.head.foreground_iou,
                background_iou=self.head.background_iou,
            )
        )(keys, jax.lax.stop_gradient(boxes), valid, gt_boxes, gt_classes, gt_valid)
        rois = roi_targets.rois
        if self.head.proposal_gradients:
            # Re-gather the sampled RoIs from the differentiable proposals, so that gradients
            # flow through RoIAlign into the boxes (non-approximate joint training).
            candidates = jnp.concatenate([boxes, gt_boxes], axis=1)  # [B, P + G, 4]
            rois = jnp.take_along_axis(candidates, roi_targets.sources[..., None], axis=1)
            rois = jnp.where(roi_targets.valid[..., None], rois, 0.0)
        class_logits, box_deltas = self._box_predictions(features, rois, train=True)
        return losses_lib.fast_rcnn_loss(class_logits, box_deltas, roi_targets, beta=self.head.beta)

    def losses(self, images, image_sizes, gt_boxes, gt_classes, gt_valid, key, scales=None):
        """Training losses of a batch (approximate joint training unless
        `head.proposal_gradients`), each normalised over the whole batch (torchvision's
        `compute_loss` / `fastrcnn_loss`).

        Args:
          images: float [B, H, W, 3] RGB 0-255; image_sizes: int32 [B, 2] (height, width).
          gt_boxes: float32 [B, G, 4]; gt_classes: int32 [B, G] in 1..K; gt_valid: bool [B, G].
          key: PRNG key for anchor and RoI sampling (dropout takes the 'dropout' rng).
          scales: optional float32 [B] resized / original size (for `rpn.min_size_original`).

        Returns:
          {"rpn_objectness", "rpn_box", "fast_rcnn_class", "fast_rcnn_box"} scalars.
        """
        features, rpn_features = self._features(images, image_sizes, train=True)
        rpn_keys, roi_keys = jnp.split(jax.random.split(key, 2 * images.shape[0]), 2)
        if self.head.rois == "anchors":  # one-stage: no RPN, its terms are zero
            rpn_terms = {"rpn_objectness": jnp.zeros(()), "rpn_box": jnp.zeros(())}
            proposals = self._anchor_rois(features, image_sizes, images.shape[1:3])
        else:
            levels = self._rpn(rpn_features, images.shape[1:3])
            rpn_terms = self._rpn_terms(levels, image_sizes, gt_boxes, gt_valid, rpn_keys)
            proposals = self._proposals(levels, image_sizes, scales, train=True)
        head_terms = self._head_terms(
            features, proposals.boxes, proposals.valid, gt_boxes, gt_classes, gt_valid, roi_keys
        )
        return {**rpn_terms, **head_terms}

    def rpn_losses(self, images, image_sizes, gt_boxes, gt_classes, gt_valid, key):
        """The RPN's terms alone (alternating training, steps 1 and 3); same keys as `losses`."""
        del gt_classes
        _, rpn_features = self._features(images, image_sizes, train=True)
        levels = self._rpn(rpn_features, images.shape[1:3])
        rpn_keys, _ = jnp.split(jax.random.split(key, 2 * images.shape[0]), 2)
        return self._rpn_terms(levels, image_sizes, gt_boxes, gt_valid, rpn_keys)

    def training_proposals(self, images, image_sizes, scales=None):
        """The RPN's training-time proposals (boxes [B, P, 4], valid [B, P]), no gradient."""
        _, rpn_features = self._features(images, image_sizes, train=False)
        proposals = self._proposals(
            self._rpn(rpn_features, images.shape[1:3]), image_sizes, scales, train=True
        )
        return jax.lax.stop_gradient(proposals.boxes), proposals.valid

    def head_losses(self, images, image_sizes, proposals, proposal_valid, gt_boxes, gt_classes,
                    gt_valid, key):  # fmt: skip
        """Fast R-CNN's terms on given (fixed) proposals (alternating training, steps 2 and 4)."""
        features, _ = self._features(images, image_sizes, train=True)
        _, roi_keys = jnp.split(jax.random.split(key, 2 * images.shape[0]), 2)
        return self._head_terms(
            features, proposals, proposal_valid, gt_boxes, gt_classes, gt_valid, roi_keys
        )

    def detect(self, images, image_sizes, scales=None, *, return_proposals=False):
        """Detections [B, D] in original-image pixels (`scales`: float32 [B] resized/original,
        1 when omitted). With `return_proposals`, also the RPN's proposals (boxes [B, P, 4] in
        the resized frame, descending objectness, and their `valid` mask) for recall studies."""
        features, rpn_features = self._features(images, image_sizes, train=False)
        if scales is None:
            scales = jnp.ones(images.shape[0], jnp.float32)
        one_stage = self.head.rois == "anchors"
        if one_stage:
            proposals = self._anchor_rois(features, image_sizes, images.shape[1:3])
        else:
            levels = self._rpn(rpn_features, images.shape[1:3])
            proposals = self._proposals(levels, image_sizes, scales, train=False)
        class_logits, box_deltas = self._box_predictions(features, proposals.boxes, train=False)
        detect = functools.partial(
            postprocess.detect,
            score_threshold=self.head.score_threshold,
            nms_threshold=self.head.nms_threshold,
            max_detections=self.head.max_detections,
            pre_nms_top_n=self.rpn.test_pre_nms_top_n if one_stage else None,
        )
        detections = jax.vmap(
            lambda c, d, p, v, size, s: detect(
                c, d, p, v, image_height=size[0], image_width=size[1], scale=s
            )
        )(class_logits, box_deltas, proposals.boxes, proposals.valid, image_sizes, scales)
        if return_proposals:
            return detections, (proposals.boxes, proposals.valid)
        return detections

    def __call__(self, images, image_sizes):
        return self.detect(images, image_sizes)
