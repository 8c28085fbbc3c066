"""Datasets and the input pipeline: TFDS sources, user folders, the `shapes` synthetic set,
preprocessing to static shapes (`data.preprocess`) and a resumable grain loader."""

from frcnn_jax.data.config import check_data_config, data_config
from frcnn_jax.data.pipeline import Batches, DatasetInfo, make_batches

__all__ = ["Batches", "DatasetInfo", "check_data_config", "data_config", "make_batches"]
