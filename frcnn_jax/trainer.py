"""Training loop: Optax SGD, data parallel over every device, Orbax checkpoints, metrics.

`train_step(state, batch, key)` is a pure function; `train_and_evaluate(config, workdir)` jits
it once with shardings, runs it, checkpoints (with the loader position), logs and evaluates.
Rerunning the same command resumes from the latest checkpoint.
"""

import dataclasses
import functools
import json
import logging
import pathlib
import signal
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from frcnn_jax import checkpointing, rundir, sharding, weights
from frcnn_jax.data import make_batches, pipeline
from frcnn_jax.evaluation.runner import evaluate_detections
from frcnn_jax.models import FasterRCNN, build_model, trainable_mask

log = logging.getLogger(__name__)
LOSS_NAMES = ("rpn_objectness", "rpn_box", "fast_rcnn_class", "fast_rcnn_box")


class TrainState(flax.struct.PyTreeNode):
    """Everything a step changes. `nonfinite_step` is the first step whose loss or gradient was
    not finite (-1 if none): that step's update was skipped, so `params` stay the last good."""

    step: jax.Array
    params: Any
    frozen: Any  # non-trained collections (FrozenBatchNorm statistics); {} if none
    opt_state: Any
    nonfinite_step: jax.Array


# ---------------------------------------------------------------- optimizer


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


# ---------------------------------------------------------------- the step


def train_step(state, batch, key, proposer=None, *, model, tx, objective="joint"):
    """One SGD step on a (global) batch; returns (state, metrics of this step).

    objective: "joint" (all four terms, `FasterRCNN.losses`), "rpn" (the RPN's terms) or
    "head" (Fast R-CNN's terms on fixed proposals from `proposer`, a variables dict, or from the
    state's own network when None): the pieces of the paper's alternating training.
    """
    step_key = jax.random.fold_in(key, state.step)
    sample_key, dropout_key = jax.random.split(step_key)
    inputs = (batch["image"], batch["image_size"])
    gt = (batch["gt_boxes"], batch["gt_classes"], batch["gt_valid"])
    if objective == "head":
        source = proposer if proposer is not None else {"params": state.params, **state.frozen}
        proposals = model.apply(
            source, *inputs, batch.get("scale"), method=FasterRCNN.training_proposals
        )
    method = {"joint": FasterRCNN.losses, "rpn": FasterRCNN.rpn_losses}.get(objective)
    scales = (batch.get("scale"),) if objective == "joint" else ()  # rpn_losses: no proposals

    def loss_fn(params):
        variables = {"params": params, **state.frozen}
        rngs = {"dropout": dropout_key}
        if objective == "head":
            terms = model.apply(variables, *inputs, *proposals, *gt, sample_key,
                                method=FasterRCNN.head_losses, rngs=rngs)  # fmt: skip
        else:
            terms = model.apply(variables, *inputs, *gt, sample_key, *scales, method=method,
                                rngs=rngs)  # fmt: skip
        return sum(terms.values()), terms

    (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
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


def jit_train_step(model, tx, mesh, *, objective="joint"):
    """`train_step` jitted as training runs it: (state, batch, key, proposer) -> (state,
    metrics), state and proposer replicated over `mesh`, the batch split along it, the state
    donated."""
    replicated = sharding.replicated(mesh)
    return jax.jit(
        functools.partial(train_step, model=model, tx=tx, objective=objective),
        in_shardings=(replicated, sharding.batch_sharding(mesh), None, replicated),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
    )


# ---------------------------------------------------------------- set-up


def initial_variables(config, model):
    """The model's initial variables on the host: a fresh initialisation (seed
    `train.seed`), with `config.model.init_checkpoint`'s tensors put in when it is set."""
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
        flat, covers = _init_weights(path)
        variables = weights.restore_into(
            variables, flat, covers, source=f"config.model.init_checkpoint {path}"
        )
    return variables


def _init_weights(path):
    """(flat, covers) of an imported .npz, or of a training run's directory (its latest
    checkpoint's parameters and frozen statistics: fine-tuning a trained detector)."""
    if not pathlib.Path(path).is_dir():
        return weights.load(path)
    checkpoints = checkpointing.Checkpoints(path)
    step = checkpoints.latest_step()
    if step is None:
        raise FileNotFoundError(f"config.model.init_checkpoint: no checkpoints in {path}")
    tree = checkpoints.restore_variables(step)
    flat = {k: np.asarray(v) for k, v in flax.traverse_util.flatten_dict(tree, sep="/").items()}
    log.info("config.model.init_checkpoint: step %d of %s", step, checkpoints.directory)
    return flat, sorted(tree)


def init_state(config, model, tx_fn):
    """Initial state on the host (parameters from `config.model.init_checkpoint` if set)."""
    variables = initial_variables(config, model)
    params = variables.pop("params")
    tx = tx_fn(trainable_mask(model, {"params": params, **variables}))
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        frozen=variables,
        opt_state=tx.init(params),
        nonfinite_step=jnp.full((), -1, jnp.int32),
    )
    return state, tx


