"""The paper's Table 5: detection time per stage, beside its K40 figures.

    python experiments/stage_times.py [--configs configs/voc07_vgg16.py,configs/voc07_zf.py]
        [--repeats 5]

For each config, one image on its canvas (600x1000 for the VOC configs, as the paper's test
scale), random weights: the shared convolutions, the proposals (RPN head, decoding, NMS 0.7,
the config's test proposal count), the region-wise part (RoI pooling, fc layers, the predictor)
and the final class-wise NMS, each jitted as its own program and fed the previous stage's
outputs; then the whole detection as one program (what `Detector` runs; XLA overlaps and fuses
across stages, so it is not the sum). Medians of `--repeats` runs after a warm-up, on
whatever device JAX sees. The paper's "region-wise" includes its NMS; compare it with our
region-wise + NMS. Class-wise NMS is timed in its worst case, every (proposal, class) candidate
above the score threshold (random weights would leave it almost nothing to do).
"""

import argparse
import functools
import pathlib
import statistics
import time

from frcnn_jax.runtime import configure_runtime

configure_runtime()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from frcnn_jax.config import config_from_file  # noqa: E402
from frcnn_jax.models import (  # noqa: E402
    FasterRCNN,
    build_model,
    roi_heads,
)

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The paper's Table 5 (K40 GPU, ms): conv, proposal, region-wise (incl. NMS), total
PAPER = {"vgg16": (141, 10, 47, 198), "zf": (31, 3, 25, 59)}


def median_ms(fn, *args, repeats):
    jax.block_until_ready(fn(*args))  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def stage_times(config, repeats):
    """{stage: ms} for one image of `config`'s canvas."""
    # Random weights score every class near 1 / (K + 1), under the 0.05 threshold, which would
    # leave the final NMS nothing to do: time its worst case instead, every (proposal, class)
    # candidate kept for class-wise NMS.
    config = config.copy_and_resolve_references()
    config.model.head.score_threshold = -1.0
    model = build_model(config)
    height, width = config.data.canvas
    images = jax.random.uniform(jax.random.key(0), (1, height, width, 3), jnp.float32, 0, 255)
    sizes = jnp.array([[height, width]], jnp.int32)
    variables = jax.jit(functools.partial(model.init, method=FasterRCNN.detect))(
        jax.random.key(1), images, sizes
    )

    def stage(method):
        return jax.jit(lambda v, *args: model.apply(v, *args, method=method))

    convs = stage(lambda m, x, s: m._features(x, s, train=False))
    proposals = stage(lambda m, f, s: m._proposals(f, f, (height, width), s, None, train=False)[0])
    region = stage(lambda m, f, boxes: m._box_predictions(f, boxes, train=False))
    head = model.head

    @jax.jit
    def nms(logits, deltas, boxes, valid):
        detect = functools.partial(
            roi_heads.detect,
            image_height=height,
            image_width=width,
            score_threshold=head.score_threshold,
            nms_threshold=head.nms_threshold,
            max_detections=head.max_detections,
            scale=1.0,
            pre_nms_top_n=None,
        )
        return jax.vmap(detect)(logits, deltas, boxes, valid)

    features, rpn_features = convs(variables, images, sizes)
    found = proposals(variables, rpn_features, sizes)
    logits, deltas = region(variables, features, found.boxes)
    whole = stage(FasterRCNN.detect)
    return {
        "convs": median_ms(convs, variables, images, sizes, repeats=repeats),
        "proposals": median_ms(proposals, variables, rpn_features, sizes, repeats=repeats),
        "region-wise": median_ms(region, variables, features, found.boxes, repeats=repeats),
        "nms": median_ms(nms, logits, deltas, found.boxes, found.valid, repeats=repeats),
        "one program": median_ms(whole, variables, images, sizes, repeats=repeats),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="configs/voc07_vgg16.py,configs/voc07_zf.py")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = jax.devices()[0]
    print(
        f"one image, random weights, {device.platform} ({device.device_kind}), "
        f"medians of {args.repeats}; the paper: K40 GPU\n"
    )
    print(
        "| config | canvas | convs ms | proposals ms | region-wise ms | NMS ms | sum ms | "
        "one program ms | paper conv / proposal / region-wise / total ms |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for path in args.configs.split(","):
        config = config_from_file(ROOT / path if not pathlib.Path(path).is_absolute() else path)
        times = stage_times(config, args.repeats)
        paper = PAPER.get(config.model.backbone)
        stages = ("convs", "proposals", "region-wise", "nms")
        total = sum(times[s] for s in stages)
        cells = " | ".join(f"{times[s]:.1f}" for s in stages)
        reference = " / ".join(str(v) for v in paper) if paper else "-"
        canvas = "x".join(str(s) for s in config.data.canvas)
        print(
            f"| {pathlib.Path(path).name} | {canvas} | {cells} | {total:.1f} | "
            f"{times['one program']:.1f} | {reference} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
