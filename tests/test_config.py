"""Config files: every RPN/head field exists in the config tree and can be overridden on the
command line of every config file, changing the model that `build_model` makes."""

import dataclasses
import pathlib
import sys

import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

from frcnn_jax import config as config_lib
from frcnn_jax import fields
from frcnn_jax.config import base_config, check_config, config_from_file, model_config
from frcnn_jax.data import config as data_config_lib
from frcnn_jax.data import sources
from frcnn_jax.data.config import data_config
from frcnn_jax.errors import ConfigError
from frcnn_jax.models import MODEL_RULES, HeadSettings, RPNSettings, build_model
from tests.tiny import DETECTOR_CONFIGS

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG_FILES = DETECTOR_CONFIGS
ALTERNATIVES = {  # a second valid value for string fields
    "objectness": ("softmax", "sigmoid"),
    "pooler": ("pool", "align"),
    "box_head": ("mlp", "res5"),
    "anchor_style": ("torchvision", "py-faster-rcnn"),
    "test_ranking": ("objectness", "random"),
    "rois": ("proposals", "anchors"),
}


def parse(config_file, *overrides, monkeypatch):
    """The config `python -m frcnn_jax.train --config FILE OVERRIDES...` would run with."""
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, flag_values=flag_values, lock_config=True)
    argv = ["train", f"--config={config_file}", *overrides]
    monkeypatch.setattr(sys, "argv", argv)  # config_flags reads the overrides from sys.argv
    flag_values(argv)
    return flag_values.config


def other_value(name, value):
    """A valid value of the same kind that differs from `value`."""
    if name in ALTERNATIVES:
        first, second = ALTERNATIVES[name]
        return second if value == first else first
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if value is None:
        return 5.0
    if isinstance(value, float):
        return round(value / 2 + 0.1, 4) if value <= 1 else value + 1.5
    if not value:  # an empty tuple (the res5 head's fc widths)
        return (64,)
    if isinstance(value[0], tuple):  # anchor sizes per pyramid level
        return tuple(tuple(2 * s for s in level) for level in value)
    if all(0 <= v <= 1 for v in value):  # (lo, hi) IoU ranges
        return tuple(round(v / 2 + 0.05, 4) for v in value)
    return tuple(v + 1 for v in value)


def test_the_config_tree_holds_every_settings_field_with_its_default():
    c = base_config()
    for section, cls in (("rpn", RPNSettings), ("head", HeadSettings)):
        assert set(c.model[section]) == {f.name for f in dataclasses.fields(cls)}
        assert dict(c.model[section]) == dataclasses.asdict(cls())


def leaves(config, prefix=""):
    """(dotted name, value, declared type) of every field of a ConfigDict, nested ones too."""
    for name in config:
        value = config[name]
        if isinstance(value, ml_collections.ConfigDict):
            yield from leaves(value, f"{prefix}{name}.")
        else:
            reference = config._fields[name]
            declared = reference.get_type() if hasattr(reference, "get_type") else type(value)
            yield f"{prefix}{name}", value, declared


def changed(value, declared):
    """A value of the field's type that differs from `value` (for the parser, not the model)."""
    if value is None:
        return {int: 3, float: 0.5, str: "s"}.get(declared, ["a", "b"])
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "_x"
    if isinstance(value, tuple):
        return value + value[:1] if value else (1,)
    return {"k": 1} if isinstance(value, dict) else ["a"]


@pytest.mark.parametrize(
    "config_file",
    [*CONFIG_FILES, ROOT / "configs" / "pretrain_shapes_tiny_fpn.py"],
    ids=lambda p: p.stem,
)
def test_every_config_field_is_overridable_on_the_command_line(config_file, monkeypatch):
    """The README's "every config field overridable from the command line": every leaf of the
    config tree (dicts and lists too) takes a new value from its flag."""
    plain = parse(config_file, monkeypatch=monkeypatch)
    want, argv = {}, []
    for name, value, declared in leaves(plain):
        new = changed(value, declared)
        want[name] = new
        argv.append(f"--config.{name}={new if isinstance(new, str) else repr(new)}")
    assert len(want) > 30  # the whole tree, not a section
    config = parse(config_file, *argv, monkeypatch=monkeypatch)
    got = {name: value for name, value, _ in leaves(config)}
    assert got == want


@pytest.mark.parametrize("config_file", CONFIG_FILES, ids=lambda p: p.stem)
def test_every_rpn_and_head_field_is_overridable(config_file, monkeypatch):
    plain = build_model(parse(config_file, monkeypatch=monkeypatch))
    for section, cls in (("rpn", RPNSettings), ("head", HeadSettings)):
        for field in dataclasses.fields(cls):
            value = other_value(field.name, getattr(getattr(plain, section), field.name))
            text = value if isinstance(value, str) else repr(value)
            flag = f"--config.model.{section}.{field.name}={text}"
            config = parse(config_file, flag, monkeypatch=monkeypatch)
            try:
                got = getattr(getattr(build_model(config), section), field.name)
            except ValueError as error:  # a value this config cannot work with: named
                assert f"config.model.{section}.{field.name}" in str(error), (flag, error)
                continue
            assert got == value, (config_file.name, flag, got)


