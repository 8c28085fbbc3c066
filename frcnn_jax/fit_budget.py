"""python -m frcnn_jax.fit_budget --config configs/<name>.py --minutes 20 [--config.a.b=value ...]

Measures this machine's training speed for the config (its model, loader and devices; a few
dozen steps after compilation) and prints the `python -m frcnn_jax.train` overrides that make
the schedule (number of steps, decay points) end when the training budget is spent. Training
itself never reads the clock, so the fitted run stays deterministic and resumable; evaluation
and checkpoint saves are not part of the budget.
"""

from absl import app, flags

from frcnn_jax import cli

FLAGS = flags.FLAGS


def define_flags():
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
    flags.DEFINE_float("minutes", None, "Training budget in minutes.")
    flags.DEFINE_integer("steps", 30, "Steps to time (after a few untimed ones).")
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
    speed = budget.measure_steps_per_second(config, steps=FLAGS.steps)
    overrides = budget.fit_to_budget(config.train, 60 * FLAGS.minutes, speed)
    batch, minutes = config.train.batch_size, FLAGS.minutes
    print(
        f"measured {speed:.3f} steps/s over {FLAGS.steps} steps (batch {batch}); "
        f"for {minutes:g} minutes of training:"
    )
    print(" ".join(budget.as_flags(overrides)), flush=True)


if __name__ == "__main__":
    define_flags()
    cli.run(main)
