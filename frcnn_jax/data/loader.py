"""The loader: grain's `DataLoader` over a random-access source, examples bucketed by canvas
into batches of static shapes, and a position (`get_state` / `set_state`) that resumes
exactly.

Why TFDS random-access sources + grain: every source is prepared once into array_record files
that allow reading record i directly, so grain's `IndexSampler` can shuffle, shard per host,
and describe the loader's position by a small state (the next index per worker) that is saved
with each checkpoint: a resumed run continues with exactly the examples an uninterrupted run
would have seen. grain's worker processes decode and preprocess in parallel; a `tf.data`
pipeline would need TensorFlow at training time and has no cheap exact-resume story.

Batching happens in the main process so that an example that fails to decode is skipped (and
counted) without changing the batch shape; a one-line summary of input problems is logged once
per epoch.
"""

import atexit
import gc
import logging
import weakref
from typing import NamedTuple

import grain.python as grain
import numpy as np

from frcnn_jax import canvas as canvas_lib
from frcnn_jax.data import checks, workers
from frcnn_jax.data.transforms import Preprocess

log = logging.getLogger(__name__)


class Inputs(NamedTuple):
    """What the devices get of a batch (B examples on one canvas H x W, G ground-truth slots):
    the model's inputs and training targets, all static-shaped NumPy arrays."""

    image: np.ndarray  # uint8 [B, H, W, 3] RGB, padded bottom/right
    image_size: np.ndarray  # int32 [B, 2] the resized image's (height, width) on the canvas
    scale: np.ndarray  # float32 [B] resized / original size
    gt_boxes: np.ndarray  # float32 [B, G, 4] (x1, y1, x2, y2) in resized pixels
    gt_classes: np.ndarray  # int32 [B, G] 1..K
    gt_valid: np.ndarray  # bool [B, G] real ground truth (difficult boxes excluded when training)
    gt_difficult: np.ndarray  # bool [B, G]
    valid: np.ndarray  # bool [B] false for the padding of a last evaluation batch


class Batch(NamedTuple):
    """A batch: `inputs` for the devices, and the host's bookkeeping beside them."""

    inputs: Inputs
    image_id: np.ndarray  # int64 [B] the dataset's image id (COCO ids; else the record index)
    original_size: np.ndarray  # int32 [B, 2] the image's (height, width) before resizing
    # multi-host evaluation (`sharding.gather_batch`): this host's own rows, when the arrays
    # above hold every host's
    local: "Batch | None" = None


class WithIndex:
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


class Closing:
    """A loader iterator's ending (`Batches`, `frcnn_jax.pretraining.data.ClassBatches`): a
    context manager whose `close()` stops grain's worker processes (`self._iter`) and frees
    the shared memory of the examples they made that were not taken yet. Loaders still open
    when the process exits (an error, a signal turned into an exit by `frcnn_jax.cli`) are
    closed then (`close_all`)."""

    def _track(self):
        _open.add(self)

    def __iter__(self):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        _open.discard(self)
        iterator = getattr(self._iter, "_iterator", None)  # grain's DataLoaderIterator
        if iterator is not None and hasattr(iterator, "close"):
            iterator.close()
        # grain's prefetch threads keep the pass's ending (StopIteration and its traceback) in
        # a reference cycle with their buffers: the shared memory of the examples still in
        # them is unlinked only when that cycle is collected (otherwise at exit Python's
        # resource tracker warns of "leaked shared_memory objects")
        gc.collect()


class Batches(Closing):
    """Iterator of `Batch`es (NumPy arrays with a leading batch axis) with a saveable
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

    def __init__(
        self,
        source,
        data,
        *,
        batch_size,
        train,
        seed,
        shard_index=0,
        shard_count=1,
        worker_count=None,
        name="data",
        agree=None,
        label_map=None,
    ):
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
        worker_count = data.workers if worker_count is None else worker_count
        if worker_count:
            workers.grain_flags_ready()
        self._source = WithIndex(source, name)
        self._preprocess = Preprocess(data, train, label_map)
        self._loader = grain.DataLoader(
            data_source=self._source,
            sampler=sampler,
            operations=[self._preprocess],
            worker_count=worker_count,
            shard_options=grain.ShardOptions(shard_index, shard_count, drop_remainder=train),
        )
        self._iter = iter(self._loader)
        self._track()
        self.consumed = 0  # records taken from the loader, valid or not
        self.name = name
        self.canvases = canvas_lib.canvases(
            self._preprocess.kwargs["canvas"], orient=data.orient_canvas
        )
        self._buckets = {canvas: [] for canvas in self.canvases}
        self._agree = agree or _local_only
        self._exhausted = False
        self._max_boxes = data.max_boxes
        self._since_valid = 0
        self.problems = checks.Problems()

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

        def stack(key):
            return np.stack([np.asarray(e[key]) for e in examples])

        inputs = Inputs(*(stack(key) for key in Inputs._fields))
        return Batch(inputs, image_id=stack("image_id"), original_size=stack("original_size"))

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
            example = self._preprocess.example(
                *self._source[index], flip=flip, min_size=(min_size or [0])[0] or None
            )
            self._buckets[example["image"].shape[:2]].append(example)


_open = weakref.WeakSet()  # loaders (`Closing`) not closed yet


@atexit.register
def close_all():
    """Close every open loader (at exit: their workers' pending shared memory would
    otherwise outlive the process, and Python's resource tracker warn about it)."""
    for batches in list(_open):
        batches.close()


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
