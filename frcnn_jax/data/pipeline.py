"""From `config.data` to batches of static-shaped NumPy arrays, with a resumable position.

Why TFDS random-access sources + grain: every source (TFDS `voc`/`coco`, user folders, shapes)
is prepared once into array_record files that allow reading record i directly, so grain's
`IndexSampler` can shuffle, shard per host, and describe the loader's position by a small
state (the next index per worker) that is saved with each checkpoint: a resumed run continues
with exactly the examples an uninterrupted run would have seen. grain's worker processes
decode and preprocess in parallel; a `tf.data` pipeline would need TensorFlow at training time
and has no cheap exact-resume story.

Batching happens in the main process so that an example that fails to decode is skipped (and
counted) without changing the batch shape; a one-line summary of input problems is logged once
per epoch.
"""

import dataclasses
import logging
import math
import os
import re
import threading
import time

import grain.python as grain
import numpy as np
from absl import flags

from frcnn_jax import canvas as canvas_lib
from frcnn_jax.data import checks, preprocess
from frcnn_jax.data.config import check_data_config

log = logging.getLogger(__name__)

FOLDER_SOURCES = ("voc_folder", "coco_folder")


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the rest of the program needs to know about a dataset."""

    class_names: tuple
    category_ids: tuple  # COCO category id of class k (1..K) at index k - 1
    num_examples: int


def get_builder(data):
    """The TFDS builder for `config.data` (`name`, `data_dir`, and the folder fields)."""
    import tensorflow_datasets as tfds

    from frcnn_jax.data import builders

    if data.name == "voc_folder":
        return builders.voc_folder(data.path, data.get("class_names") or None, data.data_dir)
    if data.name == "coco_folder":
        return builders.coco_folder(dict(data.coco_splits), data.data_dir)
    if data.name.startswith("shapes"):
        _, _, config_name = data.name.partition("/")
        config = _shapes_config(config_name or "512", data.get("shapes_num_examples"))
        return builders.Shapes(config=config, data_dir=data.data_dir)
    try:
        return tfds.builder(data.name, data_dir=data.data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise ValueError(f"config.data.name: unknown dataset {data.name!r}: {e}") from None


def _shapes_config(name, num_examples):
    from frcnn_jax.data import builders

    configs = {c.name: c for c in builders.Shapes.BUILDER_CONFIGS}
    if name not in configs:
        raise ValueError(f"config.data.name: shapes has configs {sorted(configs)}, not {name!r}")
    config = configs[name]
    if num_examples:
        counts = {k: int(v) for k, v in dict(num_examples).items()}
        key = "-".join(f"{k}{v}" for k, v in sorted(counts.items()))
        config = dataclasses.replace(config, name=f"{name}-{key}", num_examples=counts)
    return config


def prepare(builder):
    """Prepare once (array_record); later calls only read. TFDS logs to absl."""
    import tensorflow_datasets as tfds

    tfds.display_progress_bar(False)
    builder.download_and_prepare(file_format="array_record")
    return builder


def dataset_info(builder, num_examples):
    names = tuple(builder.info.features["objects"]["label"].names)
    ids = builder.info.metadata.get("category_ids") if builder.info.metadata else None
    ids = tuple(ids) if ids else tuple(range(1, len(names) + 1))
    return DatasetInfo(names, ids, num_examples)


def data_source(builder, split):
    """Random-access source of records (images decoded by TFDS with PIL)."""
    return builder.as_data_source(split)


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


_watching = False


def _exit_with_owner(owner):
    """Start (once per process) a thread that ends this worker process within a second of the
    loader's process `owner` ending, however it ended: grain's workers otherwise outlive a
    trainer killed with SIGKILL, holding their memory."""
    global _watching
    if _watching:
        return
    _watching = True

    def watch():
        while _alive(owner) and os.getppid() != 1:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, name="frcnn_jax-owner-watch", daemon=True).start()


def _alive(pid):
    """Whether process `pid` runs (a zombie, dead but not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc (not Linux): ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


class _Preprocess(grain.RandomMapTransform):
    """Decode + preprocess one record; a record that cannot be decoded comes out marked bad."""

    def __init__(self, data, train, label_map=None):
        self.label_map = label_map  # int [K_all + 1]: dataset label -> 1..K, 0 to drop
        # multi-scale training: a short side drawn per image, all on the largest one's canvas
        self.scales = tuple(int(s) for s in data.train_scales) if train else ()
        self.data = data
        self.kwargs = dict(
            min_size=data.min_size,
            max_size=data.max_size,
            canvas=tuple(train_canvas(data) if train else data.canvas),
            max_boxes=data.max_boxes,
            exclude_difficult=train and data.exclude_difficult,
            orient=data.orient_canvas,
        )
        self.flip = train and data.flip
        self.owner = os.getpid()  # the loader's process; workers watch it (_exit_with_owner)

    def random_map(self, element, rng):
        if os.getpid() != self.owner:  # in a grain worker process
            _exit_with_owner(self.owner)
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
            limits = scaled_sizes(self.data, min_size)
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


class _WithIndex:
    """Source wrapper that passes the record index along (for names and default ids)."""

    def __init__(self, source, name):
        self.source = source
        self.name = name

    def __repr__(self):  # part of the saved loader state: must not change between runs
        return f"{self.name} ({len(self.source)} records)"

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index):
        try:
            return self.source[index], index
        except Exception as e:  # a record TFDS cannot decode must not end the run
            return {"problem": ("unreadable record", f"{self.name}[{index}]: {e}")}, index


