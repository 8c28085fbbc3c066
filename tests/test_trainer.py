"""Training: config handling, an end-to-end run, resume after SIGKILL, NaN stop, one vs eight
devices, two processes, and the paper config on TFDS mock data."""

import collections
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from frcnn_jax import checkpointing, sharding, training, weights
from frcnn_jax.config import check_config, config_from_file
from frcnn_jax.data import loader as loader_lib
from frcnn_jax.data.loader import Inputs
from frcnn_jax.models import FasterRCNN, build_model
from tests.tiny import DETECTOR_CONFIGS, ROOT, run_train, tiny_config, write_config_file


def test_every_config_file_builds():
    for path in DETECTOR_CONFIGS:
        c = config_from_file(path)
        check_config(c)
        model = build_model(c)
        images = jnp.zeros((1, 64, 96, 3))
        params = jax.eval_shape(
            lambda k, m=model, x=images: m.init(
                k, x, jnp.array([[64, 96]]), method=FasterRCNN.detect
            ),
            jax.random.key(0),
        )["params"]
        one_stage = c.model.head.rois == "anchors"
        assert set(params) == {"backbone", "box_head", "predictor"} | (
            set() if one_stage else {"rpn_head"}
        ), path.name
        outputs = params["predictor"]["cls_score"]["kernel"].shape[-1]
        assert outputs == c.model.num_classes + 1, path.name


def test_end_to_end_run_writes_everything_and_a_rerun_exits_at_once(data_dir, tmp_path):
    config = tiny_config(data_dir, eval_every=4)
    result = training.train_and_evaluate(config, tmp_path)
    assert result["num_images"] == 6 and "mAP" in result["voc"]
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_lines = [x for x in lines if "train/loss" in x]
    assert [x["step"] for x in train_lines] == [2, 4, 6]
    assert all(np.isfinite(x["train/loss"]) and x["train/steps_per_s"] > 0 for x in train_lines)
    # each record: the mean gradient norm of its steps and the largest (a spike between records)
    assert all(x["train/grad_norm_max"] >= x["train/grad_norm"] > 0 for x in train_lines)
    evals = [x for x in lines if "eval/num_images" in x]
    assert [x["step"] for x in evals] == [4, 6]  # periodic (validation split), then final
    assert [x["eval/num_images"] for x in evals] == [2, 6]
    events = EventAccumulator(str(tmp_path / "tensorboard"))  # as TensorBoard reads them
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [
        (x["step"], pytest.approx(x["train/loss"])) for x in train_lines
    ]
    assert [e.step for e in events.Scalars("eval/voc/mAP")] == [4, 6]
    assert checkpointing.Checkpoints(tmp_path).all_steps() == [2, 4, 6]
    report = tmp_path / "eval" / "step_6"
    assert {"metrics.json", "table.md", "pr"} <= {p.name for p in report.iterdir()}

    metrics = (tmp_path / "metrics.jsonl").read_text()
    again = training.train_and_evaluate(config, tmp_path)  # finished: nothing trains or evaluates
    assert again == result and (tmp_path / "metrics.jsonl").read_text() == metrics
    assert checkpointing.Checkpoints(tmp_path).all_steps() == [2, 4, 6]


@pytest.mark.slow
def test_frozen_parameters_do_not_move(data_dir, tmp_path):
    """VGG-16's conv1/conv2 get neither updates nor weight decay (the paper's freezing)."""
    c = config_from_file(ROOT / "configs" / "voc07_vgg16.py")
    model = build_model(c)
    with jax.default_device(jax.devices("cpu")[0]):
        c.data.canvas = (64, 64)
        state, tx = training.initial.init_state(c, model)
        grads = jax.tree.map(jnp.ones_like, state.params)
        updates, _ = tx.update(grads, state.opt_state, state.params)
    assert float(jnp.abs(updates["backbone"]["conv1_1"]["kernel"]).max()) == 0.0
    assert float(jnp.abs(updates["backbone"]["conv2_2"]["bias"]).max()) == 0.0
    assert float(jnp.abs(updates["backbone"]["conv3_1"]["kernel"]).max()) > 0.0


