"""CPU convolution kernels: `conv_general_dilated`, a drop-in for `jax.lax.conv_general_dilated`
that the models' `Conv` layers call when `model.kernels="auto"` (see `frcnn_jax.kernels`).

What each part computes, and when it is chosen (float32 NHWC convolutions traced for the CPU
backend only; everything else is XLA's convolution, untouched):

- Layout pins. Every convolution input is pinned to the row-major NHWC layout
  (`with_layout_constraint`), and so are the output gradients and strided windows of the
  backward passes below. XLA's CPU backend otherwise makes the fusion that produced an
  activation write it channel-major for the weight gradient, in an untiled loop; pinned, that
  becomes a separate tiled transpose. Nothing is computed differently.
- `tapwise_conv`, for 1x1 layers and 3x3 stride-2 layers up to `_MAX_TAPWISE_3X3` input x
  output channels: XLA's forward and input gradient, and the weight gradient as one matrix
  product per kernel tap (the tap's strided input window contracted with the output
  gradient). For narrow 3x3 stride-2 layers (up to `_MAX_PHASES_3X3`) the input gradient is
  computed by parity phases (one matrix product for all taps, then shifted sums). The same
  float32 products, summed in another order.
- `winograd_conv3x3`, for 3x3 stride-1 padding-1 layers with at least `_MIN_TILES` 4x4 output
  tiles, `_MIN_CHANNEL_PRODUCT` input x output channels and maps of 8x8 or more, unless the
  layer or `jax.default_matmul_precision` asks for HIGHEST precision: Winograd F(4x4, 3x3)
  (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2016) for the forward
  pass, the input gradient and the weight gradient (a matrix product in the Winograd domain):
  6x6 input tiles, 36 batched matrix products, 4x4 output tiles, 4x fewer multiplications
  than a direct convolution. Results differ from a direct convolution by rounding, about 1e-5
  of the output's magnitude (cuDNN's Winograd kernels make the same trade).

The thresholds are where each kernel measured faster than XLA's on a 2-core x86 CPU;
`experiments/bench_convs.py` measures them again (its runs: `experiments/results_cpu.txt`).
"""

import functools

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
# The ops below are float32 algorithms on any backend: no TF32/bf16 passes on GPUs and TPUs
# (the same products as the default precision on the CPU).
_FLOAT32 = jax.lax.Precision.HIGHEST

# Where each kernel is chosen (see the module docstring).
_MIN_TILES = 256
_MIN_CHANNEL_PRODUCT = 128 * 128
_MIN_SIDE = 8
_MAX_TAPWISE_3X3 = 256 * 256
_MAX_PHASES_3X3 = 64 * 128


def _on_cpu():
    return jax.default_backend() == "cpu"


def _row_major(x):
    """x pinned to the row-major layout on the CPU (the docstring's "Layout pins"); x elsewhere."""
    if not _on_cpu():
        return x
    return with_layout_constraint(x, Layout(tuple(range(x.ndim))))


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


def _padded_for_tiles(x):
    """x padded by 1 on top and left and up to whole tiles (plus 1) on the bottom and right, and
    its number of tiles (rows, columns)."""
    _, height, width, _ = x.shape
    tiles_h, tiles_w = _num_tiles(height, width)
    pad_h, pad_w = tiles_h * _TILE + 1 - height, tiles_w * _TILE + 1 - width
    return jnp.pad(x, ((0, 0), (1, pad_h), (1, pad_w), (0, 0))), (tiles_h, tiles_w)


def _input_tiles(x):
    """B^T d B of every overlapping 6x6 tile of x padded by 1: [N, H, W, C] -> [36, T, C]
    with T = N * ceil(H/4) * ceil(W/4) tiles; index 6 * column + row."""
    n, _, _, channels = x.shape
    padded, (tiles_h, tiles_w) = _padded_for_tiles(x)
    stride = _TILE
    rows = jnp.stack(
        _combine(_BT, [padded[:, i : i + stride * tiles_h : stride] for i in range(_SPAN)])
    )  # [6 row, N, tiles_h, W + 2, C]
    tiles = jnp.stack(
        _combine(_BT, [rows[:, :, :, j : j + stride * tiles_w : stride] for j in range(_SPAN)])
    )  # [6 column, 6 row, N, tiles_h, tiles_w, C]
    return tiles.reshape(_SPAN * _SPAN, n * tiles_h * tiles_w, channels)


def _input_tiles_by_columns(x):
    """`_input_tiles(x)` computed columns first (equal up to rounding). The backward pass
    recomputes x's tiles this way: XLA's common-subexpression pass would merge a copy of the
    forward pass's computation back into it, and keep those tiles (2.25x x's size) alive from
    the forward pass to the backward pass."""
    n, _, _, channels = x.shape
    padded, (tiles_h, tiles_w) = _padded_for_tiles(x)
    stride = _TILE
    columns = jnp.stack(
        _combine(_BT, [padded[:, :, j : j + stride * tiles_w : stride] for j in range(_SPAN)])
    )  # [6 column, N, H + 2, tiles_w, C]
    tiles = jnp.stack(
        _combine(_BT, [columns[:, :, i : i + stride * tiles_h : stride] for i in range(_SPAN)])
    )  # [6 row, 6 column, N, tiles_h, tiles_w, C]
    return tiles.swapaxes(0, 1).reshape(_SPAN * _SPAN, n * tiles_h * tiles_w, channels)


