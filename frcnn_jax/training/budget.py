"""A schedule fitted to a time budget, in two parts.

Before the run, `python -m frcnn_jax.fit_budget` measures what the training loop costs on this
machine (`probe_run`) and fits `num_steps` and the decay points to the budget (`fit_schedule`)
as ordinary config fields: a first guess. A run with `train.budget_minutes` set then corrects
it as it goes (`Budget`): a machine's speed drifts by several percent between minutes (other
load, the loader's workers, thermal limits), more than a few minutes' probe can foresee, so the
run re-fits its remaining steps to the speed it sustains and its schedule (`optim.Stretched`)
ends when the budget does. Such a run reads the clock, so its number of steps depends on the
machine; without `budget_minutes` training never reads the clock.
"""

import contextlib
import dataclasses
import itertools
import logging
import math
import pathlib
import statistics
import tempfile
import time

import jax
import numpy as np

from frcnn_jax.training.optim import learning_rate_schedule, stretched_step

log = logging.getLogger(__name__)


class Budget:
    """Fits a run's remaining steps to `train.budget_minutes` of training-loop time while it
    runs (`training.phase.run_steps` calls it). At each progress record (every
    `train.log_every` steps) the seconds per step the loop sustained over its last `window`
    seconds (steps, waiting for data, logging, checkpoint saves, periodic evaluations) say how
    many steps the rest of the budget holds, and the optimizer's schedule (`optim.Stretched`)
    is re-fitted so that its remaining part, of `train.num_steps` schedule steps, ends there:
    the learning rate stays continuous and only its pace changes. A sitting's first record has
    no speed yet (compilation comes before it), so the schedule runs at its last fit until the
    second. The loop time of earlier sittings, up to their last checkpoint, comes from the
    checkpoint's metadata (`meta`): a resumed run fits what is left of the budget.

    `clock`: seconds (monotonic); `agree`: with several hosts, a function that makes every
    host use the first host's number (`sharding.first_host_value`), so all re-fit alike."""

    def __init__(self, train, *, clock=None, agree=None):
        self.seconds = 60.0 * float(train.budget_minutes)
        self.length = int(train.num_steps)  # the schedule's own steps
        self.schedule = learning_rate_schedule(train)
        self.window = max(60.0, self.seconds / 4)
        self.clock = clock or _now
        self.agree = agree or (lambda value: value)
        self.earlier = 0.0
        self.start = None
        self.records = []  # (step, loop seconds) of this sitting's progress records

    def begin(self, meta=None):
        """Start this sitting's clock; `meta`: the restored checkpoint's (None: a fresh run)."""
        self.earlier = float((meta or {}).get("budget_elapsed_s", 0.0))
        self.start = self.clock()
        self.records = []

    def elapsed(self):
        """Loop seconds since the run began: earlier sittings' and this one's."""
        return float(self.agree(self.earlier + self.clock() - self.start))

    def end(self, state, step):
        """The step at which `state`'s schedule ends (`step`: the state's step)."""
        stretch = state.opt_state
        left = self.length - float(stretched_step(stretch))
        rate = float(jax.device_get(stretch.rate))
        return step + (max(round(left / rate), 0) if rate > 0 and left > 0 else 0)

    def refit(self, state, step):
        """(`state` with its schedule re-fitted, the step the run now ends at; always after
        `step`), at a progress record written after `step`."""
        now = self.elapsed()
        earlier = [r for r in self.records if r[1] >= now - self.window] or self.records[-1:]
        self.records.append((step, now))
        if not earlier:  # the sitting's first record: no speed measured yet
            return state, max(self.end(state, step), step + 1)
        since_step, since_s = earlier[0]
        per_step = (now - since_s) / (step - since_step)
        steps = max(round((self.seconds - now) / per_step), 1)
        stretch = state.opt_state
        at = stretched_step(stretch)
        refit = stretch._replace(
            since=_like(stretch.since, stretch.count),
            at=_like(stretch.at, at),
            rate=_like(stretch.rate, max(self.length - float(at), 0.0) / steps),
        )
        return state.replace(opt_state=refit), step + steps

    def learning_rate(self, state):
        """The learning rate at `state` (its next update's; what a plain run's progress
        records show too: the schedule at the state's step)."""
        return float(self.schedule(stretched_step(state.opt_state)))

    def meta(self):
        """For the checkpoint saved now: the loop time so far."""
        return {"budget_elapsed_s": self.elapsed()}


def _now():
    return time.perf_counter()