class _Stop:
    """SIGTERM / Ctrl-C: finish the current step, save, exit."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. some notebook runners)
                pass
        return self

    def _handle(self, signum, frame):
        del frame
        log.warning("received signal %d: saving a checkpoint and stopping", signum)
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class MetricWriter:
    """Scalars to `<workdir>/metrics.jsonl` and TensorBoard (`<workdir>/tensorboard`)."""

    def __init__(self, workdir, enabled=True):
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        if enabled:
            workdir = pathlib.Path(workdir)
            workdir.mkdir(parents=True, exist_ok=True)
            self._jsonl = (workdir / "metrics.jsonl").open("a")
            try:
                from flax.metrics import tensorboard

                self._tb = tensorboard.SummaryWriter(str(workdir / "tensorboard"))
            except ImportError:  # TensorBoard needs TensorFlow; JSONL always works
                log.warning("TensorBoard writer unavailable; writing metrics.jsonl only")

    def write(self, step, scalars, prefix=""):
        if not self.enabled:
            return
        scalars = {f"{prefix}{k}": float(v) for k, v in scalars.items()}
        self._jsonl.write(json.dumps({"step": int(step), "time": time.time(), **scalars}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.scalar(k, v, step)
            self._tb.flush()

    def close(self):
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


# ---------------------------------------------------------------- the loop


def _flat_scalars(metrics, prefix=""):
    out = {}
    for k, v in metrics.items():
        if isinstance(v, dict):
            out.update(_flat_scalars(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and v is not None:
            out[f"{prefix}{k}"] = v
    return out


def make_detect_fn(model, mesh, *, proposals=False):
    """(variables, host batch) -> (Detections, proposals or None) as NumPy, all hosts' images."""
    replicated, batched = sharding.replicated(mesh), sharding.batch_sharding(mesh)

    @functools.partial(jax.jit, in_shardings=(replicated, batched, batched, batched))
    def detect(variables, images, sizes, scales):
        return model.apply(
            variables, images, sizes, scales, return_proposals=True, method=FasterRCNN.detect
        )

    def detect_fn(variables, batch):
        local = batch.get("_local", batch)  # multi-host: each host feeds its own examples
        keys = ("image", "image_size", "scale")
        inputs = sharding.shard_batch({k: local[k] for k in keys}, mesh)
        out = detect(variables, inputs["image"], inputs["image_size"], inputs["scale"])
        detections, boxes = jax.tree.map(np.asarray, _gather(out))
        return detections, (boxes if proposals else None)

    return detect_fn


def _gather(tree):
    if jax.process_count() == 1:
        return tree
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def evaluate(config, model, variables, mesh, *, workdir=None, step=None, split=None):
    """Evaluate on `split` (default `config.eval.split`); every host takes part, process 0
    writes the report."""
    split = split or config.eval.split
    data = pipeline.with_name(config.data, eval_data_name(config))
    batches, info = make_batches(
        data,
        split,
        batch_size=sharding.local_batch_size(config.eval.batch_size, mesh),
        train=False,
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
        agree=_hosts_agree(),
    )
    detect_fn = make_detect_fn(model, mesh, proposals=config.eval.proposal_recall)
    if jax.process_count() > 1:
        batches = (_gather_batch(b) for b in batches)
    write = workdir is not None and jax.process_index() == 0
    return evaluate_detections(
        lambda batch: detect_fn(variables, batch),
        batches,
        info,
        use_07_metric=config.eval.metric == "voc07",
        iou_threshold=config.eval.iou_threshold,
        coco=config.eval.coco,
        proposals=config.eval.proposal_recall,
        workdir=workdir if write else None,
        title=f"{data.name} {split}, step {step}",
    )


def eval_data_name(config):
    """The dataset evaluated: `config.eval.data_name`, or `config.data.name` when unset."""
    return config.eval.get("data_name") or config.data.name


def _hosts_agree():
    """Several hosts: the loaders' agreement on which canvas the next batch uses (every host's
    bucket sizes, gathered); one host: None (local decisions)."""
    if jax.process_count() == 1:
        return None
    from jax.experimental import multihost_utils

    return lambda counts: np.asarray(multihost_utils.process_allgather(counts))


