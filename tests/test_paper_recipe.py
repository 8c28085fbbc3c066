"""The paper's / py-faster-rcnn's VOC recipe, one hand-made case per setting (the README's
"paper recipe" table points here). The RPN's border rule is tested in tests/models/test_targets.py,
every field's override in tests/test_config.py."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.object_detection import voc as tfds_voc

from frcnn_jax import training
from frcnn_jax.config import config_from_file
from frcnn_jax.data import checks, folders, pipeline, sources, transforms
from frcnn_jax.data.config import data_config
from frcnn_jax.evaluation.recall import ProposalRecall
from frcnn_jax.evaluation.voc import voc_iou
from frcnn_jax.models import FasterRCNN, build_model
from frcnn_jax.models.rpn import level_anchors
from tests import paper_settings, py_faster_rcnn
from tests.tiny import jitted, one_image, tiny_model_config

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def voc(name="voc07_vgg16"):
    return config_from_file(CONFIGS / f"{name}.py")


def test_voc_backgrounds_start_at_iou_zero_as_py_faster_rcnn():
    gt = np.array([[0, 0, 100, 100]], np.float32)
    proposals = np.array([[95, 0, 195, 100], [60, 0, 160, 100]], np.float32)  # IoU 0.026, 0.25
    head = build_model(voc()).head
    assert head.background_iou == (0.0, 0.5)

    def backgrounds(background_iou):
        out = paper_settings.sample_proposals(
            jax.random.key(0),
            proposals,
            np.ones(2, bool),
            gt,
            np.ones(1, np.int32),
            np.ones(1, bool),
            batch_size=8,
            background_iou=background_iou,
        )
        rois = np.asarray(out.rois)[np.asarray(out.valid) & (np.asarray(out.classes) == 0)]
        return {tuple(r) for r in rois.tolist()}

    assert backgrounds(head.background_iou) == {tuple(p) for p in proposals.tolist()}
    assert backgrounds((0.1, 0.5)) == {tuple(proposals[1].tolist())}  # Fast R-CNN's option


def test_zf_pools_six_by_six_and_vgg_seven_by_seven():
    for name, size, channels in (("voc07_zf", 6, 256), ("voc07_vgg16", 7, 512)):
        model = build_model(voc(name))
        assert model.head.output_size == size
        variables = jax.eval_shape(
            lambda k, m=model: m.init(
                k, jnp.zeros((1, 224, 224, 3)), jnp.array([[224, 224]]), method=FasterRCNN.detect
            ),
            jax.random.key(0),
        )
        fc6 = variables["params"]["box_head"]["fc6"]["kernel"]
        assert fc6.shape == (size * size * channels, 4096)


def test_end2end_schedule_is_py_faster_rcnns_solver():
    train = voc().train
    assert (train.batch_size, train.num_steps, train.lr_steps) == (2, 70000, (50000,))
    schedule = training.optim.learning_rate_schedule(train)
    np.testing.assert_allclose([schedule(49999), schedule(50000)], [1e-3, 1e-4], rtol=1e-6)


def test_alternating_phases_are_py_faster_rcnns_alt_opt_solvers():
    train = voc().train.copy_and_resolve_references()
    train.scheme = "alternating"
    stages = training.alternating.alternating_schedules(train)
    assert [n for n, _ in stages] == [80000, 40000, 80000, 40000]
    assert [s.lr_steps for _, s in stages] == [(60000,), (30000,), (60000,), (30000,)]
    assert [s.batch_size for _, s in stages] == [1, 2, 1, 2]  # RPN: 1 image, Fast R-CNN: 2
    rates = [training.optim.learning_rate_schedule(s) for _, s in stages]
    np.testing.assert_allclose([float(r(29999)) for r in rates], [1e-3] * 4, rtol=1e-6)
    np.testing.assert_allclose(float(rates[1](30000)), 1e-4, rtol=1e-6)
    assert training.alternating.final_step(train) == 240000
    # Without stage lengths, num_steps is shared 1/3, 1/6, 1/3, 1/6 and the decays scaled.
    train.alternating_phase_steps, train.alternating_phase_lr_steps = (), ()
    train.alternating_phase_batch_sizes = ()
    train.num_steps, train.lr_steps = 120, (90,)
    stages = training.alternating.alternating_schedules(train)
    assert [(n, s.lr_steps) for n, s in stages] == [
        (40, (30,)),
        (20, (15,)),
        (40, (30,)),
        (20, (15,)),
    ]
    assert training.alternating.final_step(train) == 120


def test_alternating_phases_start_as_in_the_paper():
    def net(tag):
        return {k: tag for k in ("backbone", "rpn_head", "box_head", "predictor")}

    initial, finals = net("init"), [net("s1"), net("s2"), net("s3")]
    start = training.alternating.alternating_start
    assert start(1, initial, []) == initial
    assert start(2, initial, finals[:1]) == initial
    assert start(2, initial, finals[:1], phase2_init="phase1") == finals[0]
    # phase 3: the detector's convs and head, a fresh RPN head
    assert start(3, initial, finals[:2]) == {**net("s2"), "rpn_head": "init"}
    # phase 4: phase 3's network (fc6/fc7 from phase 2), a fresh predictor
    assert start(4, initial, finals) == {**net("s3"), "predictor": "init"}


def test_voc0712_evaluates_on_voc2007_test_and_label_less_splits_are_refused():
    c = voc("voc0712_vgg16")
    assert training.evaluation.eval_data_name(c) == "voc/2007" and c.eval.split == "test"
    data = sources.with_name(c.data, training.evaluation.eval_data_name(c))
    small = dict(min_size=64, max_size=96, canvas=(64, 96), workers=0)
    with tfds.testing.mock_data(num_examples=3):
        data.update(small)
        _, info = pipeline.make_batches(data, "test", batch_size=1, train=False)
        assert info.num_examples == 3 and len(info.class_names) == 20
        with pytest.raises(ValueError, match=r"split 'test' of voc/2012 has no ground truth"):
            pipeline.make_batches(
                data_config(name="voc/2012", **small), "test", batch_size=1, train=False
            )
        with pytest.raises(ValueError, match=r"'test' of coco/2017 has no ground truth"):
            pipeline.make_batches(
                data_config(name="coco/2017", **small), "test", batch_size=1, train=False
            )


def test_tfds_voc_and_a_voc_folder_give_the_same_boxes(tmp_path):
    annotation = tmp_path / "000001.xml"
    annotation.write_text(
        "<annotation><filename>000001.jpg</filename><size><width>353</width><height>500"
        "</height><depth>3</depth></size>"
        "<object><name>dog</name><pose>Left</pose><truncated>1</truncated><difficult>0"
        "</difficult><bndbox><xmin>48</xmin><ymin>240</ymin><xmax>195</xmax><ymax>371</ymax>"
        "</bndbox></object>"
        "<object><name>person</name><pose>Left</pose><truncated>1</truncated><difficult>0"
        "</difficult><bndbox><xmin>1</xmin><ymin>12</ymin><xmax>353</xmax><ymax>500</ymax>"
        "</bndbox></object></annotation>"
    )
    from_folder = np.array(
        [box for _, box, _ in folders.read_voc_annotation(annotation)["objects"]]
    )
    objects = list(tfds_voc._get_example_objects(str(annotation)))  # TFDS's own parser
    record = {
        "image": np.zeros((500, 353, 3), np.uint8),
        "objects": {
            "bbox": np.array([o["bbox"] for o in objects], np.float32),  # as stored: float32
            "label": np.array([11, 14]),
            "is_difficult": np.zeros(2, bool),
        },
        "_voc_one_based": True,  # what make_batches tags TFDS voc records with
    }
    _, boxes, *_ = transforms.to_example(record, 0, checks.Problems())
    np.testing.assert_allclose(boxes, from_folder, atol=1e-3)
    np.testing.assert_allclose(from_folder[0], [47, 239, 195, 371])


def test_voc_iou_equals_the_devkits_plus_one_iou():
    # VOCevaldet.m: 1-based inclusive pixel boxes, widths x2 - x1 + 1. Ground truth read as
    # (xmin - 1, ..., xmax) and detections in continuous pixels give the same IoU with the
    # plain continuous formula as the devkit gives on the 1-based boxes it reads/writes.
    rng = np.random.default_rng(0)
    lo = rng.integers(1, 200, (50, 2))
    gt_one_based = np.concatenate([lo, lo + rng.integers(0, 150, (50, 2))], axis=1)
    det = rng.uniform(0, 300, (40, 4))
    det[:, 2:] = det[:, :2] + rng.uniform(1, 150, (40, 2))
    gt = gt_one_based.astype(np.float64) - np.array([1, 1, 0, 0])
    det_one_based = det + np.array([1, 1, 0, 0])
    np.testing.assert_allclose(
        voc_iou(det, gt), voc_iou(det_one_based, gt_one_based, plus_one=True), atol=1e-12
    )


@pytest.mark.slow
def test_two_thousand_test_proposals_for_evaluation_and_recall():
    config = tiny_model_config()
    config.model.rpn.test_pre_nms_top_n = 6000
    config.model.rpn.test_post_nms_top_n = 2000
    model = build_model(config)
    images, sizes = one_image()
    variables = jitted(model, FasterRCNN.detect, init=True)(jax.random.key(0), images, sizes)
    detect = jitted(model, FasterRCNN.detect, return_proposals=True)
    detections, (boxes, valid) = detect(variables, images, sizes)
    assert boxes.shape == (1, 2000, 4) and detections.boxes.shape == (1, 100, 4)
    kept = int(valid.sum())  # what NMS leaves of a random RPN's boxes; padding after them
    assert kept > 300 and not np.asarray(valid[0, kept:]).any()
    recall = ProposalRecall(num_proposals=(300, 1000, 2000))
    gt = np.array([[12, 14, 52, 60], [64, 20, 116, 52]], np.float32)
    recall.add(
        np.asarray(boxes[0]),
        gt,
        proposal_valid=np.asarray(valid[0]),
        gt_valid=np.ones(2, bool),
        gt_difficult=np.zeros(2, bool),
    )
    result = recall.result()
    assert result.recall.shape == (3, len(result.iou_thresholds))
    assert (np.diff(result.recall, axis=0) >= 0).all()  # more proposals never lose recall


def test_biases_learn_at_twice_the_rate_without_weight_decay():
    train = voc().train
    assert train.bias_lr_factor == 2.0 and train.weight_decay == 5e-4
    params = {
        "fc": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)},
        "conv1": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)},
    }
    trainable = {"fc": {"kernel": True, "bias": True}, "conv1": {"kernel": False, "bias": False}}
    tx = training.optim.make_optimizer(train, trainable)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["fc"]["bias"], -2e-3, rtol=1e-6)  # 2 x lr, no decay
    np.testing.assert_allclose(updates["fc"]["kernel"], -1e-3 * (1 + 5e-4), rtol=1e-6)
    assert not np.asarray(updates["conv1"]["kernel"]).any()  # frozen: no update, no decay
    assert not np.asarray(updates["conv1"]["bias"]).any()


@pytest.mark.slow
def test_rpn_min_size_counts_original_image_pixels_as_py_faster_rcnn():
    """py-faster-rcnn drops proposals under 16 x im_scale resized pixels (16 px of the original
    image); with `min_size_original=False` min_size counts resized pixels (torchvision)."""
    images, sizes = one_image()
    scales = jnp.array([2.0])

    def proposals(min_size, original):
        config = tiny_model_config()
        config.model.rpn.min_size = min_size
        config.model.rpn.min_size_original = original
        config.model.rpn.test_post_nms_top_n = 1000
        model = build_model(config)
        variables = jitted(model, FasterRCNN.detect, init=True)(jax.random.key(0), images, sizes)
        detect = jitted(model, FasterRCNN.detect, return_proposals=True)
        _, (boxes, valid) = detect(variables, images, sizes, scales)
        return np.asarray(boxes), np.asarray(valid)

    original, resized = proposals(20.0, True), proposals(40.0, False)
    np.testing.assert_array_equal(original[1], resized[1])
    np.testing.assert_allclose(original[0], resized[0])
    assert original[1].sum() < proposals(20.0, False)[1].sum()
    sides = original[0][original[1]][:, 2:] - original[0][original[1]][:, :2]
    assert (sides >= 40.0).all()


def test_voc_anchors_are_py_faster_rcnns():
    """py-faster-rcnn: `generate_anchors()` (inclusive boxes around (7.5, 7.5)) shifted by
    16 px per cell, location-major; continuous boxes add 1 to x2 and y2."""
    rpn = build_model(voc()).rpn
    assert rpn.anchor_style == "py-faster-rcnn"
    anchors = np.asarray(level_anchors(rpn, 0, 38, 50, 16))
    want = py_faster_rcnn.anchors(38, 50)  # generate_anchors(), shifted
    np.testing.assert_array_equal(anchors, want)
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    np.testing.assert_array_equal(centres[:9], 8.0)  # the first cell's centre
    torchvision_style = np.asarray(level_anchors(build_model(voc("coco_r50_fpn")).rpn, 0, 2, 2, 4))
    np.testing.assert_array_equal((torchvision_style[:3, :2] + torchvision_style[:3, 2:]) / 2, 0.0)
