"""The models' convolution, max-pooling and ReLU layers, with a choice of kernels (`model.kernels`).

- "auto" (the default): frcnn_jax's own kernels where they apply. Convolutions: float32 NHWC
  layers traced for the CPU backend get `conv.conv_general_dilated` (layout pins, per-tap
  weight gradients, Winograd for large 3x3 layers); other backends and dtypes get XLA's
  convolution. Max pooling: `pooling.max_pool_2x2` (VGG's 2x2) and `pooling.stem_max_pool`
  (ResNet's 3x3 stride-2 stem) on every backend, plain `jnp` ops. ReLU: `activation.relu`,
  whose backward pass keeps a bit mask instead of the pre-activation (every backend).
- "xla": XLA's own `lax.conv_general_dilated`, `nn.max_pool` and `nn.relu` everywhere. Same
  values and gradients up to float32 rounding; what `frcnn_jax.export` traces with, since the
  CPU layout pins are CPU-only custom calls that a portable serialized model cannot carry.

The choice is a module attribute passed down like any other setting (not a global), so two
models with different kernels can live in one process and jit's cache tells them apart.
"""

import functools

import flax.linen as nn

from frcnn_jax.errors import ConfigError
from frcnn_jax.kernels import activation, conv, pooling

KERNELS = ("auto", "xla")
DEFAULT = "auto"


def check(kernels):
    """`ConfigError` naming the setting when `kernels` is not one of `KERNELS`."""
    if kernels not in KERNELS:
        raise ConfigError(f"config.model.kernels must be one of {KERNELS}, got {kernels!r}")


def conv_layer(kernels):
    """The `nn.Conv` class for `kernels` (same parameters, shapes and semantics either way)."""
    check(kernels)
    if kernels == "xla":
        return nn.Conv
    return functools.partial(nn.Conv, conv_general_dilated=conv.conv_general_dilated)


def max_pool(x, *, window, stride, padding, kernels):
    """`nn.max_pool(x, (window, window), (stride, stride), padding)` on [N, H, W, C], by this
    package's kernel for the windows it has one for (2x2 stride 2 unpadded; 3x3 stride 2
    padded by 1) when `kernels="auto"`."""
    check(kernels)
    if kernels == "auto" and (window, stride, padding) == (2, 2, "VALID"):
        return pooling.max_pool_2x2(x)
    if kernels == "auto" and (window, stride, padding) == (3, 2, ((1, 1), (1, 1))):
        return pooling.stem_max_pool(x)
    return nn.max_pool(x, (window, window), strides=(stride, stride), padding=padding)


def relu(x, *, kernels):
    """`nn.relu(x)`, by `activation.relu` (a bit mask for the backward pass) when
    `kernels="auto"`: the same values and gradients."""
    check(kernels)
    return activation.relu(x) if kernels == "auto" else nn.relu(x)