def _gather_batch(batch):
    """Every host's examples (in global batch order), keeping this host's under "_local"."""
    from jax.experimental import multihost_utils

    gathered = multihost_utils.process_allgather(batch, tiled=True)
    return {**{k: np.asarray(v) for k, v in gathered.items()}, "_local": batch}


def train_and_evaluate(config, workdir):
    """Train `config` in `workdir` (resuming if it has checkpoints), then evaluate.

    Returns the final evaluation metrics (dict), or None when stopped by a signal.
    """
    workdir = pathlib.Path(workdir)
    train = config.train
    checkpoints = checkpointing.Checkpoints(workdir, max_to_keep=train.keep_checkpoints)
    last_step = final_step(train)
    final_report = workdir / "eval" / f"step_{last_step}" / "metrics.json"
    latest = checkpoints.latest_step()
    if latest is not None and latest >= last_step and final_report.is_file():
        log.info("already trained to step %d and evaluated: %s", last_step, final_report)
        print(f"already done: {final_report}", flush=True)
        return json.loads(final_report.read_text())
    mesh = sharding.data_mesh()
    model = build_model(config)
    if train.scheme == "non_approximate_joint":  # gradients through RoIAlign into proposals
        model = model.clone(head=dataclasses.replace(model.head, proposal_gradients=True))
    _prepare_once(config.data)
    if jax.process_index() == 0:  # the config and class names: a workdir rebuilds its model
        rundir.write(workdir, config, pipeline.open_split(config.data, config.data.train_split)[1])
    writer = MetricWriter(workdir, enabled=jax.process_index() == 0)
    if train.scheme == "alternating":
        state = _train_alternating(config, workdir, model, mesh, writer)
    else:
        state, tx = init_state(config, model, functools.partial(make_optimizer, train))
        state = _train_stage(
            config, model, mesh, jax.device_put(state, sharding.replicated(mesh)), tx,
            checkpoints, writer, num_steps=train.num_steps,
        )  # fmt: skip
    if state is None:
        writer.close()
        return None
    variables = {"params": state.params, **state.frozen}
    result = evaluate(config, model, variables, mesh, workdir=final_report.parent, step=last_step)
    writer.write(last_step, _flat_scalars(result), prefix="eval/")
    writer.close()
    _print_result(config, result, final_report.parent)
    return result


def _train_stage(config, model, mesh, state, tx, checkpoints, writer, *, num_steps,
                 objective="joint", proposer=None, seed_offset=0, name="",
                 lr_fn=None):  # fmt: skip
    """Run steps until `num_steps` from the latest checkpoint in `checkpoints` (or `state`),
    saving periodically; returns the final state, or None when stopped by a signal.
    `lr_fn` is the stage's learning-rate schedule, for the logs."""
    train = config.train
    batches, info = make_batches(
        config.data,
        config.data.train_split,
        batch_size=sharding.local_batch_size(train.batch_size, mesh),
        train=True,
        seed=train.seed + seed_offset,
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
        agree=_hosts_agree(),
    )
    meta = {"seed": train.seed, "num_steps": num_steps, "classes": list(info.class_names)}
    latest = checkpoints.latest_step()
    if latest is not None:
        state, loader_state, _ = checkpoints.restore(latest, checkpointing.abstract_like(state))
        batches.set_state(loader_state)
        log.info("resumed from %s at step %d", checkpoints.directory, latest)
    step_fn = jit_train_step(model, tx, mesh, objective=objective)
    key = jax.random.key(train.seed + seed_offset)
    step = int(state.step)
    pending, start, start_step = [], time.perf_counter(), step
    with _Stop() as stop:
        while step < num_steps:
            batch = next(batches)
            batch = sharding.shard_batch({k: v for k, v in batch.items() if k != "image_id"}, mesh)
            state, metrics = step_fn(state, batch, key, proposer)
            pending.append(metrics)
            step += 1
            last = step == num_steps
            if step % train.log_every == 0 or last or stop.requested:
                _check_finite(state, pending, checkpoints)
                _log_progress(
                    step, num_steps, train, pending, start, start_step, writer, name, lr_fn
                )
                pending = []
            if step % train.checkpoint_every == 0 or last or stop.requested:
                _check_finite(state, pending, checkpoints)
                checkpoints.save(step, state, batches.get_state(), meta)
            if stop.requested:
                checkpoints.wait()
                log.warning("stopped at step %d; rerun the same command to resume", step)
                return None
            if train.eval_every and step % train.eval_every == 0 and not last:
                variables = {"params": state.params, **state.frozen}
                metrics_eval = evaluate(
                    config, model, variables, mesh, split=config.eval.periodic_split
                )
                writer.write(step, _flat_scalars(metrics_eval), prefix=f"eval/{name}")
    checkpoints.wait()
    return state


