"""python -m frcnn_jax.export --workdir W --output model.jaxexport [--checkpoint N]
    [--canvas H,W] [--batch_size B] [--platforms cpu,cuda,tpu]

Serializes a trained detector (the workdir's config, classes and checkpoint) with its weights
via `jax.export` (StableHLO) into one file that `frcnn_jax.exported.load` runs with only jax
and numpy. One function per canvas: the config's canvas (or --canvas) and, with
`data.orient_canvas`, its transpose. Traced with `model.kernels="xla"` (XLA's own convolutions:
the CPU kernels' layout pins are CPU-only custom calls), so the exported model is portable and
somewhat slower on a CPU; the file's metadata names the kernels it traced.
"""

import json

import numpy as np
from absl import app, flags

from frcnn_jax import cli, npz

FLAGS = flags.FLAGS
EXPORT_KERNELS = "xla"  # portable: see the module docstring


def define_flags():
    flags.DEFINE_string("workdir", None, "The training run's directory.")
    flags.DEFINE_string("output", None, "File to write (e.g. model.jaxexport).")
    flags.DEFINE_integer("checkpoint", None, "Step to export (default: the latest).")
    flags.DEFINE_list("canvas", None, "H,W canvas instead of the config's.")
    flags.DEFINE_integer("batch_size", 1, "Images per call of the exported function.")
    flags.DEFINE_list("platforms", ["cpu", "cuda", "tpu"], "Platforms to lower for.")


def export_detector(detector, path, *, batch_size=1, platforms=("cpu",)):
    """Write `detector` (a `frcnn_jax.inference.Detector`, with its canvas) to `path`; returns
    the metadata."""
    import jax
    import jax.numpy as jnp
    from jax import export

    from frcnn_jax import canvas as canvas_lib
    from frcnn_jax.exported import FORMAT
    from frcnn_jax.models import FasterRCNN, with_kernels

    canvas = detector.canvas
    variables = detector.variables
    model = with_kernels(detector.model, EXPORT_KERNELS)

    def infer(images, sizes, scales):
        out = model.apply(variables, images, sizes, scales, method=FasterRCNN.detect)
        return out.boxes, out.scores, out.classes, out.valid

    blobs = {}
    canvases = canvas_lib.canvases(canvas, orient=detector.orient)
    for index, (height, width) in enumerate(canvases):
        exported = export.export(jax.jit(infer), platforms=tuple(platforms))(
            jax.ShapeDtypeStruct((batch_size, height, width, 3), jnp.float32),
            jax.ShapeDtypeStruct((batch_size, 2), jnp.int32),
            jax.ShapeDtypeStruct((batch_size,), jnp.float32),
        )
        blobs[f"canvas_{index}"] = np.frombuffer(exported.serialize(), np.uint8)
    meta = {
        "format": FORMAT,
        "class_names": list(detector.class_names),
        "canvas": list(canvas),
        "canvases": [list(c) for c in canvases],
        "orient": detector.orient,
        "min_size": detector.resize["min_size"],
        "max_size": detector.resize["max_size"],
        "batch_size": batch_size,
        "platforms": list(platforms),
        "kernels": EXPORT_KERNELS,
    }
    with open(path, "wb") as f:
        npz.save(f, {"meta": np.array(json.dumps(meta)), **blobs})
    return meta


def main(argv):
    del argv
    if not FLAGS.workdir or not FLAGS.output:
        raise app.UsageError("need --workdir and --output")
    from frcnn_jax.inference import Detector

    cli.start()  # CPU tuning before JAX starts, logging
    detector = Detector.from_workdir(
        FLAGS.workdir, checkpoint=FLAGS.checkpoint, canvas=cli.canvas(FLAGS.canvas)
    )
    meta = export_detector(
        detector, FLAGS.output, batch_size=FLAGS.batch_size, platforms=FLAGS.platforms
    )
    platforms = ", ".join(meta["platforms"])
    print(
        f"exported step {detector.step} of {FLAGS.workdir} for {platforms} (canvases "
        f"{meta['canvases']}, batch {FLAGS.batch_size}) -> {FLAGS.output}"
    )


if __name__ == "__main__":
    define_flags()
    cli.run(main)
