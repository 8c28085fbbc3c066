"""The paper's 4-step alternating training (section 3.2), as py-faster-rcnn's alt-opt.

Its four steps are called phases here (phase 1-4), so that "step" means an optimizer step
only; each phase runs `train_phase` with its own objective, trained modules and schedule."""

import jax
import jax.numpy as jnp

from frcnn_jax import checkpointing, sharding
from frcnn_jax.models import trainable_mask
from frcnn_jax.training.initial import init_state
from frcnn_jax.training.optim import learning_rate_schedule, make_optimizer
from frcnn_jax.training.phase import train_phase

# The paper's 4-step alternating training (section 3.2): which sub-modules each phase trains,
# its objective, and its share of `train.num_steps` when `train.alternating_phase_steps` is
# empty (py-faster-rcnn's alt-opt VOC schedule: 80k RPN, 40k Fast R-CNN, 80k RPN, 40k Fast
# R-CNN iterations).
ALTERNATING_PHASES = (
    ("rpn", ("backbone", "rpn_head"), 1 / 3),
    ("head", ("backbone", "box_head", "predictor"), 1 / 6),
    ("rpn", ("rpn_head",), 1 / 3),
    ("head", ("box_head", "predictor"), 1 / 6),
)


def final_step(train):
    """The step number of the finished detector: `num_steps`, or for alternating training with
    explicit phase lengths or stopped after phase 2 the sum of its phases' lengths."""
    if train.scheme != "alternating":
        return int(train.num_steps)
    if train.alternating_phases == 2:
        return sum(n for n, _ in alternating_schedules(train)[:2])
    if train.alternating_phase_steps:
        return int(sum(train.alternating_phase_steps))
    return int(train.num_steps)


def phase_modules(index, shared=True):
    """The sub-modules phase `index` (1-4) trains; with unshared features (the RPN has its own
    backbone, training stops after phase 2) phase 1 trains the RPN's backbone."""
    modules = ALTERNATING_PHASES[index - 1][1]
    if not shared and index == 1:
        return ("rpn_backbone", "rpn_head")
    return modules


def alternating_schedules(train):
    """Per phase k = 1..4: (number of steps, `train` with that phase's lr decay and warm-up).

    With `train.alternating_phase_steps` the lengths are those, each with its own decay step
    from `alternating_phase_lr_steps` (py-faster-rcnn's solvers: one x0.1 decay per phase) or,
    if that is empty, `lr_steps` scaled to the phase; otherwise `num_steps` is split 1/3, 1/6,
    1/3, 1/6 and `lr_steps` / `warmup_steps` are scaled to each phase."""
    out = []
    for index, (_, _, share) in enumerate(ALTERNATING_PHASES):
        if train.alternating_phase_steps:
            num_steps = int(train.alternating_phase_steps[index])
        else:
            num_steps = max(round(train.num_steps * share), 1)
        scale = num_steps / train.num_steps
        phase = train.copy_and_resolve_references()
        with phase.unlocked():
            phase.num_steps = num_steps
            if train.alternating_phase_batch_sizes:
                phase.batch_size = int(train.alternating_phase_batch_sizes[index])
            phase.warmup_steps = round(train.warmup_steps * scale)
            if train.alternating_phase_lr_steps:
                phase.lr_steps = (int(train.alternating_phase_lr_steps[index]),)
            else:
                phase.lr_steps = tuple(max(round(s * scale), 1) for s in train.lr_steps)
        out.append((num_steps, phase))
    return out


def alternating_start(index, initial, finals, *, phase2_init="initial"):
    """The parameters phase `index` (1-4) starts from, as in the paper and py-faster-rcnn's
    alt-opt: phases 1 and 2 from the initial (ImageNet) weights (phase 2 from phase 1's network
    with `phase2_init="phase1"`); phase 3 from phase 2's detector with a freshly initialised
    RPN head; phase 4 from phase 3's network with a freshly initialised predictor (fc6/fc7 stay
    phase 2's, the RPN head phase 3's). `finals`: the parameters phases 1..index-1 ended with."""
    if index == 1 or (index == 2 and phase2_init == "initial"):
        return initial
    if index == 2:
        return finals[0]
    if index == 3:
        return {**finals[1], "rpn_head": initial["rpn_head"]}
    return {**finals[2], "predictor": initial["predictor"]}


def train_alternating(config, workdir, model, mesh, writer):
    """Phases 1-4 (1-2 with `train.alternating_phases=2`), each resumable in
    `<workdir>/alternating/phase<k>`; the final network is saved to `<workdir>/checkpoints` at
    `final_step(train)` for evaluation. Stopped after phase 2 (unshared features), the final
    network is phase 1's RPN (its backbone and head) with phase 2's Fast R-CNN."""
    train = config.train
    replicated = sharding.replicated(mesh)
    initial, _ = init_state(config, model)
    frozen_rules = trainable_mask(model, {"params": initial.params, **initial.frozen})
    schedules = alternating_schedules(train)
    shared = model.rpn.shared_features
    finals = []
    for index, (objective, _, _) in enumerate(ALTERNATING_PHASES[: train.alternating_phases], 1):
        num_steps, phase_train = schedules[index - 1]
        modules = phase_modules(index, shared)
        mask = {
            k: jax.tree.map(lambda t, on=k in modules: t and on, v) for k, v in frozen_rules.items()
        }
        tx = make_optimizer(phase_train, mask)
        params = alternating_start(
            index,
            initial.params,
            [f.params for f in finals],
            phase2_init=train.alternating_phase2_init,
        )
        if not shared and index == 2 and train.alternating_phase2_init == "phase1":
            params = {**params, "backbone": finals[0].params["rpn_backbone"]}  # phase 1's convs
        # a copy: each phase donates its state to its step, earlier phases' arrays live on
        opt_state = jax.jit(tx.init)(params)
        state = jax.device_put(
            jax.tree.map(jnp.copy, initial.replace(params=params, opt_state=opt_state)),
            replicated,
        )
        proposer = None
        if index == 2:  # Fast R-CNN trained on phase 1's proposals
            proposer = jax.device_put({"params": finals[0].params, **finals[0].frozen}, replicated)
        checkpoints = checkpointing.Checkpoints(
            workdir / "alternating" / f"phase{index}", max_to_keep=train.keep_checkpoints
        )
        phase_config = config.copy_and_resolve_references()
        with phase_config.unlocked():
            phase_config.train = phase_train
        state = train_phase(
            phase_config,
            model,
            mesh,
            state,
            tx,
            checkpoints,
            writer,
            num_steps=num_steps,
            objective=objective,
            proposer=proposer,
            seed_offset=index,
            name=f"phase{index}/",
            lr_fn=learning_rate_schedule(phase_train),
            trainable=mask,
        )
        if state is None:
            return None
        finals.append(state)
    final = finals[-1].replace(step=jnp.asarray(final_step(train), jnp.int32))
    if not shared:  # the RPN of phase 1 beside the detector of phase 2
        rpn = {k: finals[0].params[k] for k in ("rpn_backbone", "rpn_head")}
        final = final.replace(params={**final.params, **rpn})
    checkpoints = checkpointing.Checkpoints(workdir, max_to_keep=train.keep_checkpoints)
    checkpoints.save(final_step(train), final, {}, {"scheme": "alternating"})
    checkpoints.wait()
    return final
