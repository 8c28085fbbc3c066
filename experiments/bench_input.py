"""Input pipeline throughput: VOC-sized JPEGs through the full training preprocessing.

    python experiments/bench_input.py [--images 400] [--workers 2] [--batches 100]

Writes a VOC-layout folder of `--images` 500x375 JPEGs (shapes renders, so real JPEG content
with objects), prepares it once through the `voc_folder` TFDS builder, then times
`make_batches` (grain, `--workers` processes: decode, resize to short side 600 / long side
<= 1000, random flip, pad to a 600x1000 canvas, boxes to 64 slots) over `--batches` batches of
2 after a warm-up. The reference, measured in the same run: a torch DataLoader with the same
number of workers doing PIL decode + bilinear resize (torchvision's GeneralizedRCNNTransform
arithmetic) + pad. Target (issue 6): at least 60 images/s with 2 workers on this CPU. The
table goes to `experiments/results_input.md` too.
"""

import argparse
import pathlib
import tempfile
import time

import numpy as np
import result_rows
from PIL import Image

from frcnn_jax.data import pipeline, shapes, sources
from frcnn_jax.data.config import data_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


def write_voc_folder(root, num_images):
    root = pathlib.Path(root)
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    ids = []
    for i in range(num_images):
        ex = shapes.render(0, "train", i, image_size=(375, 500), max_side=250)
        name = f"{i:06d}"
        Image.fromarray(ex["image"]).save(root / "JPEGImages" / f"{name}.jpg", quality=90)
        objects = "".join(
            f"<object><name>{shapes.CLASS_NAMES[label]}</name><difficult>0</difficult><bndbox>"
            f"<xmin>{x1 + 1:.0f}</xmin><ymin>{y1 + 1:.0f}</ymin><xmax>{x2:.0f}</xmax>"
            f"<ymax>{y2:.0f}</ymax></bndbox></object>"
            for (x1, y1, x2, y2), label in zip(ex["boxes"], ex["labels"], strict=True)
        )
        (root / "Annotations" / f"{name}.xml").write_text(
            f"<annotation><filename>{name}.jpg</filename><size><width>500</width>"
            f"<height>375</height></size>{objects}</annotation>"
        )
        ids.append(name)
    (root / "ImageSets/Main/train.txt").write_text("\n".join(ids))
    return root


def time_ours(data, num_batches):
    batches, _ = pipeline.make_batches(data, "train", batch_size=2, train=True, seed=0)
    for _ in range(5):  # start the workers
        next(batches)
    start = time.perf_counter()
    for _ in range(num_batches):
        batch = next(batches)
    elapsed = time.perf_counter() - start
    assert batch.inputs.image.shape == (2, 600, 1000, 3)
    return 2 * num_batches / elapsed


class _TorchDataset:
    def __init__(self, files):
        self.files = files

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        import torch
        import torch.nn.functional as F

        image = np.array(Image.open(self.files[i]).convert("RGB"))
        tensor = torch.from_numpy(image).permute(2, 0, 1).float()
        h, w = image.shape[:2]
        scale = min(600 / min(h, w), 1000 / max(h, w))
        resized = F.interpolate(
            tensor[None],
            scale_factor=scale,
            mode="bilinear",
            recompute_scale_factor=True,
            align_corners=False,
        )[0]
        if torch.rand(()) < 0.5:
            resized = resized.flip(-1)
        out = torch.zeros(3, 608, 1024)  # torchvision pads to a multiple of 32
        out[:, : resized.shape[1], : resized.shape[2]] = resized
        return out


def time_torch(files, workers, num_batches):
    import torch

    torch.set_num_threads(1)
    loader = torch.utils.data.DataLoader(
        _TorchDataset(files * 10), batch_size=2, shuffle=True, num_workers=workers
    )
    it = iter(loader)
    for _ in range(5):
        next(it)
    start = time.perf_counter()
    for _ in range(num_batches):
        next(it)
    return 2 * num_batches / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batches", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = write_voc_folder(pathlib.Path(tmp) / "voc", args.images)
        data = data_config(
            name="voc_folder",
            path=str(root),
            data_dir=str(pathlib.Path(tmp) / "tfds"),
            workers=args.workers,
        )
        start = time.perf_counter()
        sources.prepare(sources.get_builder(data))
        prepared = time.perf_counter() - start
        ours = time_ours(data, args.batches)
        files = sorted((root / "JPEGImages").glob("*.jpg"))
        theirs = time_torch(files, args.workers, args.batches)
    body = [
        f"{args.workers} workers, 500x375 JPEGs -> 600x1000 canvas, batch 2, {args.batches} "
        f"batches after a warm-up (preparing {args.images} images once: {prepared:.1f} s)",
        "",
        "| pipeline | images/s | ratio to torch |",
        "|---|---|---|",
        f"| frcnn_jax (TFDS array_record + grain) | {ours:.1f} | {ours / theirs:.2f}x |",
        f"| torch DataLoader (PIL + interpolate) | {theirs:.1f} | 1.00x |",
    ]
    print("\n".join(body))
    result_rows.write_results(
        ROOT / "experiments" / "results_input.md",
        "Input pipeline: VOC-sized JPEGs to training batches",
        body,
        f"{ours:.0f} vs {theirs:.0f} images/s (a torch DataLoader doing the same work, "
        f"{args.workers} workers each)",
    )


if __name__ == "__main__":
    main()
