"""Orbax checkpoints of the train state together with the data loader's position.

Layout: `<workdir>/checkpoints/<step>/{state, loader, meta}`. `state` holds the arrays (step,
params, frozen statistics, optimizer state), `loader` the grain loader state (JSON) so a resumed
run sees exactly the examples an uninterrupted one would, `meta` the seed and config summary.
Saves are asynchronous; Orbax writes each step to a temporary directory and renames it when
complete, so a run killed mid-save leaves the previous checkpoint intact. Just before that
rename, `<step>/checksums.json` is written: the SHA-256 of every file of the step (Orbax's own
`_CHECKPOINT_METADATA` timestamps and `commit_success.txt` marker, written at the rename and
never read by a restore, excepted). Every restore verifies them first, so a flipped byte, a
truncated or a missing file anywhere (parameters, optimizer state, loader position, metadata)
is found before any value is used: `DamagedFile` naming the file. A save that fails because
the disk is full stops the run with `DiskFull`; a damaged checkpoint found when resuming
(`restore_latest`) is moved to `<workdir>/checkpoints_damaged/` and the next older one used; a
checkpoint whose tensors do not fit the model is a `TensorMismatch` naming the tensor.
"""

import concurrent.futures
import errno
import hashlib
import json
import logging
import os
import pathlib
import shutil

import jax
import orbax.checkpoint as ocp

from frcnn_jax.errors import DamagedFile, MissingFile, UserError

log = logging.getLogger(__name__)

CHECKSUMS = "checksums.json"
# Orbax writes these at the rename, after the checksums; a restore never reads them
UNCHECKED = ("_CHECKPOINT_METADATA", "commit_success.txt")
_TMP_SUFFIX = ".orbax-checkpoint-tmp"  # Orbax's temporary directory: <step>.orbax-checkpoint-tmp


class DiskFull(UserError, OSError):
    """A checkpoint could not be written: no space left on the device."""


class TensorMismatch(UserError, ValueError):
    """A checkpoint's tensors do not fit the model (or the optimizer) it is restored into."""


