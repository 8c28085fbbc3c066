"""RoI feature extraction: RoIAlign (bilinear sampling) and RoIPool (the paper's max pooling).

Semantics follow torchvision's CPU kernels exactly (`torchvision.ops.roi_align`, `roi_pool`,
`MultiScaleRoIAlign`), with channels-last features of one image: features [H, W, C], boxes
[R, 4] (x1, y1, x2, y2) in image pixels, output [R, out_h, out_w, C].

RoIAlign is computed as a weighted sum of feature rows: every output bin averages S_y x S_x
sample points, each a bilinear mix of 4 feature pixels, so each bin reads (2 S_y) x (2 S_x)
"taps". The forward gathers one tap at a time and accumulates (XLA fuses the gathers into one
loop, ~5x faster than torchvision on CPU). The backward either scatters the output gradient
onto the taps or, on small maps where it is cheaper, forms it densely from the separable
interpolation matrices (`_backward_is_dense`). Interpolation weights are float32 whatever the
feature dtype. RoIPool reads each bin's window from a table of power-of-two row maxima.
"""

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from frcnn_jax.ops import _checks
from frcnn_jax.ops._numerics import rounded, true_divide
from frcnn_jax.ops.boxes import box_area


def _pair(output_size) -> tuple[int, int]:
    if isinstance(output_size, (int, np.integer)):
        output_size = (output_size, output_size)
    out_h, out_w = (int(s) for s in output_size)
    if out_h <= 0 or out_w <= 0:
        raise ValueError(f"output_size must be positive; got {output_size!r}")
    return out_h, out_w


def _check_inputs(features, boxes, *, features_name="features"):
    _checks.check_rank(features_name, features, 3)
    _checks.check_boxes("boxes", boxes, rank=2)


# ----------------------------------------------------------------------------------------------
# RoIAlign


def _axis_taps(start, bin_size, grid, extent, *, num_bins, num_samples):
    """Bilinear taps along one axis (torchvision's `pre_calc_for_bilinear_interpolate`).

    Args:
      start: float32 [R] RoI start on the feature map (after scale and the aligned offset).
      bin_size: float32 [R] bin length.
      grid: int32 [R] sample points per bin actually used (<= num_samples; 0 = none).
      extent: the feature-map length along this axis: int or int32 [R] (per-RoI level).
      num_bins: static number of output bins along this axis.
      num_samples: static number of sample slots per bin.

    Returns:
      (index int32 [R, num_bins, num_samples, 2], weight float32 [R, num_bins, num_samples, 2]):
      the low and high neighbour of every sample and their interpolation weights; samples past
      `grid` or outside [-1, extent] have weight 0 (and a safe index 0).
    """
    extent = jnp.asarray(extent, jnp.float32)
    if extent.ndim:
        extent = extent[:, None, None]
    bins = jnp.arange(num_bins, dtype=jnp.float32)[None, :, None]
    samples = jnp.arange(num_samples, dtype=jnp.float32)[None, None, :]
    start, bin_size = start[:, None, None], bin_size[:, None, None]
    grid = grid.astype(jnp.float32)[:, None, None]
    # Operation order of torchvision's kernel: start + bin * size + (i + .5) * size / grid.
    step = true_divide((samples + 0.5) * bin_size, jnp.maximum(grid, 1.0))
    coord = start + rounded(bins * bin_size) + step
    # Written as "in range" so that NaN coordinates count as outside, as in torchvision.
    inside = (samples < grid) & (coord >= -1.0) & (coord <= extent)
    coord = jnp.maximum(coord, 0.0)
    low = jnp.floor(coord)
    at_end = low >= extent - 1
    low = jnp.where(at_end, extent - 1, low)
    high = jnp.where(at_end, extent - 1, low + 1)
    coord = jnp.where(at_end, low, coord)
    frac = coord - low
    index = jnp.where(inside[..., None], jnp.stack([low, high], -1), 0).astype(jnp.int32)
    weight = jnp.stack([1.0 - frac, frac], -1) * inside[..., None]
    return index, weight


# The backward of RoIAlign on CPU: scattering the gradient costs ~1 ns per (tap, channel); on a
# small map it is cheaper to form it densely as Ky^T dO Kx with matrix products (~0.015 ns per
# multiply-add, but H * W of them per bin row). `_backward_is_dense` picks the cheaper.
_SCATTER_TO_DENSE_COST = 70
_DENSE_CHUNK = 8  # RoIs per step of the dense backward: small products stay in cache


