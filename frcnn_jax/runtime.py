"""CPU tuning of the process, applied by the entry points (`python -m frcnn_jax.train`,
`evaluate`, `predict`, the experiments) inside `main()`, before JAX starts, and never on
import: `configure_runtime()` = the allocator setting (`configure_malloc`) when the CPU is
JAX's platform, then the XLA CPU flags below (no jax import here).

XLA's CPU backend in jaxlib 0.10 routes convolutions through experimental "YNN" fusions whose
backward passes are about 2x slower than its default kernels (a 3x3, 256-channel convolution's
forward + backward, where XLA's default kernels match torch). Its dots, on the other hand, need
YNN: without it the input gradient of VGG-16's fc6 (a [128, 4096] x [4096, 25088] product) is
about 6x slower. So only the convolution fusions are removed (`-individual_convolution`: every
other YNN fusion stays).

XLA's default CPU schedule orders a step for concurrency: independent kernels run side by side,
which on a few cores makes the large ones fight over threads and memory bandwidth. The plain
schedule (`--xla_cpu_enable_concurrency_optimized_scheduler=false`) made the ResNet-50-FPN
and VGG-16 training steps 12-17% faster on 2 cores, with inference unchanged (2026-11-26; that
A/B's raw output was not kept: `XLA_FLAGS=--xla_cpu_enable_concurrency_optimized_scheduler=true
python experiments/step_time.py --config configs/voc07_vgg16.py` against the same command
without it measures it again, since a flag the user set is left alone).

XLA aborts on a flag it does not know, so the flags are only added for jaxlib versions they
were measured with.
"""

import builtins
import ctypes
import importlib.util
import os
import sys
import threading
from importlib import metadata

from frcnn_jax.errors import ConfigError

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

# FRCNN_JAX_MALLOC's values ("huge_pages" is the default)
HUGE_PAGES, RETAIN, DEFAULT = "huge_pages", "retain", "default"
_HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"  # glibc >= 2.35
_REEXECUTED = "FRCNN_JAX_HUGE_PAGES"  # set in the process `configure_malloc` started
_THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"

_malloc = DEFAULT  # the setting in effect in this process (`describe_runtime`)


def configure_malloc(environ=None, *, execve=os.execve):
    """The allocator setting, FRCNN_JAX_MALLOC (default "huge_pages"); returns the one in
    effect: "huge_pages", "retain" or "default".

    A training step's temporaries are a few large buffers, several GB in all (XLA's CPU runtime
    holds all of a step's temporaries in one), allocated and freed every step. glibc's default
    maps each buffer above 32 MiB afresh, so every step page-faults and zeroes them again in
    4 KiB pages: VGG-16's step at 600x1000, batch 2, took 5.2 s that way against 3.8 s with the
    two settings below (`experiments/bench_model.py`, `experiments/results_cpu.txt`).

    - "huge_pages" (the default): glibc's own tunable `glibc.malloc.hugetlb=1` backs malloc's
      memory with transparent huge pages (2 MiB: 512x fewer page faults), with glibc's default
      policy otherwise, so freed buffers go back to the system and resident memory follows
      what is live. glibc reads tunables only when a process starts: this re-executes the
      process (`sys.orig_argv`, once, marked by FRCNN_JAX_HUGE_PAGES) with GLIBC_TUNABLES set.
      Where it cannot apply (not glibc >= 2.35, transparent huge pages off, the program read
      from stdin, an interactive session or notebook, not the main thread) it is "default".
    - "retain" (`retain_freed_memory`): every buffer from one heap that never gives memory
      back, so a step reuses the pages of the step before; as fast, but the heap fragments:
      the same VGG-16 step's process peaked at 5.3 GB against 3.7 GB, by an amount that varies
      from run to run. It applies in-process (a notebook too).
    - "default": glibc's behaviour, as is. So does a MALLOC_* or GLIBC_TUNABLES setting of
      the user's own, whatever FRCNN_JAX_MALLOC says.
    """
    global _malloc
    environ = os.environ if environ is None else environ
    wanted = environ.get("FRCNN_JAX_MALLOC", HUGE_PAGES)
    if wanted not in (HUGE_PAGES, RETAIN, DEFAULT):
        raise ConfigError(
            f"FRCNN_JAX_MALLOC={wanted!r}: one of {HUGE_PAGES!r}, {RETAIN!r}, {DEFAULT!r}"
        )
    if environ.get(_REEXECUTED) == "1":  # the process configure_malloc started
        _malloc = HUGE_PAGES
        return _malloc
    if wanted == DEFAULT or any(
        name.startswith("MALLOC_") or name == "GLIBC_TUNABLES" for name in environ
    ):
        _malloc = DEFAULT
    elif wanted == RETAIN:
        _malloc = RETAIN if retain_freed_memory() else DEFAULT
    elif huge_pages_apply():
        execve(
            sys.executable,
            list(sys.orig_argv),
            {**environ, "GLIBC_TUNABLES": _HUGE_PAGES_TUNABLE, _REEXECUTED: "1"},
        )
        _malloc = HUGE_PAGES  # execve returned: a test's stand-in
    else:
        _malloc = DEFAULT
    return _malloc


