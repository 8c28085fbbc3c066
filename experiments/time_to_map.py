"""Time to accuracy: frcnn_jax against a torchvision twin, each side with the best recipe of the
same learning-rate search, schedules fitted to the same wall-clock budget, same data and loader.

    python experiments/time_to_map.py [--config configs/shapes_512.py] [--minutes 20]
        [--every 5] [--twin batchnorm|plain] [--rows experiments/results_time_to_map.jsonl]
        [--race [--race-seeds 0,1,2]] [--same-init] [--stop-by HH:MM] [--report]

The twin (`torch_twin`) is torchvision's `FasterRCNN` around frcnn_jax's tiny FPN body written
in torch, with torchvision's own FPN, RPN head, box head and predictor, and frcnn_jax's
detection settings wherever torchvision takes them (anchors, RPN and RoI sampling, proposal
counts, the minimum proposal size, RoIAlign 7x7, the RPN box loss's weight (applied to its
loss dict, as a torchvision user weights losses); the ones it fixes, such as the losses' beta
1/9, are checked to be the config's). `--twin batchnorm` (the default) builds its body as
torchvision builds a backbone trained from scratch: BatchNorm after every convolution,
Kaiming-normal initialisation; `--twin plain` is frcnn_jax's own layers (no normalisation) with
PyTorch's default initialisation. Both sides read the same `shapes` training split through the
same loader (grain, `--workers` processes, 2 unless given), batch size and image size, and are
evaluated with the same VOC evaluator on the test split; evaluation time is not counted as
training time.

The search, per side and optimizer: SGD (momentum 0.9, weight decay on kernels) with a x0.1
step at 75% of the run, and AdamW (decoupled weight decay on kernels) with a cosine to zero,
after the config's linear warm-up; three learning rates each to start (`GRID`), extended by
halving or doubling while the best rate is the lowest or highest tried (`next_rate`), so each
side's best rate ends inside its grid. The schedules are fitted to the budget
(`frcnn_jax.training.budget.fit_to_budget`): each side's steps/s is measured once per sitting
(each run of the script: a few dozen steps of the config's optimizer after warm-up, before
any training), and `num_steps` = budget x steps/s. Each run trains until the next mark of
`--every` training minutes, evaluates, and continues; a side keeps training at its final rate
if the machine is faster than measured. A run whose sustained steps/s is off its schedule's
fitted speed by more than `--speed-tolerance` (the machine's speed changed under it: its
budget ended before its schedule did) stays in the rows but does not count, and runs again in
a later sitting.

Every finished run is a row of `--rows` (JSON lines): a rerun skips the rows finished at the
current code (`CODE`'s last commit, or one of `SAME_RUNS_AS`) and config values (`SEARCHED`
aside: the search sets those on every row, so retuning the config's optimizer after the search
keeps its rows), so the search can be spread over several sittings, and a killed run loses only
its own row. The two sides take
turns, one run at a time, so that drifts in the machine's speed fall on both. `--race` then
measures both sides' speed again (corrected by the ratio of the speed each side sustained in its
search runs with the recipe's optimizer to the speed measured for them) and reruns each side's
best recipe over `--race-seeds` (initialisation and data order), the sides alternating, so a
seed's two runs share a sitting: mean and standard deviation of the mAP at each mark, and the
steps/s each side sustained. `--same-init` trains frcnn_jax's best recipe on both
sides from the same initial weights (the plain twin's, converted with `frcnn_jax.weights`) for
the same number of steps on the same batches, evaluated at the same steps: per-step learning
compared alone. `--stop-by HH:MM` starts no run that could not end by then. The tables are
printed and written next to the rows as Markdown (`--report`: only that); while a rerun at new
code is incomplete and the Markdown file holds a complete figure of earlier code, they go to
`<rows>_in_progress.md` instead (`result_rows.write_report`).
"""

import argparse
import collections
import datetime
import math
import os
import pathlib
import time

from frcnn_jax.runtime import configure_runtime

configure_runtime()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import result_rows  # noqa: E402

from frcnn_jax import sharding, training  # noqa: E402
from frcnn_jax.cli import exit_on_sigterm  # noqa: E402
from frcnn_jax.config import check_config, config_from_file  # noqa: E402
from frcnn_jax.data import make_batches  # noqa: E402
from frcnn_jax.evaluation.runner import evaluate_detections  # noqa: E402
from frcnn_jax.models import build_model  # noqa: E402
from frcnn_jax.training.budget import fit_to_budget, time_steps  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
SIDES = ("frcnn_jax", "torchvision")
LIBRARY = ("frcnn_jax", "setup.cfg", "requirements.txt")
CODE = (*LIBRARY, "experiments/time_to_map.py")
# commits (CODE's last) whose rows still count while LIBRARY is what it was there: this script
# changed after them only in when schedules are fitted, which rows count and how they are
# reported, not in what a run computes (the twins, the loaders, the training loop and the
# evaluation are theirs)
SAME_RUNS_AS = ("af0ff88", "eb22fd5", "7398316", "509b483", "acce355", "5b0f575")
# this run of the script: a sitting, whose machine speed its schedules are fitted to
SITTING = datetime.datetime.now().isoformat(timespec="seconds")
# the config fields each run of the search sets itself (`recipe_config`)
SEARCHED = ("train.optimizer", "train.lr_schedule", "train.learning_rate")
SCHEDULE = {"sgd": "step", "adamw": "cosine"}
# each optimizer's starting learning rates, most promising first (`next_rate` extends them)
GRID = {"adamw": (1e-3, 5e-4, 2e-3), "sgd": (0.02, 0.01, 0.04)}


