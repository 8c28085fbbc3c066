"""Backbones: images [B, H, W, 3] (already normalized) -> a feature map [B, H/s, W/s, C].

Each backbone states its `stride` and output `channels`, and names its layers like the
reference so weights can later be imported (VGG-16: torchvision's `vgg16().features`).
"""

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from frcnn_jax import kernels as kernels_lib
from frcnn_jax.errors import ConfigError
from frcnn_jax.models.fpn import ResNetFPN, feature_pyramid
from frcnn_jax.models.resnet import ResNet, freeze_if

# ImageNet statistics in 0-255 pixel units (torchvision's, scaled), for pretrained backbones.
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
BN_EPSILON = 1e-5  # pretraining's BatchNorm (`conv_relu`)
BACKBONES = (  # the names `get_backbone` knows
    "tiny",
    "tiny_fpn",
    "vgg16",
    "zf",
    "resnet50_c4",
    "resnet101_c4",
    "resnet50_fpn",
    "resnet101_fpn",
)


def conv_relu(module, conv, x, features, kernel, name, *, train, **kwargs):
    """relu(conv(x)) inside a compact backbone `module`; with `module.batch_norm` (pretraining
    only) a BatchNorm `<name>_bn` between the two, which `frcnn_jax.pretraining` folds into the
    conv's kernel and bias when it writes the weights, so the detector's plain conv computes
    exactly the trained network."""
    y = conv(features, kernel, dtype=module.dtype, name=name, **kwargs)(x)
    if module.batch_norm:
        y = nn.BatchNorm(
            use_running_average=not train, momentum=0.9, epsilon=BN_EPSILON, name=f"{name}_bn"
        )(y)
    return kernels_lib.relu(y, kernels=module.kernels)


class TinyBackbone(nn.Module):
    """A small stride-16 convnet for tests and CPU experiments."""

    widths: Sequence[int] = (16, 32, 64, 128)
    dtype: jnp.dtype = jnp.float32
    kernels: str = kernels_lib.DEFAULT
    batch_norm: bool = False  # pretraining only (`conv_relu`)
    stride = 16

    @property
    def channels(self):
        return self.widths[-1]

    @nn.compact
    def __call__(self, images, *, train=False, all_stages=False):
        """The last stage's map, or every stage's (strides 2, 4, 8, ...) with `all_stages`."""
        x = images.astype(self.dtype)
        conv = kernels_lib.conv_layer(self.kernels)
        stages = []
        for i, width in enumerate(self.widths):
            # Stride-2 stages: 3x3 conv with stride 2, then a 3x3 conv.
            x = conv_relu(self, conv, x, width, (3, 3), f"down{i}", train=train, strides=2)
            x = conv_relu(self, conv, x, width, (3, 3), f"conv{i}", train=train)
            stages.append(x)
        return stages if all_stages else x


class TinyFPN(nn.Module):
    """A five-stage tiny convnet with an FPN on its last three stages: P3-P5 at strides 8, 16
    and 32 (`channels` wide), for CPU experiments where small objects matter (`shapes`)."""

    widths: Sequence[int] = (16, 32, 64, 128, 256)
    channels: int = 64
    dtype: jnp.dtype = jnp.float32
    kernels: str = kernels_lib.DEFAULT
    batch_norm: bool = False  # the body's, pretraining only (`conv_relu`)
    strides = (8, 16, 32)
    roi_levels = 3
    pyramid = True  # `__call__(..., pyramid=False)`: the body's last map alone

    @nn.compact
    def __call__(self, images, *, train=False, pyramid=True):
        """P3-P5, or with `pyramid=False` the body's C5 alone (classification pretraining
        trains the body; the FPN layers start fresh in the detector)."""
        body = TinyBackbone(
            self.widths,
            dtype=self.dtype,
            kernels=self.kernels,
            batch_norm=self.batch_norm,
            name="body",
        )
        stages = body(images, train=train, all_stages=True)[2:]  # C3-C5
        if not pyramid:
            return stages[-1]
        return feature_pyramid(stages, self.channels, self.dtype, self.kernels)


_VGG16_LAYOUT = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))


