"""The optimizer and learning-rate schedule of `config.train`: SGD with momentum (the paper's)
or AdamW, step or cosine decay, each after an optional linear warm-up."""

import jax
import optax


def learning_rate_schedule(train):
    """Linear warm-up over `warmup_steps` from `warmup_factor * learning_rate`, then either x
    `lr_decay` at each of `lr_steps` ("step"; the paper: 1e-3, x0.1 after 60k images on VOC
    07) or a cosine from `learning_rate` to `cosine_final_factor * learning_rate` at
    `num_steps` ("cosine")."""
    base, warmup = train.learning_rate, int(train.warmup_steps)
    if train.lr_schedule == "cosine":
        span = max(int(train.num_steps) - warmup, 1)
        decay = optax.cosine_decay_schedule(base, span, alpha=train.cosine_final_factor)
    else:
        boundaries = {int(s): train.lr_decay for s in train.lr_steps}
        steps = optax.piecewise_constant_schedule(base, boundaries)  # absolute step numbers
        decay = (lambda s: steps(s + warmup)) if warmup else steps
    if not warmup:
        return decay
    ramp = optax.linear_schedule(base * train.warmup_factor, base, warmup)
    return optax.join_schedules([ramp, decay], [warmup])


def make_optimizer(train, trainable):
    """`train.optimizer`: SGD with momentum and weight decay added to the kernels' gradients
    (L2, as Caffe and torch's SGD), or AdamW with decoupled weight decay on the kernels (as
    torch's AdamW). Biases get `bias_lr_factor` times the learning rate (py-faster-rcnn /
    Caffe: lr_mult 2) and, with `weight_decay_on="kernels"`, no decay (Caffe: decay_mult 0);
    `weight_decay_on="all"` decays every trained parameter (torchvision's references). Frozen
    parameters (`trainable` mask) get no update and no decay; optional clipping by global
    norm."""
    schedule = learning_rate_schedule(train)
    factor = train.bias_lr_factor
    bias_schedule = schedule if factor == 1 else (lambda step: factor * schedule(step))

    def group(path, trainable_leaf):
        if not trainable_leaf:
            return "frozen"
        return {"kernel": "kernel", "bias": "bias"}.get(path[-1].key, "other")

    def rule(rate, decay=None):
        """The update of one group; `decay`: its weight decay (None: none)."""
        if train.optimizer == "adamw":
            return optax.adamw(
                rate,
                b1=train.adam_b1,
                b2=train.adam_b2,
                eps=train.adam_eps,
                weight_decay=decay or 0.0,
            )
        sgd = optax.sgd(rate, momentum=train.momentum)
        return sgd if decay is None else optax.chain(optax.add_decayed_weights(decay), sgd)

    decay_all = train.weight_decay_on == "all"
    others_decay = train.weight_decay if decay_all else None
    groups = {
        "kernel": rule(schedule, train.weight_decay),
        "bias": rule(bias_schedule, others_decay),
        "other": rule(schedule, others_decay),
        "frozen": optax.set_to_zero(),
    }
    tx = optax.multi_transform(groups, jax.tree_util.tree_map_with_path(group, trainable))
    if train.grad_clip_norm:  # frozen parameters' gradients are zero: the norm is the same
        tx = optax.chain(optax.clip_by_global_norm(train.grad_clip_norm), tx)
    return tx
