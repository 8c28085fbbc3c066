"""The detector's Flax modules and the config-driven factory (`build_model`).

One module per concept, as torchvision's detection package: `backbones` / `resnet` / `fpn`,
`rpn` (RPN settings, head, anchors, proposals, its targets and loss), `roi_heads` (Fast R-CNN
settings, sampling, pooling, box head, its loss, detection), `transform` (input normalization)
and `faster_rcnn` (the composition)."""

import jax
import jax.numpy as jnp

from frcnn_jax import fields
from frcnn_jax import kernels as kernels_lib
from frcnn_jax.models import transform
from frcnn_jax.models.backbones import BACKBONES, VGG16, ZF, TinyBackbone, get_backbone
from frcnn_jax.models.faster_rcnn import FasterRCNN
from frcnn_jax.models.fpn import ResNetFPN
from frcnn_jax.models.resnet import FrozenBatchNorm, Res5Head, ResNet
from frcnn_jax.models.roi_heads import HeadSettings
from frcnn_jax.models.rpn import RPNSettings

__all__ = [
    "FasterRCNN",
    "FrozenBatchNorm",
    "HeadSettings",
    "RPNSettings",
    "Res5Head",
    "ResNet",
    "ResNetFPN",
    "TinyBackbone",
    "VGG16",
    "ZF",
    "build_model",
    "get_backbone",
    "trainable_mask",
    "with_kernels",
]


MODEL_RULES = {  # config.model's own fields; rpn / head: RPNSettings.RULES, HeadSettings.RULES
    "backbone": fields.choice(*BACKBONES),
    "num_classes": fields.count(),
    "dtype": fields.choice("float32", "bfloat16"),
    "kernels": fields.choice(*kernels_lib.KERNELS),
    "frozen_stages": fields.optional(fields.count(low=0)),
    "init_checkpoint": fields.optional(fields.text()),
    "pixel_mean": fields.sequence(fields.number(), length=3),
    "pixel_std": fields.sequence(fields.number(above=0), length=3),
    "channel_order": fields.choice(*transform.CHANNEL_ORDERS),
    "rpn": fields.mapping(),
    "head": fields.mapping(),
}


def _settings(cls, values, section):
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in dict(values or {}).items()}
    fields.check_section(values, cls.RULES, f"config.model.{section}")
    return cls(**values)


def build_model(config) -> FasterRCNN:
    """The detector described by `config.model` (the section `frcnn_jax.config.model_config`
    makes, with its defaults): backbone (name), num_classes, dtype ("float32" or "bfloat16" for
    conv/matmul compute), kernels (`frcnn_jax.kernels`), frozen_stages (leading backbone stages
    without gradient; None: the backbone's default), pixel_mean / pixel_std / channel_order (the
    input convention of the weights), and the `rpn` / `head` sections whose fields are those of
    `RPNSettings` / `HeadSettings`. A value that cannot work raises `ConfigError` naming its
    field (`MODEL_RULES` and the settings' `RULES`)."""
    model = config.model
    fields.check_section(model, MODEL_RULES, "config.model")
    dtype = jnp.dtype(model.dtype)
    rpn = _settings(RPNSettings, model.rpn, "rpn")

    def backbone():
        return get_backbone(
            model.backbone, dtype=dtype, frozen_stages=model.frozen_stages, kernels=model.kernels
        )

    return FasterRCNN(
        backbone=backbone(),
        rpn_backbone=None if rpn.shared_features else backbone(),
        num_classes=model.num_classes,
        rpn=rpn,
        head=_settings(HeadSettings, model.head, "head"),
        pixel_mean=tuple(model.pixel_mean),
        pixel_std=tuple(model.pixel_std),
        channel_order=model.channel_order,
        dtype=dtype,
        kernels=model.kernels,
    )


def with_kernels(model, kernels):
    """`model` (a `FasterRCNN`) with its backbones and heads using `kernels` (see
    `frcnn_jax.kernels`): the same parameters, another program."""
    kernels_lib.check(kernels)

    def backbone(module):
        return None if module is None else module.clone(kernels=kernels)

    return model.clone(
        kernels=kernels,
        backbone=backbone(model.backbone),
        rpn_backbone=backbone(model.rpn_backbone),
    )


def trainable_mask(model, variables):
    """bool pytree shaped like `variables["params"]`: False for the parameters the backbone
    declares frozen (its `frozen_prefixes()`: the layers behind its `freeze_if` cuts, which
    get no gradient; in the RPN's own backbone too when features are not shared), True for
    everything else. The optimizer uses it so that frozen
    parameters are neither updated nor decayed."""
    declared = getattr(model.backbone, "frozen_prefixes", tuple)()
    frozen = tuple(f"{net}/{p}/" for net in ("backbone", "rpn_backbone") for p in declared)

    def trainable(path, _):
        name = "/".join(str(getattr(k, "key", k)) for k in path) + "/"
        return not name.startswith(frozen)

    return jax.tree_util.tree_map_with_path(trainable, variables["params"])
