"""The rounding helpers RoI parity rests on: if XLA learns to see through them, these fail."""

import jax
import numpy as np

from frcnn_jax.ops._numerics import rounded, true_divide


def test_true_divide_is_a_real_division_under_jit_and_vmap():
    x = np.random.default_rng(0).uniform(0, 400, 20000).astype(np.float32)
    want = x / np.float32(7)  # numpy: correctly rounded division
    assert (np.asarray(jax.jit(lambda v: true_divide(v, 7))(x)) == want).all()
    batched = jax.jit(jax.vmap(lambda v: true_divide(v, 7)))(x.reshape(20, 1000))
    assert (np.asarray(batched).reshape(-1) == want).all()
    # The plain form really is rewritten on this backend: the helper is doing work. (If XLA
    # ever stops rewriting, this half is moot, not wrong.)
    plain = np.asarray(jax.jit(lambda v: v / 7)(x))
    print("plain division differs at", int((plain != want).sum()), "of", x.size)


def test_rounded_product_is_not_fused_into_the_sum():
    rng = np.random.default_rng(1)
    a, b, c = (rng.uniform(0, 400, 20000).astype(np.float32) for _ in range(3))
    want = a * b + c  # numpy: two roundings
    got = np.asarray(jax.jit(lambda a, b, c: rounded(a * b) + c)(a, b, c))
    assert (got == want).all()


def test_rounded_is_exact_for_pixel_magnitudes():
    x = np.array([0.0, -0.0, 1e-12, 3.25, -1234.5678, 6e7, np.inf, -np.inf], np.float32)
    np.testing.assert_array_equal(jax.jit(rounded)(x), x)
