"""A schedule fitted to a time budget: measure what the training loop costs on this machine
once (`probe_run`), then fix `num_steps` and the decay points as ordinary config fields.

Training never reads the clock: the fitted numbers go into the config (and so into run.json),
so a fitted run is as deterministic and resumable as any other. `python -m
frcnn_jax.fit_budget` prints them as command-line overrides.
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

log = logging.getLogger(__name__)


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
    rough = measure_steps_per_second(config, steps=5, warmup=2)
    config = config.copy_and_resolve_references()
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
