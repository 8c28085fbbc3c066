import os
import pathlib
import subprocess
import sys

import pytest

from frcnn_jax.runtime import configure_xla_cpu


def test_adds_the_flag_for_a_tested_jaxlib_only():
    environ = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    assert configure_xla_cpu(environ, jaxlib_version="0.10.2")
    assert environ["XLA_FLAGS"].startswith("--xla_force_host_platform_device_count=8 ")
    assert "--xla_cpu_experimental_ynn_fusion_type=" in environ["XLA_FLAGS"]
    assert "--xla_cpu_enable_concurrency_optimized_scheduler=false" in environ["XLA_FLAGS"]
    assert configure_xla_cpu(environ, jaxlib_version="0.10.2") == []  # idempotent
    untested = {}
    assert configure_xla_cpu(untested, jaxlib_version="0.11.0") == [] and untested == {}


def test_a_users_own_setting_wins():
    environ = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=some"}
    added = configure_xla_cpu(environ, jaxlib_version="0.10.2")
    assert added == ["--xla_cpu_enable_concurrency_optimized_scheduler=false"]
    assert environ["XLA_FLAGS"] == " ".join(["--xla_cpu_experimental_ynn_fusion_type=some", *added])


def test_the_installed_jaxlib_accepts_what_is_added():
    # XLA aborts on unknown flags: start a real backend with whatever this jaxlib gets, and
    # check where the flags send a dot (YNN) and a convolution (XLA's own kernels).
    code = (
        "from frcnn_jax.runtime import configure_xla_cpu; added = configure_xla_cpu()\n"
        "import jax, jax.numpy as jnp\n"
        "x = jnp.ones((1, 8, 8, 4)); w = jnp.ones((3, 3, 4, 4))\n"
        "conv = lambda x: jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME',"
        " dimension_numbers=('NHWC', 'HWIO', 'NHWC')).sum()\n"
        "dot = lambda a, b: a @ b.T\n"
        "a = jnp.ones((128, 256)); b = jnp.ones((512, 256))\n"
        "text = lambda f, *args: jax.jit(f).lower(*args).compile().as_text()\n"
        "print(bool(added), float(jax.grad(conv)(x).sum()),"
        " '__ynn_fusion' in text(jax.grad(conv), x), '__ynn_fusion' in text(dot, a, b))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    added, gradient, conv_in_ynn, dot_in_ynn = result.stdout.split()
    assert float(gradient) > 0
    if added == "True":
        assert conv_in_ynn == "False" and dot_in_ynn == "True"


def _glibc_version():
    try:
        libc = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (AttributeError, ValueError):  # no confstr, or no such name (not glibc)
        return None
    if not libc.startswith("glibc "):
        return None
    return tuple(int(x) for x in libc.split()[1].split(".")[:2])


def _clean_env(**env):
    mine = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_"))}
    for name in ("FRCNN_JAX_MALLOC", "FRCNN_JAX_HUGE_PAGES"):
        mine.pop(name, None)
    return {**mine, "JAX_PLATFORMS": "cpu", **env}


def _python(code, **env):
    """What `python -c code` prints, in `_clean_env(**env)` (a subprocess: malloc settings
    change the whole process)."""
    command, env = [sys.executable, "-c", code], _clean_env(**env)
    return subprocess.run(command, capture_output=True, text=True, env=env, check=True).stdout


def test_retain_keeps_freed_memory_in_one_heap():
    # A subprocess, since mallopt changes the whole process. glibc's mallinfo2 says how many
    # bytes live in buffers that have their own mmap (`hblkhd`, the 5th field): by default a
    # 64 MiB array is one, and a 100 MiB array made on another thread (as XLA's workers do) too;
    # when freed memory is retained, both come from the one reusable heap, and a freed buffer
    # larger than 2 GiB (XLA holds a step's temporaries in one such) stays in the heap's free
    # bytes (`fordblks`, the 9th field) for the next step.
    code = (
        "import ctypes, threading, numpy as np\n"
        "from frcnn_jax.runtime import configure_malloc, describe_runtime\n"
        "setting = configure_malloc()\n"
        "class Info(ctypes.Structure):\n"
        "    _fields_ = [(str(i), ctypes.c_size_t) for i in range(10)]\n"
        "mallinfo2 = ctypes.CDLL(None).mallinfo2\n"
        "mallinfo2.restype = Info\n"
        "mapped = lambda: getattr(mallinfo2(), '4')\n"
        "big = np.ones(1 << 24, np.float32)\n"
        "here = mapped() >= big.nbytes\n"
        "del big\n"
        "seen = []\n"
        "def worker():\n"
        "    big = np.ones(25 << 20, np.float32)\n"
        "    seen.append(mapped() >= big.nbytes)\n"
        "thread = threading.Thread(target=worker); thread.start(); thread.join()\n"
        "huge = np.empty(5 << 29, np.uint8)\n"  # 2.5 GiB of address space, never touched
        "del huge\n"
        "kept = getattr(mallinfo2(), '8') >= 5 << 29\n"
        "print(setting, here, seen[0], kept, describe_runtime().split('malloc: ')[1])\n"
    )

    def run(**env):
        return _python(code, **env).split(maxsplit=4)

    if _glibc_version() is None:
        pytest.skip("retaining freed memory is a glibc setting")
    assert run(FRCNN_JAX_MALLOC="default") == [
        "default",
        "True",
        "True",
        "False",
        "system default\n",
    ]
    assert run(FRCNN_JAX_MALLOC="retain") == [
        "retain",
        "False",
        "False",
        "True",
        "retains freed memory\n",
    ]
    # A malloc setting of the user's own is left alone (this one changes nothing else).
    assert run(FRCNN_JAX_MALLOC="retain", MALLOC_PERTURB_="0")[0] == "default"


HUGE_PAGES = """
import ctypes, os, sys
from frcnn_jax import runtime
print("started", os.getpid(), flush=True)
setting = runtime.configure_runtime()[1]
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
size = 256 << 20
buffer = libc.malloc(size)  # as XLA's runtime allocates: malloc, not numpy's own allocator
ctypes.memset(buffer, 1, size)
with open("/proc/self/smaps_rollup") as rollup:
    kb = next(int(line.split()[1]) for line in rollup if line.startswith("AnonHugePages:"))
print(setting, kb >> 10, os.environ.get("GLIBC_TUNABLES"), runtime.describe_runtime())
"""


def test_huge_pages_restart_the_process_once_where_the_system_has_them():
    """FRCNN_JAX_MALLOC=huge_pages: the process starts again once with glibc's huge-page
    tunable, and a large malloc'd buffer then lies on transparent huge pages; with
    FRCNN_JAX_MALLOC=default (or a user's own GLIBC_TUNABLES) it does not, and nothing
    restarts."""
    from frcnn_jax import runtime

    if not runtime.huge_pages_available():
        pytest.skip("no glibc >= 2.35 with transparent huge pages here")

    def run(**env):
        return _python(HUGE_PAGES, **env).splitlines()

    for chosen in ({}, {"FRCNN_JAX_MALLOC": "huge_pages"}):  # the default, and named
        *starts, result = run(**chosen)
        assert len(starts) == 2  # started, then started again with the tunable
        setting, huge_mb, tunables, description = result.split(maxsplit=3)
        assert setting == "huge_pages" and tunables == "glibc.malloc.hugetlb=1"
        assert int(huge_mb) >= 128, result  # most of the 256 MiB buffer
        assert "transparent huge pages" in description
    *starts, result = run(FRCNN_JAX_MALLOC="default")
    assert len(starts) == 1 and result.split()[0] == "default"
    assert int(result.split()[1]) < 128, result
    *starts, result = run(FRCNN_JAX_MALLOC="huge_pages", GLIBC_TUNABLES="glibc.malloc.check=0")
    assert len(starts) == 1 and result.split()[0] == "default"


# Loaded first by the command's process (PYTHONPATH): says, at the restart, whether the
# process had imported JAX by then.
_EXECVE_HOOK = """
import os, sys

_execve = os.execve

def _logged(path, argv, env):
    print("restarting; jax imported:", "jax" in sys.modules, file=sys.stderr, flush=True)
    _execve(path, argv, env)

os.execve = _logged
"""


def test_a_command_restarts_for_huge_pages_before_it_imports_jax(tmp_path):
    """The restart (`configure_malloc`) comes before the flags load the config file, which
    imports JAX: the second start does not pay for a first JAX import (about 2 s a command)."""
    from frcnn_jax import runtime

    if not runtime.huge_pages_available():
        pytest.skip("no glibc >= 2.35 with transparent huge pages here")
    (tmp_path / "sitecustomize.py").write_text(_EXECVE_HOOK)
    root = pathlib.Path(__file__).resolve().parents[1]
    env = _clean_env(PYTHONPATH=os.pathsep.join([str(tmp_path), str(root)]))
    config = root / "configs" / "shapes_tiny.py"
    bad = "--config.train.optimizer=rmsprop"  # the run ends with this error, after the restart
    command = [sys.executable, "-m", "frcnn_jax.train", f"--config={config}", bad]
    command += [f"--workdir={tmp_path / 'run'}"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert "restarting; jax imported: False" in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode != 0 and "config.train.optimizer" in last, result.stderr


def test_the_malloc_setting_is_checked_and_restarts_only_once(monkeypatch):
    import builtins

    from frcnn_jax import runtime
    from frcnn_jax.errors import ConfigError

    calls = []

    def execve(path, argv, env):
        calls.append((path, argv, env))

    with pytest.raises(ConfigError, match="FRCNN_JAX_MALLOC='fast'"):
        runtime.configure_malloc({"FRCNN_JAX_MALLOC": "fast"}, execve=execve)
    assert runtime.configure_malloc({"FRCNN_JAX_HUGE_PAGES": "1"}, execve=execve) == "huge_pages"
    assert runtime.configure_malloc({"MALLOC_ARENA_MAX": "2"}, execve=execve) == "default"
    assert runtime.configure_malloc({"FRCNN_JAX_MALLOC": "default"}, execve=execve) == "default"
    assert not calls
    with monkeypatch.context() as patch:
        patch.setattr(runtime, "huge_pages_apply", lambda: False)  # the default, not possible
        assert runtime.configure_malloc({"HOME": "/h"}, execve=execve) == "default"
    assert not calls
    with monkeypatch.context() as patch:
        patch.setattr(runtime, "huge_pages_apply", lambda: True)
        chosen = {"HOME": "/h"}  # the default
        assert runtime.configure_malloc(chosen, execve=execve) == "huge_pages"
    ((path, argv, env),) = calls
    assert path == sys.executable and argv == list(sys.orig_argv)
    tunable = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1", "FRCNN_JAX_HUGE_PAGES": "1"}
    assert env == {**chosen, **tunable}
    # programs that cannot start again, or should not: stdin, a notebook or IPython
    monkeypatch.setattr(runtime, "huge_pages_available", lambda: True)
    monkeypatch.setattr(sys, "argv", ["train.py"])
    assert runtime.huge_pages_apply()
    monkeypatch.setattr(sys, "argv", ["-"])
    assert not runtime.huge_pages_apply()
    monkeypatch.setattr(sys, "argv", ["train.py"])
    monkeypatch.setattr(builtins, "__IPYTHON__", True, raising=False)
    assert not runtime.huge_pages_apply()


def test_every_compile_hands_the_compilers_freed_memory_back(monkeypatch):
    from jax._src import dispatch

    from frcnn_jax import runtime

    if _glibc_version() is None:
        pytest.skip("malloc_trim is glibc's")
    assert runtime._BACKEND_COMPILE_EVENT == dispatch.BACKEND_COMPILE_EVENT  # jax's name
    calls = []
    monkeypatch.setattr(runtime, "_release_freed_memory", lambda: calls.append(1))
    assert runtime.trim_after_compiles() and runtime.trim_after_compiles()  # registered once
    import jax
    import numpy as np

    def f(x):
        return x * 3 + 1

    jax.jit(f)(np.ones(5)).block_until_ready()  # one compile
    assert calls == [1]
    jax.jit(f)(np.ones(5)).block_until_ready()  # cached: no compile, no trim
    assert calls == [1]
