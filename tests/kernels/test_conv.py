import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from frcnn_jax.kernels import conv_layer
from frcnn_jax.kernels.conv import conv_general_dilated, tapwise_conv, winograd_conv3x3

Conv = conv_layer("auto")


def numpy_conv3x3(x, kernel):
    """Direct 3x3, stride-1, padding-1 convolution in float64: [N, H, W, C] x [3, 3, C, O]."""
    x = np.asarray(x, np.float64)
    n, height, width, _ = x.shape
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = np.zeros((n, height, width, kernel.shape[-1]))
    for i in range(3):
        for j in range(3):
            out += padded[:, i : i + height, j : j + width] @ np.asarray(kernel[i, j], np.float64)
    return out


def assert_close_relative(got, want, tolerance):
    """Largest error at most `tolerance` of the reference's largest magnitude."""
    scale = np.abs(want).max()
    error = np.abs(np.asarray(got, np.float64) - want).max()
    assert error <= tolerance * scale, (error, scale)


# Heights and widths that are not multiples of the 4x4 output tile, a single row or column,
# one tile, and a batch.
SHAPES = [(1, 4, 4, 3, 2), (2, 13, 7, 5, 3), (1, 1, 9, 2, 4), (1, 6, 1, 3, 3), (3, 10, 17, 8, 6)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("jit", [False, True])
def test_winograd_matches_direct_convolution_and_its_gradients(shape, jit):
    n, height, width, channels, features = shape
    rng = np.random.default_rng(sum(shape))
    x = rng.normal(size=(n, height, width, channels)).astype(np.float32)
    kernel = rng.normal(size=(3, 3, channels, features)).astype(np.float32)
    grad = rng.normal(size=(n, height, width, features)).astype(np.float32)
    fn = jax.jit(winograd_conv3x3) if jit else winograd_conv3x3
    out, vjp = jax.vjp(fn, jnp.asarray(x), jnp.asarray(kernel))
    grad_x, grad_kernel = vjp(jnp.asarray(grad))
    assert out.shape == grad.shape and out.dtype == jnp.float32
    assert_close_relative(out, numpy_conv3x3(x, kernel), 1e-5)
    # Gradients against torch's float64 convolution (NCHW / OIHW there).
    x64 = torch.from_numpy(x).double().permute(0, 3, 1, 2).requires_grad_(True)
    k64 = torch.from_numpy(kernel).double().permute(3, 2, 0, 1).requires_grad_(True)
    torch.nn.functional.conv2d(x64, k64, padding=1).backward(
        torch.from_numpy(grad).double().permute(0, 3, 1, 2)
    )
    assert_close_relative(grad_x, x64.grad.permute(0, 2, 3, 1).numpy(), 1e-5)
    assert_close_relative(grad_kernel, k64.grad.permute(2, 3, 1, 0).numpy(), 1e-5)


def test_winograd_hand_worked_cases():
    ones = jnp.ones((1, 5, 6, 1))
    # An all-ones kernel counts the in-image neighbours: 4 at corners, 6 on edges, 9 inside.
    out = winograd_conv3x3(ones, jnp.ones((3, 3, 1, 1)))[0, :, :, 0]
    want = np.full((5, 6), 9.0)
    want[[0, -1], :] = 6
    want[:, [0, -1]] = 6
    want[[0, 0, -1, -1], [0, -1, 0, -1]] = 4
    np.testing.assert_allclose(out, want, rtol=1e-6)
    # A centred one-hot kernel is the identity; shifted ones move the image by one pixel.
    x = jnp.arange(30.0).reshape(1, 5, 6, 1)
    identity = jnp.zeros((3, 3, 1, 1)).at[1, 1].set(1.0)
    np.testing.assert_allclose(winograd_conv3x3(x, identity), x, atol=1e-5)
    right = jnp.zeros((3, 3, 1, 1)).at[1, 0].set(1.0)  # out[y, x] = in[y, x - 1]
    np.testing.assert_allclose(winograd_conv3x3(x, right)[0, :, 1:, 0], x[0, :, :-1, 0], atol=1e-5)
    np.testing.assert_allclose(winograd_conv3x3(x, right)[0, :, 0, 0], 0.0, atol=1e-5)
    # Zeros in, zeros out (and zero gradients).
    zeros = jnp.zeros((2, 9, 9, 3))
    out, vjp = jax.vjp(winograd_conv3x3, zeros, jnp.zeros((3, 3, 3, 2)))
    assert not np.asarray(out).any()
    assert not any(np.asarray(g).any() for g in vjp(jnp.zeros_like(out)))


def test_winograd_under_vmap_equals_per_example():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(3, 1, 9, 11, 4)).astype(np.float32))
    kernel = jnp.asarray(rng.normal(size=(3, 3, 3, 4, 5)).astype(np.float32))
    batched = jax.vmap(winograd_conv3x3)(x, kernel)
    for i in range(3):
        np.testing.assert_allclose(batched[i], winograd_conv3x3(x[i], kernel[i]), rtol=1e-6)


