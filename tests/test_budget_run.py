"""A run with a time budget (`train.budget_minutes`, `training.budget.Budget`): it re-fits its
remaining steps to the speed it sustains and its schedule ends when the budget does. A fake
clock stands for the machine's, so every figure here is exact."""

import json
import os
import signal
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from frcnn_jax import checkpointing, training
from frcnn_jax.config import base_config
from frcnn_jax.training import budget, optim
from frcnn_jax.training.step import TrainState
from tests.tiny import tiny_config


def train_config(**fields):
    train = base_config().train
    train.update(
        num_steps=200,
        learning_rate=0.1,
        lr_schedule="cosine",
        warmup_steps=0,
        budget_minutes=5.0,
        **fields,
    )
    return train


def start(train):
    """A `TrainState` of one small parameter under `train`'s optimizer, and a jitted step that
    only applies a (zero) update: what a re-fit needs of a training run."""
    tx = optim.make_optimizer(train, {"w": {"kernel": True}})
    params = {"w": {"kernel": jnp.zeros((2,), jnp.float32)}}
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        frozen={},
        opt_state=tx.init(params),
        nonfinite_step=jnp.full((), -1, jnp.int32),
    )

    @jax.jit
    def step(state):
        zeros = jax.tree.map(jnp.zeros_like, state.params)
        _, opt_state = tx.update(zeros, state.opt_state, state.params)
        return state.replace(step=state.step + 1, opt_state=opt_state)

    return state, step