def two_images(image):
    """A batch of two 128x128 `image`s, each with one ground-truth box of class 1."""
    return Inputs(
        image=image,
        image_size=jnp.full((2, 2), 128),
        scale=jnp.ones(2),
        gt_boxes=jnp.tile(jnp.array([[10.0, 10, 60, 60]]), (2, 16, 1)),
        gt_classes=jnp.ones((2, 16), jnp.int32),
        gt_valid=jnp.ones((2, 16), bool),
        gt_difficult=jnp.zeros((2, 16), bool),
        valid=jnp.ones(2, bool),
    )


@pytest.mark.slow
def test_nonfinite_loss_skips_the_update_and_stops_the_run(data_dir, tmp_path):
    config = tiny_config(data_dir)
    model = build_model(config)
    state, tx = training.initial.init_state(config, model)
    batch = two_images(jnp.full((2, 128, 128, 3), jnp.nan))
    before = jax.device_get(state.params)  # the jitted step donates `state`
    step = training.step.jit_train_step(model, tx, sharding.data_mesh(jax.devices()[:1]))
    new, metrics = step(state, batch, jax.random.key(0), None)  # jitted: op by op takes minutes
    assert not np.isfinite(float(metrics["loss"])) and int(new.nonfinite_step) == 0
    for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(before), strict=True):
        np.testing.assert_array_equal(a, b)

    exploding = tiny_config(data_dir, learning_rate=1e12, warmup_steps=0, grad_clip_norm=None)
    with pytest.raises(FloatingPointError, match=r"non-finite loss or gradient at step \d") as e:
        training.train_and_evaluate(exploding, tmp_path)
    message = str(e.value)
    assert "fast_rcnn_class" in message or "metrics.jsonl" in message
    bad_step = int(message.split("at step ")[1].split()[0])
    assert e.value.step == bad_step  # for callers that record it (experiments/paper_tables.py)
    saved = checkpointing.Checkpoints(tmp_path).all_steps()
    assert all(step <= bad_step for step in saved)  # nothing saved after the bad step


def _final_params(workdir):
    saved = checkpointing.Checkpoints(workdir).restore_variables(6)
    return jax.tree.leaves(saved["params"])