def _backward_is_dense(*, height, width, out_w, taps_per_bin):
    dense = height * width + out_w * width  # multiply-adds per (RoI, bin row, channel)
    scatter = out_w * taps_per_bin  # scattered adds per (RoI, bin row, channel)
    return dense < _SCATTER_TO_DENSE_COST * scatter


def _axis_factor(index, weight, extent):
    """Separable interpolation matrix of one axis: float32 [R, bins, extent] from its taps."""
    one_hot = index[..., None] == jnp.arange(extent)  # [R, bins, S, 2, extent]
    return jnp.sum(jnp.where(one_hot, weight[..., None], 0.0), axis=(2, 3))


_UNROLLED_TAPS = 64  # up to this many taps per bin are unrolled; more loop in chunks
_TAP_CHUNK = 16


def _map_tap_chunks(fn, index, weight):
    """Applies fn(index_chunk, weight_chunk) -> [R, oh, ow, ...] to the taps, all at once when
    there are few, else `_TAP_CHUNK` at a time in a loop (large adaptive sampling caps would
    otherwise unroll thousands of gathers), returning the per-chunk results stacked."""
    num_taps = index.shape[-1]
    if num_taps <= _UNROLLED_TAPS:
        return fn(index, weight)[None]
    pad = -num_taps % _TAP_CHUNK
    widths = [(0, 0)] * (index.ndim - 1) + [(0, pad)]
    index, weight = jnp.pad(index, widths), jnp.pad(weight, widths)  # padded taps weigh 0

    def chunks(x):
        return jnp.moveaxis(x.reshape(*x.shape[:-1], -1, _TAP_CHUNK), -2, 0)

    return jax.lax.map(lambda chunk: fn(*chunk), (chunks(index), chunks(weight)))


@jax.custom_vjp
def _gather_taps(flat_features, index, weight, dense_factors):
    """sum_t weight[..., t] * flat_features[index[..., t]]: [R, oh, ow, T] taps -> [R, oh, ow, C].

    flat_features: [M, C]; index: int32 [R, oh, ow, T]; weight: float32 [R, oh, ow, T].
    dense_factors: None, or (Ky float32 [R, oh, H], Kx float32 [R, ow, W]) with
      weight = Ky (x) Kx on a single H x W map, to compute the backward densely.
    """
    del dense_factors  # only the backward uses them

    def weighted_sum(index, weight):
        # One gather per tap, accumulated: XLA fuses them into a single loop over the output.
        acc = weight[..., 0, None] * flat_features[index[..., 0]].astype(jnp.float32)
        for t in range(1, index.shape[-1]):
            acc = acc + weight[..., t, None] * flat_features[index[..., t]].astype(jnp.float32)
        return acc

    return jnp.sum(_map_tap_chunks(weighted_sum, index, weight), axis=0)


def _gather_taps_fwd(flat_features, index, weight, dense_factors):
    out = _gather_taps(flat_features, index, weight, dense_factors)
    return out, (flat_features, index, weight, dense_factors)


def _dense_features_grad(factors, grad, height, width):
    """sum_r Ky[r]^T grad[r] Kx[r]: [H * W, C], a few RoIs at a time."""
    k_y, k_x = factors
    num_rois, _, _, channels = grad.shape
    pad = -num_rois % _DENSE_CHUNK

    def chunks(x):
        x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
        return x.reshape(-1, _DENSE_CHUNK, *x.shape[1:])

    def step(acc, chunk):
        k_y, k_x, grad = chunk
        rows = jnp.einsum("rqx,rpqc->rpxc", k_x, grad)  # [n, oh, W, C]
        return acc + jnp.einsum("rpy,rpxc->yxc", k_y, rows), None

    init = jnp.zeros((height, width, channels), jnp.float32)
    total, _ = jax.lax.scan(step, init, (chunks(k_y), chunks(k_x), chunks(grad)))
    return total.reshape(height * width, channels)


