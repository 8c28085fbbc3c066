"""The paper's 4-step alternating training (section 3.2), as py-faster-rcnn's alt-opt."""

import jax
import jax.numpy as jnp

from frcnn_jax import checkpointing, sharding
from frcnn_jax.models import trainable_mask
from frcnn_jax.training.initial import init_state
from frcnn_jax.training.optim import learning_rate_schedule, make_optimizer
from frcnn_jax.training.stage import train_stage

# The paper's 4-step alternating training (section 3.2): which sub-modules each step trains,
# its objective, and its share of `train.num_steps` when `train.alternating_stage_steps` is
# empty (py-faster-rcnn's alt-opt VOC schedule: 80k RPN, 40k Fast R-CNN, 80k RPN, 40k Fast
# R-CNN iterations).
ALTERNATING_STAGES = (
    ("rpn", ("backbone", "rpn_head"), 1 / 3),
    ("head", ("backbone", "box_head", "predictor"), 1 / 6),
    ("rpn", ("rpn_head",), 1 / 3),
    ("head", ("box_head", "predictor"), 1 / 6),
)


def final_step(train):
    """The step number of the finished detector: `num_steps`, or for alternating training with
    explicit stage lengths or stopped after step 2 the sum of its steps' lengths."""
    if train.scheme != "alternating":
        return int(train.num_steps)
    if train.alternating_steps == 2:
        return sum(n for n, _ in alternating_schedules(train)[:2])
    if train.alternating_stage_steps:
        return int(sum(train.alternating_stage_steps))
    return int(train.num_steps)


def stage_modules(index, shared=True):
    """The sub-modules step `index` (1-4) trains; with unshared features (the RPN has its own
    backbone, training stops after step 2) step 1 trains the RPN's backbone."""
    modules = ALTERNATING_STAGES[index - 1][1]
    if not shared and index == 1:
        return ("rpn_backbone", "rpn_head")
    return modules


def alternating_schedules(train):
    """Per step k = 1..4: (number of steps, `train` with that stage's lr decay and warm-up).

    With `train.alternating_stage_steps` the lengths are those, each with its own decay step
    from `alternating_stage_lr_steps` (py-faster-rcnn's solvers: one x0.1 step per stage) or,
    if that is empty, `lr_steps` scaled to the stage; otherwise `num_steps` is split 1/3, 1/6,
    1/3, 1/6 and `lr_steps` / `warmup_steps` are scaled to each stage."""
    out = []
    for index, (_, _, share) in enumerate(ALTERNATING_STAGES):
        if train.alternating_stage_steps:
            num_steps = int(train.alternating_stage_steps[index])
        else:
            num_steps = max(round(train.num_steps * share), 1)
        scale = num_steps / train.num_steps
        stage = train.copy_and_resolve_references()
        with stage.unlocked():
            stage.num_steps = num_steps
            if train.alternating_stage_batch_sizes:
                stage.batch_size = int(train.alternating_stage_batch_sizes[index])
            stage.warmup_steps = round(train.warmup_steps * scale)
            if train.alternating_stage_lr_steps:
                stage.lr_steps = (int(train.alternating_stage_lr_steps[index]),)
            else:
                stage.lr_steps = tuple(max(round(s * scale), 1) for s in train.lr_steps)
        out.append((num_steps, stage))
    return out


def alternating_start(index, initial, finals, *, step2_init="initial"):
    """The parameters step `index` (1-4) starts from, as in the paper and py-faster-rcnn's
    alt-opt: steps 1 and 2 from the initial (ImageNet) weights (step 2 from step 1's network
    with `step2_init="step1"`); step 3 from step 2's detector with a freshly initialised RPN
    head; step 4 from step 3's network with a freshly initialised predictor (fc6/fc7 stay step
    2's, the RPN head step 3's). `finals`: the parameters steps 1..index-1 ended with."""
    if index == 1 or (index == 2 and step2_init == "initial"):
        return initial
    if index == 2:
        return finals[0]
    if index == 3:
        return {**finals[1], "rpn_head": initial["rpn_head"]}
    return {**finals[2], "predictor": initial["predictor"]}


def train_alternating(config, workdir, model, mesh, writer):
    """Steps 1-4 (1-2 with `train.alternating_steps=2`), each resumable in
    `<workdir>/alternating/step<k>`; the final network is saved to `<workdir>/checkpoints` at
    `final_step(train)` for evaluation. Stopped after step 2 (unshared features), the final
    network is step 1's RPN (its backbone and head) with step 2's Fast R-CNN."""
    train = config.train
    replicated = sharding.replicated(mesh)
    initial, _ = init_state(config, model)
    frozen_rules = trainable_mask(model, {"params": initial.params, **initial.frozen})
    schedules = alternating_schedules(train)
    shared = model.rpn.shared_features
    finals = []
    for index, (objective, _, _) in enumerate(ALTERNATING_STAGES[: train.alternating_steps], 1):
        num_steps, stage_train = schedules[index - 1]
        modules = stage_modules(index, shared)
        mask = {k: jax.tree.map(lambda t, on=k in modules: t and on, v)
                for k, v in frozen_rules.items()}  # fmt: skip
        tx = make_optimizer(stage_train, mask)
        params = alternating_start(index, initial.params, [f.params for f in finals],
                                   step2_init=train.alternating_step2_init)  # fmt: skip
        if not shared and index == 2 and train.alternating_step2_init == "step1":
            params = {**params, "backbone": finals[0].params["rpn_backbone"]}  # step 1's convs
        # a copy: each stage donates its state to its step, earlier stages' arrays live on
        state = jax.device_put(
            jax.tree.map(jnp.copy, initial.replace(params=params, opt_state=tx.init(params))),
            replicated,
        )
        proposer = None
        if index == 2:  # Fast R-CNN trained on step 1's proposals
            proposer = jax.device_put({"params": finals[0].params, **finals[0].frozen}, replicated)
        checkpoints = checkpointing.Checkpoints(
            workdir / "alternating" / f"step{index}", max_to_keep=train.keep_checkpoints
        )
        stage_config = config.copy_and_resolve_references()
        with stage_config.unlocked():
            stage_config.train = stage_train
        state = train_stage(
            stage_config, model, mesh, state, tx, checkpoints, writer, num_steps=num_steps,
            objective=objective, proposer=proposer, seed_offset=index, name=f"step{index}/",
            lr_fn=learning_rate_schedule(stage_train),
        )  # fmt: skip
        if state is None:
            return None
        finals.append(state)
    final = finals[-1].replace(step=jnp.asarray(final_step(train), jnp.int32))
    if not shared:  # the RPN of step 1 beside the detector of step 2
        rpn = {k: finals[0].params[k] for k in ("rpn_backbone", "rpn_head")}
        final = final.replace(params={**final.params, **rpn})
    checkpoints = checkpointing.Checkpoints(workdir, max_to_keep=train.keep_checkpoints)
    checkpoints.save(final_step(train), final, {}, {"scheme": "alternating"})
    checkpoints.wait()
    return final