@pytest.mark.slow
def test_sigkill_then_rerun_ends_with_the_uninterrupted_parameters(data_dir, tmp_path):
    config_file = write_config_file(tmp_path / "cfg.py", data_dir, "c.train.num_steps = 6\n")
    straight = run_train(config_file, tmp_path / "straight")
    assert straight.returncode == 0, straight.stdout + straight.stderr

    killed_dir = tmp_path / "killed"
    process = run_train(config_file, killed_dir, wait=False)
    deadline = time.time() + 300
    while not (killed_dir / "checkpoints" / "2").is_dir() and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    steps = checkpointing.Checkpoints(killed_dir).all_steps()
    assert steps and max(steps) < 6, steps  # killed mid-run
    resumed = run_train(config_file, killed_dir)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed from" in resumed.stderr + resumed.stdout
    for a, b in zip(_final_params(tmp_path / "straight"), _final_params(killed_dir), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_sigterm_saves_before_exiting(data_dir, tmp_path):
    config_file = write_config_file(tmp_path / "cfg.py", data_dir, "c.train.num_steps = 400\n")
    process = run_train(config_file, tmp_path, wait=False)
    deadline = time.time() + 300
    while not (tmp_path / "checkpoints" / "2").is_dir() and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output
    assert "rerun the same command to resume" in output
    steps = checkpointing.Checkpoints(tmp_path).all_steps()
    assert max(steps) > 2 or len(steps) >= 2  # a save at the stop, beyond the periodic one


def test_bad_config_values_and_fields_are_named(data_dir, tmp_path):
    config_file = write_config_file(tmp_path / "cfg.py", data_dir)
    unknown = run_train(config_file, tmp_path / "a", "--config.train.nope=1")
    assert unknown.returncode != 0 and "nope" in unknown.stderr
    bad = run_train(config_file, tmp_path / "b", "--config.train.scheme=sideways")
    assert bad.returncode != 0 and "config.train.scheme must be one of" in bad.stderr
    wrong_type = run_train(config_file, tmp_path / "c", "--config.train.num_steps=many")
    assert wrong_type.returncode != 0 and "num_steps" in wrong_type.stderr


EQUIVALENCE_SCRIPT = """
import jax, jax.numpy as jnp, numpy as np, pathlib, sys
sys.path.insert(0, {root!r})
from tests.tiny import tiny_config
from frcnn_jax import sharding, training
from frcnn_jax.data import make_batches
from frcnn_jax.models import build_model
config = tiny_config({data_dir!r}, batch_size=8)
model = build_model(config)
batches, _ = make_batches(config.data, "train", batch_size=8, train=True, seed=0)
batch = next(batches).inputs
results = []
for devices in (jax.devices()[:1], jax.devices()):
    mesh = sharding.data_mesh(devices)
    state, tx = training.initial.init_state(config, model)
    state = jax.device_put(state, sharding.replicated(mesh))
    step = training.step.jit_train_step(model, tx, mesh)
    for _ in range(2):
        state, metrics = step(state, sharding.shard_batch(batch, mesh), jax.random.key(0), None)
    results.append((jax.device_get(state.params), float(metrics["loss"])))
print("devices", len(jax.devices()), "losses", results[0][1], results[1][1])
for a, b in zip(jax.tree.leaves(results[0][0]), jax.tree.leaves(results[1][0])):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)
print("EQUAL")
"""


@pytest.mark.slow
def test_one_device_and_eight_devices_give_the_same_step(data_dir):
    tiny_config(data_dir)  # make sure the data is prepared
    from frcnn_jax.data import make_batches

    make_batches(tiny_config(data_dir).data, "train", batch_size=1, train=True)
    script = EQUIVALENCE_SCRIPT.format(root=str(ROOT), data_dir=str(data_dir))
    env = {
        **os.environ,
        "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8",
        "PYTHONPATH": str(ROOT),
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600
    )
    assert "EQUAL" in out.stdout, out.stdout + out.stderr
    assert "devices 8" in out.stdout


@pytest.mark.slow
def test_two_processes_on_loopback_train_together(data_dir, tmp_path):
    config_file = write_config_file(tmp_path / "cfg.py", data_dir, "c.train.num_steps = 4\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    flags = [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2"]
    processes = [
        run_train(config_file, tmp_path / "run", *flags, f"--process_id={i}", wait=False)
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in processes]
    for p, out in zip(processes, outputs, strict=True):
        assert p.returncode == 0, out
    assert "mAP@0.5" in outputs[0]
    assert checkpointing.Checkpoints(tmp_path / "run").latest_step() == 4


@pytest.mark.slow
def test_voc07_vgg16_trains_two_steps_on_mock_data_and_restores(tmp_path):
    c = config_from_file(ROOT / "configs" / "voc07_vgg16.py")
    c.data.min_size, c.data.max_size, c.data.canvas = 96, 128, (96, 128)
    c.data.workers = 0
    c.train.num_steps = 2
    c.train.checkpoint_every = 1
    c.train.log_every = 1
    c.model.rpn.train_pre_nms_top_n = 300
    c.model.rpn.test_pre_nms_top_n = 300
    with tfds.testing.mock_data(num_examples=3):
        result = training.train_and_evaluate(c, tmp_path)
        assert result["num_images"] == 3
        again = training.evaluate_checkpoint(c, tmp_path, step=1)
    assert again["num_images"] == 3
    assert checkpointing.Checkpoints(tmp_path).all_steps() == [1, 2]


@pytest.mark.slow
def test_alternating_training_runs_four_resumable_phases(data_dir, tmp_path):
    config = tiny_config(
        data_dir, scheme="alternating", num_steps=12, log_every=1, checkpoint_every=1
    )
    result = training.train_and_evaluate(config, tmp_path)
    assert result["num_images"] == 6

    def params(step_dir, step):
        return checkpointing.Checkpoints(tmp_path / "alternating" / step_dir).restore_variables(
            step
        )["params"]

    def same(a, b):
        return all(
            np.array_equal(x, y)
            for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
        )

    # steps of 12 x (1/3, 1/6, 1/3, 1/6) = 4, 2, 4, 2
    p1, p2, p3, p4 = (
        params("phase1", 4),
        params("phase2", 2),
        params("phase3", 4),
        params("phase4", 2),
    )
    assert same(p3["backbone"], p2["backbone"])  # phase 3 keeps the detector's shared convs
    assert not same(p3["rpn_head"], p1["rpn_head"])  # and trains a fresh RPN head
    assert same(p4["backbone"], p3["backbone"]) and same(p4["rpn_head"], p3["rpn_head"])
    assert not same(p4["predictor"], p2["predictor"])
    assert not same(p2["backbone"], p1["backbone"])  # phase 2 trains its own network
    # ... from the initial weights, as in the paper (phase 2 leaves the RPN head as it found it)
    assert same(p2["rpn_head"], initial_params(config)["rpn_head"])
    final = checkpointing.Checkpoints(tmp_path).restore_variables(12)["params"]
    assert same(final, p4)
    metrics = (tmp_path / "metrics.jsonl").read_text()
    assert training.train_and_evaluate(config, tmp_path) == result  # finished: nothing runs again
    assert (tmp_path / "metrics.jsonl").read_text() == metrics


def test_a_step_computes_no_gradient_for_what_it_does_not_train():
    """Phase 3 of alternating training trains the RPN head alone: the step's gradient norm (and
    so its clipping) is the head's alone, the fixed layers are untouched, and XLA is given no
    backward pass through them (their gradients are constants)."""
    config = tiny_config(grad_clip_norm=1e-3, warmup_steps=0)  # a clip that always acts
    model = build_model(config)
    state, _ = training.initial.init_state(config, model)
    phase3 = jax.tree_util.tree_map_with_path(
        lambda path, _: path[0].key == "rpn_head", state.params
    )
    tx = training.optim.make_optimizer(config.train, phase3)
    state = state.replace(opt_state=jax.jit(tx.init)(state.params))
    batch = two_images(jax.random.uniform(jax.random.key(1), (2, 128, 128, 3), maxval=255.0))
    key = jax.random.key(0)

    def rpn_loss(params):  # the step's objective, as train_step computes it at step 0
        sample_key = jax.random.split(jax.random.fold_in(key, 0))[0]
        terms = model.apply(
            {"params": params, **state.frozen},
            *(batch.image, batch.image_size, batch.gt_boxes, batch.gt_classes, batch.gt_valid),
            sample_key,
            method=FasterRCNN.rpn_losses,
        )
        return sum(terms.values())

    grads = jax.jit(jax.grad(rpn_loss))(state.params)

    def norm(tree):
        return float(jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(tree))))

    head_norm = norm(grads["rpn_head"])
    assert norm(grads) > (1 + 1e-3) * head_norm  # the fixed layers' gradient: not counted below

    def step(trainable):
        return jax.jit(
            functools.partial(
                training.step.train_step, model=model, tx=tx, objective="rpn", trainable=trainable
            )
        )

    # no backward pass through the fixed layers: a much smaller program than with all trained
    size = {
        name: len(step(mask).lower(state, batch, key).as_text())
        for name, mask in (("phase 3", phase3), ("all", None))
    }
    assert size["phase 3"] < 0.8 * size["all"], size
    before = jax.device_get(state.params)
    new, metrics = step(phase3)(state, batch, key)
    np.testing.assert_allclose(float(metrics["grad_norm"]), head_norm, rtol=1e-4)
    moved = jax.device_get(new.params)
    for name in before:
        unchanged = all(
            np.array_equal(a, b)
            for a, b in zip(
                jax.tree.leaves(before[name]), jax.tree.leaves(moved[name]), strict=True
            )
        )
        assert unchanged == (name != "rpn_head"), name
    # SGD's first step, the gradient clipped by the head's own norm, then weight decay
    lr, decay = config.train.learning_rate, config.train.weight_decay
    old = before["rpn_head"]["conv"]["kernel"]
    clipped = np.asarray(grads["rpn_head"]["conv"]["kernel"]) * 1e-3 / head_norm
    np.testing.assert_allclose(
        moved["rpn_head"]["conv"]["kernel"],
        old - lr * (clipped + decay * old),
        rtol=2e-4,
        atol=1e-9,
    )


