"""Flax modules of the detector and the config-driven factory."""

import dataclasses

import jax.numpy as jnp

from frcnn_jax.models.backbones import VGG16, ZF, TinyBackbone, get_backbone
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
]


def _settings(cls, overrides, section):
    overrides = dict(overrides or {})
    known = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(
            f"config.model.{section} has unknown fields {unknown}; known: {sorted(known)}"
        )
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()})


def build_model(config) -> FasterRCNN:
    """The detector described by `config.model`: backbone (name), num_classes, dtype
    ("float32" or "bfloat16" for conv/matmul compute), frozen_stages (optional: leading
    backbone stages without gradient), and the `rpn` / `head` sections whose fields are those
    of `RPNSettings` / `HeadSettings` (paper values by default)."""
    model = config.model
    dtype = jnp.dtype(model.get("dtype", "float32"))
    return FasterRCNN(
        backbone=get_backbone(
            model.backbone, dtype=dtype, frozen_stages=model.get("frozen_stages")
        ),
        num_classes=model.num_classes,
        rpn=_settings(RPNSettings, model.get("rpn"), "rpn"),
        head=_settings(HeadSettings, model.get("head"), "head"),
        dtype=dtype,
    )
