"""`training.optim`: schedules by hand, and SGD / AdamW updates equal torch's SGD / AdamW update
rules with the same parameter groups (kernels decayed, biases at their own rate, frozen layers
still)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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
    train = train_config(
        learning_rate=0.1,
        warmup_steps=10,
        warmup_factor=0.0,
        num_steps=110,
        lr_schedule="cosine",
        cosine_final_factor=0.1,
    )
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


TRAINABLE = {
    "conv": {"kernel": True, "bias": True},
    "norm": {"scale": True},
    "stem": {"kernel": False},
}


def run_ours(train, steps, grads):
    tx = optim.make_optimizer(train, TRAINABLE)
    p = {k: {n: jnp.asarray(v, jnp.float32) for n, v in d.items()} for k, d in params().items()}
    state = tx.init(p)
    for g in grads[:steps]:
        updates, state = tx.update(g, state, p)
        p = {k: {n: p[k][n] + updates[k][n] for n in d} for k, d in p.items()}
    return p


def run_reference(
    name,
    steps,
    grads,
    *,
    lr,
    wd,
    bias_factor,
    momentum=0.9,
    betas=(0.9, 0.999),
    eps=1e-8,
    decay_all=False,
):
    """torch.optim.SGD / AdamW's documented updates in NumPy (float64), with torch's parameter
    groups: the kernel decayed, the bias at `bias_factor` x lr without decay, "other" plain, the
    frozen stem in no group; `decay_all`: every group decayed (torchvision's references).
    (torch.optim itself is not imported: importing its compiler
    machinery crashed the test process after the JAX tests had run.)"""
    p = {k: {n: np.asarray(v, np.float64) for n, v in d.items()} for k, d in params().items()}
    others = wd if decay_all else 0.0
    groups = [
        (("conv", "kernel"), lr, wd),
        (("conv", "bias"), lr * bias_factor, others),
        (("norm", "scale"), lr, others),
    ]
    state = {key: {"buf": None, "m": 0.0, "v": 0.0} for key, _, _ in groups}
    for t, g in enumerate(grads[:steps], start=1):
        for (k, n), rate, decay in groups:
            grad, s = np.asarray(g[k][n], np.float64), state[(k, n)]
            if name == "SGD":  # L2 in the gradient, then momentum (dampening 0)
                grad = grad + decay * p[k][n]
                s["buf"] = grad if s["buf"] is None else momentum * s["buf"] + grad
                p[k][n] = p[k][n] - rate * s["buf"]
            else:  # AdamW: decoupled decay, then Adam with bias correction
                p[k][n] = p[k][n] * (1 - rate * decay)
                s["m"] = betas[0] * s["m"] + (1 - betas[0]) * grad
                s["v"] = betas[1] * s["v"] + (1 - betas[1]) * grad**2
                m_hat, v_hat = s["m"] / (1 - betas[0] ** t), s["v"] / (1 - betas[1] ** t)
                p[k][n] = p[k][n] - rate * m_hat / (np.sqrt(v_hat) + eps)
    return p


def gradients(count):
    rng = np.random.default_rng(1)
    return [
        {
            k: {n: jnp.asarray(rng.normal(size=np.shape(v)), jnp.float32) for n, v in d.items()}
            for k, d in params().items()
        }
        for _ in range(count)
    ]


@pytest.mark.parametrize("decay_on", ["kernels", "all"])
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_updates_equal_torchs_update_rules_with_the_same_groups(optimizer, decay_on):
    lr, wd, factor = 0.05, 0.01, 2.0
    train = train_config(
        optimizer=optimizer,
        learning_rate=lr,
        weight_decay=wd,
        bias_lr_factor=factor,
        lr_steps=(),
        momentum=0.9,
        weight_decay_on=decay_on,
    )
    grads = gradients(4)
    ours = run_ours(train, 4, grads)
    name = {"sgd": "SGD", "adamw": "AdamW"}[optimizer]
    theirs = run_reference(
        name, 4, grads, lr=lr, wd=wd, bias_factor=factor, decay_all=decay_on == "all"
    )
    for k, d in theirs.items():
        for n, want in d.items():
            np.testing.assert_allclose(np.asarray(ours[k][n]), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(
        np.asarray(ours["stem"]["kernel"]), params()["stem"]["kernel"].astype(np.float32)
    )


def test_unknown_optimizer_and_schedule_are_named():
    config = base_config()
    config.train.optimizer = "adam"
    with pytest.raises(ValueError, match=r"train.optimizer must be one of \('sgd', 'adamw'\)"):
        check_config(config)
    config = base_config()
    config.train.lr_schedule = "linear"
    with pytest.raises(ValueError, match=r"config\.train\.lr_schedule must be one of"):
        check_config(config)
    config = base_config()
    config.train.weight_decay_on = "biases"
    with pytest.raises(ValueError, match=r"config\.train\.weight_decay_on must be one of"):
        check_config(config)


def test_a_budgeted_run_updates_as_a_plain_one_until_its_schedule_is_refitted():
    """`train.budget_minutes` wraps the optimizer (`optim.Stretched`) without changing its
    updates: the schedule is stretched only when `training.budget.Budget` re-fits it."""
    fields = dict(learning_rate=0.05, warmup_steps=1, lr_steps=(2,), momentum=0.9)
    grads = gradients(4)
    plain = run_ours(train_config(**fields), 4, grads)
    budgeted = run_ours(train_config(budget_minutes=5.0, **fields), 4, grads)
    for k, d in plain.items():
        for n, want in d.items():
            np.testing.assert_allclose(budgeted[k][n], want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("jit", [False, True])
def test_a_stretched_schedule_moves_at_its_rate_from_its_last_fit(jit):
    """Update `count` takes the schedule at `at + rate * (count - since)`: from schedule step
    2 at half pace, the decay at step 3 comes two updates later."""
    train = train_config(
        learning_rate=0.1,
        lr_steps=(3,),
        momentum=0.0,
        weight_decay=0.0,
        budget_minutes=1.0,
    )
    tx = optim.make_optimizer(train, TRAINABLE)
    p = {
        k: {n: jnp.zeros(np.shape(v), jnp.float32) for n, v in d.items()}
        for k, d in params().items()
    }
    state = tx.init(p)
    state = state._replace(
        count=jnp.int32(2), since=jnp.int32(2), at=jnp.float32(2.0), rate=jnp.float32(0.5)
    )
    ones = jax.tree.map(jnp.ones_like, p)
    update = jax.jit(tx.update) if jit else tx.update
    rates = []
    for _ in range(4):
        assert float(optim.stretched_step(state)) == 2.0 + 0.5 * (int(state.count) - 2)
        updates, state = update(ones, state, p)
        rates.append(-float(updates["conv"]["kernel"][0, 0]))  # SGD: -lr x gradient 1
    np.testing.assert_allclose(rates, [0.1, 0.1, 0.01, 0.01], rtol=1e-6)
    assert int(state.count) == 6