@pytest.mark.slow
def test_alternating_phase2_can_start_from_phase1(data_dir, tmp_path):
    config = tiny_config(
        data_dir, scheme="alternating", num_steps=6, alternating_phase2_init="phase1"
    )
    training.train_and_evaluate(config, tmp_path)
    runs = tmp_path / "alternating"
    p1 = checkpointing.Checkpoints(runs / "phase1").restore_variables(2)["params"]["rpn_head"]
    p2 = checkpointing.Checkpoints(runs / "phase2").restore_variables(1)["params"]["rpn_head"]
    # phase 2 does not train the RPN head: it is still phase 1's, not the initial one
    assert jax.tree.all(jax.tree.map(np.array_equal, p1, p2))
    initial = initial_params(config)["rpn_head"]
    assert not jax.tree.all(jax.tree.map(np.array_equal, p1, initial))


@pytest.mark.slow
def test_alternating_stopped_after_phase2_keeps_two_networks(data_dir, tmp_path):
    """The paper's "unshared" detector: phase 1's RPN (own backbone) beside phase 2's Fast R-CNN."""
    config = tiny_config(data_dir, alternating_phases=4)
    config.train.update(scheme="alternating", num_steps=12, alternating_phases=2)
    config.model.rpn.shared_features = False
    check_config(config)
    result = training.train_and_evaluate(config, tmp_path)
    assert result["num_images"] == 6
    runs = tmp_path / "alternating"
    assert sorted(p.name for p in runs.iterdir()) == ["phase1", "phase2"]
    p1 = checkpointing.Checkpoints(runs / "phase1").restore_variables(4)["params"]
    p2 = checkpointing.Checkpoints(runs / "phase2").restore_variables(2)["params"]
    final = checkpointing.Checkpoints(tmp_path).restore_variables(6)["params"]  # 4 + 2 steps
    initial = initial_params(config)

    def same(a, b):
        return jax.tree.all(jax.tree.map(np.array_equal, a, b))

    assert same(final["rpn_backbone"], p1["rpn_backbone"]) and same(
        final["rpn_head"], p1["rpn_head"]
    )
    assert not same(p1["rpn_backbone"], initial["rpn_backbone"])  # phase 1 trained them
    for name in ("backbone", "box_head", "predictor"):
        assert same(final[name], p2[name]) and not same(p2[name], initial[name])
    assert same(p1["backbone"], initial["backbone"])  # phase 1 leaves the detector's convs


