"""Datasets and the input pipeline: `sources` (TFDS datasets, user folders via `builders` /
`folders`, the `shapes` synthetic set), `transforms` (per-example decoding and `preprocess` to
static shapes), `loader` (grain, canvas buckets, resume state) and `pipeline.make_batches`.

The names below load their modules on first use, so `frcnn_jax.data.preprocess` (what
`frcnn_jax.inference` needs: PIL) does not import TFDS, TensorFlow or grain."""

import importlib

_EXPORTS = {
    "Batches": "loader",
    "DatasetInfo": "sources",
    "make_batches": "pipeline",
    "check_data_config": "config",
    "data_config": "config",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'frcnn_jax.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"frcnn_jax.data.{_EXPORTS[name]}"), name)


def __dir__():
    return sorted([*globals(), *_EXPORTS])
