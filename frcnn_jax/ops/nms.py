"""Non-maximum suppression with static shapes: the tiled, sorted, early-exit algorithm.

Boxes are sorted by descending score and cut into tiles of `tile_size()` boxes. Tiles are visited
in order; each tile is first suppressed by the boxes already kept (held, compacted, in a buffer
that is also the output), then by itself with an exact fixed-point iteration of the greedy rule,
and its survivors are appended to the buffer. The loop stops as soon as `max_output_size` boxes are
kept, so the common RPN case (2000 of 12000 kept) touches a fraction of the pairs a full NMS does.

The greedy result: box j (in score order) is kept iff no kept box i < j has IoU(i, j) >
`iou_threshold` (strictly, like torchvision). Within a tile the iteration
`keep <- valid & ~any_i(keep_i & suppresses_ij)` has that result as its unique fixed point and
reaches it in at most one step per box; it usually takes a handful. The real threshold is used
throughout (public JAX/TF copies hard-code 0.5 in the self-suppression step).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from frcnn_jax.ops import _checks
from frcnn_jax.ops.boxes import box_area, overlap_from_coords, safe_iou

# Boxes per tile, by backend. Each tile costs a few sequential loop steps, cheap on a CPU but a
# kernel launch each on a GPU, where a [T, T] block is nothing: 12000 -> 2000 boxes on an H200
# ran about 5x faster with 2048-box tiles than with 256, while on a 2-core CPU 256 is fastest
# (`experiments/bench_ops.py`). TPUs: not measured yet.
_TILE_BY_BACKEND = {"cpu": 256}
_DEFAULT_TILE = 2048


def tile_size(backend=None):
    """Boxes per tile for `backend` (default: JAX's default backend); any size gives the same
    result, only the speed differs."""
    return _TILE_BY_BACKEND.get(backend or jax.default_backend(), _DEFAULT_TILE)


class NMSResult(NamedTuple):
    """Kept boxes, padded to a static size.

    indices: int32 [D] positions in the input of the kept boxes, in descending score order;
      padded entries hold 0, so gathering with them is always safe.
    valid: bool [D] true for the first (number kept) entries.
    """

    indices: jax.Array
    valid: jax.Array


def nms(boxes, scores, *, iou_threshold, max_output_size, valid=None):
    """Greedy non-maximum suppression of one image's boxes.

    Args:
      boxes: float32 [N, 4] (x1, y1, x2, y2).
      scores: float [N]; ties are broken by input position (lower first), like torchvision's
        stable sort.
      iou_threshold: a box is suppressed by a higher-scoring kept box when their IoU is strictly
        greater than this (0.7 for RPN proposals, 0.3 for the paper's detections).
      max_output_size: D, the static number of output slots; at most D boxes are kept.
      valid: optional bool [N]; boxes marked False (padding) are never kept and suppress nothing.
        Boxes with a NaN score are treated as invalid.

    Returns:
      `NMSResult(indices int32 [D], valid bool [D])`: the same boxes, in the same order, as the
      first D of `torchvision.ops.nms`. Zero-area boxes overlap nothing: as in torchvision, they
      neither suppress nor get suppressed.
    """
    return _tiled_nms(
        boxes, scores, None, valid, iou_threshold=iou_threshold, max_output_size=max_output_size
    )


def batched_nms(boxes, scores, classes, *, iou_threshold, max_output_size, valid=None):
    """Class-aware NMS: boxes suppress only boxes of the same class.

    Boxes of different classes are kept apart by zeroing their IoU inside the tiled algorithm,
    not by offsetting coordinates per class, so results are exact for any number of classes and
    any coordinate range (the offset trick loses float32 precision with many classes or big
    coordinates).

    Args:
      boxes: float32 [N, 4] (x1, y1, x2, y2).
      scores: float [N].
      classes: int [N] class of each box.
      iou_threshold, max_output_size, valid: as in `nms`.

    Returns:
      `NMSResult(indices int32 [D], valid bool [D])` in descending score order over all classes:
      the first D of `torchvision.ops.batched_nms`.
    """
    _checks.check_rank("classes", classes, 1)
    return _tiled_nms(
        boxes,
        scores,
        classes,
        valid,
        iou_threshold=iou_threshold,
        max_output_size=max_output_size,
    )


def _tiled_nms(boxes, scores, classes, valid, *, iou_threshold, max_output_size):
    _checks.check_boxes("boxes", boxes, rank=2)
    _checks.check_rank("scores", scores, 1)
    arrays = {"boxes": boxes, "scores": scores}
    if classes is not None:
        arrays["classes"] = classes
    if valid is not None:
        _checks.check_rank("valid", valid, 1)
        arrays["valid"] = valid
    _checks.check_same_length(list(arrays), list(arrays.values()))
    _checks.check_non_negative_int("max_output_size", max_output_size)
    _checks.check_unit_interval("iou_threshold", iou_threshold)

    num_boxes = _checks.shape_of(boxes)[0]
    if num_boxes == 0 or max_output_size == 0:
        return NMSResult(
            jnp.zeros((max_output_size,), jnp.int32), jnp.zeros((max_output_size,), bool)
        )

    boxes = jnp.asarray(boxes, jnp.float32)
    scores = jnp.asarray(scores, jnp.float32)
    valid = jnp.ones((num_boxes,), bool) if valid is None else jnp.asarray(valid, bool)
    valid = valid & ~jnp.isnan(scores)
    classes = jnp.zeros((num_boxes,), jnp.int32) if classes is None else jnp.asarray(classes)

    # Stable descending sort: keys (-score, position).
    neg_scores = jnp.where(valid, -scores, jnp.inf)
    _, order = jax.lax.sort((neg_scores, jnp.arange(num_boxes, dtype=jnp.int32)), num_keys=2)

    tile = min(tile_size(), num_boxes)
    num_tiles = -(-num_boxes // tile)
    padded = num_tiles * tile
    pad = padded - num_boxes

    def sorted_padded(x):
        x = x[order]
        return jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))

    # Coordinate-major [4, N'] so that [T, T] overlap blocks read contiguous rows.
    s_boxes = sorted_padded(boxes)  # [N', 4]
    s_coords = s_boxes.T  # [4, N']
    s_area = box_area(s_boxes)  # [N']
    s_valid = sorted_padded(valid)  # [N']
    s_classes = sorted_padded(classes)  # [N']

    buffer_size = -(-max_output_size // tile) * tile
    # earlier[j, i]: box i comes before box j in the tile, the only way i can suppress j.
    earlier = jnp.asarray(np.tril(np.ones((tile, tile), bool), k=-1))

    def load(arrays, index):
        """Tile `index` ([..., T]) of each array. Loops slice the next tile at the end of an
        iteration and carry it: a dynamic slice fused into the [T, T] block is ~6x slower on
        CPU (XLA re-derives it per element instead of vectorizing)."""
        return tuple(
            jax.lax.dynamic_slice_in_dim(a, index * tile, tile, axis=a.ndim - 1) for a in arrays
        )

    def suppression(boxes_a, boxes_b):
        """bool [T, T]: boxes a_i and b_j overlap enough to suppress (same class, IoU > threshold).

        boxes_*: (coords float32 [4, T] as (x1, y1, x2, y2) rows, area [T], classes [T]).
        """
        (coords_a, area_a, classes_a), (coords_b, area_b, classes_b) = boxes_a, boxes_b
        inter, union = overlap_from_coords(
            tuple(coords_a[:, :, None]), area_a[:, None], tuple(coords_b[:, None, :]), area_b[None]
        )
        iou = safe_iou(inter, union)
        return (iou > iou_threshold) & (classes_a[:, None] == classes_b[None, :])

    sorted_arrays = (s_coords, s_area, s_classes, s_valid)

    def process_tile(state):
        tile_index, num_kept, kept, kept_pos, (*tile_boxes, t_valid) = state
        tile_boxes = tuple(tile_boxes)

        # 1. Suppression by the boxes kept from earlier tiles, one buffer chunk at a time.
        def cross_chunk(chunk_state):
            chunk, alive, chunk_boxes = chunk_state
            c_kept = chunk * tile + jnp.arange(tile) < num_kept
            # [T (tile), T (kept)]: reducing over the minor axis vectorizes well on CPU.
            hit = suppression(tile_boxes, chunk_boxes) & c_kept[None, :]
            return chunk + 1, alive & ~hit.any(axis=1), load(kept, chunk + 1)

        num_chunks = (num_kept + tile - 1) // tile
        _, alive, _ = jax.lax.while_loop(
            lambda s: (s[0] < num_chunks) & s[1].any(),
            cross_chunk,
            (jnp.int32(0), t_valid, load(kept, 0)),
        )

        # 2. Suppression inside the tile: iterate the greedy rule to its fixed point. Skipped
        # when at most one box is left, the common case once the kept boxes cover the objects.
        def self_suppress(alive):
            # [T, T], row j lists the earlier boxes i that would suppress box j.
            suppressed_by = suppression(tile_boxes, tile_boxes) & earlier

            def self_step(self_state):
                keep, _ = self_state
                new_keep = alive & ~(suppressed_by & keep[None, :]).any(axis=1)
                return new_keep, (new_keep != keep).any()

            keep, _ = jax.lax.while_loop(lambda s: s[1], self_step, (alive, jnp.bool_(True)))
            return keep

        keep = jax.lax.cond(alive.sum() > 1, self_suppress, lambda a: a, alive)

        # 3. Append the survivors to the buffer (writes past its end are dropped).
        slot = jnp.where(keep, num_kept + jnp.cumsum(keep) - 1, buffer_size)
        kept = tuple(
            buffer.at[..., slot].set(values, mode="drop")
            for buffer, values in zip(kept, tile_boxes, strict=True)
        )
        positions = tile_index * tile + jnp.arange(tile, dtype=jnp.int32)
        kept_pos = kept_pos.at[slot].set(positions, mode="drop")
        num_kept = num_kept + keep.sum(dtype=jnp.int32)
        next_tile = load(sorted_arrays, jnp.minimum(tile_index + 1, num_tiles - 1))
        return tile_index + 1, num_kept, kept, kept_pos, next_tile

    def more_tiles(state):
        tile_index, num_kept = state[:2]
        # Invalid boxes sort last: a tile that starts with one holds nothing to keep.
        first_valid = s_valid[jnp.minimum(tile_index, num_tiles - 1) * tile]
        return (tile_index < num_tiles) & (num_kept < max_output_size) & first_valid

    # The kept boxes, in the same (coords, area, classes) layout as a tile. (Loading the chunk
    # after the last one clamps to the buffer's end; that chunk is never used.)
    kept = (
        jnp.zeros((4, buffer_size), jnp.float32),
        jnp.zeros((buffer_size,), jnp.float32),
        jnp.zeros((buffer_size,), s_classes.dtype),
    )
    init = (
        jnp.int32(0),
        jnp.int32(0),
        kept,
        jnp.zeros((buffer_size,), jnp.int32),
        load(sorted_arrays, 0),
    )
    _, num_kept, _, kept_pos, _ = jax.lax.while_loop(more_tiles, process_tile, init)
    out_valid = jnp.arange(max_output_size) < num_kept
    indices = jnp.where(out_valid, order[kept_pos[:max_output_size]], 0)
    return NMSResult(indices.astype(jnp.int32), out_valid)