@pytest.mark.slow
def test_pyramid_testing_merges_the_scales_detections(data_dir, tmp_path, monkeypatch):
    """The image pyramid's detections; and every evaluation closes its loaders (one per
    scale): their workers end and their shared memory is freed when it returns, not when the
    process exits."""
    opened, track = [], loader_lib.Closing._track

    def tracked(batches):
        opened.append(batches)
        track(batches)

    monkeypatch.setattr(loader_lib.Closing, "_track", tracked)
    config = tiny_config(data_dir)
    training.train_and_evaluate(config, tmp_path / "run")
    model = build_model(config)
    mesh = sharding.data_mesh()
    variables = checkpointing.Checkpoints(tmp_path / "run").restore_variables(6)
    opened.clear()

    def detections(scales):
        c = config.copy_and_resolve_references()
        c.eval.scales, c.eval.coco = scales, True
        check_config(c)
        report = tmp_path / "x".join(map(str, scales or ("plain",)))
        result = training.evaluation.evaluate(c, model, variables, mesh, workdir=report)
        return json.loads((report / "detections_coco.json").read_text()), result

    plain, result = detections(())
    assert len(plain) > 10  # scores above the threshold even this early
    assert detections((128,))[0] == plain  # the configured scale alone
    assert detections((128, 128))[0] == plain  # a scale twice: every repeat suppressed
    merged, two = detections((128, 96))
    assert merged != plain and two["num_images"] == result["num_images"]
    per_image = collections.Counter(d["image_id"] for d in merged)
    assert max(per_image.values()) <= config.model.head.max_detections
    assert len(opened) == 1 + 1 + 2 + 2  # one per scale
    assert not [batches for batches in opened if batches in loader_lib._open]


