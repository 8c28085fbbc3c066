"""The detector's input normalization (torchvision's `GeneralizedRCNNTransform.normalize`)."""

import jax.numpy as jnp

from frcnn_jax.errors import ConfigError

CHANNEL_ORDERS = ("rgb", "bgr")


def check(*, pixel_mean, pixel_std, channel_order):
    """`ConfigError` naming the field for an input convention that cannot work."""
    if channel_order not in CHANNEL_ORDERS:
        raise ConfigError(
            f"config.model.channel_order must be one of {CHANNEL_ORDERS}, got {channel_order!r}"
        )
    for name, values in (("pixel_mean", pixel_mean), ("pixel_std", pixel_std)):
        if len(values) != 3 or (name == "pixel_std" and min(values) <= 0):
            raise ConfigError(f"config.model.{name}: need 3 values (std > 0), got {values}")


def normalize(images, image_sizes, *, pixel_mean, pixel_std, channel_order):
    """float32 [B, H, W, 3]: RGB 0-255 `images` in the weights' convention (channels reversed
    for "bgr", then (x - mean) / std), with the canvas outside each image (`image_sizes` int32
    [B, 2] height, width) set to zero, as torchvision and py-faster-rcnn pad normalized
    images."""
    images = images.astype(jnp.float32)
    if channel_order == "bgr":
        images = images[..., ::-1]
    images = (images - jnp.asarray(pixel_mean, jnp.float32)) / jnp.asarray(pixel_std, jnp.float32)
    rows = jnp.arange(images.shape[1])[None, :, None] < image_sizes[:, 0, None, None]
    cols = jnp.arange(images.shape[2])[None, None, :] < image_sizes[:, 1, None, None]
    return jnp.where((rows & cols)[..., None], images, 0.0)
