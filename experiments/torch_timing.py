"""Timing helpers the benchmarks share: torchvision runs on the GPU when there is one (JAX picks
its default device by itself), and a timed call waits for torch's queued GPU work."""

import numpy as np
import timing
import torch

TORCH_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def tensor(array):
    """A NumPy (or JAX) array as a torch tensor on `TORCH_DEVICE`."""
    return torch.from_numpy(np.array(array)).to(TORCH_DEVICE)


def median_s(fn, repeats):
    """`timing.median_s` with torch's queued GPU work waited for inside each timing."""
    synchronize = torch.cuda.synchronize if TORCH_DEVICE.type == "cuda" else None
    return timing.median_s(fn, repeats, synchronize)