def initial_params(config):
    model = build_model(config)
    state, _ = training.initial.init_state(config, model)
    return state.params


@pytest.mark.slow
def test_non_approximate_joint_training_moves_gradients_into_proposals(data_dir, tmp_path):
    """The same two steps from the same weights and batches, with and without gradients through
    RoIAlign into the proposal boxes: only with them does the head's loss reach the RPN's box
    regressor, so that layer ends elsewhere."""
    regressors = []
    for scheme in ("approximate_joint", "non_approximate_joint"):
        config = tiny_config(data_dir, scheme=scheme, num_steps=2)
        result = training.train_and_evaluate(config, tmp_path / scheme)
        assert result["num_images"] == 6
        saved = checkpointing.Checkpoints(tmp_path / scheme).restore_variables(2)
        regressors.append(np.asarray(saved["params"]["rpn_head"]["bbox"]["kernel"]))
    assert not np.allclose(*regressors, rtol=0, atol=1e-7)


def test_init_checkpoint_loads_an_imported_file_strictly(data_dir, tmp_path):
    config = tiny_config(data_dir)
    model = build_model(config)
    state, _ = training.initial.init_state(config, model)
    kernel = np.asarray(state.params["backbone"]["body"]["conv0"]["kernel"])
    path = tmp_path / "backbone.npz"
    body = {"params/backbone/body/conv0/kernel": np.full_like(kernel, 0.25)}
    weights.save(path, body, ["params/backbone/body/conv0/kernel"])
    config.model.init_checkpoint = str(path)
    loaded, _ = training.initial.init_state(config, model)
    assert (np.asarray(loaded.params["backbone"]["body"]["conv0"]["kernel"]) == 0.25).all()
    np.testing.assert_array_equal(  # tensors the file does not cover keep their initialization
        loaded.params["backbone"]["body"]["conv1"]["kernel"],
        state.params["backbone"]["body"]["conv1"]["kernel"],
    )
    weights.save(path, body, ["params/backbone/body"])  # claims the whole body, lacks most
    with pytest.raises(ValueError, match=r"init_checkpoint .*lacks \['params/backbone/body/con"):
        training.initial.init_state(config, model)
    config.model.init_checkpoint = str(tmp_path / "missing.npz")
    with pytest.raises(FileNotFoundError, match="init_checkpoint: no such file"):
        training.initial.init_state(config, model)


def test_evaluate_runs_imported_weights_when_the_workdir_has_no_checkpoint(data_dir, tmp_path):
    config = tiny_config(data_dir)
    variables = training.initial.initial_variables(config, build_model(config))
    path = tmp_path / "detector.npz"
    weights.save(path, flax.traverse_util.flatten_dict(variables, sep="/"), ["params"])
    with pytest.raises(FileNotFoundError, match=r"set config\.model\.init_checkpoint"):
        training.evaluate_checkpoint(config, tmp_path / "run")
    config.model.init_checkpoint = str(path)
    result = training.evaluate_checkpoint(config, tmp_path / "run")
    assert result["num_images"] == 6
    assert (tmp_path / "run" / "eval" / "step_0" / "metrics.json").is_file()
