"""experiments/defaults_check.py end to end on a tiny model: a seed's pair of trainings (the
config as it is and changed), the Markdown table with its verdict, and a rerun that finds the
pair done."""

import json
import os
import subprocess
import sys

import pytest

from tests.test_paper_tables import LIGHT
from tests.tiny import ROOT, write_config_file

SCRIPT = ROOT / "experiments" / "defaults_check.py"

pytestmark = pytest.mark.slow  # two trainings in a subprocess


def test_a_pair_is_trained_tabled_and_not_trained_again(tmp_path):
    config_file = write_config_file(tmp_path / "cfg.py", tmp_path / "tfds", LIGHT)
    rows = tmp_path / "rows.jsonl"
    change = "train.learning_rate=0.01"
    command = [
        sys.executable,
        str(SCRIPT),
        f"--config={config_file}",
        f"--change={change}",
        "--steps=2",
        "--seeds=0",
        f"--rows={rows}",
        f"--runs={tmp_path / 'runs'}",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def run():
        out = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
        assert out.returncode == 0, out.stderr[-4000:]
        return [json.loads(line) for line in rows.read_text().splitlines()]

    written = run()
    assert [r["change"] for r in written] == ["", change]
    for r in written:
        assert r["seed"] == 0 and r["steps"] == 2 and r["minutes"] > 0
        assert r["config"] == str(config_file) and len(r["code"]) > 0
        assert ("map" in r and 0.0 <= r["map"] <= 1.0) or r["diverged_at"] >= 0
    assert written[0]["config_digest"] == written[1]["config_digest"]  # the pair's key
    # the two trainings were separate runs, each with the seed it names
    seeds = tmp_path / "runs"
    configs = [json.loads(p.read_text())["config"] for p in seeds.rglob("run.json")]
    assert sorted(c["train"]["learning_rate"] for c in configs)[0] == 0.01
    assert len(configs) == 2 and all(c["train"]["seed"] == 0 for c in configs)

    table = rows.with_suffix(".md").read_text()
    assert table.startswith("# A change to ") and f"`{change}`" in table
    assert "\n| 0 | " in table
    assert "too few seeds for a finding (1 of 5)" in table

    assert run() == written  # a rerun skips the finished pair