class Checkpoints:
    def __init__(self, workdir, *, max_to_keep=3):
        self.directory = pathlib.Path(workdir).absolute() / "checkpoints"
        self._saving = None  # the step whose save is in flight
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep,
                create=True,
                async_options=ocp.AsyncOptions(post_finalization_callback=self._seal),
            ),
            item_names=("state", "loader", "meta"),
        )

    def latest_step(self):
        return self.manager.latest_step()

    def all_steps(self):
        return list(self.manager.all_steps())

    def save(self, step, state, loader_state, meta):
        try:
            self.manager.wait_until_finished()  # the previous save is sealed before this one
            self._saving = int(step)
            self.manager.save(
                int(step),
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state),
                    loader=ocp.args.JsonSave(loader_state),
                    meta=ocp.args.JsonSave(meta),
                ),
            )
        except Exception as e:  # an earlier asynchronous save's failure surfaces here too
            full = self._disk_full(e, step)
            if full is None:
                raise
            raise full from e

    def _seal(self):
        """Orbax's last step before it renames the step's temporary directory: write the
        checksums of every file in it (process 0; Orbax has synchronised the hosts)."""
        if jax.process_index() != 0:
            return
        temporary = self.directory / f"{self._saving}{_TMP_SUFFIX}"
        if not temporary.is_dir():
            raise FileNotFoundError(f"checksums: no temporary checkpoint directory {temporary}")
        sums = file_checksums(temporary)
        (temporary / CHECKSUMS).write_text(json.dumps({"sha256": sums}, indent=0))

    def verify(self, step):
        """Raise `DamagedFile` naming the first file of checkpoint `step` that is missing or
        whose SHA-256 differs from its `checksums.json` (or when that file is missing or
        unreadable)."""
        directory = self.directory / str(int(step))
        listing = directory / CHECKSUMS
        try:
            expected = json.loads(listing.read_text())["sha256"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DamagedFile(
                f"checkpoint step {step}: {listing} is missing or unreadable ({type(e).__name__}"
                f": {e}); it holds the checksums every checkpoint is verified with"
            ) from None
        found = file_checksums(directory, only=expected)
        for name, digest in sorted(expected.items()):
            if found.get(name) != digest:
                what = "missing" if name not in found else "its SHA-256 differs from checksums.json"
                raise DamagedFile(f"checkpoint step {step}: {directory / name} is {what}")

    def _check_step(self, step):
        if step not in self.manager.all_steps():
            raise MissingFile(
                f"no checkpoint for step {step} in {self.directory} "
                f"(available: {self.all_steps() or 'none'})"
            )

    def restore(self, step, abstract_state):
        """(state, loader_state, meta) at `step`; `abstract_state` gives shapes and shardings
        (the current devices': a checkpoint written on other devices is resharded)."""
        self._check_step(step)
        self.verify(step)
        self.check_tensors(step, abstract_state)
        try:
            restored = self.manager.restore(
                int(step),
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state),
                    loader=ocp.args.JsonRestore(),
                    meta=ocp.args.JsonRestore(),
                ),
            )
        except Exception as e:  # verified intact: the state it is restored into differs
            raise self._mismatch(step, abstract_state, e) from e
        return restored.state, restored.loader, restored.meta

    def _mismatch(self, step, abstract_state, error):
        """`TensorMismatch` for an intact checkpoint whose training state does not restore into
        `abstract_state` (the model's tensors fit, so the optimizer's state differs)."""
        saved = ocp.StandardCheckpointer().metadata(self.directory / str(int(step)) / "state")
        saved = getattr(saved, "item_metadata", saved)
        ours = getattr(abstract_state, "opt_state", None)
        theirs = saved.get("opt_state") if hasattr(saved, "get") else None
        counts = ""
        if ours is not None and theirs is not None:
            counts = (
                f" (its optimizer state holds {len(jax.tree.leaves(theirs))} arrays, this "
                f"config's {len(jax.tree.leaves(ours))})"
            )
        first = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
        return TensorMismatch(
            f"checkpoint step {step} in {self.directory} is intact but does not fit this "
            f"config's training state{counts}: was config.train.optimizer changed, or "
            "budget_minutes switched on or off? A run keeps them; use the run's config or a new "
            "--workdir "
            f"({type(error).__name__}: {first})"
        )

    def meta(self, step):
        """The metadata saved with checkpoint `step` (a dict)."""
        self._check_step(step)
        restored = self.manager.restore(
            int(step), args=ocp.args.Composite(meta=ocp.args.JsonRestore())
        )
        return dict(restored.meta or {})

    def restore_variables(self, step):
        """The model's variables at `step` ({"params", ...frozen collections}, what
        `model.apply` takes), on the first device: the optimizer state is not read (the
        checksums of every file are verified all the same)."""
        self._check_step(step)
        self.verify(step)
        saved = ocp.StandardCheckpointer().metadata(self.directory / str(int(step)) / "state")
        tree = getattr(saved, "item_metadata", saved)
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        abstract = {
            key: jax.tree.map(
                lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree[key]
            )
            for key in ("params", "frozen")
        }
        restored = self.manager.restore(
            int(step),
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    item=abstract,
                    restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
                    partial_restore=True,
                )
            ),
        )
        return {"params": restored.state["params"], **restored.state["frozen"]}

    def wait(self):
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            full = self._disk_full(e)
            if full is None:
                raise
            raise full from e

    def _disk_full(self, error, step=None):
        """A `DiskFull` when `error`, or an error that caused it, is ENOSPC; else None."""
        cause = next((c for c in _causes(error) if _no_space(c)), None)
        if cause is None:
            return None
        try:  # let the saves before this one finish: they are the ones to resume from
            self.manager.wait_until_finished()
        except Exception:  # this save's own failure is what is reported
            pass
        intact = [s for s in self._finished_steps() if step is None or s < step]
        previous = f"step {max(intact)}" if intact else "none yet"
        return DiskFull(
            errno.ENOSPC,
            f"no space left on the device while saving checkpoint "
            f"{'' if step is None else f'step {step} '}to {self.directory} ({cause}); the "
            f"previous checkpoint ({previous}) is intact: free some space and rerun the same "
            "command to resume from it",
        )

    def _finished_steps(self):
        """Steps whose directories are complete on disk (not a save in progress)."""
        return sorted(
            int(p.name) for p in self.directory.glob("*") if p.is_dir() and p.name.isdigit()
        )

    def restore_latest(self, abstract_state):
        """(step, state, loader_state, meta) of the newest checkpoint that restores, or None
        when there is none. A newer one that fails to restore (a truncated or missing file, say)
        is named in a warning and moved to `<workdir>/checkpoints_damaged/<step>`, kept for
        inspection; a `TensorMismatch` (the model or the optimizer changed: the checkpoint is
        intact) is raised, not set aside."""
        for step in sorted(self.all_steps(), reverse=True):
            try:
                return (step, *self.restore(step, abstract_state))
            except TensorMismatch:
                raise
            except Exception as e:
                self._set_aside(step, e)
        return None

    def _set_aside(self, step, error):
        text = str(error).strip().split(" See full TensorStore details")[0]
        first = text.splitlines()[0][:300] if text else ""
        aside = self.directory.parent / "checkpoints_damaged" / str(step)
        while aside.exists():
            aside = aside.with_name(aside.name + "_")
        if jax.process_index() == 0:
            aside.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(self.directory / str(step)), str(aside))
        self.manager.reload()
        log.warning(
            "checkpoint step %d in %s is damaged (%s: %s): moved to %s; trying the one before",
            step,
            self.directory,
            type(error).__name__,
            first,
            aside,
        )

    def check_tensors(self, step, abstract_state):
        """Raise `TensorMismatch` naming the first tensor of `params` / `frozen` whose shape
        differs between checkpoint `step` and `abstract_state` (a TrainState, or model
        variables {"params", ...}), or that only one of them has."""
        self._check_step(step)
        saved = ocp.StandardCheckpointer().metadata(self.directory / str(int(step)) / "state")
        saved = getattr(saved, "item_metadata", saved)
        if not isinstance(abstract_state, dict):  # a TrainState
            params, frozen = abstract_state.params, abstract_state.frozen
        elif "frozen" in abstract_state:  # a train state as a dict
            params, frozen = abstract_state["params"], abstract_state["frozen"]
        else:  # model variables: {"params", other collections}
            params = abstract_state["params"]
            frozen = {k: v for k, v in abstract_state.items() if k != "params"}
        for key, tree in (("params", params), ("frozen", frozen)):
            ours = _shapes(tree or {}, key)
            theirs = _shapes(saved.get(key) or {}, key)
            for name in sorted(ours.keys() | theirs.keys()):
                if ours.get(name) != theirs.get(name):
                    raise TensorMismatch(
                        f"checkpoint step {step} in {self.directory} does not fit the model: "
                        f"tensor {name} is {_describe(theirs.get(name))} in the checkpoint and "
                        f"{_describe(ours.get(name))} in the model (was the config's model "
                        "changed?)"
                    )

    def close(self):
        self.manager.close()


