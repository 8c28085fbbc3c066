"""experiments/paper_tables.py end to end on a tiny model: every table's rows, the Markdown
beside the paper's numbers, and a rerun that finds every row done."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from tests.tiny import run_train, write_config_file

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "paper_tables.py"


# the smallest detector that has every part: one level, few anchors, 2 test images
LIGHT = """
c.data.shapes_num_examples = {"train": 4, "validation": 1, "test": 2}
c.model.backbone = "tiny"
c.model.rpn.anchor_sizes = (32, 64)
c.model.rpn.channels = 16
c.model.rpn.test_pre_nms_top_n = 100
c.model.head.widths = (32, 32)
"""


pytestmark = pytest.mark.slow  # whole trainings and subprocess runs


PRETRAIN = """
import pathlib
import shutil
from frcnn_jax.config import config_from_file

def get_config():
    c = config_from_file(pathlib.Path({root!r}) / "configs" / "pretrain_shapes_tiny_fpn.py")
    c.data.shapes_num_examples = {{"train": 16, "validation": 8}}
    c.data.data_dir = {data_dir!r}
    c.data.image_size = 32
    c.data.workers = 0
    c.model.backbone = "tiny"
    c.train.batch_size = 4
    c.eval.batch_size = 4
    return c
"""


def test_tables_run_end_to_end_and_a_rerun_skips_finished_rows(tmp_path):
    """Table 2 and Figure 4 from a pretrained backbone (the pretraining, two trainings: shared
    and unshared features, twelve evaluations: proposal counts, no NMS, random ranking, no
    regression, proposal recall); the other tables' rows are the same machinery with other
    fields (checked below without training; their models in tests/models)."""
    config_file = write_config_file(tmp_path / "cfg.py", tmp_path / "tfds", LIGHT)
    pretrain_file = tmp_path / "pretrain.py"
    pretrain_file.write_text(PRETRAIN.format(root=str(ROOT), data_dir=str(tmp_path / "tfds")))
    rows = tmp_path / "rows.jsonl"
    command = [
        sys.executable,
        str(SCRIPT),
        "--table=2,fig4",
        f"--config={config_file}",
        "--steps=2",
        "--seeds=0",
        f"--pretrain={pretrain_file}",
        "--pretrain-steps=2",
        f"--rows={rows}",
        f"--runs={tmp_path / 'runs'}",
        f"--backbones={tmp_path / 'backbones'}",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1500)
    assert out.returncode == 0, out.stderr[-4000:]
    written = [json.loads(line) for line in rows.read_text().splitlines()]
    results = [r for r in written if "table" in r]
    assert [r["table"] for r in results] == ["2"] * 9 + ["fig4"] * 3
    for r in results:
        assert 0.0 <= r["map"] <= 1.0 and r["seed"] == 0
        assert r["start"] == "pretrained" and r["setting"].endswith(
            "pretrained (pretrain, 2 steps)"
        )
    (pretrained,) = [r for r in written if "pretrain" in r and "table" not in r]
    assert 0 <= pretrained["top1"] <= 1 and pretrained["examples"] == 8
    assert len(pretrained["backbone"]) == 12 and "retrained" not in pretrained
    assert all(r["backbone"] == pretrained["backbone"] for r in results)
    assert pretrained["minutes"] > 0
    assert pretrained["weights"] == str(tmp_path / "backbones" / "pretrain-steps2.npz")
    run = json.loads((pathlib.Path(results[0]["workdir"]) / "run.json").read_text())
    assert run["config"]["model"]["init_checkpoint"] == pretrained["weights"]
    # one training per distinct weight-changing setting, shared between tables
    trainings = [r for r in written if "training" in r]
    assert len(trainings) == len({r["workdir"] for r in results}) == 2
    # each training records its final losses (the RPN's two terms: the lambda column)
    for record in trainings:
        final = record["final_losses"]
        assert {"loss", "rpn_box", "rpn_objectness", "grad_norm"} <= set(final), final
        assert "steps_per_s" not in final and "elapsed_s" not in final
        assert list(record["loop_seconds"]) == [""] and record["loop_seconds"][""] > 0
    by_row = {r["row"]: r for r in results}
    assert (
        by_row["300 proposals (shared features)"]["workdir"]
        == by_row["300 proposals: recall vs IoU"]["workdir"]
        != by_row["unshared features, 300 proposals"]["workdir"]
    )
    assert set(by_row["300 proposals: recall vs IoU"]["recall"]) >= {"0.50", "0.90", "AR"}
    table = rows.with_suffix(".md").read_text()
    assert "## Pretraining" in table and "| 2 |" in table
    assert "## Table 2:" in table and "## Figure 4:" in table
    assert "--start pretrained --pretrain" in table
    assert "| no reg (anchors as proposals), 300 | 0 |" in table
    ratio = trainings[0]["final_losses"]["rpn_box"] / trainings[0]["final_losses"]["rpn_objectness"]
    assert f"| {ratio:.2f} |" in table  # the RPN box / objectness column
    # every row of a table but Figure 4's also measures its RPN's proposal recall
    recall = {r["row"]: r["proposal_recall"]["recall@300"]["0.70"] for r in results[:9]}
    assert all(0.0 <= x <= 1.0 for x in recall.values()) and "recall" not in results[0]
    assert "| RPN recall@0.70, top 300 proposals |" in table
    shared = recall["300 proposals (shared features)"]
    assert f"| {shared:.3f} |" in table
    assert "| 58.7 |" in table and "| 44.6 |" in table  # the paper's unshared, random rows
    # Table 2's shared row (side by side, then in its setting's table); the rest vs it
    assert table.count("| reference |") == 2
    # experiments/swap_proposals.py on these trainings: each one's RPN feeding the other's
    # Fast R-CNN (its hybrid of a training with itself is checked against the row)
    swapped = tmp_path / "swap.jsonl"
    swap = [
        sys.executable,
        str(ROOT / "experiments" / "swap_proposals.py"),
        "--table=2",
        "--swap=shared=300 proposals (shared features)",
        "--swap=unshared=unshared features, 300 proposals",
        f"--config={config_file}",
        "--steps=2",
        "--seeds=0",
        f"--setting={results[0]['setting']}",
        f"--rows={rows}",
        f"--out={swapped}",
    ]
    out = subprocess.run(swap, capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    hybrids = {
        (r["detector"], r["rpn"]): r for r in map(json.loads, swapped.read_text().splitlines())
    }
    assert set(hybrids) == {(d, r) for d in ("shared", "unshared") for r in ("shared", "unshared")}
    for name, label in (
        ("shared", "300 proposals (shared features)"),
        ("unshared", "unshared features, 300 proposals"),
    ):
        assert hybrids[name, name]["map"] == pytest.approx(by_row[label]["map"], abs=1e-6)
    assert "| shared | unshared |" in swapped.with_suffix(".md").read_text()
    shutil.rmtree(tmp_path / "runs" / "pretrain")  # as on another machine: the file is enough
    again = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0, again.stderr[-4000:]
    assert len(rows.read_text().splitlines()) == len(written)  # nothing rerun
    assert not (tmp_path / "runs" / "pretrain").exists()  # nor pretrained again
    assert len({r["config_digest"] for r in results}) == 1
    # --row: only the rows whose label contains the text (Table 8's, not trained, stay untouched)
    only = [*command, "--table=2,8", "--row=(shared features)"]
    one = subprocess.run(only, capture_output=True, text=True, env=env, timeout=600)
    assert one.returncode == 0, one.stderr[-4000:]
    assert len(rows.read_text().splitlines()) == len(written)
    assert "## Table 2:" in one.stdout and "## Table 8:" not in one.stdout
    none = subprocess.run([*only, "--row=no such row"], capture_output=True, text=True, env=env)
    assert none.returncode != 0 and "--row ['no such row'] matches no row" in none.stderr
    assert "1 scale, 1 ratio" in none.stderr  # the rows it could have named
    # the config file retuned since: its setting's rows are not continued from other values
    write_config_file(config_file, tmp_path / "tfds", LIGHT + "c.model.rpn.nms_threshold = 0.6\n")
    retuned = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert retuned.returncode != 0 and "now gives other values" in retuned.stderr, retuned.stderr
    bad = subprocess.run([*command[:2], "--table=11"], capture_output=True, text=True, env=env)
    assert bad.returncode != 0 and "unknown ['11']" in bad.stderr


ROW_CHECK = """
import json

