"""What the paper tables' rows say: the tables' definitions shared with the runs (`TABLES`,
`TITLES`, each table's `REFERENCE` row), the statistics (paired differences from the
reference with a 95% t-interval, `compare`; verdicts against the paper's direction,
`verdict`; the schemes' time claim, `time_saving`) and the Markdown: each setting's table
(`markdown`), the settings side by side (`side_by_side`), `results_paper.md`
(`write_tables`) and the generated blocks of `RESULTS.md` (`write_results_blocks`).

    python experiments/paper_report.py [--rows experiments/results_paper.jsonl]

rewrites the rows' `.md` and the blocks of the `RESULTS.md` beside them (which
`experiments/paper_tables.py` also does after every run). It reads rows only, imports no JAX
and trains nothing.
"""

import argparse
import collections
import datetime
import math
import pathlib
import re
import statistics

from result_rows import Rows
from scipy import stats

ROOT = pathlib.Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------- the tables


TABLES = ("2", "8", "9", "10", "fig4", "schemes")


TITLES = {
    "2": "Table 2: proposals and ablations (the paper: ZF; its rows other than shared / unshared "
    "test a detector trained on Selective Search proposals, 56.8 at 300, and their paper "
    "difference is from that 56.8; ours test the joint detector's own RPN)",
    "8": "Table 8: anchors (the paper: VGG-16; 1-scale rows at 256, its 128 rows: 65.8 / 68.8)",
    "9": "Table 9: lambda in equation (1) (the paper: VGG-16)",
    "10": "Table 10: one-stage vs two-stage (the paper, ZF: one stage 53.8 at 1 scale and 53.9 "
    "with 5 test scales against two stages 58.7 at 1 scale, the figures its text compares; "
    "its two-stage RPN has unshared features; it has no two-stage pyramid rows)",
    "fig4": "Figure 4: proposal recall vs IoU (the paper: RPN's recall stays high from 2000 down "
    "to 300 proposals)",
    "schemes": "Training schemes (section 3.2; the paper: approximate joint training gives "
    "results close to 4-step alternating training in 25-50% less training time; no table)",
}


# each table's reference row (the start of its label): the config as it is, or the paper's
# choice; every other row is also shown as its difference from it, seed by seed
REFERENCE = {
    "2": "300 proposals",
    "8": "3 scales, 3 ratios",
    "9": "lambda = 10 ",
    "10": "two-stage (",
    "schemes": "approximate joint",
}


def is_reference(table, label):
    return table in REFERENCE and label.startswith(REFERENCE[table])


# The paper's own reference where it is not its figure for our reference row: Table 2's rows
# other than shared / unshared features test a detector trained on Selective Search proposals
# with RPN proposals at test time, and the paper's 300-proposal figure for that detector is 56.8
# (against 59.9 for the jointly trained RPN, our reference row); their paper difference is from
# it. {table: (the start of the labels it does not apply to, the paper's reference)}
PAPER_REFERENCE = {"2": (("300 proposals", "unshared features"), 56.8)}


def paper_reference_of(table, label, default):
    """The paper's figure that row `label`'s paper difference is taken from."""
    if table in PAPER_REFERENCE:
        not_for, figure = PAPER_REFERENCE[table]
        if not label.startswith(not_for):
            return figure
    return default


LEGACY_BACKBONE = "unrecorded"  # rows from before backbones were recorded: the first record's


def backbone_of(row):
    return row.get("backbone", LEGACY_BACKBONE) if row.get("start") == "pretrained" else None


# ---------------------------------------------------------------- statistics


CONFIDENCE = 0.95


MIN_SEEDS = {"shared weights": 3, "own training": 5}


