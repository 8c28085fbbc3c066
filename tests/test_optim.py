"""`training.optim`: schedules by hand, and SGD / AdamW updates equal torch's optimizers with
the same parameter groups (kernels decayed, biases at their own rate, frozen layers still)."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from frcnn_jax.config import base_config, check_config
from frcnn_jax.training import optim


def train_config(**fields):
    train = base_config().train
    train.update(fields)
    return train


def test_step_schedule_warms_up_then_decays_at_each_step():
    train = train_config(learning_rate=0.1, warmup_steps=2, warmup_factor=1e-3, lr_steps=(4,))
    schedule = optim.learning_rate_schedule(train)
    want = [1e-4, 0.05005, 0.1, 0.1, 0.01, 0.01]
    np.testing.assert_allclose([float(schedule(s)) for s in range(6)], want, rtol=1e-4)  # float32
    no_warmup = optim.learning_rate_schedule(train_config(learning_rate=0.1, lr_steps=(3,)))
    np.testing.assert_allclose([float(no_warmup(s)) for s in (0, 2, 3)], [0.1, 0.1, 0.01])


def test_cosine_schedule_runs_from_the_rate_to_its_final_factor_after_the_warm_up():
    train = train_config(learning_rate=0.1, warmup_steps=10, warmup_factor=0.0, num_steps=110,
                         lr_schedule="cosine", cosine_final_factor=0.1)  # fmt: skip
    schedule = optim.learning_rate_schedule(train)
    np.testing.assert_allclose(float(schedule(5)), 0.05, rtol=1e-6)  # halfway up the ramp
    np.testing.assert_allclose(float(schedule(10)), 0.1, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(60)), 0.1 * (0.1 + 0.9 * 0.5), rtol=1e-5)
    np.testing.assert_allclose(float(schedule(110)), 0.01, rtol=1e-5)
    np.testing.assert_allclose(float(schedule(500)), 0.01, rtol=1e-5)  # stays at the floor


def params():
    rng = np.random.default_rng(0)
    return {
        "conv": {"kernel": rng.normal(size=(3, 4)), "bias": rng.normal(size=(4,))},
        "norm": {"scale": rng.normal(size=(4,))},  # neither kernel nor bias: "other"
        "stem": {"kernel": rng.normal(size=(2, 3))},  # frozen
    }


TRAINABLE = {"conv": {"kernel": True, "bias": True}, "norm": {"scale": True},
             "stem": {"kernel": False}}  # fmt: skip


def run_ours(train, steps, grads):
    tx = optim.make_optimizer(train, TRAINABLE)
    p = {k: {n: jnp.asarray(v, jnp.float32) for n, v in d.items()} for k, d in params().items()}
    state = tx.init(p)
    for g in grads[:steps]:
        updates, state = tx.update(g, state, p)
        p = {k: {n: p[k][n] + updates[k][n] for n in d} for k, d in p.items()}
    return p


def run_torch(name, steps, grads, *, lr, wd, bias_factor, **kwargs):
    tensors = {k: {n: torch.tensor(v, dtype=torch.float32, requires_grad=True)
                   for n, v in d.items()} for k, d in params().items()}  # fmt: skip
    groups = [
        {"params": [tensors["conv"]["kernel"]], "weight_decay": wd, "lr": lr},
        {"params": [tensors["conv"]["bias"]], "weight_decay": 0.0, "lr": lr * bias_factor},
        {"params": [tensors["norm"]["scale"]], "weight_decay": 0.0, "lr": lr},
    ]  # the frozen stem is in no group
    optimizer = getattr(torch.optim, name)(groups, **kwargs)
    for g in grads[:steps]:
        for k, d in tensors.items():
            for n, t in d.items():
                t.grad = torch.tensor(np.asarray(g[k][n]), dtype=torch.float32)
        optimizer.step()
    return {k: {n: t.detach().numpy() for n, t in d.items()} for k, d in tensors.items()}


def gradients(count):
    rng = np.random.default_rng(1)
    return [{k: {n: jnp.asarray(rng.normal(size=np.shape(v)), jnp.float32) for n, v in d.items()}
             for k, d in params().items()} for _ in range(count)]  # fmt: skip


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_updates_equal_torchs_optimizer_with_the_same_groups(optimizer):
    lr, wd, factor = 0.05, 0.01, 2.0
    train = train_config(optimizer=optimizer, learning_rate=lr, weight_decay=wd,
                         bias_lr_factor=factor, lr_steps=(), momentum=0.9)  # fmt: skip
    grads = gradients(4)
    ours = run_ours(train, 4, grads)
    if optimizer == "sgd":
        theirs = run_torch("SGD", 4, grads, lr=lr, wd=wd, bias_factor=factor, momentum=0.9)
    else:
        theirs = run_torch("AdamW", 4, grads, lr=lr, wd=wd, bias_factor=factor,
                           betas=(0.9, 0.999), eps=1e-8)  # fmt: skip
    for k, d in theirs.items():
        for n, want in d.items():
            np.testing.assert_allclose(np.asarray(ours[k][n]), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(ours["stem"]["kernel"]),
                                  params()["stem"]["kernel"].astype(np.float32))  # fmt: skip


def test_unknown_optimizer_and_schedule_are_named():
    config = base_config()
    config.train.optimizer = "adam"
    with pytest.raises(ValueError, match=r"train.optimizer must be one of \('sgd', 'adamw'\)"):
        check_config(config)
    config = base_config()
    config.train.lr_schedule = "linear"
    with pytest.raises(ValueError, match=r"config\.train\.lr_schedule must be one of"):
        check_config(config)
