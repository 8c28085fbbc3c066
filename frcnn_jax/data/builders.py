"""TFDS builders: the `shapes` synthetic set and user folders (VOC layout, COCO JSON), and the
`shapes_classes` classification set for pretraining.

The detection builders store the same features as TFDS's `voc` (image, image/id,
image/filename, objects with bbox/label/is_difficult), in array_record files, so every source is
read the same way through `tfds.data_source`. Preparing needs tensorflow(-cpu) (TFDS's
writer); reading does not decode with TensorFlow.
"""

import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import logging
import multiprocessing
import os
import pathlib

import numpy as np
import tensorflow_datasets as tfds

from frcnn_jax.data import checks, folders, shapes, shapes_classes
from frcnn_jax.errors import ConfigError, MissingFile, UserError

log = logging.getLogger(__name__)


def _features(class_names):
    return tfds.features.FeaturesDict(
        {
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
            "image/id": np.int64,
            "image/filename": tfds.features.Text(),
            "objects": tfds.features.Sequence(
                {
                    "bbox": tfds.features.BBoxFeature(),
                    "label": tfds.features.ClassLabel(names=list(class_names)),
                    "is_difficult": np.bool_,
                }
            ),
        }
    )


def _log_problems(name, split, kept, problems):
    log.info("%s %s: %d examples; problems: %s", name, split, kept, problems.summary())
    if kept == 0:
        raise UserError(
            f"{name}: split {split!r} has no valid examples (problems: {problems.summary()})"
        )


# ---------------------------------------------------------------- shapes


@dataclasses.dataclass(kw_only=True)
class ShapesConfig(tfds.core.BuilderConfig):
    image_size: tuple = (512, 512)
    min_side: float = shapes.MIN_SIDE
    max_side: float = shapes.MAX_SIDE
    seed: int = 0
    num_examples: dict = dataclasses.field(
        default_factory=lambda: {"train": 8000, "validation": 500, "test": 1000}
    )


class Shapes(tfds.core.GeneratorBasedBuilder):
    """Procedural shapes (see `frcnn_jax.data.shapes`); nothing is downloaded."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First version."}  # noqa: RUF012
    BUILDER_CONFIGS = [  # noqa: RUF012
        ShapesConfig(name="512", description="512x512 images, objects 16-300 px."),
        ShapesConfig(
            name="320",
            description="320x320 images, objects 12-160 px.",
            image_size=(320, 320),
            min_side=12.0,
            max_side=160.0,
        ),
    ]

    def _info(self):
        return self.dataset_info_from_configs(
            features=_features(shapes.CLASS_NAMES), supervised_keys=None
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {split: self._generate_examples(split) for split in self.builder_config.num_examples}

    def _generate_examples(self, split):
        c = self.builder_config
        render = functools.partial(
            _shapes_record, c.seed, split, tuple(c.image_size), c.min_side, c.max_side
        )
        yield from _rendered(render, c.num_examples[split])


def _rendered(render, num_examples):
    """(index, record) for index in range(num_examples), `render(index)` run over the cores:
    rendering is pure NumPy/PIL (spawned workers never import TensorFlow) and results come back
    in order, so the bytes do not depend on the pool."""
    context = multiprocessing.get_context("spawn")
    workers = min(os.cpu_count() or 1, 8)
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        yield from enumerate(pool.map(render, range(num_examples), chunksize=32))


def _shapes_record(seed, split, image_size, min_side, max_side, index):
    ex = shapes.render(
        seed, split, index, image_size=image_size, min_side=min_side, max_side=max_side
    )
    return folders.record(
        index,
        f"{split}_{index:06d}",
        checks.encode_jpeg(ex["image"]),
        *image_size,
        ex["boxes"],
        ex["labels"],
        ex["difficult"],
    )


@dataclasses.dataclass(kw_only=True)
class ShapesClassesConfig(tfds.core.BuilderConfig):
    image_size: int = 64
    seed: int = 0
    num_examples: dict = dataclasses.field(
        default_factory=lambda: {"train": 50000, "validation": 5000}
    )


class ShapesClasses(tfds.core.GeneratorBasedBuilder):
    """Procedural shape crops and scenes for classification (see
    `frcnn_jax.data.shapes_classes`): features `image` and `label`, like TFDS's ImageNet."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First version."}  # noqa: RUF012
    BUILDER_CONFIGS = [  # noqa: RUF012
        ShapesClassesConfig(name="64", description="64x64 images, 16 classes."),
    ]

    def _info(self):
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
                    "label": tfds.features.ClassLabel(names=list(shapes_classes.CLASS_NAMES)),
                }
            ),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {split: self._generate_examples(split) for split in self.builder_config.num_examples}

    def _generate_examples(self, split):
        c = self.builder_config
        render = functools.partial(_shapes_classes_record, c.seed, split, c.image_size)
        yield from _rendered(render, c.num_examples[split])


