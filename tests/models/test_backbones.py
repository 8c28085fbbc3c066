import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torchvision

from frcnn_jax.models import VGG16, TinyBackbone, get_backbone


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


@pytest.mark.parametrize("name", ["tiny", "vgg16"])
def test_backbones_give_stride_16_maps(name):
    backbone = get_backbone(name)
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
    with pytest.raises(ValueError, match="unknown backbone 'resnet9000'"):
        get_backbone("resnet9000")
