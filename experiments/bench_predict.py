"""Detection from image files to boxes: frcnn_jax's `Detector` and exported model beside
torchvision, measured in the same run.

    python experiments/bench_predict.py [--models r50_fpn,vgg16] [--images 8]
        [--batch_sizes 1,2] [--repeats 2]

A folder of VOC-sized JPEGs (three landscape 500x375 pictures for each portrait 375x500 one,
VOC's two most common sizes) is read, decoded (PIL on both sides), resized, detected and
brought back to the original pixels, per batch size. The models:

- r50_fpn: torchvision's `fasterrcnn_resnet50_fpn` (91 outputs, short side 800, long side
  <= 1333) with random weights (class logits scaled up as in tests/test_weights.py, so that
  detections pass the 0.05 score threshold and torchvision's postprocessing has work to do),
  and frcnn_jax's `configs/coco_r50_fpn.py` with those same weights imported.
- vgg16: `bench_model.py`'s VGG-16 twins (short side 600, long side <= 1000, 300 proposals,
  RoIAlign), random weights on each side.

frcnn_jax's canvas is fitted to the pictures as torchvision pads its batches: the resized
size rounded up to a multiple of 32 (`Detector(canvas=...)`; (800, 1088) and (608, 800),
transposed for portraits). Time per image = median over `--repeats` passes over the folder,
after a warm-up pass (which for frcnn_jax includes compiling). torchvision runs first, in a
child process of its own (as in bench_model.py). With both models (the default) the table
goes to `experiments/results_predict.md` too.
"""

import argparse
import json
import math
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

from frcnn_jax.runtime import configure_runtime, describe_runtime

configure_runtime()  # before JAX starts: see frcnn_jax/runtime.py

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import result_rows  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402
from bench_model import NUM_CLASSES, SETUPS, peak_rss_gb, torchvision_model  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402
from torch_timing import TORCH_DEVICE  # noqa: E402

from frcnn_jax import weights  # noqa: E402
from frcnn_jax.canvas import resize_scale, resized_size  # noqa: E402
from frcnn_jax.config import config_from_file, model_config  # noqa: E402
from frcnn_jax.data import checks  # noqa: E402
from frcnn_jax.inference import Detector  # noqa: E402
from frcnn_jax.models import FasterRCNN, build_model  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
SIZES = {"r50_fpn": (800, 1333), "vgg16": (600, 1000)}  # (min_size, max_size)


