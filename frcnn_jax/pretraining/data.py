"""Classification examples for pretraining: a TFDS image classification dataset (features
`image` and `label`) or the offline `shapes_classes` set, read by grain like the detector's data
(random access, per-host shards, a saveable position: `ClassBatches`).

Training crops a random part of each image (`data.crop_scale` of its area, aspect ratio 3:4 to
4:3, torchvision's RandomResizedCrop), resizes it to `data.image_size` square and flips it half
of the time; evaluation resizes the short side to `image_size / eval_crop` and takes the centre
square. A record that cannot be read becomes an example with `valid=False` (it weighs nothing in
the loss and the accuracy) and a warning naming it, so batches keep their shape.
"""

import logging
import os
from typing import NamedTuple

import grain.python as grain
import numpy as np
from PIL import Image

from frcnn_jax.data import checks, sources, workers
from frcnn_jax.data.loader import Closing, WithIndex
from frcnn_jax.errors import ConfigError, MissingFile

log = logging.getLogger(__name__)
ASPECT_RATIOS = (3 / 4, 4 / 3)  # training crops' width / height range (torchvision's)


class Examples(NamedTuple):
    image: np.ndarray  # uint8 [B, S, S, 3] RGB
    label: np.ndarray  # int32 [B] 0..K-1
    valid: np.ndarray  # bool [B] false for unreadable records and an evaluation's padding


def get_builder(data):
    """The TFDS builder of a pretraining config's `data`."""

    from frcnn_jax.data import builders

    if data.name == "shapes_classes" or data.name.startswith("shapes_classes/"):
        _, _, name = data.name.partition("/")
        config = sources.builder_config(
            builders.ShapesClasses, name or "64", data.get("shapes_num_examples")
        )
        return builders.ShapesClasses(config=config, data_dir=data.data_dir)
    return sources.tfds_builder(data)


def open_split(data, split):
    """(random-access source of `split`, class names), the dataset prepared first if needed
    (a dataset TFDS cannot prepare without the user's files, as ImageNet, is a `MissingFile`
    error with TFDS's instructions)."""
    builder = get_builder(data)
    try:
        sources.prepare(builder)
    except AssertionError as e:  # TFDS's "Manual directory ... does not exist or is empty"
        if "manual" not in str(e).lower():
            raise
        raise MissingFile(
            f"config.data.name {data.name}: TFDS needs its files first: " + " ".join(str(e).split())
        ) from None
    features = builder.info.features
    if "image" not in features or "label" not in features:
        raise ConfigError(
            f"config.data.name: {data.name} is not an image classification dataset (it needs "
            f"'image' and 'label' features; it has {sorted(features)})"
        )
    if split not in builder.info.splits:
        raise ConfigError(
            f"config.data: {data.name} has no split {split!r} "
            f"(it has {sorted(builder.info.splits)})"
        )
    return builder.as_data_source(split), tuple(features["label"].names)


def random_crop(rng, height, width, scale):
    """(top, left, h, w) of a crop of `scale` (low, high) of the area, aspect ratio in
    `ASPECT_RATIOS`; after 10 failed draws the centre square-ish crop (torchvision's rule)."""
    area = height * width
    for _ in range(10):
        target = area * rng.uniform(*scale)
        ratio = np.exp(rng.uniform(*np.log(ASPECT_RATIOS)))
        w = round(np.sqrt(target * ratio))
        h = round(np.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    ratio = min(max(width / height, ASPECT_RATIOS[0]), ASPECT_RATIOS[1])
    w, h = (
        (width, round(width / ratio)) if width / height < ratio else (round(height * ratio), height)
    )
    return (height - h) // 2, (width - w) // 2, h, w


def centre_crop(image, size, fraction):
    """The centre `size` square after resizing the short side to `size / fraction`."""
    height, width = image.shape[:2]
    short = round(size / fraction)
    scale = short / min(height, width)
    h, w = max(round(height * scale), size), max(round(width * scale), size)
    resized = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))
    top, left = (h - size) // 2, (w - size) // 2
    return resized[top : top + size, left : left + size]


