"""One training phase: steps from the latest checkpoint to `num_steps`, with periodic
checkpoints (and the loader's position), progress, optional evaluation, and a clean stop on
SIGTERM / Ctrl-C. Joint training is one phase; alternating training four. `run_steps` is the
loop itself, which classification pretraining (`frcnn_jax.pretraining`) runs too."""

import functools
import logging
import signal
import time

import jax
import numpy as np

from frcnn_jax import checkpointing, sharding
from frcnn_jax.data import make_batches
from frcnn_jax.errors import UserError
from frcnn_jax.training.budget import Budget
from frcnn_jax.training.evaluation import evaluate
from frcnn_jax.training.metrics import duration, flat_scalars, log_progress
from frcnn_jax.training.step import jit_train_step

log = logging.getLogger("frcnn_jax.training")


def train_phase(
    config,
    model,
    mesh,
    state,
    tx,
    checkpoints,
    writer,
    *,
    num_steps,
    objective="joint",
    proposer=None,
    seed_offset=0,
    name="",
    lr_fn=None,
    trainable=None,
):
    """Run detector training steps until `num_steps` from the latest checkpoint in
    `checkpoints` (or `state`), saving periodically; returns the final state, or None when
    stopped by a signal. `lr_fn` is the phase's learning-rate schedule, for the logs;
    `trainable` the parameters it trains (`step.train_step`; None: all). With
    `train.budget_minutes` the run ends when the budget does (`budget.Budget`), `num_steps`
    being its schedule's length."""
    train = config.train
    batches, info = make_batches(
        config.data,
        config.data.train_split,
        batch_size=sharding.local_batch_size(train.batch_size, mesh),
        train=True,
        seed=train.seed + seed_offset,
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
        agree=sharding.hosts_agree(),
    )
    step_fn = jit_train_step(model, tx, mesh, objective=objective, trainable=trainable)
    key = jax.random.key(train.seed + seed_offset)

    def step(state, batch):
        return step_fn(state, sharding.shard_batch(batch.inputs, mesh), key, proposer)

    def periodic_evaluation(state, step):
        variables = {"params": state.params, **state.frozen}
        result = evaluate(config, model, variables, mesh, split=config.eval.periodic_split)
        writer.write(step, flat_scalars(result), prefix=f"eval/{name}")

    return run_steps(
        train,
        state,
        step,
        batches,
        checkpoints,
        writer,
        num_steps=num_steps,
        meta={"seed": train.seed, "num_steps": num_steps, "classes": list(info.class_names)},
        name=name,
        lr_fn=lr_fn,
        periodic=periodic_evaluation if train.eval_every else None,
        budget=Budget(train, agree=sharding.first_host_value()) if train.budget_minutes else None,
    )


def run_steps(
    train,
    state,
    step_fn,
    batches,
    checkpoints,
    writer,
    *,
    num_steps,
    meta,
    name="",
    lr_fn=None,
    periodic=None,
    budget=None,
):
    """The training loop every trainer shares (the detector's phases, `frcnn_jax.pretraining`):
    `state = step_fn(state, next(batches))` until step `num_steps`, from the latest checkpoint
    in `checkpoints` (parameters, optimizer and the loader's position) or `state`. Progress and
    metrics every `train.log_every` steps, a checkpoint every `train.checkpoint_every`,
    `periodic(state, step)` every `train.eval_every`; a non-finite loss stops it naming the
    step (`NonFinite`); SIGTERM / Ctrl-C save and return None. A `budget.Budget` moves the
    end (`num_steps` is then the schedule's length) at each progress record. Closes
    `batches`."""
    restored = checkpoints.restore_latest(checkpointing.abstract_like(state))
    saved = None
    if restored is not None:
        latest, state, loader_state, saved = restored
        batches.set_state(loader_state)
        log.info("resumed from %s at step %d", checkpoints.directory, latest)
    step = int(state.step)
    pending, start, start_step = [], time.perf_counter(), step
    if budget is not None:
        budget.begin(saved)
        num_steps = budget.end(state, step)
    with batches, _Stop() as stop:  # the loader's workers end with the loop
        while step < num_steps:
            state, metrics = step_fn(state, next(batches))
            pending.append(metrics)
            step += 1
            last = step == num_steps
            if step % train.log_every == 0 or last or stop.requested:
                _check_finite(state, pending, checkpoints)
                if budget is not None:
                    lr_fn = functools.partial(_constant, budget.learning_rate(state))
                log_progress(
                    step, num_steps, train, pending, start, start_step, writer, name, lr_fn
                )
                pending = []
                if budget is not None and not (last or stop.requested):
                    state, num_steps = budget.refit(state, step)
            if step % train.checkpoint_every == 0 or last or stop.requested:
                _check_finite(state, pending, checkpoints)
                extra = {} if budget is None else {**budget.meta(), "budget_end_step": num_steps}
                checkpoints.save(step, state, batches.get_state(), {**meta, **extra})
            if stop.requested:
                checkpoints.wait()
                log.warning("stopped at step %d; rerun the same command to resume", step)
                return None
            if periodic is not None and train.eval_every and step % train.eval_every == 0:
                if not last:
                    periodic(state, step)
    checkpoints.wait()
    if step > start_step:  # the loop's wall time: what `python -m frcnn_jax.fit_budget` fits
        seconds = time.perf_counter() - start
        writer.write(step, {"loop_s": seconds}, prefix=f"train/{name}")
        log.info(
            "%strained steps %d-%d in %s (compilation, checkpoint saves and periodic "
            "evaluations included)",
            name,
            start_step + 1,
            step,
            duration(seconds),
        )
    return state


def _constant(value, step):
    del step
    return value


class NonFinite(UserError, FloatingPointError):
    """Training met a non-finite loss or gradient (a learning rate too high, bad input) at
    `step`, whose update was skipped."""

    def __init__(self, message, step=None):
        super().__init__(message)
        self.step = step


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


def _check_finite(state, pending, checkpoints):
    bad = int(state.nonfinite_step)
    if bad < 0:
        return
    terms = {}
    for metrics in pending:
        values = jax.device_get(metrics)
        if not np.isfinite(values["loss"]) or not np.isfinite(values["grad_norm"]):
            terms = {k: float(v) for k, v in values.items()}
            break
    checkpoints.wait()
    raise NonFinite(
        f"non-finite loss or gradient at step {bad} (loss terms: {terms or 'see metrics.jsonl'});"
        f" that update was skipped and training stopped; the last good checkpoint is step "
        f"{checkpoints.latest_step()} in {checkpoints.directory}",
        step=bad,
    )
