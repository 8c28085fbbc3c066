"""Box-op timings beside torchvision's, measured in the same run on the same inputs.

    python experiments/bench_ops.py [--repeats 30] [--only nms,roi]

Prints one row per case: frcnn_jax's median time (jitted, after compilation), torchvision's median
time, their ratio (lower is better for us), frcnn_jax's compile time, and whether both kept the
same result (RoI ops: the same as torchvision's CPU kernel, also when torchvision runs on a GPU).
Timings are wall-clock medians on this machine; rerun both sides together when comparing
machines. With a GPU, torchvision runs on it too. Without `--only`, the table is also written to
`experiments/results_ops.md` with its provenance and the README's summary line.
"""

import argparse
import functools
import pathlib
import time
from collections import OrderedDict

from frcnn_jax.runtime import configure_runtime, describe_runtime

configure_runtime()  # before JAX starts, as in training: see frcnn_jax/runtime.py

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import result_rows  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402
from torch_timing import TORCH_DEVICE, median_s, tensor  # noqa: E402
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler  # noqa: E402

from frcnn_jax import ops  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]


def median_ms(fn, repeats):
    return 1e3 * median_s(fn, repeats)


def compile_s(fn, *args):
    """Trace + compile time of `fn` on a fresh `jax.jit` (nothing cached from earlier calls)."""
    start = time.perf_counter()
    jax.jit(fn).lower(*args).compile()
    return time.perf_counter() - start


def spread_boxes(rng, n, image=1000.0):
    """Small boxes all over the image: most survive NMS at 0.7 (like early RPN proposals)."""
    xy = rng.uniform(0, image, (n, 2))
    wh = rng.uniform(8, 64, (n, 2))
    return np.concatenate([xy, xy + wh], 1).astype(np.float32)


def overlapping_boxes(rng, n, num_objects=150, image=1000.0):
    """Boxes piled on a few objects: far fewer than 2000 survive NMS at 0.7."""
    corners = rng.uniform(0, image, (num_objects, 2))
    sizes = rng.uniform(32, 300, (num_objects, 2))
    which = rng.integers(0, num_objects, n)
    centre = corners[which] + sizes[which] / 2 + rng.normal(0, 4, (n, 2))
    wh = sizes[which] * rng.uniform(0.85, 1.15, (n, 2))
    return np.concatenate([centre - wh / 2, centre + wh / 2], 1).astype(np.float32)


def nms_case(boxes, scores, *, threshold, max_output, repeats):
    op = functools.partial(ops.nms, iou_threshold=threshold, max_output_size=max_output)
    jb, js = jnp.asarray(boxes), jnp.asarray(scores)
    compiled = compile_s(op, jb, js)
    fn = jax.jit(op)
    ours = fn(jb, js)
    tb, ts = tensor(boxes), tensor(scores)
    theirs = torchvision.ops.nms(tb, ts, threshold)[:max_output].cpu().numpy()
    same = np.array_equal(np.asarray(ours.indices)[np.asarray(ours.valid)], theirs)
    return (
        median_ms(lambda: jax.block_until_ready(fn(jb, js)), repeats),
        median_ms(lambda: torchvision.ops.nms(tb, ts, threshold)[:max_output], repeats),
        compiled,
        same,
        f"{len(torchvision.ops.nms(tb, ts, threshold))} of {len(boxes)} survive",
    )


def batched_images_case(boxes, scores, *, threshold, max_output, repeats):
    op = jax.vmap(functools.partial(ops.nms, iou_threshold=threshold, max_output_size=max_output))
    jb, js = jnp.asarray(boxes), jnp.asarray(scores)
    compiled = compile_s(op, jb, js)
    fn = jax.jit(op)
    ours = fn(jb, js)
    tb, ts = tensor(boxes), tensor(scores)

    def torchvision_fn():
        return [torchvision.ops.nms(tb[i], ts[i], threshold)[:max_output] for i in range(len(tb))]

    same = all(
        np.array_equal(np.asarray(ours.indices[i])[np.asarray(ours.valid[i])], kept.cpu().numpy())
        for i, kept in enumerate(torchvision_fn())
    )
    return (
        median_ms(lambda: jax.block_until_ready(fn(jb, js)), repeats),
        median_ms(torchvision_fn, repeats),
        compiled,
        same,
        f"{len(boxes)} images",
    )


def sampling_case(rng, repeats):
    num_anchors = 38 * 63 * 9  # VGG-16 at 600 x 1000
    labels = rng.choice([-1, 0, 1], size=num_anchors, p=[0.6, 0.398, 0.002])
    positive, negative = jnp.asarray(labels == 1), jnp.asarray(labels == 0)
    op = functools.partial(ops.sample_balanced, num_samples=256, positive_fraction=0.5)
    key = jax.random.key(0)
    compiled = compile_s(op, key, positive, negative)
    fn = jax.jit(op)
    ours = fn(key, positive, negative)
    sampler = BalancedPositiveNegativeSampler(256, 0.5)
    tl = [tensor(labels)]
    (pos_mask,), (neg_mask,) = sampler(tl)
    same_counts = int(ours.valid.sum()) == int(pos_mask.sum() + neg_mask.sum())
    return (
        median_ms(lambda: jax.block_until_ready(fn(key, positive, negative)), repeats),
        median_ms(lambda: sampler(tl), repeats),
        compiled,
        same_counts,
        f"{num_anchors} anchors, random draws: counts compared",
    )