def recipe_config(config, optimizer, learning_rate, fitted):
    """`config` with one recipe of the search and the side's fitted schedule (`fitted`:
    `budget.fit_to_budget`'s overrides)."""
    config = config.copy_and_resolve_references()
    config.train.update(
        fitted, optimizer=optimizer, lr_schedule=SCHEDULE[optimizer], learning_rate=learning_rate
    )
    check_config(config)
    return config


# ---------------------------------------------------------------- frcnn_jax


def ours(config, twin=None):
    """(step, evaluate, block) of a fresh frcnn_jax run of `config` (`twin`: the other side's
    option, unused here)."""
    del twin
    model = build_model(config)
    mesh = sharding.data_mesh(jax.devices()[:1])
    state, tx = training.initial.init_state(config, model)
    step_fn = training.step.jit_train_step(model, tx, mesh)
    detect_fn = training.evaluation.make_detect_fn(model, mesh)
    key = jax.random.key(config.train.seed)

    def step(batch):
        nonlocal state
        state, metrics = step_fn(state, sharding.shard_batch(batch.inputs, mesh), key, None)
        return metrics["loss"]

    def detect(batch):
        return detect_fn({"params": state.params, **state.frozen}, batch)

    return step, detect, jax.block_until_ready


# ---------------------------------------------------------------- torchvision twin


TWINS = {
    "batchnorm": "torchvision's practice for a backbone trained from scratch: BatchNorm after "
    "every body convolution, Kaiming-normal (fan-out) initialisation",
    "plain": "frcnn_jax's own layers (no normalisation), PyTorch's default initialisation",
}


