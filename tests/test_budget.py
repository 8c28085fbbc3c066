"""Schedules fitted to a time budget (`frcnn_jax.training.budget`, `python -m
frcnn_jax.fit_budget`) and the time-to-accuracy experiment that uses them."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from frcnn_jax.config import base_config, torchvision_heads
from frcnn_jax.training import budget
from tests.tiny import write_config_file

ROOT = pathlib.Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.slow  # whole trainings and subprocess runs


def test_fit_to_budget_keeps_the_schedules_shape():
    train = base_config().train
    train.update(num_steps=4000, lr_steps=(3000,), warmup_steps=100)
    # 10 minutes at 2 steps/s: 1200 steps, the decay at 75% of them, the warm-up as it was
    assert budget.fit_to_budget(train, 600, 2.0) == {
        "num_steps": 1200,
        "lr_steps": (900,),
        "warmup_steps": 100,
    }
    train.update(lr_steps=(2000, 3000))
    assert budget.fit_to_budget(train, 1000, 10.0)["lr_steps"] == (5000, 7500)  # longer runs too
    # a budget shorter than the warm-up: half the run warms up, decays stay inside the run
    assert budget.fit_to_budget(train, 10, 1.0) == {
        "num_steps": 10,
        "lr_steps": (5, 8),
        "warmup_steps": 5,
    }
    assert budget.fit_to_budget(train, 0.1, 1.0)["num_steps"] == 1


def test_fit_to_budget_names_what_it_cannot_fit():
    train = base_config().train
    with pytest.raises(ValueError, match="positive budget"):
        budget.fit_to_budget(train, 0, 2.0)
    with pytest.raises(ValueError, match="positive budget"):
        budget.fit_to_budget(train, 60, -1.0)
    train.scheme = "alternating"
    with pytest.raises(ValueError, match="alternating_phase_steps"):
        budget.fit_to_budget(train, 60, 2.0)


def test_time_steps_times_only_the_steps_after_the_warm_up():
    calls, blocked = [], []
    speed = budget.time_steps(
        lambda: calls.append(1) or len(calls), steps=5, warmup=3, block=blocked.append
    )
    assert len(calls) == 8 and blocked == list(range(1, 9))  # every result waited for
    assert speed > 0
    with pytest.raises(ValueError, match="at least one timed step"):
        budget.time_steps(lambda: None, steps=0, warmup=1)


def test_the_printed_flags_parse_back_into_the_config():
    flags = budget.as_flags({"num_steps": 1200, "lr_steps": (900, 1100), "warmup_steps": 100})
    assert flags == [
        "--config.train.num_steps=1200",
        "--config.train.lr_steps=(900,1100,)",
        "--config.train.warmup_steps=100",
    ]
    script = (
        "import sys\n"
        "from absl import flags\n"
        "from ml_collections import config_flags\n"
        f"config_flags.DEFINE_config_file('config', {str(ROOT / 'configs' / 'shapes_tiny.py')!r})\n"
        "flags.FLAGS(sys.argv)\n"
        "t = flags.FLAGS.config.train\n"
        "print(t.num_steps, tuple(t.lr_steps), t.warmup_steps)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, *flags], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.split("\n")[-2] == "1200 (900, 1100) 100"


def test_a_run_speed_adds_compilation_steps_and_checkpoint_saves():
    speed = budget.RunSpeed(first_s=30.0, step_s=0.5, save_s=4.0, probed_steps=96)
    # 1000 steps saving every 400: saves at 400, 800 and the last step
    assert speed.seconds(1000, 400) == 30 + 999 * 0.5 + 3 * 4
    assert speed.seconds(800, 400) == 30 + 799 * 0.5 + 2 * 4  # the last step is a multiple
    for seconds in (34.0, 100.0, 541.5, 600.0, 3600.0):
        steps = speed.steps_within(seconds, 400)
        assert speed.seconds(steps, 400) <= seconds < speed.seconds(steps + 1, 400)
    assert speed.steps_within(1.0, 400) == 1  # shorter than compiling: one step


def test_the_probe_timeline_gives_compilation_steps_and_saves():
    """A loop that compiles for 20 s, then steps at 0.25 s with a record every 12 steps, the
    first quarter slower (the loader starting), then 3 s to write its one checkpoint."""
    times, now = [], 100.0 + 20.0  # step 1 ends at 120.25
    for step in range(12, 97, 12):
        now += (0.4 if step <= 24 else 0.25) * (11 if step == 12 else 12) + (
            0.25 if step == 12 else 0
        )
        times.append((step, now))
    end = now + 3.0
    speed = budget._speed_from(times, 100.0, end)
    assert speed.step_s == pytest.approx(0.25)  # from step 24 (a quarter of 96) on
    assert speed.save_s == pytest.approx(3.0)
    assert speed.first_s == pytest.approx(times[0][1] - 100.0 - 11 * 0.25)
    assert speed.probed_steps == 96


def test_fit_budget_command_measures_the_loop_and_prints_overrides(data_dir, tmp_path):
    config_file = write_config_file(tmp_path / "cfg.py", data_dir)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "frcnn_jax.fit_budget",
            f"--config={config_file}",
            "--minutes=2",
            "--probe_minutes=0.05",
            f"--probe_dir={tmp_path / 'probe'}",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert lines[-3].startswith("measured ") and "steps/s sustained" in lines[-3]
    assert "for 2 minutes of training (budget_minutes: the run re-fits them" in lines[-2]
    fitted = dict(flag.split("=", 1) for flag in lines[-1].split())
    num_steps = int(fitted["--config.train.num_steps"])
    assert float(fitted["--config.train.budget_minutes"]) == 2.0
    assert lines[-2].startswith(f"{num_steps} steps with a checkpoint every")
    assert float(lines[-2].split(" end ")[1].split()[0]) <= 2.0
    assert list((tmp_path / "probe").iterdir()) == []  # the probe's checkpoints deleted
    assert "step 1/" not in out.stderr  # the probe's own progress lines are not shown
    for flags, message in (
        (["--minutes=0"], "--minutes must be > 0"),
        (["--minutes=1", "--config.train.scheme=alternating"], "alternating_phase_steps"),
    ):
        bad = subprocess.run(
            [sys.executable, "-m", "frcnn_jax.fit_budget", f"--config={config_file}", *flags],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=600,
        )
        assert bad.returncode != 0 and message in bad.stderr, bad.stderr[-2000:]


def test_time_to_map_runs_its_search_and_resumes(data_dir, tmp_path):
    """experiments/time_to_map.py end to end with a tiny budget: one recipe per side, the fitted
    schedules, the rows and tables; then, in a second sitting, the race (fitted again, the best
    recipes rerun) and the same-initialisation comparison, which find every search row done and
    train none of them again."""
    # torchvision's RPNHead keeps the FPN's 64 channels (the tiny overrides narrow frcnn_jax's)
    config_file = write_config_file(tmp_path / "cfg.py", data_dir, "c.model.rpn.channels = 64\n")
    rows = tmp_path / "rows.jsonl"
    command = [
        sys.executable,
        str(ROOT / "experiments" / "time_to_map.py"),
        f"--config={config_file}",
        "--recipes=adamw:0.001",
        "--minutes=0.05",
        "--every=0.025",
        "--fit-steps=2",
        "--workers=0",  # loaders in the process: no worker start-ups for 4-image evaluations
        "--eval-images=4",
        f"--rows={rows}",
        # 3-second runs sustain any speed: all count (test_runs_off_their_schedule_... checks
        # the tolerance)
        "--speed-tolerance=100",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        command, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=900
    )
    assert out.returncode == 0, out.stderr[-3000:]
    written = [json.loads(line) for line in rows.read_text().splitlines()]
    assert [(r["kind"], r["side"]) for r in written] == [
        ("fit", "frcnn_jax"),
        ("fit", "torchvision"),
        ("search", "frcnn_jax"),
        ("search", "torchvision"),
    ]
    assert all("batchnorm twin" in r["setting"] for r in written)
    for row in written[2:]:
        assert row["optimizer"] == "adamw" and row["learning_rate"] == 0.001
        assert [m["minutes"] for m in row["marks"]] == [0.025, 0.05]
        assert row["marks"][-1]["steps"] >= row["marks"][0]["steps"] >= 1
        fit = next(r for r in written if r["kind"] == "fit" and r["side"] == row["side"])
        assert row["num_steps"] == fit["num_steps"]  # 3 s at the measured (rounded) speed:
        assert abs(fit["num_steps"] - max(int(3 * fit["steps_per_second"]), 1)) <= 1
    table = rows.with_suffix(".md").read_text()
    assert table.startswith("# Time to accuracy") and "Commit " in table  # provenance
    assert "## Best against best, from the search" in table
    assert "| frcnn_jax | adamw+cosine lr 0.001 |" in table
    race = subprocess.run(
        [*command, "--race", "--race-seeds=0", "--same-init"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=900,
    )
    assert race.returncode == 0, race.stderr[-3000:]
    added = [json.loads(line) for line in rows.read_text().splitlines()][4:]
    assert [(r["kind"], r["side"], r.get("seed")) for r in added] == [
        ("fit", "frcnn_jax", None),  # this sitting's speed
        ("fit", "torchvision", None),
        ("race-fit", "frcnn_jax", None),
        ("race-fit", "torchvision", None),
        ("race", "frcnn_jax", 0),
        ("race", "torchvision", 0),
        ("same-init", "frcnn_jax", 0),
        ("same-init", "torchvision", 0),
    ]
    assert "search:" not in race.stdout  # the search's rows were all done
    assert added[0]["sitting"] != written[0]["sitting"]
    for fit in added[2:4]:  # corrected by what the side's search run sustained
        search = next(r for r in written[2:] if r["side"] == fit["side"])
        first = next(r for r in written[:2] if r["side"] == fit["side"])
        ratio = search["steps_per_second"] / first["steps_per_second"] or 1.0  # 0: one step
        assert abs(fit["sustained_ratio"] - ratio) < 2e-3
        assert abs(fit["steps_per_second"] - fit["measured_steps_per_second"] * ratio) < 2e-2
    same = added[-2:]  # the same steps on both sides: frcnn_jax's fitted schedule
    assert [m["steps"] for m in same[0]["marks"]] == [m["steps"] for m in same[1]["marks"]]
    assert same[0]["marks"][-1]["steps"] == added[0]["num_steps"]  # this sitting's schedule
    table = rows.with_suffix(".md").read_text()
    assert "## Best against best: the race" in table and "+- " in table
    assert "## Per-step learning from the same initial weights" in table


def test_the_search_extends_its_grid_until_the_best_rate_is_inside(monkeypatch):
    monkeypatch.setenv("FRCNN_JAX_MALLOC", "default")  # the script's import: no re-execution
    sys.path.insert(0, str(ROOT / "experiments"))
    try:
        import time_to_map
    finally:
        sys.path.remove(str(ROOT / "experiments"))

    class Rows:
        def __init__(self, results):
            self.rows = [
                {"side": "s", "optimizer": "sgd", "learning_rate": lr, "marks": [{"map": m}]}
                for lr, m in results.items()
            ]

        def counted(self, kind):
            return self.rows

    grid = time_to_map.GRID["sgd"]
    assert time_to_map.next_rate(Rows({}), "s", "sgd") == grid[0]
    assert time_to_map.next_rate(Rows({0.02: 0.5}), "s", "sgd") == grid[1]
    assert time_to_map.next_rate(Rows({0.01: 0.3, 0.02: 0.5, 0.04: 0.4}), "s", "sgd") is None
    assert time_to_map.next_rate(Rows({0.01: 0.3, 0.02: 0.5, 0.04: 0.6}), "s", "sgd") == 0.08
    assert time_to_map.next_rate(Rows({0.01: 0.6, 0.02: 0.5, 0.04: 0.4}), "s", "sgd") == 0.005
    zeros = {0.01: 0.0, 0.02: 0.0, 0.04: 0.0}  # ties: the lowest rate, extended downwards
    assert time_to_map.next_rate(Rows(zeros), "s", "sgd") == 0.005
    six = {0.0025: 0.7, 0.005: 0.6, 0.01: 0.5, 0.02: 0.4, 0.04: 0.3, 0.08: 0.2}
    assert time_to_map.next_rate(Rows(six), "s", "sgd") is None  # the limit
    # the twin follows the config's RPN box weight on its loss dict; not another normaliser
    config = base_config()
    torchvision_heads(config.model)
    config.model.update(backbone="tiny_fpn")
    config.model.rpn.update(channels=64, box_weight=10.0)
    time_to_map.check_twin_settings(config)
    losses = {"loss_objectness": 0.5, "loss_rpn_box_reg": 0.25, "loss_classifier": 1.0}
    assert time_to_map.twin_loss(losses, config) == 0.5 + 2.5 + 1.0
    config.model.rpn.box_normalizer = 2400.0
    with pytest.raises(SystemExit, match="box_normalizer"):
        time_to_map.check_twin_settings(config)


def test_time_to_map_rows_survive_a_retuned_optimizer_but_not_other_values(tmp_path, monkeypatch):
    """The search sets optimizer, schedule and rate on every run: the config's own choice of
    them does not key the rows; any other value does."""
    monkeypatch.setenv("FRCNN_JAX_MALLOC", "default")  # the script's import: no re-execution
    sys.path.insert(0, str(ROOT / "experiments"))
    try:
        import time_to_map
    finally:
        sys.path.remove(str(ROOT / "experiments"))

    def key(config):
        return time_to_map.Rows(tmp_path / "rows.jsonl", "a setting", config, 0.15).code

    config = base_config()
    first = key(config)
    config.train.update(optimizer="adamw", lr_schedule="cosine", learning_rate=1e-3)
    assert key(config) == first
    config.train.warmup_steps += 1
    assert key(config) != first


def test_runs_off_their_schedule_do_not_count_and_run_again_in_another_sitting(
    tmp_path, monkeypatch
):
    """A run that sustained a speed far from the one its schedule was fitted to (the machine
    slowed under it) stays in the rows but counts for nothing: not in the grid's extension,
    not the best recipe, not in the race's speed correction; rows of before the per-sitting
    fits are judged against their code's one fit."""
    monkeypatch.setenv("FRCNN_JAX_MALLOC", "default")  # the script's import: no re-execution
    sys.path.insert(0, str(ROOT / "experiments"))
    try:
        import time_to_map
    finally:
        sys.path.remove(str(ROOT / "experiments"))

    path = tmp_path / "rows.jsonl"
    rows = time_to_map.Rows(path, "a setting", base_config(), 0.15)

    def search(lr, speed, final, **fields):
        marks = [{"minutes": 20.0, "steps": 100, "map": final}]
        return rows.add(
            "search", side="s", optimizer="sgd", learning_rate=lr, seed=0, marks=marks,
            steps_per_second=speed, load_average=2.0, **fields,
        )  # fmt: skip

    rows.add("fit", side="s", steps_per_second=2.0, num_steps=2400)  # a fit of before sittings
    slow = search(0.04, 1.6, 0.9)  # 0.80 of its fit's speed: its schedule ended late
    on = [search(0.02, 1.9, 0.5), search(0.01, 2.0, 0.3, fit_steps_per_second=2.0)]
    fast = search(0.005, 2.0, 0.8, fit_steps_per_second=1.5)  # its own fit: 1.33x it
    assert rows.fitted_speed(slow) == 2.0 and rows.fitted_speed(fast) == 1.5
    assert [rows.on_schedule(r) for r in (slow, *on, fast)] == [False, True, True, False]
    assert rows.counted("search") == on
    # the best counted rate is the highest tried: the grid goes on past the uncounted 0.04
    assert time_to_map.next_rate(rows, "s", "sgd") == 0.04
    assert time_to_map.best(rows.counted("search"), "s") is on[0]
    assert time_to_map.sustained_ratio(rows, "s", "sgd") == pytest.approx((0.95 + 1.0) / 2)
    assert time_to_map.Rows(path, "a setting", base_config(), 0.25).counted("search") == [
        slow,
        *on,
    ]  # a wider tolerance counts the slow run
    table = time_to_map.tables(rows, "cmd", "batchnorm")
    assert "| s | sgd+step lr 0.04 (not counted) |" in table and "| 1.60 (0.80) |" in table


