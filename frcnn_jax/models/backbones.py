"""Backbones: images [B, H, W, 3] (already normalized) -> a feature map [B, H/s, W/s, C].

Each backbone states its `stride` and output `channels`, and names its layers like the
reference so weights can later be imported (VGG-16: torchvision's `vgg16().features`).
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from frcnn_jax.models.conv import Conv
from frcnn_jax.models.fpn import ResNetFPN, feature_pyramid
from frcnn_jax.models.resnet import ResNet, freeze_if

# ImageNet statistics in 0-255 pixel units (torchvision's, scaled), for pretrained backbones.
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


def _max_pool(x, *, window=2, stride=2, padding="VALID"):
    if (window, stride, padding) == (2, 2, "VALID"):
        return max_pool_2x2(x)
    return nn.max_pool(x, (window, window), strides=(stride, stride), padding=padding)


def _pool_windows(x):
    """[N, H, W, C] -> [N, H // 2, 2, W // 2, 2, C]; an odd last row or column is dropped."""
    n, h, w, c = x.shape
    return x[:, : h // 2 * 2, : w // 2 * 2].reshape(n, h // 2, 2, w // 2, 2, c)


@jax.custom_vjp
def max_pool_2x2(x):
    """2x2 max pooling with stride 2 (VGG's; floor mode) on [N, H, W, C].

    The same values as `nn.max_pool(x, (2, 2), strides=(2, 2))`, and the same gradient as
    torch's `max_pool2d` (each window's first maximum in row-major order gets it), but computed
    with elementwise ops: XLA's CPU backend expands the generic pooling gradient
    (select-and-scatter) into index arrays and windowed reductions about 10x slower (VGG-16's
    pools at 600 x 1000).
    """
    return jnp.max(_pool_windows(x), axis=(2, 4))


def _max_pool_2x2_fwd(x):
    out = max_pool_2x2(x)
    return out, (x, out)


def _max_pool_2x2_bwd(residuals, grad):
    x, out = residuals
    windows = _pool_windows(x)
    taken = jnp.zeros(out.shape, bool)  # the window's first maximum is already found
    rows = []
    for dy in range(2):
        row = []
        for dx in range(2):
            first = (windows[:, :, dy, :, dx] == out) & ~taken
            taken = taken | first
            row.append(jnp.where(first, grad, 0).astype(x.dtype))
        rows.append(jnp.stack(row, axis=3))
    n, h, w, c = x.shape
    d_x = jnp.stack(rows, axis=2).reshape(n, h // 2 * 2, w // 2 * 2, c)
    return (jnp.pad(d_x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0))),)


max_pool_2x2.defvjp(_max_pool_2x2_fwd, _max_pool_2x2_bwd)


class TinyBackbone(nn.Module):
    """A small stride-16 convnet for tests and CPU experiments."""

    widths: Sequence[int] = (16, 32, 64, 128)
    dtype: jnp.dtype = jnp.float32
    stride = 16

    @property
    def channels(self):
        return self.widths[-1]

    @nn.compact
    def __call__(self, images, *, train=False, all_stages=False):
        """The last stage's map, or every stage's (strides 2, 4, 8, ...) with `all_stages`."""
        del train
        x = images.astype(self.dtype)
        stages = []
        for i, width in enumerate(self.widths):
            # Stride-2 stages: 3x3 conv with stride 2, then a 3x3 conv.
            x = nn.relu(Conv(width, (3, 3), strides=2, dtype=self.dtype, name=f"down{i}")(x))
            x = nn.relu(Conv(width, (3, 3), dtype=self.dtype, name=f"conv{i}")(x))
            stages.append(x)
        return stages if all_stages else x


class TinyFPN(nn.Module):
    """A five-stage tiny convnet with an FPN on its last three stages: P3-P5 at strides 8, 16
    and 32 (`channels` wide), for CPU experiments where small objects matter (`shapes`)."""

    widths: Sequence[int] = (16, 32, 64, 128, 256)
    channels: int = 64
    dtype: jnp.dtype = jnp.float32
    strides = (8, 16, 32)
    roi_levels = 3

    @nn.compact
    def __call__(self, images, *, train=False):
        del train
        body = TinyBackbone(self.widths, dtype=self.dtype, name="body")
        stages = body(images, all_stages=True)[2:]  # C3-C5
        return feature_pyramid(stages, self.channels, self.dtype)


_VGG16_LAYOUT = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))