import paper_report
import paper_tables
from frcnn_jax.config import check_config, config_from_file
from frcnn_jax.models import build_model


for name in ("shapes_tiny.py", "voc07_vgg16.py"):
    base = paper_tables.scaled(config_from_file(ROOT / "configs" / name), 100)
    trainings = set()
    for table in paper_report.TABLES:
        rows = paper_tables.table_rows(table, base)
        assert len({r.label for r in rows}) == len(rows), table
        for row in rows:
            config = paper_tables.with_fields(base, (*row.train, *row.test))
            check_config(config)
            build_model(config)
            trainings.add(paper_tables.training_name(row.train))
        references = [r for r in rows if paper_report.is_reference(table, r.label)]
        assert len(references) == (table != "fig4"), (table, references)
        assert not any(r.train or r.test for r in references[:1] if table != "2"), references
    assert len(trainings) == 14, trainings
# the paper's alternating lengths against 700 joint steps: 800/400/800/400, decays at 3/4
pairs = dict(paper_tables.paper_alternating(paper_tables.scaled(config_from_file(
    ROOT / "configs" / "shapes_tiny.py"), 700)))
assert pairs["train.alternating_phase_steps"] == (800, 400, 800, 400)
assert pairs["train.alternating_phase_lr_steps"] == (600, 300, 600, 300)
assert pairs["train.alternating_phase_batch_sizes"] == (2, 4, 2, 4)  # RPN phases: half the batch
voc = config_from_file(ROOT / "configs" / "voc07_vgg16.py")
voc.train.scheme = "alternating"
unshared = next(r for r in paper_tables.table_rows("2", voc) if r.label.startswith("unshared"))
assert ("train.alternating_phases", 2) in unshared.train  # the paper's: stop after phase 2
# a training stopped by a signal (train_and_evaluate returns None) ends the script: no row from
# its last checkpoint; the minutes it trained are kept for the next sitting
import argparse
import tempfile
from unittest import mock

