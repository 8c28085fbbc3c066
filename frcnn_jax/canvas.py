"""Where an image goes: the scale rule and the static canvases (plain Python, no JAX or PIL).

Shared by training and evaluation (`frcnn_jax.data.preprocess`), `frcnn_jax.inference.Detector`
and the standalone exported model (`frcnn_jax.exported`), so all of them resize alike: the
short side to `min_size`, the long side at most `max_size`, the result inside the canvas of
the image's orientation.
"""

import math


def canvas_for(height, width, canvas, *, orient=True):
    """The static (H, W) canvas an image of `height` x `width` goes on.

    With `orient`, images whose orientation differs from the configured `canvas` go on the
    transposed canvas (a portrait image on (1000, 600) when the canvas is (600, 1000)), so
    every image keeps the same scale rule whatever its orientation: at most two shapes, each
    compiled once. Square images and square canvases keep `canvas`. Without `orient`, every
    image goes on `canvas` and portrait images are shrunk to fit it."""
    canvas_h, canvas_w = canvas
    if (
        orient
        and canvas_h != canvas_w
        and height != width
        and (height > width) != (canvas_h > canvas_w)
    ):
        return canvas_w, canvas_h
    return canvas_h, canvas_w


def canvases(canvas, *, orient=True):
    """Every canvas `canvas_for` can return: the configured one first."""
    canvas = tuple(canvas)
    other = canvas[::-1]
    return [canvas, other] if orient and other != canvas else [canvas]


def resize_scale(height, width, *, min_size, max_size, canvas):
    """The one scale factor for an image: short side -> min_size, long side <= max_size, and the
    resized image fits the (height, width) canvas (images that do not fit it are scaled down
    rather than cropped)."""
    return min(
        min_size / min(height, width),
        max_size / max(height, width),
        canvas[0] / height,
        canvas[1] / width,
    )


def resized_size(height, width, scale):
    # floor like torchvision's interpolate(scale_factor=...), never below one pixel
    return max(math.floor(height * scale + 1e-6), 1), max(math.floor(width * scale + 1e-6), 1)


def scaled_sizes(data, min_size):
    """{min_size, max_size, canvas} of `data` (a config.data section) for images resized to
    short side `min_size`: the long side limit and the canvas scaled alike."""
    factor = min_size / data.min_size
    return {
        "min_size": int(min_size),
        "max_size": max(int(min_size), round(data.max_size * factor)),
        "canvas": tuple(math.ceil(side * factor) for side in data.canvas),
    }


def train_canvas(data):
    """The (H, W) canvas training batches use: `data.canvas`, or with `data.train_scales` the
    canvas of the largest scale (smaller scales are padded onto it: one compiled shape)."""
    if not data.train_scales:
        return tuple(data.canvas)
    return scaled_sizes(data, max(data.train_scales))["canvas"]
