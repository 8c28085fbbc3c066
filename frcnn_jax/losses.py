"""Faster R-CNN losses: equation (1) of the paper for the RPN, and Fast R-CNN's multi-task loss.

Pure functions of one image's predictions and targets (`frcnn_jax.targets`); average them over
the batch. Each returns a dict of named scalar terms so that training can log them separately.
"""

import jax
import jax.numpy as jnp
import optax


def smooth_l1(x, *, beta):
    """Huber-style smooth L1 (PyTorch's definition): 0.5 x^2 / beta below beta, |x| - beta / 2
    above; beta = 0 is plain L1. py-faster-rcnn's sigma corresponds to beta = 1 / sigma^2."""
    x = jnp.abs(x)
    if beta == 0:
        return x
    return jnp.where(x < beta, 0.5 * x * x / beta, x - 0.5 * beta)


def rpn_loss(objectness, deltas, targets, *, box_weight=1.0, box_normalizer=None, beta=1 / 9):
    """The RPN loss of equation (1): classification over the sampled anchors plus lambda-weighted
    regression over the positive ones.

    Args:
      objectness: float [A] logits of a sigmoid head (torchvision) or [A, 2] logits
        (background, object) of the paper's softmax head.
      deltas: float [A, 4] predicted deltas (weights 1, 1, 1, 1).
      targets: `frcnn_jax.targets.RPNTargets`.
      box_weight: lambda; 10 in the paper (with box_normalizer = anchor locations, ~2400),
        1 in torchvision (with the default normalizer).
      box_normalizer: N_reg. None divides by the number of sampled anchors (torchvision).
      beta: smooth-L1 beta; 1/9 is py-faster-rcnn's sigma = 3 for the RPN, and torchvision's.

    Returns:
      {"rpn_objectness": mean classification loss over sampled anchors (N_cls),
       "rpn_box": box_weight * sum of positive smooth-L1 / N_reg}; zero, not NaN, when nothing
       was sampled.
    """
    labels = targets.labels
    sampled = labels >= 0
    num_sampled = jnp.maximum(jnp.sum(sampled), 1)
    is_object = labels == 1
    if objectness.ndim == 2:
        per_anchor = optax.softmax_cross_entropy_with_integer_labels(
            objectness.astype(jnp.float32), is_object.astype(jnp.int32)
        )
    else:
        per_anchor = optax.sigmoid_binary_cross_entropy(
            objectness.astype(jnp.float32), is_object.astype(jnp.float32)
        )
    cls = jnp.sum(jnp.where(sampled, per_anchor, 0.0)) / num_sampled
    box = jnp.sum(
        jnp.where(is_object[:, None], smooth_l1(deltas - targets.box_targets, beta=beta), 0.0)
    )
    normalizer = num_sampled if box_normalizer is None else box_normalizer
    return {"rpn_objectness": cls, "rpn_box": box_weight * box / normalizer}


def fast_rcnn_loss(class_logits, box_deltas, targets, *, box_weight=1.0, beta=1.0):
    """Fast R-CNN's multi-task loss: softmax cross-entropy over K + 1 classes and smooth L1 on
    the deltas of each foreground RoI's own class.

    Args:
      class_logits: float [R, K + 1], background first.
      box_deltas: float [R, K, 4] (classes 1..K) or [R, K + 1, 4] (torchvision's layout, with a
        background slot that is never used); weights 10, 10, 5, 5.
      targets: `frcnn_jax.targets.RoITargets`.
      box_weight: weight of the box term (1 in the paper).
      beta: smooth-L1 beta (1 in the paper, 1/9 in torchvision).

    Returns:
      {"fast_rcnn_class": mean cross-entropy over valid RoIs,
       "fast_rcnn_box": box_weight * sum of foreground smooth-L1 / number of valid RoIs}
      (torchvision's normalization).
    """
    num_classes = class_logits.shape[-1]
    valid = targets.valid
    count = jnp.maximum(jnp.sum(valid), 1)
    ce = optax.softmax_cross_entropy_with_integer_labels(
        class_logits.astype(jnp.float32), targets.classes
    )
    cls = jnp.sum(jnp.where(valid, ce, 0.0)) / count
    slot = targets.classes if box_deltas.shape[1] == num_classes else targets.classes - 1
    slot = jnp.clip(slot, 0, box_deltas.shape[1] - 1)
    own = jnp.take_along_axis(box_deltas, slot[:, None, None], axis=1)[:, 0]  # [R, 4]
    foreground = valid & (targets.classes > 0)
    box = jnp.sum(
        jnp.where(foreground[:, None], smooth_l1(own - targets.box_targets, beta=beta), 0.0)
    )
    return {"fast_rcnn_class": cls, "fast_rcnn_box": box_weight * box / count}


def total_loss(terms: dict) -> jax.Array:
    """Sum of the named loss terms."""
    return sum(terms.values())