def _kernel_tiles(kernel):
    """G g G^T: [3, 3, C, O] -> [36, C, O], index 6 * column + row as in `_input_tiles`."""
    rows = jnp.stack(_combine(_G, [kernel[i] for i in range(3)]))  # [6 row, 3 column, C, O]
    tiles = jnp.stack(_combine(_G, [rows[:, j] for j in range(3)]))  # [6 column, 6 row, C, O]
    return tiles.reshape(_SPAN * _SPAN, *kernel.shape[2:])


def _kernel_tiles_adjoint(tiles):
    """The transpose of `_kernel_tiles`: [36, C, O] -> [3, 3, C, O]."""
    tiles = tiles.reshape(_SPAN, _SPAN, *tiles.shape[1:])  # [6 column, 6 row, C, O]
    columns = jnp.stack(_combine(_G.T, [tiles[q] for q in range(_SPAN)]))  # [3 col, 6 row, ...]
    return jnp.stack(_combine(_G.T, [columns[:, p] for p in range(_SPAN)]))  # [3 row, 3 col, ...]


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
    products = jnp.einsum("ktc,kco->kto", tiles, _kernel_tiles(kernel), precision=_FLOAT32)
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
    return _winograd(x, kernel)[0], (x, kernel)


def _winograd_bwd(residuals, grad):
    x, kernel = residuals
    grad = _row_major(grad)
    # The input gradient is the same kind of convolution, with the kernel rotated by 180
    # degrees and its channel axes swapped.
    grad_x, _ = _winograd(grad, jnp.flip(kernel, (0, 1)).swapaxes(2, 3))

    # The weight gradient needs x's tiles again: recomputed here rather than kept from the
    # forward pass (they are 2.25x x's size; x is often kept anyway, for the layer before),
    # one image at a time, so that only one image's tiles and output-gradient tiles exist at
    # once (ResNet-50-FPN's RPN head on P2 at batch 2: 0.18 GiB less at the step's peak).
    def add_image(total, image):
        x_n, grad_n = (a[None] for a in image)
        products = jnp.einsum(
            "ktc,kto->kco",
            _input_tiles_by_columns(x_n),
            _output_tiles_adjoint(grad_n),
            precision=_FLOAT32,
        )
        return total + products, None

    zeros = jnp.zeros((_SPAN * _SPAN, *kernel.shape[2:]), grad.dtype)
    grad_tiles, _ = jax.lax.scan(add_image, zeros, (x, grad))
    return grad_x, _kernel_tiles_adjoint(grad_tiles)


winograd_conv3x3.defvjp(_winograd_fwd, _winograd_bwd)


def _conv_nhwc(x, kernel, strides, padding):
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        strides,
        padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=_FLOAT32,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def tapwise_conv(x, kernel, strides, padding):
    """XLA's convolution, with the weight gradient as one matrix product per kernel tap.

    Args:
      x: float32 [N, H, W, C] (NHWC); kernel: float32 [kh, kw, C, O] (HWIO).
      strides: (sh, sw); padding: ((top, bottom), (left, right)), static.

    Returns:
      float32 [N, H', W', O], `lax.conv_general_dilated`'s result; the forward and the input
      gradient are XLA's too. The weight gradient of tap (i, j) is x's strided window at
      (i, j) contracted with the output gradient over N, H', W': on the CPU 1.3-2.4x faster
      than XLA's for 1x1 and for 3x3 stride-2 layers up to 256 channels.
    """
    return _conv_nhwc(x, kernel, strides, padding)


def _tapwise_fwd(x, kernel, strides, padding):
    return _conv_nhwc(x, kernel, strides, padding), (x, kernel)


