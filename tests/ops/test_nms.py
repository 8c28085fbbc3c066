import functools
import importlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision

from frcnn_jax import ops
from tests.ops import numpy_reference
from tests.ops.helpers import clustered_boxes, random_boxes


def kept(result):
    """The valid prefix of an NMSResult as a NumPy array, checking the padding contract."""
    indices, valid = np.asarray(result.indices), np.asarray(result.valid)
    num = int(valid.sum())
    assert valid[:num].all() and not valid[num:].any(), "valid must be a prefix"
    assert (indices[num:] == 0).all(), "padded indices must be 0"
    assert indices.dtype == np.int32
    return indices[:num]


@functools.cache
def jitted_nms(iou_threshold, max_output_size):
    return jax.jit(
        functools.partial(ops.nms, iou_threshold=iou_threshold, max_output_size=max_output_size)
    )


@functools.cache
def jitted_batched_nms(iou_threshold, max_output_size):
    return jax.jit(
        functools.partial(
            ops.batched_nms, iou_threshold=iou_threshold, max_output_size=max_output_size
        )
    )


def distinct_scores(rng, n):
    return rng.permutation(n).astype(np.float32) / n


@pytest.mark.parametrize("iou_threshold", [0.3, 0.5, 0.7])
@pytest.mark.parametrize("layout", ["random", "clustered"])
@pytest.mark.parametrize("num_boxes", [37, 700, 3000])  # one tile, a few tiles, many tiles
def test_nms_equals_torchvision(iou_threshold, layout, num_boxes):
    rng = np.random.default_rng(num_boxes)
    if layout == "random":
        boxes = random_boxes(rng, num_boxes)
    else:
        boxes = clustered_boxes(rng, num_boxes, num_clusters=max(num_boxes // 40, 2))
    scores = distinct_scores(rng, num_boxes)
    want = torchvision.ops.nms(torch.from_numpy(boxes), torch.from_numpy(scores), iou_threshold)
    got = kept(jitted_nms(iou_threshold, num_boxes)(boxes, scores))
    np.testing.assert_array_equal(got, want.numpy())
    # A smaller output keeps the first max_output_size of the same list.
    short = kept(jitted_nms(iou_threshold, 25)(boxes, scores))
    np.testing.assert_array_equal(short, want.numpy()[:25])


@pytest.mark.parametrize("layout", ["random", "clustered"])
def test_nms_with_the_accelerator_tile_size_equals_torchvision(layout, monkeypatch):
    """GPUs use 2048-box tiles (`tile_size`): the same result, checked here on the CPU."""
    nms_module = importlib.import_module("frcnn_jax.ops.nms")
    assert nms_module.tile_size("gpu") == 2048
    monkeypatch.setitem(nms_module._TILE_BY_BACKEND, jax.default_backend(), 2048)
    rng = np.random.default_rng(5)
    num_boxes = 5000  # three tiles, the last one partial
    if layout == "random":
        boxes = random_boxes(rng, num_boxes)
    else:
        boxes = clustered_boxes(rng, num_boxes, num_clusters=60)
    scores = distinct_scores(rng, num_boxes)
    want = torchvision.ops.nms(torch.from_numpy(boxes), torch.from_numpy(scores), 0.7).numpy()
    op = jax.jit(lambda b, s: ops.nms(b, s, iou_threshold=0.7, max_output_size=2000))
    np.testing.assert_array_equal(kept(op(boxes, scores)), want[:2000])


@pytest.mark.parametrize("iou_threshold", [0.3, 0.5, 0.7])
@pytest.mark.parametrize("num_boxes", [50, 1500])
def test_batched_nms_equals_torchvision(iou_threshold, num_boxes):
    rng = np.random.default_rng(7)
    boxes = clustered_boxes(rng, num_boxes, num_clusters=10)
    scores = distinct_scores(rng, num_boxes)
    classes = rng.integers(0, 6, num_boxes)
    want = torchvision.ops.batched_nms(
        torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(classes), iou_threshold
    )
    got = kept(jitted_batched_nms(iou_threshold, num_boxes)(boxes, scores, classes))
    np.testing.assert_array_equal(got, want.numpy())


def test_batched_nms_exact_with_1000_classes_and_10k_coordinates():
    # The coordinate-offset trick would shift these boxes by up to ~1e7 pixels, where float32
    # steps are a whole pixel: small boxes would change IoU. Ours must equal per-class NMS.
    rng = np.random.default_rng(8)
    num_boxes = 3000
    centres = rng.uniform(9000, 10000, (num_boxes, 2))
    sides = rng.uniform(0.5, 3.0, (num_boxes, 2))
    boxes = np.concatenate([centres - sides / 2, centres + sides / 2], 1).astype(np.float32)
    boxes[1::2] = boxes[::2] + rng.uniform(-0.4, 0.4, (num_boxes // 2, 4)).astype(np.float32)
    classes = rng.integers(0, 1000, num_boxes)
    classes[1::2] = classes[::2]  # overlapping pairs share a class
    scores = distinct_scores(rng, num_boxes)
    want = numpy_reference.nms(boxes, scores, 0.5, classes=classes)
    got = kept(jitted_batched_nms(0.5, num_boxes)(boxes, scores, classes))
    np.testing.assert_array_equal(got, want)
    assert len(want) < num_boxes  # the case is not trivial: some pairs suppress


class NmsCasesTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_hand_worked(self):
        boxes = np.array(
            [
                [0, 0, 10, 10],  # 0: score 0.9, kept
                [1, 0, 11, 10],  # 1: IoU 0.82 with 0 -> suppressed
                [20, 20, 30, 30],  # 2: disjoint, kept
                [0, 0, 10, 5],  # 3: IoU 0.5 with 0: kept at threshold 0.5 (strictly greater)
            ],
            np.float32,
        )
        scores = np.array([0.9, 0.8, 0.7, 0.6], np.float32)
        nms = self.variant(functools.partial(ops.nms, iou_threshold=0.5, max_output_size=5))
        np.testing.assert_array_equal(kept(nms(boxes, scores)), [0, 2, 3])

    @chex.variants(with_jit=True, without_jit=True)
    def test_uses_the_real_threshold_inside_a_tile(self):
        # IoU(0, 1) = 0.4: kept at 0.5, suppressed at 0.3 (the paper's test-time threshold).
        boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 4]], np.float32)
        scores = np.array([0.9, 0.8], np.float32)
        for threshold, want in ((0.5, [0, 1]), (0.3, [0])):
            nms = self.variant(
                functools.partial(ops.nms, iou_threshold=threshold, max_output_size=2)
            )
            np.testing.assert_array_equal(kept(nms(boxes, scores)), want)

    def test_suppressed_boxes_do_not_suppress(self):
        # A chain 0 -> 1 -> 2: 1 is suppressed by 0, so 2 (which only 1 overlaps) survives.
        # Repeated inside one tile and across tile boundaries (tile = 256 boxes).
        chain = np.array([[0, 0, 10, 10], [4, 0, 14, 10], [8, 0, 18, 10]], np.float32)
        filler = random_boxes(np.random.default_rng(0), 600, size=10, max_side=2) + 5000
        for positions in ([0, 1, 2], [255, 256, 257], [10, 300, 590]):
            boxes = filler.copy()
            boxes[positions] = chain
            scores = np.linspace(1, 0, 600, dtype=np.float32)
            result = kept(jitted_nms(0.3, 600)(boxes, scores))
            assert positions[0] in result and positions[2] in result
            assert positions[1] not in result
            np.testing.assert_array_equal(result, numpy_reference.nms(boxes, scores, 0.3))

    @chex.variants(with_jit=True, without_jit=True)
    def test_identical_boxes_and_tied_scores(self):
        boxes = np.tile(np.array([[5, 5, 50, 50]], np.float32), (6, 1))
        scores = np.array([0.2, 0.5, 0.5, 0.1, 0.5, 0.3], np.float32)
        nms = self.variant(functools.partial(ops.nms, iou_threshold=0.7, max_output_size=6))
        # Only the best survives; among tied scores the earliest position wins (stable sort).
        np.testing.assert_array_equal(kept(nms(boxes, scores)), [1])
        want = torchvision.ops.nms(torch.from_numpy(boxes), torch.from_numpy(scores), 0.7)
        np.testing.assert_array_equal(kept(nms(boxes, scores)), want.numpy())
        # Tied scores on disjoint boxes: all kept, in position order.
        spread = boxes + 100 * np.arange(6, dtype=np.float32)[:, None]
        np.testing.assert_array_equal(kept(nms(spread, np.ones(6, np.float32))), np.arange(6))

    @chex.variants(with_jit=True, without_jit=True)
    def test_zero_area_and_inverted_boxes(self):
        boxes = np.array([[5, 5, 5, 5], [5, 5, 5, 5], [9, 9, 1, 1], [0, 0, 10, 10]], np.float32)
        scores = np.array([0.9, 0.8, 0.7, 0.6], np.float32)
        nms = self.variant(functools.partial(ops.nms, iou_threshold=0.5, max_output_size=4))
        # Empty boxes overlap nothing: nothing suppresses them and they suppress nothing.
        np.testing.assert_array_equal(kept(nms(boxes, scores)), [0, 1, 2, 3])

    @chex.variants(with_jit=True, without_jit=True)
    def test_padding_mask_and_nan_scores(self):
        boxes = np.array(
            [[0, 0, 10, 10], [0, 0, 10, 10], [50, 50, 60, 60], [0, 0, 0, 0]], np.float32
        )
        scores = np.array([0.9, 0.8, np.nan, 0.0], np.float32)
        valid = np.array([False, True, True, True])
        nms = self.variant(functools.partial(ops.nms, iou_threshold=0.5, max_output_size=4))
        # 0 is padding (does not suppress 1); 2 has a NaN score and is dropped.
        np.testing.assert_array_equal(kept(nms(boxes, scores, valid=valid)), [1, 3])
        result = nms(boxes, scores, valid=np.zeros(4, bool))
        assert not np.asarray(result.valid).any()
        np.testing.assert_array_equal(result.indices, np.zeros(4))

    @chex.variants(with_jit=True, without_jit=True)
    def test_empty_input_and_zero_outputs(self):
        nms = self.variant(functools.partial(ops.nms, iou_threshold=0.5, max_output_size=3))
        result = nms(np.zeros((0, 4), np.float32), np.zeros((0,), np.float32))
        chex.assert_shape([result.indices, result.valid], (3,))
        assert not np.asarray(result.valid).any()
        none = ops.nms(np.ones((4, 4)), np.ones(4), iou_threshold=0.5, max_output_size=0)
        chex.assert_shape(none.indices, (0,))

    def test_vmap_over_images_and_trace_once(self):
        rng = np.random.default_rng(3)
        boxes = np.stack([clustered_boxes(rng, 600, num_clusters=20) for _ in range(3)])
        scores = rng.uniform(size=(3, 600)).astype(np.float32)

        @jax.jit
        @chex.assert_max_traces(n=1)
        def batched(b, s):
            return jax.vmap(functools.partial(ops.nms, iou_threshold=0.6, max_output_size=100))(
                b, s
            )

        for _ in range(2):  # same shapes, new values: no retrace
            result = batched(boxes, scores)
            scores = scores[:, ::-1].copy()
        for i in range(3):
            want = numpy_reference.nms(boxes[i], scores[i, ::-1], 0.6)[:100]
            got = kept(jax.tree.map(lambda x, i=i: x[i], result))
            np.testing.assert_array_equal(got, want)

    def test_matches_numpy_reference_with_traced_threshold(self):
        rng = np.random.default_rng(4)
        boxes = clustered_boxes(rng, 400, num_clusters=15)
        scores = distinct_scores(rng, 400)
        fn = jax.jit(lambda b, s, t: ops.nms(b, s, iou_threshold=t, max_output_size=400))
        for threshold in (0.35, 0.55):
            got = kept(fn(boxes, scores, jnp.float32(threshold)))
            np.testing.assert_array_equal(got, numpy_reference.nms(boxes, scores, threshold))


def test_bad_input_is_named():
    boxes, scores = np.zeros((5, 4)), np.zeros(5)
    with pytest.raises(ValueError, match=r"boxes .*\(5, 3\)"):
        ops.nms(np.zeros((5, 3)), scores, iou_threshold=0.5, max_output_size=2)
    with pytest.raises(ValueError, match=r"boxes, scores must have the same length.*\(4,\)"):
        jax.jit(lambda b, s: ops.nms(b, s, iou_threshold=0.5, max_output_size=2))(
            boxes, np.zeros(4)
        )
    with pytest.raises(ValueError, match=r"iou_threshold must lie in \[0, 1\]; got 1.5"):
        ops.nms(boxes, scores, iou_threshold=1.5, max_output_size=2)
    with pytest.raises(ValueError, match="max_output_size"):
        ops.nms(boxes, scores, iou_threshold=0.5, max_output_size=2.0)
    with pytest.raises(ValueError, match=r"classes .*\(5, 1\)"):
        ops.batched_nms(boxes, scores, np.zeros((5, 1)), iou_threshold=0.5, max_output_size=2)
