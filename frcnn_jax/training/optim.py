"""The optimizer and learning-rate schedule of `config.train`: SGD with momentum (the paper's)
or AdamW, step or cosine decay, each after an optional linear warm-up; with a time budget
(`train.budget_minutes`), the schedule stretched to the run's length as its speed shows."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
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


class Stretched(NamedTuple):
    """The optimizer state of a run with a time budget: `inner`, the optimizer's own, and where
    its schedule stands. Update `count` uses the schedule at step `at + rate * (count - since)`
    (a float): `training.budget.Budget` re-fits `since`, `at` and `rate` as the run goes, so the
    schedule of `train.num_steps` steps ends when the budget does, however many steps that
    turns out to be. Checkpointed with the state, so a resumed run goes on from its last fit."""

    inner: Any
    count: jax.Array  # int32: updates applied
    since: jax.Array  # int32: the count at the last re-fit
    at: jax.Array  # float32: the schedule's step there
    rate: jax.Array  # float32: schedule steps per update since


def stretched_step(state):
    """The schedule's step of a `Stretched` state's next update, on the host (numbers as the
    update computes them)."""
    count, since, at, rate = jax.device_get((state.count, state.since, state.at, state.rate))
    return np.float32(at + rate * np.float32(count - since))


def make_optimizer(train, trainable):
    """`optimizer(train, trainable)`, its schedule stretched (`Stretched`) when
    `train.budget_minutes` is set."""
    schedule = learning_rate_schedule(train)
    if not train.get("budget_minutes"):
        return optimizer(train, trainable, schedule)

    def init(params):
        zero = jnp.zeros((), jnp.int32)
        inner = optimizer(train, trainable, schedule).init(params)
        return Stretched(inner, zero, zero, jnp.zeros((), jnp.float32), jnp.ones((), jnp.float32))

    def update(updates, state, params=None):
        at = state.at + state.rate * (state.count - state.since).astype(jnp.float32)
        tx = optimizer(train, trainable, lambda count: schedule(at))
        updates, inner = tx.update(updates, state.inner, params)
        return updates, state._replace(inner=inner, count=state.count + 1)

    return optax.GradientTransformation(init, update)


def optimizer(train, trainable, schedule):
    """`train.optimizer` at learning rate `schedule(step)`: SGD with momentum and weight decay
    added to the kernels' gradients (L2, as Caffe and torch's SGD), or AdamW with decoupled
    weight decay on the kernels (as torch's AdamW). Biases get `bias_lr_factor` times the
    learning rate (py-faster-rcnn / Caffe: lr_mult 2) and, with `weight_decay_on="kernels"`,
    no decay (Caffe: decay_mult 0); `weight_decay_on="all"` decays every trained parameter
    (torchvision's references). Frozen parameters (`trainable` mask) get no update and no
    decay; optional clipping by global norm."""
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
