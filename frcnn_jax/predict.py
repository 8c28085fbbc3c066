"""python -m frcnn_jax.predict --workdir W --output DIR IMAGE_OR_DIR... [--checkpoint N]
    [--score_threshold S] [--batch_size B] [--canvas H,W]

Runs a trained detector (the workdir's run.json and checkpoint) on pictures: writes
DIR/detections.json (COCO-results style, one entry per detection: file, image size, class
name, category id, score and box [x, y, width, height] in the original image's pixels) and an
annotated copy of each image (DIR/<name>.jpg, detections of score >= --score_threshold).

Images are untrusted input: a file that cannot be read, is truncated, is not an image, or
declares more pixels than `frcnn_jax.data.checks.MAX_IMAGE_PIXELS` (refused from its header,
before decoding) is named in the log and skipped; the run goes on. The exit status is the
number of files skipped (at most 100), 0 when every file was processed.
"""

import json
import logging
import pathlib
import sys
import time

from absl import app, flags

from frcnn_jax import cli

FLAGS = flags.FLAGS


def define_flags():
    flags.DEFINE_string("workdir", None, "The training run's directory.")
    flags.DEFINE_integer("checkpoint", None, "Step to use (default: the latest).")
    flags.DEFINE_string("output", None, "Folder for detections.json and the annotated images.")
    flags.DEFINE_float("score_threshold", 0.5, "Draw detections at or above this score.")
    flags.DEFINE_integer("batch_size", 1, "Images per call of the detector.")
    flags.DEFINE_list("canvas", None, "H,W canvas instead of the config's (see Detector).")


log = logging.getLogger("frcnn_jax.predict")


def predict(detector, paths, output, *, score_threshold=0.5, log_every_s=10.0):
    """Detections for the image files `paths`; writes `output`/detections.json and annotated
    images. Returns (entries written, names of skipped files)."""
    from frcnn_jax.data import checks
    from frcnn_jax.inference import draw

    output = pathlib.Path(output)
    output.mkdir(parents=True, exist_ok=True)
    entries, skipped, used = [], [], set()
    start = last = time.perf_counter()
    step = max(detector.batch_size, 1)
    for first in range(0, len(paths), step):
        loaded = []
        for path in paths[first : first + step]:
            try:
                loaded.append((path, checks.load_image(path)[0]))
            except checks.BadExample as e:
                log.warning("skipped %s: %s", path, e)
                skipped.append(str(path))
        found = detector([image for _, image in loaded]) if loaded else []
        for (path, image), result in zip(loaded, found, strict=True):
            entries += _entries(path, image.shape, result)
            name = _unique(pathlib.Path(path).stem, used)
            draw(image, result, score_threshold=score_threshold).save(output / f"{name}.jpg")
        now, done = time.perf_counter(), min(first + step, len(paths))
        if now - last >= log_every_s or done == len(paths):
            rate = done / (now - start)
            log.info(
                "%d/%d images, %.2f images/s, ETA %.0f s",
                done,
                len(paths),
                rate,
                (len(paths) - done) / max(rate, 1e-9),
            )
            last = now
    (output / "detections.json").write_text(json.dumps(entries, indent=1))
    return entries, skipped


def _entries(path, shape, found):
    """COCO-results-style rows (box as [x, y, width, height]) of one image's detections."""
    rows = []
    for box, score, cls, name in zip(
        found["boxes"], found["scores"], found["classes"], found["class_names"], strict=True
    ):
        x1, y1, x2, y2 = (float(v) for v in box)
        rows.append(
            {
                "file": str(path),
                "image_size": [int(shape[0]), int(shape[1])],
                "class_name": str(name),
                "category_id": int(cls),
                "score": round(float(score), 5),
                "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
            }
        )
    return rows


def _unique(stem, used):
    name, n = stem, 1
    while name in used:
        n += 1
        name = f"{stem}_{n}"
    used.add(name)
    return name


def main(argv):
    paths = argv[1:]
    if not FLAGS.workdir or not FLAGS.output or not paths:
        raise app.UsageError("need --workdir, --output and at least one image or folder")
    cli.start()  # CPU tuning before JAX starts, logging
    from frcnn_jax.inference import Detector, find_images

    files = find_images(paths)
    if not files:
        raise app.UsageError(f"no images found in {paths}")
    detector = Detector.from_workdir(
        FLAGS.workdir,
        checkpoint=FLAGS.checkpoint,
        batch_size=FLAGS.batch_size,
        canvas=cli.canvas(FLAGS.canvas),
    )
    log.info("%s, step %d: %d images", FLAGS.workdir, detector.step, len(files))
    entries, skipped = predict(detector, files, FLAGS.output, score_threshold=FLAGS.score_threshold)
    print(
        f"{len(files) - len(skipped)} images, {len(entries)} detections -> "
        f"{pathlib.Path(FLAGS.output) / 'detections.json'}; {len(skipped)} skipped"
        + (f": {', '.join(skipped)}" if skipped else ""),
        flush=True,
    )
    sys.exit(min(len(skipped), 100))


if __name__ == "__main__":
    define_flags()
    cli.run(main)