def _local_only(counts):
    """`Batches`' agreement for a single process: its own counts are everyone's."""
    return np.asarray(counts)[None]


class Batches:
    """Iterator of batches (dict of NumPy arrays with a leading batch axis) with a saveable
    position: `get_state()` / `set_state()` (JSON-serializable).

    Training: endless, reshuffled every epoch, `batch_size` valid examples per batch.
    Evaluation: one pass; partly filled batches are padded with `valid=False` examples.

    Every batch holds images of one canvas (`frcnn_jax.canvas.canvas_for`: the configured
    canvas and, with `data.orient_canvas`, its transpose for the other orientation), like
    torchvision's aspect-ratio grouping: examples wait in one bucket per canvas until a bucket
    holds a batch. Buffered examples are part of the saved position (their record index and
    flip), so a resumed run yields exactly the batches an uninterrupted one would.

    `agree` keeps several hosts in step: called with this host's [bucket sizes..., exhausted]
    it returns every host's ([hosts, n + 1], e.g. `process_allgather`); a canvas is emitted
    when every host has a batch of it (or, at the end of an evaluation pass, any example of
    it), so all hosts feed the same shape at each step. Without it, only this host counts.
    """

    def __init__(self, source, data, *, batch_size, train, seed, shard_index=0, shard_count=1,
                 worker_count=None, name="data", agree=None, label_map=None):  # fmt: skip
        self.batch_size = batch_size
        self.train = train
        self.records = len(source)
        self.records_per_shard = self.records // shard_count if train else None
        sampler = grain.IndexSampler(
            num_records=self.records,
            shard_options=grain.ShardOptions(shard_index, shard_count, drop_remainder=train),
            shuffle=train,
            num_epochs=None if train else 1,
            seed=seed,
        )
        workers = data.workers if worker_count is None else worker_count
        if workers and not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()  # grain's workers read absl flags (notebooks, tests)
        self._source = _WithIndex(source, name)
        self._preprocess = _Preprocess(data, train, label_map)
        self._loader = grain.DataLoader(
            data_source=self._source,
            sampler=sampler,
            operations=[self._preprocess],
            worker_count=workers,
            shard_options=grain.ShardOptions(shard_index, shard_count, drop_remainder=train),
        )
        self._iter = iter(self._loader)
        self.consumed = 0  # records taken from the loader, valid or not
        self.name = name
        self.canvases = canvas_lib.canvases(self._preprocess.kwargs["canvas"],
                                            orient=data.orient_canvas)  # fmt: skip
        self._buckets = {canvas: [] for canvas in self.canvases}
        self._agree = agree or _local_only
        self._exhausted = False
        self._max_boxes = data.max_boxes
        self._since_valid = 0
        self.problems = checks.Problems()

    def __iter__(self):
        return self

    def __next__(self):
        while True:
            # Locally first (one agreement per batch in the common case), then every host
            # asks once per round, so all hosts make the same number of `agree` calls.
            while not self._exhausted and self._largest_bucket() < self.batch_size:
                self._pull()
            sizes = [len(self._buckets[c]) for c in self.canvases]
            everyone = np.asarray(self._agree(np.array([*sizes, self._exhausted], np.int64)))
            sizes, exhausted = everyone[:, :-1], everyone[:, -1].all()
            full = np.flatnonzero((sizes >= self.batch_size).all(axis=0))
            if full.size:
                return self._emit(self.canvases[full[0]])
            if exhausted:  # end of an evaluation pass: flush what is left, padded
                left = np.flatnonzero(sizes.max(axis=0) > 0)
                if not left.size:
                    self._log_epoch()
                    raise StopIteration
                return self._emit(self.canvases[left[0]])
            self._pull()

    def _largest_bucket(self):
        return max(len(bucket) for bucket in self._buckets.values())

    def _pull(self):
        """Take one example from the loader into its canvas's bucket."""
        if self._exhausted:
            return
        try:
            example = next(self._iter)
        except StopIteration:
            self._exhausted = True
            return
        self._count(example)
        if "image" in example:
            self._buckets[example["image"].shape[:2]].append(example)
            self._since_valid = 0
        else:
            self._since_valid += 1
            if self._since_valid > self.records:  # a whole pass without one good record
                raise ValueError(
                    f"{self.name}: no valid example in a whole pass over the data "
                    f"(problems: {self.problems.summary()})"
                )

    def _emit(self, canvas):
        bucket = self._buckets[canvas]
        examples, self._buckets[canvas] = bucket[: self.batch_size], bucket[self.batch_size :]
        while len(examples) < self.batch_size:  # pad the last evaluation batch(es)
            examples.append(_padding(canvas, self._max_boxes))
        keys = [k for k in examples[0] if k != "problems" and not k.startswith("_")]
        return {k: np.stack([np.asarray(e[k]) for e in examples]) for k in keys}

    def _count(self, example):
        self.consumed += 1
        if "problems" in example:
            self.problems.update(example["problems"])
        if self.records_per_shard and self.consumed % self.records_per_shard == 0:
            self._log_epoch()

    def _log_epoch(self):
        epoch = self.consumed // self.records_per_shard if self.records_per_shard else 1
        if self.problems:
            log.warning("input problems in epoch %d: %s", epoch, self.problems.summary())
        self.problems = checks.Problems()

    def get_state(self):
        buffered = [
            [int(e["_index"]), bool(e["_flip"]), int(e["_min_size"])]
            for c in self.canvases
            for e in self._buckets[c]
        ]
        return {
            "loader": self._iter.get_state().decode(),
            "consumed": self.consumed,
            "buffered": buffered,
        }

    def set_state(self, state):
        self._iter.set_state(state["loader"].encode())
        self.consumed = int(state["consumed"])
        self._buckets = {canvas: [] for canvas in self.canvases}
        for index, flip, *min_size in state.get("buffered", []):  # rebuilt as first made
            example = self._preprocess.example(*self._source[index], flip=flip,
                                               min_size=(min_size or [0])[0] or None)  # fmt: skip
            self._buckets[example["image"].shape[:2]].append(example)