def _gather_taps_bwd(residuals, grad):
    # No cotangent for `dense_factors`: they restate `weight`, which carries the box gradient.
    flat_features, index, weight, dense_factors = residuals
    channels = flat_features.shape[-1]
    if dense_factors is None:
        # One scatter per tap, in a loop: all taps' updates at once ([R, oh, ow, T, C]) would
        # be T times the gradient's size (0.8 GB for 1024 RoIs of 7 x 7 x 256 with 16 taps).
        def scatter_tap(d_features, tap):
            index, weight = tap  # [R, oh, ow] each
            updates = (weight[..., None] * grad).reshape(-1, channels)
            return d_features.at[index.reshape(-1)].add(updates), None

        d_features, _ = jax.lax.scan(
            scatter_tap,
            jnp.zeros(flat_features.shape, jnp.float32),
            (jnp.moveaxis(index, -1, 0), jnp.moveaxis(weight, -1, 0)),
        )
    else:
        height, width = dense_factors[0].shape[-1], dense_factors[1].shape[-1]
        d_features = _dense_features_grad(dense_factors, grad, height, width)

    # d/d weight: the feature row each tap read, projected on the gradient (for box gradients;
    # removed by XLA when nothing asks for them).
    def projections(index, _):
        rows = [flat_features[index[..., t]].astype(jnp.float32) for t in range(index.shape[-1])]
        return jnp.stack([jnp.sum(grad * row, axis=-1) for row in rows], axis=-1)

    chunks = _map_tap_chunks(projections, index, weight)  # [n, R, oh, ow, chunk]
    d_weight = jnp.moveaxis(chunks, 0, -2).reshape(*index.shape[:-1], -1)[..., : index.shape[-1]]
    return d_features.astype(flat_features.dtype), None, d_weight, None


_gather_taps.defvjp(_gather_taps_fwd, _gather_taps_bwd)


def _roi_align_flat(
    flat_features,
    boxes,
    *,
    heights,
    widths,
    offsets,
    scales,
    output_size,
    sampling_ratio,
    aligned,
    max_sampling_ratio,
):
    """RoIAlign of boxes [R, 4] against one or several feature maps flattened to [M, C].

    RoI r reads the map of height heights[r] and width widths[r] that starts at row offsets[r]
    of `flat_features`, at scale scales[r]; scalars apply to every RoI.
    """
    out_h, out_w = output_size
    boxes = jnp.asarray(boxes, jnp.float32)
    offset = 0.5 if aligned else 0.0
    scaled = rounded(boxes * jnp.asarray(scales, jnp.float32)[..., None]) - offset
    roi_w = scaled[:, 2] - scaled[:, 0]
    roi_h = scaled[:, 3] - scaled[:, 1]
    if not aligned:  # torchvision forces malformed RoIs to 1 x 1
        roi_w = jnp.maximum(roi_w, 1.0)
        roi_h = jnp.maximum(roi_h, 1.0)
    bin_h = true_divide(roi_h, out_h)
    bin_w = true_divide(roi_w, out_w)
    if sampling_ratio > 0:
        samples_y = samples_x = int(sampling_ratio)
        grid_y = jnp.full(roi_h.shape, samples_y, jnp.int32)
        grid_x = grid_y
    else:  # adaptive: ceil(roi_size / output_size) points per bin, at most the static cap
        samples_y = samples_x = int(max_sampling_ratio)
        grid_y = jnp.clip(jnp.ceil(bin_h), 0, samples_y).astype(jnp.int32)
        grid_x = jnp.clip(jnp.ceil(bin_w), 0, samples_x).astype(jnp.int32)
    y_index, y_weight = _axis_taps(
        scaled[:, 1], bin_h, grid_y, heights, num_bins=out_h, num_samples=samples_y
    )
    x_index, x_weight = _axis_taps(
        scaled[:, 0], bin_w, grid_x, widths, num_bins=out_w, num_samples=samples_x
    )
    count = jnp.maximum(grid_y * grid_x, 1).astype(jnp.float32)
    num_rois = boxes.shape[0]
    row_stride = jnp.asarray(widths, jnp.int32)
    base = jnp.asarray(offsets, jnp.int32)
    if row_stride.ndim:
        row_stride = row_stride[:, None, None, None, None, None, None]
        base = base[:, None, None, None, None, None, None]
    # Taps [R, out_h, out_w, Sy, Sx, 2 (y), 2 (x)] -> flattened to [R, out_h, out_w, T].
    index = (
        base
        + y_index[:, :, None, :, None, :, None] * row_stride
        + x_index[:, None, :, None, :, None, :]
    ).reshape(num_rois, out_h, out_w, -1)
    weight = (
        y_weight[:, :, None, :, None, :, None]
        * x_weight[:, None, :, None, :, None, :]
        / count[:, None, None, None, None, None, None]
    ).reshape(num_rois, out_h, out_w, -1)
    dense_factors = None
    if np.ndim(heights) == 0 and _backward_is_dense(
        height=heights, width=widths, out_w=out_w, taps_per_bin=index.shape[-1]
    ):
        dense_factors = (
            _axis_factor(y_index, y_weight / count[:, None, None, None], heights),
            _axis_factor(x_index, x_weight, widths),
        )
    return _gather_taps(flat_features, index, weight, dense_factors).astype(flat_features.dtype)


