import functools
from collections import OrderedDict

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision

from frcnn_jax import ops


def nchw(features):
    return torch.from_numpy(np.ascontiguousarray(features)).permute(2, 0, 1)[None]


def torchvision_roi_align(features, boxes, *, sampling_ratio, aligned, scale=1 / 16, size=7):
    out = torchvision.ops.roi_align(
        nchw(features), [torch.from_numpy(boxes)], size, scale, sampling_ratio, aligned
    )
    return out.permute(0, 2, 3, 1).numpy()


def adversarial_boxes(rng, num, *, image=(600, 1000)):
    """Random boxes plus the hard cases: outside the map, straddling its border, tiny, huge,
    zero-area and inverted."""
    height, width = image
    xy = rng.uniform(-0.2 * width, 1.1 * width, (num, 2))
    wh = np.exp(rng.uniform(np.log(0.5), np.log(1.5 * width), (num, 2)))
    boxes = np.concatenate([xy, xy + wh], 1)
    special = np.array(
        [
            [-300, -300, -100, -100],  # fully outside, top-left
            [width + 50, 10, width + 400, 300],  # fully outside, right
            [-40, -30, 60, 50],  # straddles the top-left corner
            [width - 30, height - 20, width + 30, height + 40],  # straddles the bottom-right
            [100.3, 200.7, 100.9, 201.1],  # tiny
            [-500, -500, width + 500, height + 500],  # huge
            [50, 50, 50, 80],  # zero width
            [90, 90, 40, 40],  # inverted
        ]
    )
    return np.concatenate([boxes, special]).astype(np.float32)


@functools.cache
def jitted(op, **kwargs):
    return jax.jit(functools.partial(op, **kwargs))


@pytest.fixture(scope="module")
def vgg_like():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(38, 63, 16)).astype(np.float32)
    return features, adversarial_boxes(rng, 120)


def adaptive_cap(boxes, scale, size=7):
    """The largest adaptive grid torchvision uses on these boxes: a cap this high is exact."""
    sides = (boxes[:, 2:] - boxes[:, :2]) * scale
    return int(np.ceil(sides.max() / size))


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [0, 1, 2])
def test_roi_align_equals_torchvision(vgg_like, sampling_ratio, aligned):
    features, boxes = vgg_like
    op = jitted(
        ops.roi_align,
        output_size=7,
        spatial_scale=1 / 16,
        sampling_ratio=sampling_ratio,
        aligned=aligned,
        max_sampling_ratio=adaptive_cap(boxes, 1 / 16),
    )
    want = torchvision_roi_align(features, boxes, sampling_ratio=sampling_ratio, aligned=aligned)
    np.testing.assert_allclose(op(features, boxes), want, atol=1e-4, rtol=0)


def test_roi_align_non_square_output_and_scale():
    rng = np.random.default_rng(1)
    features = rng.normal(size=(50, 40, 3)).astype(np.float32)
    boxes = adversarial_boxes(rng, 30, image=(200, 160))
    got = ops.roi_align(
        features, boxes, output_size=(5, 3), spatial_scale=0.25, sampling_ratio=2, aligned=True
    )
    want = torchvision.ops.roi_align(
        nchw(features), [torch.from_numpy(boxes)], (5, 3), 0.25, 2, True
    )
    np.testing.assert_allclose(got, want.permute(0, 2, 3, 1).numpy(), atol=1e-4, rtol=0)


class RoiAlignCasesTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_hand_worked(self):
        # A linear ramp f(y, x) = 10 y + x: bilinear sampling reproduces it exactly, so each bin
        # is the ramp at its centre. Box (0, 0)-(4, 2) on a 1:1 map, 2 x 2 bins, aligned=False:
        # bins are 2 x 1 px, centres x = 1, 3 and y = 0.5, 1.5.
        features = (10 * np.arange(6)[:, None] + np.arange(8)[None, :]).astype(np.float32)[
            ..., None
        ]
        box = np.array([[0, 0, 4, 2]], np.float32)
        align = self.variant(
            functools.partial(
                ops.roi_align, output_size=2, spatial_scale=1.0, sampling_ratio=2, aligned=False
            )
        )
        np.testing.assert_allclose(align(features, box)[0, ..., 0], [[6, 8], [16, 18]], rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_outside_the_map_is_zero(self):
        features = np.ones((8, 8, 2), np.float32)
        boxes = np.array([[20, 20, 30, 30], [-30, -30, -20, -20]], np.float32)
        align = self.variant(
            functools.partial(
                ops.roi_align, output_size=3, spatial_scale=1.0, sampling_ratio=2, aligned=True
            )
        )
        np.testing.assert_array_equal(align(features, boxes), np.zeros((2, 3, 3, 2)))

    def test_adaptive_sampling_respects_the_cap(self):
        # With a cap of 1 the adaptive mode equals sampling_ratio=1 for every box bigger than
        # one bin per output pixel.
        rng = np.random.default_rng(2)
        features = rng.normal(size=(20, 20, 4)).astype(np.float32)
        boxes = np.array([[10, 10, 200, 150], [0, 0, 300, 300]], np.float32)
        kwargs = dict(output_size=7, spatial_scale=1 / 16, aligned=True)
        capped = ops.roi_align(features, boxes, sampling_ratio=0, max_sampling_ratio=1, **kwargs)
        fixed = ops.roi_align(features, boxes, sampling_ratio=1, **kwargs)
        np.testing.assert_allclose(capped, fixed, rtol=1e-6)

    def test_bfloat16_features(self):
        rng = np.random.default_rng(3)
        features = rng.normal(size=(38, 63, 8)).astype(np.float32)
        boxes = adversarial_boxes(rng, 20)
        kwargs = dict(output_size=7, spatial_scale=1 / 16, sampling_ratio=2, aligned=False)
        low = ops.roi_align(jnp.asarray(features, jnp.bfloat16), boxes, **kwargs)
        self.assertEqual(low.dtype, jnp.bfloat16)
        full = ops.roi_align(
            jnp.asarray(features, jnp.bfloat16).astype(jnp.float32), boxes, **kwargs
        )
        np.testing.assert_allclose(low.astype(np.float32), full, atol=2e-2, rtol=1e-2)

    def test_vmap_over_images_traces_once(self):
        rng = np.random.default_rng(4)
        features = rng.normal(size=(2, 38, 63, 4)).astype(np.float32)
        boxes = np.stack([adversarial_boxes(rng, 10), adversarial_boxes(rng, 10)])

        @jax.jit
        @chex.assert_max_traces(n=1)
        def batched(f, b):
            return jax.vmap(
                functools.partial(
                    ops.roi_align,
                    output_size=7,
                    spatial_scale=1 / 16,
                    sampling_ratio=2,
                    aligned=True,
                )
            )(f, b)

        out = batched(features, boxes)
        batched(features + 1, boxes)  # new values, same shapes: no retrace
        for i in range(2):
            want = torchvision_roi_align(features[i], boxes[i], sampling_ratio=2, aligned=True)
            np.testing.assert_allclose(out[i], want, atol=1e-4, rtol=0)


def torchvision_feature_grad(op_name, features, boxes, cotangent, **kwargs):
    source = nchw(features).requires_grad_(True)
    out = getattr(torchvision.ops, op_name)(source, [torch.from_numpy(boxes)], **kwargs)
    out.backward(torch.from_numpy(cotangent).permute(0, 3, 1, 2))
    return source.grad[0].permute(1, 2, 0).numpy()


@pytest.mark.parametrize(
    "map_shape",
    [(38, 63, 8), (120, 200, 4)],  # small map: dense backward; large map: scatter backward
)
@pytest.mark.parametrize("sampling_ratio, aligned", [(2, False), (0, True)])
def test_roi_align_feature_gradient_equals_torchvision(map_shape, sampling_ratio, aligned):
    rng = np.random.default_rng(5)
    features = rng.normal(size=map_shape).astype(np.float32)
    boxes = adversarial_boxes(rng, 60, image=(map_shape[0] * 16, map_shape[1] * 16))
    cotangent = rng.normal(size=(len(boxes), 7, 7, map_shape[2])).astype(np.float32)
    op = functools.partial(
        ops.roi_align,
        output_size=7,
        spatial_scale=1 / 16,
        sampling_ratio=sampling_ratio,
        aligned=aligned,
        max_sampling_ratio=adaptive_cap(boxes, 1 / 16),
    )
    got = jax.jit(lambda f: jax.vjp(lambda x: op(x, boxes), f)[1](cotangent)[0])(features)
    want = torchvision_feature_grad(
        "roi_align",
        features,
        boxes,
        cotangent,
        output_size=7,
        spatial_scale=1 / 16,
        sampling_ratio=sampling_ratio,
        aligned=aligned,
    )
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_roi_align_box_gradient_matches_finite_differences():
    rng = np.random.default_rng(6)
    features = rng.normal(size=(38, 63, 4)).astype(np.float32)
    boxes = np.array([[100.3, 120.7, 400.2, 300.9], [10.2, 5.1, 80.7, 60.3]], np.float32)
    cotangent = rng.normal(size=(2, 7, 7, 4)).astype(np.float32)
    op = functools.partial(
        ops.roi_align, output_size=7, spatial_scale=1 / 16, sampling_ratio=2, aligned=True
    )
    loss = jax.jit(lambda b: jnp.vdot(op(features, b), cotangent))
    grad = np.asarray(jax.grad(loss)(boxes))
    step = 0.05  # pixels; the loss is piecewise bilinear in the box, smooth at this scale
    numeric = np.zeros_like(boxes)
    for index in np.ndindex(*boxes.shape):
        delta = np.zeros_like(boxes)
        delta[index] = step
        numeric[index] = (float(loss(boxes + delta)) - float(loss(boxes - delta))) / (2 * step)
    np.testing.assert_allclose(grad, numeric, rtol=2e-3, atol=2e-3)
    assert np.abs(grad).min() > 1e-3  # every coordinate matters: the test can fail


def test_multilevel_roi_align_equals_torchvision_multiscale():
    rng = np.random.default_rng(7)
    image = (256, 384)
    strides = (4, 8, 16, 32)
    features = [
        rng.normal(size=(image[0] // s, image[1] // s, 8)).astype(np.float32) for s in strides
    ]
    xy = rng.uniform(-20, 380, (150, 2))
    wh = np.exp(rng.uniform(np.log(2), np.log(500), (150, 2)))
    boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    pooler = torchvision.ops.MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)
    maps = OrderedDict((str(i), nchw(f)) for i, f in enumerate(features))
    want = pooler(maps, [torch.from_numpy(boxes)], [image]).permute(0, 2, 3, 1).numpy()
    got = jax.jit(
        lambda f, b: ops.multilevel_roi_align(
            f,
            b,
            output_size=7,
            spatial_scales=[1 / s for s in strides],
            sampling_ratio=2,
            aligned=False,
        )
    )(features, boxes)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    levels = np.asarray(ops.map_levels(boxes, num_levels=4, min_level=2))
    assert set(levels.tolist()) == {0, 1, 2, 3}  # every level exercised


def test_map_levels_hand_worked():
    boxes = np.array(
        [
            [0, 0, 224, 224],  # canonical: level 4 -> index 2 of P2..P5
            [0, 0, 112, 112],  # half: level 3
            [0, 0, 448, 448],  # double: level 5
            [0, 0, 10, 10],  # tiny: clamped to P2
            [0, 0, 2000, 2000],  # huge: clamped to P5
        ],
        np.float32,
    )
    np.testing.assert_array_equal(ops.map_levels(boxes, num_levels=4, min_level=2), [2, 1, 3, 0, 3])


@pytest.mark.parametrize("map_shape", [(38, 63, 16), (9, 70, 4)])
def test_roi_pool_equals_torchvision_exactly(map_shape):
    rng = np.random.default_rng(8)
    features = rng.normal(size=map_shape).astype(np.float32)
    boxes = adversarial_boxes(rng, 120, image=(map_shape[0] * 16, map_shape[1] * 16))
    op = jitted(ops.roi_pool, output_size=7, spatial_scale=1 / 16)
    want = torchvision.ops.roi_pool(nchw(features), [torch.from_numpy(boxes)], 7, 1 / 16)
    np.testing.assert_array_equal(op(features, boxes), want.permute(0, 2, 3, 1).numpy())


def test_roi_pool_feature_gradient_equals_torchvision_exactly():
    rng = np.random.default_rng(9)
    features = rng.normal(size=(38, 63, 8)).astype(np.float32)
    features[:4, :4] = 0.5  # ties: the gradient goes to the first maximum, as in torchvision
    boxes = np.concatenate([adversarial_boxes(rng, 60), [[0, 0, 40, 40]]]).astype(np.float32)
    cotangent = rng.normal(size=(len(boxes), 7, 7, 8)).astype(np.float32)
    op = functools.partial(ops.roi_pool, output_size=7, spatial_scale=1 / 16)
    got = jax.jit(lambda f: jax.vjp(lambda x: op(x, boxes), f)[1](cotangent)[0])(features)
    want = torchvision_feature_grad(
        "roi_pool", features, boxes, cotangent, output_size=7, spatial_scale=1 / 16
    )
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


class RoiPoolCasesTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_hand_worked(self):
        features = np.arange(16, dtype=np.float32).reshape(4, 4, 1)
        boxes = np.array(
            [
                [0, 0, 3, 3],  # whole 4 x 4 map (inclusive corners), 2 x 2 bins of 2 x 2
                [0.4, 0.4, 1.4, 1.4],  # rounds to [0, 0, 1, 1]: bins are single pixels
                [1.5, 1.5, 2.5, 2.5],  # halves round away from zero: [2, 2, 3, 3]
                [10, 10, 12, 12],  # outside the map: empty bins -> 0
            ],
            np.float32,
        )
        pool = self.variant(functools.partial(ops.roi_pool, output_size=2, spatial_scale=1.0))
        want = [
            [[5, 7], [13, 15]],
            [[0, 1], [4, 5]],
            [[10, 11], [14, 15]],
            [[0, 0], [0, 0]],
        ]
        np.testing.assert_array_equal(pool(features, boxes)[..., 0], want)

    def test_tall_bins_take_several_row_steps(self):
        # A 1 x 1 output over a 40-row map: one bin 40 rows tall (5 loop steps of 8 rows).
        features = np.zeros((40, 3, 1), np.float32)
        features[37, 1, 0] = 9.0
        out = ops.roi_pool(
            features, np.array([[0, 0, 2, 39]], np.float32), output_size=1, spatial_scale=1.0
        )
        self.assertEqual(float(out[0, 0, 0, 0]), 9.0)


def test_bad_input_is_named():
    features = np.zeros((8, 8, 2), np.float32)
    with pytest.raises(ValueError, match=r"features must have rank 3; got shape \(1, 8, 8, 2\)"):
        ops.roi_align(
            features[None],
            np.zeros((1, 4)),
            output_size=2,
            spatial_scale=1.0,
            sampling_ratio=2,
            aligned=True,
        )
    with pytest.raises(ValueError, match=r"boxes .*\(3, 5\)"):
        ops.roi_pool(features, np.zeros((3, 5)), output_size=2, spatial_scale=1.0)
    with pytest.raises(ValueError, match="output_size must be positive"):
        ops.roi_pool(features, np.zeros((3, 4)), output_size=0, spatial_scale=1.0)
    with pytest.raises(ValueError, match="powers of two"):
        ops.multilevel_roi_align(
            [features, features],
            np.zeros((3, 4)),
            output_size=2,
            spatial_scales=(0.25, 0.2),
            sampling_ratio=2,
            aligned=True,
        )
    with pytest.raises(ValueError, match=r"features\[1\] must have rank 3"):
        ops.multilevel_roi_align(
            [features, features[0]],
            np.zeros((3, 4)),
            output_size=2,
            spatial_scales=(0.25, 0.125),
            sampling_ratio=2,
            aligned=True,
        )


@pytest.mark.slow
def test_roi_pool_vmap_bfloat16_and_gradient_under_vmap():
    rng = np.random.default_rng(10)
    features = rng.normal(size=(2, 20, 30, 4)).astype(np.float32)
    boxes = np.stack([adversarial_boxes(rng, 12, image=(320, 480)) for _ in range(2)])
    pool = jax.vmap(functools.partial(ops.roi_pool, output_size=3, spatial_scale=1 / 16))
    out = jax.jit(pool)(features, boxes)
    for i in range(2):
        want = torchvision.ops.roi_pool(nchw(features[i]), [torch.from_numpy(boxes[i])], 3, 1 / 16)
        np.testing.assert_array_equal(out[i], want.permute(0, 2, 3, 1).numpy())
    # bfloat16: the maximum of bfloat16 values is one of them, so pooling commutes with the cast.
    low = jax.jit(pool)(jnp.asarray(features, jnp.bfloat16), boxes)
    assert low.dtype == jnp.bfloat16
    np.testing.assert_array_equal(low, jnp.asarray(out, jnp.bfloat16))
    # Gradients through vmap sum to the number of non-empty bins (each routes 1 to one pixel).
    grads = jax.grad(lambda f: jnp.sum(pool(f, boxes)))(features)
    nonempty = sum(
        int(
            (
                torchvision.ops.roi_pool(
                    nchw(features[i]) * 0 + 1, [torch.from_numpy(boxes[i])], 3, 1 / 16
                )
                != 0
            ).sum()
        )
        for i in range(2)
    )
    assert float(jnp.sum(grads)) == nonempty
