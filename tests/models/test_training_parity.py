"""Training parity: from the same weights and the same batch, frcnn_jax's detectors compute the
reference's training losses, the same gradient for every trained parameter and the same SGD
step (the references: experiments/parity_references.py).

- `configs/coco_r50_fpn.py` against torchvision's `fasterrcnn_resnet50_fpn`, whole.
- `configs/voc07_vgg16.py` (the paper's VGG-16 detector) against torchvision's parts and
  py-faster-rcnn's RPN layers where torchvision has none.
"""

import pathlib
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from frcnn_jax.models import trainable_mask
from frcnn_jax.training.step import train_step

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "experiments"))
from parity_references import (
    DETECTORS,
    LOSS_NAMES,
    batch,
    differing_proposals,
    losses_on_proposals,
    reference_and_ours,
    relative_errors,
    training_proposals,
)

pytestmark = pytest.mark.slow  # whole trainings and subprocess runs


def flat_params(tree):
    return {k: np.asarray(v) for k, v in flax.traverse_util.flatten_dict(tree, sep="/").items()}


@pytest.fixture(scope="module", params=sorted(DETECTORS))
def parity(request, tmp_path_factory):
    """Both sides' losses, gradients and parameters after one training step."""
    directory = tmp_path_factory.mktemp("parity")
    reference, model, state, tx = reference_and_ours(request.param, directory)
    ours_batch, (images, targets) = batch(DETECTORS[request.param][2])

    # frcnn_jax's training proposals; the reference's own, for the proposal test
    (boxes, valid), ours_proposals = training_proposals(model, state, ours_batch)
    with torch.no_grad():
        reference.losses(images, targets)
    their_proposals = list(reference.proposals)

    # the reference on frcnn_jax's proposals: losses, gradients, one step of its recipe's SGD
    want = reference.losses(images, targets, ours_proposals)
    sum(want.values()).backward()
    named = list(reference.module.named_parameters())
    trained = [(k, p) for k, p in named if p.requires_grad]
    want_grads = reference.convert({k: p.grad for k, p in trained})
    reference.optimizer(trained).step()
    want_params = reference.convert({k: p.detach().clone() for k, p in named})

    # frcnn_jax: the config as trained, from the same weights
    names = ("image", "image_size", "gt_boxes", "gt_classes", "gt_valid")

    def losses(params):  # the joint training objective
        variables = {"params": params, **state.frozen}
        inputs = [getattr(ours_batch, k) for k in names]
        key, scale = jax.random.key(0), ours_batch.scale
        terms = model.apply(variables, *inputs, key, scale, method=type(model).losses)
        return sum(terms.values()), terms

    def on_given_proposals(params):  # the same objective on the proposals above
        terms = losses_on_proposals(model, params, state.frozen, ours_batch, boxes, valid)
        return sum(terms.values())

    def step(state, batch):
        return train_step(state, batch, jax.random.key(0), model=model, tx=tx)

    with jax.default_matmul_precision("highest"):  # direct convolutions, as torch's
        _, got = jax.jit(losses)(state.params)
        grads = jax.jit(jax.grad(on_given_proposals))(state.params)
        stepped, metrics = jax.jit(step)(state, ours_batch)
    trainable = flat_params(trainable_mask(model, {"params": state.params}))
    first = flat_params(state.params)
    return dict(
        proposals=(ours_proposals, their_proposals),
        got={k: float(v) for k, v in got.items()},
        want={k: float(v.detach()) for k, v in want.items()},
        metrics={k: float(metrics[k]) for k in LOSS_NAMES},
        got_grads=flat_params(grads),
        want_grads=want_grads,
        got_params=flat_params(stepped.params),
        want_params=want_params,
        frozen_params={k: v for k, v in first.items() if not trainable[k]},
        params=state.params,
        tx=tx,
        trainable=trainable,
        reference=reference,
    )