# The paper's 4-step alternating training (section 3.2): which sub-modules each step trains,
# its objective, and its share of `train.num_steps` when `train.alternating_stage_steps` is
# empty (py-faster-rcnn's alt-opt VOC schedule: 80k RPN, 40k Fast R-CNN, 80k RPN, 40k Fast
# R-CNN iterations).
ALTERNATING_STAGES = (
    ("rpn", ("backbone", "rpn_head"), 1 / 3),
    ("head", ("backbone", "box_head", "predictor"), 1 / 6),
    ("rpn", ("rpn_head",), 1 / 3),
    ("head", ("box_head", "predictor"), 1 / 6),
)


def final_step(train):
    """The step number of the finished detector: `num_steps`, or for alternating training with
    explicit stage lengths their sum."""
    if train.scheme == "alternating" and train.alternating_stage_steps:
        return int(sum(train.alternating_stage_steps))
    return int(train.num_steps)


def alternating_schedules(train):
    """Per step k = 1..4: (number of steps, `train` with that stage's lr decay and warm-up).

    With `train.alternating_stage_steps` the lengths are those, each with its own decay step
    from `alternating_stage_lr_steps` (py-faster-rcnn's solvers: one x0.1 step per stage) or,
    if that is empty, `lr_steps` scaled to the stage; otherwise `num_steps` is split 1/3, 1/6,
    1/3, 1/6 and `lr_steps` / `warmup_steps` are scaled to each stage."""
    out = []
    for index, (_, _, share) in enumerate(ALTERNATING_STAGES):
        if train.alternating_stage_steps:
            num_steps = int(train.alternating_stage_steps[index])
        else:
            num_steps = max(round(train.num_steps * share), 1)
        scale = num_steps / train.num_steps
        stage = train.copy_and_resolve_references()
        with stage.unlocked():
            stage.num_steps = num_steps
            if train.alternating_stage_batch_sizes:
                stage.batch_size = int(train.alternating_stage_batch_sizes[index])
            stage.warmup_steps = round(train.warmup_steps * scale)
            if train.alternating_stage_lr_steps:
                stage.lr_steps = (int(train.alternating_stage_lr_steps[index]),)
            else:
                stage.lr_steps = tuple(max(round(s * scale), 1) for s in train.lr_steps)
        out.append((num_steps, stage))
    return out


def alternating_start(index, initial, finals, *, step2_init="initial"):
    """The parameters step `index` (1-4) starts from, as in the paper and py-faster-rcnn's
    alt-opt: steps 1 and 2 from the initial (ImageNet) weights (step 2 from step 1's network
    with `step2_init="step1"`); step 3 from step 2's detector with a freshly initialised RPN
    head; step 4 from step 3's network with a freshly initialised predictor (fc6/fc7 stay step
    2's, the RPN head step 3's). `finals`: the parameters steps 1..index-1 ended with."""
    if index == 1 or (index == 2 and step2_init == "initial"):
        return initial
    if index == 2:
        return finals[0]
    if index == 3:
        return {**finals[1], "rpn_head": initial["rpn_head"]}
    return {**finals[2], "predictor": initial["predictor"]}


def _train_alternating(config, workdir, model, mesh, writer):
    """Steps 1-4, each resumable in `<workdir>/alternating/step<k>`; the final network is saved
    to `<workdir>/checkpoints` at `final_step(train)` for evaluation."""
    train = config.train
    replicated = sharding.replicated(mesh)
    initial, _ = init_state(config, model, functools.partial(make_optimizer, train))
    frozen_rules = trainable_mask(model, {"params": initial.params, **initial.frozen})
    schedules = alternating_schedules(train)
    finals = []
    for index, (objective, modules, _) in enumerate(ALTERNATING_STAGES, start=1):
        num_steps, stage_train = schedules[index - 1]
        mask = {k: jax.tree.map(lambda t, on=k in modules: t and on, v)
                for k, v in frozen_rules.items()}  # fmt: skip
        tx = make_optimizer(stage_train, mask)
        params = alternating_start(index, initial.params, [f.params for f in finals],
                                   step2_init=train.alternating_step2_init)  # fmt: skip
        # a copy: each stage donates its state to its step, earlier stages' arrays live on
        state = jax.device_put(
            jax.tree.map(jnp.copy, initial.replace(params=params, opt_state=tx.init(params))),
            replicated,
        )
        proposer = None
        if index == 2:  # Fast R-CNN trained on step 1's proposals
            proposer = jax.device_put({"params": finals[0].params, **finals[0].frozen}, replicated)
        checkpoints = checkpointing.Checkpoints(
            workdir / "alternating" / f"step{index}", max_to_keep=train.keep_checkpoints
        )
        stage_config = config.copy_and_resolve_references()
        with stage_config.unlocked():
            stage_config.train = stage_train
        state = _train_stage(
            stage_config, model, mesh, state, tx, checkpoints, writer, num_steps=num_steps,
            objective=objective, proposer=proposer, seed_offset=index, name=f"step{index}/",
            lr_fn=learning_rate_schedule(stage_train),
        )  # fmt: skip
        if state is None:
            return None
        finals.append(state)
    final = finals[-1].replace(step=jnp.asarray(final_step(train), jnp.int32))
    checkpoints = checkpointing.Checkpoints(workdir, max_to_keep=train.keep_checkpoints)
    checkpoints.save(final_step(train), final, {}, {"scheme": "alternating"})
    checkpoints.wait()
    return final