def torch_twin(config, twin="batchnorm"):
    """torchvision's `FasterRCNN` around frcnn_jax's tiny FPN body written in torch (same
    convolutions and padding) with torchvision's own `FeaturePyramidNetwork`, `RPNHead`,
    `TwoMLPHead` and `FastRCNNPredictor`, and frcnn_jax's detection settings (anchors, RPN and
    RoI sampling, proposal counts and minimum size, RoIAlign 7x7, the losses' beta). `twin`:
    "batchnorm" (torchvision's ResNets trained from scratch: conv without bias, BatchNorm2d,
    ReLU; Kaiming-normal fan-out init, BatchNorm weight 1 and bias 0) or "plain" (frcnn_jax's
    layers exactly, whose weights `frcnn_jax.weights.from_torchvision(arch=
    "fasterrcnn_tiny_fpn")` converts)."""
    import torch
    from torch import nn
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign

    widths, channels = (16, 32, 64, 128, 256), 64
    norm = twin == "batchnorm"

    def conv(cin, cout, stride):
        # flax "SAME" padding for a stride-2 3x3 conv on even sizes pads (0, 1): done in forward
        return nn.Conv2d(
            cin, cout, 3, stride=stride, padding=0 if stride == 2 else 1, bias=not norm
        )

    class TinyBody(nn.Module):
        """frcnn_jax.models.backbones.TinyBackbone in torch: C3-C5 of five stride-2 stages."""

        def __init__(self):
            super().__init__()
            self.down, self.conv = nn.ModuleList(), nn.ModuleList()
            self.down_norm, self.conv_norm = nn.ModuleList(), nn.ModuleList()
            previous = 3
            for width in widths:
                self.down.append(conv(previous, width, 2))
                self.conv.append(conv(width, width, 1))
                if norm:
                    self.down_norm.append(nn.BatchNorm2d(width))
                    self.conv_norm.append(nn.BatchNorm2d(width))
                previous = width
            if norm:  # torchvision.models.resnet's initialisation
                for m in self.modules():
                    if isinstance(m, nn.Conv2d):
                        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                    elif isinstance(m, nn.BatchNorm2d):
                        nn.init.ones_(m.weight)
                        nn.init.zeros_(m.bias)

        def forward(self, x):
            stages = []
            for i in range(len(widths)):
                x = self.down[i](nn.functional.pad(x, (0, 1, 0, 1)))
                x = torch.relu(self.down_norm[i](x) if norm else x)
                x = self.conv[i](x)
                x = torch.relu(self.conv_norm[i](x) if norm else x)
                stages.append(x)
            return collections.OrderedDict((str(i), s) for i, s in enumerate(stages[2:]))

    class Backbone(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = TinyBody()
            self.fpn = FeaturePyramidNetwork(list(widths[2:]), channels)
            self.out_channels = channels

        def forward(self, x):
            return self.fpn(self.body(x))

    rpn, head = config.model.rpn, config.model.head
    sizes = tuple(tuple(s) for s in rpn.anchor_sizes)
    anchors = AnchorGenerator(sizes, (tuple(rpn.aspect_ratios),) * len(sizes))
    pool = MultiScaleRoIAlign(
        ["0", "1", "2"], output_size=head.output_size, sampling_ratio=head.sampling_ratio
    )
    size = config.data.min_size
    model = FasterRCNN(
        Backbone(),
        num_classes=None,  # given by box_predictor
        min_size=size,
        max_size=size,
        image_mean=[m / 255 for m in config.model.pixel_mean],
        image_std=[s / 255 for s in config.model.pixel_std],
        rpn_anchor_generator=anchors,
        rpn_pre_nms_top_n_train=rpn.train_pre_nms_top_n,
        rpn_post_nms_top_n_train=rpn.train_post_nms_top_n,
        rpn_pre_nms_top_n_test=rpn.test_pre_nms_top_n,
        rpn_post_nms_top_n_test=rpn.test_post_nms_top_n,
        rpn_nms_thresh=rpn.nms_threshold,
        rpn_fg_iou_thresh=rpn.positive_iou,
        rpn_bg_iou_thresh=rpn.negative_iou,
        rpn_batch_size_per_image=rpn.batch_size,
        rpn_positive_fraction=rpn.positive_fraction,
        box_roi_pool=pool,
        box_head=TwoMLPHead(channels * head.output_size**2, head.widths[-1]),
        box_predictor=FastRCNNPredictor(head.widths[-1], config.model.num_classes + 1),
        box_fg_iou_thresh=head.foreground_iou,
        box_bg_iou_thresh=head.background_iou[1],
        box_batch_size_per_image=head.batch_size,
        box_positive_fraction=head.positive_fraction,
        box_nms_thresh=head.nms_threshold,
        box_score_thresh=head.score_threshold,
        box_detections_per_img=head.max_detections,
    )
    model.rpn.min_size = rpn.min_size  # torchvision fixes 1e-3; frcnn_jax's config sets it
    return model


def check_twin_settings(config):
    """The settings the twin cannot take from `config` must be torchvision's fixed ones."""
    rpn, head = config.model.rpn, config.model.head
    fixed = {
        "model.backbone": (config.model.backbone, "tiny_fpn"),
        "model.rpn.channels": (rpn.channels, 64),  # torchvision's RPNHead keeps the FPN's width
        "model.rpn.objectness": (rpn.objectness, "sigmoid"),
        "model.rpn.beta": (rpn.beta, 1 / 9),
        "model.rpn.box_normalizer": (rpn.box_normalizer, None),
        "model.head.beta": (head.beta, 1 / 9),
        "model.head.background_iou[0]": (head.background_iou[0], 0.0),
        "model.head.pooler": (head.pooler, "align"),
        "model.head.aligned": (head.aligned, False),
    }
    differ = {k: v for k, (v, want) in fixed.items() if v != want}
    if differ:
        raise SystemExit(f"the torchvision twin cannot follow these settings: {differ}")


def twin_loss(losses, config):
    """The sum of torchvision's loss dict, its RPN box loss weighted by the config's lambda (over
    torchvision's normaliser, the sampled anchors, which `check_twin_settings` requires)."""
    weights = {"loss_rpn_box_reg": float(config.model.rpn.box_weight)}
    return sum(value * weights.get(name, 1.0) for name, value in losses.items())


def theirs(config, twin="batchnorm"):
    """(step, evaluate, block) of a fresh torchvision twin (`torch_twin(config, twin)`, its
    initialisation from `config.train.seed`) run of `config`'s recipe: the same optimizer rule
    and schedule (`training.optim.learning_rate_schedule`), weight decay on weights (ndim > 1)
    only, the gradient clipped to the config's global norm."""
    import torch

    from frcnn_jax.models.roi_heads import Detections

    torch.manual_seed(config.train.seed)
    torch.set_num_threads(2)
    model = torch_twin(config, twin)
    train = config.train
    groups = [
        {
            "params": [p for p in model.parameters() if p.ndim > 1],
            "weight_decay": train.weight_decay,
        },
        {"params": [p for p in model.parameters() if p.ndim <= 1], "weight_decay": 0.0},
    ]
    if train.optimizer == "adamw":
        betas = (train.adam_b1, train.adam_b2)
        optimizer = torch.optim.AdamW(groups, train.learning_rate, betas, train.adam_eps)
    else:
        optimizer = torch.optim.SGD(groups, lr=train.learning_rate, momentum=train.momentum)
    schedule = training.optim.learning_rate_schedule(train)
    steps = 0

    def to_torch(batch):
        images, targets = [], []
        for i in range(len(batch.inputs.valid)):
            h, w = batch.inputs.image_size[i]
            images.append(
                torch.from_numpy(batch.inputs.image[i, :h, :w]).permute(2, 0, 1).float() / 255
            )
            valid = batch.inputs.gt_valid[i]
            boxes = torch.from_numpy(batch.inputs.gt_boxes[i][valid])
            labels = torch.from_numpy(batch.inputs.gt_classes[i][valid]).long()
            targets.append({"boxes": boxes, "labels": labels})
        return images, targets

    def step(batch):
        nonlocal steps
        model.train()
        for group in optimizer.param_groups:
            group["lr"] = float(schedule(steps))
        images, targets = to_torch(batch)
        loss = twin_loss(model(images, targets), config)
        optimizer.zero_grad()
        loss.backward()
        if train.grad_clip_norm:  # the global norm over every parameter, as optax's
            torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip_norm)
        optimizer.step()
        steps += 1
        return loss

    def detect(batch):
        model.eval()
        images, _ = to_torch(batch)
        with torch.no_grad():
            outputs = model(images)
        num = 100
        out = {
            k: np.zeros((len(images), num, *s), d)
            for k, s, d in [
                ("boxes", (4,), np.float32),
                ("scores", (), np.float32),
                ("classes", (), np.int32),
                ("valid", (), bool),
            ]
        }
        for i, o in enumerate(outputs):
            n = len(o["scores"])
            scale = float(batch.inputs.scale[i]) or 1.0
            out["boxes"][i, :n] = o["boxes"].numpy() / scale
            out["scores"][i, :n] = o["scores"].numpy()
            out["classes"][i, :n] = o["labels"].numpy()
            out["valid"][i, :n] = True
        return Detections(**out), None

    return step, detect, lambda x: x


