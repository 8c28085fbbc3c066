"""Classification pretraining (`frcnn_jax.pretraining`, `python -m frcnn_jax.pretrain`): the
offline shapes_classes set, crops, exact resume, and the backbone weights file a detector
loads."""

import functools
import json
import shutil

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from frcnn_jax import checkpointing, weights
from frcnn_jax.config import config_from_file
from frcnn_jax.data import shapes, shapes_classes
from frcnn_jax.errors import ConfigError
from frcnn_jax.models import build_model
from frcnn_jax.models.backbones import TinyFPN, get_backbone
from frcnn_jax.pretraining import build_classifier, check_pretrain_config, pretrain_and_evaluate
from frcnn_jax.pretraining.data import ASPECT_RATIOS, centre_crop, random_crop
from frcnn_jax.pretraining.loop import backbone_weights
from frcnn_jax.training.initial import initial_variables
from tests.tiny import PRETRAIN_CONFIGS, ROOT, tiny_config


def pretrain_config(data_dir, **train):
    """configs/pretrain_shapes_tiny_fpn.py made tiny: 32-pixel images, 6 steps of 8."""
    c = config_from_file(ROOT / "configs" / "pretrain_shapes_tiny_fpn.py")
    c.data.shapes_num_examples = {"train": 48, "validation": 20}
    c.data.data_dir = str(data_dir)
    c.data.image_size = 32
    c.data.workers = 0
    c.train.update(batch_size=8, num_steps=6, log_every=2, checkpoint_every=2, warmup_steps=2)
    c.train.keep_checkpoints = 5
    c.train.update(train)
    c.eval.batch_size = 8
    check_pretrain_config(c)
    return c


def test_the_classification_set_is_deterministic_and_has_twice_the_detection_classes():
    names = shapes_classes.CLASS_NAMES
    assert names[: len(shapes.CLASS_NAMES)] == shapes.CLASS_NAMES
    assert len(names) == 16 and len(set(names)) == 16
    a = shapes_classes.render(0, "train", 7)
    b = shapes_classes.render(0, "train", 7)
    np.testing.assert_array_equal(a["image"], b["image"])
    assert a["label"] == b["label"]
    assert a["image"].shape == (64, 64, 3) and a["image"].dtype == np.uint8
    other = shapes_classes.render(0, "validation", 7)
    assert not np.array_equal(a["image"], other["image"])
    labels = [shapes_classes.render(0, "train", i, size=32)["label"] for i in range(300)]
    assert set(labels) == set(range(16))
    with pytest.raises(ValueError, match="split"):
        shapes_classes.render(0, "test", 0)


def test_random_crops_stay_inside_the_image_with_the_asked_area_and_shape(rng):
    for height, width in ((64, 64), (30, 90), (200, 50)):
        for _ in range(200):
            top, left, h, w = random_crop(rng, height, width, (0.3, 0.8))
            assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
            area = h * w / (height * width)
            assert 0.3 - 0.05 <= area <= 0.8 + 0.05
            assert ASPECT_RATIOS[0] - 0.1 <= w / h <= ASPECT_RATIOS[1] + 0.1
    # no draw fits a 10x1000 strip at 90-100% of its area with ratio <= 4:3: the centre crop
    # of the widest allowed ratio, as torchvision falls back
    assert random_crop(rng, 10, 1000, (0.9, 1.0)) == (0, (1000 - 13) // 2, 10, 13)


def test_the_evaluation_crop_is_the_centre_after_resizing_the_short_side():
    image = np.zeros((40, 80, 3), np.uint8)
    image[:, 30:50] = 255  # a white band in the middle
    crop = centre_crop(image, 20, 1.0)  # short side 40 -> 20: 20 x 40, centre 20 x 20
    assert crop.shape == (20, 20, 3)
    assert crop[:, 6:14].min() == 255 and crop[:, :3].max() == 0 and crop[:, -3:].max() == 0
    assert centre_crop(image, 28, 0.875).shape == (28, 28, 3)


@pytest.fixture(scope="module")
def straight(data_dir, tmp_path_factory):
    """An uninterrupted 6-step pretraining (checkpoints at 2, 4, 6) and its result."""
    workdir = tmp_path_factory.mktemp("pretrain")
    result = pretrain_and_evaluate(pretrain_config(data_dir), workdir)
    return workdir, result


def final_params(workdir):
    return checkpointing.Checkpoints(workdir).restore_variables(6)["params"]


def test_pretraining_reports_top1_top5_and_writes_metrics_and_weights(straight):
    workdir, result = straight
    assert result["examples"] == 20
    assert 0 <= result["top1"] <= result["top5"] <= 1
    assert json.loads((workdir / "eval" / "step_6" / "metrics.json").read_text()) == result
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "train/loss" in r] == [2, 4, 6]
    assert all("train/top1" in r and "train/steps_per_s" in r for r in lines if "train/loss" in r)
    assert lines[-1]["eval/top1"] == result["top1"]
    assert (workdir / "tensorboard").is_dir()
    assert result["weights"] == str(workdir / "backbone.npz")


