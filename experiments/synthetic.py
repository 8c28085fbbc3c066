"""Random ground truth for the timing scripts (their timings do not depend on the values)."""

import numpy as np


def ground_truth(rng, batch, image, num_classes, num=5):
    """`num` boxes per image inside an `image` (height, width) and classes in 1..num_classes:
    (boxes float32 [batch, num, 4], classes int32 [batch, num])."""
    height, width = image
    xy = rng.uniform(0, 0.6, (batch, num, 2)) * [width, height]
    wh = rng.uniform(0.1, 0.4, (batch, num, 2)) * [width, height]
    boxes = np.concatenate([xy, xy + wh], -1).astype(np.float32)
    return boxes, rng.integers(1, num_classes + 1, (batch, num)).astype(np.int32)
