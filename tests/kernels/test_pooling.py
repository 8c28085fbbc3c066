import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from frcnn_jax import kernels
from frcnn_jax.kernels.pooling import max_pool_2x2, stem_max_pool


@pytest.mark.parametrize("shape", [(2, 8, 10, 3), (1, 7, 9, 4), (1, 3, 2, 2)])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("jit", [False, True])
def test_max_pool_2x2_equals_torch_values_and_gradient(shape, ties, jit):
    # Odd sizes drop the last row/column (floor mode); after a ReLU and rounding most windows
    # hold tied maxima, and torch gives the gradient to the first one in row-major order.
    rng = np.random.default_rng(sum(shape))
    x = rng.normal(size=shape).astype(np.float32)
    if ties:
        x = np.maximum(np.round(x), 0)
    pool = jax.jit(max_pool_2x2) if jit else max_pool_2x2
    out, vjp = jax.vjp(pool, jnp.asarray(x))
    grad = rng.normal(size=out.shape).astype(np.float32)
    (got_grad,) = vjp(jnp.asarray(grad))

    nchw = torch.from_numpy(x).permute(0, 3, 1, 2).requires_grad_(True)
    want = torch.nn.functional.max_pool2d(nchw, 2, 2)
    want.backward(torch.from_numpy(grad).permute(0, 3, 1, 2))
    np.testing.assert_array_equal(out, want.detach().permute(0, 2, 3, 1).numpy())
    np.testing.assert_array_equal(got_grad, nchw.grad.permute(0, 2, 3, 1).numpy())
    assert got_grad.shape == x.shape and got_grad.dtype == x.dtype


def test_max_pool_2x2_keeps_bfloat16():
    x = jnp.arange(32, dtype=jnp.bfloat16).reshape(1, 4, 4, 2)
    out, vjp = jax.vjp(max_pool_2x2, x)
    assert out.dtype == jnp.bfloat16 and vjp(jnp.ones_like(out))[0].dtype == jnp.bfloat16
    np.testing.assert_array_equal(out[0, :, :, 0], [[10, 14], [26, 30]])


@pytest.mark.parametrize("shape", [(1, 8, 10, 3), (2, 7, 9, 4), (1, 1, 2, 2)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_stem_max_pool_equals_flax_values_and_gradient(shape, dtype):
    # Odd and even sizes, a single row; rounded values make ties.
    rng = np.random.default_rng(sum(shape))
    x = jnp.asarray(np.round(rng.normal(size=shape) * 2), dtype)

    def reference(x):
        return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

    out, vjp = jax.vjp(jax.jit(stem_max_pool), x)
    want, want_vjp = jax.vjp(reference, x)
    assert out.dtype == dtype and out.shape == want.shape
    np.testing.assert_array_equal(out, want)
    grad = jnp.asarray(rng.normal(size=out.shape), dtype)
    np.testing.assert_array_equal(vjp(grad)[0], want_vjp(grad)[0])


@pytest.mark.parametrize(
    "window, stride, padding", [(2, 2, "VALID"), (3, 2, ((1, 1), (1, 1))), (3, 1, "SAME")]
)
def test_max_pool_gives_flax_values_with_either_kernels(window, stride, padding):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 9, 12, 3)), jnp.float32)
    want = nn.max_pool(x, (window, window), strides=(stride, stride), padding=padding)
    for choice in kernels.KERNELS:
        got = kernels.max_pool(x, window=window, stride=stride, padding=padding, kernels=choice)
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match=r"config\.model\.kernels must be one of"):
        kernels.max_pool(x, window=2, stride=2, padding="VALID", kernels="fast")