def test_a_resumed_pretraining_ends_with_the_uninterrupted_parameters(data_dir, straight, tmp_path):
    workdir = tmp_path / "resumed"
    shutil.copytree(straight[0], workdir)
    for path in ("checkpoints/4", "checkpoints/6", "eval", "backbone.npz"):
        shutil.rmtree(workdir / path) if (workdir / path).is_dir() else (workdir / path).unlink()
    result = pretrain_and_evaluate(pretrain_config(data_dir), workdir)
    for a, b in zip(
        jax.tree.leaves(final_params(workdir)),
        jax.tree.leaves(final_params(straight[0])),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)
    assert result["top1"] == straight[1]["top1"]
    # a finished run returns at once
    assert pretrain_and_evaluate(pretrain_config(data_dir), workdir)["top1"] == result["top1"]


def test_the_weights_file_loads_into_the_detector_exactly_covering_the_body(data_dir, straight):
    workdir, _ = straight
    flat, covers = weights.load(workdir / "backbone.npz", backbone="tiny_fpn")
    assert covers == ["params/backbone/body"]
    assert not [k for k in flat if "_bn" in k]  # BatchNorm folded into the convs

    config = tiny_config(data_dir)
    fresh = initial_variables(config, build_model(config))
    config.model.init_checkpoint = str(workdir / "backbone.npz")
    loaded = initial_variables(config, build_model(config))
    body = flax.traverse_util.flatten_dict(loaded["params"]["backbone"]["body"], sep="/")
    assert {f"params/backbone/body/{k}" for k in body} == set(flat)
    for key, value in body.items():
        np.testing.assert_array_equal(value, flat[f"params/backbone/body/{key}"])
    # everything else (the FPN layers, the heads) keeps its fresh initialisation
    rest = flax.traverse_util.flatten_dict(loaded["params"], sep="/")
    before = flax.traverse_util.flatten_dict(fresh["params"], sep="/")
    for key, value in rest.items():
        if not key.startswith("backbone/body/"):
            np.testing.assert_array_equal(value, before[key])


def test_the_folded_convs_compute_the_trained_network(straight, rng):
    """The detector's plain body with the file's weights gives the pretrained body's features
    (BatchNorm in evaluation mode), on images of another size than pretraining's."""
    workdir, _ = straight
    variables = checkpointing.Checkpoints(workdir).restore_variables(6)
    flat, _ = weights.load(workdir / "backbone.npz")
    folded = flax.traverse_util.unflatten_dict(
        {tuple(k.split("/")[3:]): v for k, v in flat.items()}
    )
    images = jnp.asarray(rng.normal(0, 1, (2, 64, 96, 3)), jnp.float32)
    trained = TinyFPN(batch_norm=True).apply(
        {c: v["backbone"] for c, v in variables.items()}, images, pyramid=False
    )
    plain = TinyFPN().apply({"params": {"body": folded}}, images, pyramid=False)
    largest = float(jnp.abs(trained).max())
    assert largest > 0
    # folding reorders the arithmetic: float32 rounding of the layers' magnitude, not of each
    # output (an output near 0 among outputs near 100 differs by ~1e-5 on some CPUs)
    np.testing.assert_allclose(plain, trained, rtol=1e-4, atol=1e-6 * largest)


