"""experiments/paper_tables.py end to end on a tiny model: every table's rows, the Markdown
beside the paper's numbers, and a rerun that finds every row done."""

import json
import os
import pathlib
import subprocess
import sys

from tests.test_trainer import write_config_file

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "paper_tables.py"


def test_every_table_runs_and_a_rerun_skips_finished_rows(tmp_path):
    config_file = write_config_file(tmp_path / "cfg.py", tmp_path / "tfds")
    rows = tmp_path / "rows.jsonl"
    command = [sys.executable, str(SCRIPT), "--table=all", f"--config={config_file}",
               "--steps=2", f"--rows={rows}", f"--runs={tmp_path / 'runs'}"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1500)
    assert out.returncode == 0, out.stderr[-4000:]
    written = [json.loads(line) for line in rows.read_text().splitlines()]
    results = [r for r in written if "table" in r]
    assert {r["table"] for r in results} == {"2", "8", "9", "10", "fig4", "schemes"}
    assert len(results) == 9 + 4 + 4 + 4 + 3 + 4
    for r in results:
        assert 0.0 <= r["map"] <= 1.0 and r["seed"] == 0
    # one training per distinct weight-changing setting, shared between tables
    trainings = [r for r in written if "training" in r]
    assert len(trainings) == len({r["workdir"] for r in results}) == 12
    by_row = {(r["table"], r["row"]): r for r in results}
    assert by_row[("2", "300 proposals (shared features)")]["workdir"] == by_row[
        ("10", "two-stage (RPN proposals + Fast R-CNN), 1 scale")]["workdir"]  # fmt: skip
    recall = by_row[("fig4", "300 proposals: recall vs IoU")]["recall"]
    assert set(recall) >= {"0.50", "0.90", "AR"}
    table = rows.with_suffix(".md").read_text()
    for title in ("Table 2:", "Table 8:", "Table 9:", "Table 10:", "Figure 4:", "Training schemes"):
        assert f"## {title}" in table
    assert "| no reg (anchors as proposals), 300 | 0 |" in table and "| 52.1 |" in table
    again = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0, again.stderr[-4000:]
    assert len(rows.read_text().splitlines()) == len(written)  # nothing rerun


def test_stage_times_prints_every_stage(tmp_path):
    config_file = write_config_file(tmp_path / "cfg.py", tmp_path / "tfds")
    out = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "stage_times.py"),
         f"--configs={config_file}", "--repeats=1"],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-4000:]
    row = out.stdout.strip().splitlines()[-1].split("|")
    assert row[1].strip() == "cfg.py" and row[2].strip() == "128x128"
    times = [float(cell) for cell in row[3:9]]  # four stages, their sum, the one program
    assert all(t > 0 for t in times)
    assert abs(sum(times[:4]) - times[4]) < 0.2
