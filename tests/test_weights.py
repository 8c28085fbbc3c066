"""torchvision weights: backbones and heads give torchvision's outputs, the whole COCO detector
gives its proposals and detections, loading is strict, and a weight file never runs code."""

import functools
import logging
import os
import pathlib
import pickle
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision

from frcnn_jax import errors, npz, weights
from frcnn_jax.models import VGG16, Res5Head, ResNet
from frcnn_jax.models.roi_heads import MLPHead
from frcnn_jax.npz import CHECKSUM

ROOT = pathlib.Path(__file__).resolve().parents[1]
torch.manual_seed(0)


def tree(flat, prefix):
    """The sub-tree of '/'-joined `flat` paths under `prefix`, unflattened."""
    inner = {k[len(prefix) + 1 :]: v for k, v in flat.items() if k.startswith(prefix + "/")}
    return flax.traverse_util.unflatten_dict(inner, sep="/")


def nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def assert_close(got, want, rtol=1e-4):
    got, want = np.asarray(got), np.asarray(want)
    np.testing.assert_allclose(got, want, atol=rtol * np.abs(want).max(), rtol=0)


def randomize_batch_norm(model):
    """Random BatchNorm statistics and affine terms, so that they matter to the test."""
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if hasattr(module, "running_var"):
            n = module.running_var.shape[0]
            module.running_mean.copy_(0.1 * torch.randn(n, generator=generator))
            module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            module.weight.data.copy_(0.5 * torch.rand(n, generator=generator) + 0.25)
            module.bias.data.copy_(0.1 * torch.randn(n, generator=generator))
    return model


@torch.no_grad()
def test_vgg16_features_and_fc6_fc7_equal_torchvisions():
    reference = torchvision.models.vgg16().eval()
    flat, covers = weights.from_torchvision(reference.state_dict(), arch="vgg16")
    assert covers == ["params/backbone", "params/box_head"]
    images = np.random.default_rng(0).normal(size=(2, 64, 96, 3)).astype(np.float32)
    got = jax.jit(VGG16().apply)({"params": tree(flat, "params/backbone")}, images)
    want = reference.features[:-1](nchw(images)).permute(0, 2, 3, 1).numpy()  # conv5_3, no pool5
    assert_close(got, want)
    pooled = np.random.default_rng(1).normal(size=(5, 7, 7, 512)).astype(np.float32)
    head = MLPHead((4096, 4096), 0.5, jnp.float32).apply(
        {"params": tree(flat, "params/box_head")}, pooled, train=False
    )
    want = reference.classifier[:5](nchw(pooled).flatten(1)).numpy()  # fc6, relu, drop, fc7, relu
    assert_close(head, want)


@pytest.mark.parametrize("depth", [50, 101])
@torch.no_grad()
def test_resnet_c4_and_fpn_bodies_equal_torchvisions(depth):
    reference = randomize_batch_norm(getattr(torchvision.models, f"resnet{depth}")()).eval()
    images = np.random.default_rng(0).normal(size=(1, 64, 96, 3)).astype(np.float32)
    x = reference.maxpool(reference.relu(reference.bn1(reference.conv1(nchw(images)))))
    stages = []
    for layer in (reference.layer1, reference.layer2, reference.layer3, reference.layer4):
        x = layer(x)
        stages.append(x.permute(0, 2, 3, 1).numpy())

    flat, _ = weights.from_torchvision(reference.state_dict(), arch=f"resnet{depth}", body="c4")
    variables = {
        "params": tree(flat, "params/backbone"),
        "batch_stats": tree(flat, "batch_stats/backbone"),
    }
    assert_close(jax.jit(ResNet(depth, num_stages=3).apply)(variables, images), stages[2])
    pooled = np.random.default_rng(1).normal(size=(3, 14, 14, 1024)).astype(np.float32)
    res5 = {
        "params": tree(flat, "params/box_head"),
        "batch_stats": tree(flat, "batch_stats/box_head"),
    }
    want = reference.layer4(nchw(pooled)).mean((2, 3)).numpy()
    res5_head = jax.jit(functools.partial(Res5Head(depth).apply, train=False))
    assert_close(res5_head(res5, pooled), want)

    flat, covers = weights.from_torchvision(
        reference.state_dict(), arch=f"resnet{depth}", body="fpn"
    )
    assert covers == ["params/backbone/body", "batch_stats/backbone/body"]
    variables = {
        "params": tree(flat, "params/backbone/body"),
        "batch_stats": tree(flat, "batch_stats/backbone/body"),
    }
    got = jax.jit(functools.partial(ResNet(depth, num_stages=4).apply, all_stages=True))(
        variables, images
    )
    for ours, theirs in zip(got, stages, strict=True):
        assert_close(ours, theirs)


