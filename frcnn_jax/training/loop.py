"""`train_and_evaluate(config, workdir)`: what `python -m frcnn_jax.train` runs. Data parallel
over every device of every host; rerunning resumes from the latest checkpoint."""

import contextlib
import dataclasses
import json
import logging
import pathlib

import jax

from frcnn_jax import checkpointing, rundir, sharding
from frcnn_jax.data import sources
from frcnn_jax.models import build_model
from frcnn_jax.training.alternating import final_step, train_alternating
from frcnn_jax.training.evaluation import evaluate, print_result
from frcnn_jax.training.initial import init_state
from frcnn_jax.training.metrics import MetricWriter, flat_scalars
from frcnn_jax.training.phase import train_phase

log = logging.getLogger("frcnn_jax.training")


def train_and_evaluate(config, workdir, *, allow_model_change=False):
    """Train `config` in `workdir` (resuming if it has checkpoints), then evaluate.

    While it trains, the workdir is locked (`rundir.WorkdirLock`: a second run there stops at
    once). Resuming with a model that differs from the one the checkpoints were trained with
    (`rundir.MODEL_FIELDS`) is a `rundir.ModelChanged` error unless `allow_model_change`.
    Returns the final evaluation metrics (dict), or None when stopped by a signal.
    """
    workdir = pathlib.Path(workdir)
    train = config.train
    locked = jax.process_index() == 0  # one lock per run, held by its first process
    # the lock first: a run in progress saves and deletes checkpoints while they are listed
    with rundir.WorkdirLock(workdir) if locked else contextlib.nullcontext():
        checkpoints = checkpointing.Checkpoints(workdir, max_to_keep=train.keep_checkpoints)
        latest = checkpoints.latest_step()
        last_step = final_step(train)
        if train.budget_minutes:  # the last step is known once reached: the checkpoint says
            ended = latest is not None and checkpoints.meta(latest).get("budget_end_step")
            last_step = latest if ended == latest else None
        if latest is not None and last_step is not None and latest >= last_step:
            report = final_report(workdir, last_step)
            if report.is_file():
                log.info("already trained to step %d and evaluated: %s", last_step, report)
                print(f"already done: {report}", flush=True)
                return json.loads(report.read_text())
        if _has_checkpoints(workdir):
            rundir.check_model(workdir, config, allow_change=allow_model_change)
        return _train_and_evaluate(config, workdir, checkpoints)


def final_report(workdir, step):
    """The final evaluation's metrics of a run that ended at `step`."""
    return pathlib.Path(workdir) / "eval" / f"step_{step}" / "metrics.json"


def _has_checkpoints(workdir):
    return any(p.name.isdigit() for p in workdir.glob("checkpoints/*")) or any(
        p.name.isdigit() for p in workdir.glob("alternating/phase*/checkpoints/*")
    )


def _train_and_evaluate(config, workdir, checkpoints):
    train = config.train
    mesh = sharding.data_mesh()
    model = build_model(config)
    if train.scheme == "non_approximate_joint":  # gradients through RoIAlign into proposals
        model = model.clone(head=dataclasses.replace(model.head, proposal_gradients=True))
    _prepare_once(config.data)
    info = sources.open_split(config.data, config.data.train_split)[1]
    sources.check_class_count(config.model.num_classes, info, config.data)
    if jax.process_index() == 0:  # the config and class names: a workdir rebuilds its model
        rundir.write(workdir, config, info)
    writer = MetricWriter(workdir, enabled=jax.process_index() == 0)
    if train.scheme == "alternating":
        state = train_alternating(config, workdir, model, mesh, writer)
    else:
        state, tx = init_state(config, model)
        state = train_phase(
            config,
            model,
            mesh,
            jax.device_put(state, sharding.replicated(mesh)),
            tx,
            checkpoints,
            writer,
            num_steps=train.num_steps,
        )
    if state is None:
        writer.close()
        return None
    variables = {"params": state.params, **state.frozen}
    last_step = int(state.step)
    report = final_report(workdir, last_step).parent
    result = evaluate(config, model, variables, mesh, workdir=report, step=last_step)
    writer.write(last_step, flat_scalars(result), prefix="eval/")
    writer.close()
    print_result(config, result, report)
    return result


def _prepare_once(data):
    """Multi-host: process 0 prepares the dataset (TFDS writes files once), the others wait."""
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    if jax.process_index() == 0:
        sources.prepare_all(data)
    multihost_utils.sync_global_devices("frcnn_jax: dataset prepared")
