"""User folders (VOC layout, COCO JSON) with every kind of bad input the data issue lists."""

import io
import json
import logging
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from frcnn_jax.data import checks, folders
from frcnn_jax.errors import UserError

BOMB_SIDE = 100_000


def _jpeg(path, size=(60, 80), mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 255, (size[0], size[1], len(mode)), dtype=np.uint8)
    image = Image.fromarray(
        array.squeeze(-1) if mode == "L" else array[..., :3], "L" if mode == "L" else "RGB"
    )
    if mode == "CMYK":
        image = image.convert("CMYK")
    if mode == "RGBA":
        image = image.convert("RGBA")
        image.save(path.with_suffix(".png"))
        path.with_suffix(".png").rename(path)
        return
    image.save(path, format="JPEG")


def _bomb_png(path):
    """A tiny PNG whose header declares BOMB_SIDE x BOMB_SIDE pixels."""
    buffer = io.BytesIO()
    Image.new("L", (8, 8)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    ihdr = data[12:29]  # type + 13 bytes of header data
    ihdr[4:12] = struct.pack(">II", BOMB_SIDE, BOMB_SIDE)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    path.write_bytes(bytes(data))


def _xml(name, objects, size=(60, 80)):
    parts = [f"<annotation><filename>{name}</filename>"]
    parts.append(f"<size><width>{size[1]}</width><height>{size[0]}</height><depth>3</depth></size>")
    for cls, (x1, y1, x2, y2), difficult in objects:
        parts.append(
            f"<object><name>{cls}</name><difficult>{int(difficult)}</difficult><bndbox>"
            f"<xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax>"
            "</bndbox></object>"
        )
    return "".join(parts) + "</annotation>"


BILLION_LAUGHS = """<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]>
<annotation><filename>&lol3;</filename></annotation>"""


@pytest.fixture
def voc_root(tmp_path):
    """A VOC-layout folder: 3 good images, and one of each kind of bad input."""
    root = tmp_path / "voc"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True)
    ann, img = root / "Annotations", root / "JPEGImages"
    # good: two objects, one difficult; VOC boxes are 1-based inclusive
    _jpeg(img / "good1.jpg")
    (ann / "good1.xml").write_text(
        _xml("good1.jpg", [("cat", (1, 1, 40, 30), False), ("dog", (11, 21, 80, 60), True)])
    )
    # box partly outside (clipped), zero-area and inverted boxes (dropped), unknown class
    _jpeg(img / "good2.jpg", seed=1)
    (ann / "good2.xml").write_text(
        _xml(
            "good2.jpg",
            [
                ("cat", (50, 40, 120, 90), False),
                ("dog", (10, 10, 9, 20), False),  # zero width in inclusive pixels
                ("dog", (30, 30, 20, 40), False),
                ("zebra", (1, 1, 5, 5), False),
            ],
        )
    )
    _jpeg(img / "gray.jpg", mode="L", seed=2)
    (ann / "gray.xml").write_text(_xml("gray.jpg", [("dog", (1, 1, 20, 20), False)]))
    _jpeg(img / "cmyk.jpg", mode="CMYK", seed=3)
    (ann / "cmyk.xml").write_text(_xml("cmyk.jpg", [("cat", (1, 1, 20, 20), False)]))
    _jpeg(img / "rgba.jpg", mode="RGBA", seed=4)
    (ann / "rgba.xml").write_text(_xml("rgba.jpg", [("cat", (1, 1, 20, 20), False)]))
    # bad: truncated JPEG, missing image, bomb, billion laughs, malformed XML, no XML at all
    _jpeg(img / "truncated.jpg", seed=5)
    data = (img / "truncated.jpg").read_bytes()
    (img / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (ann / "truncated.xml").write_text(_xml("truncated.jpg", [("cat", (1, 1, 9, 9), False)]))
    (ann / "missing.xml").write_text(_xml("missing.jpg", [("cat", (1, 1, 9, 9), False)]))
    _bomb_png(img / "bomb.png")
    (ann / "bomb.xml").write_text(_xml("bomb.png", [("cat", (1, 1, 9, 9), False)]))
    (ann / "laughs.xml").write_text(BILLION_LAUGHS)
    (ann / "broken.xml").write_text("<annotation><filename>good1.jpg</filename>")
    ids = [
        "good1",
        "good2",
        "gray",
        "cmyk",
        "rgba",
        "truncated",
        "missing",
        "bomb",
        "laughs",
        "broken",
        "noxml",
    ]
    (root / "ImageSets/Main/train.txt").write_text("\n".join(ids) + "\n")
    (root / "ImageSets/Main/test.txt").write_text("missing\nbomb\n")
    return root


def test_voc_folder_reads_good_examples_and_counts_every_problem(voc_root):
    problems = checks.Problems()
    examples = dict(folders.voc_examples(voc_root, "train", ["cat", "dog"], problems))
    assert sorted(examples) == ["cmyk", "good1", "good2", "gray", "rgba"]

    good1 = examples["good1"]["objects"]
    # (1, 1, 40, 30) in 1-based inclusive pixels is (0, 0, 40, 30); stored normalized yxyx
    np.testing.assert_allclose(good1["bbox"][0], [0, 0, 30 / 60, 40 / 80])
    np.testing.assert_array_equal(good1["label"], [0, 1])
    np.testing.assert_array_equal(good1["is_difficult"], [False, True])
    good2 = examples["good2"]["objects"]
    np.testing.assert_allclose(good2["bbox"], [[39 / 60, 49 / 80, 1.0, 1.0]])  # clipped
    for name in ("gray", "cmyk", "rgba"):  # converted to RGB, stored as JPEG
        image = Image.open(io.BytesIO(examples[name]["image"]))
        assert image.mode == "RGB" and image.size == (80, 60)

    counts = problems.counts
    assert counts["corrupt image"] == 1
    assert counts["missing image"] == 1
    assert counts["oversized image"] == 1
    assert counts["unsafe XML refused"] == 1
    assert counts["malformed annotation"] == 1
    assert counts["missing annotation"] == 1
    assert counts["unknown class name"] == 1
    assert counts["box clipped to the image"] == 1
    assert counts["zero-area or inverted box dropped"] == 2
    assert counts["converted L image"] == 1 and counts["converted CMYK image"] == 1
    assert counts["converted RGBA image"] == 1
    summary = problems.summary()
    assert "1 oversized image (bomb.png: " in summary and "10000000000 pixels" in summary
    assert "truncated.jpg" in summary and "laughs.xml" in summary


def test_oversized_image_is_refused_before_decoding(tmp_path, monkeypatch):
    _bomb_png(tmp_path / "bomb.png")
    decoded = []
    monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append(1))
    with pytest.raises(checks.BadExample, match="oversized image"):
        checks.load_image(tmp_path / "bomb.png")
    assert decoded == []


