"""`pretrain_and_evaluate(config, workdir)`: what `python -m frcnn_jax.pretrain` runs.

The detector's training machinery throughout: Optax (`training.optim`), data parallel over every
device of every host (`sharding`), Orbax checkpoints with the loader's position and exact resume
(`training.phase.run_steps`), progress lines, metrics.jsonl and TensorBoard. At the end: top-1 /
top-5 on the held-out split (`<workdir>/eval/step_<N>/metrics.json`) and the backbone's weights
file, `<workdir>/backbone.npz`, which `config.model.init_checkpoint` of a detector with the same
backbone loads as it loads imported ImageNet weights (strictly, covering the backbone only).
"""

import contextlib
import functools
import json
import logging
import pathlib

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from frcnn_jax import checkpointing, rundir, sharding, weights
from frcnn_jax.errors import ConfigError
from frcnn_jax.models.backbones import BN_EPSILON
from frcnn_jax.pretraining.config import check_pretrain_config
from frcnn_jax.pretraining.data import ClassBatches, open_split
from frcnn_jax.pretraining.model import build_classifier
from frcnn_jax.training.initial import start_state
from frcnn_jax.training.metrics import MetricWriter, flat_scalars
from frcnn_jax.training.phase import run_steps
from frcnn_jax.training.step import apply_gradients

log = logging.getLogger("frcnn_jax.pretraining")
WEIGHTS_FILE = "backbone.npz"
CONFIG_FILE = "pretrain.json"


def pretrain_and_evaluate(config, workdir):
    """Train the classifier of `config` in `workdir` (resuming from its latest checkpoint),
    evaluate it and write the backbone's weights file; returns the evaluation's metrics (dict:
    top1, top5, loss, examples, weights), or None when stopped by a signal."""
    check_pretrain_config(config)
    workdir = pathlib.Path(workdir)
    train = config.train
    report = workdir / "eval" / f"step_{train.num_steps}" / "metrics.json"
    checkpoints = checkpointing.Checkpoints(workdir, max_to_keep=train.keep_checkpoints)
    latest = checkpoints.latest_step()
    if latest is not None and latest >= train.num_steps and report.is_file():
        if (workdir / WEIGHTS_FILE).is_file():
            log.info("already trained to step %d and evaluated: %s", latest, report)
            print(f"already done: {report}", flush=True)
            return json.loads(report.read_text())
    locked = jax.process_index() == 0
    with rundir.WorkdirLock(workdir) if locked else contextlib.nullcontext():
        return _pretrain(config, workdir, checkpoints, report)


def _pretrain(config, workdir, checkpoints, report):
    train = config.train
    mesh = sharding.data_mesh()
    model = build_classifier(config)
    source, class_names = open_split(config.data, config.data.train_split)
    if len(class_names) != config.model.num_classes:
        raise ConfigError(
            f"config.model.num_classes is {config.model.num_classes} but {config.data.name} has "
            f"{len(class_names)} classes: set config.model.num_classes={len(class_names)}"
        )
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        run = {"config": json.loads(config.to_json_best_effort()), "class_names": class_names}
        (workdir / CONFIG_FILE).write_text(json.dumps(run, indent=1))
    state, tx = init_state(config, model)
    batches = ClassBatches(
        source,
        config.data,
        batch_size=sharding.local_batch_size(train.batch_size, mesh),
        train=True,
        seed=train.seed,
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
        name=f"{config.data.name}:{config.data.train_split}",
    )
    step_fn = jax.jit(
        functools.partial(classify_step, model=model, tx=tx),
        in_shardings=(sharding.replicated(mesh), sharding.batch_sharding(mesh)),
        out_shardings=(sharding.replicated(mesh), sharding.replicated(mesh)),
        donate_argnums=0,
    )
    writer = MetricWriter(workdir, enabled=jax.process_index() == 0)

    def step(state, batch):
        return step_fn(state, sharding.shard_batch(batch, mesh))

    def periodic_evaluation(state, step):
        result = evaluate(config, model, {"params": state.params, **state.frozen})
        writer.write(step, flat_scalars(result), prefix="eval/")
        log.info("step %d: top-1 %.4f top-5 %.4f", step, result["top1"], result["top5"])

    state = run_steps(
        train,
        jax.device_put(state, sharding.replicated(mesh)),
        step,
        batches,
        checkpoints,
        writer,
        num_steps=train.num_steps,
        meta={"seed": train.seed, "num_steps": train.num_steps, "classes": list(class_names)},
        periodic=periodic_evaluation,
    )
    if state is None:
        writer.close()
        return None
    variables = {"params": state.params, **state.frozen}
    result = evaluate(config, model, variables)
    writer.write(train.num_steps, flat_scalars(result), prefix="eval/")
    writer.close()
    if jax.process_index() == 0:
        path = workdir / WEIGHTS_FILE
        save_backbone(path, jax.device_get(variables), config.model.backbone)
        result["weights"] = str(path)
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(json.dumps(result, indent=1))
    print(
        f"{config.data.name} {config.data.eval_split}: top-1 {result['top1']:.4f}, "
        f"top-5 {result['top5']:.4f} ({result['examples']} images); backbone weights: "
        f"{workdir / WEIGHTS_FILE} (config.model.init_checkpoint)",
        flush=True,
    )
    return result


def init_state(config, model):
    """(fresh state on the host, its optimizer), seed `train.seed`."""
    size = config.data.image_size
    init = jax.jit(model.init)
    variables = flax.core.unfreeze(
        init(jax.random.key(config.train.seed), jnp.zeros((1, size, size, 3), jnp.uint8))
    )
    return start_state(config.train, model, variables)


