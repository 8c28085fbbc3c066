"""What the command-line entry points share: the --config/--workdir flags, start-up and logging.

Entry points define their flags under `if __name__ == "__main__"` and call `start()` first in
`main()`: importing one (from a notebook, a test or another program) defines no flag and
changes nothing in the process."""

import contextlib
import logging

from absl import flags
from ml_collections import config_flags


def define_config_and_workdir(workdir_help):
    """--config (a configs/*.py file, locked after parsing: overriding a field it does not have
    is an error naming the field) and --workdir; both required."""
    config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
    flags.DEFINE_string("workdir", None, workdir_help)
    flags.mark_flags_as_required(["config", "workdir"])


def define_allow_model_change():
    flags.DEFINE_bool(
        "allow_model_change",
        False,
        "Use the workdir's checkpoints with a model that differs from the one they were "
        "trained with (run.json): by default that is an error naming the field.",
    )


@contextlib.contextmanager
def clear_errors():
    """The faults a user can fix (another run in the workdir, a changed model, a full disk, a
    checkpoint that does not fit) end the command with their message, not a traceback."""
    from frcnn_jax import checkpointing, rundir

    try:
        yield
    except (
        rundir.WorkdirInUse,
        rundir.ModelChanged,
        checkpointing.DiskFull,
        checkpointing.TensorMismatch,
    ) as e:
        raise SystemExit(f"error: {e}") from None


def start():
    """An entry point's first step: the CPU tuning of `frcnn_jax.runtime` (before JAX starts),
    then logging."""
    from frcnn_jax.runtime import configure_runtime

    configure_runtime()
    setup_logging()


def setup_logging():
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("absl").setLevel(logging.ERROR)  # TFDS's per-call notices


def canvas(values):
    """A --canvas flag's ["H", "W"] as (H, W); None when not given."""
    if not values:
        return None
    if len(values) != 2 or not all(v.strip().isdigit() and int(v) > 0 for v in values):
        raise ValueError(f"--canvas must be H,W (two positive integers), got {','.join(values)}")
    return int(values[0]), int(values[1])
