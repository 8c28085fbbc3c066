"""The paper's ablation switches (Tables 2 and 10) on a tiny model: test-time proposals without
NMS, without the objectness ranking or without regression; an RPN with its own backbone
(unshared features); and the one-stage variant (every anchor a RoI, no RPN)."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from frcnn_jax import ops
from frcnn_jax.config import base_config, check_config
from frcnn_jax.models import FasterRCNN, build_model, rpn
from tests import paper_settings
from tests.tiny import BOXES, CLASSES, jitted, one_image, tiny_model_config

# ---------------------------------------------------------------- proposals without NMS


def _max_iou_between_kept(boxes, valid):
    boxes = np.asarray(boxes)[np.asarray(valid)]
    iou = np.array(ops.pairwise_iou(boxes, boxes))
    np.fill_diagonal(iou, 0)
    return iou.max(initial=0.0)


@pytest.mark.parametrize("jit", [False, True])
def test_without_nms_the_best_scored_boxes_are_kept_overlaps_included(jit):
    anchors = jnp.array(
        [[0, 0, 10, 10], [1, 0, 11, 10], [50, 50, 60, 60], [0, 0, 0.5, 0.5], [20, 20, 30, 30]],
        jnp.float32,
    )  # the 4th is smaller than min_size
    scores = jnp.array([0.9, 0.8, 0.7, 0.95, 0.7])  # a tie between the 3rd and the 5th
    fn = paper_settings.generate_proposals
    if jit:
        fn = jax.jit(fn, static_argnames=("pre_nms_top_n", "post_nms_top_n", "nms_threshold"))
    kwargs = dict(image_height=100, image_width=100, pre_nms_top_n=5, min_size=1.0)
    got = fn(scores, jnp.zeros((5, 4)), anchors, post_nms_top_n=3, nms_threshold=None, **kwargs)
    # by score among the valid boxes; the tie goes to the lower position (2 before 4)
    np.testing.assert_array_equal(got.boxes, anchors[jnp.array([0, 1, 2])])
    np.testing.assert_array_equal(got.valid, [True, True, True])
    np.testing.assert_allclose(got.scores, [0.9, 0.8, 0.7])
    with_nms = fn(scores, jnp.zeros((5, 4)), anchors, post_nms_top_n=3, nms_threshold=0.7, **kwargs)
    np.testing.assert_array_equal(with_nms.boxes, anchors[jnp.array([0, 2, 4])])  # 1 suppressed
    # more slots than candidates: padding after the valid ones
    padded = fn(scores, jnp.zeros((5, 4)), anchors, post_nms_top_n=7, nms_threshold=None, **kwargs)
    np.testing.assert_array_equal(padded.valid, [True] * 4 + [False] * 3)
    np.testing.assert_array_equal(padded.boxes[4:], 0.0)
    assert np.all(np.isneginf(padded.scores[4:]))


def test_without_nms_all_padding_gives_no_proposals():
    anchors = jnp.zeros((4, 4), jnp.float32)  # zero-area: all below min_size
    got = paper_settings.generate_proposals(
        jnp.zeros(4),
        jnp.zeros((4, 4)),
        anchors,
        image_height=10,
        image_width=10,
        pre_nms_top_n=4,
        post_nms_top_n=2,
        nms_threshold=None,
        min_size=1.0,
    )
    assert not np.any(got.valid)


def test_multilevel_without_nms_ranks_across_levels():
    levels = [
        jnp.array([[0, 0, 10, 10], [1, 1, 11, 11]], jnp.float32),
        jnp.array([[0, 0, 10, 10], [40, 40, 80, 80]], jnp.float32),
    ]
    scores = [jnp.array([0.1, 0.9]), jnp.array([0.5, 0.2])]
    got = paper_settings.generate_proposals(
        scores,
        [jnp.zeros((2, 4))] * 2,
        levels,
        image_height=100,
        image_width=100,
        pre_nms_top_n=2,
        post_nms_top_n=3,
        nms_threshold=None,
    )
    np.testing.assert_allclose(got.scores, [0.9, 0.5, 0.2])
    np.testing.assert_array_equal(got.boxes[1], [0, 0, 10, 10])


# ---------------------------------------------------------------- the detector's switches


@pytest.fixture(scope="module")
def tiny():
    """(config, variables, images, sizes) of the tiny model, randomly initialised."""
    config = tiny_model_config()
    images, sizes = one_image()
    model = build_model(config)
    variables = jitted(model, FasterRCNN.detect, init=True)(jax.random.key(0), images, sizes)
    return config, variables, images, sizes


def _with(config, **rpn):
    config = config.copy_and_resolve_references()
    config.model.rpn.update(rpn)
    return build_model(config)


def _proposals(model, variables, images, sizes):
    detect = jitted(model, FasterRCNN.detect, return_proposals=True)
    _, (boxes, valid) = detect(variables, images, sizes)
    return np.asarray(boxes[0]), np.asarray(valid[0])


def _anchors(model, images):
    canvas = images.shape[1:3]
    maps = [jnp.zeros((1, canvas[0] // s, canvas[1] // s, 1)) for s in model.strides]
    return np.asarray(
        jnp.concatenate(rpn.anchors_per_level(model.rpn, maps, model.strides, canvas))
    )


def test_test_time_switches_leave_training_unchanged(tiny):
    config, variables, images, sizes = tiny
    gt = (jnp.asarray(BOXES[None]), jnp.asarray(CLASSES[None]), jnp.ones((1, 3), bool))
    key = jax.random.key(3)
    plain = jitted(build_model(config), FasterRCNN.losses)(variables, images, sizes, *gt, key)
    switched = jitted(
        _with(config, test_nms=False, test_ranking="random", test_regression=False),
        FasterRCNN.losses,
    )(variables, images, sizes, *gt, key)
    for name in plain:
        np.testing.assert_array_equal(plain[name], switched[name])


def test_without_nms_at_test_overlapping_proposals_stay(tiny):
    config, variables, images, sizes = tiny
    boxes, valid = _proposals(build_model(config), variables, images, sizes)
    assert _max_iou_between_kept(boxes, valid) <= 0.7 + 1e-6
    boxes, valid = _proposals(_with(config, test_nms=False), variables, images, sizes)
    assert valid.sum() == config.model.rpn.test_post_nms_top_n
    assert _max_iou_between_kept(boxes, valid) > 0.7


def test_random_ranking_draws_a_fixed_unranked_sample(tiny):
    config, variables, images, sizes = tiny
    model = _with(config, test_ranking="random")
    boxes, valid = _proposals(model, variables, images, sizes)
    again, _ = _proposals(model, variables, images, sizes)
    np.testing.assert_array_equal(boxes, again)  # detection stays a function of its inputs
    ranked, _ = _proposals(_with(config, test_nms=False), variables, images, sizes)
    assert valid.sum() == config.model.rpn.test_post_nms_top_n
    assert len({tuple(b) for b in boxes[valid]} & {tuple(b) for b in ranked}) < valid.sum() // 2
    assert _max_iou_between_kept(boxes, valid) > 0.7  # no NMS either


def test_without_regression_the_proposals_are_anchors(tiny):
    config, variables, images, sizes = tiny
    model = _with(config, test_regression=False)
    boxes, valid = _proposals(model, variables, images, sizes)
    anchors = np.asarray(ops.clip_boxes(_anchors(model, images), height=128, width=128))
    regressed, _ = _proposals(build_model(config), variables, images, sizes)
    anchor_set = {tuple(a) for a in anchors}
    assert all(tuple(b) in anchor_set for b in boxes[valid])
    assert not all(tuple(b) in anchor_set for b in regressed)


def test_unknown_ranking_is_named(tiny):
    config, variables, images, sizes = tiny
    with pytest.raises(ValueError, match=r"rpn\.test_ranking"):
        _with(config, test_ranking="shuffled").apply(
            variables, images, sizes, method=FasterRCNN.detect
        )


@pytest.mark.slow
def test_unshared_features_train_the_rpn_and_the_detector_apart():
    config = tiny_model_config()
    config.model.rpn.shared_features = False
    model = build_model(config)
    images, sizes = one_image()
    variables = jitted(model, FasterRCNN.detect, init=True)(jax.random.key(0), images, sizes)
    params = variables["params"]
    assert jax.tree.structure(params["rpn_backbone"]) == jax.tree.structure(params["backbone"])
    gt = (jnp.asarray(BOXES[None]), jnp.asarray(CLASSES[None]), jnp.ones((1, 3), bool))

    def grads(names):
        def loss(p):
            terms = model.apply(
                {"params": p}, images, sizes, *gt, jax.random.key(1), method=FasterRCNN.losses
            )
            return sum(terms[n] for n in names)

        g = jax.jit(jax.grad(loss))(params)
        return {k: float(optax_norm(v)) for k, v in g.items()}

    rpn = grads(("rpn_objectness", "rpn_box"))
    head = grads(("fast_rcnn_class", "fast_rcnn_box"))
    assert rpn["rpn_backbone"] > 0 and rpn["backbone"] == 0
    assert head["backbone"] > 0 and head["rpn_backbone"] == 0
    # the proposals come from the RPN's own backbone: changing the detector's leaves them
    other = {**params, "backbone": jax.tree.map(lambda x: x * 0.5, params["backbone"])}

    detect = jitted(model, FasterRCNN.detect, return_proposals=True)

    def proposals(p):
        return detect({"params": p}, images, sizes)[1][0]

    np.testing.assert_array_equal(proposals(params), proposals(other))


def optax_norm(tree):
    return jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(tree)))


@pytest.mark.slow
def test_one_stage_classifies_every_anchor_without_an_rpn():
    config = tiny_model_config(rois="anchors")
    model = build_model(config)
    images, sizes = one_image()
    variables = jitted(model, FasterRCNN.detect, init=True)(jax.random.key(0), images, sizes)
    assert "rpn_head" not in variables["params"]
    gt = (jnp.asarray(BOXES[None]), jnp.asarray(CLASSES[None]), jnp.ones((1, 3), bool))
    losses = jitted(model, FasterRCNN.losses)
    terms = losses(variables, images, sizes, *gt, jax.random.key(1))
    assert float(terms["rpn_objectness"]) == 0 and float(terms["rpn_box"]) == 0
    assert float(terms["fast_rcnn_class"]) > 0 and float(terms["fast_rcnn_box"]) > 0

    def total(p):
        return sum(losses({"params": p}, images, sizes, *gt, jax.random.key(1)).values())

    grads = jax.jit(jax.grad(total))(variables["params"])
    assert float(optax_norm(grads["backbone"])) > 0
    detections, (rois, valid) = jax.jit(
        lambda v: model.apply(v, images, sizes, return_proposals=True, method=FasterRCNN.detect)
    )(variables)
    anchors = np.asarray(ops.clip_boxes(_anchors(model, images), height=128, width=128))
    np.testing.assert_array_equal(rois[0], anchors)  # every anchor, in anchor order
    assert valid.shape == (1, len(anchors)) and bool(valid.all())
    assert detections.boxes.shape == (1, model.head.max_detections, 4)


def test_variant_combinations_that_cannot_work_are_named():
    def config(**fields):
        c = base_config()
        for dotted, value in fields.items():
            *path, last = dotted.split("__")
            node = c
            for key in path:
                node = node[key]
            node[last] = value
        return c

    check_config(
        config(
            train__scheme="alternating",
            train__alternating_phases=2,
            model__rpn__shared_features=False,
        )
    )
    check_config(config(model__rpn__shared_features=False))  # joint training, two backbones
    check_config(config(model__head__rois="anchors"))
    cases = [
        (dict(train__scheme="alternating", train__alternating_phases=2), "alternating_phases=2"),
        (dict(train__scheme="alternating", model__rpn__shared_features=False), "shared_features"),
        (dict(train__alternating_phases=3), r"alternating_phases must be one of \(2, 4\)"),
        (dict(model__head__rois="anchors", train__scheme="alternating"), "rois='anchors'"),
        (dict(model__head__rois="anchors", model__rpn__shared_features=False), "one-stage"),
    ]
    for fields, message in cases:
        with pytest.raises(ValueError, match=message):
            check_config(config(**fields))


@pytest.mark.slow
def test_unshared_features_start_both_backbones_from_imported_weights(tmp_path):
    from frcnn_jax import weights
    from frcnn_jax.training.initial import initial_variables

    config = base_config()
    config.model = tiny_model_config().model
    config.data.canvas = (128, 128)
    init = jitted(build_model(config), FasterRCNN.detect, init=True)
    imported = init(jax.random.key(7), *one_image())["params"]["backbone"]
    flat = {
        f"params/backbone/{k}": np.asarray(v)
        for k, v in flax.traverse_util.flatten_dict(imported, sep="/").items()
    }
    weights.save(tmp_path / "backbone.npz", flat, ["params/backbone"])
    config.model.rpn.shared_features = False
    config.model.init_checkpoint = str(tmp_path / "backbone.npz")
    params = initial_variables(config, build_model(config))["params"]
    for net in ("backbone", "rpn_backbone"):
        for got, want in zip(jax.tree.leaves(params[net]), jax.tree.leaves(imported), strict=True):
            np.testing.assert_array_equal(got, want)
