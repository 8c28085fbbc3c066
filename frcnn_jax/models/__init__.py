"""Flax modules of the detector and the config-driven factory."""

import dataclasses
import numbers
import types

import jax
import jax.numpy as jnp

from frcnn_jax.models.backbones import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    VGG16,
    ZF,
    TinyBackbone,
    get_backbone,
)
from frcnn_jax.models.faster_rcnn import FasterRCNN, HeadSettings, RPNSettings
from frcnn_jax.models.fpn import ResNetFPN
from frcnn_jax.models.resnet import FrozenBatchNorm, Res5Head, ResNet

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
]


def _settings(cls, overrides, section):
    overrides = dict(overrides or {})
    known = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(
            f"config.model.{section} has unknown fields {unknown}; known: {sorted(known)}"
        )
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    for field in dataclasses.fields(cls):
        if field.name in values:
            _check_type(f"config.model.{section}.{field.name}", values[field.name], field.type)
    return cls(**values)


def _check_type(name, value, annotation):
    """ValueError naming the field when `value` does not fit the settings field's type."""
    allowed = annotation.__args__ if isinstance(annotation, types.UnionType) else (annotation,)
    for kind in allowed:
        if kind is type(None) and value is None:
            return
        if kind is float and isinstance(value, numbers.Real) and not isinstance(value, bool):
            return
        if kind is int and isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return
        if kind in (str, bool, tuple) and isinstance(value, kind):
            return
    names = " or ".join("None" if k is type(None) else k.__name__ for k in allowed)
    raise ValueError(f"{name} must be {names}, got {value!r}")


def build_model(config) -> FasterRCNN:
    """The detector described by `config.model`: backbone (name), num_classes, dtype
    ("float32" or "bfloat16" for conv/matmul compute), frozen_stages (optional: leading
    backbone stages without gradient), pixel_mean / pixel_std / channel_order (the input
    convention of the weights; torchvision's ImageNet RGB statistics by default), and the
    `rpn` / `head` sections whose fields are those of `RPNSettings` / `HeadSettings` (paper
    values by default)."""
    model = config.model
    dtype = jnp.dtype(model.get("dtype", "float32"))
    rpn = _settings(RPNSettings, model.get("rpn"), "rpn")

    def backbone():
        return get_backbone(model.backbone, dtype=dtype, frozen_stages=model.get("frozen_stages"))

    return FasterRCNN(
        backbone=backbone(),
        rpn_backbone=None if rpn.shared_features else backbone(),
        num_classes=model.num_classes,
        rpn=rpn,
        head=_settings(HeadSettings, model.get("head"), "head"),
        pixel_mean=tuple(model.get("pixel_mean", IMAGENET_MEAN)),
        pixel_std=tuple(model.get("pixel_std", IMAGENET_STD)),
        channel_order=model.get("channel_order", "rgb"),
        dtype=dtype,
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
