"""`shapes`: a procedurally generated detection dataset, deterministic from a seed.

Eight classes told apart only by outline (colour is random per object, never a cue), on textured
backgrounds with clutter (lines and irregular blobs that are not objects). Objects have a longer
side of about 16 to 300 pixels (log-uniform), aspect ratios 1:3 to 3:1, 0 to 8 per image, may
leave the frame, and occlude each other: later objects are drawn over earlier ones and each box
is the tight box of the object's *visible* pixels. An object with less than
`DIFFICULT_VISIBLE_FRACTION` of itself visible is marked difficult (ignored by training targets
and evaluation, as VOC does); one with almost nothing visible is not labelled.

`render(seed, split, index)` is a pure function of its arguments: the same call gives the same
bytes on every machine (NumPy's PCG64 streams and PIL's rasteriser). Splits draw from disjoint
random streams.
"""

import numpy as np
from PIL import Image, ImageDraw

CLASS_NAMES = (
    "rectangle",
    "ellipse",
    "triangle",
    "diamond",
    "cross",
    "star",
    "ring",
    "arrow",
)
SPLITS = {"train": 0, "validation": 1, "test": 2}
MIN_SIDE, MAX_SIDE = 16.0, 300.0  # longer side of an object, pixels
MAX_ASPECT = 3.0
MAX_OBJECTS = 8
DIFFICULT_VISIBLE_FRACTION = 0.4
MIN_VISIBLE_PIXELS = 16


def _star(points=5, inner=0.42):
    angles = np.pi * np.arange(2 * points) / points - np.pi / 2
    radius = np.where(np.arange(2 * points) % 2 == 0, 0.5, 0.5 * inner)
    return list(zip(0.5 + radius * np.cos(angles), 0.5 + radius * np.sin(angles), strict=True))


def _regular(sides):
    angles = 2 * np.pi * np.arange(sides) / sides - np.pi / 2
    return list(zip(0.5 + 0.5 * np.cos(angles), 0.5 + 0.5 * np.sin(angles), strict=True))


# Outlines in the unit square (x, y), scaled to each object's width and height. The last six
# are not detection classes: only the classification set (`shapes_classes`) draws them.
POLYGONS = {
    "triangle": [(0.5, 0.0), (1.0, 1.0), (0.0, 1.0)],
    "diamond": [(0.5, 0.0), (1.0, 0.5), (0.5, 1.0), (0.0, 0.5)],
    "cross": [
        (1 / 3, 0),
        (2 / 3, 0),
        (2 / 3, 1 / 3),
        (1, 1 / 3),
        (1, 2 / 3),
        (2 / 3, 2 / 3),
        (2 / 3, 1),
        (1 / 3, 1),
        (1 / 3, 2 / 3),
        (0, 2 / 3),
        (0, 1 / 3),
        (1 / 3, 1 / 3),
    ],
    "star": _star(),
    "arrow": [(0, 0.32), (0.55, 0.32), (0.55, 0), (1, 0.5), (0.55, 1), (0.55, 0.68), (0, 0.68)],
    "pentagon": _regular(5),
    "hexagon": _regular(6),
    "trapezoid": [(0.25, 0), (0.75, 0), (1, 1), (0, 1)],
    "chevron": [(0, 0), (0.45, 0), (1, 0.5), (0.45, 1), (0, 1), (0.55, 0.5)],
    "ell": [(0, 0), (0.4, 0), (0.4, 0.6), (1, 0.6), (1, 1), (0, 1)],
    "bowtie": [(0, 0), (0.5, 0.35), (1, 0), (1, 1), (0.5, 0.65), (0, 1)],
}


def object_mask(name, width, height):
    """bool [h, w] mask of one object drawn in its own (width x height) box."""
    w, h = max(round(width), 1), max(round(height), 1)
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    if name == "rectangle":
        draw.rectangle([0, 0, w - 1, h - 1], fill=255)
    elif name in ("ellipse", "ring"):
        draw.ellipse([0, 0, w - 1, h - 1], fill=255)
        if name == "ring":
            inset_x, inset_y = 0.25 * w, 0.25 * h
            draw.ellipse([inset_x, inset_y, w - 1 - inset_x, h - 1 - inset_y], fill=0)
    else:
        draw.polygon([(x * (w - 1), y * (h - 1)) for x, y in POLYGONS[name]], fill=255)
    return np.asarray(canvas) > 127


def smooth_noise(rng, size, cells, channels):
    """Low-frequency noise in [0, 1]: random cells upsampled bilinearly."""
    small = (rng.random((cells, cells, channels)) * 255).astype(np.uint8)
    mode = "RGB" if channels == 3 else "L"
    image = Image.fromarray(small.squeeze(-1) if channels == 1 else small, mode)
    big = np.asarray(image.resize((size[1], size[0]), Image.BILINEAR), np.float32) / 255
    return big.reshape(size[0], size[1], channels)


def background(rng, height, width):
    base = rng.uniform(30, 225, 3)
    texture = smooth_noise(rng, (height, width), int(rng.integers(3, 12)), 3) - 0.5
    fine = smooth_noise(rng, (height, width), int(rng.integers(24, 64)), 1) - 0.5
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    slope = rng.normal(0, 40, 2)
    gradient = (slope[0] * yy / height + slope[1] * xx / width)[..., None]
    image = base + 90 * texture + 40 * fine + gradient
    return np.clip(image, 0, 255)


