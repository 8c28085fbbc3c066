"""The Region Proposal Network head (the paper's section 3.1)."""

import flax.linen as nn
import jax.numpy as jnp

from frcnn_jax.models.conv import Conv


class RPNHead(nn.Module):
    """3x3 conv then sibling 1x1 convs: objectness and box deltas for k anchors per location.

    Attributes:
      num_anchors: k (9 in the paper).
      channels: width of the 3x3 conv (512 for VGG-16, 256 for ZF and FPN).
      objectness: "softmax" (the paper: 2k scores) or "sigmoid" (torchvision: k scores).

    Returns from __call__ on features [B, Hf, Wf, C]: (logits, deltas) flattened in anchor
    order (`ops.anchor_grid`'s: location-major, anchor-minor): float32 logits [B, A] for
    "sigmoid" or [B, A, 2] (background, object) for "softmax", and deltas [B, A, 4], with
    A = Hf * Wf * k.
    """

    num_anchors: int
    channels: int = 512
    objectness: str = "sigmoid"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, features):
        if self.objectness not in ("sigmoid", "softmax"):
            raise ValueError(f"objectness must be 'sigmoid' or 'softmax'; got {self.objectness!r}")
        init = nn.initializers.normal(stddev=0.01)  # the paper's and torchvision's init
        x = nn.relu(
            Conv(self.channels, (3, 3), kernel_init=init, dtype=self.dtype, name="conv")(features)
        )
        batch = features.shape[0]
        per_anchor = 2 if self.objectness == "softmax" else 1
        logits = Conv(
            self.num_anchors * per_anchor, (1, 1), kernel_init=init, dtype=self.dtype, name="cls"
        )(x)
        deltas = Conv(
            self.num_anchors * 4, (1, 1), kernel_init=init, dtype=self.dtype, name="bbox"
        )(x)
        logits = logits.astype(jnp.float32).reshape(batch, -1, per_anchor)
        if per_anchor == 1:
            logits = logits[..., 0]  # [B, A]
        deltas = deltas.astype(jnp.float32).reshape(batch, -1, 4)  # [B, A, 4]
        return logits, deltas


def objectness_scores(logits):
    """Scores that rank anchors: sigmoid logits [B, A] as they are, softmax pairs [B, A, 2] as
    object minus background logit (same order as the softmax probability)."""
    if logits.ndim == 3:
        return logits[..., 1] - logits[..., 0]
    return logits
