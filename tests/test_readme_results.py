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
import result_rows  # noqa: E402

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
        assert result_rows.field(text, "Code") is not None, figure.results  # stamped by a run


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
    assert result_rows.field(figure.path.read_text(), "Code").split()[0] == version
    assert reproduce.state(figure)[0] == ("stale" if version.endswith("-dirty") else "current")
    text = figure.path.read_text().replace(version, "0000000")
    figure.path.write_text(text)  # measured at another version of setup.cfg
    assert reproduce.state(figure)[0] == "stale"
    reproduce.stamp(figure)  # restamped: one Code line
    assert figure.path.read_text().count("Code: ") == 1


def test_a_resumable_report_keeps_the_complete_figure_until_its_rerun_completes(tmp_path):
    path, progress = tmp_path / "r.md", tmp_path / "r_in_progress.md"
    assert result_rows.write_report(path, "# r\n\n1 of 20 runs\n") == path  # nothing before
    assert result_rows.write_report(path, "# r\n\n2 of 20 runs\n") == path  # nor complete
    assert result_rows.write_report(path, "# r\n\nREADME: 1.10x\n") == path
    for done in (1, 2):  # a rerun at new code: the complete figure stays
        assert result_rows.write_report(path, f"# r\n\n{done} of 20 runs\n") == progress
        assert progress.read_text() == f"# r\n\n{done} of 20 runs\n"
        assert path.read_text() == "# r\n\nREADME: 1.10x\n"
    assert result_rows.write_report(path, "# r\n\nREADME: 1.20x\n") == path
    assert path.read_text() == "# r\n\nREADME: 1.20x\n"
    assert not progress.exists()


def test_reproduce_hands_its_stop_by_to_a_resumable_figure_and_waits_for_its_readme_line(
    tmp_path, monkeypatch
):
    """A resumable figure is started whatever its minutes, gets `--stop-by` itself, and is
    stamped only once its report is complete; a figure whose minutes do not fit is not run."""
    log, done = tmp_path / "argv.txt", tmp_path / "complete"
    results = tmp_path / "r.md"
    fake = tmp_path / "fake.py"
    fake.write_text(
        "import pathlib, sys\n"
        f"sys.path.insert(0, {str(ROOT / 'experiments')!r})\n"
        "import result_rows\n"
        f"pathlib.Path({str(log)!r}).open('a').write(' '.join(sys.argv[1:]) + '\\n')\n"
        f"complete = pathlib.Path({str(done)!r}).exists()\n"
        f"result_rows.write_report({str(results)!r}, '# r\\n' + "
        "('README: 1.2x\\n' if complete else 'runs so far\\n'))\n"
    )
    long_one = reproduce.Figure(
        "t", "a test", (sys.executable, str(fake)), str(results), minutes=10**6, resumable=True
    )
    never = reproduce.Figure("u", "another", ("false",), str(tmp_path / "u.md"), minutes=10**6)
    monkeypatch.setattr(reproduce.Figure, "path", property(lambda self: pathlib.Path(self.results)))
    monkeypatch.setattr(reproduce, "FIGURES", (long_one, never))
    monkeypatch.setattr(reproduce, "rewrite_readme", lambda: None)
    monkeypatch.setattr(reproduce, "readme_table", lambda: "")
    argv = ["reproduce.py", "--stop-by", "23:59"]
    monkeypatch.setattr(sys, "argv", argv)
    reproduce.main()  # "u" not started ("false" would fail); "t" runs, incomplete
    assert log.read_text() == "--stop-by 23:59\n"
    assert reproduce.state(long_one)[0] == "no README line"
    done.touch()
    reproduce.main()  # complete now: stamped
    assert reproduce.state(long_one)[0] in ("current", "stale")  # "stale" in a dirty checkout
    assert result_rows.field(results.read_text(), "Code") is not None


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