def test_optional_fields_take_none_or_a_number_and_reject_anything_else(monkeypatch):
    voc = ROOT / "configs" / "voc07_vgg16.py"
    for flag, want in (
        ("rpn.allowed_border=None", None),
        ("rpn.box_normalizer=256", 256),
        ("rpn.batch_size=None", None),
        ("head.batch_size=None", None),
    ):
        config = parse(voc, f"--config.model.{flag}", monkeypatch=monkeypatch)
        section, field = flag.split("=")[0].split(".")
        assert getattr(getattr(build_model(config), section), field) == want
    config = parse(voc, "--config.model.rpn.allowed_border=wide", monkeypatch=monkeypatch)
    with pytest.raises(ConfigError, match=r"config.model.rpn.allowed_border must be None or a"):
        build_model(config)
    with pytest.raises(flags.IllegalFlagValueError, match="nms_threshold"):
        parse(voc, "--config.model.head.nms_threshold=high", monkeypatch=monkeypatch)


def test_the_coco_config_trains_with_torchvisions_loss_and_decay_settings():
    """Differences the training-parity test (tests/models/test_training_parity.py) found: the
    head's smooth-L1 beta and the decayed parameters of torchvision's COCO recipe."""
    config = config_from_file(ROOT / "configs" / "coco_r50_fpn.py")
    assert build_model(config).head.beta == pytest.approx(1 / 9)  # fastrcnn_loss's beta
    assert config.train.weight_decay_on == "all"  # references/detection: every parameter
    assert build_model(base_config()).head.beta == 1.0  # Fast R-CNN's sigma 1: the paper's


@pytest.mark.parametrize("config_file", CONFIG_FILES, ids=lambda p: p.stem)
def test_config_files_pass_the_checks_and_every_setting_reaches_the_model(config_file):
    config = config_from_file(config_file)
    check_config(config)
    model = build_model(config)
    for section in ("rpn", "head"):
        built = dataclasses.asdict(getattr(model, section))
        given = {
            k: tuple(v) if isinstance(v, list) else v for k, v in config.model[section].items()
        }
        assert built == given, section


def test_input_convention_fields_reach_the_model_and_bad_values_are_named(monkeypatch):
    voc = ROOT / "configs" / "voc07_vgg16.py"
    config = parse(
        voc,
        "--config.model.channel_order=bgr",
        "--config.model.pixel_mean=(102.98, 115.95, 122.77)",
        "--config.model.pixel_std=(1.0, 1.0, 1.0)",
        monkeypatch=monkeypatch,
    )
    check_config(config)
    model = build_model(config)
    assert (model.channel_order, model.pixel_mean, model.pixel_std) == (
        "bgr",
        (102.98, 115.95, 122.77),
        (1.0, 1.0, 1.0),
    )
    config = parse(voc, "--config.model.channel_order=brg", monkeypatch=monkeypatch)
    with pytest.raises(
        ValueError, match=r"config\.model\.channel_order must be one of \('rgb', 'bgr'\)"
    ):
        check_config(config)
    config = parse(voc, "--config.model.pixel_std=(1.0, 0.0, 1.0)", monkeypatch=monkeypatch)
    with pytest.raises(ConfigError, match=r"config.model.pixel_std must be a tuple of 3 values"):
        check_config(config)


def test_eval_scales_must_be_positive_short_sides():
    config = config_from_file(ROOT / "configs" / "shapes_tiny.py")
    config.eval.scales = (320, 480)
    check_config(config)
    for bad in ((0,), (320, -1), (320.5,)):
        config.eval.scales = bad
        with pytest.raises(ValueError, match=r"config\.eval\.scales"):
            check_config(config)


def test_an_unknown_field_in_any_override_is_named():
    with pytest.raises(ValueError, match=r"config\.data has no field 'canvass'"):
        data_config(canvass=(1, 2))
    with pytest.raises(ValueError, match=r"config\.model has no field 'num_class'"):
        model_config(num_class=3)
    with pytest.raises(ValueError, match=r"config\.model\.rpn has no field 'nms'"):
        model_config(rpn=dict(nms=0.5))
    assert data_config(canvas=(10, 20)).canvas == (10, 20)
    assert model_config(head=dict(nms_threshold=0.4)).head.nms_threshold == 0.4


def test_the_base_config_is_consistent_on_its_own():
    import tensorflow_datasets as tfds

    c = base_config()
    check_config(c)
    labels = tfds.builder(c.data.name).info.features["objects"]["label"]
    assert labels.num_classes == c.model.num_classes == 20  # VOC 2007, as the paper
    assert build_model(c).backbone.__class__.__name__ == "VGG16"


