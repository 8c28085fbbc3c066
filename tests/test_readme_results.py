"""The README's results table is generated from the results files (experiments/reproduce.py):
it must say what the files say, and each file must name its command, commit, date and
machine."""

import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
import reproduce  # noqa: E402

sys.path.remove(str(ROOT / "experiments"))


def test_the_readme_results_table_is_what_the_results_files_say():
    assert reproduce.readme_block() == reproduce.readme_table(), (
        "the README's results table differs from the results files: run "
        "`python experiments/reproduce.py --readme` (or rerun the figures)"
    )


def test_every_results_file_in_the_table_names_its_command_commit_date_and_machine():
    for figure in reproduce.FIGURES:
        condition, text = reproduce.state(figure)
        if condition in ("missing", "no README line"):
            continue
        assert re.search(r"^Command: `python .+`$", text, re.MULTILINE), figure.results
        assert re.search(
            r"^Commit \w+(-dirty)?, \d{4}-\d\d-\d\dT\d\d:\d\d, .+ cores", text, re.MULTILINE
        ), figure.results
        assert reproduce.field(text, "Code") is not None, figure.results  # stamped by a run


def test_a_figure_is_current_only_at_the_code_it_measured(tmp_path, monkeypatch):
    figure = reproduce.Figure("t", "a test", ("true",), str(tmp_path / "r.md"), code=("setup.cfg",))
    monkeypatch.setattr(reproduce.Figure, "path", property(lambda self: pathlib.Path(self.results)))
    assert reproduce.state(figure)[0] == "missing"
    figure.path.write_text("# t\n\nsome table\n")
    assert reproduce.state(figure)[0] == "no README line"
    figure.path.write_text("# t\n\nREADME: 1.5x\n")
    assert reproduce.state(figure)[0] == "stale"  # never stamped
    reproduce.stamp(figure)
    version = reproduce.code_version(figure)
    assert reproduce.field(figure.path.read_text(), "Code").split()[0] == version
    assert reproduce.state(figure)[0] == ("stale" if version.endswith("-dirty") else "current")
    text = figure.path.read_text().replace(version, "0000000")
    figure.path.write_text(text)  # measured at another version of setup.cfg
    assert reproduce.state(figure)[0] == "stale"
    reproduce.stamp(figure)  # restamped: one Code line
    assert figure.path.read_text().count("Code: ") == 1


def test_the_reproduce_command_lists_every_figure():
    out = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "reproduce.py"), "--list"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    names = [line.split()[0] for line in out.stdout.splitlines()]
    assert names == [f.name for f in reproduce.FIGURES]
