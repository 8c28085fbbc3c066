"""experiments/paper_report.py: the paper tables' statistics, verdicts and Markdown, from rows
alone (no training, no JAX), and RESULTS.md's generated tables equal to the committed rows."""

import argparse
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
import paper_report  # noqa: E402
from result_rows import Rows  # noqa: E402

sys.path.remove(str(ROOT / "experiments"))


def test_paired_differences_their_interval_and_verdicts():
    # hand-worked: +1, +2, +3 points: mean 2, sd 1, se 1/sqrt(3), t(0.975, 2) = 4.3027: the
    # interval 2 -+ 2.484; t = 3.464, p = 0.0742
    result = paper_report.compare([1.0, 2.0, 3.0], shared=True)
    assert abs(result["low"] - (2 - 4.302653 / 3**0.5)) < 1e-4, result
    assert abs(result["p"] - 0.07418) < 1e-4 and not result["finding"], result
    result = paper_report.compare([2.0, 2.5, 3.0], shared=True)  # [+1.26, +3.74]: a finding
    assert result["finding"] and result["low"] > 0
    assert paper_report.verdict(result, 1.2) == "agrees in sign"
    assert paper_report.verdict(result, -0.8) == "disagrees in sign"
    assert paper_report.verdict(result, None) == "finding (the paper has no figure)"
    # a row with its own training needs 5 seeds, however clear its 3 are
    assert not paper_report.compare([2.0, 2.5, 3.0], shared=False)["finding"]
    assert paper_report.compare([2.0, 2.5, 3.0, 2.2, 2.8], shared=False)["finding"]
    no_difference = paper_report.compare([-1.0, 1.0, 0.5], shared=True)
    assert paper_report.verdict(no_difference, 2.0) == "no difference found"
    three = paper_report.compare([2.0, 2.5, 3.0], shared=False)
    assert paper_report.verdict(three, 2.0) == "too few seeds (3 of 5)"
    assert paper_report.compare([4.0], shared=True)["low"] is None  # one seed: no interval


def row(label, seed, value, **more):
    return {
        "row": label,
        "seed": seed,
        "map": value,
        "paper": None,
        "workdir": f"{label}{seed}",
        "train_minutes": 1.0,
        **more,
    }


def test_a_diverged_training_is_named_and_left_out_of_means_and_comparisons():
    ten, one, hundred = "lambda = 10 (w 1)", "lambda = 1 (w 0.1)", "lambda = 100 (w 10)"
    mine = [row(ten, s, v) for s, v in ((0, 0.70), (2, 0.72))]
    mine.append(row(ten, 1, None, diverged_at=66))
    mine += [row(one, s, v) for s, v in ((0, 0.68), (1, 0.50), (2, 0.69))]
    mine.append(row(hundred, 0, None, diverged_at=9))
    found = paper_report.summaries("9", mine)
    assert found[ten]["seeds"] == "0,2; diverged: 1 (step 66)", found
    assert abs(found[ten]["mean"] - 71.0) < 1e-9
    assert abs(found[one]["mean"] - 187 / 3) < 1e-9  # seed 1 counts in its own mean
    assert found[one]["test"].startswith("-2.5 [")  # but pairs only with seeds 0 and 2
    assert found[hundred]["mean"] is None and found[hundred]["diverged"] == 1
    every = argparse.Namespace(all=[{**r, "table": "9", "setting": "s"} for r in mine])
    text = paper_report.markdown("9", every, "s")
    assert f"| {hundred} | diverged: 0 (step 9) | - |" in text, text
    assert "| - (0, 1 diverged) |" in paper_report.side_by_side("9", every)


def timed(pairs):
    """Schemes rows of (joint, alternating with the paper's lengths) minutes, one per seed."""
    label = paper_report.PAPER_ALTERNATING + " (80k/40k/80k/40k per 70k joint)"
    out = []
    for seed, (joint, alternating) in enumerate(pairs):
        out.append({"row": "approximate joint", "seed": seed, "map": 0.5, "train_minutes": joint})
        out.append({"row": label, "seed": seed, "map": 0.5, "train_minutes": alternating})
    return out


