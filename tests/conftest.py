import atexit
import os
import shutil
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


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A TFDS data_dir for the module's tests (the tiny shapes set is made in it once)."""
    return tmp_path_factory.mktemp("tfds")
