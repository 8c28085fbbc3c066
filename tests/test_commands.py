"""Every command's user errors: one line `error: ...` naming the problem, a non-zero exit, no
traceback (a programming error keeps its traceback)."""

import concurrent.futures
import os
import subprocess
import sys

import pytest
from PIL import Image

from frcnn_jax import rundir
from frcnn_jax.data import sources
from tests.tiny import ROOT, tiny_config, write_config_file

pytestmark = pytest.mark.slow  # subprocess runs

# (command, arguments, what the one line must say); {config}, {workdir}, {empty}, {tmp} are
# filled in by the test.
CASES = [
    ("train", ["--config.train.optimizer=rmsprop"], "config.train.optimizer"),
    ("train", ["--config.model.backbone=vgg19"], "config.model.backbone"),
    ("train", ["--config.train.lerning_rate=0.1"], "lerning_rate"),
    ("train", ["--config.model.rpn.nms_threshold=1.5"], "config.model.rpn.nms_threshold"),
    ("train", ["--config.model.num_classes=3"], "config.model.num_classes"),
    ("train", ["--config.data.canvas=(320,-1)"], "config.data.canvas"),
    ("train", ["--config.data.name=voc_folder", "--config.data.path={tmp}/no_voc"], "no_voc"),
    ("train", ["--config.model.init_checkpoint={tmp}/no_weights.npz"], "no_weights.npz"),
    ("train", ["--config.model.init_checkpoint={tmp}/damaged.npz"], "damaged.npz"),
    ("train", ["--config={tmp}/no_config.py"], "no_config.py"),
    ("evaluate", ["--workdir={empty}"], "no checkpoints"),
    ("evaluate", ["--checkpoint=999"], "999"),
    ("predict", ["--workdir={empty}", "--output={tmp}/out", "{tmp}/picture.png"], "run.json"),
    ("predict", ["--workdir={workdir}", "--output={tmp}/out", "{empty}"], "no images found"),
    (
        "predict",
        ["--workdir={workdir}", "--canvas=0,5", "--output={tmp}/out", "{tmp}/picture.png"],
        "--canvas",
    ),
    ("export", ["--workdir={empty}", "--output={tmp}/x.jaxexport"], "run.json"),
    ("export", ["--workdir={workdir}", "--checkpoint=7", "--output={tmp}/x.jaxexport"], "step 7"),
    ("export", ["--workdir={workdir}", "--output={tmp}/x.jaxexport"], "no checkpoints"),
    ("import_weights", ["--arch=vgg16", "--input={tmp}/no.pth", "--output={tmp}/w.npz"], "no.pth"),
    (
        "import_weights",
        ["--arch=vgg16", "--input={tmp}/picture.png", "--output={tmp}/w.npz"],
        "picture.png",
    ),
    ("pretrain", ["--config.model.backbone=vgg19"], "config.model.backbone"),
    ("pretrain", ["--config.data.crop_scale=(0.9,0.1)"], "config.data.crop_scale"),
    ("pretrain", ["--config.train.lerning_rate=0.1"], "lerning_rate"),
    (
        "pretrain",
        [
            f"--config={ROOT / 'configs' / 'pretrain_imagenet_zf.py'}",
            "--config.data.data_dir={tmp}",
        ],
        "imagenet2012: TFDS needs its files first",
    ),
    ("fit_budget", ["--minutes=-1"], "--minutes"),
    ("fit_budget", ["--minutes=5", "--config.train.batch_size=0"], "config.train.batch_size"),
]
NEEDS_CONFIG = ("train", "evaluate", "fit_budget")


def command_line(command, args, paths):
    line = [sys.executable, "-m", f"frcnn_jax.{command}"]
    if command in NEEDS_CONFIG and not any(a.startswith("--config=") for a in args):
        line.append(f"--config={paths['config']}")
    if command == "pretrain" and not any(a.startswith("--config=") for a in args):
        line.append(f"--config={ROOT / 'configs' / 'pretrain_shapes_tiny_fpn.py'}")
    if command in ("train", "pretrain"):  # a fresh workdir per case
        line.append(f"--workdir={paths['tmp'] / (command + str(abs(hash(tuple(args)))))}")
    if command == "evaluate" and not any(a.startswith("--workdir") for a in args):
        line.append(f"--workdir={paths['workdir']}")
    return line + [a.format(**paths) for a in args]


def run(line):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run(line, capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def paths(data_dir, tmp_path_factory):
    """A config file (its dataset prepared), a workdir that describes itself (run.json) but
    has no checkpoint, an empty folder, a picture and a file that only looks like a weight
    file."""
    tmp = tmp_path_factory.mktemp("commands")
    config = write_config_file(tmp / "config.py", data_dir, "c.train.num_steps = 2\n")
    workdir, empty = tmp / "run", tmp / "empty"
    empty.mkdir()
    config_values = tiny_config(data_dir)
    _, info, _ = sources.open_split(config_values.data, "train")  # prepared once, not racing
    rundir.write(workdir, config_values, info)
    Image.new("RGB", (40, 30)).save(tmp / "picture.png")
    (tmp / "damaged.npz").write_bytes(b"PK\x03\x04 not really a zip file")
    return {"config": config, "workdir": workdir, "empty": empty, "tmp": tmp}


def test_each_command_prints_a_user_error_as_one_line(paths):
    lines = [command_line(command, args, paths) for command, args, _ in CASES]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run, lines))
    wrong = []
    for (command, args, said), result in zip(CASES, results, strict=True):
        last = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ""
        ok = (
            result.returncode != 0
            and "Traceback" not in result.stderr
            and last.startswith("error: ")
            and said in last
        )
        if not ok:
            wrong.append(
                f"{command} {' '.join(args)}: exit {result.returncode}, last line {last!r}"
            )
    assert not wrong, "\n".join(wrong)


def test_a_programming_error_keeps_its_traceback(paths, tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("def get_config():\n    return 1 / 0\n")
    result = run(command_line("train", [f"--config={broken}"], paths))
    assert result.returncode != 0 and "Traceback" in result.stderr
    assert "ZeroDivisionError" in result.stderr
