"""What a training run's directory says about itself: `<workdir>/run.json`.

Training writes the resolved config and the class names there (plain JSON, readable without
frcnn_jax), so that a workdir alone rebuilds the model: `frcnn_jax.inference.Detector.
from_workdir`, `python -m frcnn_jax.predict --workdir ...`.
"""

import json
import pathlib

import ml_collections

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
        raise FileNotFoundError(
            f"{path} not found: {workdir} is not a frcnn_jax training directory (training "
            "writes run.json when it starts)"
        )
    run = json.loads(path.read_text())
    config = ml_collections.ConfigDict(_tuples(run["config"]))
    return config, tuple(run["class_names"]), tuple(run["category_ids"])


def _tuples(value):
    """JSON lists back to the tuples configs use (dicts kept: e.g. shapes_num_examples)."""
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value
