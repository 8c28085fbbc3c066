"""The one tiny setting the tests share: `configs/shapes_tiny.py` made small (`tiny_config`,
`write_config_file` for subprocess runs), its model on one level for model tests
(`tiny_model_config`, `one_image`, `jitted`), and `run_train` (the training command in a
subprocess)."""

import functools
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from frcnn_jax.config import check_config, config_from_file
from frcnn_jax.overrides import override

ROOT = pathlib.Path(__file__).resolve().parents[1]
# configs/*.py: detector configs (`frcnn_jax.train`) and pretraining configs (`pretrain_*.py`,
# `frcnn_jax.pretrain`)
PRETRAIN_CONFIGS = sorted((ROOT / "configs").glob("pretrain_*.py"))
DETECTOR_CONFIGS = sorted(set((ROOT / "configs").glob("*.py")) - set(PRETRAIN_CONFIGS))

TINY_OVERRIDES = """
    c.data.shapes_num_examples = {"train": 16, "validation": 2, "test": 6}
    c.data.min_size = 128
    c.data.max_size = 128
    c.data.canvas = (128, 128)
    c.data.workers = 0
    c.model.rpn.channels = 32
    c.model.rpn.train_pre_nms_top_n = 300
    c.model.rpn.train_post_nms_top_n = 100
    c.model.rpn.test_pre_nms_top_n = 300
    c.model.rpn.test_post_nms_top_n = 50
    c.model.head.widths = (64, 64)
    c.model.head.batch_size = 32
    c.train.batch_size = 2
    c.train.num_steps = 6
    c.train.log_every = 2
    c.train.checkpoint_every = 2
    c.train.warmup_steps = 2
    c.train.lr_steps = (4,)
    c.eval.batch_size = 2
"""


def tiny_config(data_dir=None, **train):
    """shapes_tiny with `TINY_OVERRIDES`, its data in `data_dir`; `train` overrides
    `config.train` fields."""
    c = config_from_file(ROOT / "configs" / "shapes_tiny.py")
    exec(textwrap.dedent(TINY_OVERRIDES), {"c": c})
    c.data.data_dir = None if data_dir is None else str(data_dir)
    override(c.train, train, "config.train")
    check_config(c)
    return c


def write_config_file(path, data_dir, extra=""):
    """A config file for subprocess runs: shapes_tiny with the tiny overrides."""
    path.write_text(
        "import pathlib\n"
        "from frcnn_jax.config import config_from_file\n\n"
        "def get_config():\n"
        f"    c = config_from_file(pathlib.Path({str(ROOT / 'configs' / 'shapes_tiny.py')!r}))\n"
        + TINY_OVERRIDES
        + f"    c.data.data_dir = {str(data_dir)!r}\n"
        + textwrap.indent(textwrap.dedent(extra), "    ")
        + "    return c\n"
    )
    return path


def run_train(config_file, workdir, *args, env=None, wait=True):
    command = [
        sys.executable,
        "-m",
        "frcnn_jax.train",
        f"--config={config_file}",
        f"--workdir={workdir}",
        *args,
    ]
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})}
    if not wait:  # its own process group: a test may signal the group, as Ctrl-C does
        return subprocess.Popen(
            command,
            env=full_env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
    return subprocess.run(
        command, env=full_env, cwd=ROOT, capture_output=True, text=True, timeout=600
    )


HEIGHT, WIDTH = 128, 128
BOXES = np.array([[12, 14, 52, 60], [64, 20, 116, 52], [30, 72, 100, 118]], np.float32)
CLASSES = np.array([1, 2, 3], np.int32)


def tiny_model_config(**head):
    """`tiny_config()`'s model on one level (the "tiny" backbone) for `one_image`'s three
    classes, in a config of its own; `head` overrides `model.head` fields."""
    model = tiny_config().model
    override(
        model,
        dict(
            backbone="tiny",
            num_classes=3,
            rpn=dict(
                anchor_sizes=(32, 64, 128),
                channels=64,
                train_pre_nms_top_n=500,
                test_pre_nms_top_n=500,
                min_size=1.0,
            ),
            head={"widths": (128, 128), "batch_size": 32, **head},
        ),
        "config.model",
    )
    return ml_collections.ConfigDict({"model": model})


def one_image():
    """A flat grey image with three coloured rectangles of three classes."""
    image = np.full((1, HEIGHT, WIDTH, 3), 40.0, np.float32)
    colours = {1: (220, 40, 40), 2: (40, 220, 40), 3: (40, 40, 220)}
    for (x1, y1, x2, y2), c in zip(BOXES.astype(int), CLASSES, strict=True):
        image[0, y1:y2, x1:x2] = colours[c]
    return jnp.asarray(image), jnp.array([[HEIGHT, WIDTH]], jnp.int32)


def jitted(model, method, *, init=False, **static):
    """`model.apply` (`model.init` with `init=True`) of `method`, jitted; `static`: Python
    keyword arguments such as `return_proposals=True`. Run eagerly, each of a detector's
    thousands of operations compiles on its own: the tiny model's init takes ~18 s so, ~3 s
    jitted."""
    return jax.jit(functools.partial(model.init if init else model.apply, method=method, **static))
