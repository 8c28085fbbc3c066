"""Running a trained detector on pictures: `Detector` and `draw`.

    detector = Detector.from_workdir("runs/shapes_tiny")  # config, classes, latest weights
    results = detector([image])  # uint8 [H, W, 3] arrays of any size
    draw(image, results[0]).save("out.jpg")

Each image is resized as in training (short side `data.min_size`, long side at most
`data.max_size`) onto the canvas of its orientation (`frcnn_jax.canvas.canvas_for`:
the configured canvas or, for the other orientation, its transpose), so portrait and landscape
images both keep the training scale; images of one canvas are batched together and each
(canvas, batch size) compiles once. Boxes come back in the original image's pixels.
"""

import colorsys
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from frcnn_jax import checkpointing, rundir
from frcnn_jax.data import preprocess
from frcnn_jax.errors import MissingFile
from frcnn_jax.models import FasterRCNN, build_model


class Detector:
    """A trained detector as a function from images to detections.

    Args:
      model: a `FasterRCNN` (e.g. `build_model(config)`); variables: its {"params", ...}.
      class_names: names of classes 1..K. data: the config's `data` section (min_size,
        max_size, canvas, orient_canvas). batch_size: images per compiled call.
      canvas: (H, W) instead of `data.canvas`, e.g. smaller for pictures of a known size
        (VOC's 500x375 at min_size 600 fit (608, 800): 19% fewer pixels than (600, 1000));
        an image whose resized size does not fit it is scaled down to fit, as in training.
    """

    def __init__(self, model, variables, *, class_names, data, batch_size=1, canvas=None):
        if len(class_names) != model.num_classes:
            raise ValueError(
                f"{len(class_names)} class names for a model of {model.num_classes} classes"
            )
        self.model = model
        self.variables = jax.device_put(variables)
        self.class_names = tuple(class_names)
        self.resize = dict(min_size=data.min_size, max_size=data.max_size)
        self.canvas = tuple(int(v) for v in (canvas or data.canvas))
        self.orient = bool(data.get("orient_canvas", True))
        self.batch_size = int(batch_size)
        self.traces = 0  # compilations so far (one per canvas and batch size)
        self._detect = jax.jit(self._apply)

    @classmethod
    def from_config(cls, config, variables, *, class_names, batch_size=1, canvas=None):
        """From a config (`model` and `data` sections) and variables ({"params", ...})."""
        return cls(
            build_model(config),
            variables,
            class_names=class_names,
            data=config.data,
            batch_size=batch_size,
            canvas=canvas,
        )

    @classmethod
    def from_workdir(cls, workdir, *, checkpoint=None, batch_size=1, canvas=None):
        """From a training directory: its run.json (config, class names) and the parameters
        of checkpoint `checkpoint` (the latest if None); the optimizer state is not read."""
        config, class_names, _ = rundir.read(workdir)
        checkpoints = checkpointing.Checkpoints(workdir)
        step = checkpoints.latest_step() if checkpoint is None else checkpoint
        if step is None:
            raise MissingFile(f"no checkpoints in {checkpoints.directory}")
        detector = cls.from_config(
            config,
            checkpoints.restore_variables(step),
            class_names=class_names,
            batch_size=batch_size,
            canvas=canvas,
        )
        detector.step = step
        return detector

    def _apply(self, variables, images, sizes, scales):
        self.traces += 1  # runs only while tracing
        return self.model.apply(variables, images, sizes, scales, method=FasterRCNN.detect)

    def prepare(self, image):
        """One image on its canvas: (canvas uint8 [H, W, 3], resized (h, w), scale)."""
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8 or not image.size:
            raise ValueError(f"images must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
        out, _ = preprocess.preprocess(
            image,
            np.zeros((0, 4)),
            np.zeros(0, np.int64),
            np.zeros(0, bool),
            canvas=self.canvas,
            orient=self.orient,
            max_boxes=1,
            **self.resize,
        )
        return out["image"], out["image_size"], out["scale"]

    def __call__(self, images):
        """Detections for one uint8 [H, W, 3] image or a list of them (any sizes).

        Returns a list with one dict per image (a dict for a single image): NumPy `boxes`
        float32 [N, 4] (x1, y1, x2, y2) in the original image's pixels, `scores` [N],
        `classes` int [N] in 1..K and `class_names` [N], the valid detections only, best first.
        """
        single = isinstance(images, np.ndarray) and images.ndim == 3
        images = [images] if single else list(images)
        prepared = [self.prepare(image) for image in images]
        results = [None] * len(images)
        groups = {}
        for index, (canvas, _, _) in enumerate(prepared):
            groups.setdefault(canvas.shape[:2], []).append(index)
        for indices in groups.values():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                rows = chunk + [chunk[0]] * (self.batch_size - len(chunk))  # pad: repeat one
                canvases = jnp.asarray(np.stack([prepared[i][0] for i in rows]), jnp.float32)
                sizes = jnp.asarray(np.stack([prepared[i][1] for i in rows]))
                scales = jnp.asarray(np.stack([prepared[i][2] for i in rows]))
                detections = jax.device_get(self._detect(self.variables, canvases, sizes, scales))
                for row, index in enumerate(chunk):
                    results[index] = self._one(detections, row, images[index].shape)
        return results[0] if single else results

    def _one(self, detections, row, shape):
        valid = np.asarray(detections.valid[row])
        boxes = np.asarray(detections.boxes[row])[valid]
        boxes = np.clip(boxes, 0, [shape[1], shape[0], shape[1], shape[0]]).astype(np.float32)
        classes = np.asarray(detections.classes[row])[valid].astype(np.int64)
        return {
            "boxes": boxes,
            "scores": np.asarray(detections.scores[row])[valid].astype(np.float32),
            "classes": classes,
            "class_names": np.array([self.class_names[c - 1] for c in classes], dtype=object),
        }


def colour(index):
    """A distinct, saturated RGB colour for class `index` (golden-angle hues)."""
    red, green, blue = colorsys.hsv_to_rgb((index * 0.618034) % 1.0, 0.85, 0.95)
    return int(255 * red), int(255 * green), int(255 * blue)


def draw(image, detections, *, score_threshold=0.5):
    """`image` (uint8 [H, W, 3] or PIL) with the detections of score >= `score_threshold`
    drawn: a box per detection in its class's colour and a "name 0.93" label on a filled tag."""
    picture = Image.fromarray(np.asarray(image)).convert("RGB")
    canvas = ImageDraw.Draw(picture)
    width = max(2, round(max(picture.size) / 300))
    font = _font(max(12, round(max(picture.size) / 50)))
    keep = np.asarray(detections["scores"]) >= score_threshold
    order = np.argsort(np.asarray(detections["scores"])[keep])  # best drawn last, on top
    boxes = np.asarray(detections["boxes"])[keep][order]
    scores = np.asarray(detections["scores"])[keep][order]
    classes = np.asarray(detections["classes"])[keep][order]
    names = np.asarray(detections["class_names"])[keep][order]
    for box, score, cls, name in zip(boxes, scores, classes, names, strict=True):
        x1, y1, x2, y2 = (float(v) for v in box)
        fill = colour(int(cls))
        canvas.rectangle((x1, y1, x2, y2), outline=fill, width=width)
        text = f"{name} {score:.2f}"
        left, top, right, bottom = canvas.textbbox((0, 0), text, font=font)
        tag_h = bottom - top + 2 * width
        ty = y1 - tag_h if y1 - tag_h >= 0 else y1
        canvas.rectangle((x1, ty, x1 + right - left + 2 * width, ty + tag_h), fill=fill)
        dark = sum(fill) > 380  # dark text on light colours
        canvas.text(
            (x1 + width, ty + width - top),
            text,
            fill=(0, 0, 0) if dark else (255, 255, 255),
            font=font,
        )
    return picture


def _font(size):
    for name in ("DejaVuSans.ttf", "Arial.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    try:
        return ImageFont.load_default(size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def find_images(paths):
    """The image files named by `paths` (files, or folders searched for common extensions),
    sorted; a folder's non-image files are ignored, a named file is always tried."""
    extensions = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
    found = []
    for path in map(pathlib.Path, paths):
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.suffix.lower() in extensions)
        else:
            found.append(path)
    return found
