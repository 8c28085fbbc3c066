"""Where examples come from: the TFDS builder of `config.data` (a TFDS dataset by name, the
user's VOC / COCO folders, or the offline `shapes` set), prepared once into array_record files
for random access; unions of datasets, labelled-split checks and class subsets.
"""

import dataclasses
import re

import numpy as np

from frcnn_jax import canvas as canvas_lib
from frcnn_jax.data.config import check_data_config
from frcnn_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the rest of the program needs to know about a dataset."""

    class_names: tuple
    category_ids: tuple  # COCO category id of class k (1..K) at index k - 1
    num_examples: int


def get_builder(data):
    """The TFDS builder for `config.data` (`name`, `data_dir`, and the folder fields)."""

    from frcnn_jax.data import builders

    if data.name == "voc_folder":
        return builders.voc_folder(data.path, data.get("class_names") or None, data.data_dir)
    if data.name == "coco_folder":
        return builders.coco_folder(dict(data.coco_splits), data.data_dir)
    if data.name == "shapes" or data.name.startswith("shapes/"):
        _, _, config_name = data.name.partition("/")
        config = builder_config(
            builders.Shapes, config_name or "512", data.get("shapes_num_examples")
        )
        return builders.Shapes(config=config, data_dir=data.data_dir)
    return tfds_builder(data)


def tfds_builder(data):
    """TFDS's own builder of `data.name` (in `data.data_dir`), or `ConfigError` naming it."""
    import tensorflow_datasets as tfds

    try:
        return tfds.builder(data.name, data_dir=data.data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise ConfigError(f"config.data.name: unknown dataset {data.name!r}: {e}") from None


def builder_config(builder, name, num_examples):
    """`builder`'s (a synthetic set's TFDS builder class) config `name` (its name as such: a
    builder rebuilt in a loader's worker must not get a registered config's copy), or with its
    splits' sizes changed to `num_examples` ({split: count}) a config of its own."""
    configs = {c.name: c for c in builder.BUILDER_CONFIGS}
    if name not in configs:
        raise ConfigError(
            f"config.data.name: {builder.name} has configs {sorted(configs)}, not {name!r}"
        )
    if not num_examples:
        return name
    counts = {k: int(v) for k, v in dict(num_examples).items()}
    key = "-".join(f"{k}{v}" for k, v in sorted(counts.items()))
    return dataclasses.replace(configs[name], name=f"{name}-{key}", num_examples=counts)


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


class VocOneBased:
    """TFDS `voc` records tagged for `transforms.to_example`'s 1-based correction."""

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
        raise ConfigError(
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


def at_scale(data, min_size):
    """`data` (a config.data section) with images resized to short side `min_size`
    (`scaled_sizes`; image-pyramid testing, `eval.scales`)."""
    if min_size == data.min_size:
        return data
    one = data.copy_and_resolve_references()
    with one.unlocked():
        one.update(canvas_lib.scaled_sizes(data, min_size))
    return one


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


def class_subset(info, names):
    """`info` for the classes `names` only, and the label map (dataset label 1..K_all -> 1..K,
    0 for classes left out)."""
    unknown = [n for n in names if n not in info.class_names]
    if unknown or len(set(names)) != len(names):
        raise ConfigError(
            f"config.data.class_subset: {unknown or names} (need distinct names of "
            f"{list(info.class_names)})"
        )
    label_map = np.zeros(len(info.class_names) + 1, np.int64)
    for new, name in enumerate(names, start=1):
        label_map[info.class_names.index(name) + 1] = new
    ids = tuple(info.category_ids[info.class_names.index(n)] for n in names)
    return dataclasses.replace(info, class_names=names, category_ids=ids), label_map


def check_class_count(num_classes, info, data):
    """`ConfigError` naming both numbers when the model's class count (`config.model.
    num_classes`) is not the dataset's (`info`, after `data.class_subset`)."""
    found = len(info.class_names)
    if num_classes != found:
        where = (
            f"config.data.class_subset {tuple(data.class_subset)}"
            if data.class_subset
            else (f"the dataset {data.name}")
        )
        raise ConfigError(
            f"config.model.num_classes is {num_classes} but {where} has {found} classes "
            f"({', '.join(info.class_names[:8])}{' ...' if found > 8 else ''}): set "
            f"config.model.num_classes={found}"
        )


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
            raise ConfigError(f"config.data: split {split!r} of {builder.name} has no examples")
        sources.append(VocOneBased(source) if builder.name == "voc" else source)
    infos = [dataset_info(b, len(s)) for b, s in zip(builders, sources, strict=True)]
    if any(i.class_names != infos[0].class_names for i in infos):
        raise ConfigError(f"config.data.name: the datasets of {data.name!r} have different classes")
    source = sources[0] if len(sources) == 1 else _Concat(sources)
    info = dataclasses.replace(infos[0], num_examples=len(source))
    label_map = None
    if data.class_subset:
        info, label_map = class_subset(info, tuple(data.class_subset))
    return source, info, label_map
