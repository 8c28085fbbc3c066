"""Run directories under real faults: a damaged latest checkpoint, a full disk, a changed
model, two runs on one workdir, a killed trainer's workers, other device counts."""

import errno
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from frcnn_jax import checkpointing, errors, rundir, training
from frcnn_jax.data import sources
from frcnn_jax.data.workers import alive
from frcnn_jax.models import build_model
from tests.tiny import ROOT, run_train, tiny_config, write_config_file

sys.path.insert(0, str(ROOT / "experiments"))
from soak import descendants  # experiments/soak.py: the /proc walk, kept in one place

pytestmark = pytest.mark.slow  # whole trainings and subprocess runs


def config(data_dir, **train):
    return tiny_config(data_dir, keep_checkpoints=5, **train)


def final_params(workdir, step=6):
    return jax.tree.leaves(checkpointing.Checkpoints(workdir).restore_variables(step)["params"])


def assert_same(a, b):
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def straight(data_dir, tmp_path_factory):
    """An uninterrupted 6-step run (checkpoints at 2, 4, 6)."""
    workdir = tmp_path_factory.mktemp("straight")
    training.train_and_evaluate(config(data_dir, num_steps=6), workdir)
    return workdir


@pytest.fixture(scope="module")
def four_steps(data_dir, tmp_path_factory):
    """A run stopped after 4 steps (checkpoints at 2 and 4), to copy and damage."""
    workdir = tmp_path_factory.mktemp("four")
    training.train_and_evaluate(config(data_dir, num_steps=4), workdir)
    return workdir