def compare(differences, shared):
    """The paired differences (points, one per seed) of a row and its table's reference:
    {"n", "mean", "low", "high" (the 95% t-interval of the mean), "p" (two-sided one-sample
    t-test of mean 0), "finding"}. A finding: the interval excludes 0 and at least
    `MIN_SEEDS` seeds back it (3 when the row tests the reference's own weights, whose
    difference holds no training noise of its own; 5 when the row has a training of its own)."""
    n = len(differences)
    mean = statistics.mean(differences) if n else float("nan")
    needed = MIN_SEEDS["shared weights" if shared else "own training"]
    out = {"n": n, "needed": needed, "mean": mean, "low": None, "high": None, "p": None}
    out["finding"] = False
    if n < 2:
        return out
    spread = statistics.stdev(differences) / math.sqrt(n)
    if spread == 0:
        out.update(low=mean, high=mean, p=0.0 if mean else 1.0)
    else:
        half = stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1) * spread
        p = 2 * stats.t.sf(abs(mean) / spread, n - 1)
        out.update(low=mean - half, high=mean + half, p=float(p))
    out["finding"] = n >= needed and (out["low"] > 0 or out["high"] < 0)
    return out


def verdict(result, paper_difference):
    """The comparison's verdict against the paper's own difference (None if it has none)."""
    if result["n"] < result["needed"]:
        return f"too few seeds ({result['n']} of {result['needed']})"
    if not result["finding"]:
        return "no difference found"
    if paper_difference is None:
        return "finding (the paper has no figure)"
    if paper_difference == 0 or (paper_difference > 0) == (result["mean"] > 0):
        return "agrees in sign"
    return "disagrees in sign"


# ---------------------------------------------------------------- Markdown


THRESHOLDS = ("0.50", "0.60", "0.70", "0.80", "0.90")  # Figure 4's IoUs


def summaries(table, mine):
    """{row label: its summary over the seeds} of one setting's rows `mine` of `table`: seeds,
    mean and range of mAP (%), the paired comparison with the reference row (`test`, `said`),
    the paper's figure and difference, training minutes; Figure 4's rows: recall cells. Seeds
    whose training diverged (no mAP) are named and left out of the means and comparisons."""
    diverged = {(r["row"], r["seed"]): r["diverged_at"] for r in mine if r["map"] is None}
    paper_of = {r["row"]: r["paper"] for r in mine}
    mine = [r for r in mine if r["map"] is not None]
    reference = {r["seed"]: 100 * r["map"] for r in mine if is_reference(table, r["row"])}
    reference_weights = {r["seed"]: r["workdir"] for r in mine if is_reference(table, r["row"])}
    paper_reference = next(
        (r["paper"] for r in mine if is_reference(table, r["row"]) and r["paper"] is not None),
        None,
    )
    out = {}
    for label in dict.fromkeys([*(r["row"] for r in mine), *(row for row, _ in diverged)]):
        found = [r for r in mine if r["row"] == label]
        seeds = ",".join(str(r["seed"]) for r in found)
        failed = [f"{seed} (step {step})" for (row, seed), step in diverged.items() if row == label]
        if failed:
            seeds += f"{'; ' if seeds else ''}diverged: {', '.join(failed)}"
        summary = {"seeds": seeds, "n": len(found), "diverged": len(failed)}
        out[label] = summary
        if not found:  # every seed diverged
            summary.update(cells=None, mean=None, spread="-", test="-", said="-", minutes=None)
            summary.update(paper=paper_of[label], paper_difference=None)
            continue
        if table == "fig4":
            recall = [r["recall"] for r in found]
            summary["cells"] = [statistics.mean(x[t] for x in recall) for t in (*THRESHOLDS, "AR")]
            continue
        values = [100 * r["map"] for r in found]
        paper = found[0]["paper"]
        against = paper_reference_of(table, label, paper_reference)
        paper_difference = None if paper is None or against is None else paper - against
        if is_reference(table, label):
            test, said, paper_difference = "reference", "-", None
        else:
            result = compare(
                [100 * r["map"] - reference[r["seed"]] for r in found if r["seed"] in reference],
                shared=all(r["workdir"] == reference_weights.get(r["seed"]) for r in found),
            )
            test, said = described(result), verdict(result, paper_difference)
        summary.update(
            mean=statistics.mean(values),
            spread=f"{min(values):.1f}-{max(values):.1f}" if len(values) > 1 else "-",
            test=test,
            said=said,
            paper=paper,
            paper_difference=paper_difference,
            minutes=statistics.mean(r["train_minutes"] for r in found),
        )
    return out


def setting_rows(table, rows, setting):
    return [r for r in rows.all if r.get("table") == table and r["setting"] == setting]


