"""Training parity: from the same weights and the same batch, frcnn_jax's detectors compute the
reference's training losses, the same gradient for every trained parameter and the same SGD
step (the references: experiments/parity_references.py).

- `configs/coco_r50_fpn.py` against torchvision's `fasterrcnn_resnet50_fpn`, whole.
- `configs/voc07_vgg16.py` (the paper's VGG-16 detector) against torchvision's parts and
  py-faster-rcnn's RPN layers where torchvision has none.

Both sides of a detector hold several GB (VGG-16: its parameters, gradients, stepped parameters
and optimizer state on each side, ~10 GB at the peak), so `compare` runs in a child process and
hands the tests only what they check: losses, proposals and an error per tensor. The test
process (a pytest-xdist worker beside another) keeps none of it.
"""

import pathlib
import pickle
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "experiments"))
from parity_references import DETECTORS, differing_proposals  # noqa: E402

pytestmark = pytest.mark.slow  # whole trainings and subprocess runs


def flat_params(tree):
    import flax

    return {k: np.asarray(v) for k, v in flax.traverse_util.flatten_dict(tree, sep="/").items()}


def compare(name, directory):
    """Everything the tests below check for detector `name`, computed in this (child) process:
    both sides' losses and proposals, and per tensor the relative error of the gradients, the
    largest difference after one SGD step and the relative error of two optimizer updates."""
    import flax
    import jax
    import jax.numpy as jnp
    import optax
    import torch
    from parity_references import (
        LOSS_NAMES,
        batch,
        losses_on_proposals,
        reference_and_ours,
        relative_errors,
        training_proposals,
    )

    from frcnn_jax.models import trainable_mask
    from frcnn_jax.training.step import train_step

    reference, model, state, tx = reference_and_ours(name, directory)
    ours_batch, (images, targets) = batch(DETECTORS[name][2])

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

    # frcnn_jax: the config as trained, from the same weights; its losses are the training
    # step's metrics (the joint objective, `FasterRCNN.losses`, on its own proposals)
    def on_given_proposals(params):  # the same objective on the proposals above
        terms = losses_on_proposals(model, params, state.frozen, ours_batch, boxes, valid)
        return sum(terms.values())

    def step(state, batch):
        return train_step(state, batch, jax.random.key(0), model=model, tx=tx)

    with jax.default_matmul_precision("highest"):  # direct convolutions, as torch's
        grads = jax.jit(jax.grad(on_given_proposals))(state.params)
        stepped, metrics = jax.jit(step)(state, ours_batch)
    trainable = flat_params(trainable_mask(model, {"params": state.params}))
    frozen = [k for k, v in trainable.items() if not v]
    got_grads = flat_params(grads)
    first = flat_params(state.params)
    got_params = flat_params(stepped.params)
    del stepped
    result = dict(
        proposals=(ours_proposals, their_proposals),
        want={k: float(v.detach()) for k, v in want.items()},
        metrics={k: float(metrics[k]) for k in LOSS_NAMES},
        grad_names=(sorted(got_grads), sorted(want_grads)),
        grad_errors=relative_errors(
            got_grads, {k: want_grads[k] for k in trainable if trainable[k]}
        ),
        kinks_cleared=reference.kinks_cleared,
        trainable={k: bool(v) for k, v in trainable.items()},
        reference_frozen=(
            reference.frozen,
            reference.num_frozen,
            sorted(k for k, p in named if not p.requires_grad),
        ),
        frozen_grad_moves={k: bool(got_grads[k].any()) for k in got_grads if k in frozen},
        frozen_param_moves={k: not np.array_equal(got_params[k], first[k]) for k in frozen},
        step_differences={
            k: float(np.abs(got_params[k] - w).max()) for k, w in want_params.items()
        },
    )
    del got_params, first, want_params, got_grads

    # The optimizer's updates, which the parameters above hold only to float32 rounding of the
    # parameters: two steps (momentum at work) on the reference's gradients, against
    # torch.optim.SGD in float64 with the recipe's parameter groups.
    want_updates = [{}, {}]
    for name_, original in trained:  # one at a time (SGD is elementwise): VGG-16's fc6 is 0.8 GB
        start = original.detach().double().clone().requires_grad_()
        start.grad = original.grad.double()
        sgd = reference.optimizer([(name_, start)])  # the recipe's group for this name
        for update in want_updates:  # the same gradient twice: the second carries momentum
            before = start.detach().clone()
            sgd.step()
            update[name_] = (start.detach() - before).float()  # the difference in float64: exact
        del start, sgd, before
    want_updates = [reference.convert(update) for update in want_updates]
    del reference, named, trained
    params = state.params
    their_grads = flax.traverse_util.unflatten_dict(
        {tuple(k.split("/")): jnp.asarray(v) for k, v in want_grads.items()}
    )
    del want_grads
    opt_state = tx.init(params)
    result["update_errors"], result["frozen_updates"] = [], []
    for want in want_updates:
        updates, opt_state = tx.update(their_grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        got_updates = flat_params(updates)
        result["update_errors"].append(relative_errors(got_updates, want))
        result["frozen_updates"].append([k for k in frozen if got_updates[k].any()])
    return result


@pytest.fixture(scope="module", params=sorted(DETECTORS))
def parity(request, tmp_path_factory):
    """`compare`'s result for one detector, from a child process."""
    directory = tmp_path_factory.mktemp("parity")
    out = directory / "result.pkl"
    code = (
        "import pickle, sys; from tests.models.test_training_parity import compare; "
        "pickle.dump(compare(sys.argv[1], sys.argv[2]), open(sys.argv[3], 'wb'))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, request.param, str(directory), str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    with out.open("rb") as f:
        return pickle.load(f)


def test_training_proposals_equal_the_references_but_for_near_ties(parity):
    ours, theirs = parity["proposals"]
    assert [len(p) for p in ours] == [len(p) for p in theirs]
    assert min(len(p) for p in ours) > 100
    # a box kept by one side and its near-tied neighbour by the other: at most 1%
    assert differing_proposals(ours, theirs) <= 0.01 * sum(len(p) for p in ours)


def test_the_four_training_losses_equal_the_references(parity):
    for name in parity["metrics"]:
        got, want = parity["metrics"][name], parity["want"][name]
        np.testing.assert_allclose(got, want, rtol=1e-5, err_msg=name)
    assert len(parity["metrics"]) == 4
    assert min(parity["want"].values()) > 0  # every term has something to compare


def test_every_trained_parameter_gets_the_references_gradient(parity):
    got_names, want_names = parity["grad_names"]
    assert got_names == want_names
    errors = parity["grad_errors"]
    assert errors.keys() == {k for k, v in parity["trainable"].items() if v}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= 1e-4, f"worst gradient: {worst}, error {errors[worst]:.2e} of its max"
    assert parity["kinks_cleared"] < 1000  # of tens of thousands of ReLU units


def test_frozen_parameters_get_no_gradient_on_either_side(parity):
    (theirs, ours), num_frozen, frozen = parity["reference_frozen"]
    assert len(frozen) == num_frozen and all(n.startswith(theirs) for n in frozen)
    ours_frozen = {k for k, v in parity["trainable"].items() if not v}
    assert ours_frozen == {k for k in parity["grad_names"][0] if k.startswith(ours)}
    assert len(ours_frozen) == len(frozen)
    assert parity["frozen_grad_moves"].keys() == ours_frozen
    assert not any(parity["frozen_grad_moves"].values())
    assert not any(parity["frozen_param_moves"].values())


def test_one_sgd_step_gives_the_references_parameters(parity):
    differences = parity["step_differences"]
    assert differences.keys() == parity["trainable"].keys()
    worst = max(differences, key=differences.get)
    error = differences[worst]
    assert error <= 1e-5, f"worst parameter after the step: {worst}, error {error:.2e}"


def test_the_optimizer_updates_as_the_references_recipe(parity):
    """Two updates from the reference's gradients (see `compare`), frozen parameters never
    updated nor decayed."""
    assert len(parity["update_errors"]) == 2
    for step, errors in enumerate(parity["update_errors"]):
        assert errors.keys() == parity["trainable"].keys()
        worst = max(errors, key=errors.get)
        assert errors[worst] <= 1e-5, f"update {step}: worst {worst}, error {errors[worst]:.2e}"
        assert parity["frozen_updates"][step] == []
