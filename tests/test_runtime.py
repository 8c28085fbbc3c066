import os
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


def test_freed_memory_is_retained_only_when_not_opted_out():
    # A subprocess, since mallopt changes the whole process. glibc's mallinfo2 says how many
    # bytes live in buffers that have their own mmap (`hblkhd`, the 5th field): by default a
    # 64 MiB array is one, and a 100 MiB array made on another thread (as XLA's workers do) too;
    # when freed memory is retained, both come from the one reusable heap, and a freed buffer
    # larger than 2 GiB (XLA holds a step's temporaries in one such) stays in the heap's free
    # bytes (`fordblks`, the 9th field) for the next step.
    code = (
        "import ctypes, threading, numpy as np\n"
        "from frcnn_jax.runtime import describe_runtime, retain_freed_memory\n"
        "retained = retain_freed_memory()\n"
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
        "print(retained, here, seen[0], kept, describe_runtime().split('malloc: ')[1])\n"
    )

    def run(**env):
        mine = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_"))}
        out = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            env={**mine, **env},
            check=True,
        )
        return out.stdout.split(maxsplit=4)

    try:
        libc = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (AttributeError, ValueError):  # no confstr, or no such name (not glibc)
        libc = ""
    if not libc.startswith("glibc"):
        pytest.skip("retaining freed memory is a glibc setting")
    assert run(FRCNN_JAX_MALLOC="default") == [
        "False",
        "True",
        "True",
        "False",
        "system default\n",
    ]
    # A malloc setting of the user's own is left alone (this one changes nothing else).
    assert run(MALLOC_PERTURB_="0")[0] == "False"
    assert run() == ["True", "False", "False", "True", "retains freed memory\n"]