def roi_align(
    features,
    boxes,
    *,
    output_size,
    spatial_scale,
    sampling_ratio,
    aligned,
    max_sampling_ratio=4,
):
    """RoIAlign of one image's feature map (Mask R-CNN; torchvision's `roi_align` semantics).

    Args:
      features: float [H, W, C] (float32 or bfloat16) feature map of one image.
      boxes: float32 [R, 4] (x1, y1, x2, y2) RoIs in image pixels; padded rows are fine (their
        output is whatever a zero box pools and should be masked by the caller).
      output_size: int or (out_h, out_w) bins.
      spatial_scale: feature pixels per image pixel (1/16 for VGG-16 conv5_3).
      sampling_ratio: sample points per bin along each axis; <= 0 for adaptive sampling,
        ceil(roi_size / output_size) points (Detectron2's ROIAlignV2 uses 0).
      aligned: shift box coordinates by -0.5 pixel (True is the correct, "aligned" form;
        torchvision's Faster R-CNN uses False).
      max_sampling_ratio: static cap on the adaptive number of points per bin and axis; a
        bin that would need more uses this many, evenly spaced. Only read when
        sampling_ratio <= 0; compute grows with its square.

    Returns:
      [R, out_h, out_w, C] in the features' dtype: torchvision's output (NCHW there). Boxes
      partly or fully outside the map sample zeros beyond one pixel past the border, exactly as
      torchvision does. Differentiable with respect to `features` and `boxes`.
    """
    _check_inputs(features, boxes)
    height, width, channels = _checks.shape_of(features)
    _checks.check_non_negative_int("max_sampling_ratio", max_sampling_ratio)
    features = jnp.asarray(features)
    return _roi_align_flat(
        features.reshape(height * width, channels),
        boxes,
        heights=height,
        widths=width,
        offsets=0,
        scales=spatial_scale,
        output_size=_pair(output_size),
        sampling_ratio=sampling_ratio,
        aligned=aligned,
        max_sampling_ratio=max(max_sampling_ratio, 1),
    )


def map_levels(boxes, *, num_levels, min_level, canonical_size=224, canonical_level=4):
    """Pyramid level of each box: torchvision's `LevelMapper` (FPN paper, equation 1).

    Args:
      boxes: float32 [R, 4] (x1, y1, x2, y2) in image pixels.
      num_levels: number of pyramid levels L.
      min_level: the finest level k_min (2 for P2 at stride 4).
      canonical_size, canonical_level: a box of canonical_size^2 pixels maps to level
        canonical_level (224 and 4 in the FPN paper).

    Returns:
      int32 [R] index into the L levels: clip(floor(k0 + log2(sqrt(area) / s0) + 1e-6),
      k_min, k_max) - k_min (the 1e-6 is torchvision's).
    """
    _checks.check_boxes("boxes", boxes, rank=2)
    size = jnp.sqrt(box_area(jnp.asarray(boxes, jnp.float32)))
    level = jnp.floor(canonical_level + jnp.log2(true_divide(size, canonical_size)) + 1e-6)
    level = jnp.clip(level, min_level, min_level + num_levels - 1)
    return (level - min_level).astype(jnp.int32)


