"""Examples from a user's folder in VOC layout or a COCO annotation JSON (no TFDS here).

Both yield the same record (see `record`): encoded RGB image bytes, boxes normalized
(ymin, xmin, ymax, xmax) as TFDS stores them, 0-based labels, a difficult flag (VOC
"difficult", COCO "iscrowd"). Bad files are skipped and counted in a `checks.Problems`.
"""

import json
import pathlib

import numpy as np

from frcnn_jax.data import checks
from frcnn_jax.errors import DamagedFile, MissingFile

VOC_SPLIT_FILES = {"train": "train", "validation": "val", "trainval": "trainval", "test": "test"}


def record(image_id, filename, image_bytes, height, width, boxes, labels, difficult):
    """One stored example; `boxes` float [N, 4] (x1, y1, x2, y2) pixels of the image."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    normalized = np.stack(
        [boxes[:, 1] / height, boxes[:, 0] / width, boxes[:, 3] / height, boxes[:, 2] / width],
        axis=1,
    )
    return {
        "image": image_bytes,
        "image/id": int(image_id),
        "image/filename": str(filename),
        "objects": {
            "bbox": np.clip(normalized, 0.0, 1.0).astype(np.float32),
            "label": np.asarray(labels, np.int64),
            "is_difficult": np.asarray(difficult, bool),
        },
    }


# ---------------------------------------------------------------- VOC layout


def voc_splits(root):
    """Split names (TFDS style) whose ImageSets/Main/<file>.txt exists under `root`."""
    main = pathlib.Path(root) / "ImageSets" / "Main"
    return [s for s, f in VOC_SPLIT_FILES.items() if (main / f"{f}.txt").is_file()]


def read_voc_annotation(path):
    """Parse one VOC XML file safely (defusedxml: entity expansion and external entities are
    refused). Returns dict(filename, width, height, objects=[(name, box, difficult)]) with box
    (x1, y1, x2, y2) continuous pixels: VOC's 1-based inclusive xmin..xmax becomes
    xmin - 1 .. xmax (detectron2's conversion)."""
    import defusedxml
    import defusedxml.ElementTree as ET

    path = pathlib.Path(path)
    try:
        root = ET.parse(path).getroot()
    except FileNotFoundError:
        raise checks.BadExample("missing annotation", path.name) from None
    except defusedxml.DefusedXmlException as e:
        raise checks.BadExample("unsafe XML refused", f"{path.name}: {type(e).__name__}") from None
    except ET.ParseError as e:
        raise checks.BadExample("malformed annotation", f"{path.name}: {e}") from None
    try:
        objects = []
        for obj in root.iter("object"):
            bb = obj.find("bndbox")
            x1, y1, x2, y2 = (float(bb.find(k).text) for k in ("xmin", "ymin", "xmax", "ymax"))
            difficult = obj.find("difficult")
            objects.append(
                (
                    obj.find("name").text.strip(),
                    (x1 - 1, y1 - 1, x2, y2),
                    difficult is not None and difficult.text.strip() == "1",
                )
            )
        size = root.find("size")
        width = int(float(size.find("width").text)) if size is not None else 0
        height = int(float(size.find("height").text)) if size is not None else 0
        # only a name inside JPEGImages/: a path in the XML must not reach other folders
        filename = pathlib.PurePath(root.find("filename").text.strip()).name
    except (AttributeError, TypeError, ValueError) as e:
        raise checks.BadExample("malformed annotation", f"{path.name}: {e}") from None
    return {"filename": filename, "width": width, "height": height, "objects": objects}


def voc_ids(root, split):
    files = VOC_SPLIT_FILES
    path = pathlib.Path(root) / "ImageSets" / "Main" / f"{files.get(split, split)}.txt"
    if not path.is_file():
        raise MissingFile(f"VOC folder {root}: no split file {path}")
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def voc_class_names(root, splits=None):
    """Sorted class names found in the annotations of `splits` (all split files if None)."""
    names = set()
    for split in splits or voc_splits(root):
        for image_id in voc_ids(root, split):
            try:
                ann = read_voc_annotation(pathlib.Path(root) / "Annotations" / f"{image_id}.xml")
            except checks.BadExample:
                continue
            names.update(name for name, _, _ in ann["objects"])
    return sorted(names)


def voc_examples(root, split, class_names, problems):
    """Yields (key, record) for a VOC split, skipping and counting bad examples."""
    root = pathlib.Path(root)
    index = {name: i for i, name in enumerate(class_names)}
    for number, image_id in enumerate(voc_ids(root, split)):
        xml = root / "Annotations" / f"{image_id}.xml"
        try:
            ann = read_voc_annotation(xml)
            image, data = checks.load_image(root / "JPEGImages" / ann["filename"], problems)
        except checks.BadExample as e:
            problems.add(e.kind, e.detail)
            continue
        height, width = image.shape[:2]
        names = [name for name, _, _ in ann["objects"]]
        known = np.array([name in index for name in names], bool)
        for name in sorted({n for n in names if n not in index}):
            problems.add("unknown class name", f"{xml.name}: {name!r}")
        boxes = np.array([box for _, box, _ in ann["objects"]], np.float32).reshape(-1, 4)
        boxes, keep = checks.clean_boxes(boxes[known], height, width, xml.name, problems)
        labels = np.array([index[n] for n in names if n in index], np.int64)[keep]
        difficult = np.array([d for (n, _, d) in ann["objects"] if n in index], bool)[keep]
        yield (
            image_id,
            record(number, ann["filename"], data, height, width, boxes, labels, difficult),
        )


# ---------------------------------------------------------------- COCO JSON


def read_coco_json(path):
    path = pathlib.Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise MissingFile(f"COCO annotation file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise DamagedFile(f"COCO annotation file {path} is not valid JSON: {e}") from None
    for field in ("images", "annotations", "categories"):
        if field not in data:
            raise DamagedFile(f"COCO annotation file {path} has no {field!r} field")
    return data


def coco_categories(path):
    """(category ids sorted, their names): label k is the k-th category."""
    cats = sorted(read_coco_json(path)["categories"], key=lambda c: c["id"])
    return [c["id"] for c in cats], [c["name"] for c in cats]


def coco_examples(annotation_file, image_dir, problems, *, category_ids=None):
    """Yields (key, record) for a COCO JSON; COCO ids are kept as `image/id`."""
    data = read_coco_json(annotation_file)
    category_ids = category_ids or sorted(c["id"] for c in data["categories"])
    index = {c: i for i, c in enumerate(category_ids)}
    by_image = {}
    for ann in data["annotations"]:
        by_image.setdefault(ann.get("image_id"), []).append(ann)
    image_dir = pathlib.Path(image_dir)
    for info in data["images"]:
        name = info.get("file_name", f"<image {info.get('id')}>")
        try:
            image, encoded = checks.load_image(image_dir / name, problems)
        except checks.BadExample as e:
            problems.add(e.kind, e.detail)
            continue
        height, width = image.shape[:2]
        anns = by_image.get(info["id"], [])
        unknown = [a for a in anns if a.get("category_id") not in index]
        if unknown:
            problems.add("unknown category id", f"{name}: {unknown[0].get('category_id')}")
        anns = [a for a in anns if a.get("category_id") in index and len(a.get("bbox", ())) == 4]
        xywh = np.array([a["bbox"] for a in anns], np.float32).reshape(-1, 4)
        boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
        boxes, keep = checks.clean_boxes(boxes, height, width, name, problems)
        labels = np.array([index[a["category_id"]] for a in anns], np.int64)[keep]
        crowd = np.array([bool(a.get("iscrowd", 0)) for a in anns], bool)[keep]
        yield (
            str(info["id"]),
            record(info["id"], name, encoded, height, width, boxes, labels, crowd),
        )
