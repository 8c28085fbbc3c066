"""ResNet-FPN backbone laid out like torchvision's `resnet_fpn_backbone` (Lin et al., 2017).

Returns P2-P6: 256-channel maps at strides 4, 8, 16, 32 and 64 (P6 = P5 subsampled, the
`LastLevelMaxPool` extra block). Layer names follow torchvision (`body` = a `ResNet`,
`fpn_inner{i}`, `fpn_layer{i}`) so its weights can be imported.
"""

import flax.linen as nn
import jax.numpy as jnp

from frcnn_jax import kernels as kernels_lib
from frcnn_jax.models.resnet import ResNet


def _upsample_nearest(x, height, width):
    """torchvision's F.interpolate(mode="nearest") to (height, width): source = floor(i * in /
    out), an exact 2x repeat when sizes halve."""
    rows = (jnp.arange(height) * x.shape[1]) // height
    cols = (jnp.arange(width) * x.shape[2]) // width
    return x[:, rows][:, :, cols]


class ResNetFPN(nn.Module):
    depth: int = 50
    channels: int = 256
    dtype: jnp.dtype = jnp.float32
    kernels: str = kernels_lib.DEFAULT
    strides = (4, 8, 16, 32, 64)
    roi_levels = 4  # RoIs are pooled from P2-P5 (torchvision's MultiScaleRoIAlign)
    frozen_stages: int = 2  # stem and layer1, as `ResNet.frozen_stages`
    batch_norm: bool = False  # the body's, pretraining only (`resnet.norm_layer`)
    pyramid = True  # `__call__(..., pyramid=False)`: the body's last map alone

    @nn.compact
    def __call__(self, images, *, train=False, pyramid=True):
        """P2-P6, or with `pyramid=False` the body's C5 alone (classification pretraining
        trains the body, as ImageNet weights cover it; the FPN layers start fresh)."""
        stages = ResNet(
            self.depth,
            num_stages=4,
            frozen_stages=self.frozen_stages,
            dtype=self.dtype,
            kernels=self.kernels,
            batch_norm=self.batch_norm,
            name="body",
        )(images, train=train, all_stages=True)  # C2..C5
        if not pyramid:
            return stages[-1]
        outputs = feature_pyramid(stages, self.channels, self.dtype, self.kernels)
        outputs.append(outputs[-1][:, ::2, ::2])  # P6: max_pool2d(kernel 1, stride 2)
        return outputs

    def frozen_prefixes(self):
        """The body's frozen parts (`ResNet.frozen_prefixes`), under "body"."""
        body = ResNet(self.depth, num_stages=4, frozen_stages=self.frozen_stages, parent=None)
        return tuple(f"body/{prefix}" for prefix in body.frozen_prefixes())


def feature_pyramid(stages, channels, dtype, kernels):
    """FPN top-down pathway (call inside a compact module): a 1x1 lateral conv per stage
    (`fpn_inner{i}`), nearest 2x upsampling and sum, then a 3x3 output conv (`fpn_layer{i}`);
    returns the maps finest first."""
    # Kaiming-uniform with a = 1, zero bias: torchvision's FPN initialization.
    init = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")

    def conv(kernel, name):
        return kernels_lib.conv_layer(kernels)(
            channels,
            (kernel, kernel),
            padding=kernel // 2,
            kernel_init=init,
            dtype=dtype,
            name=name,
        )

    top = len(stages) - 1
    last = conv(1, f"fpn_inner{top}")(stages[top])
    outputs = [conv(3, f"fpn_layer{top}")(last)]
    for index in reversed(range(top)):
        lateral = conv(1, f"fpn_inner{index}")(stages[index])
        last = lateral + _upsample_nearest(last, lateral.shape[1], lateral.shape[2])
        outputs.insert(0, conv(3, f"fpn_layer{index}")(last))
    return outputs
