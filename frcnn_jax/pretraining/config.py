"""The pretraining config: `data`, `model`, `train`, `eval` sections, like the detector's.

`train` is the detector's own section (`frcnn_jax.config.base_config().train`, the same
optimizer, schedule and checkpoint fields with the same rules) without the fields of the
detector's training schemes; `model` the detector's input convention and backbone fields.
"""

import ml_collections

from frcnn_jax import fields
from frcnn_jax.errors import ConfigError

SCHEME_FIELDS = (  # the detector's training-scheme fields, not pretraining's
    "scheme",
    "alternating_phase2_init",
    "alternating_phase_steps",
    "alternating_phase_lr_steps",
    "alternating_phase_batch_sizes",
    "alternating_phases",
)
MODEL_FIELDS = (
    "backbone",
    "num_classes",
    "dtype",
    "kernels",
    "pixel_mean",
    "pixel_std",
    "channel_order",
)
DATA_RULES = {
    "name": fields.text(),
    "data_dir": fields.optional(fields.text()),
    "train_split": fields.text(),
    "eval_split": fields.text(),
    "shapes_num_examples": fields.mapping(),
    "image_size": fields.count(),
    "crop_scale": fields.sequence(fields.number(above=0, high=1), length=2),
    "eval_crop": fields.number(above=0, high=1),
    "flip": fields.flag(),
    "workers": fields.count(low=0),
}
EVAL_RULES = {"batch_size": fields.count()}


def pretrain_config():
    """Defaults: ImageNet (TFDS `imagenet2012`, which the user downloads) at 224 pixels with
    torchvision's classification recipe (random-resized crops of 8-100% of the image, flips;
    SGD 0.1 with momentum 0.9, cosine decay, weight decay 1e-4, batch 256, 90 epochs)."""
    from frcnn_jax.config import base_config, model_config

    c = ml_collections.ConfigDict()
    c.data = ml_collections.ConfigDict()
    # a TFDS image classification dataset with "image" and "label" features (imagenet2012,
    # imagenette, ...), or "shapes_classes/64" (the offline set, `frcnn_jax.data.shapes_classes`)
    c.data.name = "imagenet2012"
    c.data.data_dir = ml_collections.FieldReference(None, field_type=str)  # TFDS data_dir
    c.data.train_split = "train"
    c.data.eval_split = "validation"  # top-1 / top-5 at the end
    # shapes_classes: {split: number of examples} (None: the generator's sizes)
    c.data.shapes_num_examples = ml_collections.FieldReference(None, field_type=object)
    c.data.image_size = 224  # square crops the network sees, training and evaluation
    c.data.crop_scale = (0.08, 1.0)  # training crops: this fraction of the image's area
    c.data.eval_crop = 0.875  # evaluation: short side to image_size / eval_crop, centre crop
    c.data.flip = True
    c.data.workers = 2  # grain worker processes (0: in the main process)

    detector = model_config()
    c.model = ml_collections.ConfigDict({k: detector[k] for k in MODEL_FIELDS})
    c.model.num_classes = 1000

    c.train = base_config().train
    with c.train.unlocked():
        for name in SCHEME_FIELDS:
            del c.train[name]
    c.train.update(
        batch_size=256,
        num_steps=450_000,  # 90 epochs of ImageNet's 1.28M images
        learning_rate=0.1,
        lr_schedule="cosine",
        warmup_steps=2500,
        weight_decay=1e-4,
        log_every=100,
        checkpoint_every=5000,
    )
    c.eval = ml_collections.ConfigDict()
    c.eval.batch_size = 250
    return c


def check_pretrain_config(c):
    """`ConfigError` naming the field for any value that cannot work: each field's rule (the
    detector's rules for the shared fields), then the combinations."""
    from frcnn_jax.config import TRAIN_RULES
    from frcnn_jax.models import MODEL_RULES

    sections = {name: fields.mapping() for name in ("data", "model", "train", "eval")}
    fields.check_section(c, sections, "config")
    fields.check_section(c.data, DATA_RULES, "config.data")
    fields.check_section(c.model, {k: MODEL_RULES[k] for k in MODEL_FIELDS}, "config.model")
    train_rules = {k: v for k, v in TRAIN_RULES.items() if k not in SCHEME_FIELDS}
    fields.check_section(c.train, train_rules, "config.train")
    fields.check_section(c.eval, EVAL_RULES, "config.eval")
    low, high = c.data.crop_scale
    if low > high:
        raise ConfigError(
            f"config.data.crop_scale: need low <= high, got {tuple(c.data.crop_scale)}"
        )
    from frcnn_jax.pretraining.model import build_classifier

    coarsest = max(build_classifier(c).backbone_strides)
    if c.data.image_size < coarsest:
        raise ConfigError(
            f"config.data.image_size {c.data.image_size} is smaller than the backbone's "
            f"coarsest stride ({coarsest} pixels)"
        )
