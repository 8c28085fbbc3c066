"""`shapes_classes`: the offline "ImageNet" of the shapes world, for classification pretraining
(`python -m frcnn_jax.pretrain`).

Sixteen classes, twice the detection set's eight: the eight detection shapes, six outlines the
detection set never shows (`EXTRA_SHAPES`), and two scene classes without any object, a bare
textured background ("texture") and background with distractor blobs and lines ("clutter").
Each image is one centred-ish object crop (its longer side `OBJECT_FRACTION` of the image) on
the detection set's backgrounds and clutter, in a random colour, so what tells the classes
apart is the outline, as in the detection set. Images come from random streams of their own
(keyed by `STREAM`), so none is a crop of a detection image.

`render(seed, split, index, size=...)` is a pure function of its arguments, like
`shapes.render`.
"""

import numpy as np

from frcnn_jax.data import shapes

EXTRA_SHAPES = ("pentagon", "hexagon", "trapezoid", "chevron", "ell", "bowtie")
SCENES = ("texture", "clutter")
CLASS_NAMES = (*shapes.CLASS_NAMES, *EXTRA_SHAPES, *SCENES)
SPLITS = {"train": 0, "validation": 1}
STREAM = 101  # the first word of every random stream here; the detection set's never has 4
OBJECT_FRACTION = (0.3, 0.9)  # an object's longer side / the image side (log-uniform)


def render(seed, split, index, *, size=64):
    """One example: {"image": uint8 [size, size, 3], "label": int in 0..15 (`CLASS_NAMES`)}."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    rng = np.random.default_rng([STREAM, int(seed), SPLITS[split], int(index)])
    label = int(rng.integers(len(CLASS_NAMES)))
    name = CLASS_NAMES[label]
    image = shapes.background(rng, size, size)
    scene = name == "clutter"
    image = shapes.draw_clutter(
        rng,
        image,
        num_lines=int(rng.integers(3, 8) if scene else rng.integers(0, 3)),
        num_blobs=int(rng.integers(2, 5) if scene else rng.integers(0, 2)),
        max_width=3,
    )
    if name not in SCENES:
        low, high = (f * size for f in OBJECT_FRACTION)
        longer = np.exp(rng.uniform(np.log(low), np.log(high)))
        aspect = np.exp(rng.uniform(-np.log(shapes.MAX_ASPECT), np.log(shapes.MAX_ASPECT)))
        w, h = (longer, longer / aspect) if aspect >= 1 else (longer * aspect, longer)
        mask = shapes.object_mask(name, max(w, 3), max(h, 3))
        y0 = int(rng.integers(0, size - mask.shape[0] + 1))
        x0 = int(rng.integers(0, size - mask.shape[1] + 1))
        full = np.zeros((size, size), bool)
        full[y0 : y0 + mask.shape[0], x0 : x0 + mask.shape[1]] = mask
        shading = 40 * (shapes.smooth_noise(rng, (size, size), 4, 1)[..., 0] - 0.5)
        colour = rng.uniform(0, 255, 3)
        image[full] = np.clip(colour + shading[full][:, None], 0, 255)
    image = shapes.draw_clutter(
        rng, image, num_lines=int(rng.integers(0, 2)), num_blobs=0, max_width=1
    )
    image += rng.normal(0, 6, image.shape)
    return {"image": np.clip(np.round(image), 0, 255).astype(np.uint8), "label": label}
