import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from torchvision.ops.misc import FrozenBatchNorm2d

from frcnn_jax.models import VGG16, FrozenBatchNorm, Res5Head, ResNet, TinyBackbone, get_backbone


def backbone_named(name, frozen_stages=None):
    return get_backbone(name, dtype=jnp.float32, frozen_stages=frozen_stages, kernels="auto")


def count(params):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def test_vgg16_matches_torchvision_features_parameter_count_and_stride():
    model = VGG16()
    images = jnp.zeros((1, 64, 96, 3))
    params = jax.eval_shape(model.init, jax.random.key(0), images)
    # torchvision's vgg16().features holds conv1_1 .. conv5_3 (its pool5 has no parameters).
    want = sum(p.numel() for p in torchvision.models.vgg16().features.parameters())
    assert count(params) == want == 14_714_688
    out = jax.eval_shape(model.apply, params, images)
    assert out.shape == (1, 64 // 16, 96 // 16, 512)


@pytest.mark.parametrize("name", ["tiny", "vgg16", "zf", "resnet50_c4"])
def test_backbones_give_stride_16_maps(name):
    backbone = backbone_named(name)
    images = jnp.zeros((2, 96, 160, 3))
    params = jax.eval_shape(backbone.init, jax.random.key(0), images)
    out = jax.eval_shape(backbone.apply, params, images)
    assert out.shape == (2, 96 // backbone.stride, 160 // backbone.stride, backbone.channels)


def test_bfloat16_compute_keeps_float32_parameters():
    backbone = TinyBackbone(dtype=jnp.bfloat16)
    images = jnp.zeros((1, 32, 32, 3))
    params = backbone.init(jax.random.key(0), images)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    assert backbone.apply(params, images).dtype == jnp.bfloat16


def test_unknown_backbone_is_named():
    with pytest.raises(
        ValueError, match=r"config.model.backbone must be one of .* got 'resnet9000'"
    ):
        backbone_named("resnet9000")


@pytest.mark.parametrize("depth", [50, 101])
def test_resnet_c4_matches_torchvision_parameter_count(depth):
    # C4 split: stem..res4 as the backbone, res5 as the box head. torchvision's detection
    # ResNets use FrozenBatchNorm2d, whose terms are buffers, not parameters; so are ours
    # (the `batch_stats` collection).
    backbone = ResNet(depth=depth, num_stages=3)
    head = Res5Head(depth=depth)
    images = jnp.zeros((1, 64, 64, 3))
    variables = jax.eval_shape(backbone.init, jax.random.key(0), images)
    features = jax.eval_shape(backbone.apply, variables, images)
    assert features.shape == (1, 4, 4, 1024) and backbone.stride == 16
    pooled = jnp.zeros((2, 14, 14, 1024))
    head_variables = jax.eval_shape(lambda k: head.init(k, pooled, train=False), jax.random.key(0))
    reference = getattr(torchvision.models, f"resnet{depth}")(norm_layer=FrozenBatchNorm2d)
    want = sum(p.numel() for name, p in reference.named_parameters() if not name.startswith("fc"))
    assert count(variables["params"]) + count(head_variables["params"]) == want
    # ... and the frozen statistics mirror torchvision's buffers one for one.
    buffers = sum(
        b.numel()
        for name, b in reference.named_buffers()
        if not name.endswith("num_batches_tracked")
    )
    assert count(variables["batch_stats"]) + count(head_variables["batch_stats"]) == buffers
    out = jax.eval_shape(lambda v: head.apply(v, pooled, train=False), head_variables)
    assert out.shape == (2, 2048)


def test_frozen_batch_norm_equals_torchvision():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 5, 8)).astype(np.float32)
    stats = {
        k: rng.uniform(0.5, 2.0, 8).astype(np.float32) for k in ("weight", "bias", "mean", "var")
    }
    got = FrozenBatchNorm().apply({"batch_stats": stats}, x)
    reference = FrozenBatchNorm2d(8)
    reference.weight.copy_(torch.from_numpy(stats["weight"]))
    reference.bias.copy_(torch.from_numpy(stats["bias"]))
    reference.running_mean.copy_(torch.from_numpy(stats["mean"]))
    reference.running_var.copy_(torch.from_numpy(stats["var"]))
    want = reference(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_zf_parameter_count_matches_the_prototxt():
    # conv1 96x3x7x7, conv2 256x96x5x5, conv3 384x256x3x3, conv4 384x384x3x3,
    # conv5 256x384x3x3, each with biases: py-faster-rcnn's ZF.
    want = sum(
        o * i * k * k + o
        for o, i, k in ((96, 3, 7), (256, 96, 5), (384, 256, 3), (384, 384, 3), (256, 384, 3))
    )
    params = jax.eval_shape(backbone_named("zf").init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    assert count(params) == want == 3_726_464


@pytest.mark.parametrize(
    "name, frozen, zero",
    [
        ("vgg16", None, ["conv1_1", "conv2_2"]),  # the paper's default
        ("vgg16", 0, []),
        ("vgg16", 3, ["conv3_3"]),
        ("resnet50_c4", None, ["conv1", "layer1"]),  # torchvision's
        ("resnet50_c4", 3, ["layer2"]),
        ("resnet50_fpn", 1, ["body/conv1"]),
        ("zf", None, []),
        ("tiny_fpn", None, []),
    ],
)
def test_declared_frozen_parameters_are_exactly_those_without_gradient(name, frozen, zero):
    """`frozen_prefixes()` (what the optimizer masks, `models.trainable_mask`) names exactly the
    parameters that get a zero gradient through the backbone's `freeze_if` cuts."""
    backbone = backbone_named(name, frozen)
    images = jax.random.normal(jax.random.key(0), (1, 64, 64, 3))
    variables = jax.jit(backbone.init)(jax.random.key(1), images)

    def loss(params):
        out = backbone.apply({**variables, "params": params}, images)
        return sum(jnp.sum(jnp.square(o)) for o in (out if isinstance(out, list) else [out]))

    grads = jax.jit(jax.grad(loss))(variables["params"])
    prefixes = tuple(f"{p}/" for p in getattr(backbone, "frozen_prefixes", tuple)())
    for layer in zero:
        assert f"{layer}/".startswith(prefixes), layer
    for path, grad in jax.tree_util.tree_flatten_with_path(grads)[0]:
        name_ = "/".join(k.key for k in path) + "/"
        assert name_.startswith(prefixes) == (not np.asarray(grad).any()), name_