def iou_case(rng, repeats):
    boxes1, boxes2 = spread_boxes(rng, 20000), overlapping_boxes(rng, 100)
    j1, j2 = jnp.asarray(boxes1), jnp.asarray(boxes2)
    compiled = compile_s(ops.pairwise_iou, j1, j2)
    fn = jax.jit(ops.pairwise_iou)
    t1, t2 = tensor(boxes1), tensor(boxes2)
    same = np.allclose(fn(j1, j2), torchvision.ops.box_iou(t1, t2).cpu().numpy(), atol=1e-6)
    return (
        median_ms(lambda: jax.block_until_ready(fn(j1, j2)), repeats),
        median_ms(lambda: torchvision.ops.box_iou(t1, t2), repeats),
        compiled,
        same,
        "20000 x 100",
    )


def proposals(rng, n, image_hw):
    """RPN-like RoIs inside the image: corners anywhere, sides from 16 px to 60% of the image."""
    height, width = image_hw
    xy = rng.uniform(0, 1, (n, 2)) * [width, height]
    wh = np.exp(rng.uniform(np.log(16), np.log(0.6 * min(height, width)), (n, 2)))
    boxes = np.concatenate([xy, xy + wh], 1)
    return np.clip(boxes, 0, [width, height, width, height]).astype(np.float32)


def roi_case(jax_op, torch_op, features, boxes, *, repeats, atol):
    """Forward and forward+backward (a given output cotangent, as in training) of a RoI op."""
    rng = np.random.default_rng(1)
    jf, jb = jax.tree.map(jnp.asarray, (features, boxes))
    compiled = compile_s(jax_op, jf, jb)
    forward = jax.jit(jax_op)
    out = forward(jf, jb)
    cotangent = jnp.asarray(rng.normal(size=out.shape).astype(np.float32))
    backward = jax.jit(lambda f, b, g: jax.vjp(lambda x: jax_op(x, b), f)[1](g)[0])

    def torch_inputs(to_torch):
        maps = jax.tree.map(lambda f: to_torch(np.array(f)).permute(2, 0, 1)[None], features)
        return maps, [to_torch(boxes)]

    def channels_last(t):
        return t.permute(0, 2, 3, 1).cpu().numpy()

    tf, tb = torch_inputs(tensor)
    tg = tensor(np.array(cotangent)).permute(0, 3, 1, 2).contiguous()
    # "same" is judged against torchvision's CPU kernel, whose semantics ours follow exactly.
    reference = channels_last(torch_op(*torch_inputs(torch.from_numpy)))
    ours_error = np.abs(np.asarray(out) - reference).max()
    same = ours_error <= atol
    notes = ""
    if TORCH_DEVICE.type != "cpu":
        theirs_error = np.abs(channels_last(torch_op(tf, tb)) - reference).max()
        notes = (
            f"; max |diff| from torchvision CPU: ours {ours_error:.1e}, "
            f"torchvision {TORCH_DEVICE.type} {theirs_error:.1e}"
        )

    def torch_forward_backward():
        leaves = tf if isinstance(tf, list) else [tf]
        for leaf in leaves:
            leaf.requires_grad_(True)
            leaf.grad = None
        torch_op(tf, tb).backward(tg)

    jax_fwd = median_ms(lambda: jax.block_until_ready(forward(jf, jb)), repeats)
    jax_both = median_ms(lambda: jax.block_until_ready(backward(jf, jb, cotangent)), repeats)
    with torch.no_grad():
        torch_fwd = median_ms(lambda: torch_op(tf, tb), repeats)
    torch_both = median_ms(torch_forward_backward, repeats)
    return [
        ("forward", (jax_fwd, torch_fwd, compiled, same, notes)),
        ("forward + backward", (jax_both, torch_both, compiled, same, notes)),
    ]