def test_a_state_dict_of_another_model_is_named():
    state = torchvision.models.vgg16().state_dict()
    with pytest.raises(KeyError, match=r"no tensor .conv1\.weight"):
        weights.from_torchvision(state, arch="resnet50")
    state["extra.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"no place in frcnn_jax's model, e.g. \['extra.weight'\]"):
        weights.from_torchvision(state, arch="vgg16")
    with pytest.raises(ValueError, match="arch must be one of"):
        weights.from_torchvision(state, arch="alexnet")


def coco_reference():
    """torchvision's COCO detector with random weights, random frozen-BN statistics, class
    logits scaled up so that detections pass the 0.05 score threshold, and objectness logits
    scaled up so that proposals' scores are not all within float32 noise of 0.5."""
    reference = torchvision.models.detection.fasterrcnn_resnet50_fpn(
        weights=None, weights_backbone=None
    ).eval()
    randomize_batch_norm(reference.backbone.body)
    with torch.no_grad():
        reference.roi_heads.box_predictor.cls_score.weight.mul_(50.0)
        # objectness logits spread over a few units (not all ~0): fewer ties within noise
        reference.rpn.head.cls_logits.weight.mul_(100.0)
    return reference


def coco_model(num_classes, canvas):
    from frcnn_jax.config import config_from_file
    from frcnn_jax.models import FasterRCNN, build_model

    config = config_from_file(
        os.path.join(os.path.dirname(__file__), "..", "configs", "coco_r50_fpn.py")
    )
    config.model.num_classes = num_classes
    model = build_model(config)
    shapes = jax.eval_shape(
        lambda k: model.init(
            k, jnp.zeros((1, *canvas, 3)), jnp.array([canvas]), method=FasterRCNN.detect
        ),
        jax.random.key(0),
    )
    return model, jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)


@torch.no_grad()
def torchvision_run(reference, image):
    from torchvision.models.detection.rpn import concat_box_prediction_layers

    images, _ = reference.transform([torch.from_numpy(image).permute(2, 0, 1).float() / 255])
    assert images.tensors.shape[-2:] == image.shape[:2]  # the transform kept the pixels
    features = reference.backbone(images.tensors)
    rpn, levels = reference.rpn, list(features.values())
    objectness, deltas = rpn.head(levels)
    anchors = rpn.anchor_generator(images, levels)
    per_level = [o[0].numel() for o in objectness]
    objectness, deltas = concat_box_prediction_layers(objectness, deltas)
    boxes = rpn.box_coder.decode(deltas, anchors).view(1, -1, 4)
    proposals, scores = rpn.filter_proposals(boxes, objectness, images.image_sizes, per_level)
    detections, _ = reference.roi_heads(features, proposals, images.image_sizes)
    return proposals[0].numpy(), scores[0].numpy(), {k: v.numpy() for k, v in detections[0].items()}