def test_training_proposals_equal_the_references_but_for_near_ties(parity):
    ours, theirs = parity["proposals"]
    assert [len(p) for p in ours] == [len(p) for p in theirs]
    assert min(len(p) for p in ours) > 100
    # a box kept by one side and its near-tied neighbour by the other: at most 1%
    assert differing_proposals(ours, theirs) <= 0.01 * sum(len(p) for p in ours)


def test_the_four_training_losses_equal_the_references(parity):
    for name in LOSS_NAMES:
        got, want = parity["got"][name], parity["want"][name]
        np.testing.assert_allclose(got, want, rtol=1e-5, err_msg=name)
        # the training step's own metrics are these losses
        assert parity["metrics"][name] == pytest.approx(got, rel=1e-6)
    assert min(parity["want"].values()) > 0  # every term has something to compare


def test_every_trained_parameter_gets_the_references_gradient(parity):
    got, want = parity["got_grads"], parity["want_grads"]
    assert got.keys() == want.keys()
    trained = {k for k, v in parity["trainable"].items() if v}
    errors = relative_errors(got, {k: want[k] for k in trained})
    worst = max(errors, key=errors.get)
    assert errors[worst] <= 1e-4, f"worst gradient: {worst}, error {errors[worst]:.2e} of its max"
    assert parity["reference"].kinks_cleared < 1000  # of tens of thousands of ReLU units


def test_frozen_parameters_get_no_gradient_on_either_side(parity):
    reference = parity["reference"]
    theirs, ours = reference.frozen
    frozen = {k for k, p in reference.module.named_parameters() if not p.requires_grad}
    assert len(frozen) == reference.num_frozen and all(n.startswith(theirs) for n in frozen)
    ours_frozen = {k for k, v in parity["trainable"].items() if not v}
    assert ours_frozen == {k for k in parity["got_grads"] if k.startswith(ours)}
    assert len(ours_frozen) == len(frozen)
    for name in ours_frozen:
        assert not parity["got_grads"][name].any(), name
        np.testing.assert_array_equal(parity["got_params"][name], parity["frozen_params"][name])


def test_one_sgd_step_gives_the_references_parameters(parity):
    got, want = parity["got_params"], parity["want_params"]
    worst = max(want, key=lambda k: np.abs(got[k] - want[k]).max())
    error = np.abs(got[worst] - want[worst]).max()
    assert error <= 1e-5, f"worst parameter after the step: {worst}, error {error:.2e}"


def test_the_optimizer_updates_as_the_references_recipe(parity):
    """The updates themselves, which the parameters above hold only to float32 rounding of
    the parameters: two steps (momentum at work) on the reference's gradients, against
    torch.optim.SGD in float64 with the recipe's parameter groups."""
    reference = parity["reference"]
    trained = [(k, p) for k, p in reference.module.named_parameters() if p.requires_grad]
    want_updates = [{}, {}]
    for name, original in trained:  # one at a time (SGD is elementwise): VGG-16's fc6 is 0.8 GB
        start = original.detach().double().clone().requires_grad_()
        start.grad = original.grad.double()
        sgd = reference.optimizer([(name, start)])  # the recipe's group for this name
        for update in want_updates:  # the same gradient twice: the second carries momentum
            before = start.detach().clone()
            sgd.step()
            update[name] = (start.detach() - before).float()  # the difference in float64: exact
        del start, sgd, before
    want_updates = [reference.convert(update) for update in want_updates]

    tx, params = parity["tx"], parity["params"]
    their_grads = flax.traverse_util.unflatten_dict(
        {tuple(k.split("/")): jnp.asarray(v) for k, v in parity["want_grads"].items()}
    )
    opt_state = tx.init(params)
    frozen = [k for k, v in parity["trainable"].items() if not v]
    for step, want in enumerate(want_updates):
        updates, opt_state = tx.update(their_grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        got = flat_params(updates)
        errors = relative_errors(got, want)
        worst = max(errors, key=errors.get)
        assert errors[worst] <= 1e-5, f"update {step}: worst {worst}, error {errors[worst]:.2e}"
        assert not any(got[k].any() for k in frozen)  # frozen: no update, no decay