def test_the_readme_line_waits_for_every_race_seed_and_the_same_init_comparison(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("FRCNN_JAX_MALLOC", "default")  # the script's import: no re-execution
    sys.path.insert(0, str(ROOT / "experiments"))
    try:
        import time_to_map
    finally:
        sys.path.remove(str(ROOT / "experiments"))

    rows = time_to_map.Rows(tmp_path / "rows.jsonl", "a setting", base_config(), 0.15)

    def run(kind, side, seed, final):
        return rows.add(
            kind, side=side, optimizer="adamw", learning_rate=1e-3, seed=seed,
            marks=[{"minutes": 20.0, "steps": 100, "map": final}], steps_per_second=2.0,
            fit_steps_per_second=2.0, load_average=2.0, first_step_s=1.0, data_s=1.0,
            step_s=50.0, eval_s=5.0,
        )  # fmt: skip

    for side in time_to_map.SIDES:
        run("search", side, 0, 0.5)
        run("race", side, 0, 0.5)
    assert "README:" not in time_to_map.tables(rows, "cmd", "batchnorm", (0, 1))  # seed 1 left
    for side in time_to_map.SIDES:
        run("race", side, 1, 0.7)
    assert "README:" not in time_to_map.tables(rows, "cmd", "batchnorm", (0, 1))  # same-init left
    for side in time_to_map.SIDES:
        run("same-init", side, 0, 0.4)
    table = time_to_map.tables(rows, "cmd", "batchnorm", (0, 1))
    assert "README: mAP@0.5 after 20 training minutes" in table and "2 seeds: 0.600" in table
