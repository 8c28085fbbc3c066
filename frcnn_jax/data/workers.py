"""grain's worker processes: they end with the loader's process (`exit_with_owner`), leave
SIGINT / SIGTERM to it, and need absl's flags parsed (`grain_flags_ready`)."""

import os
import signal
import threading
import time

from absl import flags

_watching = False  # this process runs the watch thread (at most one per worker process)


def exit_with_owner(owner):
    """Start (once per process) a thread that ends this worker process within a second of the
    loader's process `owner` ending, however it ended: grain's workers otherwise outlive a
    trainer killed with SIGKILL, holding their memory. The worker also ignores SIGINT and
    SIGTERM (`leave_stop_signals_to_owner`)."""
    global _watching
    if _watching:
        return
    _watching = True
    leave_stop_signals_to_owner()

    def watch():
        while alive(owner) and os.getppid() != 1:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, name="frcnn_jax-owner-watch", daemon=True).start()


def leave_stop_signals_to_owner():
    """Ignore SIGINT and SIGTERM in this worker process: Ctrl-C in a terminal, or `timeout`,
    signals the whole process group, and a worker that died of it would leave the owner's
    loader half closed (its shared memory to Python's resource tracker, a traceback per
    worker). The owner handles the signal (a checkpoint, then the loader closes its workers);
    a SIGKILLed owner still ends them (`exit_with_owner`)."""
    if threading.current_thread() is not threading.main_thread():
        return  # only a process's main thread sets handlers
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


def watch_owner(owner):
    """Called by a transform in each example: in a grain worker (any process but `owner`, the
    loader's), make this process end with the owner (`exit_with_owner`)."""
    if os.getpid() != owner:
        exit_with_owner(owner)


def alive(pid):
    """Whether process `pid` runs (a zombie, dead but not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc (not Linux): ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def grain_flags_ready():
    """Mark absl's flags parsed (with their defaults) when nothing has parsed them, as in a
    notebook or a test: grain reads its settings from absl's process-wide flags whenever it
    starts or restarts worker processes, and fails on unparsed flags. The entry points parse
    flags themselves (absl.app), so for them this does nothing."""
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
