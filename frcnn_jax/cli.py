"""What the command-line entry points share: the --config/--workdir flags, start-up and logging.

Entry points define their flags under `if __name__ == "__main__"` and call `start()` first in
`main()`: importing one (from a notebook, a test or another program) defines no flag and
changes nothing in the process."""

import logging
import pathlib
import re
import signal

from absl import flags
from absl.app import UsageError
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


def run(main, tune_cpu=True):
    """`absl.app.run(main)` for a command: a user error (`frcnn_jax.errors.UserError`, a bad
    flag, a usage error) ends it with one line, `error: ...`, on stderr and exit status 1; any
    other exception is a programming error and keeps its traceback. SIGTERM exits cleanly.
    `tune_cpu`: the CPU tuning of `frcnn_jax.runtime` first, before the flags load the config
    file (which imports JAX), so that where the allocator setting re-executes the process it
    restarts one that has imported little (`start()`, first in `main()`, then finds it done);
    False for a command that runs no JAX computation."""
    from absl import app

    from frcnn_jax import errors

    def parse(argv):
        _check_config_file(argv)
        try:
            return flags.FLAGS(argv)
        except flags.Error as e:
            raise SystemExit(f"error: {_one_line(e)}") from None
        except (AttributeError, KeyError) as e:  # ml_collections: an override's unknown field
            unknown = _unknown_override(e, argv)
            if unknown is None:
                raise  # an error in the config file's own code: its traceback helps
            raise SystemExit(f"error: {unknown}") from None

    def guarded(argv):
        try:
            return main(argv)
        except (errors.UserError, app.UsageError) as e:
            raise SystemExit(f"error: {_one_line(e)}") from None

    exit_on_sigterm()
    if tune_cpu:
        from frcnn_jax.runtime import configure_runtime

        configure_runtime()
    app.run(guarded, flags_parser=parse)


def exit_on_sigterm():
    """Let SIGTERM end this process through Python's cleanup, as Ctrl-C does (the commands and
    the long experiment scripts): without it the process dies at once and its loaders' worker
    semaphores and shared memory are left behind."""
    signal.signal(signal.SIGTERM, _exit_on_sigterm)


def _exit_on_sigterm(signum, frame):
    """SIGTERM outside training's own handler (which saves a checkpoint first): exit as
    Ctrl-C would, through Python's cleanup (open loaders closed, their shared memory freed),
    with the shell's status for it, 128 + 15."""
    del frame
    logging.getLogger("frcnn_jax").warning("received signal %d: stopping", signum)
    raise SystemExit(128 + signum)


def _one_line(error):
    return " ".join(str(error).split())


def _check_config_file(argv):
    """--config names a file that exists (ml_collections would report a missing one later, in
    a traceback)."""
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith("--config="):
            value = arg.split("=", 1)[1]
        else:
            continue
        path = value if pathlib.Path(value).is_file() else value.split(":", 1)[0]  # FILE:ARG
        if not pathlib.Path(path).is_file():
            raise SystemExit(f"error: --config: no such file {path}")


def _unknown_override(error, argv):
    """The message for `error` (a KeyError / AttributeError from ml_collections) when it names
    a field of a --config.a.b=value override; None otherwise."""
    message = str(error)
    for override in (a.split("=", 1)[0] for a in argv if a.startswith("--config.")):
        for field in reversed(override.split(".")[1:]):
            if re.search(rf"\b{re.escape(field)}\b", message.split("Did you mean")[0]):
                hint = re.search(r'Did you mean "(\w+)"', message)
                return f"{override}: the config has no field {field!r}" + (
                    f" (did you mean {hint.group(1)!r}?)" if hint else ""
                )
    return None


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
        raise UsageError(f"--canvas must be H,W (two positive integers), got {','.join(values)}")
    return int(values[0]), int(values[1])