class VGG16(nn.Module):
    """VGG-16 up to conv5_3 (stride 16, 512 channels): the paper's headline backbone.

    Layers are named `conv{block}_{layer}` like the Caffe model. The first `frozen_blocks`
    blocks get no gradient (the paper freezes conv1 and conv2): the backward pass stops at
    their output, which also skips its costliest, highest-resolution part.
    """

    dtype: jnp.dtype = jnp.float32
    kernels: str = kernels_lib.DEFAULT
    frozen_blocks: int = 2
    batch_norm: bool = False  # pretraining only (`conv_relu`)
    stride = 16
    channels = 512

    @nn.compact
    def __call__(self, images, *, train=False):
        x = images.astype(self.dtype)
        conv = kernels_lib.conv_layer(self.kernels)
        for block, widths in enumerate(_VGG16_LAYOUT, start=1):
            for layer, width in enumerate(widths, start=1):
                name = f"conv{block}_{layer}"
                x = conv_relu(self, conv, x, width, (3, 3), name, train=train, padding=1)
            if block < len(_VGG16_LAYOUT):  # no pool5: conv5_3 is the shared feature map
                x = kernels_lib.max_pool(
                    x, window=2, stride=2, padding="VALID", kernels=self.kernels
                )
            x = freeze_if(x, block <= self.frozen_blocks)
        return x

    def frozen_prefixes(self):
        """The layers `freeze_if` cuts off (paths within this module): conv1_x ... of the first
        `frozen_blocks` blocks."""
        return tuple(
            f"conv{block}_{layer}"
            for block, widths in enumerate(_VGG16_LAYOUT[: self.frozen_blocks], start=1)
            for layer in range(1, len(widths) + 1)
        )


def _local_response_norm(x, *, size=3, alpha=5e-5, beta=0.75):
    """Caffe's LRN with norm_region WITHIN_CHANNEL: x / (1 + alpha * mean_{size x size} x^2)^beta
    (the mean over a zero-padded window, as Caffe's average pooling computes it)."""
    squares = nn.avg_pool(
        jnp.square(x.astype(jnp.float32)), (size, size), padding="SAME", count_include_pad=True
    )
    return (x / jnp.power(1.0 + alpha * squares, beta)).astype(x.dtype)


class ZF(nn.Module):
    """Zeiler and Fergus's net up to conv5 (stride 16, 256 channels): the paper's fast model,
    as in py-faster-rcnn's ZF prototxt (LRN after conv1 and conv2)."""

    dtype: jnp.dtype = jnp.float32
    kernels: str = kernels_lib.DEFAULT
    batch_norm: bool = False  # pretraining only (`conv_relu`)
    stride = 16
    channels = 256

    @nn.compact
    def __call__(self, images, *, train=False):
        x = images.astype(self.dtype)
        conv = kernels_lib.conv_layer(self.kernels)
        for name, width, kernel, stride in (("conv1", 96, 7, 2), ("conv2", 256, 5, 2)):
            size, padding = (kernel, kernel), kernel // 2
            x = conv_relu(
                self, conv, x, width, size, name, train=train, strides=stride, padding=padding
            )
            x = kernels_lib.max_pool(
                _local_response_norm(x),
                window=3,
                stride=2,
                padding=((1, 1), (1, 1)),
                kernels=self.kernels,
            )
        for name, width in (("conv3", 384), ("conv4", 384), ("conv5", 256)):
            x = conv_relu(self, conv, x, width, (3, 3), name, train=train, padding=1)
        return x


def feature_strides(backbone):
    """The stride of each feature map `backbone` returns (one for single-map backbones)."""
    strides = getattr(backbone, "strides", None)  # multi-level backbones
    return tuple(strides) if strides is not None else (backbone.stride,)


def get_backbone(name: str, *, dtype, frozen_stages, kernels, batch_norm=False) -> nn.Module:
    """The backbone module called `name`: "tiny", "tiny_fpn", "vgg16", "zf", "resnet50_c4" /
    "resnet101_c4" (stem to res4, stride 16; their res5 is the box head, see
    `HeadSettings.box_head`) or "resnet50_fpn" / "resnet101_fpn" (P2-P6, a list of maps).

    dtype: conv/matmul compute dtype. frozen_stages: leading stages that get no gradient (None:
    each backbone's default, the paper's conv1-conv2 for VGG-16 and torchvision's stem +
    layer1 for ResNets). kernels: `frcnn_jax.kernels.KERNELS`. batch_norm: classification
    pretraining's trained BatchNorm: after each conv of the plain backbones (tiny, tiny_fpn,
    vgg16, zf; `conv_relu`), in place of the ResNets' frozen ones (`resnet.norm_layer`)."""
    frozen = {} if frozen_stages is None else {"frozen_stages": frozen_stages}
    vgg_frozen = {} if frozen_stages is None else {"frozen_blocks": frozen_stages}
    common = {"dtype": dtype, "kernels": kernels, "batch_norm": batch_norm}
    backbones = {
        "tiny": lambda: TinyBackbone(**common),
        "tiny_fpn": lambda: TinyFPN(**common),
        "vgg16": lambda: VGG16(**common, **vgg_frozen),
        "zf": lambda: ZF(**common),
        "resnet50_c4": lambda: ResNet(depth=50, num_stages=3, **common, **frozen),
        "resnet101_c4": lambda: ResNet(depth=101, num_stages=3, **common, **frozen),
        "resnet50_fpn": lambda: ResNetFPN(depth=50, **common, **frozen),
        "resnet101_fpn": lambda: ResNetFPN(depth=101, **common, **frozen),
    }
    if name not in backbones:
        raise ConfigError(f"config.model.backbone must be one of {BACKBONES}, got {name!r}")
    return backbones[name]()
