"""The Faster R-CNN detector (Ren et al., 2015): a backbone, the RPN (`models.rpn`) and the Fast
R-CNN head (`models.roi_heads`) composed into one Flax module with static shapes.

`FasterRCNN.losses` gives the training losses of a padded batch and `FasterRCNN.detect` a fixed
number of detections per image; both trace once per input shape. Arguments of the entry points:
images float [B, H, W, 3] RGB in 0-255 on a padded canvas; image_sizes int32 [B, 2] each image's
true (height, width) on that canvas; gt_boxes float32 [B, G, 4], gt_classes int32 [B, G] in
1..K, gt_valid bool [B, G] (ground truth padded to G slots); key: a PRNG key for anchor and RoI
sampling (per image: the first half of its split for anchors, the second for RoIs; dropout
takes the 'dropout' rng); scales float32 [B] resized / original size (1 when omitted: for
`rpn.min_size_original` and the detections' original-image pixels).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from frcnn_jax.errors import ConfigError
from frcnn_jax.models import roi_heads, transform
from frcnn_jax.models import rpn as rpn_lib
from frcnn_jax.models.backbones import feature_strides
from frcnn_jax.models.resnet import Res5Head, ResNet


class FasterRCNN(nn.Module):
    backbone: nn.Module
    num_classes: int  # K object classes, background excluded
    rpn: rpn_lib.RPNSettings
    head: roi_heads.HeadSettings
    pixel_mean: tuple  # of the channels in `channel_order`, 0-255 units
    pixel_std: tuple
    channel_order: str  # "rgb", or "bgr": the images' RGB channels are reversed first (Caffe)
    dtype: jnp.dtype
    kernels: str  # `frcnn_jax.kernels.KERNELS`, for the heads' convolutions
    rpn_backbone: nn.Module | None = None  # the RPN's own backbone when not rpn.shared_features

    def __post_init__(self):
        super().__post_init__()
        transform.check(
            pixel_mean=self.pixel_mean, pixel_std=self.pixel_std, channel_order=self.channel_order
        )
        own_backbone = self.rpn_backbone is not None
        if own_backbone == self.rpn.shared_features:
            raise ValueError(
                "rpn_backbone is given exactly when config.model.rpn.shared_features=False"
            )
        if self.head.rois == "anchors" and own_backbone:
            raise ConfigError(
                "config.model.head.rois='anchors' (one-stage) has no RPN: it cannot be combined "
                "with config.model.rpn.shared_features=False"
            )
        if self.head.box_head == "res5" and not isinstance(self.backbone, ResNet):
            raise ConfigError("config.model.head.box_head='res5' needs a ResNet C4 backbone")

    def setup(self):
        if self.head.rois == "proposals":
            rpn = self.rpn
            self.rpn_head = rpn_lib.RPNHead(
                rpn.anchors_per_location, rpn.channels, rpn.objectness, self.dtype, self.kernels
            )
        if self.head.box_head == "res5":
            self.box_head = Res5Head(self.backbone.depth, dtype=self.dtype, kernels=self.kernels)
        else:
            self.box_head = roi_heads.MLPHead(self.head.widths, self.head.dropout, self.dtype)
        self.predictor = roi_heads.FastRCNNPredictor(self.num_classes, self.dtype)

    @property
    def strides(self):
        """Stride of each feature map the backbone returns."""
        return feature_strides(self.backbone)

    def _features(self, images, image_sizes, *, train):
        """(the backbone's maps as a list, finest first (one entry for single-level
        backbones), the RPN's maps: the same list unless `rpn.shared_features` is False).
        Images are normalized first (`transform.normalize`)."""
        convention = dict(pixel_std=self.pixel_std, channel_order=self.channel_order)
        images = transform.normalize(images, image_sizes, pixel_mean=self.pixel_mean, **convention)

        def maps(backbone):
            out = backbone(images, train=train)
            return list(out) if isinstance(out, (list, tuple)) else [out]

        features = maps(self.backbone)
        return features, (features if self.rpn_backbone is None else maps(self.rpn_backbone))

    def _rpn_levels(self, features, canvas):
        """`rpn_lib.Level`s: one head shared by every level; `canvas`: the images' padded (H, W)."""
        anchors = rpn_lib.anchors_per_level(self.rpn, features, self.strides, canvas)
        return [rpn_lib.Level(a, *self.rpn_head(f)) for a, f in zip(anchors, features, strict=True)]

    def _proposals(self, features, rpn_features, canvas, image_sizes, scales, *, train):
        """(`rpn_lib.Proposals` [B, P], the RPN's levels: None for the one-stage variant)."""
        if self.head.rois == "anchors":
            anchors = rpn_lib.anchors_per_level(self.rpn, features, self.strides, canvas)
            return rpn_lib.anchor_proposals(jnp.concatenate(anchors), image_sizes), None
        levels = self._rpn_levels(rpn_features, canvas)
        return rpn_lib.propose(self.rpn, levels, image_sizes, scales, train=train), levels

    def _box_predictions(self, features, rois, *, train):
        """Logits [B, R, K+1] and deltas [B, R, K+1, 4] of RoIs [B, R, 4]."""
        roi_levels = getattr(self.backbone, "roi_levels", len(features))
        pooled = roi_heads.pool(self.head, features, rois, self.strides, roi_levels)
        batch, num_rois = rois.shape[:2]
        x = self.box_head(pooled.reshape(batch * num_rois, *pooled.shape[2:]), train=train)
        logits, deltas = self.predictor(x)
        return logits.reshape(batch, num_rois, -1), deltas.reshape(batch, num_rois, -1, 4)

    def _head_losses(self, features, boxes, valid, gt, keys):
        rois, targets = roi_heads.sample(self.head, keys, boxes, valid, *gt)
        class_logits, box_deltas = self._box_predictions(features, rois, train=True)
        return roi_heads.fast_rcnn_loss(class_logits, box_deltas, targets, beta=self.head.beta)

    # -- entry points (arguments: the module docstring) ---------------------------------------

    def losses(self, images, image_sizes, gt_boxes, gt_classes, gt_valid, key, scales=None):
        """{"rpn_objectness", "rpn_box", "fast_rcnn_class", "fast_rcnn_box"}: the training
        losses of a batch (approximate joint training unless `head.proposal_gradients`), each
        normalised over the whole batch as torchvision's (the RPN's are zero for the one-stage
        variant)."""
        features, rpn_features = self._features(images, image_sizes, train=True)
        rpn_keys, roi_keys = _image_keys(key, images.shape[0])
        proposals, levels = self._proposals(
            features, rpn_features, images.shape[1:3], image_sizes, scales, train=True
        )
        if levels is None:
            rpn_terms = {"rpn_objectness": jnp.zeros(()), "rpn_box": jnp.zeros(())}
        else:
            rpn_terms = rpn_lib.loss(self.rpn, levels, image_sizes, gt_boxes, gt_valid, rpn_keys)
        gt = (gt_boxes, gt_classes, gt_valid)
        head_terms = self._head_losses(features, proposals.boxes, proposals.valid, gt, roi_keys)
        return {**rpn_terms, **head_terms}

    def rpn_losses(self, images, image_sizes, gt_boxes, gt_classes, gt_valid, key):
        """The RPN's terms alone (alternating training, phases 1 and 3); same keys as `losses`."""
        del gt_classes
        _, rpn_features = self._features(images, image_sizes, train=True)
        levels = self._rpn_levels(rpn_features, images.shape[1:3])
        rpn_keys, _ = _image_keys(key, images.shape[0])
        return rpn_lib.loss(self.rpn, levels, image_sizes, gt_boxes, gt_valid, rpn_keys)

    def training_proposals(self, images, image_sizes, scales=None):
        """The RPN's training-time proposals (boxes [B, P, 4], valid [B, P]), no gradient."""
        features, rpn_features = self._features(images, image_sizes, train=False)
        proposals, _ = self._proposals(
            features, rpn_features, images.shape[1:3], image_sizes, scales, train=True
        )
        return jax.lax.stop_gradient(proposals.boxes), proposals.valid

    def head_losses(self, images, image_sizes, boxes, valid, gt_boxes, gt_classes, gt_valid, key):
        """Fast R-CNN's terms on given (fixed) proposals `boxes` [B, P, 4] / `valid` [B, P]
        (alternating training, phases 2 and 4)."""
        features, _ = self._features(images, image_sizes, train=True)
        _, roi_keys = _image_keys(key, images.shape[0])
        return self._head_losses(features, boxes, valid, (gt_boxes, gt_classes, gt_valid), roi_keys)

    def detect(self, images, image_sizes, scales=None, *, return_proposals=False):
        """Detections [B, D] in original-image pixels (`scales`: float32 [B] resized/original,
        1 when omitted). With `return_proposals`, also the RPN's proposals (boxes [B, P, 4] in
        the resized frame, descending objectness, and their `valid` mask) for recall studies."""
        if scales is None:
            scales = jnp.ones(images.shape[0], jnp.float32)
        features, rpn_features = self._features(images, image_sizes, train=False)
        proposals, levels = self._proposals(
            features, rpn_features, images.shape[1:3], image_sizes, scales, train=False
        )
        outputs = self._box_predictions(features, proposals.boxes, train=False)
        pre_nms_top_n = self.rpn.test_pre_nms_top_n if levels is None else None  # one-stage
        detections = roi_heads.postprocess(
            self.head, *outputs, proposals, image_sizes, scales, pre_nms_top_n=pre_nms_top_n
        )
        if return_proposals:
            return detections, (proposals.boxes, proposals.valid)
        return detections

    def __call__(self, images, image_sizes):
        return self.detect(images, image_sizes)


def _image_keys(key, num_images):
    """Per-image PRNG keys: ([B] for anchor sampling, [B] for RoI sampling)."""
    return jnp.split(jax.random.split(key, 2 * num_images), 2)