def same_init_weights(config, path):
    """The plain twin's initial weights (seed `config.train.seed`) converted to frcnn_jax's
    variables (`frcnn_jax.weights`), written to `path` for `model.init_checkpoint`."""
    import torch

    from frcnn_jax import weights

    torch.manual_seed(config.train.seed)
    state = {k: v.detach().numpy() for k, v in torch_twin(config, "plain").state_dict().items()}
    flat, covers = weights.from_torchvision(state, arch="fasterrcnn_tiny_fpn")
    weights.save(path, flat, covers, backbone=config.model.backbone)
    return path


BUILD = {"frcnn_jax": ours, "torchvision": theirs}


# ---------------------------------------------------------------- one run


def train_batches(config):
    batches, _ = make_batches(
        config.data,
        config.data.train_split,
        batch_size=config.train.batch_size,
        train=True,
        seed=config.train.seed,
    )
    return batches


def measure(side, config, steps, twin):
    """Steps/s of `side` on `config` (its own loader), after 5 untimed steps."""
    step, _, block = BUILD[side](config, twin)
    batches = train_batches(config)
    return time_steps(lambda: step(next(batches)), steps=steps, warmup=5, block=block)


def train_for(side, config, marks, evaluate, twin, by="seconds"):
    """Train `side` until each mark (seconds of training time, or steps with `by="steps"`),
    evaluating at each; returns the row's measurements: mAP and steps at each mark, and where
    the training time went."""
    step, detect, block = BUILD[side](config, twin)
    batches = train_batches(config)
    rows, steps, times = [], 0, collections.Counter()
    loads = []
    for mark in marks:
        while (steps if by == "steps" else times["data"] + times["step"] + times["first"]) < mark:
            start = time.perf_counter()
            batch = next(batches)
            fetched = time.perf_counter()
            block(step(batch))
            done = time.perf_counter()
            times["data"] += fetched - start
            times["first" if steps == 0 else "step"] += done - fetched
            steps += 1
        loads.append(os.getloadavg()[0])
        start = time.perf_counter()
        value = evaluate(detect)
        times["eval"] += time.perf_counter() - start
        minutes = (times["data"] + times["step"] + times["first"]) / 60
        rows.append(
            {
                "minutes": round(minutes, 3) if by == "steps" else mark / 60,
                "steps": steps,
                "map": value,
            }
        )
        print(f"  {minutes:5.1f} min  {steps:6d} steps  mAP@0.5 {value:.4f}", flush=True)
    return {
        "marks": rows,
        "first_step_s": round(times["first"], 2),  # frcnn_jax: includes compiling the step
        "data_s": round(times["data"], 1),
        "step_s": round(times["step"], 1),
        "eval_s": round(times["eval"], 1),
        "steps_per_second": round((steps - 1) / max(times["step"] + times["data"], 1e-9), 3),
        "load_average": round(float(np.mean(loads)), 2),
    }


# ---------------------------------------------------------------- the search's grid


def next_rate(rows, side, optimizer, limit=6):
    """The next learning rate `side`'s search should try with `optimizer`, or None when its
    best rate is inside the rates tried: the starting grid first, then half the lowest rate
    while the lowest is the best (ties: the lowest), twice the highest while the highest is
    the best, `limit` rates at most."""
    tried = {
        r["learning_rate"]: r["marks"][-1]["map"]
        for r in rows.counted("search")
        if r["side"] == side and r["optimizer"] == optimizer
    }
    for rate in GRID[optimizer]:
        if rate not in tried:
            return rate
    rates = sorted(tried)
    top = max(rates, key=lambda rate: tried[rate])
    if len(rates) >= limit or rates[0] < top < rates[-1]:
        return None
    return rates[0] / 2 if top == rates[0] else rates[-1] * 2


# ---------------------------------------------------------------- rows and tables