def write_pictures(folder, count):
    """`count` JPEGs like photos (shaded background, overlapping filled shapes, noise): three
    500x375 for each 375x500, in name order landscape first. Returns their paths."""
    rng = np.random.default_rng(0)
    paths = []
    for index in range(count):
        width, height = (375, 500) if index % 4 == 3 else (500, 375)
        ramp = np.linspace(0, 1, width)[None, :, None] * rng.uniform(40, 120, 3)
        pixels = rng.uniform(30, 90, 3) + ramp + rng.normal(0, 8, (height, width, 3))
        picture = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        pen = ImageDraw.Draw(picture)
        for _ in range(rng.integers(3, 8)):
            x, y = rng.uniform(0, width * 0.8), rng.uniform(0, height * 0.8)
            w, h = rng.uniform(30, width / 2), rng.uniform(30, height / 2)
            shape = pen.ellipse if rng.random() < 0.5 else pen.rectangle
            shape((x, y, x + w, y + h), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        orientation = "portrait" if height > width else "landscape"
        paths.append(folder / f"{orientation}_{index:03d}.jpg")
        picture.save(paths[-1], quality=90)
    return sorted(paths)


def fitted_canvas(name, height=375, width=500):
    """The landscape canvas frcnn_jax uses for `name`: the resized 500x375 picture's size,
    rounded up to a multiple of 32 (what torchvision pads that picture to)."""
    min_size, max_size = SIZES[name]
    scale = resize_scale(height, width, min_size=min_size, max_size=max_size, canvas=(1e9, 1e9))
    return tuple(32 * math.ceil(v / 32) for v in resized_size(height, width, scale))


def torchvision_reference(name):
    """torchvision's model for `name`, in eval mode, and its state dict's arch name (or None)."""
    torch.manual_seed(0)
    if name == "r50_fpn":
        model = torchvision.models.detection.fasterrcnn_resnet50_fpn(
            weights=None, weights_backbone=None
        )
        with torch.no_grad():
            model.roi_heads.box_predictor.cls_score.weight.mul_(50.0)
        return model.eval()
    return torchvision_model(name, SIZES[name]).eval()


def passes(run, paths, batch, repeats):
    """Seconds per image of `run(list of paths)` over the folder in chunks of `batch`: the
    median of the passes after the first, and the first (warm-up) pass's."""
    chunks = [paths[i : i + batch] for i in range(0, len(paths), batch)]
    seconds = []
    for _ in range(max(repeats, 1)):
        start = time.perf_counter()
        for chunk in chunks:
            run(chunk)  # returns host arrays: the work is done
        seconds.append((time.perf_counter() - start) / len(paths))
    return statistics.median(seconds[1:] or seconds), seconds[0]


def time_torchvision(name, paths, batch_sizes, repeats):
    """torchvision's seconds per image for each batch size, files to detections."""
    model = torchvision_reference(name).to(TORCH_DEVICE)

    @torch.no_grad()
    def run(chunk):
        images = []
        for path in chunk:
            with Image.open(path) as picture:
                pixels = np.asarray(picture.convert("RGB"))
            images.append(torch.from_numpy(pixels).to(TORCH_DEVICE).permute(2, 0, 1) / 255.0)
        return [{k: v.cpu() for k, v in out.items()} for out in model(images)]

    return {batch: passes(run, paths, batch, repeats)[0] for batch in batch_sizes}


def our_detector(name, batch_size):
    """frcnn_jax's `Detector` for `name` on the fitted canvas (r50_fpn: torchvision's weights)."""
    min_size, max_size = SIZES[name]
    data = ml_collections.ConfigDict(
        {
            "min_size": min_size,
            "max_size": max_size,
            "canvas": fitted_canvas(name),
            "orient_canvas": True,
        }
    )
    if name == "r50_fpn":
        config = config_from_file(ROOT / "configs" / "coco_r50_fpn.py")
        config.model.num_classes = NUM_CLASSES[name]  # 91 outputs: background + ids 1..90
        model = build_model(config)
        flat, covers = weights.from_torchvision(
            torchvision_reference(name).state_dict(), arch="fasterrcnn_resnet50_fpn"
        )
    else:
        ours = {**SETUPS[name]["ours"], "num_classes": NUM_CLASSES[name]}
        model = build_model(ml_collections.ConfigDict({"model": model_config(**ours)}))

    def init(key):
        image = np.zeros((1, 64, 64, 3), np.float32)
        return model.init(key, image, np.array([[64, 64]]), method=FasterRCNN.detect)

    if name == "r50_fpn":  # only the shapes: every tensor comes from torchvision's weights
        shapes = jax.eval_shape(init, jax.random.key(0))
        zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
        variables = weights.restore_into(zeros, flat, covers)
    else:
        variables = jax.jit(init)(jax.random.key(0))
    names = [f"class_{k}" for k in range(1, model.num_classes + 1)]
    return Detector(model, variables, class_names=names, data=data, batch_size=batch_size)


def load(path):
    return checks.load_image(path)[0]  # as `python -m frcnn_jax.predict` reads files


def time_ours(name, paths, batch_sizes, repeats, folder):
    """frcnn_jax's rows: {batch: (s/image, warm-up s/image)}, the exported model's s/image,
    and the seconds per image spent reading and preparing (decode, resize, canvas)."""
    times = {}
    for batch in batch_sizes:
        detector = our_detector(name, batch)
        times[batch] = passes(
            lambda chunk, d=detector: d([load(p) for p in chunk]), paths, batch, repeats
        )
    prepare_s = passes(lambda chunk: [detector.prepare(load(p)) for p in chunk], paths, 1, repeats)[
        0
    ]
    from frcnn_jax import exported
    from frcnn_jax.export import export_detector

    path = folder / f"{name}.jaxexport"
    start = time.perf_counter()
    export_detector(detector, path, batch_size=1, platforms=(jax.devices()[0].platform,))
    export_s = time.perf_counter() - start
    portable = exported.load(path)
    exported_s = passes(lambda chunk: [portable(load(p)) for p in chunk], paths, 1, repeats)[0]
    return times, exported_s, prepare_s, export_s


def time_torchvision_in_child(name, args):
    command = [sys.executable, os.path.abspath(__file__), "--torchvision-side", "--models", name]
    command += ["--images", str(args.images), "--batch_sizes", args.batch_sizes]
    command += ["--repeats", str(args.repeats), "--folder", str(args.folder)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"torchvision's side failed ({name}):\n{done.stderr[-4000:]}")
    found = json.loads(done.stdout.strip().splitlines()[-1])
    return {int(k): v for k, v in found["times"].items()}, found["peak_rss_gb"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="r50_fpn,vgg16")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--batch_sizes", default="1,2")
    parser.add_argument("--repeats", type=int, default=3, help="passes, the first a warm-up")
    parser.add_argument("--folder", type=pathlib.Path, help=argparse.SUPPRESS)
    parser.add_argument("--torchvision-side", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    names, batch_sizes = args.models.split(","), [int(b) for b in args.batch_sizes.split(",")]
    if args.torchvision_side:  # the child process of `time_torchvision_in_child`
        paths = sorted(args.folder.glob("*.jpg"))
        times = time_torchvision(names[0], paths, batch_sizes, args.repeats)
        print(json.dumps({"times": times, "peak_rss_gb": peak_rss_gb()}))
        return
    with tempfile.TemporaryDirectory() as directory:
        args.folder = pathlib.Path(directory)
        paths = write_pictures(args.folder, args.images)
        theirs = {name: time_torchvision_in_child(name, args) for name in names}
        body = [
            f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} "
            f"on {TORCH_DEVICE.type} ({torch.get_num_threads()} CPU threads); {describe_runtime()}"
            f"; {len(paths)} JPEGs (500x375 and 375x500, 3:1); random weights; seconds per "
            f"image from file to detections, median of {args.repeats - 1} passes after a warm-up",
            "",
            "| model | batch | frcnn_jax s/image | torchvision s/image | ratio | "
            "frcnn_jax images/s | frcnn_jax warm-up s/image |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        print("\n".join(body))
        notes, best = [], {}
        for name in names:
            ours, exported_s, prepare_s, export_s = time_ours(
                name, paths, batch_sizes, args.repeats, args.folder
            )
            for batch in batch_sizes:
                our_s, warm_s = ours[batch]
                their_s = theirs[name][0][batch]
                body.append(
                    f"| {name} | {batch} | {our_s:.3f} | {their_s:.3f} | "
                    f"{our_s / their_s:.2f} | {1 / our_s:.2f} | {warm_s:.2f} |"
                )
                print(body[-1], flush=True)
            best_ours = min(s for s, _ in ours.values())
            best_theirs = min(theirs[name][0].values())
            best[name] = best_ours / best_theirs
            body.append(
                f"| {name} exported (jax.export file), 1 | 1 | {exported_s:.3f} | "
                f"{theirs[name][0].get(1, float('nan')):.3f} | "
                f"{exported_s / theirs[name][0].get(1, float('nan')):.2f} | "
                f"{1 / exported_s:.2f} | |"
            )
            print(body[-1], flush=True)
            notes.append(
                f"{name}: canvas {fitted_canvas(name)}; best batch: frcnn_jax {best_ours:.3f} "
                f"s/image vs torchvision {best_theirs:.3f} (ratio {best_ours / best_theirs:.2f}); "
                f"reading + preparing {prepare_s * 1e3:.0f} ms/image of frcnn_jax's time; "
                f"export {export_s:.0f} s."
            )
        notes.append(
            f"Peak resident memory: frcnn_jax {peak_rss_gb():.1f} GB, torchvision "
            f"{max(t[1] for t in theirs.values()):.1f} GB."
        )
        body += ["", *notes]
        print("\n".join(notes))
    if names == ["r50_fpn", "vgg16"]:  # the README's figure
        labels = {"r50_fpn": "`fasterrcnn_resnet50_fpn` (same weights)", "vgg16": "VGG-16 twins"}
        result_rows.write_results(
            ROOT / "experiments" / "results_predict.md",
            "From JPEG files to detections",
            body,
            "; ".join(f"{labels[n]} {r:.2f}x torchvision's time" for n, r in best.items())
            + " (each side's best batch size)",
        )


if __name__ == "__main__":
    main()