with tempfile.TemporaryDirectory() as tmp, mock.patch.object(
    paper_tables.training, "train_and_evaluate", lambda config, workdir: None
):
    try:
        paper_tables.train(base, tmp)
    except SystemExit as stop:
        assert "rerun the same command to resume" in str(stop), stop
    else:
        raise AssertionError("a stopped training returned a result")
    assert float((pathlib.Path(tmp) / "paper_minutes.txt").read_text()) >= 0
# a training that diverges is recorded with its step, once: a rerun does not train it again
def diverging(config, workdir):
    raise paper_tables.NonFinite("non-finite loss at step 66", step=66)


with tempfile.TemporaryDirectory() as tmp, mock.patch.object(
    paper_tables.training, "train_and_evaluate", diverging
):
    rows = paper_tables.Rows(pathlib.Path(tmp) / "rows.jsonl")
    record = paper_tables.training_record(rows, base, pathlib.Path(tmp) / "run")
    assert record["diverged_at"] == 66 and record["minutes"] >= 0, record
    assert paper_tables.training_record(rows, base, pathlib.Path(tmp) / "run") == record
    assert len(rows.all) == 1
# a repo config's pretraining records are found from a checkout at another path
with tempfile.TemporaryDirectory() as tmp:
    rows = paper_tables.Rows(pathlib.Path(tmp) / "rows.jsonl")
    for name, backbone in (("pretrain_shapes_tiny_fpn", "ours"), ("pretrain_other", "other")):
        rows.add({"pretrain": f"/elsewhere/configs/{name}.py", "pretrain_steps": 3,
                  "backbone": backbone})
    here = str(ROOT / "configs" / "pretrain_shapes_tiny_fpn.py")
    found = paper_tables.pretraining_records(rows, here, 3)
    assert [r["backbone"] for r in found] == ["ours"], found
    assert not paper_tables.pretraining_records(rows, here, 4)