class Rows(result_rows.Rows):
    """The finished rows of one setting (config, twin, budget, evaluation images) measured at
    one version of the code (`CODE`'s last commit, or one of `SAME_RUNS_AS` while the library
    is unchanged since) and of `config`'s values but `SEARCHED`: a rerun at changed code or
    values starts afresh. `tolerance`: see `on_schedule`."""

    def __init__(self, path, setting, config, tolerance):
        super().__init__(path)
        self.setting, self.tolerance = setting, tolerance
        digest = result_rows.config_digest(config, ignore=SEARCHED)
        self.code = f"{result_rows.code_version(CODE)} config {digest}"
        library = result_rows.code_version(LIBRARY)
        self.codes = {self.code} | {
            f"{earlier} config {digest}"
            for earlier in SAME_RUNS_AS
            if result_rows.code_version(LIBRARY, at=earlier) == library
        }

    def mine(self, kind):
        return [
            r for r in super().find(kind=kind, setting=self.setting) if r.get("code") in self.codes
        ]

    def find(self, kind, **match):
        found = [r for r in self.mine(kind) if all(r.get(k) == v for k, v in match.items())]
        return found[0] if found else None

    def add(self, kind, **fields):
        return super().add({"kind": kind, "setting": self.setting, "code": self.code, **fields})

    def fitted_speed(self, row):
        """The steps/s `row`'s schedule was fitted to (None if unknown): the row's own record,
        or, for rows from before the fits were per sitting, its code's one fit."""
        if "fit_steps_per_second" in row:
            return row["fit_steps_per_second"]
        kind = "race-fit" if row["kind"] == "race" else "fit"
        fit = next(
            (
                r
                for r in self.mine(kind)
                if r["side"] == row["side"] and r["code"] == row["code"] and "sitting" not in r
            ),
            None,
        )
        return fit and fit["steps_per_second"]

    def on_schedule(self, row):
        """Whether `row` ran at the speed its schedule was fitted to, within `tolerance` (a
        fraction): a run on a machine that turned slower (another sitting, a busy neighbour)
        ends its budget before its schedule does, and does not count (runs by steps always
        do)."""
        speed = self.fitted_speed(row)
        if row["kind"] not in ("search", "race") or not speed:
            return True
        return abs(row["steps_per_second"] / speed - 1) <= self.tolerance

    def counted(self, kind):
        return [r for r in self.mine(kind) if self.on_schedule(r)]


class StopBy(Exception):
    """The next run could not end by --stop-by."""


def sustained_ratio(rows, side, optimizer):
    """Median, over `side`'s counted search rows with `optimizer`, of the steps/s a run
    sustained over its budget to the steps/s measured for its schedule (the config's
    optimizer, a few dozen steps); 1.0 before any such row of 2+ steps."""
    ratios = [
        r["steps_per_second"] / rows.fitted_speed(r)
        for r in rows.counted("search")
        if r["side"] == side
        and r["optimizer"] == optimizer
        and rows.fitted_speed(r)
        and r["steps_per_second"] > 0
    ]
    return float(np.median(ratios)) if ratios else 1.0


def row_seconds(rows, minutes):
    """Wall seconds one more run is expected to take: the longest finished run's timed parts
    plus a minute of set-up (20% over the budget before any run has finished)."""
    done = [
        r["first_step_s"] + r["data_s"] + r["step_s"] + r["eval_s"]
        for kind in ("search", "race", "same-init")
        for r in rows.mine(kind)
    ]
    return max(done) + 60 if done else 1.2 * 60 * minutes


def best(rows, side):
    """`side`'s row with the highest mAP at the last mark (None if it has none)."""
    mine = [r for r in rows if r["side"] == side]
    return max(mine, key=lambda r: r["marks"][-1]["map"], default=None)


def recipe_name(row):
    return f"{row['optimizer']}+{SCHEDULE[row['optimizer']]} lr {row['learning_rate']:g}"


def mean_sd(values):
    values = np.asarray(values, float)
    sd = values.std(ddof=1) if len(values) > 1 else 0.0
    return values.mean(), sd


def race_table(race):
    """Each side's best recipe over its seeds: mean +- sd mAP at each mark, the ratio of the
    means, and the steps/s each sustained."""
    by_side = {side: [r for r in race if r["side"] == side] for side in SIDES}
    ours_rows, theirs_rows = by_side["frcnn_jax"], by_side["torchvision"]
    lines = [
        f"frcnn_jax: {recipe_name(ours_rows[0])}, seeds "
        f"{sorted(r['seed'] for r in ours_rows)}; torchvision: {recipe_name(theirs_rows[0])}, "
        f"seeds {sorted(r['seed'] for r in theirs_rows)}.",
        "",
        "| training minutes | frcnn_jax mAP@0.5 (steps) | torchvision mAP@0.5 (steps) | mAP "
        "ratio |",
        "|---|---|---|---|",
    ]
    for i, mark in enumerate(ours_rows[0]["marks"]):
        cells, means = [], []
        for side_rows in (ours_rows, theirs_rows):
            mean, sd = mean_sd([r["marks"][i]["map"] for r in side_rows])
            steps = np.mean([r["marks"][i]["steps"] for r in side_rows])
            cells.append(f"{mean:.3f} +- {sd:.3f} ({steps:.0f})")
            means.append(mean)
        ratio = f"{means[0] / means[1]:.2f}x" if means[1] > 0 else "-"
        lines.append(f"| {mark['minutes']:g} | {cells[0]} | {cells[1]} | {ratio} |")
    speeds = [np.mean([r["steps_per_second"] for r in rows]) for rows in (ours_rows, theirs_rows)]
    ratio = f" ({speeds[0] / speeds[1]:.2f}x)" if speeds[1] > 0 else ""
    lines += [
        "",
        f"Steps/s sustained: frcnn_jax {speeds[0]:.3f}, torchvision {speeds[1]:.3f}{ratio}.",
    ]
    return lines


