"""Where the training step's compiled memory goes: XLA's own buffer sizes (`memory_analysis()`)
of `bench_model.py`'s frcnn_jax cases, compiled (never run) with each of frcnn_jax's CPU kernels
turned off in turn.

    python experiments/memory_breakdown.py [--models vgg16,r50_fpn] [--batches 1,2]
        [--variants auto,no_bitmask,no_winograd,no_tapwise,no_pins,xla]

Variants (`frcnn_jax.kernels`): "auto" (the default kernels), "no_bitmask" (`nn.relu`, which keeps
each pre-activation for the backward pass, instead of `activation.relu`'s bit mask),
"no_winograd" (3x3 stride-1 layers by XLA's convolution), "no_tapwise" (XLA's weight gradients
for 1x1 and 3x3 stride-2 layers), "no_pins" (no row-major layout pins), "xla"
(`model.kernels="xla"`: all of XLA's own). The middle four switch a part off inside this process
only (they patch `frcnn_jax.kernels`); they are measuring tools, not settings. Compiling takes
10-40 s per row on 2 CPU cores; the figures are the same on any machine with the same jaxlib and
backend.
"""

import argparse
import functools

from frcnn_jax.runtime import configure_runtime

configure_runtime()  # before JAX starts: the same XLA flags as the commands

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from bench_model import (  # noqa: E402
    NUM_CLASSES,
    SETUPS,
    compiled_buffers,
    jitted_training_step,
    our_model,
)

from frcnn_jax.kernels import activation, conv  # noqa: E402
from frcnn_jax.models import FasterRCNN  # noqa: E402

VARIANTS = ("auto", "no_bitmask", "no_winograd", "no_tapwise", "no_pins", "xla")


def switched_off(variant):
    """Patches `frcnn_jax.kernels` for `variant`; returns the function that undoes it."""
    saved = {name: getattr(conv, name) for name in ("_route", "_row_major")}
    saved_relu = activation.relu
    if variant in ("no_winograd", "no_tapwise"):
        skipped = variant.removeprefix("no_")

        def route(*args, **kwargs):
            chosen = saved["_route"](*args, **kwargs)
            return (None, None) if chosen[0] == skipped else chosen

        conv._route = route
    elif variant == "no_pins":
        conv._row_major = lambda x: x
    elif variant == "no_bitmask":
        activation.relu = jax.nn.relu

    def restore():
        for name, value in saved.items():
            setattr(conv, name, value)
        activation.relu = saved_relu

    return restore


def training_step_buffers(name, batch, variant):
    """The compiled buffers (GB, as `bench_model.py` reports them) of `name`'s training step
    at batch `batch` under `variant`."""
    restore = switched_off(variant)
    try:
        model = our_model(name, **({"kernels": "xla"} if variant == "xla" else {}))
        height, width = SETUPS[name]["image"]
        shape = jax.ShapeDtypeStruct
        params = jax.eval_shape(
            functools.partial(model.init, method=FasterRCNN.detect),
            jax.random.key(0),
            shape((1, 64, 64, 3), jnp.float32),
            shape((1, 2), jnp.int32),
        )
        train_step, optimizer = jitted_training_step(model)
        inputs = (
            shape((batch, height, width, 3), jnp.float32),
            shape((batch, 2), jnp.int32),
            shape((batch, 5, 4), jnp.float32),
            shape((batch, 5), jnp.int32),
        )
        lowered = train_step.lower(
            params, jax.eval_shape(optimizer.init, params["params"]), *inputs, jax.random.key(0)
        )
        return compiled_buffers(lowered.compile())
    finally:
        restore()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="vgg16,r50_fpn")
    parser.add_argument("--batches", default="1,2")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"--variants: unknown {unknown}; known: {', '.join(VARIANTS)}")
    print(f"# jax {jax.__version__} on {jax.devices()[0].platform}; compiled, never run")
    print(
        f"| model | batch | kernels | arguments GB | temporaries GB | temporaries vs {variants[0]} "
        "GB |"
    )
    print("|---|---:|---|---:|---:|---:|")
    for name in args.models.split(","):
        assert name in NUM_CLASSES, name
        for batch in (int(b) for b in args.batches.split(",")):
            first = None
            for variant in variants:
                buffers = training_step_buffers(name, batch, variant)
                first = buffers["temporaries"] if first is None else first
                print(
                    f"| {name} | {batch} | {variant} | {buffers['arguments']:.3f} | "
                    f"{buffers['temporaries']:.3f} | {buffers['temporaries'] - first:+.3f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
