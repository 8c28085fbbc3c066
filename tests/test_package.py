"""The package as users meet it: import boundaries and the README's main command."""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_python(*args, check=True):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, check=check
    )


def test_ops_import_needs_only_jax_and_numpy():
    code = (
        "import sys, frcnn_jax.ops\n"
        "heavy = {'flax', 'optax', 'tensorflow', 'tensorflow_datasets', 'ml_collections',"
        " 'torch'}\n"
        "loaded = heavy & {name.split('.')[0] for name in sys.modules}\n"
        "assert not loaded, loaded\n"
        "print(len(frcnn_jax.ops.__all__))\n"
    )
    assert int(run_python("-c", code).stdout) >= 20


def test_demo_main_command_runs():
    result = run_python(
        "-m", "frcnn_jax.demo", "--config", "configs/demo_ops.py", "--config.repeats=1"
    )
    counts = {}
    for line in result.stdout.splitlines():
        name, _, value = line.strip().rpartition(" ")
        if name and value.isdigit():
            counts[name.strip()] = int(value)
    assert counts["anchors"] == 38 * 63 * 9  # VGG-16 at 600 x 1000, 9 anchors per location
    assert counts["sampled positives"] <= 128
    assert counts["sampled positives"] + counts["sampled negatives"] == 256
    assert counts["sampled positives"] == min(counts["positive anchors"], 128)
    assert 0 < counts["proposals after NMS"] <= 2000
    assert counts["ground truth recalled at IoU 0.7"] == 5


def test_demo_rejects_unknown_config_field():
    result = run_python(
        "-m",
        "frcnn_jax.demo",
        "--config",
        "configs/demo_ops.py",
        "--config.no_such_field=1",
        check=False,
    )
    assert result.returncode != 0
    assert "no_such_field" in result.stderr


def test_readme_examples_run():
    readme = (ROOT / "README.md").read_text()
    blocks = [part.split("```", 1)[0] for part in readme.split("```python\n")[1:]]
    blocks = [b for b in blocks if "Detector.from_workdir" not in b]  # tests/test_inference.py
    assert len(blocks) == 3
    ops_example, model_example, data_example = ({} for _ in blocks)
    exec(compile(blocks[0], "README.md", "exec"), ops_example)
    assert ops_example["proposals"].shape == (2000, 4)
    assert int(ops_example["kept"].valid.sum()) == 2000
    exec(compile(blocks[2], "README.md", "exec"), data_example)
    assert data_example["result"].mean_ap == 1.0
    exec(compile(blocks[1], "README.md", "exec"), model_example)
    assert model_example["detections"].boxes.shape == (2, 100, 4)
    assert set(model_example["losses"]) == {
        "rpn_objectness",
        "rpn_box",
        "fast_rcnn_class",
        "fast_rcnn_box",
    }
