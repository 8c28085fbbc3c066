"""The classifier pretraining trains: a detector backbone, global average pooling, one linear
layer. The backbone is the detector's own module under the same name (`params/backbone/...`),
so its trained parameters are a detector's backbone as they stand (`weights file`,
`frcnn_jax.pretraining.loop.backbone_weights`)."""

import flax.linen as nn
import jax.numpy as jnp

from frcnn_jax.models import transform
from frcnn_jax.models.backbones import feature_strides, get_backbone


class Classifier(nn.Module):
    """uint8 RGB images [B, S, S, 3] -> class logits [B, K]: the backbone's last map, averaged
    over space, then one linear layer. FPN backbones (`pyramid`) are classified from their
    body's last stage, as ImageNet classifiers are: pretraining trains the body, and the
    detector's FPN layers start fresh, as with imported ImageNet ResNet weights."""

    backbone: nn.Module
    num_classes: int
    pixel_mean: tuple
    pixel_std: tuple
    channel_order: str = "rgb"

    @property
    def backbone_strides(self):
        return feature_strides(self.backbone)

    @nn.compact
    def __call__(self, images, *, train=False):
        sizes = jnp.broadcast_to(jnp.asarray(images.shape[1:3], jnp.int32), (images.shape[0], 2))
        x = transform.normalize(
            images,
            sizes,
            pixel_mean=self.pixel_mean,
            pixel_std=self.pixel_std,
            channel_order=self.channel_order,
        )
        if getattr(self.backbone, "pyramid", False):  # FPN: the body only
            features = self.backbone(x, train=train, pyramid=False)
        else:
            features = self.backbone(x, train=train)
        pooled = jnp.mean(features.astype(jnp.float32), axis=(1, 2))
        return nn.Dense(self.num_classes, name="classifier")(pooled)


def build_classifier(config) -> Classifier:
    """The classifier of a pretraining config (`frcnn_jax.pretraining.config`): every backbone
    layer trained (no frozen stages), with BatchNorm after each conv of a plain backbone
    (folded into the convs when the weights are written: `loop.save_backbone`). Without it a
    plain deep net from random weights does not leave chance level on shapes_classes in
    thousands of steps (VGG's authors trained their deep nets from shallower ones for the
    same reason)."""
    model = config.model
    backbone = get_backbone(
        model.backbone,
        dtype=jnp.dtype(model.dtype),
        frozen_stages=0,
        kernels=model.kernels,
        batch_norm=True,
    )
    return Classifier(
        backbone=backbone,
        num_classes=model.num_classes,
        pixel_mean=tuple(model.pixel_mean),
        pixel_std=tuple(model.pixel_std),
        channel_order=model.channel_order,
    )
