"""Using a trained detector: run.json, `Detector` (orientation canvases, one compile per canvas,
boxes in original pixels), `draw`, and the predict command on good and bad files."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from absl.app import UsageError
from PIL import Image

from frcnn_jax import cli, errors, exported, rundir, training
from frcnn_jax.inference import Detector, draw
from frcnn_jax.models import FasterRCNN
from tests.data.test_folders import _bomb_png
from tests.tiny import ROOT, jitted, tiny_config

pytestmark = pytest.mark.slow  # whole trainings and subprocess runs


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished tiny training run (6 steps)."""
    workdir = tmp_path_factory.mktemp("run")
    training.train_and_evaluate(tiny_config(tmp_path_factory.mktemp("tfds")), workdir)
    return workdir


def picture(height, width, seed):
    """A flat background with a few filled rectangles (something to detect)."""
    rng = np.random.default_rng(seed)
    image = np.full((height, width, 3), 60, np.uint8)
    for _ in range(3):
        x, y = rng.integers(0, width // 2), rng.integers(0, height // 2)
        image[y : y + height // 3, x : x + width // 3] = rng.integers(100, 255, 3)
    return image


def test_the_run_directory_describes_itself(run):
    config, class_names, category_ids = rundir.read(run)
    assert class_names[0] == "rectangle" and len(class_names) == 8 == len(category_ids)
    assert config.model.rpn.anchor_sizes == ((12, 24), (40, 80), (128, 192))
    assert config.data.canvas == (128, 128) and config.model.num_classes == 8
    with pytest.raises(FileNotFoundError, match="not a frcnn_jax training directory"):
        rundir.read(run / "eval")


def test_detector_keeps_the_scale_of_both_orientations_and_compiles_once_per_canvas(run):
    trained = Detector.from_workdir(run)
    config, names, _ = rundir.read(run)
    config.data.canvas, config.data.min_size, config.data.max_size = (96, 160), 96, 160
    config.model.head.score_threshold = 0.0  # every one of the 100 slots is a detection
    detector = Detector.from_config(config, trained.variables, class_names=names)
    images = [picture(120, 200, 0), picture(200, 120, 1), picture(60, 80, 2), picture(80, 60, 3)]
    results = detector(images)
    assert detector.traces == 2  # one landscape canvas (96, 160), one portrait (160, 96)
    detector(images[::-1])
    assert detector.traces == 2
    for image, result in zip(images, results, strict=True):
        canvas, size, scale = detector.prepare(image)
        assert min(size) == 96 and canvas.shape[:2] == (
            (96, 160) if size[1] > size[0] else (160, 96)
        )
        assert len(result["boxes"]) == 100 and set(result) == {
            "boxes",
            "scores",
            "classes",
            "class_names",
        }
        height, width = image.shape[:2]
        boxes = result["boxes"]
        assert (boxes >= 0).all() and (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()
        want = jitted(detector.model, FasterRCNN.detect)(
            detector.variables,
            jnp.asarray(canvas[None], jnp.float32),
            jnp.asarray(size[None]),
            jnp.asarray([scale]),
        )
        np.testing.assert_allclose(boxes, np.asarray(want.boxes[0]), atol=1e-3)
        np.testing.assert_allclose(result["scores"], np.asarray(want.scores[0]), atol=1e-6)
        assert list(result["class_names"]) == [names[c - 1] for c in np.asarray(want.classes[0])]
    single = detector(images[0])
    np.testing.assert_array_equal(single["boxes"], results[0]["boxes"])
    with pytest.raises(ValueError, match="uint8"):
        detector(np.zeros((10, 10, 3), np.float32))


def test_batched_calls_give_the_same_detections(run):
    one = Detector.from_workdir(run)
    three = Detector.from_workdir(run, batch_size=3)
    images = [picture(128, 128, s) for s in range(4)]
    for a, b in zip(one(images), three(images), strict=True):
        np.testing.assert_allclose(a["boxes"], b["boxes"], atol=1e-3)
    assert three.traces == 1


def test_a_given_canvas_replaces_the_configs_for_both_orientations(run):
    detector = Detector.from_workdir(run, canvas=(64, 96))  # the run's canvas: (128, 128)
    for shape, want in (((200, 300), (64, 96)), ((300, 200), (96, 64))):
        canvas, size, _ = detector.prepare(picture(*shape, 0))
        assert canvas.shape[:2] == want and size[0] <= want[0] and size[1] <= want[1]
    assert cli.canvas(["64", "96"]) == (64, 96) and cli.canvas(None) is None
    with pytest.raises(UsageError, match="--canvas must be H,W"):
        cli.canvas(["64"])


def test_draw_marks_detections_above_the_threshold_only():
    image = picture(100, 150, 0)
    detections = {
        "boxes": np.array([[10, 10, 60, 50]], np.float32),
        "scores": np.array([0.9]),
        "classes": np.array([2]),
        "class_names": np.array(["ellipse"]),
    }
    drawn = np.asarray(draw(image, detections, score_threshold=0.5))
    assert drawn.shape == image.shape and (drawn != image).any()
    assert (drawn[10, 10:60] != image[10, 10:60]).any()  # the top edge of the box
    np.testing.assert_array_equal(np.asarray(draw(image, detections, score_threshold=0.95)), image)


def test_predict_command_writes_json_and_pictures_and_skips_bad_files(run, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(picture(90, 140, 0)).save(folder / "wide.jpg")
    Image.fromarray(picture(140, 90, 1)).save(folder / "tall.png")
    good = (folder / "wide.jpg").read_bytes()
    (folder / "cut.jpg").write_bytes(good[: len(good) // 3])  # truncated
    (folder / "notes.jpg").write_text("not an image")
    _bomb_png(folder / "bomb.png")
    out = tmp_path / "out"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "frcnn_jax.predict",
            f"--workdir={run}",
            f"--output={out}",
            "--score_threshold=0.0",
            "--canvas=96,144",
            str(folder),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert done.returncode == 3, done.stdout + done.stderr  # three files skipped
    for name in ("cut.jpg", "notes.jpg", "bomb.png"):
        assert name in done.stderr
    assert "bomb.png: oversized image" in done.stderr  # refused from its header
    assert "images/s" in done.stderr
    entries = json.loads((out / "detections.json").read_text())
    assert {e["file"].rsplit("/", 1)[-1] for e in entries} == {"wide.jpg", "tall.png"}
    for entry in entries:
        assert set(entry) == {"file", "image_size", "class_name", "category_id", "score", "bbox"}
        x, y, w, h = entry["bbox"]
        assert w >= 0 and h >= 0 and x + w <= entry["image_size"][1] + 1e-3
        assert y + h <= entry["image_size"][0] + 1e-3
        assert 1 <= entry["category_id"] <= 8
    for name, source in (("wide", folder / "wide.jpg"), ("tall", folder / "tall.png")):
        annotated = np.asarray(Image.open(out / f"{name}.jpg"))
        assert annotated.shape == np.asarray(Image.open(source)).shape
        assert (annotated.astype(int) - np.asarray(Image.open(source))).any()
    assert sorted(p.name for p in out.iterdir()) == ["detections.json", "tall.jpg", "wide.jpg"]


EXPORTED_SCRIPT = """
import sys, numpy as np
from frcnn_jax.exported import load

detector = load(sys.argv[1])
inputs = np.load(sys.argv[2])
boxes, scores, classes, valid = detector.detect_canvas(inputs["canvas"], inputs["size"],
                                                       inputs["scale"])
np.savez(sys.argv[3], boxes=boxes, scores=scores, classes=classes, valid=valid)
whole = detector(inputs["image"])
assert whole["boxes"].shape[1] == 4 and len(whole["class_names"]) == len(whole["scores"])
heavy = sorted(m for m in ("flax", "tensorflow", "tensorflow_datasets", "grain", "PIL", "optax",
                           "frcnn_jax.models", "frcnn_jax.data") if m in sys.modules)
print("IMPORTED", heavy, detector.meta["platforms"], detector.meta["canvases"],
      detector.meta["kernels"])
"""


def test_exported_model_runs_with_jax_and_numpy_only_and_equals_the_detector(run, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    path = tmp_path / "model.jaxexport"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "frcnn_jax.export",
            f"--workdir={run}",
            f"--output={path}",
            "--canvas=96,128",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert "for cpu, cuda, tpu (canvases [[96, 128], [128, 96]]" in done.stdout

    config, names, _ = rundir.read(run)
    config.data.canvas, config.data.min_size, config.data.max_size = (96, 128), 96, 128
    config.model.head.score_threshold = 0.0
    trained = Detector.from_workdir(run)
    detector = Detector.from_config(config, trained.variables, class_names=names)
    image = picture(150, 110, 5)  # portrait: the (128, 96) canvas
    canvas, size, scale = detector.prepare(image)
    np.savez(
        tmp_path / "inputs.npz",
        canvas=canvas[None].astype(np.float32),
        size=size[None],
        scale=np.array([scale]),
        image=image,
    )
    script = tmp_path / "run_exported.py"
    script.write_text(EXPORTED_SCRIPT)
    ran = subprocess.run(
        [
            sys.executable,
            str(script),
            str(path),
            str(tmp_path / "inputs.npz"),
            str(tmp_path / "outputs.npz"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert ran.returncode == 0, ran.stderr
    assert "IMPORTED [] ['cpu', 'cuda', 'tpu']" in ran.stdout  # nothing but jax and numpy
    assert ran.stdout.rstrip().endswith("xla")  # traced with XLA's kernels, and says so
    got = np.load(tmp_path / "outputs.npz")
    want = jitted(detector.model, FasterRCNN.detect)(
        {**trained.variables},
        jnp.asarray(canvas[None], jnp.float32),
        jnp.asarray(size[None]),
        jnp.asarray([scale]),
    )
    # The exported model's score threshold is the trained config's (0.05), not this one's.
    keep = np.asarray(got["valid"][0])
    np.testing.assert_array_equal(
        keep, np.asarray(want.valid[0]) & (np.asarray(want.scores[0]) >= 0.05)
    )
    np.testing.assert_allclose(got["boxes"][0][keep], np.asarray(want.boxes[0])[keep], atol=1e-3)
    np.testing.assert_allclose(got["scores"][0][keep], np.asarray(want.scores[0])[keep], atol=1e-5)
    np.testing.assert_array_equal(got["classes"][0][keep], np.asarray(want.classes[0])[keep])
    data = bytearray(path.read_bytes())  # damaged: 64 bytes in the middle inverted
    for i in range(len(data) // 2 - 32, len(data) // 2 + 32):
        data[i] ^= 0xFF
    (tmp_path / "damaged.jaxexport").write_bytes(bytes(data))
    with pytest.raises(errors.DamagedFile, match=r"exported detector .*damaged.jaxexport"):
        exported.load(tmp_path / "damaged.jaxexport")


def test_the_readme_detector_example_runs(run, tmp_path, monkeypatch):
    readme = (ROOT / "README.md").read_text()
    (block,) = [
        part.split("```", 1)[0]
        for part in readme.split("```python\n")[1:]
        if "Detector.from_workdir" in part.split("```", 1)[0]
    ]
    monkeypatch.chdir(tmp_path)
    Image.fromarray(picture(100, 140, 0)).save("photo.jpg")
    block = block.replace('"runs/shapes_tiny"', repr(str(run)))
    namespace = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["result"]["boxes"].shape[1] == 4
    assert Image.open("annotated.jpg").size == (140, 100)