# the paper's lambda stays the tables' reference when a config's own box weight is retuned
shapes = paper_tables.scaled(config_from_file(ROOT / "configs" / "shapes_tiny.py"), 100)
tuned = paper_tables.with_fields(shapes, (("model.rpn.box_weight", 3.0),))  # any retuning
pinned = paper_tables.paper_setting(tuned)
table9 = {r.label.split(" (")[0]: dict(r.train) for r in paper_tables.table_rows("9", pinned)}
assert table9["lambda = 10"] == {} and pinned.model.rpn.box_weight == 1.0, table9
assert table9["lambda = 100"] == {"model.rpn.box_weight": 10.0}, table9
assert paper_tables.paper_setting(voc).model.rpn.box_weight == 10.0  # N_reg = 2400 there
# and the paper's optimizer (SGD, momentum 0.9, step decays) when a config's own is retuned
adamw = (("train.optimizer", "adamw"), ("train.lr_schedule", "cosine"), ("train.momentum", 0.0))
optimizer = paper_tables.paper_setting(paper_tables.with_fields(shapes, adamw)).train
assert (optimizer.optimizer, optimizer.momentum, optimizer.lr_schedule) == ("sgd", 0.9, "step")
assert paper_tables.config_digest(paper_tables.paper_setting(shapes)) == paper_tables.config_digest(
    paper_tables.with_fields(shapes, paper_tables.paper_recipe(shapes))
)
# rows of one setting never mix config values: another digest is refused, naming the commit
digest = paper_tables.config_digest(shapes)
assert digest != paper_tables.config_digest(tuned)
moved = paper_tables.with_fields(shapes, (("model.init_checkpoint", "/elsewhere/weights"),))
assert paper_tables.config_digest(moved) == digest  # the setting string names the weights
with tempfile.TemporaryDirectory() as tmp:
    rows = paper_tables.Rows(pathlib.Path(tmp) / "rows.jsonl")
    rows.all.append({"setting": "s", "config_digest": digest, "commit": "abc1234"})
    paper_tables.check_digest(rows, "s", digest, "configs/shapes_tiny.py")
    paper_tables.check_digest(rows, "other", "0" * 12, "configs/shapes_tiny.py")
    try:
        paper_tables.check_digest(rows, "s", "0" * 12, "configs/shapes_tiny.py")
    except SystemExit as refused:
        assert "git show abc1234:configs/shapes_tiny.py" in str(refused), refused
    else:
        raise AssertionError("rows of another config digest were accepted")
# a seed's rows share one pretrained backbone: rows from before backbones were recorded count
# as one ("unrecorded"), a pretraining run again is another; from scratch there is none
with tempfile.TemporaryDirectory() as tmp:
    rows = paper_tables.Rows(pathlib.Path(tmp) / "rows.jsonl")
    old = {"table": "9", "setting": "p", "start": "pretrained", "row": "lambda = 10"}
    rows.all += [{**old, "seed": 0}, {**old, "seed": 1, "backbone": "b" * 12}]
    assert paper_tables.other_backbone(rows, "9", 0, "p", "a" * 12)  # the legacy seed 0
    assert not paper_tables.other_backbone(rows, "9", 0, "p", "unrecorded")
    assert paper_tables.other_backbone(rows, "9", 1, "p", "a" * 12)
    assert not paper_tables.other_backbone(rows, "9", 1, "p", "b" * 12)
    assert not paper_tables.other_backbone(rows, "9", 2, "p", "a" * 12)  # a new seed
    assert not paper_tables.other_backbone(rows, "2", 0, "p", "a" * 12)  # another table
    scratch = {"table": "9", "setting": "s", "start": "scratch", "row": "x", "seed": 0}
    rows.all.append(scratch)
    assert not paper_tables.other_backbone(rows, "9", 0, "s", None)
