"""The `config.data` section: fields, defaults (the paper's where it has one) and checks."""

import ml_collections

from frcnn_jax import fields
from frcnn_jax.errors import ConfigError
from frcnn_jax.overrides import override


def data_config(**overrides):
    """`config.data` with defaults (the paper's VOC 2007 at its scale); keyword arguments
    override fields (an unknown one fails, naming it)."""
    c = ml_collections.ConfigDict()
    # TFDS name (voc/2007, coco/2017), shapes/<512|320> (offline synthetic), voc_folder,
    # coco_folder
    c.name = "voc/2007"
    # TFDS data_dir; None: TFDS's default
    c.data_dir = ml_collections.FieldReference(None, field_type=str)
    # a split expression every source has by default; the paper's VOC 2007 trainval is
    # "train+validation" (configs/voc07_vgg16.py)
    c.train_split = "train"
    # voc_folder: the VOC-layout root
    c.path = ml_collections.FieldReference(None, field_type=str)
    # coco_folder: {split: (annotation json, image folder)}
    # (fields that are None or a dict / list are typed `object`: the command line sets them
    # with a Python literal, e.g. --config.data.class_names='["cat", "dog"]')
    c.coco_splits = ml_collections.FieldReference(None, field_type=object)
    # voc_folder: a fixed class list (None: the classes found in the annotations)
    c.class_names = ml_collections.FieldReference(None, field_type=object)
    # shapes: {split: number of examples} (None: the generator's sizes)
    c.shapes_num_examples = ml_collections.FieldReference(None, field_type=object)
    c.min_size = 600  # paper: short side 600
    c.max_size = 1000  # paper: long side <= 1000
    c.canvas = (600, 1000)  # static (H, W) every image is padded to (see orient_canvas)
    # Images of the other orientation use the transposed canvas (1000, 600), so portrait images
    # keep min_size on their short side too; batches group images of one canvas (two compiled
    # shapes). False: one canvas, portrait images shrunk to fit it.
    c.orient_canvas = True
    # Multi-scale training: each training image's short side drawn at random from these (the
    # long side limit scaled alike; batches padded to the largest one's canvas); empty:
    # min_size alone. Evaluation keeps min_size (image pyramids: eval.scales).
    c.train_scales = ()
    c.max_boxes = 64  # G: ground-truth slots per image (64 VOC, 100 COCO)
    # Train and evaluate on these classes only, labelled 1..len in this order (other objects'
    # boxes are dropped); empty: every class of the dataset.
    c.class_subset = ()
    c.flip = True  # paper: random horizontal flip in training
    c.exclude_difficult = True  # VOC "difficult" boxes are not training targets (kept for eval)
    c.workers = 2  # grain worker processes (0: decode in the main process)
    override(c, overrides, "config.data")
    return c


RULES = {
    "name": fields.text(),
    "data_dir": fields.optional(fields.text()),
    "train_split": fields.text(),
    "path": fields.optional(fields.text()),
    "coco_splits": fields.mapping(),
    "class_names": fields.optional(fields.sequence(fields.text(), min_length=1)),
    "shapes_num_examples": fields.mapping(),
    "min_size": fields.number(above=0),
    "max_size": fields.number(above=0),
    "canvas": fields.sequence(fields.count(), length=2),
    "orient_canvas": fields.flag(),
    "train_scales": fields.sequence(fields.count()),
    "max_boxes": fields.count(),
    "class_subset": fields.sequence(fields.text()),
    "flip": fields.flag(),
    "exclude_difficult": fields.flag(),
    "workers": fields.count(low=0),
}


def check_data_config(c):
    """Raise `ConfigError` naming the field for values that cannot work (each field's type and
    range: `RULES`)."""
    fields.check_section(c, RULES, "config.data")
    if c.max_size < c.min_size:
        raise ConfigError(
            "config.data.min_size/max_size: need min_size <= max_size, "
            f"got {c.min_size}/{c.max_size}"
        )
    if c.name == "voc_folder" and not c.path:
        raise ConfigError("config.data.path: voc_folder needs the folder's path")
    if c.name == "coco_folder" and not c.coco_splits:
        raise ConfigError("config.data.coco_splits: coco_folder needs {split: (json, image_dir)}")