def test_the_coco_detector_gives_torchvisions_proposals_and_detections():

    reference = coco_reference()
    image = np.random.default_rng(0).integers(0, 256, (800, 1088, 3), dtype=np.uint8)
    want_proposals, want_scores, want = torchvision_run(reference, image)

    model, variables = coco_model(90, (800, 1088))  # 91 outputs: labels = COCO category ids
    flat, covers = weights.from_torchvision(reference.state_dict(), arch="fasterrcnn_resnet50_fpn")
    variables = weights.restore_into(variables, flat, covers)
    sizes = jnp.array([[800, 1088]])

    def rpn_and_detect(module, images):
        features, rpn_features = module._features(images, sizes, train=False)
        canvas = images.shape[1:3]
        proposals, _ = module._proposals(features, rpn_features, canvas, sizes, None, train=False)
        return proposals, module.detect(images, sizes)

    with jax.default_matmul_precision("highest"):  # direct convolutions, as torch's
        rpn, detections = jax.jit(lambda v, x: model.apply(v, x, method=rpn_and_detect))(
            variables, jnp.asarray(image[None], jnp.float32)
        )
    valid = np.asarray(rpn.valid[0])
    proposals = np.asarray(rpn.boxes[0])[valid]
    scores = np.asarray(jax.nn.sigmoid(rpn.scores[0]))[valid]
    assert proposals.shape == want_proposals.shape == (1000, 4)
    # The same boxes, scores and order. Two libraries' float32 rounding differs by ~1e-6, so
    # where candidates' scores tie within that noise, which one ranks first, survives NMS or
    # makes a level's top 1000 may differ (torchvision's own sort orders exact ties either
    # way): a few boxes may be swapped or replaced, never more than 1%.
    distance = np.abs(proposals[:, None] - want_proposals[None]).max(-1)  # [ours, theirs]
    ours = distance.argmin(axis=0)
    matched = distance[ours, np.arange(1000)] < 1e-3
    assert matched.mean() >= 0.99, np.flatnonzero(~matched)
    np.testing.assert_allclose(scores[ours[matched]], want_scores[matched], atol=1e-5)
    ranks, tied = ours[matched], want_scores[matched]
    out_of_order = (np.diff(ranks) < 0) & (np.abs(np.diff(tied)) >= 1e-5)
    assert not out_of_order.any(), np.flatnonzero(out_of_order)
    # the best 50 in exactly the reference's order, but where two of them tie within float32
    # noise (scores near 1: the sigmoid packs them within 1e-7; which ranks first depends on
    # the compiler's rounding, e.g. XLA's optimisation level)
    gaps = np.abs(np.diff(want_scores[:51])) >= 1e-6
    apart = np.concatenate([[True], gaps[:49]]) & gaps
    assert apart.sum() >= 10  # 18 of the 50 here
    np.testing.assert_array_equal(ours[:50][apart], np.arange(50)[apart])
    keep = np.asarray(detections.valid[0])
    count = len(want["scores"])
    assert keep.sum() == count > 10
    boxes, scores, classes = (
        np.asarray(x[0])[keep] for x in (detections.boxes, detections.scores, detections.classes)
    )
    # The same detections in the same order, but for float32 near-ties: two detections whose
    # scores agree within 1e-5 may come out in either order (as the proposals above).
    distance = np.abs(boxes[:, None] - want["boxes"][None]).max(-1)  # [ours, theirs]
    distance[classes[:, None] != want["labels"][None]] = np.inf
    ours = distance.argmin(axis=0)
    assert sorted(ours) == list(range(count))  # one to one
    np.testing.assert_allclose(distance[ours, np.arange(count)], 0.0, atol=1e-2)
    np.testing.assert_allclose(scores[ours], want["scores"], atol=1e-4)
    moved = np.flatnonzero(ours != np.arange(count))
    assert np.all(np.abs(want["scores"][moved] - want["scores"][ours[moved]]) < 1e-5), moved


def test_other_class_counts_reinitialise_the_predictor_and_coco80_selects_rows(caplog):
    state = coco_reference().state_dict()
    flat, covers = weights.from_torchvision(state, arch="fasterrcnn_resnet50_fpn")
    _, variables = coco_model(8, (64, 64))
    with caplog.at_level(logging.WARNING):
        loaded = weights.restore_into(variables, flat, covers)
    message = " ".join(r.message for r in caplog.records)
    assert "re-initialised the predictor" in message
    assert "params/predictor/cls_score/kernel (1024, 91) -> (1024, 9)" in message
    np.testing.assert_array_equal(loaded["params"]["predictor"]["cls_score"]["kernel"], 0.0)
    np.testing.assert_array_equal(  # everything else loaded
        loaded["params"]["box_head"]["fc7"]["kernel"], flat["params/box_head/fc7/kernel"]
    )

    flat80, _ = weights.from_torchvision(state, arch="fasterrcnn_resnet50_fpn", coco80=True)
    _, variables = coco_model(80, (64, 64))
    loaded = weights.restore_into(variables, flat80, covers)["params"]["predictor"]
    weight = state["roi_heads.box_predictor.cls_score.weight"].numpy()
    box_weight = state["roi_heads.box_predictor.bbox_pred.weight"].numpy()
    for label, category in ((0, 0), (1, 1), (12, 13), (80, 90)):  # TFDS label + 1 -> COCO id
        np.testing.assert_array_equal(loaded["cls_score"]["kernel"][:, label], weight[category])
        np.testing.assert_array_equal(
            loaded["bbox_pred"]["kernel"][:, 4 * label : 4 * label + 4],
            box_weight[4 * category : 4 * category + 4].T,
        )
    assert len(weights.COCO_CATEGORY_IDS) == 80 and weights.COCO_CATEGORY_IDS[-1] == 90