def _stride2_input_gradient(grad, kernel, x_shape, padding):
    """The input gradient of a 3x3 stride-2 convolution by parity phases: an input pixel at
    padded position (2a + p, 2b + q) receives only from the taps (i, j) with i = p, j = q
    (mod 2), at output (a - i // 2, b - j // 2). One matrix product gives every tap's
    contribution, [N, H', W', O] x [O, 9C]; shifted sums make the four phases, which are
    interleaved and cropped to the input. The same products as XLA's transposed convolution,
    summed in another order."""
    n, height, width, channels = x_shape
    (top, _), (left, _) = padding
    _, out_h, out_w, _ = grad.shape
    taps = jnp.einsum("nhwo,ijco->nhwijc", grad, kernel, precision=_FLOAT32)
    phases = {}
    for i in range(3):
        for j in range(3):
            shifted = jnp.pad(
                taps[:, :, :, i, j],
                ((0, 0), (i // 2, 1 - i // 2), (j // 2, 1 - j // 2), (0, 0)),
            )  # [N, H' + 1, W' + 1, C]
            key = (i % 2, j % 2)
            phases[key] = shifted if key not in phases else phases[key] + shifted
    rows = [jnp.stack([phases[(p, 0)], phases[(p, 1)]], axis=3) for p in (0, 1)]
    full = jnp.stack(rows, axis=2).reshape(n, 2 * out_h + 2, 2 * out_w + 2, channels)
    return full[:, top : top + height, left : left + width]


def _tapwise_bwd(strides, padding, residuals, grad):
    x, kernel = residuals
    grad = _row_major(grad)
    if _by_phases(x.shape, kernel.shape, strides, padding, grad.shape):
        grad_x = _stride2_input_gradient(grad, kernel, x.shape, padding)
    else:
        _, vjp = jax.vjp(lambda x: _conv_nhwc(x, kernel, strides, padding), x)
        (grad_x,) = vjp(grad)
    padded = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    (out_h, out_w), (stride_h, stride_w) = grad.shape[1:3], strides

    def tap(i, j):
        window = padded[
            :,
            i : i + stride_h * (out_h - 1) + 1 : stride_h,
            j : j + stride_w * (out_w - 1) + 1 : stride_w,
        ]  # [N, H', W', C]
        return jnp.einsum("nhwc,nhwo->co", _row_major(window), grad, precision=_FLOAT32)

    grad_kernel = jnp.stack(
        [jnp.stack([tap(i, j) for j in range(kernel.shape[1])]) for i in range(kernel.shape[0])]
    )
    return grad_x, grad_kernel


tapwise_conv.defvjp(_tapwise_fwd, _tapwise_bwd)


def _by_phases(x_shape, kernel_shape, strides, padding, grad_shape):
    """Whether `_stride2_input_gradient` applies (3x3, stride 2, padding of at most 1 that
    the phases cover) and measured faster (up to `_MAX_PHASES_3X3` channels product)."""
    (top, bottom), (left, right) = padding
    height, width = x_shape[1:3]
    return (
        tuple(kernel_shape[:2]) == (3, 3)
        and tuple(strides) == (2, 2)
        and max(top, bottom, left, right) <= 1
        and top + height <= 2 * grad_shape[1] + 2
        and left + width <= 2 * grad_shape[2] + 2
        and kernel_shape[2] * kernel_shape[3] <= _MAX_PHASES_3X3
    )


def _full_precision_requested(precision):
    if precision is not None:
        values = precision if isinstance(precision, tuple) else (precision,)
        return any(jax.lax.Precision(v) == jax.lax.Precision.HIGHEST for v in values)
    default = jax.config.jax_default_matmul_precision
    return default is not None and str(default).lower() in ("highest", "float32")


def _route(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation,
    rhs_dilation,
    dimension_numbers,
    feature_group_count,
    precision,
    extra,
):
    """How to run this convolution: ("winograd" | "tapwise" | None for XLA's, padding)."""
    if not _on_cpu() or extra or feature_group_count != 1 or lhs.ndim != 4:
        return None, None
    if lhs.dtype != jnp.float32 or rhs.dtype != jnp.float32:
        return None, None
    if any(d is not None and tuple(d) != (1, 1) for d in (lhs_dilation, rhs_dilation)):
        return None, None
    nhwc = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC"))
    if jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) != nhwc:
        return None, None
    n, height, width, channels = lhs.shape
    kernel, strides = tuple(rhs.shape[:2]), tuple(window_strides)
    if isinstance(padding, str):
        padding = jax.lax.padtype_to_pads((height, width), kernel, strides, padding)
    padding = tuple(tuple(int(p) for p in pair) for pair in padding)
    channel_product = channels * rhs.shape[-1]
    if kernel == (3, 3) and strides == (1, 1) and padding == ((1, 1), (1, 1)):
        tiles_h, tiles_w = _num_tiles(height, width)
        if (
            not _full_precision_requested(precision)
            and min(height, width) >= _MIN_SIDE
            and n * tiles_h * tiles_w >= _MIN_TILES
            and channel_product >= _MIN_CHANNEL_PRODUCT
        ):
            return "winograd", padding
    elif kernel == (1, 1) and padding == ((0, 0), (0, 0)):
        return "tapwise", padding
    elif kernel == (3, 3) and strides == (2, 2) and channel_product <= _MAX_TAPWISE_3X3:
        return "tapwise", padding
    return None, None


def conv_general_dilated(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count=1,
    precision=None,
    **extra,
):
    """`jax.lax.conv_general_dilated` with this module's CPU kernels where they apply.

    Same arguments and result; on other backends, dtypes and layer shapes it is that function."""
    route, explicit_padding = _route(
        lhs,
        rhs,
        window_strides,
        padding,
        lhs_dilation,
        rhs_dilation,
        dimension_numbers,
        feature_group_count,
        precision,
        extra,
    )
    if lhs.dtype == jnp.float32:
        lhs = _row_major(lhs)
    if route == "winograd":
        return winograd_conv3x3(lhs, rhs)
    if route == "tapwise":
        return tapwise_conv(lhs, rhs, tuple(window_strides), explicit_padding)
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
