"""Data parallelism over every device of every host: one mesh axis, "data".

Parameters and optimizer state are replicated; each batch is split along its leading axis.
Each host loads its own shard of the global batch (`jax.process_index()` of
`jax.process_count()`), and `shard_batch` assembles the global array from the local pieces.
"""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from frcnn_jax.errors import ConfigError

DATA_AXIS = "data"


def data_mesh(devices=None):
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh):
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh):
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def local_batch_size(global_batch_size, mesh, field="config.train.batch_size"):
    """Examples this host loads per step; the global batch (the config's `field`) must split
    evenly over devices."""
    devices = mesh.devices.size
    if global_batch_size % devices:
        raise ConfigError(
            f"{field}={global_batch_size} must be a multiple of the number of devices ({devices})"
        )
    return global_batch_size // jax.process_count()


def shard_batch(batch, mesh):
    """A pytree of host-local NumPy arrays with a leading batch axis (e.g. a batch's `Inputs`)
    -> global jax.Arrays split along the batch axis."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def gather(tree):
    """Every host's rows of `tree` (concatenated in process order); one host: `tree`."""
    if jax.process_count() == 1:
        return tree
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def hosts_agree():
    """Several hosts: the loaders' agreement on which canvas the next batch uses (every host's
    bucket sizes, gathered); one host: None (local decisions)."""
    if jax.process_count() == 1:
        return None
    from jax.experimental import multihost_utils

    return lambda counts: np.asarray(multihost_utils.process_allgather(counts))


def first_host_value():
    """Several hosts: a function that gives every host the first host's value of a number
    (a decision taken from a clock must be the same on all); one host: None."""
    if jax.process_count() == 1:
        return None
    from jax.experimental import multihost_utils

    return lambda value: float(multihost_utils.broadcast_one_to_all(np.float32(value)))


def gather_batch(batch):
    """A `frcnn_jax.data.loader.Batch` of every host's examples (in global batch order), with
    this host's own as its `local`."""
    from jax.experimental import multihost_utils

    everyone = batch._replace(local=None)
    gathered = jax.tree.map(np.asarray, multihost_utils.process_allgather(everyone, tiled=True))
    return gathered._replace(local=batch)
