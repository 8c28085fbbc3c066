import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from frcnn_jax.config import model_config
from frcnn_jax.data import data_config, make_batches
from frcnn_jax.evaluation.runner import evaluate_detections
from frcnn_jax.models import FasterRCNN, build_model
from frcnn_jax.models.roi_heads import Detections
from tests.tiny import jitted


@pytest.fixture(scope="module")
def test_split(tmp_path_factory):
    data = data_config(
        name="shapes/320",
        data_dir=str(tmp_path_factory.mktemp("tfds")),
        shapes_num_examples={"train": 2, "validation": 2, "test": 7},
        min_size=160,  # the 320 px images are evaluated at half size: scale matters
        max_size=160,
        canvas=(160, 160),
        max_boxes=12,
        workers=0,
    )
    return data


def _perfect(batch):
    """Ground truth back in original pixels as detections; proposals = ground truth."""
    scale = np.where(batch.inputs.valid, batch.inputs.scale, 1.0)[:, None, None]  # padding: scale 0
    valid = batch.inputs.gt_valid & ~batch.inputs.gt_difficult
    detections = Detections(
        boxes=batch.inputs.gt_boxes / scale,
        scores=valid.astype(np.float32),
        classes=np.where(valid, batch.inputs.gt_classes, 1),
        valid=valid,
    )
    return detections, (batch.inputs.gt_boxes, batch.inputs.gt_valid)


def test_perfect_detector_scores_one_and_writes_the_report(test_split, tmp_path):
    batches, info = make_batches(test_split, "test", batch_size=3, train=False)
    metrics = evaluate_detections(
        _perfect, batches, info, proposals=True, workdir=tmp_path, title="shapes test"
    )
    assert metrics["num_images"] == 7
    assert metrics["voc"]["mAP"] == pytest.approx(1.0)
    assert metrics["coco"]["AP"] == pytest.approx(1.0)
    assert metrics["recall"]["recall@100"]["0.95"] == 1.0
    names = {p.name for p in tmp_path.iterdir()}
    assert {"metrics.json", "table.md", "pr", "recall.png", "detections_coco.json"} <= names
    assert (
        json.loads((tmp_path / "metrics.json").read_text())["voc"]["mAP"] == metrics["voc"]["mAP"]
    )
    assert "| 100.0 |" in (tmp_path / "table.md").read_text()
    assert len(list((tmp_path / "pr").glob("*.png"))) == len(info.class_names)
    # boxes in the COCO file are in original (320 px) image coordinates
    coco = json.loads((tmp_path / "detections_coco.json").read_text())
    assert max(d["bbox"][0] + d["bbox"][2] for d in coco) > 160


def test_runs_the_real_model(test_split):
    model = model_config(
        backbone="tiny",
        num_classes=8,
        head=dict(widths=(32, 32)),
        rpn=dict(channels=32, test_pre_nms_top_n=200, test_post_nms_top_n=50),
    )
    config = ml_collections.ConfigDict({"model": model})
    model = build_model(config)
    batches, info = make_batches(test_split, "test", batch_size=4, train=False)
    images = jnp.zeros((4, 160, 160, 3))
    init = jitted(model, FasterRCNN.detect, init=True)
    variables = init(jax.random.key(0), images, jnp.full((4, 2), 160))
    detect = jax.jit(
        lambda image, size, scale: model.apply(
            variables, image, size, scale, method=FasterRCNN.detect
        )
    )

    def detect_fn(batch):
        return detect(batch.inputs.image, batch.inputs.image_size, batch.inputs.scale), None

    metrics = evaluate_detections(detect_fn, batches, info, coco=False)
    assert metrics["num_images"] == 7
    assert 0.0 <= metrics["voc"]["mAP"] < 0.2  # random weights


def test_a_split_without_any_ground_truth_is_an_error_naming_it(test_split):
    batches, info = make_batches(test_split, "test", batch_size=3, train=False)
    unlabelled = (
        b._replace(inputs=b.inputs._replace(gt_valid=np.zeros_like(b.inputs.gt_valid)))
        for b in batches
    )
    with pytest.raises(ValueError, match="voc/2012 test, step 5: no ground-truth box in 7 images"):
        evaluate_detections(_perfect, unlabelled, info, coco=False, title="voc/2012 test, step 5")