class Crop(grain.RandomMapTransform):
    """(record, index) -> {"image": uint8 [S, S, 3], "label": int32, "valid": bool}."""

    def __init__(self, data, train):
        self.size = int(data.image_size)
        self.scale = tuple(float(s) for s in data.crop_scale)
        self.eval_crop = float(data.eval_crop)
        self.flip = bool(data.flip)
        self.train = train
        self.owner = os.getpid()  # the loader's process (`workers.watch_owner`)

    def random_map(self, element, rng):
        workers.watch_owner(self.owner)
        record, index = element
        try:
            image = _rgb(record, index)
        except checks.BadExample as e:
            log.warning("skipped %s", e)
            return {
                "image": np.zeros((self.size, self.size, 3), np.uint8),
                "label": np.int32(0),
                "valid": np.bool_(False),
            }
        if self.train:
            top, left, h, w = random_crop(rng, *image.shape[:2], self.scale)
            crop = Image.fromarray(image[top : top + h, left : left + w])
            image = np.asarray(crop.resize((self.size, self.size), Image.BILINEAR))
            if self.flip and rng.random() < 0.5:
                image = image[:, ::-1]
        else:
            image = centre_crop(image, self.size, self.eval_crop)
        return {
            "image": np.ascontiguousarray(image, np.uint8),
            "label": np.int32(record["label"]),
            "valid": np.bool_(True),
        }


def _rgb(record, index):
    """The record's image as uint8 RGB [H, W, 3] (grey repeated, alpha dropped), or
    `checks.BadExample` naming the record."""
    if "problem" in record:  # `WithIndex`: TFDS could not decode it
        raise checks.BadExample(*record["problem"])
    image = record.get("image")
    if isinstance(image, bytes):
        image, _ = checks.decode_image_bytes(image, f"record {index}")
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.dtype != np.uint8 or 0 in image.shape:
        raise checks.BadExample("corrupt image", f"record {index}: {image.dtype} {image.shape}")
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    return image[..., :3]


class ClassBatches(Closing):
    """Iterator of `Examples` batches with a saveable position (`get_state` / `set_state`).
    Training: endless, reshuffled every epoch. Evaluation: one pass, the last batch padded with
    `valid=False` examples to `batch_size`."""

    def __init__(
        self,
        source,
        data,
        *,
        batch_size,
        train,
        seed=0,
        shard_index=0,
        shard_count=1,
        worker_count=None,
        name="data",
    ):
        self.batch_size = batch_size
        shards = grain.ShardOptions(shard_index, shard_count, drop_remainder=train)
        sampler = grain.IndexSampler(
            num_records=len(source),
            shard_options=shards,
            shuffle=train,
            num_epochs=None if train else 1,
            seed=seed,
        )
        worker_count = data.workers if worker_count is None else worker_count
        if worker_count:
            workers.grain_flags_ready()
        self._loader = grain.DataLoader(
            data_source=WithIndex(source, name),
            sampler=sampler,
            operations=[Crop(data, train)],  # batched here: see `__next__`
            worker_count=worker_count,
            shard_options=shards,
        )
        self._iter = iter(self._loader)
        self._track()

    def __next__(self):
        # Examples are stacked here rather than by a grain.Batch in the workers: batches made in
        # a worker travel in shared memory that closing the loader early would leak.
        examples = []
        for example in self._iter:
            examples.append(example)
            if len(examples) == self.batch_size:
                break
        if not examples:
            raise StopIteration
        batch = {k: np.stack([e[k] for e in examples]) for k in Examples._fields}
        missing = self.batch_size - len(examples)  # the end of an evaluation pass
        if missing:
            batch = {k: _padded(v, missing) for k, v in batch.items()}
        return Examples(**batch)

    def get_state(self):
        """The position (JSON-serializable), saved with each checkpoint."""
        return {"loader": self._iter.get_state().decode()}

    def set_state(self, state):
        self._iter.set_state(state["loader"].encode())


def _padded(values, missing):
    """`values` with `missing` zero rows after it (`valid` becomes False for them)."""
    return np.concatenate([values, np.zeros((missing, *values.shape[1:]), values.dtype)])