def markdown(table, rows, setting):
    """`table`'s rows in one setting: the command, each row over the seeds, its test and
    verdict, the paper's figure, training minutes."""
    mine = setting_rows(table, rows, setting)
    first = mine[0] if mine else {}
    seeds = ",".join(str(s) for s in sorted({r["seed"] for r in mine}))
    start = first.get("start", "scratch")
    command = (
        f"python experiments/paper_tables.py --table {table} --config "
        f"{repo_name(first.get('config', '?'))} --steps {first.get('steps', '?')} "
        f"--seeds {seeds} --start {start}"
    )
    if start == "pretrained":
        command += (
            f" --pretrain {repo_name(first['pretrain'])} --pretrain-steps {first['pretrain_steps']}"
        )
    commits = list(dict.fromkeys(r.get("commit") for r in mine))
    made = f"rows made at {commits[0]}" + (f" to {commits[-1]}" if len(commits) > 1 else "")
    backbones = {}
    for r in mine:
        if backbone := backbone_of(r):
            backbones.setdefault(backbone, set()).add(r["seed"])
    if len(backbones) > 1:  # each seed's rows share one (`other_backbone`)
        made += "; backbones: " + ", ".join(
            f"{b} (seeds {','.join(map(str, sorted(s)))})" for b, s in backbones.items()
        )
    lines = [f"### {setting}", "", f"`{command}` ({made})", ""]
    if table == "fig4":
        lines += [
            "| proposals | seeds | " + " | ".join(f"recall@{t}" for t in THRESHOLDS) + " | AR |",
            "|---" * (len(THRESHOLDS) + 3) + "|",
        ]
    else:
        lines += [
            "| row | seeds | ours mAP@0.5 (%) | range | minus reference, 95% CI (p) | verdict | "
            "paper (%) | paper minus reference | training min | RPN box / objectness loss, end "
            f"| {RECALL_COLUMN} |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
    balances, recalls = rpn_balances(rows, mine), proposal_recalls(mine)
    for label, x in summaries(table, mine).items():
        if table == "fig4":
            values = x["cells"] or [None] * (len(THRESHOLDS) + 1)
            cells = " | ".join("-" if c is None else f"{c:.3f}" for c in values)
            lines.append(f"| {label.split(':')[0]} | {x['seeds']} | {cells} |")
            continue
        paper, paper_difference = x["paper"], x["paper_difference"]
        lines.append(
            f"| {label} | {x['seeds']} | {shown(x['mean'])} | {x['spread']} | {x['test']} | "
            f"{x['said']} | {'-' if paper is None else f'{paper:.1f}'} | "
            f"{'-' if paper_difference is None else f'{paper_difference:+.1f}'} | "
            f"{shown(x['minutes'])} | {balances.get(label, '-')} | {recalls.get(label, '-')} |"
        )
    if table == "schemes" and (saving := time_saving(mine, rows.all)):
        lines += ["", saving]
    return "\n".join(lines) + "\n"


# rows of 4-step alternating training with the paper's phase lengths (and since 486bd24 its
# batch sizes): the rows the paper's time claim is tested on
PAPER_ALTERNATING = "4-step alternating, the paper's phase lengths"


PAPER_SAVING = (25.0, 50.0)  # % less training time for approximate joint (section 3.2)


def time_saving(mine, records=()):
    """`time_savings`' lines as one paragraph per line ("" when there is none)."""
    return "\n\n".join(time_savings(mine, records))


def time_savings(mine, records=()):
    """The paper's time claim, tested: how much less training time (%) approximate joint
    training took than 4-step alternating training with the paper's phase lengths, paired by
    seed (both on this machine in one setting), with the 95% t-interval, and whether that
    interval lies inside the paper's 25-50%: one line per such row of `mine` (its label
    named), none for a row without a seed that has both trainings. A training's time is its
    training loops' (`loop_seconds` of its record among `records`: compilation, steps and
    checkpoints, not the data's preparation or the final evaluation) when both of a seed's
    trainings have one, otherwise the rows' `train_minutes`. A joint training trained again
    (on another machine, its weights gone) has several records: the one finished nearest the
    alternating training is timed, so that both sides of a pair ran on one machine."""
    loops = {
        i: sum(x["loop_seconds"].values()) / 60
        for i, x in training_summaries(records).items()
        if x.get("loop_seconds")
    }
    trained = {r.get("id") or r["training"]: r for r in records if "training" in r}

    def nearest(joint_id, alternating_id):
        folder = trained.get(joint_id, {}).get("training")
        when = trained.get(alternating_id, {}).get("finished")
        same = [i for i, r in trained.items() if r["training"] == folder and i in loops]
        if not (when and same):
            return joint_id
        return min(same, key=lambda i: abs(moment(trained[i]["finished"]) - moment(when)))

    joint, alternating = {}, {}
    for r in mine:
        if r["map"] is None:
            continue
        if is_reference("schemes", r["row"]):
            joint[r["seed"]] = r
        elif r["row"].startswith(PAPER_ALTERNATING):
            alternating.setdefault(r["row"], {})[r["seed"]] = r
    lines = []
    for label, by_seed in alternating.items():
        savings, measured = [], set()
        for seed in sorted(joint.keys() & by_seed.keys()):
            alternating_id = by_seed[seed].get("training_id")
            pair = nearest(joint[seed].get("training_id"), alternating_id), alternating_id
            if all(p in loops for p in pair):
                minutes = [loops[p] for p in pair]
                measured.add("training loops")
            else:
                minutes = [joint[seed]["train_minutes"], by_seed[seed]["train_minutes"]]
                measured.add("whole trainings")
            savings.append(100 * (1 - minutes[0] / minutes[1]))
        if savings:
            lines.append(saving_line(savings, measured, label))
    return lines


def moment(stamp):
    """Seconds since the epoch of an ISO timestamp (a record's `finished`)."""
    return datetime.datetime.fromisoformat(stamp).timestamp()


def saving_line(savings, measured, label):
    result = compare(savings, shared=False)
    low, high = PAPER_SAVING
    if result["n"] < result["needed"]:
        said = f"too few seeds ({result['n']} of {result['needed']})"
    elif low <= result["low"] and result["high"] <= high:
        said = f"inside the paper's {low:.0f}-{high:.0f}%"
    elif result["high"] < low or result["low"] > high:
        side = "below" if result["high"] < low else "above"
        said = f"{side} the paper's {low:.0f}-{high:.0f}%"
    else:
        said = f"not decided: the interval crosses an edge of the paper's {low:.0f}-{high:.0f}%"
    if result["low"] is None:
        figure = f"{result['mean']:.1f}% less (1 seed)"
    else:
        figure = f"{result['mean']:.1f}% less [{result['low']:.1f}, {result['high']:.1f}]"
    return (
        f"Training time ({' and '.join(sorted(measured))}): approximate joint took {figure} "
        f"than {label[0].lower() + label[1:]}, paired by seed; {said}."
    )


RECALL_COLUMN = "RPN recall@0.70, top 300 proposals"


def proposal_recalls(mine):
    """{row label: the recall at IoU 0.7 of the RPN's top 300 test proposals, mean over the
    seeds that measured it (rows made before every row measured it have none; the count is
    shown when it is not every seed)}: whether a row's mAP moved with its proposals."""
    found = {}
    for r in mine:
        if "proposal_recall" in r:
            found.setdefault(r["row"], []).append(r["proposal_recall"]["recall@300"]["0.70"])
    seeds = evaluated_seeds(mine)
    return {
        label: f"{statistics.mean(x):.3f}{of_seeds(x, seeds[label])}" for label, x in found.items()
    }


def evaluated_seeds(mine):
    """{row label: how many of its seeds have an mAP (their training did not diverge)}."""
    return collections.Counter(r["row"] for r in mine if r["map"] is not None)


def of_seeds(values, total):
    """' (k seeds)' when a column's `values` come from fewer seeds than the row's `total`."""
    return "" if len(values) == total else f" ({len(values)} seeds)"


def training_summaries(records):
    """{training id: its summary (`final_losses`, `loop_seconds`)}, from the training records
    that carry one and from summary records (`summary_of`: a training recorded before
    summaries existed, summarised later from its metrics.jsonl)."""
    out = {}
    for r in records:
        key = r.get("summary_of") or r.get("id")
        summary = {k: r[k] for k in ("final_losses", "loop_seconds") if k in r}
        if key and summary:
            out[key] = summary
    return out


def rpn_balances(rows, mine):
    """{row label: the ratio of the RPN's box loss (weighted, as in the objective) to its
    objectness loss at the end of each seed's training, mean (range) over the seeds} for the
    rows whose trainings recorded their final losses and have an RPN (the count of seeds shown
    when it is not every seed's): whether the two terms are about equally weighted, the
    paper's rule for lambda."""
    losses = {i: x.get("final_losses") for i, x in training_summaries(rows.all).items()}
    ratios, seeds = {}, evaluated_seeds(mine)
    for r in mine:
        final = losses.get(r.get("training_id")) or {}
        if final.get("rpn_objectness"):
            ratios.setdefault(r["row"], []).append(final["rpn_box"] / final["rpn_objectness"])
    return {
        label: f"{statistics.mean(x):.2f}"
        + (f" ({min(x):.2f}-{max(x):.2f})" if len(x) > 1 else "")
        + of_seeds(x, seeds[label])
        for label, x in ratios.items()
    }


def shown(value):
    """A mean as the tables print it: one decimal, '-' for none (every seed diverged)."""
    return "-" if value is None else f"{value:.1f}"


def column_name(setting):
    """A setting's short name for a side-by-side column: its start ('pretrained', 'from
    scratch', ...) and, for rows of earlier code, 'code before <commit>'."""
    rest = setting.split(" steps", 1)[-1].lstrip(", ")
    start = "from scratch" if not rest or rest.startswith("code before") else rest.split(" (")[0]
    code = re.search(r"code before \w+", rest)
    return start + (f", {code.group()}" if code else "")


def side_by_side(table, rows, columns=None):
    """`table` in the settings `columns` (default: every setting it was run in), one column
    pair per setting: mean mAP (seeds) and the difference from the reference with its
    verdict; the paper's figures first."""
    # the paper's setting first, then from scratch at the current code, then earlier code
    columns = columns or sorted(
        settings(rows, table), key=lambda s: ("pretrained" not in s, "code " in s)
    )
    found = {s: summaries(table, setting_rows(table, rows, s)) for s in columns}
    labels = list(dict.fromkeys(label for s in columns for label in found[s]))
    if table == "fig4":
        head = "| proposals | " + " | ".join(
            f"{column_name(s)}: recall@0.50 / 0.70 / 0.90, AR (seeds)" for s in columns
        )
        lines = [head + " |", "|---" * (len(columns) + 1) + "|"]
        for label in labels:
            cells = []
            for s in columns:
                x = found[s].get(label)
                cells.append(
                    "-"
                    if x is None or x["cells"] is None
                    else " / ".join(f"{x['cells'][i]:.3f}" for i in (0, 2, 4))
                    + f", {x['cells'][5]:.3f} ({x['n']})"
                )
            lines.append(f"| {label.split(':')[0]} | " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"
    head = "| row | paper (%) | paper minus reference | " + " | ".join(
        f"{column_name(s)}: mAP (seeds) | {column_name(s)}: minus reference, verdict"
        for s in columns
    )
    lines = [head + " |", "|---" * (2 * len(columns) + 3) + "|"]
    for label in labels:
        any_row = next(found[s][label] for s in columns if label in found[s])
        paper, difference = any_row["paper"], any_row["paper_difference"]
        cells = [
            "-" if paper is None else f"{paper:.1f}",
            "-" if difference is None else f"{difference:+.1f}",
        ]
        for s in columns:
            x = found[s].get(label)
            if x is None:
                cells += ["-", "-"]
            else:
                said = "" if x["said"] == "-" else f", {x['said']}"
                failed = f", {x['diverged']} diverged" if x["diverged"] else ""
                cells += [f"{shown(x['mean'])} ({x['n']}{failed})", f"{x['test']}{said}"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def repo_name(path):
    """A repo config file as the repo names it (configs/<name>), another path as it is."""
    path = pathlib.Path(path)
    return str(pathlib.Path("configs", path.name)) if path.parent.name == "configs" else str(path)


def described(result):
    """'+2.4 [+0.9, +3.9] (p 0.01)', or the mean alone for one seed, '-' for none."""
    if not result["n"]:
        return "-"
    if result["low"] is None:
        return f"{result['mean']:+.1f} (1 seed)"
    return (
        f"{result['mean']:+.1f} [{result['low']:+.1f}, {result['high']:+.1f}] (p {result['p']:.3f})"
    )


def write_tables(rows, path):
    """Every table of `rows` as Markdown to `path`: its settings side by side, then each
    setting's own table with its command. A RESULTS.md beside `path` gets its generated
    blocks rewritten (`write_results_blocks`)."""
    written = [t for t in TABLES if any(r.get("table") == t for r in rows.all)]
    sections = []
    for table in written:
        parts = [f"## {TITLES[table]}\n", side_by_side(table, rows)]
        parts += [markdown(table, rows, s) for s in settings(rows, table)]
        sections.append("\n".join(parts))
    path.write_text(pretraining_markdown(rows) + "\n".join(sections))
    write_results_blocks(rows, path.parent / "RESULTS.md")


# ---------------------------------------------------------------- RESULTS.md's generated blocks


BLOCK = re.compile(r"(<!-- paper_tables: (\w+) -->\n).*?(<!-- /paper_tables -->)", re.S)


def latest_settings(rows, table):
    """The settings RESULTS.md shows for `table`: for each start (pretrained, from scratch),
    the one its newest row belongs to (earlier code's settings stay in results_paper.md)."""
    latest = {}
    for r in rows.all:
        if r.get("table") == table:
            latest[column_name(r["setting"]).split(",")[0]] = r["setting"]
    return [latest[start] for start in ("pretrained", "from scratch") if start in latest]


def results_block(table, rows):
    """RESULTS.md's generated block of `table`: the paper beside the latest pretrained and
    from-scratch settings, and for the schemes each setting's time comparison."""
    columns = latest_settings(rows, table)
    text = side_by_side(table, rows, columns)
    if table == "schemes":
        for setting in columns:
            for line in time_savings(setting_rows(table, rows, setting), rows.all):
                text += f"\n{column_name(setting)}: {line}\n"
    return text


def write_results_blocks(rows, path):
    """Rewrite each `<!-- paper_tables: T -->` ... `<!-- /paper_tables -->` block of `path`
    (if it exists) with `results_block(T)`: RESULTS.md's tables always equal the rows."""
    if path.is_file():
        text = path.read_text()
        path.write_text(BLOCK.sub(lambda m: m[1] + block_body(m[2], rows) + m[3], text))


def block_body(table, rows):
    """What RESULTS.md holds between `table`'s markers (blank lines keep the table apart from
    the HTML comments in every Markdown renderer)."""
    return "\n" + results_block(table, rows) + "\n"


def pretraining_markdown(rows):
    found = [r for r in rows.all if "pretrain" in r and "table" not in r]
    if not found:
        return ""
    lines = [
        "## Pretraining (the paper's ImageNet step)",
        "",
        "| pretraining config | steps | backbone (weights' SHA-256) | top-1 | top-5 | "
        "held-out images | minutes | made at |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in found:
        again = " (pretrained again)" if r.get("retrained") else ""
        lines.append(
            f"| {repo_name(r['pretrain'])} | {r['pretrain_steps']} | "
            f"{r.get('backbone', LEGACY_BACKBONE)}{again} | {r['top1']:.4f} | "
            f"{r['top5']:.4f} | {r['examples']} | "
            f"{'-' if r['minutes'] is None else format(r['minutes'], '.1f')} | "
            f"{r.get('commit', '?')} |"
        )
    return "\n".join(lines) + "\n\n"


def settings(rows, table):
    """The settings of `table`'s rows, in order."""
    return dict.fromkeys(r["setting"] for r in rows.all if r.get("table") == table)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=str(ROOT / "experiments" / "results_paper.jsonl"))
    args = parser.parse_args()
    write_tables(Rows(args.rows), pathlib.Path(args.rows).with_suffix(".md"))


if __name__ == "__main__":
    main()
