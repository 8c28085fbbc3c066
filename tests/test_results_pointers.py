"""Every figure the documents quote is in a results file they cite: each decimal number in a
section of `experiments/benchmarks.md`, `experiments/RESULTS.md` or the README (outside code)
must be, rounded as quoted, a number of a results file cited in that section or in the
document's preamble (in seconds or milliseconds, as a fraction or a percentage). The few
decimals that are settings, not measurements, are listed with their reason (RESULTS.md's
generated tables are checked against the rows in tests/test_paper_report.py)."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
CITED = re.compile(r"(?:experiments/)?(results_\w+\.(?:md|txt|jsonl))")
DECIMAL = re.compile(r"(?<![\w.@])[-+]?(\d+)\.(\d+)(?![\w.]*\d)")
SCALES = (1, 100, 1000)  # as written; a fraction as a percentage; seconds as milliseconds

# decimals that are settings or others' figures, not our measurements: (document, number): why
NOT_MEASURED = {
    ("README.md", "0.7"): "the RPN's NMS and matching thresholds",
    ("README.md", "0.3"): "the paper's matching and test NMS thresholds",
    ("README.md", "0.5"): "IoU thresholds",
    ("README.md", "2.35"): "a glibc version",
    ("README.md", "37.0"): "torchvision's published COCO box AP of its weights",
}
DOCUMENTS = ("experiments/benchmarks.md", "experiments/RESULTS.md", "README.md")


def sections(text):
    """(heading, text) per heading of any level; the part before the first `## ` heading is
    the preamble, cited by every section."""
    first = re.search(r"^## ", text, flags=re.M)
    preamble = text[: first.start()] if first else text
    parts = re.split(r"\n(?=#+ )", text)
    return preamble, [(part.splitlines()[0], part) for part in parts]


def numbers_of(names, root=ROOT):
    found = set()
    for name in names:
        path = root / "experiments" / name
        assert path.exists(), f"a cited results file does not exist: {path}"
        found.update(float(m.group(0)) for m in re.finditer(r"\d+\.\d+|\d+", path.read_text()))
    return found


def unbacked(document, root=ROOT):
    """The quoted decimals of `document` (relative to `root`) that no results file it cites
    holds."""
    preamble, parts = sections((root / document).read_text())
    missing = []
    for heading, text in parts:
        cited = set(CITED.findall(preamble)) | set(CITED.findall(text))
        available = numbers_of(cited, root)
        prose = re.sub(r"`[^`\n]*`", "", re.sub(r"```.*?```", "", text, flags=re.S))
        for match in DECIMAL.finditer(prose):
            whole, decimals = match.groups()
            quoted = float(f"{whole}.{decimals}")
            if (document, f"{whole}.{decimals}") in NOT_MEASURED:
                continue
            if not any(
                abs(round(value * scale, len(decimals)) - quoted) < 1e-9
                for value in available
                for scale in SCALES
            ):
                missing.append(f"{heading[:60]!r}: {match.group(0)}")
    return missing


@pytest.mark.parametrize("document", DOCUMENTS)
def test_every_quoted_figure_is_in_a_cited_results_file(document):
    missing = unbacked(document)
    assert not missing, f"{document}: figures without a cited results file holding them: {missing}"


def test_the_settings_listed_as_not_measured_are_still_quoted():
    for document, number in NOT_MEASURED:
        assert re.search(rf"(?<![\w.]){re.escape(number)}(?![\d])", (ROOT / document).read_text())


def test_a_figure_no_cited_file_holds_is_found(tmp_path):
    (tmp_path / "experiments").mkdir()
    (tmp_path / "experiments" / "results_x.md").write_text("| op | 0.00353 | 0.4213 | 7 |\n")
    (tmp_path / "page.md").write_text(
        "# t\n\nIntro.\n\n## a\n\nOps (`experiments/results_x.md`): 3.530 ms, 0.42x, 42.1%, 3.5.\n"
        "\n## b\n\nA ratio of 0.777 (`experiments/results_x.md`), and 0.0102 s uncited.\n"
    )
    missing = unbacked("page.md", tmp_path)
    assert missing == ["'## b': 0.777", "'## b': 0.0102"], missing