def test_the_schemes_time_claim_is_tested_by_seed_against_the_papers_range():
    inside = timed([(10.0, 16.0), (10.0, 15.0), (11.0, 16.0), (10.0, 14.0), (10.5, 15.5)])
    own_length = {"row": "4-step alternating", "seed": 0, "map": 0.5, "train_minutes": 5.0}
    said = paper_report.time_saving([*inside, own_length])  # 28.6-37.5% less by seed
    assert said.startswith(
        "Training time (whole trainings): approximate joint took 32.6% less [28."
    )
    assert said.endswith("; inside the paper's 25-50%."), said
    assert "too few seeds (4 of 5)" in paper_report.time_saving(inside[2:])
    below = timed([(10.0, 11.0), (10.0, 11.5), (10.0, 11.2), (10.0, 10.8), (10.0, 11.1)])
    assert paper_report.time_saving(below).endswith("; below the paper's 25-50%.")
    edge = timed([(10.0, 18.0), (10.0, 22.0), (10.0, 19.0), (10.0, 21.0), (10.0, 20.0)])
    assert "not decided: the interval crosses an edge" in paper_report.time_saving(edge)
    assert paper_report.time_saving(inside[::2]) == ""  # no paper-length alternating training
    # the trainings' loop times when both of a seed's records have them: 9 of 18 minutes
    records = [
        {"id": "j", "loop_seconds": {"": 540.0}},
        {"id": "a", "loop_seconds": {"p1": 1080.0}},
    ]
    looped = [{**r, "training_id": "j" if r["row"] == "approximate joint" else "a"} for r in inside]
    said = paper_report.time_saving(looped[:2], records)
    assert said.startswith("Training time (training loops): approximate joint took 50.0% less (1")
    said = paper_report.time_saving(looped[:2], records[:1])  # one record lacks them: the rows'
    assert said.startswith("Training time (whole trainings): approximate joint took 37.5% less")
    # joint trained again (on another machine): the record finished nearest the alternating one
    stamped = [
        {"id": "j", "training": "runs/j", "finished": "2026-01-01T10:00:00", **records[0]},
        {"id": "j#1", "training": "runs/j", "finished": "2026-01-03T10:00:00"},
        {"id": "a", "training": "runs/a", "finished": "2026-01-03T11:00:00", **records[1]},
    ]
    stamped[1]["loop_seconds"] = {"": 600.0}
    said = paper_report.time_saving(looped[:2], stamped)
    assert said.startswith("Training time (training loops): approximate joint took 44.4% less (1")
    stamped[2]["finished"] = "2026-01-01T11:00:00"  # trained beside the first record instead
    assert "took 50.0% less" in paper_report.time_saving(looped[:2], stamped)
    # one line per paper-length row (the batch sizes came later): each paired with joint
    later = [
        {**r, "row": r["row"] + ", batch sizes"} for r in inside if r["row"] != "approximate joint"
    ]
    lines = paper_report.time_saving([*inside, *later[:2]]).split("\n\n")
    assert len(lines) == 2 and "too few seeds (2 of 5)" in lines[1], lines
    assert "per 70k joint), batch sizes, paired by seed" in lines[1]


def test_the_results_pages_tables_are_the_rows():
    """RESULTS.md's generated blocks equal what `paper_report` makes of the committed rows."""
    page = (ROOT / "experiments" / "RESULTS.md").read_text()
    rows = Rows(ROOT / "experiments" / "results_paper.jsonl")
    tables = [match[1] for match in paper_report.BLOCK.findall(page)]
    assert sorted(tables) == sorted(paper_report.TABLES), tables
    for table in tables:
        start = page.index(f"<!-- paper_tables: {table} -->")
        body = page[start:].split("\n", 1)[1].split("<!-- /paper_tables -->", 1)[0]
        assert body == paper_report.block_body(table, rows), (
            f"RESULTS.md's Table {table} differs from results_paper.jsonl: run "
            "`python experiments/paper_report.py`"
        )