def _padding(canvas, max_boxes):
    """An all-zero example marked `valid=False` (and no ground truth) on `canvas`."""
    return {
        "image": np.zeros((*canvas, 3), np.uint8),
        "image_size": np.zeros(2, np.int32),
        "original_size": np.zeros(2, np.int32),
        "scale": np.float32(0),
        "gt_boxes": np.zeros((max_boxes, 4), np.float32),
        "gt_classes": np.zeros(max_boxes, np.int32),
        "gt_valid": np.zeros(max_boxes, bool),
        "gt_difficult": np.zeros(max_boxes, bool),
        "image_id": np.int64(0),
        "valid": np.bool_(False),
    }


class _VocOneBased:
    """TFDS `voc` records tagged for `to_example`'s 1-based correction."""

    def __init__(self, source):
        self.source = source

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index):
        return {**self.source[index], "_voc_one_based": True}


def unlabelled_splits(builder):
    """Split names of `builder` that have no public ground truth (TFDS `voc/2012` test, COCO's
    test splits)."""
    config = getattr(builder, "builder_config", None)
    names = set()
    if getattr(config, "has_test_annotations", True) is False:
        names.add("test")
    for split in getattr(config, "splits", None) or ():
        kind = getattr(split, "annotation_type", None)
        if str(getattr(kind, "value", kind)).lower() == "none":  # COCO's AnnotationType.NONE
            names.add(str(split.name))
    return names


def _check_labelled(builder, split):
    used = set(re.findall(r"[A-Za-z_]\w*", split))
    missing = sorted(used & unlabelled_splits(builder))
    if missing:
        raise ValueError(
            f"split {split!r} of {builder.name}/{builder.builder_config.name} has no ground truth "
            f"({', '.join(missing)}): it cannot be trained or evaluated on (set config.eval.split"
            " or config.eval.data_name to a labelled split, e.g. voc/2007 test)"
        )