def draw_clutter(rng, image, *, num_lines, num_blobs, max_width):
    """Lines and irregular blobs (thresholded noise), none of them objects."""
    height, width = image.shape[:2]
    for _ in range(num_blobs):
        side = int(rng.integers(12, max(13, min(height, width) // 3)))
        y, x = int(rng.integers(0, height - side)), int(rng.integers(0, width - side))
        blob = smooth_noise(rng, (side, side), int(rng.integers(3, 6)), 1)[..., 0]
        yy, xx = np.mgrid[0:side, 0:side] / side - 0.5
        blob = blob - 2.0 * (xx**2 + yy**2)  # fade out towards the window's border
        inside = blob > 0.45
        image[y : y + side, x : x + side][inside] = rng.uniform(0, 255, 3)
    pil = Image.fromarray(image.astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    for _ in range(num_lines):
        points = [tuple(rng.uniform(0, [width, height])) for _ in range(2)]
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        draw.line(points, fill=colour, width=int(rng.integers(1, max_width + 1)))
    return np.asarray(pil, np.float32).copy()


def render(
    seed,
    split,
    index,
    *,
    image_size=(512, 512),
    max_objects=MAX_OBJECTS,
    min_side=MIN_SIDE,
    max_side=MAX_SIDE,
):
    """One example of the shapes dataset.

    Args:
      seed: dataset seed; split: "train", "validation" or "test"; index: example number.
      image_size: (height, width); max_objects: objects per image are uniform in 0..this.
      min_side, max_side: range of an object's longer side, pixels (log-uniform).

    Returns:
      dict with image uint8 [H, W, 3]; boxes float32 [N, 4] (x1, y1, x2, y2) pixels, the tight
      box of each object's visible pixels; labels int64 [N] in 0..7 (`CLASS_NAMES`);
      difficult bool [N].
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    rng = np.random.default_rng([int(seed), SPLITS[split], int(index)])
    height, width = image_size
    image = background(rng, height, width)
    image = draw_clutter(
        rng,
        image,
        num_lines=int(rng.integers(2, 10)),
        num_blobs=int(rng.integers(1, 6)),
        max_width=4,
    )

    shading = 40 * (smooth_noise(rng, (height, width), 4, 1)[..., 0] - 0.5)
    objects = []  # (label, mask in the frame, full mask size)
    for _ in range(int(rng.integers(0, max_objects + 1))):
        label = int(rng.integers(len(CLASS_NAMES)))
        longer = np.exp(rng.uniform(np.log(min_side), np.log(max_side)))
        aspect = np.exp(rng.uniform(-np.log(MAX_ASPECT), np.log(MAX_ASPECT)))  # width / height
        w, h = (longer, longer / aspect) if aspect >= 1 else (longer * aspect, longer)
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        mask = object_mask(CLASS_NAMES[label], w, h)
        x0, y0 = round(cx - mask.shape[1] / 2), round(cy - mask.shape[0] / 2)
        full = np.zeros((height, width), bool)
        fy0, fx0 = max(y0, 0), max(x0, 0)
        fy1, fx1 = min(y0 + mask.shape[0], height), min(x0 + mask.shape[1], width)
        full[fy0:fy1, fx0:fx1] = mask[fy0 - y0 : fy1 - y0, fx0 - x0 : fx1 - x0]
        colour = rng.uniform(0, 255, 3)
        image[full] = np.clip(colour + shading[full][:, None], 0, 255)
        objects.append((label, full, mask.sum()))

    # A few thin lines over everything; they do not change what counts as visible.
    image = draw_clutter(rng, image, num_lines=int(rng.integers(0, 4)), num_blobs=0, max_width=2)
    image += rng.normal(0, 6, image.shape)

    boxes, visible, difficult = visible_boxes([m for _, m, _ in objects], [t for *_, t in objects])
    labels = np.asarray([label for label, _, _ in objects], np.int64)[visible]
    return {
        "image": np.clip(np.round(image), 0, 255).astype(np.uint8),
        "boxes": boxes,
        "labels": labels,
        "difficult": difficult,
    }


def visible_boxes(masks, totals):
    """Boxes of what is left visible of objects drawn in order (later ones on top).

    Args:
      masks: list of bool [H, W] object masks in the frame, in drawing order.
      totals: each object's full pixel count (including any part outside the frame).

    Returns:
      boxes float32 [N, 4] (x1, y1, x2, y2): tight box of each labelled object's visible pixels;
      labelled bool [len(masks)]: objects with at least `MIN_VISIBLE_PIXELS` visible;
      difficult bool [N]: less than `DIFFICULT_VISIBLE_FRACTION` of the object visible.
    """
    boxes, difficult = [], []
    labelled = np.zeros(len(masks), bool)
    cover = np.zeros(masks[0].shape if masks else (0, 0), bool)
    for i in reversed(range(len(masks))):  # topmost first
        visible = masks[i] & ~cover
        cover |= masks[i]
        count = int(visible.sum())
        if count < MIN_VISIBLE_PIXELS:
            continue
        rows, cols = np.flatnonzero(visible.any(axis=1)), np.flatnonzero(visible.any(axis=0))
        boxes.append([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1])
        difficult.append(count < DIFFICULT_VISIBLE_FRACTION * totals[i])
        labelled[i] = True
    return (
        np.asarray(boxes[::-1], np.float32).reshape(-1, 4),  # back to drawing order
        labelled,
        np.asarray(difficult[::-1], bool),
    )
