"""Timing helpers the benchmarks share: torchvision runs on the GPU when there is one (JAX picks
its default device by itself), and a timed call waits for torch's queued GPU work."""

import statistics
import time

import numpy as np
import torch

TORCH_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def tensor(array):
    """A NumPy (or JAX) array as a torch tensor on `TORCH_DEVICE`."""
    return torch.from_numpy(np.array(array)).to(TORCH_DEVICE)


def median_s(fn, repeats):
    """Median wall time in seconds of `fn()` over `repeats` calls after one warm-up; JAX callers
    block on their results inside `fn`, torch's GPU work is synchronized here."""

    def timed():
        start = time.perf_counter()
        fn()
        if TORCH_DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    timed()  # warm-up
    return statistics.median(timed() for _ in range(repeats))