def classify_step(state, batch, *, model, tx):
    """One step on a (global) batch of `Examples`: softmax cross-entropy over its valid
    examples; metrics loss, grad_norm and the batch's top-1 accuracy."""

    def loss_fn(params):
        logits, updated = model.apply(
            {"params": params, **state.frozen}, batch.image, train=True, mutable=["batch_stats"]
        )
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch.label)
        weight = batch.valid.astype(jnp.float32)
        count = jnp.maximum(weight.sum(), 1.0)
        hits = (jnp.argmax(logits, -1) == batch.label) * weight
        return (losses * weight).sum() / count, ({"top1": hits.sum() / count}, updated)

    (loss, (terms, updated)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    # the BatchNorm statistics move with the step (kept as they were if it is not finite)
    new_state, metrics = apply_gradients(state, tx, loss, grads, terms)
    finite = jnp.isfinite(loss) & jnp.isfinite(metrics["grad_norm"])
    frozen = jax.tree.map(
        lambda new, old: jnp.where(finite, new, old), {**state.frozen, **updated}, state.frozen
    )
    return new_state.replace(frozen=frozen), metrics


def evaluate(config, model, variables, split=None):
    """{"top1", "top5", "loss", "examples"} of `variables` on `split` (default
    `data.eval_split`): every host evaluates its shard on its own devices, the counts are
    summed over hosts."""
    split = split or config.data.eval_split
    source, _ = open_split(config.data, split)
    mesh = sharding.data_mesh(jax.local_devices())
    local = jax.device_put(_host_copy(variables), sharding.replicated(mesh))
    batch_size = sharding.local_batch_size(config.eval.batch_size, mesh, "config.eval.batch_size")
    batches = ClassBatches(
        source,
        config.data,
        batch_size=batch_size,
        train=False,
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
        name=f"{config.data.name}:{split}",
    )
    totals = np.zeros(4)
    count_fn = jax.jit(functools.partial(_counts, model=model))
    with batches:
        for batch in batches:
            inputs = jax.device_put(batch, sharding.batch_sharding(mesh))
            totals += np.asarray(jax.device_get(count_fn(local, inputs)))
    totals = np.asarray(sharding.gather(totals[None])).sum(0)
    top1, top5, loss, examples = totals
    examples = max(examples, 1)
    return {
        "top1": float(top1 / examples),
        "top5": float(top5 / examples),
        "loss": float(loss / examples),
        "examples": int(totals[3]),
    }


def _counts(variables, batch, *, model):
    """[top-1 hits, top-5 hits, summed loss, examples] of a batch's valid examples."""
    logits = model.apply(variables, batch.image).astype(jnp.float32)
    weight = batch.valid.astype(jnp.float32)
    top = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
    hit = top == batch.label[:, None]
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch.label)
    return jnp.stack(
        [
            (hit[:, 0] * weight).sum(),
            (hit.any(-1) * weight).sum(),
            (losses * weight).sum(),
            weight.sum(),
        ]
    )


def _host_copy(tree):
    """NumPy copies of a (replicated) pytree's values, from this host's first device."""
    return jax.tree.map(
        lambda x: np.asarray(x.addressable_data(0) if isinstance(x, jax.Array) else x), tree
    )


def save_backbone(path, variables, backbone):
    """Write the backbone's part of a classifier's `variables` as a weights file
    (`frcnn_jax.weights.save`, naming the backbone: loading it into a detector with another
    backbone is an error naming both): `backbone_weights`."""
    weights.save(path, *backbone_weights(variables), backbone=backbone)


def backbone_weights(variables):
    """(flat, covers) of the backbone in a classifier's `variables`, as a detector's backbone
    has them: each pretraining BatchNorm `<conv>_bn` of a plain backbone folded into its conv
    (kernel x scale / sqrt(var + eps) per output channel, bias (bias - mean) x that +
    BatchNorm's bias: the same function as the trained network in evaluation mode); a ResNet's
    trained BatchNorm as its frozen one (scale, bias, mean, var -> weight, bias, mean, var).
    `covers` lists the backbone's parts it holds (an FPN
    backbone's `body`: the detector's FPN layers stay fresh)."""

    def flat_part(collection):
        tree = variables.get(collection, {}).get("backbone", {})
        return {k: np.asarray(v, np.float32) for k, v in flatten(tree).items()}

    params, stats = flat_part("params"), flat_part("batch_stats")

    def folded(layer):  # a plain backbone's `<conv>_bn`
        return layer.endswith("_bn") and f"{layer[:-3]}/kernel" in params

    flat = {}
    for key, value in params.items():
        layer, _, name = key.rpartition("/")
        if folded(layer):
            continue
        if f"{layer}/scale" in params:  # a ResNet's trained BatchNorm -> its frozen one
            frozen_name = {"scale": "weight", "bias": "bias"}[name]
            flat[f"batch_stats/backbone/{layer}/{frozen_name}"] = value
            continue
        norm = f"{layer}_bn"
        if f"{norm}/scale" in params:
            if f"{layer}/bias" not in params:
                raise ValueError(f"{layer}: a conv followed by BatchNorm needs a bias to fold into")
            factor = params[f"{norm}/scale"] / np.sqrt(stats[f"{norm}/var"] + BN_EPSILON)
            if name == "kernel":
                value = value * factor
            else:
                value = (value - stats[f"{norm}/mean"]) * factor + params[f"{norm}/bias"]
        flat[f"params/backbone/{key}"] = value
    for key, value in stats.items():
        if not folded(key.rpartition("/")[0]):
            flat[f"batch_stats/backbone/{key}"] = value
    covers = sorted({"/".join(key.split("/")[:3]) for key in flat})
    return flat, covers


def flatten(tree):
    return flax.traverse_util.flatten_dict(tree, sep="/")
