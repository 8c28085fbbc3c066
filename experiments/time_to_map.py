"""Time to accuracy: frcnn_jax against a torchvision twin, each side with the best recipe of the
same small search, schedules fitted to the same wall-clock budget, same data and loader.

    python experiments/time_to_map.py [--config configs/shapes_512.py] [--minutes 20]
        [--every 5] [--rows experiments/results_time_to_map.jsonl] [--race]

The twin is torchvision's `FasterRCNN` with frcnn_jax's tiny FPN backbone written in torch (same
layers and padding), the same anchors, RPN and RoI settings, RoIAlign 7x7 and two-fc head
(2.2M parameters on each side). Both read the same `shapes` training split through the same
loader (grain, 2 workers), batch size and image size, and are evaluated with the same VOC
evaluator on the test split; evaluation time is not counted as training time.

The search, per side: SGD (momentum 0.9, weight decay on kernels) with a x0.1 step at 75% of the
run, and AdamW (decoupled weight decay on kernels) with a cosine to zero, three learning rates
each, all after the config's linear warm-up. The schedules are fitted to the budget
(`frcnn_jax.training.budget`): each side's steps/s is measured once (a few dozen steps of the
config's optimizer after warm-up), and `num_steps` = budget x steps/s, so each side's schedule
ends when its budget is spent (AdamW's runs, whose update costs more, stop a few percent short
of their schedule's end; the twin's more than frcnn_jax's). Each run trains until the next mark
of `--every` training minutes, evaluates, and continues; a side keeps training at its final rate
if the machine is faster than measured.

Every finished run is a row of `--rows` (JSON lines): a rerun skips finished rows, so the search
can be spread over several sittings, and a killed run loses only its own row. The two sides take
turns, one run at a time, alternating so that drifts in the machine's speed fall on both.
`--race` then measures both sides' speed again (schedules fitted to the code and machine of that
moment, corrected by the ratio of the speed each side sustained in its search runs with the
recipe's optimizer to the speed measured for them) and reruns each side's best recipe (best mAP
at the last mark) back to back, so the final comparison is measured in one sitting. `--stop-by
HH:MM` starts no run that could not end by then, so a sitting ends between rows. The tables
(search, best against best, where the time goes) are printed and written next to the rows as
Markdown (`--report`: only that).
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
from frcnn_jax.config import check_config, config_from_file  # noqa: E402
from frcnn_jax.data import make_batches  # noqa: E402
from frcnn_jax.evaluation.runner import evaluate_detections  # noqa: E402
from frcnn_jax.models import build_model  # noqa: E402
from frcnn_jax.training.budget import fit_to_budget, time_steps  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
SIDES = ("frcnn_jax", "torchvision")
SCHEDULE = {"sgd": "step", "adamw": "cosine"}
# (optimizer, learning rate), most promising first: an unfinished search has the likely winners
RECIPES = (
    ("adamw", 1e-3),
    ("sgd", 0.02),
    ("adamw", 5e-4),
    ("sgd", 0.01),
    ("adamw", 2e-3),
    ("sgd", 0.04),
)


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


def ours(config):
    """(step, evaluate, block) of a fresh frcnn_jax run of `config`."""
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


def torch_twin(config):
    import torch
    from torch import nn
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.ops import MultiScaleRoIAlign

    widths, channels = (16, 32, 64, 128, 256), 64

    class TinyFPN(nn.Module):
        """frcnn_jax.models.backbones.TinyFPN in torch: same layers, same padding."""

        def __init__(self):
            super().__init__()
            self.down, self.conv = nn.ModuleList(), nn.ModuleList()
            previous = 3
            for width in widths:
                # flax "SAME" padding for a stride-2 3x3 conv on even sizes pads (0, 1)
                self.down.append(nn.Conv2d(previous, width, 3, stride=2, padding=0))
                self.conv.append(nn.Conv2d(width, width, 3, padding=1))
                previous = width
            self.inner = nn.ModuleList(nn.Conv2d(w, channels, 1) for w in widths[2:])
            self.layer = nn.ModuleList(
                nn.Conv2d(channels, channels, 3, padding=1) for _ in widths[2:]
            )
            self.out_channels = channels

        def forward(self, x):
            stages = []
            for down, conv in zip(self.down, self.conv, strict=True):
                x = torch.relu(down(nn.functional.pad(x, (0, 1, 0, 1))))
                x = torch.relu(conv(x))
                stages.append(x)
            stages = stages[2:]
            last = self.inner[-1](stages[-1])
            outputs = [self.layer[-1](last)]
            for i in reversed(range(len(stages) - 1)):
                lateral = self.inner[i](stages[i])
                last = lateral + nn.functional.interpolate(last, size=lateral.shape[-2:])
                outputs.insert(0, self.layer[i](last))
            return collections.OrderedDict((str(i), o) for i, o in enumerate(outputs))

    rpn, head = config.model.rpn, config.model.head
    sizes = tuple(tuple(s) for s in rpn.anchor_sizes)
    anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
    pool = MultiScaleRoIAlign(["0", "1", "2"], output_size=7, sampling_ratio=2)
    size = config.data.min_size
    return FasterRCNN(
        TinyFPN(),
        num_classes=None,  # given by box_predictor
        min_size=size,
        max_size=size,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
        rpn_anchor_generator=anchors,
        rpn_pre_nms_top_n_train=rpn.train_pre_nms_top_n,
        rpn_post_nms_top_n_train=rpn.train_post_nms_top_n,
        rpn_pre_nms_top_n_test=rpn.test_pre_nms_top_n,
        rpn_post_nms_top_n_test=rpn.test_post_nms_top_n,
        box_roi_pool=pool,
        box_head=TwoMLPHead(channels * 49, head.widths[-1]),
        box_predictor=FastRCNNPredictor(head.widths[-1], config.model.num_classes + 1),
        box_batch_size_per_image=head.batch_size,
        box_nms_thresh=head.nms_threshold,
        box_score_thresh=0.05,
        box_detections_per_img=100,
    )


def theirs(config):
    """(step, evaluate, block) of a fresh torchvision twin run of `config`'s recipe: the same
    optimizer rule and schedule (`training.optim.learning_rate_schedule`), weight decay on
    weights (ndim > 1) only."""
    import torch

    from frcnn_jax.models.roi_heads import Detections

    torch.manual_seed(config.train.seed)
    torch.set_num_threads(2)
    model = torch_twin(config)
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
        loss = sum(model(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
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


BUILD = {"frcnn_jax": ours, "torchvision": theirs}


# ---------------------------------------------------------------- one run


def train_batches(config):
    batches, _ = make_batches(
        config.data, config.data.train_split, batch_size=config.train.batch_size, train=True, seed=0
    )
    return batches


def measure(side, config, steps):
    """Steps/s of `side` on `config` (its own loader), after 5 untimed steps."""
    step, _, block = BUILD[side](config)
    batches = train_batches(config)
    return time_steps(lambda: step(next(batches)), steps=steps, warmup=5, block=block)


def train_for(side, config, marks, evaluate):
    """Train `side` until each mark (seconds of training time), evaluating at each; returns the
    row's measurements: mAP and steps at each mark, and where the training time went."""
    step, detect, block = BUILD[side](config)
    batches = train_batches(config)
    rows, steps, times = [], 0, collections.Counter()
    loads = []
    for mark in marks:
        while times["data"] + times["step"] + times["first"] < mark:
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
        rows.append({"minutes": mark / 60, "steps": steps, "map": value})
        print(f"  {mark / 60:5.1f} min  {steps:6d} steps  mAP@0.5 {value:.4f}", flush=True)
    return {
        "marks": rows,
        "first_step_s": round(times["first"], 2),  # frcnn_jax: includes compiling the step
        "data_s": round(times["data"], 1),
        "step_s": round(times["step"], 1),
        "eval_s": round(times["eval"], 1),
        "steps_per_second": round((steps - 1) / max(times["step"] + times["data"], 1e-9), 3),
        "load_average": round(float(np.mean(loads)), 2),
    }


