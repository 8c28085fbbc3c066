"""Per-example transforms, run in the loader's worker processes: a raw record (ours, TFDS `voc`
or `coco`) decoded to an image with pixel boxes (`to_example`), relabelled to a class subset,
then resized, flipped and padded to static shapes (`data.preprocess`); `Preprocess` is all of
it as a grain transform.
"""

import os

import grain.python as grain
import numpy as np

from frcnn_jax import canvas as canvas_lib
from frcnn_jax.data import checks, preprocess, workers


def to_example(record, index, problems):
    """A raw TFDS record (ours, `voc`, or `coco`) -> decoded image, pixel boxes, labels 1..K.

    Records of TFDS's `voc` (tagged `_voc_one_based` by `make_batches`) store VOC's 1-based
    inclusive xmin..xmax divided by the image size; they become xmin - 1 .. xmax, the boxes a
    VOC folder gives (`folders.read_voc_annotation`), so both sources train and evaluate alike.
    """
    name = record.get("image/filename", b"")
    name = name.decode() if isinstance(name, bytes) else str(name)
    name = name or f"record {index}"
    image = record["image"]
    if isinstance(image, bytes):
        image, _ = checks.decode_image_bytes(image, name)
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8 or 0 in image.shape:
        raise checks.BadExample("corrupt image", f"{name}: {image.dtype} {image.shape}")
    objects = record["objects"]
    height, width = image.shape[:2]
    bbox = np.asarray(objects["bbox"], np.float32).reshape(-1, 4)
    labels = np.asarray(objects["label"], np.int64).reshape(-1) + 1
    difficult = objects.get("is_difficult", objects.get("is_crowd"))
    difficult = np.zeros(len(labels), bool) if difficult is None else np.asarray(difficult, bool)
    n = min(len(bbox), len(labels), len(difficult))  # a malformed record may disagree
    boxes = preprocess.boxes_to_pixels(bbox[:n], height, width)
    if record.get("_voc_one_based"):
        boxes[:, :2] = np.maximum(boxes[:, :2] - 1, 0)
    boxes, keep = checks.clean_boxes(boxes, height, width, name, problems)
    image_id = int(record.get("image/id", index))
    return image, boxes, labels[:n][keep], difficult.reshape(-1)[:n][keep], image_id, name


class Preprocess(grain.RandomMapTransform):
    """Decode + preprocess one record; a record that cannot be decoded comes out marked bad."""

    def __init__(self, data, train, label_map=None):
        self.label_map = label_map  # int [K_all + 1]: dataset label -> 1..K, 0 to drop
        # multi-scale training: a short side drawn per image, all on the largest one's canvas
        self.scales = tuple(int(s) for s in data.train_scales) if train else ()
        self.data = data
        self.kwargs = dict(
            min_size=data.min_size,
            max_size=data.max_size,
            canvas=tuple(canvas_lib.train_canvas(data) if train else data.canvas),
            max_boxes=data.max_boxes,
            exclude_difficult=train and data.exclude_difficult,
            orient=data.orient_canvas,
        )
        self.flip = train and data.flip
        # the loader's process; workers watch it (`workers.watch_owner`)
        self.owner = os.getpid()

    def random_map(self, element, rng):
        workers.watch_owner(self.owner)
        record, index = element
        flip = bool(self.flip and rng.random() < 0.5)
        min_size = self.scales[rng.integers(len(self.scales))] if self.scales else None
        return self.example(record, index, flip=flip, min_size=min_size)

    def example(self, record, index, *, flip, min_size=None):
        """The preprocessed example of `record` (source row `index`), or {"problems": ...},
        resized to short side `min_size` (None: `data.min_size`). `_index`, `_flip` and
        `_min_size` let a resumed loader rebuild examples it had buffered."""
        problems = checks.Problems()
        if "problem" in record:
            problems.add(*record["problem"])
            return {"problems": problems}
        try:
            image, boxes, labels, difficult, image_id, name = to_example(record, index, problems)
        except checks.BadExample as e:
            problems.add(e.kind, e.detail)
            return {"problems": problems}
        if self.label_map is not None:
            labels = self.label_map[labels]
            keep = labels > 0
            boxes, labels, difficult = boxes[keep], labels[keep], difficult[keep]
        kwargs = self.kwargs
        if min_size is not None:
            limits = canvas_lib.scaled_sizes(self.data, min_size)
            kwargs = {**kwargs, "min_size": limits["min_size"], "max_size": limits["max_size"]}
        example, dropped = preprocess.preprocess(
            image, boxes, labels, difficult, flip=flip, **kwargs
        )
        example["image_id"] = np.int64(image_id)
        example["valid"] = np.bool_(True)
        example["_index"] = np.int64(index)
        example["_flip"] = np.bool_(flip)
        example["_min_size"] = np.int64(min_size or 0)
        if dropped:
            problems.add("boxes over max_boxes dropped", name, dropped)
        if problems:
            example["problems"] = problems
        return example
