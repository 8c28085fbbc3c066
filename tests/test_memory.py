"""A memory regression guard that times nothing: the compiled training step of the offline
configs (what `python -m frcnn_jax.train` runs, on one device) keeps its own buffers under
recorded bounds. XLA's `memory_analysis()` of the compiled program is exact and the same from
run to run on a given jaxlib and backend, unlike a process's resident memory.

A change that needs more (a new loss term, a bigger default) raises the bound here on purpose,
with the measured figure; a change that needs less lowers it.
"""

import functools

import jax
import jax.numpy as jnp
import pytest

from frcnn_jax import sharding, training
from frcnn_jax.config import config_from_file
from frcnn_jax.data.loader import Inputs
from frcnn_jax.models import FasterRCNN, build_model
from tests.tiny import ROOT

MIB = 2**20
# MiB, measured with jaxlib 0.10.2 on the CPU (2026-12-03), about 5% above the measurement;
# bounds for other versions and backends are not recorded (the test is skipped there)
BOUNDS = {
    "shapes_tiny.py": {"temporaries": 92, "arguments": 19.5},  # measured 87.4, 18.2
    "shapes_512.py": {"temporaries": 204, "arguments": 21.5},  # measured 193.5, 20.1
}
MEASURED_ON = ("cpu", "0.10.")


def compiled_training_step(config):
    """The config's training step, compiled for one device for its initial state and a batch of
    its shapes."""
    model = build_model(config)
    height, width = config.data.canvas
    variables = jax.eval_shape(  # the initial state's shapes: nothing initialized or run
        functools.partial(model.init, method=FasterRCNN.detect),
        jax.random.key(0),
        jax.ShapeDtypeStruct((1, height, width, 3), jnp.float32),
        jax.ShapeDtypeStruct((1, 2), jnp.int32),
    )
    optimizer = []

    def start(variables):
        state, tx = training.initial.start_state(config.train, model, variables)
        optimizer.append(tx)
        return state

    state = jax.eval_shape(start, variables)
    tx = optimizer[0]
    mesh = sharding.data_mesh(jax.devices()[:1])
    batch, slots = config.train.batch_size, config.data.max_boxes
    shape = jax.ShapeDtypeStruct
    inputs = Inputs(
        image=shape((batch, height, width, 3), jnp.uint8),
        image_size=shape((batch, 2), jnp.int32),
        scale=shape((batch,), jnp.float32),
        gt_boxes=shape((batch, slots, 4), jnp.float32),
        gt_classes=shape((batch, slots), jnp.int32),
        gt_valid=shape((batch, slots), bool),
        gt_difficult=shape((batch, slots), bool),
        valid=shape((batch,), bool),
    )
    step = training.step.jit_train_step(model, tx, mesh)
    return step.lower(state, inputs, jax.random.key(0), None).compile()


@pytest.mark.parametrize("name", sorted(BOUNDS))
def test_the_training_steps_own_buffers_stay_under_their_bounds(name):
    if (jax.default_backend(), jax.__version__[:5]) != MEASURED_ON:
        pytest.skip(f"bounds recorded for jax {MEASURED_ON[1]}x on {MEASURED_ON[0]} only")
    analysis = compiled_training_step(config_from_file(ROOT / "configs" / name)).memory_analysis()
    measured = {
        "temporaries": analysis.temp_size_in_bytes,
        "arguments": analysis.argument_size_in_bytes,
    }
    print(name, {k: f"{v / MIB:.1f} MiB" for k, v in measured.items()})
    over = [
        f"{kind}: {measured[kind]:,} bytes ({measured[kind] / MIB:.1f} MiB) > the allowed "
        f"{int(bound * MIB):,} bytes ({bound} MiB)"
        for kind, bound in BOUNDS[name].items()
        if measured[kind] > bound * MIB
    ]
    assert not over, f"{name}'s compiled training step: " + "; ".join(over)
