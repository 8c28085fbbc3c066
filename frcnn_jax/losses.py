"""Faster R-CNN losses: equation (1) of the paper for the RPN, and Fast R-CNN's multi-task loss.

Pure functions of a batch's predictions and targets (`frcnn_jax.targets`, vmapped over images),
normalised over the whole batch as torchvision does. Each returns a dict of named scalar terms
so that training can log them separately.
"""

import math

import jax.numpy as jnp
import optax


def smooth_l1(x, *, beta):
    """Huber-style smooth L1 (PyTorch's definition): 0.5 x^2 / beta below beta, |x| - beta / 2
    above; beta = 0 is plain L1. py-faster-rcnn's sigma corresponds to beta = 1 / sigma^2."""
    x = jnp.abs(x)
    if beta == 0:
        return x
    return jnp.where(x < beta, 0.5 * x * x / beta, x - 0.5 * beta)


def rpn_loss(objectness, deltas, targets, *, box_weight, box_normalizer, beta):
    """The RPN loss of equation (1) over a batch: classification over the sampled anchors plus
    lambda-weighted regression over the positive ones.

    Normalised over the whole batch, as torchvision's `RegionProposalNetwork.compute_loss`
    does: N_cls is the number of sampled anchors of all images together, so an image with
    fewer candidates weighs less (py-faster-rcnn, one image per pass, normalises per image:
    the same whenever every image fills its sample, as in practice).

    Args:
      objectness: float [..., A] logits of a sigmoid head (torchvision) or [..., A, 2] logits
        (background, object) of the paper's softmax head; leading dimensions: images.
      deltas: float [..., A, 4] predicted deltas (weights 1, 1, 1, 1).
      targets: `frcnn_jax.targets.RPNTargets` with labels [..., A].
      box_weight: lambda; 10 in the paper (with box_normalizer = anchor locations, ~2400),
        1 in torchvision (with the default normalizer).
      box_normalizer: N_reg per image (multiplied by the number of images). None divides by
        the number of sampled anchors (torchvision).
      beta: smooth-L1 beta; 1/9 is py-faster-rcnn's sigma = 3 for the RPN, and torchvision's.

    Returns:
      {"rpn_objectness": mean classification loss over sampled anchors (N_cls),
       "rpn_box": box_weight * sum of positive smooth-L1 / N_reg}; zero, not NaN, when nothing
       was sampled.
    """
    labels = targets.labels
    num_images = math.prod(labels.shape[:-1])
    sampled = labels >= 0
    num_sampled = jnp.maximum(jnp.sum(sampled), 1)
    is_object = labels == 1
    if objectness.ndim == labels.ndim + 1:
        per_anchor = optax.softmax_cross_entropy_with_integer_labels(
            objectness.astype(jnp.float32), is_object.astype(jnp.int32)
        )
    else:
        per_anchor = optax.sigmoid_binary_cross_entropy(
            objectness.astype(jnp.float32), is_object.astype(jnp.float32)
        )
    cls = jnp.sum(jnp.where(sampled, per_anchor, 0.0)) / num_sampled
    box = jnp.sum(
        jnp.where(is_object[..., None], smooth_l1(deltas - targets.box_targets, beta=beta), 0.0)
    )
    normalizer = num_sampled if box_normalizer is None else box_normalizer * num_images
    return {"rpn_objectness": cls, "rpn_box": box_weight * box / normalizer}


def fast_rcnn_loss(class_logits, box_deltas, targets, *, beta, box_weight=1.0):
    """Fast R-CNN's multi-task loss over a batch: softmax cross-entropy over K + 1 classes and
    smooth L1 on the deltas of each foreground RoI's own class, both normalised by the number
    of sampled RoIs of all images together (torchvision's `fastrcnn_loss`).

    Args:
      class_logits: float [..., R, K + 1], background first; leading dimensions: images.
      box_deltas: float [..., R, K, 4] (classes 1..K) or [..., R, K + 1, 4] (torchvision's
        layout, with a background slot that is never used); weights 10, 10, 5, 5.
      targets: `frcnn_jax.targets.RoITargets` with classes / valid [..., R].
      beta: smooth-L1 beta (1 in the paper, 1/9 in torchvision).
      box_weight: weight of the box term (1 in the paper and torchvision).

    Returns:
      {"fast_rcnn_class": mean cross-entropy over valid RoIs,
       "fast_rcnn_box": box_weight * sum of foreground smooth-L1 / number of valid RoIs}.
    """
    num_classes = class_logits.shape[-1]
    class_logits = class_logits.reshape(-1, num_classes)  # [N, K + 1] over the batch
    box_deltas = box_deltas.reshape(-1, *box_deltas.shape[-2:])
    classes, valid = targets.classes.reshape(-1), targets.valid.reshape(-1)
    box_targets = targets.box_targets.reshape(-1, 4)
    count = jnp.maximum(jnp.sum(valid), 1)
    ce = optax.softmax_cross_entropy_with_integer_labels(class_logits.astype(jnp.float32), classes)
    cls = jnp.sum(jnp.where(valid, ce, 0.0)) / count
    slot = classes if box_deltas.shape[1] == num_classes else classes - 1
    slot = jnp.clip(slot, 0, box_deltas.shape[1] - 1)
    own = jnp.take_along_axis(box_deltas, slot[:, None, None], axis=1)[:, 0]  # [N, 4]
    foreground = valid & (classes > 0)
    box = jnp.sum(jnp.where(foreground[:, None], smooth_l1(own - box_targets, beta=beta), 0.0))
    return {"fast_rcnn_class": cls, "fast_rcnn_box": box_weight * box / count}