def multilevel_roi_align(
    features: Sequence,
    boxes,
    *,
    output_size,
    spatial_scales: Sequence[float],
    sampling_ratio,
    aligned,
    canonical_size=224,
    canonical_level=4,
    max_sampling_ratio=4,
):
    """RoIAlign over an FPN pyramid, each box pooled from its own level (`MultiScaleRoIAlign`).

    Args:
      features: sequence of L float [H_l, W_l, C] maps of one image, finest first.
      boxes: float32 [R, 4] (x1, y1, x2, y2) in image pixels.
      output_size, sampling_ratio, aligned, max_sampling_ratio: as in `roi_align`.
      spatial_scales: L scales, each a power of two (1/4, 1/8, 1/16, 1/32 for P2-P5);
        torchvision infers them as 2 ** round(log2(feature_size / image_size)).
      canonical_size, canonical_level: the level-mapping rule (`map_levels`).

    Returns:
      [R, out_h, out_w, C]: each box's RoIAlign on the level `map_levels` gives it, with that
      level's scale. All levels are flattened into one table and read by one gather, so the
      cost is that of a single `roi_align`, not L of them.
    """
    if len(features) == 0 or len(features) != len(spatial_scales):
        raise ValueError(
            f"features and spatial_scales must be non-empty and of equal length; got "
            f"{len(features)} maps and {len(spatial_scales)} scales"
        )
    shapes = [_checks.shape_of(f) for f in features]
    for level, feature in enumerate(features):
        _check_inputs(feature, boxes, features_name=f"features[{level}]")
    if len({s[2] for s in shapes}) != 1:
        raise ValueError(f"every level must have the same channel count; got shapes {shapes}")
    log_scales = [-math.log2(s) for s in spatial_scales]
    if any(abs(v - round(v)) > 1e-6 for v in log_scales):
        raise ValueError(f"spatial_scales must be powers of two; got {spatial_scales!r}")
    min_level = round(log_scales[0])
    if [round(v) for v in log_scales] != list(range(min_level, min_level + len(features))):
        raise ValueError(f"spatial_scales must halve from level to level; got {spatial_scales!r}")

    channels = shapes[0][2]
    flat = jnp.concatenate([jnp.asarray(f).reshape(-1, channels) for f in features], axis=0)
    starts = np.cumsum([0] + [h * w for h, w, _ in shapes[:-1]])
    level = map_levels(
        boxes,
        num_levels=len(features),
        min_level=min_level,
        canonical_size=canonical_size,
        canonical_level=canonical_level,
    )

    def per_level(values, dtype):
        return jnp.asarray(np.asarray(values, dtype))[level]

    return _roi_align_flat(
        flat,
        boxes,
        heights=per_level([s[0] for s in shapes], np.int32),
        widths=per_level([s[1] for s in shapes], np.int32),
        offsets=per_level(starts, np.int32),
        scales=per_level(spatial_scales, np.float32),
        output_size=_pair(output_size),
        sampling_ratio=sampling_ratio,
        aligned=aligned,
        max_sampling_ratio=max(max_sampling_ratio, 1),
    )


# ----------------------------------------------------------------------------------------------
# RoIPool

_POOL_ROWS = 8  # window rows read per loop step; windows of taller bins take more steps


def _c_round(x):
    """C's `round`: halves away from zero (jnp.round rounds halves to even)."""
    truncated = jnp.trunc(x)
    half = jnp.abs(x - truncated) == 0.5
    return jnp.where(half, truncated + jnp.sign(x), jnp.round(x))


@functools.cache
def _bin_edges_table(num_bins, max_length):
    """torchvision's bin edges, relative to the RoI's start, for integer RoI lengths
    0..max_length: int32 [max_length + 1, num_bins] each of floor(i * (L / n)) and
    ceil((i + 1) * (L / n)), every operation rounded to float32 as in its kernel."""
    size = np.arange(max_length + 1, dtype=np.float32)[:, None] / np.float32(num_bins)
    bins = np.arange(num_bins, dtype=np.float32)[None]
    start = np.floor(bins * size).astype(np.int32)
    end = np.ceil((bins + np.float32(1)) * size).astype(np.int32)
    return start, end