def prepare_all(data):
    """The prepared builder of each dataset in `data.name` ("voc/2007,voc/2012": a union)."""
    return [prepare(get_builder(with_name(data, name.strip()))) for name in data.name.split(",")]


def with_name(data, name):
    """`data` (a config.data section) for dataset `name` (one of a union, or eval.data_name)."""
    if name == data.name:
        return data
    one = data.copy_and_resolve_references()
    with one.unlocked():
        one.name = name
    return one


def scaled_sizes(data, min_size):
    """{min_size, max_size, canvas} of `data` (a config.data section) for images resized to
    short side `min_size`: the long side limit and the canvas scaled alike."""
    factor = min_size / data.min_size
    return {
        "min_size": int(min_size),
        "max_size": max(int(min_size), round(data.max_size * factor)),
        "canvas": tuple(math.ceil(side * factor) for side in data.canvas),
    }


def at_scale(data, min_size):
    """`data` (a config.data section) with images resized to short side `min_size`
    (`scaled_sizes`; image-pyramid testing, `eval.scales`)."""
    if min_size == data.min_size:
        return data
    one = data.copy_and_resolve_references()
    with one.unlocked():
        one.update(scaled_sizes(data, min_size))
    return one


def train_canvas(data):
    """The (H, W) canvas training batches use: `data.canvas`, or with `data.train_scales` the
    canvas of the largest scale (smaller scales are padded onto it: one compiled shape)."""
    if not data.train_scales:
        return tuple(data.canvas)
    return scaled_sizes(data, max(data.train_scales))["canvas"]


class _Concat:
    """Random access over several sources, one after the other."""

    def __init__(self, sources):
        self.sources = sources
        self.offsets = np.cumsum([0] + [len(s) for s in sources])

    def __len__(self):
        return int(self.offsets[-1])

    def __getitem__(self, index):
        which = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return self.sources[which][index - int(self.offsets[which])]


def _subset(info, names):
    """`info` for the classes `names` only, and the label map (dataset label 1..K_all -> 1..K,
    0 for classes left out)."""
    unknown = [n for n in names if n not in info.class_names]
    if unknown or len(set(names)) != len(names):
        raise ValueError(
            f"config.data.class_subset: {unknown or names} (need distinct names of "
            f"{list(info.class_names)})"
        )
    label_map = np.zeros(len(info.class_names) + 1, np.int64)
    for new, name in enumerate(names, start=1):
        label_map[info.class_names.index(name) + 1] = new
    ids = tuple(info.category_ids[info.class_names.index(n)] for n in names)
    return dataclasses.replace(info, class_names=names, category_ids=ids), label_map


def open_split(data, split):
    """Prepare the dataset(s) of `data` if needed: (random-access source of `split`,
    `DatasetInfo`, label map of `data.class_subset` or None)."""
    check_data_config(data)
    builders = prepare_all(data)
    sources = []
    for builder in builders:
        _check_labelled(builder, split)
        source = data_source(builder, split)
        if len(source) == 0:
            raise ValueError(f"config.data: split {split!r} of {builder.name} has no examples")
        sources.append(_VocOneBased(source) if builder.name == "voc" else source)
    infos = [dataset_info(b, len(s)) for b, s in zip(builders, sources, strict=True)]
    if any(i.class_names != infos[0].class_names for i in infos):
        raise ValueError(f"config.data.name: the datasets of {data.name!r} have different classes")
    source = sources[0] if len(sources) == 1 else _Concat(sources)
    info = dataclasses.replace(infos[0], num_examples=len(source))
    label_map = None
    if data.class_subset:
        info, label_map = _subset(info, tuple(data.class_subset))
    return source, info, label_map


def make_batches(data, split, *, batch_size, train, seed=0, shard_index=0, shard_count=1,
                 worker_count=None, agree=None):  # fmt: skip
    """Prepare the dataset if needed and return (`Batches`, `DatasetInfo`)."""
    source, info, label_map = open_split(data, split)
    batches = Batches(
        source,
        data,
        batch_size=batch_size,
        train=train,
        seed=seed,
        shard_index=shard_index,
        shard_count=shard_count,
        worker_count=worker_count,
        name=f"{data.name}:{split}",
        agree=agree,
        label_map=label_map,
    )
    return batches, info