def evaluate_checkpoint(config, workdir, step=None):
    """Evaluate the checkpoint at `step` (latest if None) of `workdir` on `config.eval.split`;
    the report goes to `<workdir>/eval/step_<step>/`. A workdir without checkpoints evaluates
    `config.model.init_checkpoint` (an imported detector) as step 0."""
    checkpoints = checkpointing.Checkpoints(workdir)
    step = checkpoints.latest_step() if step is None else step
    model = build_model(config)
    mesh = sharding.data_mesh()
    if step is None and config.model.get("init_checkpoint"):
        step, variables = 0, initial_variables(config, model)
    elif step is None:
        raise FileNotFoundError(
            f"no checkpoints in {checkpoints.directory}: train first, or set "
            "config.model.init_checkpoint to evaluate imported weights"
        )
    else:
        variables = checkpoints.restore_variables(step)
    variables = jax.device_put(variables, sharding.replicated(mesh))
    report = pathlib.Path(workdir) / "eval" / f"step_{step}"
    result = evaluate(config, model, variables, mesh, workdir=report, step=step)
    _print_result(config, result, report)
    return result


def _print_result(config, result, report):
    mean_ap = result["voc"]["mAP"]
    print(
        f"{eval_data_name(config)} {config.eval.split}: mAP@{config.eval.iou_threshold:g} = "
        f"{'n/a' if mean_ap is None else f'{mean_ap:.4f}'} (report: {report})",
        flush=True,
    )


def _prepare_once(data):
    """Multi-host: process 0 prepares the dataset (TFDS writes files once), the others wait."""
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    if jax.process_index() == 0:
        pipeline.prepare_all(data)
    multihost_utils.sync_global_devices("frcnn_jax: dataset prepared")


def _check_finite(state, pending, checkpoints):
    bad = int(state.nonfinite_step)
    if bad < 0:
        return
    terms = {}
    for metrics in pending:
        values = jax.device_get(metrics)
        if not np.isfinite(values["loss"]) or not np.isfinite(values["grad_norm"]):
            terms = {k: float(values[k]) for k in (*LOSS_NAMES, "grad_norm")}
            break
    checkpoints.wait()
    raise FloatingPointError(
        f"non-finite loss or gradient at step {bad} (loss terms: {terms or 'see metrics.jsonl'});"
        f" that update was skipped and training stopped; the last good checkpoint is step "
        f"{checkpoints.latest_step()} in {checkpoints.directory}"
    )


def _log_progress(step, num_steps, train, pending, start, start_step, writer, name="", lr_fn=None):
    values = jax.device_get(pending)
    mean = {k: float(np.mean([v[k] for v in values])) for k in values[0]}
    elapsed = time.perf_counter() - start
    rate = (step - start_step) / max(elapsed, 1e-9)
    eta = (num_steps - step) / max(rate, 1e-9)
    lr = float((lr_fn or learning_rate_schedule(train))(step))
    writer.write(step, {**mean, "steps_per_s": rate, "learning_rate": lr}, prefix=f"train/{name}")
    terms = " ".join(f"{k}={v:.4f}" for k, v in mean.items() if k in LOSS_NAMES)
    log.info(
        "%sstep %d/%d (%.0f%%) %.2f steps/s %.1f images/s ETA %s loss=%.4f %s lr=%.2g",
        name, step, num_steps, 100 * step / num_steps, rate, rate * train.batch_size,
        _duration(eta), mean["loss"], terms, lr,
    )  # fmt: skip


def _duration(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
