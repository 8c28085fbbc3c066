import os
import subprocess
import sys

from frcnn_jax.runtime import configure_xla_cpu


def test_adds_the_flag_for_a_tested_jaxlib_only():
    environ = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    assert configure_xla_cpu(environ, jaxlib_version="0.10.2")
    assert environ["XLA_FLAGS"].startswith("--xla_force_host_platform_device_count=8 ")
    assert "--xla_cpu_experimental_ynn_fusion_type=" in environ["XLA_FLAGS"]
    assert configure_xla_cpu(environ, jaxlib_version="0.10.2") == []  # idempotent
    untested = {}
    assert configure_xla_cpu(untested, jaxlib_version="0.11.0") == [] and untested == {}


def test_a_users_own_setting_wins():
    environ = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=some"}
    assert configure_xla_cpu(environ, jaxlib_version="0.10.2") == []
    assert environ["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type=some"


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