def _like(leaf, value):
    """`value` as an array of `leaf`'s dtype and placement (a re-fit changes no shapes: the
    jitted step does not recompile)."""
    return jax.device_put(np.asarray(jax.device_get(value), leaf.dtype), leaf.sharding)


def time_steps(step, *, steps, warmup, block=lambda x: x):
    """Steps per second of `step()` (one training step; its result passed to `block`, which
    waits for it) over `steps` calls, after `warmup` untimed calls (compilation, caches)."""
    if steps < 1:
        raise ValueError(f"need at least one timed step, got {steps}")
    for _ in range(warmup):
        block(step())
    start = time.perf_counter()
    for _ in range(steps):
        block(step())
    return steps / (time.perf_counter() - start)


@dataclasses.dataclass(frozen=True)
class RunSpeed:
    """What the training loop of a config costs on this machine, measured by `probe_run`:
    `seconds(n, every)` is the wall time of a run of `n` steps saving every `every` steps, from
    the loop's start (compilation and the loader's start in its first step) to its last
    checkpoint written."""

    first_s: float  # the first step: compilation, the loader's workers starting
    step_s: float  # each further step, sustained: waiting for data and logging included
    save_s: float  # what one checkpoint save adds (its write competes with the steps)
    probed_steps: int
    uncertainty: float = 0.0  # the relative standard error of `step_s` (records' spread)

    def seconds(self, num_steps, checkpoint_every):
        saves = -(-num_steps // checkpoint_every)  # every `checkpoint_every` steps and the last
        return self.first_s + (num_steps - 1) * self.step_s + saves * self.save_s

    def steps_within(self, seconds, checkpoint_every):
        """The most steps whose run ends within `seconds` (at least 1)."""
        per_step = self.step_s + self.save_s / checkpoint_every
        steps = max(int((seconds - self.first_s + self.step_s) / per_step), 1)
        while steps > 1 and self.seconds(steps, checkpoint_every) > seconds:
            steps -= 1
        while self.seconds(steps + 1, checkpoint_every) <= seconds:
            steps += 1
        return steps


def probe_run(config, directory, *, seconds=120.0):
    """`RunSpeed` of `config`'s training as `python -m frcnn_jax.train` runs it: its training
    loop (`training.phase.train_phase`: the model, optimizer, loader and devices, progress
    records at the config's `log_every` and a checkpoint save, written to a temporary folder in
    `directory` and deleted afterwards) for about `seconds` after its compilation. A few steps
    timed first choose the probe's length."""
    import jax

    from frcnn_jax import checkpointing, sharding
    from frcnn_jax.models import build_model
    from frcnn_jax.training.initial import init_state
    from frcnn_jax.training.phase import train_phase

    fit_schedule(config.train, 1)  # an alternating scheme is named before anything runs
    config = config.copy_and_resolve_references()
    config.train.budget_minutes = 0  # the probe measures a plain run's steps
    rough = measure_steps_per_second(config, steps=5, warmup=2)
    steps = max(int(rough * seconds), 8)
    # The run's own logging cadence (each progress record waits for the steps before it; how
    # often that happens changes the speed of fast steps), unless the probe would then hold
    # fewer than 8 records (slow steps, where it does not matter).
    log_every = min(int(config.train.log_every), steps // 8)
    steps = -(-steps // log_every) * log_every
    # One checkpoint, at the end: its save, written before the loop returns, is timed alone.
    config.train.update(log_every=log_every, checkpoint_every=steps, num_steps=steps, eval_every=0)
    mesh = sharding.data_mesh()
    model = build_model(config)
    state, tx = init_state(config, model)
    timeline = _Timeline()
    pathlib.Path(directory).mkdir(parents=True, exist_ok=True)
    log.info("timing the training loop: %d steps, a progress record every %d", steps, log_every)
    training_log = logging.getLogger("frcnn_jax.training")
    level = training_log.level
    training_log.setLevel(logging.WARNING)  # the probe's progress lines are not the user's run
    with (
        tempfile.TemporaryDirectory(prefix="fit_budget_probe_", dir=directory) as workdir,
        contextlib.ExitStack() as restore,
    ):
        restore.callback(training_log.setLevel, level)
        checkpoints = checkpointing.Checkpoints(workdir, max_to_keep=1)
        timeline.start = time.perf_counter()
        train_phase(
            config,
            model,
            mesh,
            jax.device_put(state, sharding.replicated(mesh)),
            tx,
            checkpoints,
            timeline,
            num_steps=steps,
        )
        end = time.perf_counter()  # the last save written (train_phase waits for it)
    return _speed_from(timeline.times, timeline.start, end)


class _Timeline:
    """A metric writer that keeps only when each progress record was written."""

    def __init__(self):
        self.start, self.times = None, []

    def write(self, step, scalars, prefix=""):
        del prefix
        if "steps_per_s" in scalars:  # a progress record, not an evaluation
            self.times.append((int(step), time.perf_counter()))

    def close(self):
        pass


def _speed_from(times, start, end):
    """`RunSpeed` from the probe's progress records `times` [(step, seconds)] (evenly spaced,
    the last at the last step, each written before that step's checkpoint save), the loop's
    `start` and its `end` (the one checkpoint, after the last step, written). The sustained
    speed is the records' from the first quarter of the steps on (compilation, the loader's
    start and its first batches left out); the save is what the loop took after its last
    record: the whole write, which a periodic save of the run overlaps with its next steps
    (an upper bound)."""
    steps = times[-1][0]
    first = next(
        i for i, (step, _) in enumerate(times) if step >= steps // 4 or i == len(times) - 2
    )
    window = times[first:]
    (from_step, from_s), (to_step, to_s) = window[0], window[-1]
    step_s = (to_s - from_s) / (to_step - from_step)
    per_step = [(b[1] - a[1]) / (b[0] - a[0]) for a, b in itertools.pairwise(window)]
    spread = statistics.stdev(per_step) / math.sqrt(len(per_step)) if len(per_step) > 1 else 0.0
    save_s = end - to_s
    # the first step: the first record's time less its other steps at the sustained speed
    first_s = max(times[0][1] - start - (times[0][0] - 1) * step_s, step_s)
    return RunSpeed(first_s, step_s, save_s, steps, spread / step_s)


def measure_steps_per_second(config, *, steps=30, warmup=3):
    """Steps per second of `config`'s training step (its model, optimizer, loader and
    devices), timed over `steps` steps after `warmup` steps: the step alone, without the
    training loop's logging and checkpoint saves (`probe_run` measures those)."""
    import jax

    from frcnn_jax import sharding
    from frcnn_jax.data import make_batches
    from frcnn_jax.models import build_model
    from frcnn_jax.training.initial import init_state
    from frcnn_jax.training.step import jit_train_step

    mesh = sharding.data_mesh()
    model = build_model(config)
    state, tx = init_state(config, model)
    state = jax.device_put(state, sharding.replicated(mesh))
    step_fn = jit_train_step(model, tx, mesh)
    batches, _ = make_batches(
        config.data,
        config.data.train_split,
        batch_size=sharding.local_batch_size(config.train.batch_size, mesh),
        train=True,
        seed=config.train.seed,
    )
    key = jax.random.key(config.train.seed)

    def step():
        nonlocal state
        inputs = sharding.shard_batch(next(batches).inputs, mesh)
        state, metrics = step_fn(state, inputs, key, None)
        return metrics["loss"]

    with batches:
        return time_steps(step, steps=steps, warmup=warmup, block=jax.block_until_ready)


def fit_to_budget(train, seconds, steps_per_second):
    """`fit_schedule` for a run of `seconds` at a constant `steps_per_second`."""
    if seconds <= 0 or steps_per_second <= 0:
        raise ValueError(
            f"need a positive budget and speed, got {seconds} s at {steps_per_second} steps/s"
        )
    return fit_schedule(train, max(int(seconds * steps_per_second), 1))


def fit_schedule(train, num_steps):
    """`config.train` overrides (a dict) that make its schedule `num_steps` long: the decay
    steps at the same fractions of the run as in `train` (a decay at 3000 of 4000 steps moves
    to 75% of the fitted run; a cosine ends at `num_steps` by definition). The warm-up keeps
    its length (it is about the first updates, not the run's length) unless that is over half
    the run. The four-phase alternating scheme has its own per-phase fields and is not fitted."""
    if train.scheme == "alternating":
        raise ValueError(
            "fit_to_budget: config.train.scheme='alternating' has per-phase step counts "
            "(alternating_phase_steps); fit a joint scheme or set the phases by hand"
        )
    fraction = num_steps / train.num_steps
    return {
        "num_steps": num_steps,
        "lr_steps": tuple(max(1, round(s * fraction)) for s in train.lr_steps),
        "warmup_steps": min(int(train.warmup_steps), num_steps // 2),
    }


def as_flags(overrides):
    """The overrides as `python -m frcnn_jax.train` flags."""
    flags = []
    for field, value in overrides.items():
        if isinstance(value, tuple):
            value = "(" + "".join(f"{v}," for v in value) + ")"
        flags.append(f"--config.train.{field}={value}")
    return flags