def flip(path, count=64):
    """Invert `count` bytes in the middle of `path` (a failing disk's or a bad copy's damage)."""
    data = bytearray(path.read_bytes())
    start = max(0, len(data) // 2 - count // 2)
    for i in range(start, min(len(data), start + count)):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def damage(workdir, how):
    """Damage the largest data file of the step-4 checkpoint's arrays: "flipped" (64 bytes in
    its middle inverted), "truncated" (to half) or "removed"."""
    files = [p for p in (workdir / "checkpoints" / "4" / "state").rglob("*") if p.is_file()]
    largest = max(files, key=lambda p: p.stat().st_size)
    if how == "removed":
        largest.unlink()
    elif how == "flipped":
        flip(largest)
    else:
        largest.write_bytes(largest.read_bytes()[: largest.stat().st_size // 2])


def test_a_damaged_latest_checkpoint_is_set_aside_and_the_run_resumes_before_it(
    data_dir, straight, four_steps, tmp_path, caplog
):
    workdir = tmp_path / "run"
    shutil.copytree(four_steps, workdir)
    damage(workdir, "flipped")
    training.train_and_evaluate(config(data_dir, num_steps=6), workdir)
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "frcnn_jax.checkpointing"]
    assert "checkpoint step 4" in warning and "checkpoints_damaged" in warning
    assert "SHA-256 differs" in warning
    assert (workdir / "checkpoints_damaged" / "4" / "state").is_dir()  # kept, not deleted
    assert checkpointing.Checkpoints(workdir).all_steps() == [2, 4, 6]  # 4 trained again
    assert_same(final_params(workdir), final_params(straight))


@pytest.mark.parametrize("how", ["truncated", "removed"])
def test_a_truncated_or_removed_file_is_damage_too(data_dir, four_steps, tmp_path, how):
    workdir = tmp_path / "run"
    shutil.copytree(four_steps, workdir)
    damage(workdir, how)
    state, _ = training.initial.init_state(config(data_dir), build_model(config(data_dir)))
    step, *_ = checkpointing.Checkpoints(workdir).restore_latest(checkpointing.abstract_like(state))
    assert step == 2 and (workdir / "checkpoints_damaged" / "4").is_dir()


def test_a_flipped_byte_in_any_file_of_a_checkpoint_is_found(data_dir, four_steps, tmp_path):
    """Each file of the step-4 checkpoint in turn, 64 bytes in its middle inverted: restoring
    sets the step aside (naming the file) and takes step 2. The only exceptions are Orbax's
    `UNCHECKED` files, which a restore never reads: it then gives exactly the intact state."""
    source = four_steps / "checkpoints" / "4"
    names = sorted(str(p.relative_to(source)) for p in source.rglob("*") if p.is_file())
    assert checkpointing.CHECKSUMS in names and len(names) > 10
    state, _ = training.initial.init_state(config(data_dir), build_model(config(data_dir)))
    abstract = checkpointing.abstract_like(state)
    intact = checkpointing.Checkpoints(four_steps).restore(4, abstract)
    missed = []
    for name in names:
        workdir = tmp_path / name.replace("/", "_")
        shutil.copytree(four_steps / "checkpoints", workdir / "checkpoints")
        flip(workdir / "checkpoints" / "4" / name, count=min(64, (source / name).stat().st_size))
        checkpoints = checkpointing.Checkpoints(workdir)
        step, *restored = checkpoints.restore_latest(abstract)
        checkpoints.close()
        if name in checkpointing.UNCHECKED:
            assert step == 4, name
            assert_same(jax.tree.leaves(restored), jax.tree.leaves(intact))
        elif step != 2 or not (workdir / "checkpoints_damaged" / "4").is_dir():
            missed.append(name)
    assert not missed, f"damage not found in {missed}"


def test_a_restored_checkpoint_is_verified_and_the_error_names_the_file(four_steps, tmp_path):
    shutil.copytree(four_steps, tmp_path / "run")
    damage(tmp_path / "run", "flipped")
    with pytest.raises(errors.DamagedFile, match=r"checkpoint step 4: .*/state/.* SHA-256"):
        checkpointing.Checkpoints(tmp_path / "run").restore_variables(4)
    checkpointing.Checkpoints(tmp_path / "run").restore_variables(2)  # the others are intact


def test_a_full_disk_stops_the_run_with_a_message_and_a_rerun_resumes(
    data_dir, straight, tmp_path, monkeypatch
):
    save = ocp.CheckpointManager.save

    def full_disk(self, step, *args, **kwargs):
        if step >= 4:  # as an asynchronous write would report it: wrapped
            try:
                raise OSError(errno.ENOSPC, "No space left on device")
            except OSError as e:
                raise RuntimeError("checkpoint write failed") from e
        return save(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", full_disk)
    with pytest.raises(checkpointing.DiskFull) as error:
        training.train_and_evaluate(config(data_dir, num_steps=6), tmp_path)
    message = str(error.value)
    assert "no space left on the device while saving checkpoint step 4" in message
    assert "previous checkpoint (step 2) is intact" in message
    assert checkpointing.Checkpoints(tmp_path).all_steps() == [2]
    monkeypatch.setattr(ocp.CheckpointManager, "save", save)  # space freed
    training.train_and_evaluate(config(data_dir, num_steps=6), tmp_path)
    assert_same(final_params(tmp_path), final_params(straight))


def test_a_changed_model_is_named_and_can_be_allowed(data_dir, straight, tmp_path):
    changed = config(data_dir, num_steps=6)
    changed.model.rpn.channels = 16  # the run's: 32
    with pytest.raises(rundir.ModelChanged, match=r"config.model.rpn.channels is 16 here but 32"):
        training.evaluate_checkpoint(changed, straight)
    longer = config(data_dir, num_steps=8)
    longer.model.rpn.channels = 16
    with pytest.raises(rundir.ModelChanged, match="--allow_model_change"):
        training.train_and_evaluate(longer, straight)  # resuming
    mismatch = r"tensor params/rpn_head/\S+ is shape \(.*\) in the checkpoint and shape \(.*\) in"
    with pytest.raises(checkpointing.TensorMismatch, match=mismatch):
        training.evaluate_checkpoint(changed, straight, allow_model_change=True)
    free = config(data_dir, num_steps=6)
    free.model.rpn.test_post_nms_top_n = 20  # a test-time setting may change
    assert training.evaluate_checkpoint(free, straight)["voc"] is not None

    # another optimizer: the checkpoint is intact and kept, the error names the likely fields
    copy = shutil.copytree(straight, tmp_path / "adamw")
    adamw = config(data_dir, num_steps=8, optimizer="adamw")
    with pytest.raises(checkpointing.TensorMismatch, match=r"intact but does not fit.*optimizer"):
        training.train_and_evaluate(adamw, copy)
    assert checkpointing.Checkpoints(copy).all_steps()[-1] == 6
    assert not (copy / "checkpoints_damaged").exists()

    config_file = write_config_file(tmp_path / "cfg.py", data_dir)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "frcnn_jax.evaluate",
            f"--config={config_file}",
            f"--workdir={straight}",
            "--config.model.rpn.channels=16",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert done.returncode != 0
    assert "error: config.model.rpn.channels is 16 here but 32" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_second_run_refuses_and_a_killed_run_leaves_no_workers_or_lock(data_dir, tmp_path):
    config_file = write_config_file(
        tmp_path / "cfg.py", data_dir, "c.train.num_steps = 100000\nc.data.workers = 2\n"
    )
    workdir = tmp_path / "run"
    first = run_train(config_file, workdir, wait=False)
    deadline = time.time() + 300
    while not (workdir / "checkpoints" / "2").is_dir() and time.time() < deadline:
        time.sleep(0.1)
    assert first.poll() is None, first.stdout.read()
    second = run_train(config_file, workdir)
    assert second.returncode != 0
    assert f"in use by another run (process {first.pid} on" in second.stderr
    assert "Traceback" not in second.stderr

    workers = descendants(first.pid)
    assert len(workers) >= 2, workers  # grain's worker processes
    first.send_signal(signal.SIGKILL)
    first.wait()
    deadline = time.time() + 10
    while any(alive(pid) for pid in workers) and time.time() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in workers if alive(pid)]
    assert (workdir / ".lock").is_file()  # the dead run's file is left ...
    with rundir.WorkdirLock(workdir):  # ... and blocks nothing
        pass


_FLAGS = os.environ.get("XLA_FLAGS", "")  # the tests' own (conftest.py)
DEVICES_8 = {"XLA_FLAGS": f"{_FLAGS} --xla_force_host_platform_device_count=8"}


def test_a_checkpoint_moves_between_eight_devices_and_one(data_dir, tmp_path):
    """Written on 8 (simulated) devices, resumed on 1, and the reverse: the parameters of an
    uninterrupted 1-device run (up to the reduction order of 8 devices' gradients)."""
    config_file = write_config_file(
        tmp_path / "cfg.py", data_dir, "c.train.batch_size = 8\nc.eval.batch_size = 8\n"
    )

    sources.prepare_all(config(data_dir).data)  # once, before two runs would race to

    def train(*runs):
        """Run (workdir, steps, env) trainings side by side; their outputs."""
        started = [
            run_train(config_file, w, f"--config.train.num_steps={n}", env=env, wait=False)
            for w, n, env in runs
        ]
        outputs = [process.communicate(timeout=600)[0] for process in started]
        for process, output in zip(started, outputs, strict=True):
            assert process.returncode == 0, output
        return outputs

    train((tmp_path / "one", 4, None), (tmp_path / "8_to_1", 2, DEVICES_8))  # one: 2 and 4
    # 1 to 8: the uninterrupted run as if stopped after its step-2 checkpoint
    shutil.copytree(tmp_path / "one", tmp_path / "1_to_8")
    shutil.rmtree(tmp_path / "1_to_8" / "checkpoints" / "4")
    outputs = train((tmp_path / "8_to_1", 4, None), (tmp_path / "1_to_8", 4, DEVICES_8))
    for name, output in zip(("8_to_1", "1_to_8"), outputs, strict=True):
        assert "resumed from" in output
        for a, b in zip(
            final_params(tmp_path / name, 4), final_params(tmp_path / "one", 4), strict=True
        ):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


# Loaded first by every Python process of a run (PYTHONPATH), grain's spawned workers included:
# it appends the name of each shared memory segment the process creates to $SHM_LOG, so a test
# checks exactly its own run's segments, whatever else runs on the machine.
_SHM_LOG_HOOK = """
import os
from multiprocessing import shared_memory

_init = shared_memory.SharedMemory.__init__

def _logged_init(self, name=None, create=False, size=0, **kwargs):
    _init(self, name, create, size, **kwargs)
    if create:
        with open(os.environ["SHM_LOG"], "a") as log:
            log.write(self.name.lstrip("/") + "\\n")

shared_memory.SharedMemory.__init__ = _logged_init
"""


def logging_shared_memory(tmp_path):
    """(env, names): run_train's extra environment that logs the segments the run's processes
    create, and a function that returns the names logged so far."""
    hook = tmp_path / "shm_hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_SHM_LOG_HOOK)
    log = tmp_path / "shm.log"
    log.touch()
    env = {"PYTHONPATH": os.pathsep.join([str(hook), str(ROOT)]), "SHM_LOG": str(log)}
    return env, lambda: set(log.read_text().split())


_EVALUATE_IN_PROCESS = """
import pathlib, sys
from frcnn_jax import sharding
from frcnn_jax.models import build_model
from frcnn_jax.training.evaluation import evaluate
from frcnn_jax.training.initial import init_state
from tests.tiny import tiny_config

if __name__ == "__main__":
    config = tiny_config(pathlib.Path(sys.argv[1]))
    config.data.workers = 2
    model = build_model(config)
    state, _ = init_state(config, model)
    evaluate(config, model, {"params": state.params, **state.frozen}, sharding.data_mesh())
    print("evaluated")
"""


def test_an_evaluation_called_in_a_users_process_frees_its_shared_memory(data_dir, tmp_path):
    """`evaluate` from a script or notebook (as experiments/paper_tables.py calls it): its pass
    ends inside grain's prefetch threads; the examples they still hold are freed when the
    loader closes, not left to Python's resource tracker at exit."""
    sources.prepare_all(config(data_dir).data)
    env, created = logging_shared_memory(tmp_path)
    script = tmp_path / "evaluate_here.py"
    script.write_text(_EVALUATE_IN_PROCESS)
    done = subprocess.run(
        [sys.executable, str(script), str(data_dir)],
        env={**os.environ, **env, "TF_CPP_MIN_LOG_LEVEL": "3"},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0 and "evaluated" in done.stdout, done.stderr[-3000:]
    assert created(), "the hook logged no segment: the check below would prove nothing"
    assert "leaked shared_memory" not in done.stderr, done.stderr[-2000:]


def test_the_loaders_workers_and_shared_memory_are_released_at_exit(data_dir, tmp_path):
    """Two runs with grain workers, side by side: one ends in an error (a non-finite loss,
    after its workers started), the other by Ctrl-C mid-training (SIGINT to its whole process
    group, workers included: they leave it to the trainer). Neither leaves a worker process, a
    shared memory segment, a traceback or a "leaked shared_memory" warning."""
    workers = "c.data.workers = 2\n"
    exploding = workers + "c.train.learning_rate = 1e12\nc.train.warmup_steps = 0\n"
    sources.prepare_all(config(data_dir).data)  # once, before two runs would race to
    env, created = logging_shared_memory(tmp_path)
    error = run_train(
        write_config_file(tmp_path / "a.py", data_dir, exploding),
        tmp_path / "a",
        env=env,
        wait=False,
    )
    stopped = run_train(
        write_config_file(tmp_path / "b.py", data_dir, workers + "c.train.num_steps = 400\n"),
        tmp_path / "b",
        env=env,
        wait=False,
    )
    metrics = tmp_path / "b" / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.is_file() and metrics.stat().st_size) and time.time() < deadline:
        time.sleep(0.2)
    started = descendants(stopped.pid)
    assert started, "the run has no worker processes"
    os.killpg(stopped.pid, signal.SIGINT)  # as Ctrl-C in a terminal
    output, _ = stopped.communicate(timeout=300)
    assert stopped.returncode == 0 and "stopped at step" in output
    assert "leaked shared_memory" not in output and "Traceback" not in output
    output, _ = error.communicate(timeout=300)
    assert error.returncode == 1
    assert output.strip().splitlines()[-1].startswith("error: non-finite loss"), output[-2000:]
    assert "leaked shared_memory" not in output and "Traceback" not in output
    time.sleep(1.5)  # the workers' owner watch polls every 0.5 s
    assert not [pid for pid in started if alive(pid)]
    assert created(), "the hook logged no segment: the check below would prove nothing"
    assert not created() & set(os.listdir("/dev/shm"))
