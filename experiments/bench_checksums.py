"""What checkpoint checksums cost: saving and restoring a train state with and without them.

    python experiments/bench_checksums.py [--config configs/voc07_vgg16.py] [--repeats 3]
        [--output experiments/results_checksums.md]

The train state is the config's (parameters, frozen statistics, optimizer state: VGG-16 with
SGD momentum by default, about 1.1 GB). "Plain" is Orbax's `CheckpointManager` with the same
items and options but no checksums; "ours" is `frcnn_jax.checkpointing.Checkpoints`, which
writes every file's SHA-256 before the step's directory is renamed into place and verifies them
on each restore. Times are medians over `--repeats` saves (each waited for) and restores, on
the local disk; the checkpoint directory is on a tmpfs or page cache, so they are the hashing's
CPU cost rather than a disk's.
"""

import argparse
import datetime
import pathlib
import platform
import statistics
import sys
import tempfile
import time

import jax
import orbax.checkpoint as ocp

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from result_rows import commit

from frcnn_jax import checkpointing
from frcnn_jax.config import config_from_file
from frcnn_jax.models import build_model
from frcnn_jax.training.initial import init_state


def median_seconds(fn, repeats):
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/voc07_vgg16.py")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default="experiments/results_checksums.md")
    args = parser.parse_args()
    config = config_from_file(args.config)
    config.data.canvas, config.data.min_size, config.data.max_size = (224, 224), 224, 224
    state, _ = init_state(config, build_model(config))  # the parameters' shapes: any canvas
    state = jax.device_put(state)
    abstract = checkpointing.abstract_like(state)
    size = sum(x.nbytes for x in jax.tree.leaves(state))
    loader, meta = {"loader": "{}", "consumed": 0, "buffered": []}, {"seed": 0}

    with tempfile.TemporaryDirectory() as tmp:
        plain = ocp.CheckpointManager(
            pathlib.Path(tmp) / "plain" / "checkpoints",
            options=ocp.CheckpointManagerOptions(max_to_keep=args.repeats + 1, create=True),
            item_names=("state", "loader", "meta"),
        )
        ours = checkpointing.Checkpoints(pathlib.Path(tmp) / "ours", max_to_keep=args.repeats + 1)

        def plain_save(i):
            plain.save(
                i + 1,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state),
                    loader=ocp.args.JsonSave(loader),
                    meta=ocp.args.JsonSave(meta),
                ),
            )
            plain.wait_until_finished()

        def ours_save(i):
            ours.save(i + 1, state, loader, meta)
            ours.wait()

        def plain_restore(i):
            restored = plain.restore(
                i + 1,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract),
                    loader=ocp.args.JsonRestore(),
                    meta=ocp.args.JsonRestore(),
                ),
            )
            jax.block_until_ready(restored.state)

        def ours_restore(i):
            jax.block_until_ready(ours.restore(i + 1, abstract)[0])

        rows = []
        for name, a, b in (
            ("save (asynchronous, waited for)", plain_save, ours_save),
            ("restore", plain_restore, ours_restore),
        ):
            rows.append((name, median_seconds(a, args.repeats), median_seconds(b, args.repeats)))
        verify = median_seconds(lambda i: ours.verify(i + 1), args.repeats)
        files = sum(1 for p in (ours.directory / "1").rglob("*") if p.is_file())
        plain.close()
        ours.close()

    command = "python " + " ".join(sys.argv)
    lines = [
        "# Checkpoint checksums: their cost",
        "",
        f"- command: `{command}`",
        f"- commit: {commit()}; date: {datetime.date.today()}; machine: {platform.node()}, "
        f"{platform.processor() or platform.machine()}, jax {jax.__version__} on "
        f"{jax.devices()[0].platform}",
        f"- state: {args.config}'s train state, {size / 1e9:.2f} GB in {files} files",
        "",
        "| operation | plain Orbax (s) | with checksums (s) | ratio |",
        "|---|---|---|---|",
        *(f"| {name} | {a:.2f} | {b:.2f} | {b / a:.2f}x |" for name, a, b in rows),
        f"| verifying the checksums alone | | {verify:.2f} | |",
        "",
        f"Medians of {args.repeats} runs. SHA-256 of every file, hashed in parallel threads.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    pathlib.Path(args.output).write_text(text)


if __name__ == "__main__":
    main()
