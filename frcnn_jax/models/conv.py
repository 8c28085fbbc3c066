"""Convolutions for the models: `Conv` is `flax.linen.Conv` with the CPU speed-ups below.

XLA's CPU backend leaves two things slow in a detector's training step, and
`conv_general_dilated` (a drop-in for `jax.lax.conv_general_dilated`, which `Conv` calls) fixes
both while keeping parameters, shapes and semantics:

- Layout. A weight gradient needs its input activation channel-major; XLA gets it by making
  the fusion that produced the activation (frozen BatchNorm, ReLU, residual adds, re-computed)
  write it transposed, with an untiled loop that costs 5-15x a plain transpose. Pinning every
  convolution input to the row-major NHWC layout (`with_layout_constraint`) makes that a
  separate, tiled transpose: ResNet-50-FPN's training step went from 5.45 to 4.55 s on a 2-core
  CPU. Nothing is computed differently.
- Algorithm. Large 3x3 stride-1 convolutions run as Winograd F(4x4, 3x3) (Lavin & Gray, "Fast
  Algorithms for Convolutional Neural Networks", 2016): 6x6 input tiles, 36 batched matrix
  products, 4x4 output tiles, 4x fewer multiplications than a direct convolution, for forward,
  input gradient and weight gradient alike (the weight gradient is a matrix product in the
  Winograd domain, so it needs no transposed activation either). At 200x336x256 channels the
  forward takes 0.6x and forward + backward 0.45x of XLA's own convolution's time. Results
  differ from a direct convolution by rounding only, about 1e-5 of the output's magnitude (a
  direct float32 convolution differs from float64 by about 1e-6): the trade cuDNN makes with its
  own Winograd kernels. `precision=jax.lax.Precision.HIGHEST` on a layer, or
  `jax.default_matmul_precision("highest")` around tracing, keeps the direct convolution.

Both apply to float32 on the CPU backend only (GPUs/TPUs get XLA's convolution untouched), and
Winograd only where it measured faster: at least `_MIN_TILES` 4x4 output tiles, at least
`_MIN_CHANNEL_PRODUCT` input x output channels, maps of 8x8 or more.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.layout import Layout, with_layout_constraint

# F(4x4, 3x3) with interpolation points 0, 1, -1, 2, -2 and infinity: y = A^T [(G g G^T) *
# (B^T d B)] A for a 6x6 input tile d, 3x3 kernel g and 4x4 output tile y.
_BT = np.array(
    [
        [4, 0, -5, 0, 1, 0],
        [0, -4, -4, 1, 1, 0],
        [0, 4, -4, -1, 1, 0],
        [0, -2, -1, 2, 1, 0],
        [0, 2, -1, -2, 1, 0],
        [0, 4, 0, -5, 0, 1],
    ],
    np.float32,
)
_G = np.array(
    [
        [1 / 4, 0, 0],
        [-1 / 6, -1 / 6, -1 / 6],
        [-1 / 6, 1 / 6, -1 / 6],
        [1 / 24, 1 / 12, 1 / 6],
        [1 / 24, -1 / 12, 1 / 6],
        [0, 0, 1],
    ],
    np.float32,
)
_AT = np.array(
    [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
    np.float32,
)
_TILE = 4  # output tile side
_SPAN = _TILE + 2  # input tile side

# Where Winograd pays on a 2-core x86 CPU (forward and forward + backward, vs XLA's convolution):
# 200x336 at 256 channels 0.61 / 0.42; 100x168 at 128: 0.85 / 0.44; 75x125 at 512: 0.72 /
# 0.54; but 50x84 at 256 (273 tiles) 1.17 / 0.74, 38x63 at 512 (160 tiles) 1.66 / 1.11 and
# 600x1000 at 64 channels 1.22 forward.
_MIN_TILES = 512
_MIN_CHANNEL_PRODUCT = 128 * 128
_MIN_SIDE = 8


def _combine(matrix, terms):
    """[sum_i matrix[p, i] * terms[i] for each row p], skipping zero coefficients."""
    rows = []
    for row in matrix:
        total = None
        for coefficient, term in zip(row, terms, strict=True):
            if coefficient == 0:
                continue
            if coefficient == 1:
                scaled = term
            elif coefficient == -1:
                scaled = -term
            else:
                scaled = term * coefficient
            total = scaled if total is None else total + scaled
        rows.append(total)
    return rows


def _num_tiles(height, width):
    return -(-height // _TILE), -(-width // _TILE)


def _input_tiles(x):
    """B^T d B of every overlapping 6x6 tile of x padded by 1: [N, H, W, C] -> [36, T, C]
    with T = N * ceil(H/4) * ceil(W/4) tiles; index 6 * column + row."""
    n, height, width, channels = x.shape
    tiles_h, tiles_w = _num_tiles(height, width)
    padded = jnp.pad(
        x, ((0, 0), (1, tiles_h * _TILE + 1 - height), (1, tiles_w * _TILE + 1 - width), (0, 0))
    )
    stride = _TILE
    rows = jnp.stack(
        _combine(_BT, [padded[:, i : i + stride * tiles_h : stride] for i in range(_SPAN)])
    )  # [6 row, N, tiles_h, W + 2, C]
    tiles = jnp.stack(
        _combine(_BT, [rows[:, :, :, j : j + stride * tiles_w : stride] for j in range(_SPAN)])
    )  # [6 column, 6 row, N, tiles_h, tiles_w, C]
    return tiles.reshape(_SPAN * _SPAN, n * tiles_h * tiles_w, channels)


def _kernel_tiles(kernel):
    """G g G^T: [3, 3, C, O] -> [36, C, O], index 6 * column + row as in `_input_tiles`."""
    tiles = jnp.einsum("pi,qj,ijco->qpco", _G, _G, kernel)
    return tiles.reshape(_SPAN * _SPAN, *kernel.shape[2:])


def _kernel_tiles_adjoint(tiles, kernel_shape):
    """The transpose of `_kernel_tiles`: [36, C, O] -> [3, 3, C, O]."""
    tiles = tiles.reshape(_SPAN, _SPAN, *kernel_shape[2:])
    return jnp.einsum("pi,qj,qpco->ijco", _G, _G, tiles)


def _output_from_tiles(products, out_shape):
    """A^T m A per tile, tiles put back in place: [36, T, O] -> [N, H, W, O]."""
    n, height, width, channels = out_shape
    tiles_h, tiles_w = _num_tiles(height, width)
    products = products.reshape(_SPAN, _SPAN, n, tiles_h, tiles_w, channels)
    by_row = _combine(_AT, [products[:, p] for p in range(_SPAN)])  # 4 x [6 column, ...]
    out = jnp.stack(
        [jnp.stack(_combine(_AT, [r[q] for q in range(_SPAN)]), axis=3) for r in by_row], axis=2
    )  # [N, tiles_h, 4 row, tiles_w, 4 column, O]
    return out.reshape(n, tiles_h * _TILE, tiles_w * _TILE, channels)[:, :height, :width]


def _output_tiles_adjoint(grad):
    """The transpose of `_output_from_tiles`: A g A^T per 4x4 tile, [N, H, W, O] -> [36, T, O]."""
    n, height, width, channels = grad.shape
    tiles_h, tiles_w = _num_tiles(height, width)
    grad = jnp.pad(
        grad, ((0, 0), (0, tiles_h * _TILE - height), (0, tiles_w * _TILE - width), (0, 0))
    )
    grad = grad.reshape(n, tiles_h, _TILE, tiles_w, _TILE, channels)
    rows = jnp.stack(_combine(_AT.T, [grad[:, :, r] for r in range(_TILE)]))
    # rows: [6 row, N, tiles_h, tiles_w, 4 column, C]
    tiles = jnp.stack(_combine(_AT.T, [rows[..., s, :] for s in range(_TILE)]))
    return tiles.reshape(_SPAN * _SPAN, n * tiles_h * tiles_w, channels)


def _winograd(x, kernel):
    tiles = _input_tiles(x)
    products = jnp.einsum("ktc,kco->kto", tiles, _kernel_tiles(kernel))
    return _output_from_tiles(products, (*x.shape[:3], kernel.shape[-1])), tiles


@jax.custom_vjp
def winograd_conv3x3(x, kernel):
    """A 3x3, stride-1, padding-1 convolution by Winograd F(4x4, 3x3).

    Args:
      x: float32 [N, H, W, C] (NHWC).
      kernel: float32 [3, 3, C, O] (HWIO, flax's layout).

    Returns:
      float32 [N, H, W, O]: `lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)))`
      up to rounding (about 1e-5 of the output's magnitude).
    """
    return _winograd(x, kernel)[0]


def _winograd_fwd(x, kernel):
    out, tiles = _winograd(x, kernel)
    return out, (tiles, kernel)


def _winograd_bwd(residuals, grad):
    tiles, kernel = residuals
    # The input gradient is the same kind of convolution, with the kernel rotated by 180
    # degrees and its channel axes swapped.
    grad_x, _ = _winograd(grad, jnp.flip(kernel, (0, 1)).swapaxes(2, 3))
    grad_tiles = jnp.einsum("ktc,kto->kco", tiles, _output_tiles_adjoint(grad))
    return grad_x, _kernel_tiles_adjoint(grad_tiles, kernel.shape)


winograd_conv3x3.defvjp(_winograd_fwd, _winograd_bwd)


def _full_precision_requested(precision):
    if precision is not None:
        values = precision if isinstance(precision, tuple) else (precision,)
        return any(jax.lax.Precision(v) == jax.lax.Precision.HIGHEST for v in values)
    default = jax.config.jax_default_matmul_precision
    return default is not None and str(default).lower() in ("highest", "float32")


def _uses_winograd(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                   dimension_numbers, feature_group_count, precision, extra):  # fmt: skip
    if extra or feature_group_count != 1 or lhs.ndim != 4 or rhs.shape[:2] != (3, 3):
        return False
    if lhs.dtype != jnp.float32 or rhs.dtype != jnp.float32:
        return False
    if tuple(window_strides) != (1, 1) or any(
        d is not None and tuple(d) != (1, 1) for d in (lhs_dilation, rhs_dilation)
    ):
        return False
    if not (padding == "SAME" or [tuple(p) for p in padding] == [(1, 1), (1, 1)]):
        return False
    nhwc = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC"))
    given = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    if given != nhwc or _full_precision_requested(precision):
        return False
    n, height, width, channels = lhs.shape
    tiles_h, tiles_w = _num_tiles(height, width)
    return (
        min(height, width) >= _MIN_SIDE
        and n * tiles_h * tiles_w >= _MIN_TILES
        and channels * rhs.shape[-1] >= _MIN_CHANNEL_PRODUCT
    )


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         precision=None, **extra):  # fmt: skip
    """`jax.lax.conv_general_dilated` with the CPU layout pin and Winograd path (module doc).

    Same arguments and result; on other backends and dtypes it is that function."""
    if jax.default_backend() == "cpu" and lhs.dtype == jnp.float32:
        lhs = with_layout_constraint(lhs, Layout(tuple(range(lhs.ndim))))
        if _uses_winograd(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                          dimension_numbers, feature_group_count, precision, extra):  # fmt: skip
            return winograd_conv3x3(lhs, rhs)
    return jax.lax.conv_general_dilated(
        lhs,
        rhs,
        window_strides,
        padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        precision=precision,
        **extra,
    )


# The models' convolution layer: flax's, with the function above.
Conv = functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated)
