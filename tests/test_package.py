"""The package as users meet it: the core install alone, import boundaries, no side effects of
importing an entry point, and the README's examples."""

import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.slow  # whole trainings and subprocess runs


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


def test_readme_examples_run():
    blocks = readme_examples()
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


HEAVY = (
    "tensorflow",
    "tensorflow_datasets",
    "grain",
    "pycocotools",
    "matplotlib",
    "PIL",
    "tensorboard",
    "torch",
)


def readme_examples():
    """The README's ops, model and data examples (its Detector example: test_inference.py)."""
    readme = (ROOT / "README.md").read_text()
    blocks = [part.split("```", 1)[0] for part in readme.split("```python\n")[1:]]
    blocks = [b for b in blocks if "Detector.from_workdir" not in b]
    assert len(blocks) == 3
    return blocks


def test_the_core_install_runs_the_ops_example_and_a_model(tmp_path):
    """`pip install frcnn_jax` without extras, in a fresh virtualenv: the README's ops and model
    examples run, and none of the extras' packages is installed or imported."""
    source = tmp_path / "source"  # a copy: pip builds in the tree it installs from
    shutil.copytree(
        ROOT / "frcnn_jax", source / "frcnn_jax", ignore=shutil.ignore_patterns("__pycache__")
    )
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    subprocess.run(
        [python, "-m", "pip", "install", "-q", str(source)],
        check=True,
        capture_output=True,
        timeout=1200,
    )
    ops_example, model_example, _ = readme_examples()
    script = tmp_path / "core.py"
    script.write_text(
        "import importlib.util, sys\n"
        f"heavy = {HEAVY!r}\n"
        "installed = [n for n in heavy if importlib.util.find_spec(n)]\n"
        "assert not installed, installed\n"
        "import frcnn_jax.ops\n"
        "assert not {'flax', 'tensorflow'} & {m.split('.')[0] for m in sys.modules}\n"
        + ops_example
        + "\nassert proposals.shape == (2000, 4)\n"
        + model_example
        + "\nassert detections.boxes.shape == (2, 100, 4)\n"
        "print('CORE OK', sorted(losses), frcnn_jax.ops.__file__)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [python, str(script)],
        cwd=tmp_path,
        env={**env, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "CORE OK" in done.stdout and str(venv) in done.stdout  # the installed package


def test_importing_the_entry_points_changes_nothing_in_the_process():
    """train, evaluate, predict, export and import_weights in one process (as a notebook would):
    no flag is defined, no environment variable or allocator setting changes, JAX does not
    start; and the tuning applies when an entry point runs."""
    from frcnn_jax import runtime

    code = textwrap.dedent(
        """
        import os
        before = dict(os.environ)
        from absl import flags
        import frcnn_jax.train, frcnn_jax.evaluate, frcnn_jax.predict, frcnn_jax.export
        import frcnn_jax.import_weights
        from frcnn_jax import runtime
        assert dict(os.environ) == before
        assert runtime._malloc == "default"
        assert not {"config", "workdir", "output", "checkpoint"} & set(flags.FLAGS), "flags"
        from jax._src import xla_bridge
        assert not xla_bridge._backends, "JAX started"
        frcnn_jax.train.define_flags()  # what `python -m frcnn_jax.train` does first
        assert "config" in flags.FLAGS
        added, malloc = runtime.configure_runtime()
        print("OK", bool(added), malloc, "xla_cpu" in os.environ.get("XLA_FLAGS", ""))
        """
    )
    mine = ("MALLOC_", "GLIBC_", "XLA_FLAGS", "FRCNN_JAX_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(mine)}
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        # jax and TensorFlow set these two when imported (as in this test's own process)
        env={
            "TPU_SKIP_MDS_QUERY": "1",
            "TF_CPP_MIN_LOG_LEVEL": "1",
            **env,
            "PYTHONPATH": str(ROOT),
            "JAX_PLATFORMS": "cpu",
        },
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # the default allocator setting restarts the program once, where the system allows it
    malloc = "huge_pages" if runtime.huge_pages_available() else "default"
    assert done.stdout.split() == ["OK", "True", malloc, "True"]


def test_the_allocator_setting_is_for_the_cpu_only():
    from frcnn_jax import runtime

    assert runtime.cpu_is_the_platform({"JAX_PLATFORMS": "cpu"})
    assert not runtime.cpu_is_the_platform({"JAX_PLATFORMS": "cuda,cpu"})
    assert not runtime.cpu_is_the_platform({"JAX_PLATFORMS": "tpu"})
    code = (
        "import os; from frcnn_jax import runtime\n"
        "print(runtime.configure_runtime()[1], runtime._malloc)\n"
    )
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_", "FRCNN_JAX_"))
    }
    env = {**env, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cuda"}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env
    )
    assert done.stdout.split() == ["default", "default"], done.stderr  # a GPU host: glibc's
