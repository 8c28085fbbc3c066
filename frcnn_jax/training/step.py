"""The training step: a pure function of (state, batch, key), jitted once with shardings."""

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from frcnn_jax import sharding
from frcnn_jax.models import FasterRCNN

LOSS_NAMES = ("rpn_objectness", "rpn_box", "fast_rcnn_class", "fast_rcnn_box")


class TrainState(flax.struct.PyTreeNode):
    """Everything a step changes. `nonfinite_step` is the first step whose loss or gradient was
    not finite (-1 if none): that step's update was skipped, so `params` stay the last good."""

    step: jax.Array
    params: Any
    frozen: Any  # non-trained collections (FrozenBatchNorm statistics); {} if none
    opt_state: Any
    nonfinite_step: jax.Array


def train_step(state, batch, key, proposer=None, *, model, tx, objective="joint", trainable=None):
    """One SGD step on a (global) batch, the `Inputs` of a `frcnn_jax.data.loader.Batch` as
    global arrays; returns (state, metrics of this step).

    objective: "joint" (all four terms, `FasterRCNN.losses`), "rpn" (the RPN's terms) or
    "head" (Fast R-CNN's terms on fixed proposals from `proposer`, a variables dict, or from the
    state's own network when None): the pieces of the paper's alternating training.
    trainable: a bool pytree shaped like the parameters (None: all), e.g. an alternating
    phase's; the others are constants of the step, so their gradients are zero and never
    computed (phases 3 and 4 run no backward pass through the fixed shared layers, as Caffe
    does for the paper), and the gradient norm and its clipping count only the trained ones.
    """
    step_key = jax.random.fold_in(key, state.step)
    sample_key, dropout_key = jax.random.split(step_key)
    inputs = (batch.image, batch.image_size)
    gt = (batch.gt_boxes, batch.gt_classes, batch.gt_valid)
    if objective == "head":
        source = proposer if proposer is not None else {"params": state.params, **state.frozen}
        proposals = model.apply(source, *inputs, batch.scale, method=FasterRCNN.training_proposals)
    method = {"joint": FasterRCNN.losses, "rpn": FasterRCNN.rpn_losses}.get(objective)
    scales = (batch.scale,) if objective == "joint" else ()  # rpn_losses: no proposals

    def loss_fn(params):
        if trainable is not None:
            params = jax.tree.map(
                lambda p, on: p if on else jax.lax.stop_gradient(p), params, trainable
            )
        variables = {"params": params, **state.frozen}
        rngs = {"dropout": dropout_key}
        if objective == "head":
            terms = model.apply(
                variables,
                *inputs,
                *proposals,
                *gt,
                sample_key,
                method=FasterRCNN.head_losses,
                rngs=rngs,
            )
        else:
            terms = model.apply(
                variables, *inputs, *gt, sample_key, *scales, method=method, rngs=rngs
            )
        return sum(terms.values()), terms

    (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return apply_gradients(state, tx, loss, grads, terms)


def apply_gradients(state, tx, loss, grads, terms):
    """(`state` one step on, metrics): the update of `tx` applied, unless the loss or the
    gradient is not finite: then parameters and optimizer stay as they were and the step is
    recorded in `nonfinite_step`. Metrics: loss, grad_norm and `terms`."""
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = functools.partial(jax.tree.map, lambda new, old: jnp.where(finite, new, old))
    state = state.replace(
        step=state.step + 1,
        params=keep(params, state.params),
        opt_state=keep(opt_state, state.opt_state),
        nonfinite_step=jnp.where(
            ~finite & (state.nonfinite_step < 0), state.step, state.nonfinite_step
        ),
    )
    metrics = {"loss": loss, "grad_norm": grad_norm, **terms}
    return state, metrics


def jit_train_step(model, tx, mesh, *, objective="joint", trainable=None):
    """`train_step` jitted as training runs it: (state, batch, key, proposer) -> (state,
    metrics), state and proposer replicated over `mesh`, the batch split along it, the state
    donated."""
    replicated = sharding.replicated(mesh)
    return jax.jit(
        functools.partial(train_step, model=model, tx=tx, objective=objective, trainable=trainable),
        in_shardings=(replicated, sharding.batch_sharding(mesh), None, replicated),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
    )