def same_init_table(rows):
    ours_row = next(r for r in rows if r["side"] == "frcnn_jax")
    theirs_row = next(r for r in rows if r["side"] == "torchvision")
    lines = [
        f"Both sides from the same initial weights (the plain twin's, seed {ours_row['seed']}, "
        f"converted with `frcnn_jax.weights.from_torchvision(arch='fasterrcnn_tiny_fpn')`), "
        f"{recipe_name(ours_row)}, the same batches, evaluated at the same steps:",
        "",
        "| steps | frcnn_jax mAP@0.5 (minutes) | torchvision mAP@0.5 (minutes) | difference |",
        "|---|---|---|---|",
    ]
    for a, b in zip(ours_row["marks"], theirs_row["marks"], strict=True):
        lines.append(
            f"| {a['steps']} | {a['map']:.3f} ({a['minutes']:.1f}) | {b['map']:.3f} "
            f"({b['minutes']:.1f}) | {a['map'] - b['map']:+.3f} |"
        )
    return lines


def tables(rows_file, command, twin, race_seeds=(0, 1, 2)):
    """The results file's text; its README line waits for the whole race (every seed of
    `race_seeds` on both sides) and the same-initialisation comparison."""
    search, race = rows_file.counted("search"), rows_file.counted("race")
    lines = [f"# Time to accuracy: {rows_file.setting}", ""]
    lines += result_rows.provenance(command)
    lines += [f"The torchvision twin: {TWINS[twin]} (`torch_twin` in the script).", ""]
    for kind, name in (("fit", "Fitted schedules (search)"), ("race-fit", "Fitted (race)")):
        fits = rows_file.mine(kind)
        if fits:
            lines.append(
                f"{name}, each sitting's: "
                + "; ".join(
                    f"{r.get('sitting', r['finished'])[:16]} {r['side']} "
                    f"{r['steps_per_second']:.3f} steps/s"
                    + (
                        f" ({r['measured_steps_per_second']:.3f} measured x "
                        f"{r['sustained_ratio']:.3f} sustained in the search)"
                        if "sustained_ratio" in r
                        else " measured"
                    )
                    + f" -> {r['num_steps']} steps"
                    for r in fits
                )
                + "."
            )
    lines += ["", "## Search (one row per run; mAP@0.5 at each mark, steps in brackets)", ""]
    every = rows_file.mine("search")
    marks = [m["minutes"] for m in (every or race or [{"marks": []}])[0]["marks"]]
    head = "| side | recipe | " + " | ".join(f"{m:g} min" for m in marks)
    lines += [
        head + " | steps/s (of fitted) | load | commit | finished |",
        "|---" * (len(marks) + 6) + "|",
    ]
    for row in sorted(every, key=lambda r: (r["side"], r["optimizer"], r["learning_rate"])):
        cells = [f"{m['map']:.3f} ({m['steps']})" for m in row["marks"]]
        fitted = rows_file.fitted_speed(row)
        of = f" ({row['steps_per_second'] / fitted:.2f})" if fitted else ""
        late = "" if rows_file.on_schedule(row) else " (not counted)"
        lines.append(
            f"| {row['side']} | {recipe_name(row)}{late} | "
            + " | ".join(cells)
            + f" | {row['steps_per_second']:.2f}{of} | {row['load_average']:.1f} "
            f"| {row['commit']} | {row['finished']} |"
        )
    if len(every) > len(search):
        lines += [
            "",
            f"Not counted: a run whose steps/s was off the speed its schedule was fitted to by "
            f"more than {rows_file.tolerance:.0%} (the machine's speed changed under it, and "
            "its schedule did not end with its budget); the recipe runs again in a later sitting.",
        ]
    if {r["side"] for r in race} >= set(SIDES):
        lines += ["", "## Best against best: the race (best recipes rerun back to back)", ""]
        lines += race_table(race)
    elif all(best(search, side) for side in SIDES):
        lines += ["", "## Best against best, from the search (no race yet)", ""]
        lines += race_table([best(search, side) for side in SIDES])
    same = rows_file.counted("same-init")
    if {r["side"] for r in same} >= set(SIDES):
        lines += ["", "## Per-step learning from the same initial weights", ""]
        lines += same_init_table(same)
    tops = {side: best(race or search, side) for side in SIDES}
    if all(tops.values()):
        lines += [
            "",
            "## Where the training time goes (each side's best row)",
            "",
            "| side | steps/s | first step s | waiting for data s | steps s | eval s "
            "(not counted) |",
            "|---|---|---|---|---|---|",
        ]
        for side, row in tops.items():
            lines.append(
                f"| {side} | {row['steps_per_second']:.3f} | {row['first_step_s']} | "
                f"{row['data_s']} | {row['step_s']} | {row['eval_s']} |"
            )
    raced = {(r["side"], r["seed"]) for r in race}
    if raced >= {(side, seed) for side in SIDES for seed in race_seeds} and {
        r["side"] for r in same
    } >= set(SIDES):
        lines += ["", f"README: {readme_line(race, same, twin)}"]
    return "\n".join(lines) + "\n"


