"""The state training starts from: a fresh initialisation, or imported weights / another run's
parameters (`config.model.init_checkpoint`)."""

import functools
import logging
import pathlib

import flax
import jax
import jax.numpy as jnp
import numpy as np

from frcnn_jax import checkpointing, weights
from frcnn_jax.errors import MissingFile
from frcnn_jax.models import FasterRCNN, trainable_mask
from frcnn_jax.training.optim import make_optimizer
from frcnn_jax.training.step import TrainState

log = logging.getLogger(__name__)


def initial_variables(config, model):
    """The model's initial variables on the host: a fresh initialisation (seed
    `train.seed`), with `config.model.init_checkpoint`'s tensors put in when it is set (the
    backbone's also into the RPN's own backbone when features are not shared)."""
    height, width = config.data.canvas
    init = jax.jit(functools.partial(model.init, method=FasterRCNN.detect))
    variables = init(
        jax.random.key(config.train.seed),
        jnp.zeros((1, height, width, 3), jnp.float32),
        jnp.array([[height, width]], jnp.int32),
    )
    variables = flax.core.unfreeze(variables)
    path = config.model.get("init_checkpoint")
    if path:
        flat, covers = _init_weights(path, config.model.backbone)
        variables = weights.restore_into(
            variables, flat, covers, source=f"config.model.init_checkpoint {path}"
        )
        nets = {key.split("/")[1] for key in flat}  # the networks the file has
        unshared = "rpn_backbone" in variables["params"] and "rpn_backbone" not in nets
        if unshared and "backbone" in nets:
            # unshared features: the RPN's backbone starts from the same (e.g. ImageNet) weights
            for collection in variables.values():
                if "backbone" in collection:
                    collection["rpn_backbone"] = jax.tree.map(jnp.copy, collection["backbone"])
    return variables


def _init_weights(path, backbone):
    """(flat, covers) of a weights file (imported or pretrained; one that names another
    backbone than `backbone` is refused), or of a training run's directory (its latest
    checkpoint's parameters and frozen statistics: fine-tuning a trained detector)."""
    if not pathlib.Path(path).is_dir():
        return weights.load(path, backbone=backbone)
    checkpoints = checkpointing.Checkpoints(path)
    step = checkpoints.latest_step()
    if step is None:
        raise MissingFile(f"config.model.init_checkpoint: no checkpoints in {path}")
    tree = checkpoints.restore_variables(step)
    flat = {k: np.asarray(v) for k, v in flax.traverse_util.flatten_dict(tree, sep="/").items()}
    log.info("config.model.init_checkpoint: step %d of %s", step, checkpoints.directory)
    return flat, sorted(tree)


def init_state(config, model):
    """(initial state on the host, its optimizer): parameters from
    `config.model.init_checkpoint` if set, `optim.make_optimizer(config.train, ...)` with the
    model's frozen parameters masked out."""
    return start_state(config.train, model, initial_variables(config, model))


def start_state(train, model, variables):
    """(state at step 0 holding `variables`, the optimizer of `train` with the model's frozen
    parameters masked out): the detector's and pretraining's start."""
    variables = dict(variables)
    params = variables.pop("params")
    tx = make_optimizer(train, trainable_mask(model, {"params": params, **variables}))
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        frozen=variables,
        opt_state=jax.jit(tx.init)(params),  # eager: a compile per parameter shape
        nonfinite_step=jnp.full((), -1, jnp.int32),
    )
    return state, tx
