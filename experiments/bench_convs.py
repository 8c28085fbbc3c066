"""ResNet-50-FPN's trainable convolutions one at a time, beside torch's, at 800 x 1344.

    python experiments/bench_convs.py [--repeats 3]

For each distinct convolution of layer2-layer4 and the FPN (batch 1, float32): the forward, the
input gradient (where the detector needs it: not into the frozen layer1) and the weight
gradient, in ms, for XLA's own convolution (`jax.lax.conv_general_dilated` and its VJP),
frcnn_jax's (`frcnn_jax.kernels.conv.conv_general_dilated`: Winograd for the large 3x3 stride-1
layers) and torch's (`conv2d` and `aten::convolution_backward`), plus totals weighted by how
often each occurs. One convolution at a time, so the layout pin of frcnn_jax's convolutions
(which matters inside a whole training step) does not show here.
"""

import argparse

from frcnn_jax.runtime import configure_runtime, describe_runtime

configure_runtime()  # before JAX starts: see frcnn_jax/runtime.py

import functools  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch_timing import median_s  # noqa: E402

from frcnn_jax.kernels import conv as conv_lib  # noqa: E402

# (name, kernel, stride, in channels, out channels, input height, input width, count, dx?)
CONVS = (
    ("layer2.0.conv1", 1, 1, 256, 128, 200, 336, 1, False),
    ("layer2.0.conv2", 3, 2, 128, 128, 200, 336, 1, True),
    ("layer2.*.conv3", 1, 1, 128, 512, 100, 168, 4, True),
    ("layer2.0.downsample", 1, 2, 256, 512, 200, 336, 1, False),
    ("layer2.1-3.conv1", 1, 1, 512, 128, 100, 168, 3, True),
    ("layer2.1-3.conv2", 3, 1, 128, 128, 100, 168, 3, True),
    ("layer3.0.conv1", 1, 1, 512, 256, 100, 168, 1, True),
    ("layer3.0.conv2", 3, 2, 256, 256, 100, 168, 1, True),
    ("layer3.*.conv3", 1, 1, 256, 1024, 50, 84, 6, True),
    ("layer3.0.downsample", 1, 2, 512, 1024, 100, 168, 1, True),
    ("layer3.1-5.conv1", 1, 1, 1024, 256, 50, 84, 5, True),
    ("layer3.1-5.conv2", 3, 1, 256, 256, 50, 84, 5, True),
    ("layer4.0.conv1", 1, 1, 1024, 512, 50, 84, 1, True),
    ("layer4.0.conv2", 3, 2, 512, 512, 50, 84, 1, True),
    ("layer4.*.conv3", 1, 1, 512, 2048, 25, 42, 3, True),
    ("layer4.0.downsample", 1, 2, 1024, 2048, 50, 84, 1, True),
    ("layer4.1-2.conv1", 1, 1, 2048, 512, 25, 42, 2, True),
    ("layer4.1-2.conv2", 3, 1, 512, 512, 25, 42, 2, True),
    ("fpn.inner2", 1, 1, 256, 256, 200, 336, 1, False),
    ("fpn.inner3", 1, 1, 512, 256, 100, 168, 1, True),
    ("fpn.inner4", 1, 1, 1024, 256, 50, 84, 1, True),
    ("fpn.inner5", 1, 1, 2048, 256, 25, 42, 1, True),
    ("fpn.layer2", 3, 1, 256, 256, 200, 336, 1, True),
    ("fpn.layer3", 3, 1, 256, 256, 100, 168, 1, True),
    ("fpn.layer4", 3, 1, 256, 256, 50, 84, 1, True),
    ("fpn.layer5", 3, 1, 256, 256, 25, 42, 1, True),
)


def jax_times(conv_fn, x, w, g, stride, needs_dx, repeats):
    pad = [(w.shape[0] // 2,) * 2] * 2

    def conv(x, w):
        return conv_fn(x, w, (stride, stride), pad, dimension_numbers=("NHWC", "HWIO", "NHWC"))

    forward = jax.jit(conv)
    d_x = jax.jit(lambda x, w, g: jax.vjp(lambda x: conv(x, w), x)[1](g)[0])
    d_w = jax.jit(lambda x, w, g: jax.vjp(lambda w: conv(x, w), w)[1](g)[0])
    return [
        median_s(lambda f=f, a=a: jax.block_until_ready(f(*a)), repeats) if needed else 0.0
        for f, a, needed in (
            (forward, (x, w), True),
            (d_x, (x, w, g), needs_dx),
            (d_w, (x, w, g), True),
        )
    ]


def torch_times(x, w, g, stride, needs_dx, repeats):
    x, g = (torch.from_numpy(a).permute(0, 3, 1, 2).contiguous() for a in (x, g))
    w = torch.from_numpy(w).permute(3, 2, 0, 1).contiguous()
    pad = w.shape[-1] // 2

    def backward(mask):
        return lambda: torch.ops.aten.convolution_backward(
            g, x, w, None, [stride] * 2, [pad] * 2, [1, 1], False, [0, 0], 1, mask
        )

    with torch.no_grad():
        forward = median_s(
            lambda: torch.nn.functional.conv2d(x, w, stride=stride, padding=pad), repeats
        )
    return [
        forward,
        median_s(backward([True, False, False]), repeats) if needs_dx else 0.0,
        median_s(backward([False, True, False]), repeats),
    ]


TIMERS = (
    ("XLA", functools.partial(jax_times, jax.lax.conv_general_dilated)),
    ("frcnn_jax", functools.partial(jax_times, conv_lib.conv_general_dilated)),
    ("torch", torch_times),
)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    threads = torch.get_num_threads()
    print(f"# jax {jax.__version__}, torch {torch.__version__} ({threads} threads); ", end="")
    print(describe_runtime())
    print("| conv | k | stride | in -> out | input | count | ", end="")
    print(" | ".join(f"{label} fwd / dx / dw ms" for label, _ in TIMERS), "|")
    print("|---|---:|---:|---|---|---:|---|---|---|")
    rng = np.random.default_rng(0)
    totals = np.zeros((len(TIMERS), 3))
    for name, k, stride, c_in, c_out, height, width, count, needs_dx in CONVS:
        x = rng.normal(size=(1, height, width, c_in)).astype(np.float32)
        w = (rng.normal(size=(k, k, c_in, c_out)) * 0.05).astype(np.float32)
        out_hw = (-(-height // stride), -(-width // stride))
        g = rng.normal(size=(1, *out_hw, c_out)).astype(np.float32)
        rows = [
            1e3 * np.array(times(x, w, g, stride, needs_dx, args.repeats)) for _, times in TIMERS
        ]
        totals += count * np.array(rows)
        cells = " | ".join(" / ".join(f"{t:.1f}" for t in r) for r in rows)
        shape = f"{c_in} -> {c_out} | {height}x{width}"
        print(f"| {name} | {k} | {stride} | {shape} | {count} | {cells} |", flush=True)
    for (label, _), (fwd, d_x, d_w) in zip(TIMERS, totals, strict=True):
        print(
            f"# {label}, weighted by count: fwd {fwd:.0f} ms, dx {d_x:.0f} ms, dw {d_w:.0f} ms, ",
            end="",
        )
        print(f"all {fwd + d_x + d_w:.0f} ms")


if __name__ == "__main__":
    main()
