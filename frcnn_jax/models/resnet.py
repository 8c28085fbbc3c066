"""ResNet-50/101 (torchvision's v1.5 layout: stride on the 3x3 conv) with frozen BatchNorm.

`ResNet` runs the stem and stages up to `num_stages` (3 for the C4 detector: stride 16, 1024
channels); `ResNetStage` builds any single stage, which the C4 detector applies after RoI
pooling as its box head (res5, stride 2, 2048 channels). Layer names follow torchvision
(`conv1`, `bn1`, `layer1`.. `layer4`, `downsample_conv`/`downsample_bn`) so weights can be
imported; BatchNorm statistics and affine terms live in the `batch_stats` collection and are
never trained (torchvision's `FrozenBatchNorm2d`).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from frcnn_jax import kernels as kernels_lib

DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
_WIDTHS = (64, 128, 256, 512)


def freeze_if(x, frozen):
    """x, with no gradient flowing back through it when `frozen` (a static bool)."""
    return jax.lax.stop_gradient(x) if frozen else x


class FrozenBatchNorm(nn.Module):
    """y = (x - mean) / sqrt(var + eps) * weight + bias with fixed statistics and affine terms."""

    eps: float = 1e-5
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        channels = x.shape[-1]

        def stat(name, init):
            return self.variable("batch_stats", name, lambda: init(channels, jnp.float32)).value

        weight, bias = stat("weight", jnp.ones), stat("bias", jnp.zeros)
        mean, var = stat("mean", jnp.zeros), stat("var", jnp.ones)
        scale = weight * jax.lax.rsqrt(var + self.eps)
        return (x * scale.astype(self.dtype) + (bias - mean * scale).astype(self.dtype)).astype(
            self.dtype
        )


def norm_layer(batch_norm, dtype, name, train):
    """The BatchNorm of a ResNet: frozen (the detector's), or with `batch_norm` a trained one
    (classification pretraining; `frcnn_jax.pretraining` turns its scale, bias and running
    statistics into the frozen layer's weight, bias, mean and var)."""
    if batch_norm:
        return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)
    return FrozenBatchNorm(dtype=dtype, name=name)


class Bottleneck(nn.Module):
    width: int
    stride: int = 1
    downsample: bool = False
    dtype: jnp.dtype = jnp.float32
    kernels: str = kernels_lib.DEFAULT
    batch_norm: bool = False  # pretraining only (`norm_layer`)

    @nn.compact
    def __call__(self, x, train=False):
        def conv(features, kernel, stride, name):
            return kernels_lib.conv_layer(self.kernels)(
                features,
                (kernel, kernel),
                strides=stride,
                padding=kernel // 2,
                use_bias=False,
                dtype=self.dtype,
                name=name,
            )

        def norm(name):
            return norm_layer(self.batch_norm, self.dtype, name, train)

        def relu(x):
            return kernels_lib.relu(x, kernels=self.kernels)

        y = relu(norm("bn1")(conv(self.width, 1, 1, "conv1")(x)))
        y = relu(norm("bn2")(conv(self.width, 3, self.stride, "conv2")(y)))
        y = norm("bn3")(conv(self.width * 4, 1, 1, "conv3")(y))
        if self.downsample:
            x = norm("downsample_bn")(conv(self.width * 4, 1, self.stride, "downsample_conv")(x))
        return relu(x + y)


class ResNetStage(nn.Module):
    """Stage `index` (0-3 = torchvision's layer1-layer4) of a ResNet of `depth`."""

    depth: int
    index: int
    dtype: jnp.dtype = jnp.float32
    kernels: str = kernels_lib.DEFAULT
    batch_norm: bool = False  # pretraining only (`norm_layer`)

    @nn.compact
    def __call__(self, x, train=False):
        width = _WIDTHS[self.index]
        stride = 1 if self.index == 0 else 2
        for block in range(DEPTHS[self.depth][self.index]):
            x = Bottleneck(
                width,
                stride if block == 0 else 1,
                downsample=block == 0,
                dtype=self.dtype,
                kernels=self.kernels,
                batch_norm=self.batch_norm,
                name=f"block{block}",
            )(x, train)
        return x


class ResNet(nn.Module):
    """ResNet stem + the first `num_stages` stages: stride 16 and 1024 channels for 3 (C4)."""

    depth: int = 50
    num_stages: int = 3
    dtype: jnp.dtype = jnp.float32
    kernels: str = kernels_lib.DEFAULT
    # Leading parts without gradient, counting the stem as 1: torchvision's detection default
    # (trainable_backbone_layers=3) freezes the stem and layer1.
    frozen_stages: int = 2
    batch_norm: bool = False  # pretraining only (`norm_layer`)

    @property
    def stride(self):
        return 2 ** (self.num_stages + 1)

    @property
    def channels(self):
        return _WIDTHS[self.num_stages - 1] * 4

    @nn.compact
    def __call__(self, images, *, train=False, all_stages=False):
        """The last stage's map, or with `all_stages` the list of every stage's (C2, C3, ...)."""
        if self.depth not in DEPTHS:
            raise ValueError(f"ResNet depth must be one of {sorted(DEPTHS)}; got {self.depth}")
        conv = kernels_lib.conv_layer(self.kernels)
        x = conv(64, (7, 7), strides=2, padding=3, use_bias=False, dtype=self.dtype, name="conv1")(
            images.astype(self.dtype)
        )
        x = norm_layer(self.batch_norm, self.dtype, "bn1", train)(x)
        x = kernels_lib.relu(x, kernels=self.kernels)
        x = kernels_lib.max_pool(
            x, window=3, stride=2, padding=((1, 1), (1, 1)), kernels=self.kernels
        )
        x = freeze_if(x, self.frozen_stages >= 1)
        stages = []
        for index in range(self.num_stages):
            x = ResNetStage(
                self.depth,
                index,
                dtype=self.dtype,
                kernels=self.kernels,
                batch_norm=self.batch_norm,
                name=f"layer{index + 1}",
            )(x, train)
            x = freeze_if(x, self.frozen_stages >= index + 2)
            stages.append(x)
        return stages if all_stages else x

    def frozen_prefixes(self):
        """The parts `freeze_if` cuts off (paths within this module): the stem (conv1, bn1)
        when `frozen_stages` >= 1, then layer1 ... layer{frozen_stages - 1}."""
        stem = ("conv1", "bn1") if self.frozen_stages >= 1 else ()
        last = min(self.frozen_stages - 1, self.num_stages)
        return stem + tuple(f"layer{index}" for index in range(1, last + 1))


class Res5Head(nn.Module):
    """The C4 detector's box head: res5 (stride 2) on pooled RoIs, then average pooling."""

    depth: int = 50
    dtype: jnp.dtype = jnp.float32
    kernels: str = kernels_lib.DEFAULT

    @nn.compact
    def __call__(self, pooled, *, train):
        del train
        stage = ResNetStage(self.depth, 3, dtype=self.dtype, kernels=self.kernels, name="layer4")
        x = stage(pooled.astype(self.dtype))
        return jnp.mean(x, axis=(1, 2))  # [R, 2048]
