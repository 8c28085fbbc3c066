"""A walkthrough of the RPN's box ops on synthetic ground truth (the README's main job for now).

    python -m frcnn_jax.demo --config configs/demo_ops.py [--config.num_gt=8 ...]

Builds the paper's anchors for a 600 x 1000 image, labels them against random ground-truth boxes,
samples 256 of them, then plays the part of a trained RPN (ground-truth deltas plus noise) to
select proposals with NMS, all in one jitted function. Replaced by training when it lands.
"""

import collections
import functools
import time

from frcnn_jax.runtime import configure_runtime

configure_runtime()  # entry point: before JAX starts (see frcnn_jax/runtime.py)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from frcnn_jax import ops  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Demo config file.", lock_config=True)


def random_ground_truth(key, config):
    """float32 [G, 4] boxes of 32-400 px inside the image and bool [G] valid (first num_gt)."""
    size_key, corner_key = jax.random.split(key)
    sides = jax.random.uniform(size_key, (config.max_gt, 2), minval=32, maxval=400)
    limit = jnp.array([config.image_width, config.image_height]) - sides
    corners = jax.random.uniform(corner_key, (config.max_gt, 2)) * limit
    valid = jnp.arange(config.max_gt) < config.num_gt
    boxes = jnp.concatenate([corners, corners + sides], axis=1)
    return jnp.where(valid[:, None], boxes, 0.0), valid


def rpn_walkthrough(key, gt_boxes, gt_valid, *, config):
    """Anchor labelling, sampling and proposal selection for one image; returns counts."""
    height, width = config.image_height, config.image_width
    base = ops.base_anchors(sizes=config.anchor_sizes, aspect_ratios=config.aspect_ratios)
    anchors = ops.anchor_grid(
        base,
        feature_height=-(-height // config.stride),
        feature_width=-(-width // config.stride),
        stride=config.stride,
    )  # [A, 4]
    inside = ops.anchors_inside(anchors, height=height, width=width)
    iou = ops.pairwise_iou(anchors, gt_boxes)  # [A, G]
    match = ops.match_boxes(
        iou,
        gt_valid,
        high_threshold=config.rpn_positive_iou,
        low_threshold=config.rpn_negative_iou,
        allow_low_quality=True,
    )
    positive = (match.labels == ops.POSITIVE) & inside
    negative = (match.labels == ops.NEGATIVE) & inside
    sample_key, noise_key, score_key = jax.random.split(key, 3)
    sample = ops.sample_balanced(
        sample_key,
        positive,
        negative,
        num_samples=config.rpn_batch_size,
        positive_fraction=config.rpn_positive_fraction,
    )
    sampled_positive = sample.valid & positive[sample.indices]

    # Stand-in for a trained RPN: regression targets plus noise, objectness from the IoU.
    deltas = ops.encode_boxes(gt_boxes[match.matched_gt], anchors)
    deltas = deltas + 0.1 * jax.random.normal(noise_key, deltas.shape)
    objectness = iou.max(axis=1, initial=0.0) + 0.05 * jax.random.normal(score_key, (len(anchors),))
    proposals = ops.clip_boxes(ops.decode_boxes(deltas, anchors), height=height, width=width)
    top_scores, top = jax.lax.top_k(objectness, min(config.pre_nms_top_n, len(anchors)))
    kept = ops.nms(
        proposals[top],
        top_scores,
        iou_threshold=config.nms_iou,
        max_output_size=config.post_nms_top_n,
    )
    best = ops.pairwise_iou(proposals[top][kept.indices], gt_boxes)  # [P, G]
    best = jnp.where(kept.valid[:, None], best, 0).max(axis=0)
    # An OrderedDict keeps its order through jit (a plain dict's keys come back sorted).
    return collections.OrderedDict(
        {
            "anchors": jnp.int32(len(anchors)),
            "anchors inside the image": inside.sum(),
            "positive anchors": positive.sum(),
            "negative anchors": negative.sum(),
            "ignored anchors": (inside & (match.labels == ops.IGNORE)).sum(),
            "sampled positives": sampled_positive.sum(),
            "sampled negatives": (sample.valid & ~sampled_positive).sum(),
            "proposals after NMS": kept.valid.sum(),
            "ground truth recalled at IoU 0.7": ((best >= 0.7) & gt_valid).sum(),
        }
    )


def run(config):
    """Runs the walkthrough, prints its counts and timings, returns the counts."""
    gt_key, run_key = jax.random.split(jax.random.key(config.seed))
    gt_boxes, gt_valid = random_ground_truth(gt_key, config)
    step = jax.jit(functools.partial(rpn_walkthrough, config=config))
    start = time.perf_counter()
    stats = jax.block_until_ready(step(run_key, gt_boxes, gt_valid))
    compile_s = time.perf_counter() - start
    times = []
    for i in range(config.repeats):
        start = time.perf_counter()
        jax.block_until_ready(step(jax.random.fold_in(run_key, i), gt_boxes, gt_valid))
        times.append(time.perf_counter() - start)
    stats = collections.OrderedDict((name, int(value)) for name, value in stats.items())
    print(
        f"RPN walkthrough, {config.image_height}x{config.image_width} image, "
        f"{config.num_gt} ground-truth boxes, on {jax.devices()[0].platform}"
    )
    for name, value in stats.items():
        print(f"  {name:<34} {value:>8}")
    print(f"  {'first call (compile + run), s':<34} {compile_s:>8.2f}")
    if times:
        print(f"  {'median run, ms':<34} {1e3 * float(np.median(times)):>8.2f}")
    return stats


def main(argv):
    del argv
    run(_CONFIG.value)


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)
