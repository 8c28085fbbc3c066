"""The benchmarks' timer, without torch (a frcnn_jax-only process must not carry torch's
libraries in its resident memory); `torch_timing.median_s` adds torch's GPU synchronization."""

import statistics
import time


def median_s(fn, repeats, synchronize=None):
    """Median wall time in seconds of `fn()` over `repeats` calls after one warm-up; JAX callers
    block on their results inside `fn`; `synchronize()` (if given) runs inside the timing."""

    def timed():
        start = time.perf_counter()
        fn()
        if synchronize is not None:
            synchronize()
        return time.perf_counter() - start

    timed()  # warm-up
    return statistics.median(timed() for _ in range(repeats))