def test_the_kernels_field_reaches_every_layer(monkeypatch):
    config = parse(CONFIG_FILES[0], "--config.model.kernels=xla", monkeypatch=monkeypatch)
    model = build_model(config)
    assert model.kernels == model.backbone.kernels == "xla"
    with pytest.raises(ValueError, match=r"config\.model\.kernels must be one of"):
        build_model(parse(CONFIG_FILES[0], "--config.model.kernels=fast", monkeypatch=monkeypatch))


def test_every_field_has_a_rule_and_every_default_passes_it():
    c = base_config()
    sections = {
        "config.data": (c.data, data_config_lib.RULES),
        "config.model": (c.model, MODEL_RULES),
        "config.model.rpn": (c.model.rpn, RPNSettings.RULES),
        "config.model.head": (c.model.head, HeadSettings.RULES),
        "config.train": (c.train, config_lib.TRAIN_RULES),
        "config.eval": (c.eval, config_lib.EVAL_RULES),
    }
    for name, (values, rules) in sections.items():
        assert set(values.keys()) == set(rules), name
        fields.check_section(values, rules, name)


BAD_VALUES = [  # (field, value, what the message says the field must be)
    ("model.rpn.nms_threshold", 1.5, "a number >= 0 and <= 1, got 1.5"),
    ("model.rpn.positive_iou", -0.1, "a number >= 0 and <= 1"),
    ("model.rpn.negative_iou", 0.8, "<= positive_iou, got 0.8 > 0.7"),
    ("model.rpn.batch_size", 0, "None or an integer >= 1"),
    ("model.rpn.aspect_ratios", (), "a tuple of 1 or more values"),
    ("model.rpn.anchor_sizes", ((12, 24), (), (128,)), "a tuple of positive sizes per level"),
    ("model.rpn.train_post_nms_top_n", 0, "an integer >= 1"),
    ("model.head.dropout", 1.0, "a number >= 0 and < 1"),
    ("model.head.background_iou", (0.5, 0.1), "low <= high"),
    ("model.head.max_detections", 0, "an integer >= 1"),
    ("model.num_classes", 0, "an integer >= 1"),
    ("model.frozen_stages", -1, "None or an integer >= 0"),
    ("data.canvas", (320, 0), "a tuple of 2 values, each an integer >= 1"),
    ("data.canvas", (16, 320), "smaller than the backbone's coarsest stride (32 pixels)"),
    ("data.workers", -1, "an integer >= 0"),
    ("data.max_boxes", 0, "an integer >= 1"),
    ("data.min_size", 400, "need min_size <= max_size"),
    ("train.batch_size", 0, "an integer >= 1"),
    ("train.learning_rate", 0.0, "a number > 0"),
    ("train.momentum", 1.0, "a number >= 0 and < 1"),
    ("train.warmup_steps", -1, "an integer >= 0"),
    ("train.warmup_factor", 1.5, "a number > 0 and <= 1"),
    ("train.grad_clip_norm", 0.0, "None or a number > 0"),
    ("train.alternating_phase_steps", (10, 10), "need 4 positive step counts"),
    ("eval.iou_threshold", 0.0, "a number > 0 and <= 1"),
    ("eval.batch_size", 0, "an integer >= 1"),
]


@pytest.mark.parametrize("field, value, said", BAD_VALUES)
def test_a_value_that_cannot_work_is_named_with_its_field(field, value, said):
    c = config_from_file(ROOT / "configs" / "shapes_tiny.py")
    *path, name = field.split(".")
    section = c
    for part in path:
        section = section[part]
    section[name] = value
    with pytest.raises(ConfigError) as error:
        check_config(c)
    message = str(error.value)
    assert f"config.{field}" in message.replace("/", ".") and said in message, message


def test_a_misspelt_field_in_a_config_file_is_named():
    c = config_from_file(ROOT / "configs" / "shapes_tiny.py")
    c.train.lerning_rate = 0.1  # a config file's typo: ConfigDict adds the field silently
    with pytest.raises(ConfigError, match=r"config.train has no field 'lerning_rate' \(did you"):
        check_config(c)
    c = config_from_file(ROOT / "configs" / "shapes_tiny.py")
    c.trian = {"learning_rate": 0.1}
    with pytest.raises(ConfigError, match=r"config has no field 'trian' \(did you mean 'train'"):
        check_config(c)


def test_the_model_class_count_must_be_the_datasets():
    c = config_from_file(ROOT / "configs" / "shapes_tiny.py")
    info = sources.DatasetInfo(("a", "b", "c"), (1, 2, 3), num_examples=10)
    sources.check_class_count(3, info, c.data)
    with pytest.raises(ConfigError, match=r"num_classes is 8 but the dataset shapes/320 has 3"):
        sources.check_class_count(8, info, c.data)
    c.data.class_subset = ("a", "c")
    subset = sources.DatasetInfo(("a", "c"), (1, 3), num_examples=10)
    with pytest.raises(ConfigError, match=r"3 but config.data.class_subset \('a', 'c'\) has 2"):
        sources.check_class_count(3, subset, c.data)
