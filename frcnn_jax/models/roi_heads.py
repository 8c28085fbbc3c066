"""The Fast R-CNN head: pooled RoI features -> class scores and class-specific box deltas."""

import flax.linen as nn
import jax.numpy as jnp


class MLPHead(nn.Module):
    """Flatten, then fully connected layers with ReLU (and dropout when training).

    VGG-16's fc6/fc7 (4096, 4096, dropout 0.5, the paper) or FPN's two 1024-wide layers
    (torchvision's `TwoMLPHead`, no dropout).
    """

    widths: tuple = (4096, 4096)
    dropout: float = 0.5
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, pooled, *, train):
        x = pooled.reshape(pooled.shape[0], -1).astype(self.dtype)
        for i, width in enumerate(self.widths):
            x = nn.relu(nn.Dense(width, dtype=self.dtype, name=f"fc{i + 6}")(x))
            if self.dropout:
                x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return x


class FastRCNNPredictor(nn.Module):
    """K + 1 class logits (background first) and deltas [R, K + 1, 4] (torchvision's layout)."""

    num_classes: int  # K, without background
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        logits = nn.Dense(
            self.num_classes + 1,
            kernel_init=nn.initializers.normal(0.01),
            dtype=self.dtype,
            name="cls_score",
        )(x)
        deltas = nn.Dense(
            4 * (self.num_classes + 1),
            kernel_init=nn.initializers.normal(0.001),
            dtype=self.dtype,
            name="bbox_pred",
        )(x)
        return logits.astype(jnp.float32), deltas.astype(jnp.float32).reshape(x.shape[0], -1, 4)