# ---------------------------------------------------------------- rows and tables


class Rows(result_rows.Rows):
    """The finished rows of one setting (config, budget, evaluation images)."""

    def __init__(self, path, setting):
        super().__init__(path)
        self.setting = setting

    def mine(self, kind):
        return super().find(kind=kind, setting=self.setting)

    def find(self, kind, **match):
        found = super().find(kind=kind, setting=self.setting, **match)
        return found[0] if found else None

    def add(self, kind, **fields):
        return super().add({"kind": kind, "setting": self.setting, **fields})


class StopBy(Exception):
    """The next run could not end by --stop-by."""


def sustained_ratio(rows, side, optimizer):
    """Median, over `side`'s search rows with `optimizer`, of the steps/s a run sustained over
    its budget to the steps/s measured for the search's schedules (the config's optimizer, a
    few dozen steps); 1.0 before any such row of 2+ steps."""
    fitted = rows.find("fit", side=side)
    ratios = [
        r["steps_per_second"] / fitted["steps_per_second"]
        for r in rows.mine("search")
        if r["side"] == side
        and r["optimizer"] == optimizer
        and fitted
        and r["steps_per_second"] > 0
    ]
    return float(np.median(ratios)) if ratios else 1.0


def row_seconds(rows, minutes):
    """Wall seconds one more run is expected to take: the longest finished run's timed parts
    plus a minute of set-up (20% over the budget before any run has finished)."""
    done = [
        r["first_step_s"] + r["data_s"] + r["step_s"] + r["eval_s"]
        for r in rows.mine("search") + rows.mine("race")
    ]
    return max(done) + 60 if done else 1.2 * 60 * minutes


