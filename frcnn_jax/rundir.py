"""What a training run's directory says about itself: `<workdir>/run.json`.

Training writes the resolved config and the class names there (plain JSON, readable without
frcnn_jax), so that a workdir alone rebuilds the model: `frcnn_jax.inference.Detector.
from_workdir`, `python -m frcnn_jax.predict --workdir ...`.
"""

import json
import logging
import pathlib

import ml_collections

from frcnn_jax.errors import MissingFile, UserError

RUN_FILE = "run.json"


def write(workdir, config, info):
    """Write `<workdir>/run.json`: the config (resolved) and the `DatasetInfo`'s class names
    and COCO category ids."""
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    run = {
        "config": json.loads(config.to_json_best_effort()),
        "class_names": list(info.class_names),
        "category_ids": [int(i) for i in info.category_ids],
    }
    path = workdir / RUN_FILE
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(run, indent=1))
    temporary.replace(path)  # never a half-written file


def read(workdir):
    """(config ConfigDict, class names tuple, category ids tuple) of a run directory."""
    path = pathlib.Path(workdir) / RUN_FILE
    if not path.is_file():
        raise MissingFile(
            f"{path} not found: {workdir} is not a frcnn_jax training directory (training "
            "writes run.json when it starts)"
        )
    run = json.loads(path.read_text())
    from frcnn_jax.config import base_config

    # fields a run.json of an older version lacks get today's defaults
    config = ml_collections.ConfigDict(_merged(base_config().to_dict(), _tuples(run["config"])))
    return config, tuple(run["class_names"]), tuple(run["category_ids"])


def _merged(defaults, stored):
    """`stored` (nested dicts) over `defaults`, section by section."""
    out = dict(defaults)
    for key, value in stored.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merged(out[key], value) if both else value
    return out


def _tuples(value):
    """JSON lists back to the tuples configs use (dicts kept: e.g. shapes_num_examples)."""
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


# The model fields that define what a checkpoint's weights compute; the others (sampling,
# thresholds, proposal counts, frozen stages, dtype) may change between runs of one workdir,
# e.g. to evaluate with another number of test proposals.
MODEL_FIELDS = (
    "backbone",
    "num_classes",
    "pixel_mean",
    "pixel_std",
    "channel_order",
    "rpn.anchor_sizes",
    "rpn.aspect_ratios",
    "rpn.anchor_style",
    "rpn.channels",
    "rpn.objectness",
    "rpn.box_normalizer",
    "rpn.shared_features",
    "head.box_head",
    "head.widths",
    "head.pooler",
    "head.output_size",
    "head.aligned",
    "head.rois",
)


class ModelChanged(UserError, ValueError):
    """The config's model is not the one a workdir's checkpoints were trained with."""


def check_model(workdir, config, *, allow_change=False):
    """Raise `ModelChanged` naming the first of `MODEL_FIELDS` where `config.model` differs
    from `<workdir>/run.json`'s (nothing to check when there is no run.json). With
    `allow_change` the difference is only logged."""
    path = pathlib.Path(workdir) / RUN_FILE
    if not path.is_file():
        return
    from frcnn_jax.config import base_config

    stored = ml_collections.ConfigDict(_tuples(json.loads(path.read_text())["config"]))
    defaults = base_config().model  # fields an older run.json lacks had their default
    for field in MODEL_FIELDS:
        ours, theirs = _get(config.model, field), _get(stored.model, field, _get(defaults, field))
        if _normal(ours) != _normal(theirs):
            message = (
                f"config.model.{field} is {ours!r} here but {theirs!r} in {path}, which the "
                f"checkpoints in {workdir} were trained with"
            )
            if not allow_change:
                raise ModelChanged(
                    f"{message}; use the run's config (or a new --workdir), or pass "
                    "--allow_model_change to use these weights with this model anyway"
                )
            logging.getLogger(__name__).warning("%s (allowed by --allow_model_change)", message)
            return


def _get(config, dotted, missing=None):
    for key in dotted.split("."):
        if config is None or key not in config:
            return missing
        config = config[key]
    return config


def _normal(value):
    """Compare tuples and lists alike, and ints and floats by value."""
    if isinstance(value, list | tuple):
        return tuple(_normal(v) for v in value)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return value


class WorkdirInUse(UserError, RuntimeError):
    """Another live process is training in the workdir."""


class WorkdirLock:
    """`<workdir>/.lock`, held (an exclusive `flock`) while a run trains there: a second run on
    the workdir stops at once with the first's process id, host and start time. The operating
    system drops the lock when its process ends, however it ends, so a dead run's leftover file
    never blocks the next one."""

    def __init__(self, workdir):
        self.path = pathlib.Path(workdir) / ".lock"
        self._file = None

    def __enter__(self):
        import fcntl
        import os
        import socket
        import time

        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = self.path.open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise WorkdirInUse(
                f"{self.path.parent} is in use by another run ({holder}); wait for it or stop "
                "it, or use another --workdir"
            ) from None
        handle.seek(0)
        handle.truncate()
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        handle.write(f"process {os.getpid()} on {socket.gethostname()}, started {started}\n")
        handle.flush()
        self._file = handle
        return self

    def __exit__(self, *exc):
        if self._file is not None:
            self._file.close()  # releases the lock
            self._file = None
