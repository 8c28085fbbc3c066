"""Random box generators shared by the op tests."""

import numpy as np


def random_boxes(rng, n, *, size=1000.0, min_side=1.0, max_side=200.0):
    """float32 [n, 4] proper boxes with corners in [0, size) and sides in [min_side, max_side)."""
    xy = rng.uniform(0, size, (n, 2))
    wh = rng.uniform(min_side, max_side, (n, 2))
    return np.concatenate([xy, xy + wh], axis=1).astype(np.float32)


def clustered_boxes(rng, n, *, num_clusters, size=1000.0, jitter=0.1):
    """float32 [n, 4] boxes scattered around a few centres, overlapping heavily (like proposals)."""
    centres = random_boxes(rng, num_clusters, size=size, min_side=16, max_side=300)
    which = rng.integers(0, num_clusters, n)
    wh = (centres[which, 2:] - centres[which, :2]) * rng.uniform(1 - jitter, 1 + jitter, (n, 2))
    ctr = (centres[which, :2] + centres[which, 2:]) / 2 + rng.normal(0, jitter, (n, 2)) * wh
    return np.concatenate([ctr - wh / 2, ctr + wh / 2], axis=1).astype(np.float32)
