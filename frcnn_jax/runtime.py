"""CPU tuning of the process, applied by the entry points (`python -m frcnn_jax.train`,
`evaluate`, `predict`, the experiments) inside `main()`, before JAX starts, and never on
import: `configure_runtime()` = the XLA CPU flags below + `retain_freed_memory()` when the CPU
is JAX's platform (no jax import here).

XLA's CPU backend in jaxlib 0.10 routes convolutions through experimental "YNN" fusions whose
backward passes are about 2x slower than its default kernels (a 3x3, 256-channel convolution's
forward + backward, where XLA's default kernels match torch). Its dots, on the other hand, need
YNN: without it the input gradient of VGG-16's fc6 (a [128, 4096] x [4096, 25088] product) is
about 6x slower. So only the convolution fusions are removed (`-individual_convolution`: every
other YNN fusion stays).

XLA's default CPU schedule orders a step for concurrency: independent kernels run side by side,
which on a few cores makes the large ones fight over threads and memory bandwidth. The plain
schedule (`--xla_cpu_enable_concurrency_optimized_scheduler=false`) made the ResNet-50-FPN
and VGG-16 training steps 12-17% faster on 2 cores, with inference unchanged
(`experiments/benchmarks.md`).

XLA aborts on a flag it does not know, so the flags are only added for jaxlib versions they
were measured with.
"""

import ctypes
import importlib.util
import os
from importlib import metadata

_CPU_FLAGS = (
    "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution",
    "--xla_cpu_enable_concurrency_optimized_scheduler=false",
)
_TESTED_JAXLIB_PREFIXES = ("0.10.",)


def configure_xla_cpu(environ=None, *, jaxlib_version=None):
    """Appends the CPU flags above to XLA_FLAGS; call before JAX initializes a backend.

    A flag the user already set (any value) is left alone; nothing is added for an untested
    jaxlib. Returns the flags added.
    """
    environ = os.environ if environ is None else environ
    if jaxlib_version is None:
        try:
            jaxlib_version = metadata.version("jaxlib")
        except metadata.PackageNotFoundError:
            return []
    if not jaxlib_version.startswith(_TESTED_JAXLIB_PREFIXES):
        return []
    current = environ.get("XLA_FLAGS", "")
    added = [flag for flag in _CPU_FLAGS if flag.split("=")[0] not in current]
    if added:
        environ["XLA_FLAGS"] = " ".join([current, *added]).strip()
    return added


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_NEVER_TRIM = -1  # as M_TRIM_THRESHOLD: the heap never gives freed memory back


_retaining = False


def retain_freed_memory(environ=None):
    """Makes glibc's malloc keep freed memory for reuse; returns whether it took effect.

    By default glibc gives every buffer above 32 MiB its own mmap and unmaps it on free, and
    XLA's worker threads allocate from per-thread arenas whose heaps cannot hold a buffer above
    64 MiB at all, so each step page-faults (and the kernel zeroes) its large temporaries anew.
    Here every buffer comes from one heap that never gives freed memory back, so a step
    reuses the pages of the step before. That includes the one buffer, several GB, in which
    XLA's CPU runtime holds all of a step's temporaries: mapped afresh, its page faults cost
    about a fifth of a ResNet-50-FPN training step. The RoI ops' large temporaries gain most
    (RoIPool forward + backward about 2x faster; torchvision's CPU allocator is malloc too, so
    its ops gain as well: `experiments/bench_ops.py`, `experiments/benchmarks.md`).
    The price: resident memory stays at its peak, and one arena serializes small allocations
    across threads. FRCNN_JAX_MALLOC=default keeps glibc's behaviour, and so does any malloc
    setting of the user's own (MALLOC_* or GLIBC_TUNABLES in the environment); without glibc
    this does nothing.
    """
    environ = os.environ if environ is None else environ
    if environ.get("FRCNN_JAX_MALLOC", "retain") == "default" or any(
        name.startswith("MALLOC_") or name == "GLIBC_TUNABLES" for name in environ
    ):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl builds without it)
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    global _retaining
    settings = (
        (_M_ARENA_MAX, 1),
        (_M_MMAP_MAX, 0),  # no buffer gets its own mmap: all come from the heap
        (_M_TRIM_THRESHOLD, _NEVER_TRIM),
    )
    _retaining = all([mallopt(param, value) == 1 for param, value in settings])
    return _retaining


_ACCELERATOR_MODULES = (
    "libtpu",
    "jax_plugins",
    "jax_cuda12_plugin",
    "jax_cuda13_plugin",
    "jax_rocm60_plugin",
    "jax_rocm7_plugin",
)


def cpu_is_the_platform(environ=None):
    """Whether JAX will compute on the CPU, decided without starting a backend (starting one
    would take a GPU's memory, e.g. in a torch benchmark's child process): the first of
    JAX_PLATFORMS if set, else whether no accelerator plugin (CUDA, ROCm, TPU) is installed."""
    environ = os.environ if environ is None else environ
    platforms = environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    return not any(importlib.util.find_spec(name) for name in _ACCELERATOR_MODULES)


def configure_runtime():
    """What entry points call first in `main()`, before JAX starts: XLA's CPU flags and, when
    the CPU is JAX's platform, the allocator setting (measured for XLA's CPU temporaries; GPU
    and TPU hosts keep glibc's default). Library code never calls it.

    Returns (XLA flags added, whether freed memory is retained).
    """
    return configure_xla_cpu(), cpu_is_the_platform() and retain_freed_memory()


def describe_runtime():
    """One line for benchmark headers: the XLA flags and the allocator setting in effect."""
    malloc = "retains freed memory" if _retaining else "system default"
    return f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; malloc: {malloc}"