def test_the_results_page_rewrites_only_its_blocks(tmp_path):
    mine = [row("lambda = 10 (w 1)", 0, 0.7), row("lambda = 1 (w 0.1)", 0, 0.6)]
    rows = argparse.Namespace(all=[{**r, "table": "9", "setting": "s, 2 steps"} for r in mine])
    page = tmp_path / "RESULTS.md"
    block = "<!-- paper_tables: 9 -->\nold\n<!-- /paper_tables -->"
    page.write_text(f"# t\n\nprose 1\n{block}\nprose 2\n")
    paper_report.write_results_blocks(rows, page)
    text = page.read_text()
    assert text.startswith("# t\n\nprose 1\n<!-- paper_tables: 9 -->\n\n") and "old" not in text
    assert text.endswith("\n<!-- /paper_tables -->\nprose 2\n")
    assert "| lambda = 1 (w 0.1) | - | - | 60.0 (1) | -10.0 (1 seed), too few seeds" in text, text
    paper_report.write_results_blocks(rows, tmp_path / "missing.md")  # no page: nothing written
    assert not (tmp_path / "missing.md").exists()


def test_the_command_rewrites_the_rows_markdown_and_the_results_page_beside_them(
    tmp_path, monkeypatch
):
    rows = Rows(tmp_path / "rows.jsonl")
    for r in [row("lambda = 10 (w 1)", 0, 0.7), row("lambda = 1 (w 0.1)", 0, 0.6)]:
        rows.add({**r, "table": "9", "setting": "s, 2 steps", "config": "configs/x.py"})
    (tmp_path / "RESULTS.md").write_text("<!-- paper_tables: 9 -->\n<!-- /paper_tables -->\n")
    monkeypatch.setattr(sys, "argv", ["paper_report.py", f"--rows={tmp_path / 'rows.jsonl'}"])
    paper_report.main()
    assert (
        "| lambda = 1 (w 0.1) | 0 | 60.0 | - | -10.0 (1 seed) |"
        in (tmp_path / "rows.md").read_text()
    )
    assert "| 60.0 (1) | -10.0 (1 seed), too few seeds" in (tmp_path / "RESULTS.md").read_text()


def test_a_summary_record_gives_an_earlier_training_its_rpn_balance():
    mine = [{**row("lambda = 10 (w 1)", s, 0.7), "training_id": f"t{s}"} for s in (0, 1)]
    final = {"rpn_box": 0.01, "rpn_objectness": 0.05}
    summary = {"summary_of": "t0", "final_losses": final, "from": "t0/metrics.jsonl"}
    rows = argparse.Namespace(all=[*mine, {"training": "t0", "id": "t0"}, summary])
    assert paper_report.rpn_balances(rows, mine) == {"lambda = 10 (w 1)": "0.20 (1 seeds)"}


def test_table_2s_selective_search_rows_take_the_papers_difference_from_its_56_8():
    """The paper's rows other than shared / unshared features test a detector trained on
    Selective Search proposals (56.8 at 300 RPN proposals): their difference is from that, not
    from the jointly trained RPN's 59.9 that is our reference row."""
    figures = {
        "300 proposals (shared features)": 59.9,
        "1000 proposals": 56.3,
        "unshared features, 300 proposals": 58.7,
        "no NMS, 3000 proposals": 55.2,
    }
    mine = [
        {**row(label, seed, 0.7 + 0.01 * seed), "paper": paper}
        for label, paper in figures.items()
        for seed in range(3)
    ]
    found = paper_report.summaries("2", mine)
    assert found["300 proposals (shared features)"]["paper_difference"] is None  # reference
    assert abs(found["1000 proposals"]["paper_difference"] - (56.3 - 56.8)) < 1e-9
    assert abs(found["no NMS, 3000 proposals"]["paper_difference"] - (55.2 - 56.8)) < 1e-9
    assert abs(found["unshared features, 300 proposals"]["paper_difference"] - (58.7 - 59.9)) < 1e-9
    # other tables: the paper's figure for the reference row
    nine = [{**row("lambda = 10 (w 1)", 0, 0.7), "paper": 69.9}]
    nine.append({**row("lambda = 1 (w 0.1)", 0, 0.6), "paper": 68.9})
    assert (
        abs(paper_report.summaries("9", nine)["lambda = 1 (w 0.1)"]["paper_difference"] + 1.0)
        < 1e-9
    )