def test_class_names_come_from_the_data(voc_root):
    assert folders.voc_class_names(voc_root) == ["cat", "dog", "zebra"]
    assert folders.voc_splits(voc_root) == ["train", "test"]


def test_voc_builder_prepares_logs_and_refuses_an_empty_split(voc_root, tmp_path, caplog):
    from frcnn_jax.data import builders

    builder = builders.voc_folder(voc_root, ["cat", "dog"], data_dir=tmp_path / "tfds")
    with caplog.at_level(logging.INFO), pytest.raises(UserError, match="no valid examples"):
        builder.download_and_prepare(file_format="array_record")
    assert any("5 examples; problems:" in r.message for r in caplog.records)
    with pytest.raises(FileNotFoundError, match="not a VOC-layout folder"):
        builders.voc_folder(tmp_path / "nowhere")


@pytest.fixture
def coco_files(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    _jpeg(images / "a.jpg")
    _jpeg(images / "b.jpg", seed=1, mode="L")
    data = {
        "images": [
            {"id": 10, "file_name": "a.jpg", "height": 60, "width": 80},
            {"id": 11, "file_name": "b.jpg", "height": 60, "width": 80},
            {"id": 12, "file_name": "gone.jpg", "height": 60, "width": 80},
        ],
        "annotations": [
            {"id": 1, "image_id": 10, "category_id": 7, "bbox": [10, 5, 20, 10], "iscrowd": 0},
            {"id": 2, "image_id": 10, "category_id": 3, "bbox": [70, 50, 20, 20], "iscrowd": 1},
            {"id": 3, "image_id": 11, "category_id": 99, "bbox": [1, 1, 5, 5], "iscrowd": 0},
            {"id": 4, "image_id": 11, "category_id": 3, "bbox": [1, 1, 0, 5], "iscrowd": 0},
        ],
        "categories": [{"id": 7, "name": "seven"}, {"id": 3, "name": "three"}],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return path, images


def test_coco_json_examples(coco_files):
    path, images = coco_files
    assert folders.coco_categories(path) == ([3, 7], ["three", "seven"])
    problems = checks.Problems()
    examples = dict(folders.coco_examples(path, images, problems))
    assert sorted(examples) == ["10", "11"]
    a = examples["10"]
    assert a["image/id"] == 10
    np.testing.assert_array_equal(a["objects"]["label"], [1, 0])  # 7 -> 1, 3 -> 0
    np.testing.assert_allclose(a["objects"]["bbox"][0], [5 / 60, 10 / 80, 15 / 60, 30 / 80])
    np.testing.assert_allclose(a["objects"]["bbox"][1], [50 / 60, 70 / 80, 1, 1])  # clipped
    np.testing.assert_array_equal(a["objects"]["is_difficult"], [False, True])  # crowd
    assert len(examples["11"]["objects"]["label"]) == 0
    assert problems.counts["missing image"] == 1
    assert problems.counts["unknown category id"] == 1
    assert problems.counts["zero-area or inverted box dropped"] == 1


def test_coco_json_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=r"bad\.json is not valid JSON"):
        folders.read_coco_json(bad)
    bad.write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="has no 'annotations' field"):
        folders.read_coco_json(bad)
