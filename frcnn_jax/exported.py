"""A detector exported by `python -m frcnn_jax.export`, run with only `jax` and `numpy`.

    from frcnn_jax.exported import load
    detector = load("model.jaxexport")
    result = detector(image)  # uint8 [H, W, 3] -> boxes, scores, classes, class_names

The file holds, per canvas (landscape and portrait), the detector's inference function with its
weights serialized with `jax.export` (StableHLO, for the platforms it was exported for: CPU,
and CUDA/TPU where requested), plus the class names and the resize rule, and the checksum that
`load` verifies (`frcnn_jax.npz`: a damaged file is a `DamagedFile` error naming it). Nothing of
flax, TFDS, TensorFlow or PIL is imported: this module, `frcnn_jax.canvas`, `frcnn_jax.npz` and
`frcnn_jax.errors` are all it needs, so the four files can be copied into another project.
Images are resized with `jax.image.resize` (bilinear, antialiased), which differs from
training's PIL resize by rounding; `detect_canvas` runs the model on an already prepared
canvas exactly.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
from jax import export

from frcnn_jax import npz
from frcnn_jax.canvas import canvas_for, resize_scale, resized_size
from frcnn_jax.errors import DamagedFile

FORMAT = "frcnn_jax exported detector 2"  # 2: with a checksum (frcnn_jax.npz)


class ExportedDetector:
    def __init__(self, path):
        arrays = npz.load(path, "exported detector")
        meta = json.loads(str(arrays["meta"])) if "meta" in arrays else {}
        if meta.get("format") != FORMAT:
            raise DamagedFile(f"exported detector {path}: not a {FORMAT!r} file")
        self.functions = {
            tuple(canvas): export.deserialize(bytearray(arrays[f"canvas_{i}"].tobytes()))
            for i, canvas in enumerate(meta["canvases"])
        }
        self.meta = meta
        self.class_names = tuple(meta["class_names"])
        self.batch_size = int(meta["batch_size"])

    def detect_canvas(self, canvases, sizes, scales):
        """The model on prepared canvases: float32 [B, H, W, 3] (0-255 RGB), int32 [B, 2]
        resized (h, w), float32 [B] scales -> (boxes [B, D, 4] in original pixels, scores,
        classes, valid)."""
        function = self.functions[tuple(canvases.shape[1:3])]
        return function.call(
            jnp.asarray(canvases, jnp.float32),
            jnp.asarray(sizes, jnp.int32),
            jnp.asarray(scales, jnp.float32),
        )

    def prepare(self, image):
        """uint8 [H, W, 3] -> (canvas float32 [H', W', 3], (h, w), scale)."""
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
            raise ValueError(f"images must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
        height, width = image.shape[:2]
        canvas = canvas_for(height, width, self.meta["canvas"], orient=self.meta["orient"])
        scale = resize_scale(
            height,
            width,
            min_size=self.meta["min_size"],
            max_size=self.meta["max_size"],
            canvas=canvas,
        )
        new_h, new_w = resized_size(height, width, scale)
        resized = jax.image.resize(jnp.asarray(image, jnp.float32), (new_h, new_w, 3), "linear")
        out = np.zeros((*canvas, 3), np.float32)
        out[:new_h, :new_w] = np.clip(np.asarray(resized), 0, 255)
        return out, (new_h, new_w), np.float32(scale)

    def __call__(self, image):
        """Detections of one uint8 [H, W, 3] image: NumPy boxes [N, 4] (original pixels),
        scores [N], classes [N] (1..K), class_names [N]."""
        canvas, size, scale = self.prepare(image)
        rows = self.batch_size  # the exported functions' batch: repeat the image
        boxes, scores, classes, valid = (
            np.asarray(x)[0]
            for x in self.detect_canvas(
                np.stack([canvas] * rows), np.array([size] * rows), np.array([scale] * rows)
            )
        )
        classes = classes[valid].astype(np.int64)
        return {
            "boxes": boxes[valid],
            "scores": scores[valid],
            "classes": classes,
            "class_names": np.array([self.class_names[c - 1] for c in classes], dtype=object),
        }


def load(path):
    """The `ExportedDetector` saved at `path`."""
    return ExportedDetector(path)