def test_loading_is_strict_and_names_the_tensor(tmp_path):
    _, variables = coco_model(8, (64, 64))
    flat = flax.traverse_util.flatten_dict(variables, sep="/")
    full = ["params", "batch_stats"]
    name = "params/box_head/fc6/kernel"
    missing = {k: v for k, v in flat.items() if k != name}
    with pytest.raises(
        ValueError, match=r"lacks \['params/box_head/fc6/kernel'\].*\(12544, 1024\)"
    ):
        weights.restore_into(variables, missing, full)
    with pytest.raises(ValueError, match=r"tensors not in the model: \['params/extra/kernel'\]"):
        weights.restore_into(variables, {**flat, "params/extra/kernel": np.zeros(2)}, full)
    wrong = {**flat, name: np.zeros((12544, 512), np.float32)}
    with pytest.raises(
        ValueError,
        match=r"fc6/kernel has shape \(12544, 512\) in the file, "
        r"the model expects \(12544, 1024\)",
    ):
        weights.restore_into(variables, wrong, full)
    # A backbone-only file leaves the rest freshly initialised; a round trip through a file.
    body = {k: v + 1 for k, v in flat.items() if k.startswith("params/backbone/body/")}
    path = tmp_path / "body.npz"
    weights.save(path, body, ["params/backbone/body"])
    loaded = weights.restore_into(variables, *weights.load(path))
    np.testing.assert_array_equal(loaded["params"]["backbone"]["body"]["conv1"]["kernel"], 1.0)
    np.testing.assert_array_equal(loaded["params"]["rpn_head"]["conv"]["kernel"], 0.0)
    npz.save(tmp_path / "other.npz", body)  # checksummed, but no __covers__
    with pytest.raises(errors.DamagedFile, match="not a frcnn_jax weight file"):
        weights.load(tmp_path / "other.npz")


def test_a_damaged_or_unchecksummed_weight_file_is_refused_naming_it(tmp_path):
    flat = {"params/backbone/conv1/kernel": np.arange(4096, dtype=np.float32).reshape(64, 64)}
    path = tmp_path / "w.npz"
    weights.save(path, flat, ["params/backbone"])
    assert weights.load(path)[1] == ["params/backbone"]
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 2 - 32, len(data) // 2 + 32):  # inside the array's bytes
        data[i] ^= 0xFF
    (tmp_path / "flipped.npz").write_bytes(bytes(data))
    with pytest.raises(errors.DamagedFile, match=r"flipped.npz: .*(checksum|unreadable)"):
        weights.load(tmp_path / "flipped.npz")
    (tmp_path / "cut.npz").write_bytes(path.read_bytes()[:1000])
    with pytest.raises(errors.DamagedFile, match=r"cut.npz: unreadable"):
        weights.load(tmp_path / "cut.npz")
    altered = {CHECKSUM: np.load(path)[CHECKSUM], "__covers__": np.array(["params/backbone"])}
    np.savez(tmp_path / "altered.npz", **altered, **{k: v + 1 for k, v in flat.items()})
    with pytest.raises(errors.DamagedFile, match=r"altered.npz: its contents do not match"):
        weights.load(tmp_path / "altered.npz")
    np.savez(tmp_path / "plain.npz", __covers__=np.array(["params/backbone"]), **flat)
    with pytest.raises(errors.DamagedFile, match=r"plain.npz: no checksum"):
        weights.load(tmp_path / "plain.npz")
    with pytest.raises(errors.MissingFile, match=r"no such file .*absent.npz"):
        weights.load(tmp_path / "absent.npz")


