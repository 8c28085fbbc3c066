"""Time to accuracy: frcnn_jax vs a torchvision twin, same wall-clock budget, same data.

    python experiments/time_to_map.py [--config configs/shapes_512.py] [--minutes 20] [--every 5]

Both detectors train on the same `shapes` training split, read through the same loader (grain,
2 workers), with the same architecture (the tiny FPN backbone, P3-P5 anchors, RPN, RoIAlign
7x7 two-fc head), the same optimizer (SGD momentum 0.9, weight decay on weights only, linear
warm-up then a x0.1 step), batch size and image size. Every `--every` minutes of *training*
time (evaluation is not counted) each model is evaluated on the test split with the same VOC
evaluator, and a row of mAP@0.5 is printed. The two runs take turns on the machine (frcnn_jax
first, then torchvision), never at the same time.
"""

import argparse
import collections
import functools
import math
import pathlib
import time

from frcnn_jax.runtime import configure_runtime

configure_runtime()

import jax  # noqa: E402
import numpy as np  # noqa: E402

from frcnn_jax import sharding, training  # noqa: E402
from frcnn_jax.config import config_from_file  # noqa: E402
from frcnn_jax.data import make_batches  # noqa: E402
from frcnn_jax.evaluation.runner import evaluate_detections  # noqa: E402
from frcnn_jax.models import build_model  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- frcnn_jax


def run_ours(config, marks, evaluate_fn):
    model = build_model(config)
    mesh = sharding.data_mesh(jax.devices()[:1])
    state, tx = training.initial.init_state(config, model)
    step_fn = jax.jit(
        functools.partial(training.step.train_step, model=model, tx=tx), donate_argnums=0
    )
    detect_fn = training.evaluation.make_detect_fn(model, mesh)
    batches, _ = make_batches(config.data, config.data.train_split,
                              batch_size=config.train.batch_size, train=True, seed=0)  # fmt: skip
    key = jax.random.key(config.train.seed)

    def step():
        nonlocal state
        batch = {k: v for k, v in next(batches).items() if k != "image_id"}
        state, metrics = step_fn(state, batch, key)
        return metrics["loss"]

    def evaluate():
        variables = {"params": state.params, **state.frozen}
        return evaluate_fn(lambda batch: detect_fn(variables, batch))

    return train_for(step, evaluate, marks, block=jax.block_until_ready)


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


def run_torch(config, marks, evaluate_fn):
    import torch

    from frcnn_jax.postprocess import Detections

    torch.manual_seed(config.train.seed)
    torch.set_num_threads(2)
    model = torch_twin(config)
    train = config.train
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    optimizer = torch.optim.SGD(
        [{"params": decay, "weight_decay": train.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=train.learning_rate, momentum=train.momentum,
    )  # fmt: skip
    schedule = training.optim.learning_rate_schedule(train)
    batches, _ = make_batches(config.data, config.data.train_split,
                              batch_size=train.batch_size, train=True, seed=0)  # fmt: skip
    steps = 0

    def to_torch(batch):
        images, targets = [], []
        for i in range(len(batch["valid"])):
            h, w = batch["image_size"][i]
            images.append(
                torch.from_numpy(batch["image"][i, :h, :w]).permute(2, 0, 1).float() / 255
            )
            valid = batch["gt_valid"][i]
            boxes = torch.from_numpy(batch["gt_boxes"][i][valid])
            labels = torch.from_numpy(batch["gt_classes"][i][valid]).long()
            targets.append({"boxes": boxes, "labels": labels})
        return images, targets

    def step():
        nonlocal steps
        model.train()
        for group in optimizer.param_groups:
            group["lr"] = float(schedule(steps))
        images, targets = to_torch(next(batches))
        losses = model(images, targets)
        loss = sum(losses.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        steps += 1
        return loss

    def detect_fn(batch):
        model.eval()
        images, _ = to_torch(batch)
        with torch.no_grad():
            outputs = model(images)
        num = 100
        out = {k: np.zeros((len(images), num, *s), d) for k, s, d in
               [("boxes", (4,), np.float32), ("scores", (), np.float32), ("classes", (), np.int32),
                ("valid", (), bool)]}  # fmt: skip
        for i, o in enumerate(outputs):
            n = len(o["scores"])
            scale = float(batch["scale"][i]) or 1.0
            out["boxes"][i, :n] = o["boxes"].numpy() / scale
            out["scores"][i, :n] = o["scores"].numpy()
            out["classes"][i, :n] = o["labels"].numpy()
            out["valid"][i, :n] = True
        return Detections(**out), None

    return train_for(step, lambda: evaluate_fn(detect_fn), marks, block=lambda x: x)


# ---------------------------------------------------------------- shared


def train_for(step, evaluate, marks, *, block):
    """Train until each mark (seconds of training time), evaluating at each."""
    rows, trained, steps = [], 0.0, 0
    for mark in marks:
        while trained < mark:
            start = time.perf_counter()
            block(step())
            trained += time.perf_counter() - start
            steps += 1
        rows.append((mark, steps, evaluate()))
        print(f"  {mark / 60:5.1f} min  {steps:6d} steps  mAP@0.5 {rows[-1][2]:.4f}", flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "shapes_512.py"))
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--every", type=float, default=5.0)
    parser.add_argument("--eval-images", type=int, default=0, help="0: the whole test split")
    parser.add_argument("--only", choices=("frcnn_jax", "torchvision"), default=None)
    args = parser.parse_args()
    config = config_from_file(args.config)
    config.data.workers = 2
    marks = [60 * args.every * (i + 1) for i in range(math.ceil(args.minutes / args.every))]

    def evaluate_fn(detect_fn):
        batches, info = make_batches(config.data, config.eval.split,
                                     batch_size=config.eval.batch_size, train=False)  # fmt: skip
        if args.eval_images:
            import dataclasses
            import itertools

            batches = itertools.islice(batches, args.eval_images // config.eval.batch_size)
            info = dataclasses.replace(info, num_examples=args.eval_images)
        return evaluate_detections(detect_fn, batches, info, coco=False)["voc"]["mAP"]

    results = {}
    for name, run in (("frcnn_jax", run_ours), ("torchvision", run_torch)):
        if args.only and name != args.only:
            continue
        print(f"{name}:", flush=True)
        results[name] = run(config, marks, evaluate_fn)
    print(f"\n{config.data.name}, batch {config.train.batch_size}, "
          f"{config.data.canvas[0]}x{config.data.canvas[1]}, 2 CPU cores")  # fmt: skip
    names = list(results)
    print("| training minutes | " + " | ".join(f"{n} mAP@0.5 (steps)" for n in names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for i, mark in enumerate(marks):
        cells = [f"{results[n][i][2]:.3f} ({results[n][i][1]})" for n in names]
        print(f"| {mark / 60:g} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