def readme_line(race, same, twin):
    """The race's result in a sentence (and the same-initialisation comparison's, if run)."""
    last = {
        side: mean_sd([r["marks"][-1]["map"] for r in race if r["side"] == side]) for side in SIDES
    }
    speed = {
        side: np.mean([r["steps_per_second"] for r in race if r["side"] == side]) for side in SIDES
    }
    minutes = race[0]["marks"][-1]["minutes"]
    seeds = len({r["seed"] for r in race})
    (ours, ours_sd), (theirs, theirs_sd) = last["frcnn_jax"], last["torchvision"]
    ratio = f"{ours / theirs:.2f}x" if theirs > 0 else "n/a"
    text = (
        f"mAP@0.5 after {minutes:g} training minutes, best recipe of each side's search, "
        f"{seeds} seeds: {ours:.3f} +- {ours_sd:.3f} vs {theirs:.3f} +- {theirs_sd:.3f} for a "
        f"torchvision twin ({TWINS[twin]}): {ratio}"
    )
    text += (
        f"; {speed['frcnn_jax']:.2f} vs {speed['torchvision']:.2f} steps/s "
        f"({speed['frcnn_jax'] / speed['torchvision']:.2f}x)"
    )
    if {r["side"] for r in same} >= set(SIDES):
        final = {r["side"]: r["marks"][-1] for r in same}
        text += (
            f"; from the same initial weights, after the same {final['frcnn_jax']['steps']} "
            f"steps: {final['frcnn_jax']['map']:.3f} vs {final['torchvision']['map']:.3f}"
        )
    return text


