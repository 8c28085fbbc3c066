"""A schedule fitted to a time budget: measure steps per second once, then fix `num_steps` and
the decay points as ordinary config fields.

Training never reads the clock: the fitted numbers go into the config (and so into run.json),
so a fitted run is as deterministic and resumable as any other. `python -m
frcnn_jax.fit_budget` prints them as command-line overrides.
"""

import time


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


def measure_steps_per_second(config, *, steps=30, warmup=3):
    """Steps per second of `config`'s training as `python -m frcnn_jax.train` runs it (its
    model, optimizer, loader and devices), timed over `steps` steps after `warmup` steps.
    Evaluation and checkpoint saves are not included."""
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
    """`config.train` overrides (a dict) that make its schedule end after `seconds` of
    training at `steps_per_second`: `num_steps` for the budget and the decay steps at the same
    fractions of the run as in `train` (a decay at 3000 of 4000 steps moves to 75% of the
    fitted run; a cosine ends at `num_steps` by definition). The warm-up keeps its length (it
    is about the first updates, not the run's length) unless that is over half the run.
    The four-phase alternating scheme has its own per-phase fields and is not fitted."""
    if train.scheme == "alternating":
        raise ValueError(
            "fit_to_budget: config.train.scheme='alternating' has per-phase step counts "
            "(alternating_phase_steps); fit a joint scheme or set the phases by hand"
        )
    if seconds <= 0 or steps_per_second <= 0:
        raise ValueError(
            f"need a positive budget and speed, got {seconds} s at {steps_per_second} steps/s"
        )
    num_steps = max(int(seconds * steps_per_second), 1)
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
