import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from frcnn_jax import kernels
from frcnn_jax.errors import ConfigError
from frcnn_jax.kernels import activation


def _input(shape, dtype=np.float32, seed=0):
    """Normal values with exact zeros, ties and negative zeros mixed in."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape)
    x = np.where(rng.random(shape) < 0.2, 0.0, x)
    x = np.where(rng.random(shape) < 0.05, -0.0, x)
    x = np.where(rng.random(shape) < 0.1, np.round(x), x)
    return jnp.asarray(x.astype(np.float32), dtype)


@pytest.mark.parametrize("shape", [(2, 5, 7, 16), (3, 8), (4, 24)])
def test_pack_mask_matches_numpy_packbits(shape):
    mask = np.random.default_rng(sum(shape)).random(shape) < 0.5
    packed = activation.pack_mask(jnp.asarray(mask))
    want = np.packbits(mask, axis=-1, bitorder="little")
    assert packed.dtype == jnp.uint8 and packed.shape == want.shape
    np.testing.assert_array_equal(packed, want)
    np.testing.assert_array_equal(activation.unpack_mask(packed), mask)


def test_pack_mask_by_hand():
    mask = jnp.asarray([[1, 0, 0, 0, 0, 0, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0]], bool)
    np.testing.assert_array_equal(activation.pack_mask(mask), [[0b10000001, 0b00000010]])


@pytest.mark.parametrize("shape", [(2, 6, 9, 32), (5, 64), (3, 7), (4,), ()])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("jit", [False, True])
def test_relu_equals_jax_and_torch_values_and_gradients(shape, dtype, jit):
    # Channel counts that pack (32, 64) and that fall back to jax.nn.relu (7, 4, a scalar).
    x = _input(shape, dtype, seed=len(shape))
    relu = jax.jit(activation.relu) if jit else activation.relu
    out, vjp = jax.vjp(relu, x)
    want, want_vjp = jax.vjp(jax.nn.relu, x)
    grad = _input(shape, dtype, seed=7)
    assert out.dtype == dtype and out.shape == x.shape
    np.testing.assert_array_equal(out, want)
    np.testing.assert_array_equal(vjp(grad)[0], want_vjp(grad)[0])
    if dtype == jnp.float32:
        reference = torch.from_numpy(np.asarray(x)).requires_grad_(True)
        torch.relu(reference).backward(torch.from_numpy(np.asarray(grad)))
        np.testing.assert_array_equal(out, torch.relu(reference).detach().numpy())
        np.testing.assert_array_equal(vjp(grad)[0], reference.grad.numpy())


def test_relu_passes_nan_and_inf_as_jnp_maximum():
    x = jnp.asarray([jnp.nan, jnp.inf, -jnp.inf, 0.0, -1.0, 2.0, -0.0, 1e-30])
    np.testing.assert_array_equal(activation.relu(x), jnp.maximum(x, 0))
    np.testing.assert_array_equal(
        jax.grad(lambda x: jnp.sum(activation.relu(x)[1:]))(x), [0, 1, 0, 0, 0, 1, 0, 1]
    )


def test_kernels_choose_the_relu():
    x = _input((2, 16))
    for choice in kernels.KERNELS:
        np.testing.assert_array_equal(kernels.relu(x, kernels=choice), jax.nn.relu(x))
    with pytest.raises(ConfigError, match=r"config\.model\.kernels"):
        kernels.relu(x, kernels="cuda")


def test_a_conv_stacks_backward_keeps_less_with_the_bit_mask():
    """The point of the kernel: XLA's compiled temporaries of a conv-ReLU stack's gradient are
    smaller than with `nn.relu` (which keeps each pre-activation for the backward pass)."""

    class Stack(nn.Module):
        relu: object

        @nn.compact
        def __call__(self, x):
            for i in range(6):
                x = self.relu(nn.Conv(32, (3, 3), name=f"conv{i}")(x))
            return x

    x = jax.ShapeDtypeStruct((2, 48, 48, 32), jnp.float32)

    def temporaries(relu):
        model = Stack(relu)
        params = jax.eval_shape(model.init, jax.random.key(0), x)

        def loss(params, x):
            return jnp.sum(model.apply(params, x) ** 2)

        compiled = jax.jit(jax.grad(loss)).lower(params, x).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    plain, packed = temporaries(nn.relu), temporaries(activation.relu)
    one_map = 2 * 48 * 48 * 32 * 4
    assert packed <= plain - 3 * one_map, (plain, packed)
