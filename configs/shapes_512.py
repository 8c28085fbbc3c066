"""The time-to-accuracy setting (experiments/time_to_map.py): shapes_tiny's tiny FPN (P3-P5)
on the full `shapes` set at 512x512, objects 16-300 px."""

import pathlib

from frcnn_jax.config import config_from_file


def get_config(arg=None):
    del arg
    c = config_from_file(pathlib.Path(__file__).with_name("shapes_tiny.py"))
    c.data.name = "shapes/512"
    c.data.shapes_num_examples = {"train": 8000, "validation": 200, "test": 500}
    c.data.min_size = 512
    c.data.max_size = 512
    c.data.canvas = (512, 512)
    c.model.rpn.anchor_sizes = ((16, 32), (64, 128), (256, 384))  # per level: P3, P4, P5
    c.train.num_steps = 4000  # about 35 minutes on 2 CPU cores (about 2 steps/s)
    c.train.lr_steps = (3000,)
    return c
