"""From `config.data` to batches: `make_batches` opens the split (`sources`) and starts the
loader (`loader.Batches`) with the per-example transforms (`transforms`)."""

from frcnn_jax.data.loader import Batches
from frcnn_jax.data.sources import open_split


def make_batches(
    data,
    split,
    *,
    batch_size,
    train,
    seed=0,
    shard_index=0,
    shard_count=1,
    worker_count=None,
    agree=None,
):
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