# a committed backbone file is used only with its pretraining record (top-1, minutes)
with tempfile.TemporaryDirectory() as tmp:
    pretrain = str(ROOT / "configs" / "pretrain_shapes_tiny_fpn.py")
    args = argparse.Namespace(
        pretrain=pretrain, pretrain_steps=None, backbones=tmp, rows="rows.jsonl", runs=tmp
    )
    shipped = pathlib.Path(tmp) / "pretrain_shapes_tiny_fpn-steps3000.npz"
    shipped.write_bytes(b"weights")
    rows = paper_tables.Rows(pathlib.Path(tmp) / "rows.jsonl")
    try:
        paper_tables.pretrained_backbone(args, rows)
    except SystemExit as refused:
        assert "no pretraining record of backbone" in str(refused), refused
    else:
        raise AssertionError("a backbone file without its record was used")
    digest = paper_tables.hashlib.sha256(b"weights").hexdigest()[:12]
    rows.all.append({"pretrain": pretrain, "pretrain_steps": 3000, "backbone": digest})
    assert paper_tables.pretrained_backbone(args, rows) == (shipped, digest)
# trainings recorded before summaries existed get one from their metrics.jsonl, once; of a
# folder trained again only the latest record (the folder's metrics are that training's)
with tempfile.TemporaryDirectory() as tmp:
    run, gone = pathlib.Path(tmp) / "run", pathlib.Path(tmp) / "gone"
    run.mkdir()
    progress = {"step": 20, "train/loss": 1.0, "train/rpn_box": 0.01, "train/rpn_objectness": 0.05}
    lines = [progress, {"step": 20, "train/loop_s": 12.5}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\\n" for x in lines))
    rows = paper_tables.Rows(pathlib.Path(tmp) / "rows.jsonl")
    rows.add({"training": str(run), "minutes": 1.0})  # before ids: its id is the folder
    rows.add({"training": str(run), "id": f"{run}#1", "minutes": 1.0, "retrained": True})
    rows.add({"training": str(gone), "id": str(gone), "minutes": 1.0})  # no metrics here
    (added,) = paper_tables.add_summaries(rows)
    assert added["summary_of"] == f"{run}#1" and added["loop_seconds"] == {"": 12.5}, added
    assert added["final_losses"] == {"loss": 1.0, "rpn_box": 0.01, "rpn_objectness": 0.05}
    assert paper_tables.add_summaries(rows) == []  # once
print("ok")
"""


def test_every_row_of_every_table_is_a_valid_model():
    """Each row's config passes the checks and builds, on a shapes and a VOC config (in a
    subprocess: the script sets up the CPU runtime when imported)."""
    script = f"import pathlib\nROOT = pathlib.Path({str(ROOT)!r})\n" + ROW_CHECK
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'experiments'}"},
        timeout=600,
    )
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_stage_times_prints_every_stage(tmp_path):
    config_file = write_config_file(tmp_path / "cfg.py", tmp_path / "tfds")
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "experiments" / "stage_times.py"),
            f"--configs={config_file}",
            "--repeats=1",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    row = out.stdout.strip().splitlines()[-1].split("|")
    assert row[1].strip() == "cfg.py" and row[2].strip() == "128x128"
    times = [float(cell) for cell in row[3:9]]  # four stages, their sum, the one program
    assert all(t > 0 for t in times)
    assert abs(sum(times[:4]) - times[4]) < 0.2


@pytest.mark.slow
def test_stability_records_a_divergence_and_a_finished_training(tmp_path):
    """experiments/stability.py end to end on the tiny setting: a learning rate that diverges is
    recorded with its step, a sane one with its mAP; a rerun trains neither again."""
    config_file = write_config_file(tmp_path / "cfg.py", tmp_path / "tfds", LIGHT)
    rows = tmp_path / "rows.jsonl"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def run(change):
        command = [
            sys.executable,
            str(ROOT / "experiments" / "stability.py"),
            f"--config={config_file}",
            "--steps=4",
            "--seeds=0",
            "--backbone=none",  # from random weights (the committed one is a tiny FPN's)
            f"--change={change}",
            f"--rows={rows}",
            f"--runs={tmp_path / 'runs'}",
        ]
        out = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]

    run("train.learning_rate=1e12,train.warmup_steps=0")
    run("")
    run("")  # done: skipped
    diverged, finished = (json.loads(line) for line in rows.read_text().splitlines())
    assert diverged["diverged_at"] >= 0 and "map" not in diverged
    assert 0 <= finished["map"] <= 1 and "diverged_at" not in finished
    table = rows.with_suffix(".md").read_text()
    assert "| 0 | none | finished |" in table and "diverged at step" in table


@pytest.mark.slow
def test_defaults_check_pairs_each_seed_and_counts_a_divergence_as_zero(tmp_path):
    """experiments/defaults_check.py end to end on the tiny setting: each seed trains the config
    as it is and changed (here: a rate that diverges); the table pairs them, a diverged run
    counts as mAP 0, and a rerun trains nothing again."""
    config_file = write_config_file(tmp_path / "cfg.py", tmp_path / "tfds", LIGHT)
    rows = tmp_path / "rows.jsonl"
    change = "train.learning_rate=1e12,train.warmup_steps=0"
    command = [
        sys.executable,
        str(ROOT / "experiments" / "defaults_check.py"),
        f"--config={config_file}",
        "--steps=4",
        "--seeds=0,1",
        f"--change={change}",
        f"--rows={rows}",
        f"--runs={tmp_path / 'runs'}",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for _ in range(2):  # the second run finds every row done
        out = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
    records = [json.loads(line) for line in rows.read_text().splitlines()]
    assert [(r["seed"], r["change"]) for r in records] == [
        (0, ""),
        (0, change),
        (1, ""),
        (1, change),
    ]
    assert all(r["steps"] == 4 and r["code"] == records[0]["code"] for r in records)
    table = rows.with_suffix(".md").read_text()
    for r in records[::2]:
        cell = f"{100 * r['map']:.1f}"
        assert f"| {r['seed']} | {cell} | diverged at step " in table
        assert f"| {0.0 - 100 * r['map']:+.1f} |" in table
    assert "Over 2 seeds:" in table and "too few seeds for a finding (2 of 5)" in table


def test_a_run_with_a_time_budget_is_trained_to_the_end_at_the_step_its_budget_ended(
    data_dir, tmp_path
):
    """experiments/finetune.py's from-scratch runs have `train.budget_minutes`: they end when
    the budget does, far before `num_steps` here, and a rerun must find them finished."""
    extra = "c.train.num_steps = 100000\nc.train.budget_minutes = 0.1\nc.train.log_every = 2\n"
    config_file = write_config_file(tmp_path / "budget.py", data_dir, extra)
    done = run_train(config_file, tmp_path / "run")
    assert done.returncode == 0, done.stdout + done.stderr
    check = (
        "import sys\n"
        f"sys.path.insert(0, {str(ROOT / 'experiments')!r})\n"
        "import paper_tables\n"
        "from frcnn_jax import checkpointing\n"
        "from frcnn_jax.config import config_from_file\n"
        f"config = config_from_file({str(config_file)!r})\n"
        f"workdir = {str(tmp_path / 'run')!r}\n"
        "latest = checkpointing.Checkpoints(workdir).latest_step()\n"
        "assert 0 < latest < config.train.num_steps, latest\n"
        "assert paper_tables.trained_to_the_end(config, workdir)\n"
        "config.train.budget_minutes = 0\n"  # the same checkpoints, read as a plain run's
        "assert not paper_tables.trained_to_the_end(config, workdir)\n"
        "print('ok', latest)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", check],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=300,
    )
    assert out.returncode == 0 and "ok" in out.stdout, out.stdout + out.stderr
