import io
import logging
import pathlib

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from frcnn_jax.data import loader, pipeline
from frcnn_jax.data.config import data_config

SIZES = {"train": 24, "validation": 4, "test": 10}


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory):
    data = data_config(
        name="shapes/320",
        data_dir=str(tmp_path_factory.mktemp("tfds")),
        shapes_num_examples=SIZES,
        min_size=160,
        max_size=160,
        canvas=(160, 160),
        max_boxes=8,
        workers=0,
    )
    pipeline.make_batches(data, "train", batch_size=1, train=True)  # prepare once
    return data


def _take(batches, n):
    return [next(batches) for _ in range(n)]


def _same(a, b):
    return all(
        np.array_equal(x, y)
        for first, second in zip(a, b, strict=True)
        for x, y in zip(jax.tree.leaves(first), jax.tree.leaves(second), strict=True)
    )


def test_training_batches_are_static_and_deterministic(shapes_data):
    batches, info = pipeline.make_batches(shapes_data, "train", batch_size=4, train=True, seed=3)
    assert info.class_names[0] == "rectangle" and info.num_examples == SIZES["train"]
    first = _take(batches, 8)  # more than one epoch (24 records)
    for batch in first:
        assert batch.inputs.image.shape == (4, 160, 160, 3) and batch.inputs.image.dtype == np.uint8
        assert batch.inputs.gt_boxes.shape == (4, 8, 4) and batch.inputs.valid.all()
        assert (batch.inputs.gt_classes[batch.inputs.gt_valid] >= 1).all()
    again, _ = pipeline.make_batches(shapes_data, "train", batch_size=4, train=True, seed=3)
    assert _same(first, _take(again, 8))
    other, _ = pipeline.make_batches(shapes_data, "train", batch_size=4, train=True, seed=4)
    assert not _same(first[:1], _take(other, 1))


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_resume_sees_exactly_the_uninterrupted_examples(shapes_data, workers):
    uninterrupted, _ = pipeline.make_batches(
        shapes_data, "train", batch_size=3, train=True, seed=1, worker_count=workers
    )
    expected = _take(uninterrupted, 12)  # crosses an epoch boundary (8 batches per epoch)
    run, _ = pipeline.make_batches(
        shapes_data, "train", batch_size=3, train=True, seed=1, worker_count=workers
    )
    head = _take(run, 5)
    state = run.get_state()
    del run  # "killed"
    resumed, _ = pipeline.make_batches(
        shapes_data, "train", batch_size=3, train=True, seed=1, worker_count=workers
    )
    resumed.set_state(state)
    assert _same(expected, head + _take(resumed, 7))


def test_evaluation_is_one_padded_pass_and_shards_partition(shapes_data):
    batches, _ = pipeline.make_batches(shapes_data, "test", batch_size=4, train=False)
    seen = [b for b in batches]
    assert [int(b.inputs.valid.sum()) for b in seen] == [4, 4, 2]
    ids = np.concatenate([b.image_id[b.inputs.valid] for b in seen])
    assert sorted(ids) == list(range(SIZES["test"]))
    assert not seen[-1].inputs.gt_valid[~seen[-1].inputs.valid].any()  # padding has no boxes
    shard_ids = []
    for index in range(2):
        shard, _ = pipeline.make_batches(
            shapes_data, "test", batch_size=4, train=False, shard_index=index, shard_count=2
        )
        shard_ids.append({int(i) for b in shard for i in b.image_id[b.inputs.valid]})
    assert shard_ids[0].isdisjoint(shard_ids[1]) and len(shard_ids[0] | shard_ids[1]) == 10


def _encoded(seed):
    rng = np.random.default_rng(seed)
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(out, format="JPEG")
    return out.getvalue()


class _ListSource:
    """An in-memory source whose record 1 is corrupt and record 2 cannot even be read."""

    def __init__(self):
        good = {
            "image/filename": b"ok.jpg",
            "objects": {
                "bbox": np.array([[0.1, 0.1, 0.5, 0.5]] * 3 + [[0.5, 0.5, 0.5, 0.9]], np.float32),
                "label": np.array([0, 1, 2, 0]),
                "is_difficult": np.zeros(4, bool),
            },
        }
        self.records = [
            dict(good, image=_encoded(0)),
            dict(good, image=_encoded(1)[:200], **{"image/filename": b"cut.jpg"}),
            None,
            dict(good, image=_encoded(3)),
        ]

    def __len__(self):
        return len(self.records)

    def __getitem__(self, index):
        if self.records[index] is None:
            raise OSError("disk error")
        return self.records[index]