def _shapes_classes_record(seed, split, size, index):
    return shapes_classes.render(seed, split, index, size=size)


# ---------------------------------------------------------------- user folders


def _folder_key(*parts):
    return hashlib.sha1(json.dumps(parts, default=str).encode()).hexdigest()[:10]


@dataclasses.dataclass(kw_only=True)
class VocFolderConfig(tfds.core.BuilderConfig):
    root: str = ""
    class_names: tuple = ()


class VocFolder(tfds.core.GeneratorBasedBuilder):
    """A folder in VOC layout: Annotations/*.xml, JPEGImages/, ImageSets/Main/<split>.txt."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First version."}  # noqa: RUF012

    def _info(self):
        return self.dataset_info_from_configs(features=_features(self.builder_config.class_names))

    def _split_generators(self, dl_manager):
        del dl_manager
        root = self.builder_config.root
        return {split: self._generate_examples(split) for split in folders.voc_splits(root)}

    def _generate_examples(self, split):
        problems = checks.Problems()
        kept = 0
        c = self.builder_config
        for key, example in folders.voc_examples(c.root, split, c.class_names, problems):
            kept += 1
            yield key, example
        _log_problems(f"VOC folder {c.root}", split, kept, problems)


def voc_folder(root, class_names=None, data_dir=None):
    """The builder for a VOC-layout folder; class names read from its annotations if None."""
    root = pathlib.Path(root).expanduser().resolve()
    if not (root / "Annotations").is_dir() or not folders.voc_splits(root):
        raise MissingFile(
            f"config.data.path: {root} is not a VOC-layout folder: it needs Annotations/, "
            "JPEGImages/ and ImageSets/Main/<split>.txt"
        )
    names = tuple(class_names) if class_names else tuple(folders.voc_class_names(root))
    if not names:
        raise UserError(f"VOC folder {root}: no class names in its annotations")
    config = VocFolderConfig(name=_folder_key(str(root), names), root=str(root), class_names=names)
    return VocFolder(config=config, data_dir=data_dir)


@dataclasses.dataclass(kw_only=True)
class CocoFolderConfig(tfds.core.BuilderConfig):
    splits: dict = dataclasses.field(default_factory=dict)  # split -> (annotation json, images)
    category_ids: tuple = ()
    class_names: tuple = ()


class CocoFolder(tfds.core.GeneratorBasedBuilder):
    """COCO annotation JSON files with their image folders, one pair per split."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First version."}  # noqa: RUF012

    def _info(self):
        return self.dataset_info_from_configs(
            features=_features(self.builder_config.class_names),
            metadata=tfds.core.MetadataDict(category_ids=list(self.builder_config.category_ids)),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {split: self._generate_examples(split) for split in self.builder_config.splits}

    def _generate_examples(self, split):
        c = self.builder_config
        annotation_file, image_dir = c.splits[split]
        problems = checks.Problems()
        kept = 0
        for key, example in folders.coco_examples(
            annotation_file, image_dir, problems, category_ids=list(c.category_ids)
        ):
            kept += 1
            yield key, example
        _log_problems(f"COCO {annotation_file}", split, kept, problems)


def coco_folder(splits, data_dir=None):
    """The builder for COCO JSON files: `splits` maps a split name to (json path, image dir).
    Categories come from the first split's JSON; label k is the k-th category by id."""
    splits = {
        name: (str(pathlib.Path(a).expanduser().resolve()), str(pathlib.Path(i).expanduser()))
        for name, (a, i) in splits.items()
    }
    if not splits:
        raise ConfigError(
            "config.data.coco_splits: coco_folder needs a split: {name: (json, image_dir)}"
        )
    ids, names = folders.coco_categories(next(iter(splits.values()))[0])
    config = CocoFolderConfig(
        name=_folder_key(splits, ids),
        splits=splits,
        category_ids=tuple(ids),
        class_names=tuple(names),
    )
    return CocoFolder(config=config, data_dir=data_dir)