def run_import(*args):
    env = {**os.environ, "PYTHONPATH": os.path.join(os.path.dirname(__file__), "..")}
    return subprocess.run(
        [sys.executable, "-m", "frcnn_jax.import_weights", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.slow
def test_import_weights_converts_a_file_and_never_runs_code_from_one(tmp_path):
    source, output = tmp_path / "r50.pth", tmp_path / "r50.npz"
    torch.save(torchvision.models.resnet50().state_dict(), source)
    done = run_import("--arch=resnet50", "--body=fpn", f"--input={source}", f"--output={output}")
    assert done.returncode == 0, done.stderr
    assert (
        "layer4.2.conv3.weight" in done.stdout and "converted 265 tensors" in done.stderr
    )  # 53 convs, 53 x 4 BN
    flat, covers = weights.load(output)
    assert covers == ["params/backbone/body", "batch_stats/backbone/body"]
    assert flat["params/backbone/body/conv1/kernel"].shape == (7, 7, 3, 64)

    marker, bad = tmp_path / "pwned", tmp_path / "bad.pth"
    with open(bad, "wb") as f:
        pickle.dump({"conv1.weight": _Exploit(marker)}, f)
    refused = run_import("--arch=resnet50", f"--input={bad}", f"--output={tmp_path / 'x.npz'}")
    assert refused.returncode != 0 and "refused" in refused.stderr
    assert not marker.exists() and not (tmp_path / "x.npz").exists()
    wrong = run_import("--arch=vgg16", f"--input={source}", f"--output={tmp_path / 'y.npz'}")
    assert wrong.returncode != 0 and "features.0.weight" in wrong.stderr


def test_the_time_to_map_twin_converts_to_frcnn_jax_exactly(monkeypatch):
    """experiments/time_to_map.py's plain twin (torchvision's FasterRCNN around the tiny FPN)
    converted with from_torchvision(arch="fasterrcnn_tiny_fpn") is frcnn_jax's detector: the
    same pyramid maps, RPN head outputs and box-head predictions for the same RoIs."""
    monkeypatch.setenv("FRCNN_JAX_MALLOC", "default")  # the script's import: no re-execution
    sys.path.insert(0, str(ROOT / "experiments"))
    try:
        import time_to_map
    finally:
        sys.path.remove(str(ROOT / "experiments"))
    from frcnn_jax.config import config_from_file
    from frcnn_jax.models import build_model
    from frcnn_jax.training.initial import initial_variables

    config = config_from_file(ROOT / "configs" / "shapes_512.py")
    config.data.update(min_size=256, max_size=256, canvas=(256, 256))
    torch.manual_seed(0)
    twin = time_to_map.torch_twin(config, "plain").eval()
    flat, covers = weights.from_torchvision(twin.state_dict(), arch="fasterrcnn_tiny_fpn")
    model = build_model(config)
    variables = weights.restore_into(initial_variables(config, model), flat, covers)
    image = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    rois = np.array([[10, 20, 90, 120], [0, 0, 255, 255], [100, 30, 140, 60]], np.float32)

    with torch.no_grad():
        x = torch.from_numpy(image).permute(2, 0, 1).float()[None] / 255
        x = (x - torch.tensor(twin.transform.image_mean)[:, None, None]) / torch.tensor(
            twin.transform.image_std
        )[:, None, None]
        maps = list(twin.backbone(x).values())
        objectness, deltas = twin.rpn.head(maps)
        pooled = twin.roi_heads.box_roi_pool(
            {str(i): m for i, m in enumerate(maps)}, [torch.from_numpy(rois)], [(256, 256)]
        )
        logits, box_deltas = twin.roi_heads.box_predictor(twin.roi_heads.box_head(pooled))

    sizes = jnp.array([[256, 256]])

    def run(module, images):
        features, _ = module._features(images, sizes, train=False)
        heads = [module.rpn_head(f) for f in features]
        return (
            features,
            heads,
            module._box_predictions(features, jnp.asarray(rois)[None], train=False),
        )

    with jax.default_matmul_precision("highest"):  # direct convolutions, as torch's
        features, heads, (got_logits, got_deltas) = jax.jit(
            lambda v, x: model.apply(v, x, method=run)
        )(variables, jnp.asarray(image[None], jnp.float32))
    assert len(features) == len(maps) == 3
    for got, want in zip(features, maps, strict=True):
        assert_close(nchw(got), want)
    for (got_cls, got_box), want_cls, want_box in zip(heads, objectness, deltas, strict=True):
        # torchvision [1, A, H, W] / [1, 4A, H, W]; frcnn_jax location-major, anchor minor
        assert_close(np.ravel(got_cls), want_cls.permute(0, 2, 3, 1).reshape(-1))
        assert_close(np.ravel(got_box), want_box.permute(0, 2, 3, 1).reshape(-1))
    assert_close(got_logits[0], logits.numpy())
    assert_close(got_deltas[0].reshape(3, -1), box_deltas.numpy())