def test_bad_records_are_skipped_counted_and_summarized_per_epoch(caplog):
    data = data_config(min_size=40, max_size=50, canvas=(40, 50), max_boxes=2, workers=0)
    batches = loader.Batches(_ListSource(), data, batch_size=2, train=True, seed=0, name="list")
    with caplog.at_level(logging.WARNING):
        # epoch 1 has two good records and two bad ones: the second batch ends it
        batch = _take(batches, 2)[-1]
    assert batch.inputs.valid.all() and batch.inputs.gt_valid.sum() == 4  # 2 boxes each (max_boxes)
    summary = [r.message for r in caplog.records if "input problems in epoch 1" in r.message]
    assert len(summary) == 1
    assert "1 corrupt image (cut.jpg" in summary[0]
    assert "1 unreadable record (list[2]: disk error)" in summary[0]
    assert "2 boxes over max_boxes dropped" in summary[0]
    assert "2 zero-area or inverted box dropped" in summary[0]


@pytest.mark.parametrize("name", ["voc/2007", "coco/2017"])
def test_tfds_voc_and_coco_code_paths(name):
    data = data_config(
        name=name, min_size=100, max_size=160, canvas=(128, 160), max_boxes=8, workers=0
    )
    with tfds.testing.mock_data(num_examples=5):
        batches, info = pipeline.make_batches(data, "train", batch_size=2, train=True)
        batch = next(batches)
    assert len(info.class_names) == {"voc/2007": 20, "coco/2017": 80}[name]
    assert batch.inputs.image.shape == (2, 128, 160, 3)
    boxes = batch.inputs.gt_boxes[batch.inputs.gt_valid]
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    assert (boxes[:, 2] <= 160).all() and (boxes[:, 3] <= 128).all()


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match=r"config\.data\.path"):
        pipeline.make_batches(data_config(name="voc_folder"), "train", batch_size=1, train=True)
    with pytest.raises(ValueError, match=r"config\.data\.name: unknown dataset 'nope/1'"):
        pipeline.make_batches(data_config(name="nope/1"), "train", batch_size=1, train=True)
    with pytest.raises(ValueError, match=r"config\.data\.canvas"):
        pipeline.make_batches(data_config(canvas=(0, 5)), "train", batch_size=1, train=True)


def test_a_source_with_no_good_record_is_an_error_not_a_hang():
    source = _ListSource()
    source.records = [None, None, None]
    data = data_config(min_size=40, max_size=50, canvas=(40, 50), max_boxes=2, workers=0)
    batches = loader.Batches(source, data, batch_size=2, train=True, seed=0, name="broken")
    with pytest.raises(ValueError, match="broken: no valid example in a whole pass"):
        next(batches)


def _record(height, width, seed):
    rng = np.random.default_rng(seed)
    out = io.BytesIO()
    pixels = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(out, format="JPEG")
    return {
        "image": out.getvalue(),
        "image/id": seed,
        "objects": {
            "bbox": np.array([[0.2, 0.1, 0.7, 0.6]], np.float32),
            "label": np.array([seed % 3]),
            "is_difficult": np.zeros(1, bool),
        },
    }


class _MixedSource:
    """Landscape (40 x 50) and portrait (50 x 40) images in an irregular order."""

    PORTRAIT = (1, 2, 5, 8, 9, 10, 13)

    def __init__(self, count=16):
        self.records = [
            _record(*((50, 40) if i in self.PORTRAIT else (40, 50)), seed=i) for i in range(count)
        ]

    def __len__(self):
        return len(self.records)

    def __getitem__(self, index):
        return self.records[index]


MIXED = dict(min_size=60, max_size=100, canvas=(60, 100), max_boxes=2, workers=0)
LANDSCAPE, PORTRAIT = (60, 100), (100, 60)


