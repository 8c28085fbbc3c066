"""The optimizer and learning-rate schedule of `config.train`."""

import jax
import optax


def learning_rate_schedule(train):
    """Linear warm-up from `warmup_factor * learning_rate`, then x `lr_decay` at each of
    `lr_steps` (the paper: 1e-3, x0.1 after 60k images on VOC 07)."""
    base = train.learning_rate
    boundaries = {int(s): train.lr_decay for s in train.lr_steps}
    steps = optax.piecewise_constant_schedule(base, boundaries)
    if not train.warmup_steps:
        return steps
    warmup = optax.linear_schedule(base * train.warmup_factor, base, train.warmup_steps)
    return optax.join_schedules([warmup, lambda s: steps(s + train.warmup_steps)],
                                [train.warmup_steps])  # fmt: skip


def make_optimizer(train, trainable):
    """SGD with momentum; weight decay on kernels only; biases at `bias_lr_factor` times the
    learning rate (py-faster-rcnn / Caffe: lr_mult 2, no decay on biases); frozen parameters
    (`trainable` mask) get no update and no decay; optional clipping by global norm."""
    schedule = learning_rate_schedule(train)
    factor = train.bias_lr_factor

    def group(path, trainable_leaf):
        if not trainable_leaf:
            return "frozen"
        return {"kernel": "kernel", "bias": "bias"}.get(path[-1].key, "other")

    def sgd(rate):
        return optax.sgd(rate, momentum=train.momentum)

    groups = {
        "kernel": optax.chain(optax.add_decayed_weights(train.weight_decay), sgd(schedule)),
        "bias": sgd(schedule if factor == 1 else lambda step: factor * schedule(step)),
        "other": sgd(schedule),
        "frozen": optax.set_to_zero(),
    }
    tx = optax.multi_transform(groups, jax.tree_util.tree_map_with_path(group, trainable))
    if train.grad_clip_norm:  # frozen parameters' gradients are zero: the norm is the same
        tx = optax.chain(optax.clip_by_global_norm(train.grad_clip_norm), tx)
    return tx
