"""Rows of a resumable experiment: a JSON-lines file, one finished row per line, so a rerun can
skip what is done and a killed run loses only the row it was working on."""

import argparse
import datetime
import functools
import hashlib
import json
import os
import pathlib
import platform
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


class Rows:
    """The rows of `path` (none if it does not exist yet)."""

    def __init__(self, path):
        self.path = pathlib.Path(path)
        lines = self.path.read_text().splitlines() if self.path.exists() else []
        self.all = [json.loads(line) for line in lines if line.strip()]
        commit()  # rows added later are stamped with the code this process started from

    def find(self, **match):
        """The rows whose fields equal `match`'s, in the order they were added."""
        return [r for r in self.all if all(r.get(k) == v for k, v in match.items())]

    def add(self, row):
        """Append `row` stamped with the time it finished and the commit that made it."""
        row = {
            **row,
            "finished": datetime.datetime.now().isoformat(timespec="seconds"),
            "commit": commit(),
        }
        self.all.append(row)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        return row


@functools.cache
def commit():
    """The checkout's short commit hash when this process first asked (None outside a git
    checkout): the code a long run imported, not a commit made while it ran."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip() or None


def code_version(paths, at=None):
    """The last commit that changed `paths` (relative to the repository root), with "-dirty"
    while they have uncommitted changes: what a resumable experiment keys its rows by, so a
    rerun skips only rows measured at the code it would measure now. `at`: the last commit
    that changed them up to that commit instead (the checkout's changes aside)."""

    def git(*args):
        return subprocess.run(
            ["git", *args, "--", *paths], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()

    if at is not None:
        return git("log", "-1", "--format=%h", at)
    return git("log", "-1", "--format=%h") + ("-dirty" if git("status", "--porcelain") else "")


def config_digest(config, ignore=()):
    """A short fingerprint of `config`'s values but the fields named in `ignore` (dotted paths,
    e.g. "model.init_checkpoint"): rows trained from different values are never mixed."""
    values = config.to_dict()
    for path in ignore:
        *parents, name = path.split(".")
        node = values
        for parent in parents:
            node = node[parent]
        node.pop(name, None)
    text = json.dumps(values, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def machine():
    """This machine in a few words: CPU model, cores, memory."""
    model = platform.processor() or platform.machine()
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        memory = f", {pages / 2**30:.0f} GiB"
    except (OSError, ValueError):
        memory = ""
    return f"{model}, {os.cpu_count()} cores{memory}"


def provenance(command):
    """The Markdown lines a results file starts with: the command that wrote it, the commit,
    the date and the machine."""
    return [
        f"Command: `{command}`",
        "",
        f"Commit {commit()}, {datetime.datetime.now().isoformat(timespec='minutes')}, {machine()}.",
        "",
    ]


def field(text, name):
    """The value of the results file `text`'s first `<name>: ` line (None if it has none)."""
    match = re.search(rf"^{name}: (.*)$", text, re.MULTILINE)
    return match.group(1).strip() if match else None


def complete(text):
    """Whether the results file `text` has its `README:` line: the figure the README's results
    table shows, written once every row it summarises has been measured."""
    return field(text, "README") is not None


def write_report(path, text):
    """Write a resumable experiment's Markdown report `text` to `path` and return the path
    written. While `text` has no `README:` line yet (its rows at the current code are not all
    there) but the file at `path` has one (the figure measured at earlier code), the report
    goes to `<stem>_in_progress.md` beside it instead: the README keeps the earlier figure,
    marked stale by experiments/reproduce.py, until the rerun is complete, which replaces it
    and removes the in-progress file."""
    path = pathlib.Path(path)
    progress = path.with_name(f"{path.stem}_in_progress{path.suffix}")
    if not complete(text) and path.is_file() and complete(path.read_text()):
        progress.write_text(text)
        return progress
    path.write_text(text)
    progress.unlink(missing_ok=True)
    return path


def write_results(path, title, body, readme):
    """Write a results file: `# title`, its provenance (the command that is running, as
    `python <script> <args>`), the `body` lines and the `README: ...` line that
    experiments/reproduce.py puts in the README's results table."""
    script = pathlib.Path(sys.argv[0]).resolve()
    name = script.relative_to(ROOT) if script.is_relative_to(ROOT) else script.name
    command = " ".join(["python", str(name), *sys.argv[1:]])
    lines = [f"# {title}", "", *provenance(command), *body, "", f"README: {readme}", ""]
    pathlib.Path(path).write_text("\n".join(lines))


def clock_time(text):
    """`HH:MM` today (tomorrow if already past) as a time.time() value."""
    try:
        hours, minutes = (int(part) for part in text.split(":"))
        at = datetime.datetime.now().replace(hour=hours, minute=minutes, second=0, microsecond=0)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"--stop-by wants HH:MM, got {text!r}") from error
    if at < datetime.datetime.now():
        at += datetime.timedelta(days=1)
    return at.timestamp()