class VGG16(nn.Module):
    """VGG-16 up to conv5_3 (stride 16, 512 channels): the paper's headline backbone.

    Layers are named `conv{block}_{layer}` like the Caffe model. The first `frozen_blocks`
    blocks get no gradient (the paper freezes conv1 and conv2): the backward pass stops at
    their output, which also skips its costliest, highest-resolution part.
    """

    dtype: jnp.dtype = jnp.float32
    frozen_blocks: int = 2
    stride = 16
    channels = 512

    @nn.compact
    def __call__(self, images, *, train=False):
        del train
        x = images.astype(self.dtype)
        for block, widths in enumerate(_VGG16_LAYOUT, start=1):
            for layer, width in enumerate(widths, start=1):
                conv = Conv(width, (3, 3), padding=1, dtype=self.dtype, name=f"conv{block}_{layer}")
                x = nn.relu(conv(x))
            if block < len(_VGG16_LAYOUT):  # no pool5: conv5_3 is the shared feature map
                x = _max_pool(x)
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
    stride = 16
    channels = 256

    @nn.compact
    def __call__(self, images, *, train=False):
        del train
        x = images.astype(self.dtype)
        for name, width, kernel, stride in (("conv1", 96, 7, 2), ("conv2", 256, 5, 2)):
            x = nn.relu(
                Conv(
                    width,
                    (kernel, kernel),
                    strides=stride,
                    padding=kernel // 2,
                    dtype=self.dtype,
                    name=name,
                )(x)
            )
            x = _max_pool(_local_response_norm(x), window=3, padding=((1, 1), (1, 1)))
        for name, width in (("conv3", 384), ("conv4", 384), ("conv5", 256)):
            x = nn.relu(Conv(width, (3, 3), padding=1, dtype=self.dtype, name=name)(x))
        return x


def get_backbone(name: str, *, dtype=jnp.float32, frozen_stages=None) -> nn.Module:
    """The backbone module called `name`: "tiny", "vgg16", "zf", "resnet50_c4" / "resnet101_c4"
    (stem to res4, stride 16; their res5 is the box head, see `HeadSettings.box_head`) or
    "resnet50_fpn" / "resnet101_fpn" (P2-P6, a list of maps).

    frozen_stages: leading stages that get no gradient (None: each backbone's default, the
    paper's conv1-conv2 for VGG-16 and torchvision's stem + layer1 for ResNets)."""
    frozen = {} if frozen_stages is None else {"frozen_stages": frozen_stages}
    vgg_frozen = {} if frozen_stages is None else {"frozen_blocks": frozen_stages}
    backbones = {
        "tiny": lambda: TinyBackbone(dtype=dtype),
        "tiny_fpn": lambda: TinyFPN(dtype=dtype),
        "vgg16": lambda: VGG16(dtype=dtype, **vgg_frozen),
        "zf": lambda: ZF(dtype=dtype),
        "resnet50_c4": lambda: ResNet(depth=50, num_stages=3, dtype=dtype, **frozen),
        "resnet101_c4": lambda: ResNet(depth=101, num_stages=3, dtype=dtype, **frozen),
        "resnet50_fpn": lambda: ResNetFPN(depth=50, dtype=dtype, **frozen),
        "resnet101_fpn": lambda: ResNetFPN(depth=101, dtype=dtype, **frozen),
    }
    if name not in backbones:
        raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(backbones)}")
    return backbones[name]()