def test_a_portrait_voc_image_keeps_the_papers_scale_on_a_portrait_canvas():
    source = _MixedSource(0)
    source.records = [_record(500, 375, seed=0), _record(375, 500, seed=1)]  # VOC's two shapes
    data = data_config(min_size=600, max_size=1000, canvas=(600, 1000), workers=0)
    batches = loader.Batches(source, data, batch_size=1, train=False, seed=0)
    portrait, landscape = next(batches), next(batches)
    assert portrait.inputs.image.shape == (1, 1000, 600, 3)
    assert portrait.inputs.image_size.tolist() == [[800, 600]] and portrait.inputs.scale[0] == 1.6
    assert landscape.inputs.image.shape == (1, 600, 1000, 3)
    assert landscape.inputs.image_size.tolist() == [[600, 800]]
    # the single-canvas option shrinks the portrait image to fit (600 x 450)
    data.orient_canvas = False
    shrunk = next(loader.Batches(source, data, batch_size=1, train=False, seed=0))
    assert shrunk.inputs.image.shape == (1, 600, 1000, 3) and shrunk.inputs.image_size.tolist() == [
        [600, 450]
    ]


@pytest.mark.slow
def test_training_batches_group_by_orientation_and_resume_with_buffered_examples():
    data = data_config(**MIXED)

    def fresh():
        return loader.Batches(_MixedSource(), data, batch_size=3, train=True, seed=2)

    expected = _take(fresh(), 14)  # 42 examples: more than two epochs of 16
    canvases = [b.inputs.image.shape[1:3] for b in expected]
    assert set(canvases) == {LANDSCAPE, PORTRAIT}
    for batch in expected:
        portrait = batch.inputs.image_size[:, 0] > batch.inputs.image_size[:, 1]
        assert (
            portrait.all() == (batch.inputs.image.shape[1:3] == PORTRAIT)
            and batch.inputs.valid.all()
        )
    resumed_with_buffer = 0
    for cut in range(1, 13):
        run = fresh()
        head = _take(run, cut)
        state = run.get_state()
        resumed_with_buffer += bool(state["buffered"])
        resumed = fresh()
        resumed.set_state(state)
        assert _same(expected, head + _take(resumed, 14 - cut)), cut
    assert resumed_with_buffer >= 3  # the buffered examples' rebuild was exercised