# ---------------------------------------------------------------- main


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "shapes_512.py"))
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--every", type=float, default=5.0)
    parser.add_argument("--rows", default=str(ROOT / "experiments" / "results_time_to_map.jsonl"))
    parser.add_argument("--twin", choices=sorted(TWINS), default="batchnorm")
    parser.add_argument(
        "--recipes", help="only these, e.g. 'adamw:0.001,sgd:0.02' (default: the grid, extended)"
    )
    parser.add_argument("--sides", default=",".join(SIDES))
    parser.add_argument(
        "--fit-steps",
        type=int,
        default=150,  # 40 moved by 15-20% between measurements minutes apart
        help="steps timed to fit schedules",
    )
    parser.add_argument("--eval-images", type=int, default=0, help="0: the whole test split")
    parser.add_argument("--race", action="store_true", help="rerun each side's best recipe")
    parser.add_argument(
        "--race-seeds", default=(0, 1, 2), type=lambda s: tuple(int(x) for x in s.split(","))
    )
    parser.add_argument(
        "--same-init",
        action="store_true",
        help="frcnn_jax's best recipe on both sides from the same initial weights",
    )
    parser.add_argument(
        "--workers", type=int, default=2, help="loader worker processes (both sides' loaders)"
    )
    parser.add_argument(
        "--speed-tolerance",
        type=float,
        default=0.15,
        help="a run whose steps/s is off its schedule's fitted speed by more than this fraction "
        "does not count, and runs again in a later sitting",
    )
    parser.add_argument("--report", action="store_true", help="only the tables; train nothing")
    parser.add_argument(
        "--stop-by",
        type=result_rows.clock_time,
        help="HH:MM: start no run that could not end by then (estimated from the finished rows)",
    )
    args = parser.parse_args()
    exit_on_sigterm()
    config = config_from_file(args.config)
    config.data.workers = args.workers
    check_twin_settings(config)
    marks = [60 * args.every * (i + 1) for i in range(math.ceil(args.minutes / args.every))]
    sides = args.sides.split(",")
    setting = (
        f"{pathlib.Path(args.config).stem} ({config.data.name}, batch "
        f"{config.train.batch_size}), {args.minutes:g} training minutes, "
        f"{args.eval_images or 'all'} test images, {args.twin} twin"
    )
    rows = Rows(args.rows, setting, config, args.speed_tolerance)

    def evaluate(detect):
        batches, info = make_batches(
            config.data, config.eval.split, batch_size=config.eval.batch_size, train=False
        )
        if args.eval_images:
            import dataclasses
            import itertools

            batches = itertools.islice(
                batches, math.ceil(args.eval_images / config.eval.batch_size)
            )
            info = dataclasses.replace(info, num_examples=args.eval_images)
        return evaluate_detections(detect, batches, info, coco=False)["voc"]["mAP"]

    def fit(kind, side, optimizer=None):
        """The side's fitted schedule in this sitting (`kind` "fit": the search's; "race-fit":
        the race's, corrected by the speed the search's runs sustained), measured at its first
        use: each sitting's schedules fit the machine's speed of then."""
        row = rows.find(kind, side=side, sitting=SITTING)
        if row is None:
            measured = measure(side, config, args.fit_steps, args.twin)
            # a few dozen steps of the config's optimizer run faster than 20 minutes of the
            # recipe's (AdamW's update costs more; the loaders compete with the steps): the
            # race corrects by the ratio the side's search rows with that optimizer sustained
            ratio = sustained_ratio(rows, side, optimizer) if kind == "race-fit" else 1.0
            speed = measured * ratio
            fitted = fit_to_budget(config.train, 60 * args.minutes, speed)
            row = rows.add(
                kind,
                side=side,
                sitting=SITTING,
                steps_per_second=round(speed, 3),
                measured_steps_per_second=round(measured, 3),
                sustained_ratio=round(ratio, 3),
                **fitted,
            )
            print(
                f"{side}: {measured:.3f} steps/s measured, x{ratio:.3f} sustained -> {fitted} "
                f"for {args.minutes:g} min",
                flush=True,
            )
        return row

    def schedule(fit_row):
        return {
            "num_steps": fit_row["num_steps"],
            "lr_steps": tuple(fit_row["lr_steps"]),
            "warmup_steps": fit_row["warmup_steps"],
        }

    def run(kind, side, optimizer, lr, seed=0):
        """Train the recipe unless it has a counted row or ran in this sitting already (its
        rerun waits for another sitting); whether it trained."""
        recipe = {"side": side, "optimizer": optimizer, "learning_rate": lr, "seed": seed}
        done = [r for r in rows.mine(kind) if all(r[k] == v for k, v in recipe.items())]
        if any(rows.on_schedule(r) or r.get("sitting") == SITTING for r in done):
            return False
        if args.stop_by and time.time() + row_seconds(rows, args.minutes) > args.stop_by:
            print(
                f"{kind}: {side}, {optimizer} lr {lr:g}: not started, it could not end by "
                f"--stop-by",
                flush=True,
            )
            raise StopBy
        twin, by, run_marks = args.twin, "seconds", marks
        if kind == "same-init":  # frcnn_jax's schedule on both sides, marks in steps
            fit_row = fit("fit", "frcnn_jax")
            fitted = schedule(fit_row)
            twin, by = "plain", "steps"
            run_marks = [
                round(fitted["num_steps"] * (i + 1) / len(marks)) for i in range(len(marks))
            ]
        else:
            fit_row = fit("race-fit" if kind == "race" else "fit", side)
            fitted = schedule(fit_row)
        recipe = recipe_config(config, optimizer, lr, fitted)
        recipe.train.seed = seed
        if kind == "same-init" and side == "frcnn_jax":
            path = pathlib.Path(args.rows).parent / f"same_init_seed{seed}.npz"
            recipe.model.init_checkpoint = str(same_init_weights(recipe, path))
        print(f"{kind}: {side}, {optimizer} lr {lr:g}, seed {seed}, {fitted}:", flush=True)
        measured = train_for(side, recipe, run_marks, evaluate, twin, by)
        rows.add(
            kind,
            side=side,
            optimizer=optimizer,
            learning_rate=lr,
            seed=seed,
            sitting=SITTING,
            fit_steps_per_second=fit_row["steps_per_second"],
            **fitted,
            **measured,
        )
        return True

    try:
        for side in sides if not args.report else ():  # before any training: same schedules
            fit("fit", side)
        if args.recipes and not args.report:
            for recipe in args.recipes.split(","):
                optimizer, lr = recipe.split(":")
                for side in sides:
                    run("search", side, optimizer, float(lr))
        while not args.recipes and not args.report:  # rounds: each side one run per optimizer
            todo = [
                (side, optimizer, next_rate(rows, side, optimizer))
                for optimizer in GRID
                for side in sides
            ]
            todo = [t for t in todo if t[2] is not None]
            # a round that trained nothing: what is left waits for another sitting (a run
            # here drifted off its fitted speed); the race goes on from the counted rows
            trained = [run("search", side, optimizer, lr) for side, optimizer, lr in todo]
            if not any(trained):
                break
        if args.race and not args.report:
            tops = {side: best(rows.counted("search"), side) for side in sides}
            for side in sides:  # both measured first, then the races back to back
                fit("race-fit", side, tops[side]["optimizer"])
            for seed in args.race_seeds:
                for side, top in tops.items():
                    run("race", side, top["optimizer"], top["learning_rate"], seed)
        if args.same_init and not args.report:
            top = best(rows.counted("search"), "frcnn_jax")
            for side in sides:
                run("same-init", side, top["optimizer"], top["learning_rate"])
    except StopBy:
        pass

    command = "python experiments/time_to_map.py " + " ".join(a for a in os.sys.argv[1:])
    text = tables(rows, command.strip(), args.twin, args.race_seeds)
    print("\n" + text)
    written = result_rows.write_report(pathlib.Path(args.rows).with_suffix(".md"), text)
    print(f"written to {written.relative_to(ROOT) if written.is_relative_to(ROOT) else written}")


if __name__ == "__main__":
    main()