def vgg_roi_cases(rng, repeats):
    """512 RoIs on VGG-16's conv5_3 at 600 x 1000: [38, 63, 512], stride 16."""
    features = rng.normal(size=(38, 63, 512)).astype(np.float32)
    boxes = proposals(rng, 512, (600, 1000))
    align = functools.partial(
        ops.roi_align, output_size=7, spatial_scale=1 / 16, sampling_ratio=2, aligned=False
    )
    pool = functools.partial(ops.roi_pool, output_size=7, spatial_scale=1 / 16)
    rows = {}
    for name, jax_op, torch_op, atol, note in (
        (
            "roi_align 512 RoIs, VGG-16 map",
            align,
            lambda f, b: torchvision.ops.roi_align(f, b, 7, 1 / 16, 2, False),
            1e-4,
            "[38, 63, 512], 7x7, sampling 2",
        ),
        (
            "roi_pool 512 RoIs, VGG-16 map",
            pool,
            lambda f, b: torchvision.ops.roi_pool(f, b, 7, 1 / 16),
            0.0,
            "[38, 63, 512], 7x7, same = bit for bit",
        ),
    ):
        for label, (*row, notes) in roi_case(
            jax_op, torch_op, features, boxes, repeats=repeats, atol=atol
        ):
            rows[f"{name}, {label}"] = (*row, note + notes)
    return rows


def fpn_roi_cases(rng, repeats):
    """512 RoIs over R50-FPN's P2-P5 at 800 x 1333 (padded to 800 x 1344), 256 channels."""
    strides = (4, 8, 16, 32)
    features = [rng.normal(size=(800 // s, 1344 // s, 256)).astype(np.float32) for s in strides]
    boxes = proposals(rng, 512, (800, 1333))
    jax_op = functools.partial(
        ops.multilevel_roi_align,
        output_size=7,
        spatial_scales=[1 / s for s in strides],
        sampling_ratio=2,
        aligned=False,
    )
    pooler = torchvision.ops.MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)

    def torch_op(maps, b):
        return pooler(OrderedDict((str(i), m) for i, m in enumerate(maps)), b, [(800, 1344)])

    rows = {}
    for label, (*row, notes) in roi_case(
        jax_op, torch_op, features, boxes, repeats=repeats, atol=1e-4
    ):
        rows[f"multilevel_roi_align 512 RoIs, FPN, {label}"] = (*row, "P2-P5, 256 ch" + notes)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--only", default="", help="comma-separated groups: nms,sampling,iou,roi")
    args = parser.parse_args()
    rng = np.random.default_rng(0)

    def scores(*shape):
        return rng.permutation(int(np.prod(shape))).reshape(shape).astype(np.float32)

    cases = {
        "nms": lambda: {
            "nms 12000->2000 @0.7, spread": nms_case(
                spread_boxes(rng, 12000),
                scores(12000),
                threshold=0.7,
                max_output=2000,
                repeats=args.repeats,
            ),
            "nms 12000->2000 @0.7, heavy overlap": nms_case(
                overlapping_boxes(rng, 12000),
                scores(12000),
                threshold=0.7,
                max_output=2000,
                repeats=args.repeats,
            ),
            "nms 6000->300 @0.7, 2 images (vmap)": batched_images_case(
                np.stack([spread_boxes(rng, 6000), overlapping_boxes(rng, 6000)]),
                scores(2, 6000),
                threshold=0.7,
                max_output=300,
                repeats=args.repeats,
            ),
        },
        "sampling": lambda: {
            "sample_balanced 256 of ~20k anchors": sampling_case(rng, args.repeats)
        },
        "iou": lambda: {"pairwise_iou 20k x 100": iou_case(rng, args.repeats)},
        "roi": lambda: {**vgg_roi_cases(rng, args.repeats), **fpn_roi_cases(rng, args.repeats)},
    }
    selected = args.only.split(",") if args.only else list(cases)
    body = [
        f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} on "
        f"{TORCH_DEVICE.type} ({torch.get_num_threads()} CPU threads), "
        f"torchvision {torchvision.__version__}; {describe_runtime()}. Medians of "
        f"{args.repeats} runs; ratio = frcnn_jax's time / torchvision's (lower is faster).",
        "",
        "| case | frcnn_jax ms | torchvision ms | ratio | compile s | same | note |",
        "|---|---:|---:|---:|---:|:---:|---|",
    ]
    ratios = {}
    for group in selected:
        for name, (ours, theirs, compiled, same, note) in cases[group]().items():
            ratios[name] = ours / theirs
            body.append(
                f"| {name} | {ours:.3f} | {theirs:.3f} | {ours / theirs:.3f} | {compiled:.2f} | "
                f"{'yes' if same else 'NO'} | {note} |"
            )
            print(body[-1], flush=True)
    print("\n".join(body))
    if set(selected) == set(cases):  # the README's figure needs every case
        faster = [r for r in ratios.values() if r < 1]
        slower = {n: r for n, r in ratios.items() if r >= 1}
        readme = (
            f"frcnn_jax faster in {len(faster)} of {len(ratios)} cases "
            f"({min(faster):.3f}-{max(faster):.2f}x torchvision's time)"
            + "".join(f"; {name}: {r:.2f}x (slower)" for name, r in slower.items())
        )
        result_rows.write_results(
            ROOT / "experiments" / "results_ops.md",
            "Box ops against torchvision, same inputs, same run",
            body,
            readme,
        )


if __name__ == "__main__":
    main()
