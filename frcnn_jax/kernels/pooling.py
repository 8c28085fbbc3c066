"""CPU max-pooling kernels: the same values and gradients as `flax.linen.max_pool`, computed with
elementwise ops (strided slices and maxima) instead of XLA's reduce-window and its generic
select-and-scatter gradient, which XLA's CPU backend expands into index arrays and windowed
reductions several times slower. Chosen by `model.kernels="auto"` on every backend (plain
`jnp` ops, portable); `"xla"` uses `nn.max_pool`.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp


def _pool_windows(x):
    """[N, H, W, C] -> [N, H // 2, 2, W // 2, 2, C]; an odd last row or column is dropped."""
    n, h, w, c = x.shape
    return x[:, : h // 2 * 2, : w // 2 * 2].reshape(n, h // 2, 2, w // 2, 2, c)


@jax.custom_vjp
def max_pool_2x2(x):
    """2x2 max pooling with stride 2 (VGG's; floor mode) on [N, H, W, C].

    The same values as `nn.max_pool(x, (2, 2), strides=(2, 2))`, and the same gradient as
    torch's `max_pool2d` (each window's first maximum in row-major order gets it).
    """
    return jnp.max(_pool_windows(x), axis=(2, 4))


def _max_pool_2x2_fwd(x):
    out = max_pool_2x2(x)
    return out, (x, out)


def _max_pool_2x2_bwd(residuals, grad):
    x, out = residuals
    windows = _pool_windows(x)
    taken = jnp.zeros(out.shape, bool)  # the window's first maximum is already found
    rows = []
    for dy in range(2):
        row = []
        for dx in range(2):
            first = (windows[:, :, dy, :, dx] == out) & ~taken
            taken = taken | first
            row.append(jnp.where(first, grad, 0).astype(x.dtype))
        rows.append(jnp.stack(row, axis=3))
    n, h, w, c = x.shape
    d_x = jnp.stack(rows, axis=2).reshape(n, h // 2 * 2, w // 2 * 2, c)
    return (jnp.pad(d_x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0))),)


max_pool_2x2.defvjp(_max_pool_2x2_fwd, _max_pool_2x2_bwd)


def _stem_pool_reference(x):
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


@jax.custom_vjp
def stem_max_pool(x):
    """torchvision's stem pooling, `max_pool2d(x, 3, stride=2, padding=1)`, on [N, H, W, C].

    Rows then columns, each the maximum of three strided slices: the same values as
    `nn.max_pool`; its gradient is `nn.max_pool`'s.
    """
    out_h, out_w = ((size - 1) // 2 + 1 for size in x.shape[1:3])
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
    rows = padded[:, 0 : 2 * out_h - 1 : 2]
    for i in (1, 2):
        rows = jnp.maximum(rows, padded[:, i : i + 2 * out_h - 1 : 2])
    out = rows[:, :, 0 : 2 * out_w - 1 : 2]
    for j in (1, 2):
        out = jnp.maximum(out, rows[:, :, j : j + 2 * out_w - 1 : 2])
    return out


def _stem_pool_fwd(x):
    return stem_max_pool(x), x


def _stem_pool_bwd(x, grad):
    return jax.vjp(_stem_pool_reference, x)[1](grad)


stem_max_pool.defvjp(_stem_pool_fwd, _stem_pool_bwd)