def test_multi_scale_training_draws_a_short_side_per_image_on_one_canvas_and_resumes():
    data = data_config(**MIXED, train_scales=(30, 60, 90))  # canvas of 90: (90, 150)

    def fresh():
        return loader.Batches(_MixedSource(), data, batch_size=2, train=True, seed=5)

    expected = _take(fresh(), 16)
    short_sides = set()
    for batch in expected:
        assert batch.inputs.image.shape[1:3] in {(90, 150), (150, 90)}
        short_sides.update(batch.inputs.image_size.min(axis=1).tolist())
        long_side = batch.inputs.image_size.max(axis=1)  # 40 x 50 images: long = 1.25 x short
        np.testing.assert_array_equal(long_side, batch.inputs.image_size.min(axis=1) * 5 // 4)
        np.testing.assert_allclose(batch.inputs.scale, batch.inputs.image_size.min(axis=1) / 40)
        boxes = batch.inputs.gt_boxes[batch.inputs.gt_valid]
        assert (boxes[:, 2:] <= 150).all()
    assert short_sides == {30, 60, 90}
    for cut in (3, 7, 11):  # buffered examples rebuilt at their own scale
        run = fresh()
        head = _take(run, cut)
        resumed = fresh()
        resumed.set_state(run.get_state())
        assert _same(expected, head + _take(resumed, 16 - cut)), cut
    # evaluation keeps min_size and the configured canvas
    test = next(loader.Batches(_MixedSource(), data, batch_size=2, train=False, seed=0))
    assert test.inputs.image.shape[1:3] in {LANDSCAPE, PORTRAIT}
    assert (test.inputs.image_size.min(axis=1) == 60).all()
    with pytest.raises(ValueError, match=r"config\.data\.train_scales"):
        pipeline.make_batches(data_config(train_scales=(0,)), "train", batch_size=1, train=True)


def test_evaluation_groups_by_orientation_and_sees_every_image_once():
    data = data_config(**MIXED)
    batches = list(loader.Batches(_MixedSource(), data, batch_size=3, train=False, seed=0))
    ids = np.concatenate([b.image_id[b.inputs.valid] for b in batches])
    assert sorted(ids.tolist()) == list(range(16))
    for batch in batches:
        sizes = batch.inputs.image_size[batch.inputs.valid]
        assert ((sizes[:, 0] > sizes[:, 1]) == (batch.inputs.image.shape[1:3] == PORTRAIT)).all()
    assert (
        sum(b.inputs.valid.size - b.inputs.valid.sum() for b in batches) <= 2 * 2
    )  # one partial each


@pytest.mark.parametrize("train", [True, False])
def test_hosts_agree_on_the_canvas_of_every_batch(train):
    """Two hosts (threads, each a shard) exchange bucket sizes as `process_allgather` would:
    every step both feed the same canvas, so a multi-host jit sees one shape."""
    import threading

    barrier, slots = threading.Barrier(2), [None, None]

    def agree_for(host):
        def agree(counts):
            slots[host] = np.asarray(counts)
            barrier.wait()
            both = np.stack(slots)
            barrier.wait()
            return both

        return agree

    data = data_config(**MIXED)
    outputs = [[], []]

    def run(host):
        shard = dict(shard_index=host, shard_count=2, agree=agree_for(host))
        batches = loader.Batches(_MixedSource(), data, batch_size=2, train=train, seed=0, **shard)
        for i, batch in enumerate(batches):
            outputs[host].append(batch)
            if train and i == 9:
                break

    threads = [threading.Thread(target=run, args=(h,)) for h in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(outputs[0]) == len(outputs[1]) > 0
    shapes = [[b.inputs.image.shape for b in out] for out in outputs]
    assert shapes[0] == shapes[1] and len(set(shapes[0])) == 2
    if not train:
        ids = [i for out in outputs for b in out for i in b.image_id[b.inputs.valid].tolist()]
        assert sorted(ids) == list(range(16))


def test_a_class_subset_keeps_and_renumbers_those_classes_only(shapes_data):
    everything, info = pipeline.make_batches(shapes_data, "test", batch_size=10, train=False)
    subset = shapes_data.copy_and_resolve_references()
    subset.class_subset = ("triangle", "rectangle")
    batches, sub_info = pipeline.make_batches(subset, "test", batch_size=10, train=False)
    assert sub_info.class_names == ("triangle", "rectangle") and sub_info.category_ids == (
        info.class_names.index("triangle") + 1,
        1,
    )
    full, part = next(everything), next(batches)
    names = np.array(("background", *info.class_names))
    for i in range(10):
        kept = names[full.inputs.gt_classes[i][full.inputs.gt_valid[i]]]
        want = [{"triangle": 1, "rectangle": 2}[n] for n in kept if n in sub_info.class_names]
        assert part.inputs.gt_classes[i][part.inputs.gt_valid[i]].tolist() == want
    subset.class_subset = ("rectangle", "hexagonal prism")
    with pytest.raises(ValueError, match=r"class_subset: \['hexagonal prism'\]"):
        pipeline.make_batches(subset, "test", batch_size=1, train=False)


def test_at_scale_scales_the_long_side_limit_and_the_canvas():
    from frcnn_jax.config import config_from_file
    from frcnn_jax.data.sources import at_scale

    root = pathlib.Path(__file__).resolve().parents[2]
    voc = config_from_file(root / "configs" / "voc07_vgg16.py").data
    assert at_scale(voc, 600) is voc
    small = at_scale(voc, 480)
    assert (small.min_size, small.max_size, tuple(small.canvas)) == (480, 800, (480, 800))
    large = at_scale(voc, 1000)
    assert (large.min_size, large.max_size, tuple(large.canvas)) == (1000, 1667, (1000, 1667))
    assert (voc.min_size, tuple(voc.canvas)) == (600, (600, 1000))  # the original unchanged
    shapes = config_from_file(root / "configs" / "shapes_512.py").data
    assert tuple(at_scale(shapes, 384).canvas) == (384, 384)
