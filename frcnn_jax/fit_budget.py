"""python -m frcnn_jax.fit_budget --config configs/<name>.py --minutes 20 [--config.a.b=value ...]

Measures what the config's training costs on this machine and prints the `python -m
frcnn_jax.train` overrides (number of steps, decay points, and `train.budget_minutes`) that
make its schedule end when the budget is spent. The measurement runs the training loop itself
for about `--probe_minutes` (the model, optimizer, loader and devices, progress logging at the
config's log_every and a checkpoint save), so the budget is the loop's wall time: compilation,
steps, waiting for data, logging and checkpoint saves. Building the model before it and the
final evaluation are not in it.

The fitted steps are the run's first guess: a machine's speed drifts by more than a probe can
foresee, so the run, with `train.budget_minutes`, re-fits its remaining steps to the speed it
sustains (`frcnn_jax.training.budget.Budget`) and ends when the budget does. Drop that flag
for a run of exactly the fitted steps (deterministic: it never reads the clock).
"""

import tempfile

from absl import app, flags

from frcnn_jax import cli

FLAGS = flags.FLAGS


def define_flags():
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
    flags.DEFINE_float("minutes", None, "Training budget in minutes.")
    flags.DEFINE_float(
        "probe_minutes",
        3.0,
        "How long to run the training loop to measure it (after compiling): the speed of a "
        "loop that shares its CPU with the loader's workers wanders by several percent "
        "from minute to minute; the printed standard error says how closely it was measured.",
    )
    flags.DEFINE_string(
        "probe_dir",
        None,
        "Where the measurement writes (and then deletes) its checkpoints; the file system your "
        "run will write to (default: the system's temporary folder).",
    )
    flags.mark_flags_as_required(["config", "minutes"])


def main(argv):
    del argv
    cli.start()
    from frcnn_jax.config import check_config
    from frcnn_jax.training import budget

    config = FLAGS.config
    check_config(config)
    if FLAGS.minutes <= 0:
        raise app.UsageError(f"--minutes must be > 0, got {FLAGS.minutes}")
    if FLAGS.probe_minutes <= 0:
        raise app.UsageError(f"--probe_minutes must be > 0, got {FLAGS.probe_minutes}")
    try:
        budget.fit_schedule(config.train, 1)
    except ValueError as error:
        raise app.UsageError(str(error)) from error
    speed = budget.probe_run(
        config, FLAGS.probe_dir or tempfile.gettempdir(), seconds=60 * FLAGS.probe_minutes
    )
    every = config.train.checkpoint_every
    num_steps = speed.steps_within(60 * FLAGS.minutes, every)
    overrides = {**budget.fit_schedule(config.train, num_steps), "budget_minutes": FLAGS.minutes}
    print(
        f"measured {1 / speed.step_s:.3f} steps/s sustained over {speed.probed_steps} steps of "
        f"the training loop (batch {config.train.batch_size}; first step {speed.first_s:.1f} s, "
        f"{speed.save_s:.2f} s per checkpoint save; the speed's standard error "
        f"{100 * speed.uncertainty:.1f}%: a longer --probe_minutes narrows it)"
    )
    print(
        f"{num_steps} steps with a checkpoint every {every} end "
        f"{speed.seconds(num_steps, every) / 60:.2f} minutes after training starts, for "
        f"{FLAGS.minutes:g} minutes of training"
        + (
            "; evaluations every train.eval_every steps add their own time (budget_minutes "
            "counts them)"
            if config.train.eval_every
            else ""
        )
        + " (budget_minutes: the run re-fits them to the speed it sustains):"
    )
    print(" ".join(budget.as_flags(overrides)), flush=True)


if __name__ == "__main__":
    define_flags()
    cli.run(main)
