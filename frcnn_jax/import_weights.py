"""python -m frcnn_jax.import_weights --arch ARCH --input FILE.pth --output FILE.npz

Converts a torchvision weight file into frcnn_jax's `.npz` for `--config.model.init_checkpoint`
(see `frcnn_jax.weights` for every layout change). ARCH: vgg16, resnet50, resnet101 (ImageNet
classification models; `--body c4` or `fpn` picks the detector they initialise) or
fasterrcnn_resnet50_fpn (a whole COCO detector; `--coco80` keeps the 80 used categories).

The file is read with `torch.load(..., weights_only=True)`: a weight file never runs code (a
pickle that would is refused). torch is needed only here (`pip install torch`).
"""

import sys
import time

from absl import app, flags

from frcnn_jax import cli, weights
from frcnn_jax.errors import MissingFile, UserError

FLAGS = flags.FLAGS


def define_flags():
    flags.DEFINE_enum("arch", None, list(weights.ARCHS), "What the file holds.")
    flags.DEFINE_string("input", None, "torchvision weight file (.pth: a state dict).")
    flags.DEFINE_string("output", None, "frcnn_jax weight file to write (.npz).")
    flags.DEFINE_enum("body", "c4", ["c4", "fpn"], "ResNets: C4 (resnet*_c4) or FPN (resnet*_fpn).")
    flags.DEFINE_bool("coco80", False, "Detector: keep background + the 80 used COCO categories.")


def read_state_dict(path):
    """A state dict from a torchvision file, without running code from it."""
    try:
        import torch
    except ImportError:
        raise UserError("import_weights needs torch: pip install torch") from None
    import pickle

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise MissingFile(f"--input: no such file {path}") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"--input {path}: not a plain weight file, refused (weights_only=True): {first}"
        ) from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # training checkpoints that wrap the state dict
    if not isinstance(state, dict) or not all(hasattr(v, "shape") for v in state.values()):
        raise UserError(f"--input {path}: expected a state dict (name -> tensor)")
    return state


def main(argv):
    del argv
    for name in ("arch", "input", "output"):
        if not getattr(FLAGS, name):
            raise app.UsageError(f"--{name} is required")
    start = time.perf_counter()
    state = read_state_dict(FLAGS.input)
    report = []
    try:
        flat, covers = weights.from_torchvision(
            state, arch=FLAGS.arch, body=FLAGS.body, coco80=FLAGS.coco80, report=report
        )
    except (KeyError, ValueError) as e:
        raise UserError(f"--input {FLAGS.input} as --arch {FLAGS.arch}: {e}") from None
    weights.save(FLAGS.output, flat, covers)
    width = max(len(name) for name, *_ in report)
    for name, shape, path, new_shape in report:
        print(f"{name:<{width}}  {tuple(shape)!s:<20} -> {path} {tuple(new_shape)}")
    print(
        f"converted {len(report)} tensors ({sum(v.size for v in flat.values()):,} values) in "
        f"{time.perf_counter() - start:.1f} s -> {FLAGS.output}; covers {', '.join(covers)}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    define_flags()
    cli.run(main, tune_cpu=False)  # torch reads the file; no JAX computation
