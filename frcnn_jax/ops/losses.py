"""Loss terms shared by the RPN and the Fast R-CNN head."""

import jax.numpy as jnp


def smooth_l1(x, *, beta):
    """Huber-style smooth L1 (PyTorch's definition), elementwise: 0.5 x^2 / beta below beta,
    |x| - beta / 2 above; beta = 0 is plain L1. py-faster-rcnn's sigma is beta = 1 / sigma^2."""
    x = jnp.abs(x)
    if beta == 0:
        return x
    return jnp.where(x < beta, 0.5 * x * x / beta, x - 0.5 * beta)
