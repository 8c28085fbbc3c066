import atexit
import collections
import ctypes
import ctypes.util
import gc
import os
import shutil
import sys
import tempfile

import numpy as np
import pytest

# One persistent XLA compilation cache for the whole session, this process and every subprocess
# it starts (they inherit the environment): many tests train the same tiny model in a fresh
# process, and each would otherwise compile the same programs again. Set before jax is imported;
# a fresh directory per session, so nothing carries over between runs. A directory given by the
# caller is kept.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="frcnn_jax_test_xla_cache_")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

# Tests compile many small programs and run each for a few steps: XLA's CPU backend without
# LLVM's optimisation passes compiles them about 30% faster (a tiny training run 48 -> 35 s,
# the paper-tables script's test 206 -> 140 s), the same HLO passes and buffers otherwise.
# Subprocesses inherit it; a test that sets XLA_FLAGS itself replaces it.
_FAST_COMPILE = "--xla_backend_optimization_level=0"
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FAST_COMPILE}".strip()


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A TFDS data_dir for the module's tests (the tiny shapes set is made in it once)."""
    return tmp_path_factory.mktemp("tfds")


# -- running on several workers (setup.cfg: `-n auto --dist loadfile`) --------------------------

WORKER_MEMORY = 8 * 2**30  # a worker grows to ~6 GB over the model tests (compiled programs)


def pytest_xdist_auto_num_workers(config):
    """`-n auto`: a worker per core, but no more than one per `WORKER_MEMORY` of this machine's
    memory (2 on 2 cores and 24 GiB, as CI), so that a worker's growth plus the 10 GB child of
    the VGG-16 parity tests fit beside the other workers."""
    del config
    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(cores or 1, memory // WORKER_MEMORY))


def pytest_collection_modifyitems(config, items):
    """Files with the most slow tests first (a stable sort: each file's tests keep their order),
    so that the workers start on the longest files (whole trainings) and fill the end of the
    run with the quick ones rather than one worker finishing a long file alone (`--dist
    loadfile` hands out whole files in this order: the longest first keeps the tail short)."""
    del config
    slow = collections.Counter(item.path for item in items if item.get_closest_marker("slow"))
    items.sort(key=lambda item: -slow[item.path])


@pytest.fixture(scope="module", autouse=True)
def _release_memory_after_each_file():
    """After a file's tests: drop JAX's compiled programs (the persistent cache above brings
    back those a later file needs) and hand freed memory back to the system, so a worker that
    runs many files does not keep every file's programs and buffers."""
    yield
    if "jax" in sys.modules:
        sys.modules["jax"].clear_caches()
    gc.collect()
    libc = ctypes.util.find_library("c")
    if libc and sys.platform.startswith("linux"):
        ctypes.CDLL(libc).malloc_trim(0)