def test_a_weights_file_of_another_backbone_is_refused_naming_both(straight):
    with pytest.raises(ConfigError, match=r"holds a 'tiny_fpn' backbone.*backbone is 'vgg16'"):
        weights.load(straight[0] / "backbone.npz", backbone="vgg16")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("data.crop_scale", (0.9, 0.5), "crop_scale: need low <= high"),
        ("data.image_size", 16, "image_size 16 is smaller than the backbone's coarsest stride"),
        ("data.eval_crop", 1.5, "config.data.eval_crop"),
        ("train.learning_rate", -1.0, "config.train.learning_rate"),
        ("model.backbone", "vgg19", "config.model.backbone"),
    ],
)
def test_pretraining_config_values_that_cannot_work_are_named(data_dir, field, value, message):
    config = pretrain_config(data_dir)
    section, name = field.split(".")
    config[section][name] = value
    with pytest.raises(ConfigError, match=message):
        check_pretrain_config(config)


def test_a_misspelt_field_and_a_wrong_class_count_are_named(data_dir, tmp_path):
    config = pretrain_config(data_dir)
    with config.train.unlocked():
        config.train.lerning_rate = 0.1
    with pytest.raises(ConfigError, match="did you mean 'learning_rate'"):
        check_pretrain_config(config)
    config = pretrain_config(data_dir)
    config.model.num_classes = 10
    with pytest.raises(ConfigError, match="num_classes is 10 but shapes_classes/64 has 16"):
        pretrain_and_evaluate(config, tmp_path / "wrong")


@pytest.mark.parametrize("config_file", PRETRAIN_CONFIGS, ids=lambda p: p.stem)
def test_pretraining_config_files_pass_the_checks_and_build(config_file):
    config = config_from_file(config_file)
    check_pretrain_config(config)
    model = build_classifier(config)
    size = config.data.image_size
    shapes_ = jax.eval_shape(
        lambda k: model.init(k, jnp.zeros((1, size, size, 3), jnp.uint8)), jax.random.key(0)
    )
    assert shapes_["params"]["classifier"]["kernel"].shape[-1] == config.model.num_classes
    assert set(shapes_["params"]) == {"backbone", "classifier"}


@pytest.mark.parametrize("backbone", ["resnet50_c4", "zf"])
def test_a_pretrained_backbone_computes_the_same_in_the_detector(backbone, rng):
    """The classifier's backbone with trained BatchNorm (statistics away from their start), in
    evaluation mode, and the detector's with the written weights (a ResNet's frozen BatchNorm,
    ZF's folded convs) give the same features."""
    config = pretrain_config("/unused")
    config.model.backbone = backbone
    classifier = build_classifier(config)
    images = jnp.asarray(rng.uniform(0, 255, (2, 48, 64, 3)), jnp.uint8)
    variables = jax.jit(classifier.init)(jax.random.key(0), images)

    def moved(path, x):  # running statistics as training leaves them: not 0 and 1
        if path[-1].key == "var":
            return x * jnp.asarray(rng.uniform(0.5, 2.0, x.shape), x.dtype)
        return x + jnp.asarray(rng.uniform(-0.05, 0.05, x.shape), x.dtype)

    stats = jax.tree_util.tree_map_with_path(moved, variables["batch_stats"])
    variables = {**variables, "batch_stats": stats}
    features = functools.partial(
        classifier.apply, method=lambda m, x: m.backbone(x.astype(jnp.float32) / 255)
    )
    trained = jax.jit(features)(variables, images)
    flat, covers = backbone_weights(jax.device_get(variables))
    detector = get_backbone(backbone, dtype=jnp.float32, frozen_stages=0, kernels="xla")
    tree = flax.traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})
    plain = jax.jit(detector.apply)(
        {c: v["backbone"] for c, v in tree.items()}, images.astype(jnp.float32) / 255
    )
    assert covers == sorted({"/".join(k.split("/")[:3]) for k in flat})
    assert float(jnp.abs(trained).max()) > 0
    np.testing.assert_allclose(plain, trained, rtol=2e-4, atol=2e-4 * float(jnp.abs(trained).max()))