@pytest.mark.parametrize(
    "kernel, strides, padding, shape",
    [
        (1, (1, 1), ((0, 0), (0, 0)), (2, 5, 7, 3)),
        (1, (2, 2), ((0, 0), (0, 0)), (1, 9, 6, 4)),  # odd height: the last row is sampled
        (3, (2, 2), ((1, 1), (1, 1)), (2, 9, 8, 3)),
        (3, (2, 2), ((0, 1), (0, 1)), (1, 8, 10, 2)),  # "SAME" for even sizes
        (3, (2, 2), ((1, 1), (0, 1)), (2, 7, 6, 3)),  # input gradient by phases, odd height
        (3, (2, 2), ((0, 0), (1, 0)), (1, 8, 7, 2)),  # "VALID"-like rows: a row never reached
        (3, (2, 2), ((2, 2), (2, 2)), (1, 6, 6, 2)),  # padding 2: XLA's input gradient
        (3, (1, 2), ((1, 1), (0, 0)), (1, 5, 9, 2)),
    ],
)
@pytest.mark.parametrize("jit", [False, True])
def test_tapwise_conv_matches_xla_and_its_gradients(kernel, strides, padding, shape, jit):
    rng = np.random.default_rng(sum(shape) + kernel)
    x = jnp.asarray(rng.normal(size=shape).astype(np.float32))
    w = jnp.asarray(rng.normal(size=(kernel, kernel, shape[-1], 5)).astype(np.float32))

    def reference(x, w):
        return jax.lax.conv_general_dilated(
            x, w, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"), precision="highest"
        )

    fn = jax.jit(tapwise_conv, static_argnums=(2, 3)) if jit else tapwise_conv
    out, vjp = jax.vjp(lambda x, w: fn(x, w, strides, padding), x, w)
    want, want_vjp = jax.vjp(reference, x, w)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    grad = jnp.asarray(rng.normal(size=out.shape).astype(np.float32))
    for got, expected in zip(vjp(grad), want_vjp(grad), strict=True):
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)


def _conv_jaxpr(shape, features, dtype=jnp.float32, kernel=3, **kwargs):
    n, height, width, channels = shape
    kwargs = {"window_strides": (1, 1), "padding": "SAME", **kwargs}
    return str(
        jax.make_jaxpr(
            lambda x, w: conv_general_dilated(
                x, w, dimension_numbers=("NHWC", "HWIO", "NHWC"), **kwargs
            )
        )(
            jax.ShapeDtypeStruct((n, height, width, channels), dtype),
            jax.ShapeDtypeStruct((kernel, kernel, channels, features), dtype),
        )
    )


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU path")
def test_dispatch_picks_winograd_only_where_it_pays():
    big = (1, 96, 96, 128)  # 24 x 24 = 576 output tiles

    def route(shape, features, **kwargs):
        jaxpr = _conv_jaxpr(shape, features, **kwargs)
        if "custom_vjp_call" not in jaxpr:
            return "xla"
        return "winograd" if "winograd" in jaxpr else "tapwise"

    assert route(big, 128) == "winograd"
    assert route(big, 128, padding=((1, 1), (1, 1))) == "winograd"
    for shape, features, kwargs in [
        ((1, 60, 64, 128), 128, {}),  # 15 x 16 = 240 tiles: too few
        (big, 64, {}),  # 128 x 64 channels: too few
        (big, 128, {"padding": "VALID"}),
        (big, 128, {"rhs_dilation": (2, 2)}),
        (big, 128, {"precision": jax.lax.Precision.HIGHEST}),
        (big, 128, {"preferred_element_type": jnp.float32}),
        (big, 128, {"dtype": jnp.bfloat16}),
    ]:
        assert route(shape, features, **kwargs) == "xla", kwargs
    with jax.default_matmul_precision("highest"):
        assert route(big, 128) == "xla"
    assert route(big, 128, window_strides=(2, 2)) == "tapwise"
    assert route((1, 50, 84, 512), 512, window_strides=(2, 2)) == "xla"  # above 256 x 256
    assert route(big, 128, kernel=1) == "tapwise"
    assert route(big, 128, kernel=1, window_strides=(2, 2)) == "tapwise"
    assert route(big, 128, kernel=7, padding=((3, 3), (3, 3))) == "xla"
    # Every float32 convolution input is pinned to the row-major layout.
    assert "layout_constraint" in _conv_jaxpr((1, 8, 8, 4), 4)


def test_conv_layer_keeps_flax_parameters_and_results():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(1, 96, 96, 128)).astype(np.float32))
    ours, flax_conv = Conv(128, (3, 3)), nn.Conv(128, (3, 3))
    params = flax_conv.init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, ours.init(jax.random.key(0), x)) == jax.tree.map(
        jnp.shape, params
    )
    want = flax_conv.apply(params, x)
    got = jax.jit(ours.apply)(params, x)  # the Winograd path on CPU
    assert_close_relative(got, np.asarray(want, np.float64), 3e-5)
    exact = Conv(128, (3, 3), precision=jax.lax.Precision.HIGHEST)
    np.testing.assert_array_equal(
        exact.apply(params, x), nn.Conv(128, (3, 3), precision="highest").apply(params, x)
    )


def test_two_models_with_different_kernels_live_in_one_process():
    """`model.kernels` is a setting of the model, not of the process: a model with frcnn_jax's
    CPU kernels and one with XLA's, jitted side by side, trace different programs (the CPU
    kernels pin layouts) that compute the same detections."""
    from frcnn_jax.models import FasterRCNN, build_model, with_kernels
    from tests.tiny import jitted, one_image, tiny_model_config

    auto = build_model(tiny_model_config())
    xla = with_kernels(auto, "xla")
    assert (auto.kernels, auto.backbone.kernels, xla.kernels, xla.backbone.kernels) == (
        "auto",
        "auto",
        "xla",
        "xla",
    )
    images, sizes = one_image()
    variables = jitted(auto, FasterRCNN.detect, init=True)(jax.random.key(0), images, sizes)

    def detect(model):
        return jax.jit(lambda v, x, s: model.apply(v, x, s, method=FasterRCNN.detect))

    programs = [detect(m).lower(variables, images, sizes).as_text() for m in (auto, xla)]
    assert programs[0] != programs[1]
    got, want = (detect(m)(variables, images, sizes) for m in (auto, xla))
    np.testing.assert_allclose(got.scores, want.scores, atol=1e-5)
    np.testing.assert_allclose(got.boxes, want.boxes, atol=1e-3)