def _pool_windows(boxes, *, spatial_scale, output_size, height, width):
    """Integer bin windows of torchvision's `roi_pool` (Caffe's rounding and floor/ceil edges).

    Returns (y_start, y_end int32 [R, out_h], x_start, x_end int32 [R, out_w]): bin (i, j)
    covers rows [y_start[i], y_end[i]) and columns [x_start[j], x_end[j]), clipped to the map.
    """
    out_h, out_w = output_size
    corners = _c_round(rounded(boxes * jnp.float32(spatial_scale))).astype(jnp.int32)
    x0, y0 = corners[:, 0:1], corners[:, 1:2]
    roi_w = jnp.maximum(corners[:, 2] - corners[:, 0] + 1, 1)
    roi_h = jnp.maximum(corners[:, 3] - corners[:, 1] + 1, 1)

    def edges(origin, length, num_bins, limit):
        # Lengths of RoIs up to twice the map's come from a table made with NumPy's IEEE
        # float32 arithmetic: XLA's GPU division is not correctly rounded, and an ulp decides
        # a floor or ceil here. Longer RoIs (mostly off the map) divide on the device.
        table_start, table_end = map(jnp.asarray, _bin_edges_table(num_bins, 2 * limit + 2))
        in_table = (length <= table_start.shape[0] - 1)[:, None]
        row = jnp.minimum(length, table_start.shape[0] - 1)
        size = true_divide(length.astype(jnp.float32), num_bins)[:, None]
        bins = jnp.arange(num_bins, dtype=jnp.float32)[None]
        start = jnp.where(
            in_table, table_start[row], jnp.floor(rounded(bins * size)).astype(jnp.int32)
        )
        end = jnp.where(
            in_table, table_end[row], jnp.ceil(rounded((bins + 1) * size)).astype(jnp.int32)
        )
        return jnp.clip(start + origin, 0, limit), jnp.clip(end + origin, 0, limit)

    y_start, y_end = edges(y0, roi_h, out_h, height)
    x_start, x_end = edges(x0, roi_w, out_w, width)
    return y_start, y_end, x_start, x_end


def _row_max_table(features):
    """Running maxima along each row: table[l, y, x] = max of features[y, x : x + 2^l].

    Returns (values [L, H, W, C], argmax int32 [L, H, W, C] as y * W + x) with
    L = floor(log2 W) + 1.
    The argmax is the leftmost maximum; NaN counts as -inf (torchvision never selects NaN).
    """
    height, width, _ = features.shape
    values = jnp.where(jnp.isnan(features), -jnp.inf, features)
    argmax = jnp.broadcast_to(
        jnp.arange(height * width, dtype=jnp.int32).reshape(height, width, 1), features.shape
    )
    tables = [(values, argmax)]
    for level in range(1, width.bit_length()):
        shift = 2 ** (level - 1)
        values, argmax = tables[-1]
        right_values = jnp.pad(
            values[:, shift:], [(0, 0), (0, shift), (0, 0)], constant_values=-jnp.inf
        )
        right_argmax = jnp.pad(argmax[:, shift:], [(0, 0), (0, shift), (0, 0)])
        take_right = right_values > values  # ties keep the left, earlier maximum
        tables.append(
            (
                jnp.where(take_right, right_values, values),
                jnp.where(take_right, right_argmax, argmax),
            )
        )
    return jnp.stack([t[0] for t in tables]), jnp.stack([t[1] for t in tables])