class Clock:
    """Seconds that move only when the test says so."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def run(train, seconds_per_step, *, log_every=10, clock=None, meta=None, state=None):
    """Simulate a run's loop as `phase.run_steps` drives its `Budget`: steps taking
    `seconds_per_step(step)` seconds, a progress record (and a re-fit) every `log_every`.
    Returns (the final state, the learning rates of the records, the budget)."""
    clock = clock or Clock()
    fresh, step_fn = start(train)
    state = state or fresh
    watch = budget.Budget(train, clock=clock)
    watch.begin(meta)
    step = int(state.step)
    end = watch.end(state, step)
    rates = []
    while step < end:
        state = step_fn(state)
        clock.now += seconds_per_step(step)
        step += 1
        if step % log_every == 0 or step == end:
            rates.append(watch.learning_rate(state))
            if step != end:
                state, end = watch.refit(state, step)
    return state, rates, watch


def test_the_run_ends_when_its_budget_does_however_its_speed_drifts():
    train = train_config()
    # 1 s per step for the first 100 steps, then 20% slower: 300 s hold 100 + 167 steps
    state, rates, watch = run(train, lambda step: 1.0 if step < 100 else 1.2)
    assert int(state.step) == 267
    assert abs(watch.elapsed() - 300.0) <= 1.2  # within a step of the budget
    # the schedule's 200 steps all ran: it ended at its final rate
    np.testing.assert_allclose(float(optim.stretched_step(state.opt_state)), 200.0, rtol=1e-5)
    assert rates[-1] == pytest.approx(0.0, abs=1e-6)
    # ... continuously: re-fits change the pace, never the rate itself
    steps = np.diff([0.1, *rates])
    assert np.all(steps <= 1e-7) and np.max(-steps) < 0.02


def test_a_fast_machine_runs_more_steps_and_a_slow_one_fewer():
    fast, _, _ = run(train_config(), lambda step: 0.5)
    slow, _, _ = run(train_config(), lambda step: 3.0)
    assert int(fast.step) == 600 and int(slow.step) == 100
    for state in (fast, slow):
        np.testing.assert_allclose(float(optim.stretched_step(state.opt_state)), 200, rtol=1e-5)


def test_the_first_record_of_a_sitting_keeps_the_last_fit():
    """Compilation comes before a sitting's first record: no speed is measured from it, so
    the schedule goes on at the pace it had (the config's, or the checkpoint's)."""
    train = train_config()
    state, _ = start(train)
    state = state.replace(step=10, opt_state=state.opt_state._replace(count=jnp.int32(10)))
    watch = budget.Budget(train, clock=Clock())
    watch.begin()
    watch.clock.now = 50.0  # a slow first record: compilation
    refit, end = watch.refit(state, 10)
    assert end == 200 and float(refit.opt_state.rate) == 1.0
    assert watch.end(refit, 10) == 200


def test_a_resumed_run_counts_the_time_of_earlier_sittings():
    """The checkpoint's `budget_elapsed_s` (`Budget.meta`) is where the next sitting's clock
    starts: 200 s of a 300 s budget spent, the rest at 1 s per step holds 100 more steps."""
    train = train_config()
    _, _, watch = run(train, lambda step: 1.0, log_every=10)
    assert watch.meta() == {"budget_elapsed_s": 300.0}  # what a checkpoint keeps
    # a run stopped at step 150 after 200 s, its schedule at its 100th step of 200
    state, _ = start(train)
    stretch = state.opt_state._replace(
        count=jnp.int32(150), since=jnp.int32(150), at=jnp.float32(100.0), rate=jnp.float32(1.0)
    )
    state = state.replace(step=jnp.int32(150), opt_state=stretch)
    resumed, _, watch = run(
        train, lambda step: 1.0, clock=Clock(), meta={"budget_elapsed_s": 200.0}, state=state
    )
    assert int(resumed.step) == 250 and watch.elapsed() == pytest.approx(300.0)
    np.testing.assert_allclose(float(optim.stretched_step(resumed.opt_state)), 200, rtol=1e-5)


def test_an_overspent_budget_ends_the_run_at_the_next_step():
    train = train_config()
    state, _, watch = run(train, lambda step: 1.0 if step < 20 else 100.0)
    assert watch.elapsed() <= 300 + 100 * 10  # at most one record's steps past the budget
    assert int(state.step) < 40


@pytest.mark.slow  # whole trainings
def test_a_budgeted_training_ends_on_its_clock_resumes_and_refuses_to_go_on_without_it(
    data_dir, tmp_path, monkeypatch
):
    """`python -m frcnn_jax.train` with `train.budget_minutes`: the clock (faked: a second per
    reading, one at each progress record and checkpoint save) decides the last step; a run
    stopped by SIGTERM resumes with its time so far; the final evaluation is the last step's, a
    rerun is done at once, and going on without the budget (another optimizer state) is an
    error that names it, the checkpoints kept."""
    assert threading.current_thread() is threading.main_thread()  # SIGTERM reaches the loop
    readings = []

    def tick():
        readings.append(None)
        if len(readings) == 9:  # the first sitting: stopped after step 8
            os.kill(os.getpid(), signal.SIGTERM)
        return float(len(readings))

    monkeypatch.setattr(budget, "_now", tick)
    # a progress record and a save every 2 steps: 1 s per step, so the 24 s of budget hold
    # about 24 steps, over which the schedule's 6 are stretched
    config = tiny_config(data_dir, budget_minutes=0.4, num_steps=6, lr_schedule="cosine")
    workdir = tmp_path / "run"
    assert training.train_and_evaluate(config, workdir) is None  # stopped
    checkpoints = checkpointing.Checkpoints(workdir)
    stopped = checkpoints.latest_step()
    spent = checkpoints.meta(stopped)["budget_elapsed_s"]
    assert stopped == 8 and spent == 8.0  # the readings before the save at step 8
    result = training.train_and_evaluate(config, workdir)
    checkpoints = checkpointing.Checkpoints(workdir)  # the steps as they are now
    last = checkpoints.latest_step()
    meta = checkpoints.meta(last)
    # re-fitted at step 8 from 1 s per step: 17 more steps; the second sitting's first record
    # keeps that fit, its later ones find the same speed
    assert last == 25 and meta["budget_end_step"] == 25
    assert meta["budget_elapsed_s"] == 8.0 + 17.0  # the first sitting's seconds counted
    assert (workdir / "eval" / f"step_{last}" / "metrics.json").is_file()
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["train/learning_rate"] for r in records if "train/learning_rate" in r]
    assert rates[-1] == pytest.approx(0.0, abs=1e-6) and rates == sorted(rates, reverse=True)

    assert training.train_and_evaluate(config, workdir) == result  # done: nothing trained
    assert checkpoints.latest_step() == last

    unbudgeted = tiny_config(data_dir, num_steps=last + 4, lr_schedule="cosine")
    with pytest.raises(checkpointing.TensorMismatch, match="is intact but does not fit"):
        training.train_and_evaluate(unbudgeted, workdir)  # its optimizer state has no stretch
    assert checkpoints.all_steps()[-1] == last  # nothing set aside
    assert not (workdir / "checkpoints_damaged").exists()