def file_checksums(directory, only=None):
    """{relative path: SHA-256 hex} of the files under `directory` (those named in `only`, when
    given), but for Orbax's `UNCHECKED` files at its top and the checksums file itself; files
    are hashed in parallel threads."""
    directory = pathlib.Path(directory)
    if only is None:
        skip = {CHECKSUMS, *UNCHECKED}
        names = [
            str(p.relative_to(directory))
            for p in directory.rglob("*")
            if p.is_file() and str(p.relative_to(directory)) not in skip
        ]
    else:
        names = [n for n in only if (directory / n).is_file()]

    def digest(name):
        with open(directory / name, "rb") as f:
            return name, hashlib.file_digest(f, "sha256").hexdigest()

    with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        return dict(pool.map(digest, sorted(names)))


def abstract_like(tree):
    """ShapeDtypeStructs (with shardings) of a pytree of arrays: the restore target."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _shapes(tree, prefix):
    """{"prefix/a/b": shape tuple} of a pytree of arrays or array metadata."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {
        "/".join([prefix, *(str(getattr(k, "key", getattr(k, "name", k))) for k in path)]): tuple(
            leaf.shape
        )
        for path, leaf in leaves
    }


def _describe(shape):
    return "missing" if shape is None else f"shape {shape}"


def _causes(error):
    """`error`, then what caused it, and so on."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _no_space(error):
    no_space = isinstance(error, OSError) and error.errno == errno.ENOSPC
    return no_space or "No space left on device" in str(error)