def _pool_reduce(features, boxes, output_size, spatial_scale, *, with_argmax):
    """Bin maxima [R, oh, ow, C] and, if asked, their flat positions y * W + x (-1: none).

    Each window row is the max of two overlapping power-of-two blocks of `_row_max_table`;
    rows are read `_POOL_ROWS` at a time in a loop that runs once unless a bin is taller. The
    maxima and the argmax are separate passes of pure max/min reductions, which XLA fuses with
    their gathers (a joint value-and-index select chain does not fuse and is far slower).
    """
    height, width, channels = features.shape
    y_start, y_end, x_start, x_end = _pool_windows(
        boxes, spatial_scale=spatial_scale, output_size=output_size, height=height, width=width
    )
    table_values, table_argmax = _row_max_table(features)
    table_values = table_values.reshape(-1, channels)
    table_argmax = table_argmax.reshape(-1, channels)
    x_span = jnp.maximum(x_end - x_start, 1)
    level = (31 - jax.lax.clz(x_span)).astype(jnp.int32)  # floor(log2(span))
    block_starts = (x_start, jnp.maximum(x_end - (1 << level), 0))  # 2 x [R, ow]
    y_start, y_end = y_start[:, :, None, None], y_end[:, :, None, None]  # [R, oh, 1, 1]
    nonempty = (y_end > y_start) & (x_end > x_start)[:, None, :, None]  # [R, oh, ow, 1]
    num_steps = -(-jnp.max(y_end - y_start) // _POOL_ROWS)

    def candidates(step):
        """(table row [R, oh, ow], read it? [R, oh, ow, 1]) for every block of this step."""
        for row in range(_POOL_ROWS):
            y = y_start + step * _POOL_ROWS + row
            ok = (y < y_end) & nonempty
            for x in block_starts:
                flat = (level[:, None, :, None] * height + y) * width + x[:, None, :, None]
                yield jnp.where(ok, flat, 0)[..., 0], ok

    def reduce(fold):
        """fold(step, acc) over every step; the first is peeled off the loop so that the
        accumulator starts from real values instead of a broadcast of [R, oh, ow, C]."""
        body = lambda state: (state[0] + 1, fold(state[0], state[1]))  # noqa: E731
        init = (jnp.int32(1), fold(0, None))
        return jax.lax.while_loop(lambda state: state[0] < num_steps, body, init)[1]

    # torchvision starts each bin at -FLT_MAX and takes strictly greater values.
    lowest = jnp.finfo(features.dtype).min

    def fold_max(step, best):
        for flat, ok in candidates(step):
            value = jnp.where(ok, table_values[flat], lowest)
            best = value if best is None else jnp.maximum(best, value)
        return best

    best = reduce(fold_max)
    out = jnp.where(nonempty, best, 0).astype(features.dtype)
    if not with_argmax:
        return out, None

    # First maximum in row-major order = smallest flat position holding the bin's maximum.
    # The barrier gives this pass its own handle on the tables: otherwise XLA merges its
    # gathers with the identical ones above, and a shared gather must be materialized.
    none = jnp.int32(height * width)
    values_again, table_argmax = jax.lax.optimization_barrier((table_values, table_argmax))

    def fold_argmax(step, first):
        for flat, ok in candidates(step):
            hit = ok & (values_again[flat] == best)
            at = jnp.where(hit, table_argmax[flat], none)
            first = at if first is None else jnp.minimum(first, at)
        return first

    first = reduce(fold_argmax)
    found = (first < none) & (best > lowest)
    return out, jnp.where(found, first, -1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _roi_pool(features, boxes, output_size, spatial_scale):
    return _pool_reduce(features, boxes, output_size, spatial_scale, with_argmax=False)[0]


def _roi_pool_fwd(features, boxes, output_size, spatial_scale):
    out, argmax = _pool_reduce(features, boxes, output_size, spatial_scale, with_argmax=True)
    return out, (argmax, features, boxes)


def _roi_pool_bwd(output_size, spatial_scale, residuals, grad):
    # Each output routes its gradient to the element it copied (torchvision's argmax rule).
    argmax, features, boxes = residuals  # features: only for their shape and dtype
    shape, dtype = features.shape, features.dtype
    channels = shape[-1]
    flat = argmax * channels + jnp.arange(channels, dtype=jnp.int32)
    flat = jnp.where(argmax >= 0, flat, math.prod(shape))  # out of range: dropped
    d_features = (
        jnp.zeros(math.prod(shape), jnp.float32)
        .at[flat.reshape(-1)]
        .add(grad.reshape(-1).astype(jnp.float32), mode="drop")
    )
    # The output is piecewise constant in the boxes (rounded corners): zero gradient.
    return d_features.reshape(shape).astype(dtype), jnp.zeros_like(boxes)


_roi_pool.defvjp(_roi_pool_fwd, _roi_pool_bwd)


def roi_pool(features, boxes, *, output_size, spatial_scale):
    """RoI max pooling, the Fast R-CNN / Faster R-CNN paper's layer (torchvision's `roi_pool`).

    Caffe semantics: box corners scaled and rounded to whole feature pixels (halves away from
    zero), RoIs at least 1 x 1, bin edges floor(i * bin) and ceil((i + 1) * bin) clipped to the
    map; an empty bin gives 0.

    Args:
      features: float [H, W, C] feature map of one image.
      boxes: float32 [R, 4] (x1, y1, x2, y2) RoIs in image pixels.
      output_size: int or (out_h, out_w) bins (7 in the paper).
      spatial_scale: feature pixels per image pixel (1/16 for VGG-16).

    Returns:
      [R, out_h, out_w, C] in the features' dtype, equal to torchvision's output. The gradient
      with respect to `features` goes to each bin's first maximum in row-major order, exactly
      as torchvision's backward; with respect to `boxes` it is zero (rounding).
    """
    _check_inputs(features, boxes)
    features = jnp.asarray(features)
    boxes = jnp.asarray(boxes, jnp.float32)
    return _roi_pool(features, boxes, _pair(output_size), float(spatial_scale))