def clock_time(text):
    """`HH:MM` today (tomorrow if already past) as a time.time() value."""
    try:
        hours, minutes = (int(part) for part in text.split(":"))
        at = datetime.datetime.now().replace(hour=hours, minute=minutes, second=0, microsecond=0)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"--stop-by wants HH:MM, got {text!r}") from error
    if at < datetime.datetime.now():
        at += datetime.timedelta(days=1)
    return at.timestamp()


def best(rows, side):
    """`side`'s row with the highest mAP at the last mark (None if it has none)."""
    mine = [r for r in rows if r["side"] == side]
    return max(mine, key=lambda r: r["marks"][-1]["map"], default=None)


def recipe_name(row):
    return f"{row['optimizer']}+{SCHEDULE[row['optimizer']]} lr {row['learning_rate']:g}"


def tables(rows_file, command):
    search, race = rows_file.mine("search"), rows_file.mine("race")
    lines = [f"# Time to accuracy: {rows_file.setting}", "", f"Command: `{command}`", ""]
    for kind, name in (("fit", "Fitted schedules (search)"), ("race-fit", "Fitted (race)")):
        fits = rows_file.mine(kind)
        if fits:
            lines.append(
                f"{name}: "
                + "; ".join(
                    f"{r['side']} {r['steps_per_second']:.3f} steps/s"
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
    marks = [m["minutes"] for m in (search or race or [{"marks": []}])[0]["marks"]]
    head = "| side | recipe | " + " | ".join(f"{m:g} min" for m in marks)
    lines += [head + " | steps/s | load | finished |", "|---" * (len(marks) + 5) + "|"]
    for row in search:
        cells = [f"{m['map']:.3f} ({m['steps']})" for m in row["marks"]]
        lines.append(
            f"| {row['side']} | {recipe_name(row)} | "
            + " | ".join(cells)
            + f" | {row['steps_per_second']:.2f} | {row['load_average']:.1f} "
            f"| {row['finished']} |"
        )
    source = race if {r["side"] for r in race} >= set(SIDES) else search
    tops = {side: best(source, side) for side in SIDES}
    if all(tops.values()):
        kind = "the race (best recipes rerun back to back)" if source is race else "the search"
        ours_row, theirs_row = tops["frcnn_jax"], tops["torchvision"]
        lines += [
            "",
            f"## Best against best, from {kind}",
            "",
            f"frcnn_jax: {recipe_name(ours_row)}; torchvision: {recipe_name(theirs_row)}.",
            "",
            "| training minutes | frcnn_jax mAP@0.5 (steps) | torchvision mAP@0.5 "
            "(steps) | ratio |",
            "|---|---|---|---|",
        ]
        for a, b in zip(ours_row["marks"], theirs_row["marks"], strict=True):
            ratio = f"{a['map'] / b['map']:.2f}x" if b["map"] > 0 else "-"
            lines.append(
                f"| {a['minutes']:g} | {a['map']:.3f} ({a['steps']}) | "
                f"{b['map']:.3f} ({b['steps']}) | {ratio} |"
            )
        lines += [
            "",
            "## Where the training time goes (the best rows)",
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
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- main


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "shapes_512.py"))
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--every", type=float, default=5.0)
    parser.add_argument("--rows", default=str(ROOT / "experiments" / "results_time_to_map.jsonl"))
    parser.add_argument("--recipes", help="a subset, e.g. 'adamw:0.001,sgd:0.02' (default: all)")
    parser.add_argument("--sides", default=",".join(SIDES))
    parser.add_argument("--fit-steps", type=int, default=40, help="steps timed to fit schedules")
    parser.add_argument("--eval-images", type=int, default=0, help="0: the whole test split")
    parser.add_argument("--race", action="store_true", help="rerun each side's best recipe")
    parser.add_argument("--report", action="store_true", help="only the tables; train nothing")
    parser.add_argument(
        "--stop-by",
        type=clock_time,
        help="HH:MM: start no run that could not end by then (estimated from the finished rows)",
    )
    args = parser.parse_args()
    config = config_from_file(args.config)
    config.data.workers = 2
    marks = [60 * args.every * (i + 1) for i in range(math.ceil(args.minutes / args.every))]
    recipes = RECIPES
    if args.recipes:
        recipes = [(o, float(lr)) for o, lr in (r.split(":") for r in args.recipes.split(","))]
    sides = args.sides.split(",")
    setting = (
        f"{pathlib.Path(args.config).stem} ({config.data.name}, batch "
        f"{config.train.batch_size}), {args.minutes:g} training minutes, "
        f"{args.eval_images or 'all'} test images"
    )
    rows = Rows(args.rows, setting)

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
        """The side's fitted schedule (`kind` "fit": the search's, measured once; "race-fit":
        measured again right before the race, so it matches the code and machine of then)."""
        row = rows.find(kind, side=side)
        if row is None:
            measured = measure(side, config, args.fit_steps)
            # a few dozen steps of the config's optimizer run faster than 20 minutes of the
            # recipe's (AdamW's update costs more; the loaders compete with the steps): the
            # race corrects by the ratio the side's search rows with that optimizer sustained
            ratio = sustained_ratio(rows, side, optimizer) if kind == "race-fit" else 1.0
            speed = measured * ratio
            fitted = fit_to_budget(config.train, 60 * args.minutes, speed)
            row = rows.add(
                kind,
                side=side,
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
        return {
            "num_steps": row["num_steps"],
            "lr_steps": tuple(row["lr_steps"]),
            "warmup_steps": row["warmup_steps"],
        }

    def run(kind, side, optimizer, lr):
        if rows.find(kind, side=side, optimizer=optimizer, learning_rate=lr) is not None:
            return
        if args.stop_by and time.time() + row_seconds(rows, args.minutes) > args.stop_by:
            print(
                f"{kind}: {side}, {optimizer} lr {lr:g}: not started, it could not end by "
                f"--stop-by",
                flush=True,
            )
            raise StopBy
        fitted = fit("race-fit" if kind == "race" else "fit", side)
        print(f"{kind}: {side}, {optimizer} lr {lr:g}, {fitted}:", flush=True)
        measured = train_for(side, recipe_config(config, optimizer, lr, fitted), marks, evaluate)
        rows.add(kind, side=side, optimizer=optimizer, learning_rate=lr, **fitted, **measured)

    try:
        for side in sides if not args.report else ():  # before any training: same schedules
            fit("fit", side)
        for optimizer, lr in recipes if not args.report else ():
            for side in sides:
                run("search", side, optimizer, lr)
        if args.race and not args.report:
            tops = {side: best(rows.mine("search"), side) for side in sides}
            for side in sides:  # both measured first, then both races back to back
                fit("race-fit", side, tops[side]["optimizer"])
            for side, top in tops.items():
                run("race", side, top["optimizer"], top["learning_rate"])
    except StopBy:
        pass

    text = tables(rows, "python experiments/time_to_map.py " + " ".join(a for a in os.sys.argv[1:]))
    print("\n" + text)
    pathlib.Path(args.rows).with_suffix(".md").write_text(text)


if __name__ == "__main__":
    main()