def huge_pages_apply():
    """Whether `configure_malloc` can re-execute this process with huge pages: the system has
    them (`huge_pages_available`), and the program can run again (a file, a module or -c, not
    stdin), outside an interactive session or notebook (IPython, Jupyter), on the main thread."""
    interactive = hasattr(sys, "ps1") or sys.flags.interactive or hasattr(builtins, "__IPYTHON__")
    return (
        huge_pages_available()
        and bool(getattr(sys, "orig_argv", None))
        and sys.argv[:1] not in ([], [""], ["-"])
        and not interactive
        and threading.current_thread() is threading.main_thread()
    )


def huge_pages_available():
    """Whether glibc's huge-page tunable works here: glibc >= 2.35 and transparent huge pages
    enabled ("always" or "madvise")."""
    try:
        version = os.confstr("CS_GNU_LIBC_VERSION") or ""
        major, minor = (int(x) for x in version.removeprefix("glibc ").split(".")[:2])
    except (AttributeError, ValueError):  # no confstr, no such name (not glibc), no version
        return False
    try:
        with open(_THP_SETTING) as setting:
            enabled = setting.read()
    except OSError:
        return False
    return (major, minor) >= (2, 35) and ("[always]" in enabled or "[madvise]" in enabled)


def retain_freed_memory():
    """Makes glibc's malloc keep freed memory for reuse (FRCNN_JAX_MALLOC=retain, see
    `configure_malloc`); returns whether it took effect.

    Every buffer then comes from one heap (no buffer gets its own mmap; XLA's worker threads'
    own heaps cannot hold a buffer above 64 MiB, so one arena) that never gives freed memory
    back, so a step reuses the pages of the step before. The price: resident memory stays at
    its peak, the heap fragments (freed space that a large buffer no longer fits in), and one
    arena serializes small allocations across threads. Without glibc this does nothing.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl builds without it)
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    settings = (
        (_M_ARENA_MAX, 1),
        (_M_MMAP_MAX, 0),  # no buffer gets its own mmap: all come from the heap
        (_M_TRIM_THRESHOLD, _NEVER_TRIM),
    )
    return all([mallopt(param, value) == 1 for param, value in settings])


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
    """What entry points call first in `main()`, before JAX starts: when the CPU is JAX's
    platform, the allocator setting (`configure_malloc`; GPU and TPU hosts keep glibc's
    default) and `trim_after_compiles`, then XLA's CPU flags. Library code never calls it.

    Returns (XLA flags added, the allocator setting in effect).
    """
    on_cpu = cpu_is_the_platform()
    malloc = configure_malloc() if on_cpu else DEFAULT
    added = configure_xla_cpu()
    if on_cpu:
        trim_after_compiles()
    return added, malloc


_trimming = False


def trim_after_compiles():
    """After every XLA compilation, hands the memory the compiler freed back to the system
    (glibc's `malloc_trim(0)`); returns whether it applies (glibc only).

    XLA compiles on worker threads, whose malloc arenas keep what the compiler freed: it was
    0.5-0.65 GB of the peak of ResNet-50-FPN's training step (600x1000, batch 2), resident
    beside the step's own buffers for the rest of the run (`experiments/results_cpu.txt`). A
    trim takes milliseconds; compiles are rare. Registered once, as a `jax.monitoring`
    listener (this imports jax, not its backend: call it after XLA_FLAGS is set).
    """
    global _trimming
    if _trimming:
        return True
    try:
        ctypes.CDLL(None).malloc_trim.argtypes = (ctypes.c_size_t,)
    except (OSError, AttributeError):  # not glibc
        return False
    from jax import monitoring

    monitoring.register_event_duration_secs_listener(_after_event)
    _trimming = True
    return True


_BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # jax._src.dispatch


def _after_event(event, duration_secs, **kwargs):
    del duration_secs, kwargs
    if event == _BACKEND_COMPILE_EVENT:
        _release_freed_memory()


def _release_freed_memory():
    ctypes.CDLL(None).malloc_trim(0)


def describe_runtime():
    """One line for benchmark headers: the XLA flags and the allocator setting in effect."""
    malloc = {
        HUGE_PAGES: "glibc, transparent huge pages (glibc.malloc.hugetlb=1)",
        RETAIN: "retains freed memory",
        DEFAULT: "system default",
    }[_malloc]
    return f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; malloc: {malloc}"
