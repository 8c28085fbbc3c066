"""experiments/swap_proposals.py's hybrid detector: the RPN of one set of weights feeding the
detection network of another, as an unshared-features model."""

import sys
import types

import jax
import numpy as np
import pytest

from frcnn_jax.models import FasterRCNN, build_model
from tests.tiny import ROOT, jitted, one_image, tiny_model_config

sys.path.insert(0, str(ROOT / "experiments"))
import swap_proposals

sys.path.remove(str(ROOT / "experiments"))


def test_a_hybrid_has_one_weights_proposals_and_the_others_detection_network():
    shared_config = tiny_model_config()
    unshared_config = tiny_model_config()
    unshared_config.model.rpn.shared_features = False
    shared, unshared = build_model(shared_config), build_model(unshared_config)
    images, sizes = one_image()
    init = jitted(shared, FasterRCNN.detect, init=True)
    a, b = (init(jax.random.key(seed), images, sizes) for seed in (0, 1))
    own = jitted(shared, FasterRCNN.detect, return_proposals=True)
    hybrid = jitted(unshared, FasterRCNN.detect, return_proposals=True)

    def same(x, y):
        return all(jax.tree.leaves(jax.tree.map(np.array_equal, x, y)))

    # the hybrid of one set of weights with itself is that detector
    assert same(hybrid(swap_proposals.hybrid(a, a), images, sizes), own(a, images, sizes))
    # a's proposals, b's detection network: a's proposals, not a's detections
    (detections, proposals) = hybrid(swap_proposals.hybrid(a, b), images, sizes)
    (a_detections, a_proposals), (b_detections, _) = own(a, images, sizes), own(b, images, sizes)
    assert same(proposals, a_proposals)
    assert not same(detections, a_detections) and not same(detections, b_detections)
    # every variable of the unshared model is filled, nothing else
    shapes = jax.eval_shape(
        jitted(unshared, FasterRCNN.detect, init=True), jax.random.key(0), images, sizes
    )
    built = swap_proposals.hybrid(a, b)
    assert jax.tree.structure(shapes) == jax.tree.structure(built)


def test_a_hybrid_refuses_variables_it_cannot_split():
    params = {"params": {k: {} for k in ("backbone", "box_head", "predictor", "rpn_head")}}
    with pytest.raises(SystemExit, match="batch_stats"):
        swap_proposals.hybrid({**params, "batch_stats": {}}, params)


def test_hybrids_of_rows_that_differ_in_training_alone():
    def row(train=(), test=()):
        return types.SimpleNamespace(train=train, test=test)

    weight = row((("model.rpn.box_weight", 10.0),))  # Table 9: a loss weight, training only
    fields = swap_proposals.hybrid_fields({"a": row(), "b": weight})
    assert ("model.rpn.box_weight", 10.0) not in fields  # each training keeps its own
    assert ("model.rpn.shared_features", False) in fields
    # the anchors shape what the weights compute: an RPN and a detection network trained
    # with other anchors are no hybrid
    anchors = row((("model.rpn.aspect_ratios", (1.0,)),))
    with pytest.raises(SystemExit, match="differ in model or test fields"):
        swap_proposals.hybrid_fields({"a": row(), "b": anchors})
    # nor are rows evaluated differently
    count = row(test=(("model.rpn.test_post_nms_top_n", 100),))
    with pytest.raises(SystemExit, match="differ in model or test fields"):
        swap_proposals.hybrid_fields({"a": row(), "b": count})
    same = swap_proposals.hybrid_fields({"a": count, "b": count})
    assert ("model.rpn.test_post_nms_top_n", 100) in same
