"""Which half of a detector holds it back: the RPN of one training feeding the Fast R-CNN of
another, on the paper tables' trained weights.

    python experiments/swap_proposals.py [--table schemes] [--swap NAME=ROW LABEL ...]
        [--seeds 1,2,3,4] [--setting SETTING] [--config configs/shapes_tiny.py] [--steps 2000]
        [--rows experiments/results_paper.jsonl] [--out OUT.jsonl]

For each seed and each ordered pair of the swapped rows of `--table` (default: the training
schemes' approximate joint, 4-step alternating at the paper's lengths and batch sizes and
non-approximate joint, `SCHEMES`), the hybrid detector takes the proposals of one row's training
(its backbone and RPN head, as an RPN with its own features: `model.rpn.shared_features` False)
and the detection network of the other's (its backbone, box head and predictor), and is
evaluated as the tables evaluate (mAP@0.5 and the RPN's recall on the test split). The rows must
agree on their test-time fields and the model fields that shape the weights (they may differ in
training alone, e.g. Table 9's loss weight). A hybrid of a training with itself is that training's
own detector: its mAP must equal the row's (checked). If swapping in approximate joint's
proposals lifts another scheme's detection network to joint's mAP, the gap between them is the
proposals'; if not, the detection network's. Every evaluation is a line of `--out` (a rerun
skips the finished ones; default `experiments/results_swap_proposals.jsonl` for the schemes,
`results_swap_proposals_table<N>.jsonl` for another table); the table goes next to it (`.md`).
Seed 0 is left out by default: its joint detector was trained again on another machine after
its schemes row (the row's weights are gone, so its hybrids could not be checked against the
row).
"""

import argparse
import pathlib
import shlex
import sys

import result_rows
from result_rows import Rows

ROOT = pathlib.Path(__file__).resolve().parents[1]
# the rows whose trainings are swapped (the training-schemes table's labels), short names
SCHEMES = {
    "approximate joint": "joint",
    "4-step alternating, the paper's phase lengths and batch sizes (80k/40k/80k/40k steps of "
    "1/2/1/2 images per 70k of 2)": "alternating",
    "non-approximate joint": "non-approximate",
}
DETECTION = ("backbone", "box_head", "predictor")
SHARED = "model.rpn.shared_features"


def hybrid(rpn_variables, detector_variables):
    """Variables of an unshared-features detector: the RPN (its own backbone and head) from
    `rpn_variables`, the detection network from `detector_variables`."""
    other = (set(rpn_variables) | set(detector_variables)) - {"params"}
    if other:  # e.g. BatchNorm statistics: which half's would be a choice this does not make
        raise SystemExit(f"hybrid: variables other than params ({sorted(other)}) not supported")
    rpn, det = rpn_variables["params"], detector_variables["params"]
    params = {k: det[k] for k in DETECTION}
    params["rpn_backbone"] = rpn.get("rpn_backbone", rpn["backbone"])  # unshared: its own
    params["rpn_head"] = rpn["rpn_head"]
    return {"params": params}


def parse_swaps(pairs):
    """`NAME=ROW LABEL` pairs -> {label: name}."""
    swaps = {}
    for pair in pairs:
        name, sep, label = pair.partition("=")
        if not sep or not name or not label:
            raise SystemExit(f"--swap wants NAME=ROW LABEL, got {pair!r}")
        swaps[label] = name
    return swaps


def hybrid_fields(rows):
    """The config fields every hybrid of `rows` (the tables' `Row`s) is evaluated with: their
    test-time fields and the model fields that shape what the weights compute
    (`frcnn_jax.rundir.MODEL_FIELDS`: anchors, heads, ...), which must agree (an RPN trained
    with other anchors than the detection network it feeds is no comparison), features
    unshared, proposal recall on. Fields that only change training (a loss weight, Table 9's
    `model.rpn.box_weight`, the sampling) may differ: they are the rows' difference."""
    from frcnn_jax.rundir import MODEL_FIELDS

    shaping = {f"model.{field}" for field in MODEL_FIELDS} - {SHARED}
    fields = {
        label: {(k, v) for k, v in row.train if k in shaping}
        | {(k, v) for k, v in row.test if k != SHARED}
        for label, row in rows.items()
    }
    first, *others = fields.values()
    if any(other != first for other in others):
        raise SystemExit(f"the rows differ in model or test fields, no hybrid of them: {fields}")
    return (*sorted(first), (SHARED, False), ("eval.proposal_recall", True))


def markdown(found, table, command):
    lines = [f"# Swapping proposals between trainings (table {table})", ""]
    lines += result_rows.provenance(command)
    names = list(dict.fromkeys(r["detector"] for r in found))
    count = found[0]["proposals"] if found else 0
    lines += [
        "mAP@0.5 (%) of the detection network of the row's training on the proposals of the "
        "column's training, mean over the seeds (their count); the diagonal is each training's "
        f"own detector. In brackets: the RPN's recall at IoU 0.7 of its top {count} proposals.",
        "",
        "| detection network \\ proposals from | " + " | ".join(names) + " |",
        "|---" * (len(names) + 1) + "|",
    ]
    for det in names:
        cells = []
        for rpn in names:
            mine = [r for r in found if r["detector"] == det and r["rpn"] == rpn]
            if not mine:
                cells.append("-")
                continue
            m = sum(r["map"] for r in mine) / len(mine)
            rec = sum(r["recall_0.70"] for r in mine) / len(mine)
            cells.append(f"{100 * m:.1f} ({len(mine)}) [{rec:.3f}]")
        lines.append(f"| {det} | " + " | ".join(cells) + " |")
    lines += ["", "| seed | detection network | proposals from | mAP@0.5 | RPN recall@0.7 |"]
    lines += ["|---|---|---|---|---|"]
    for r in sorted(found, key=lambda r: (r["seed"], r["detector"], r["rpn"])):
        lines.append(
            f"| {r['seed']} | {r['detector']} | {r['rpn']} | {r['map']:.4f} | "
            f"{r['recall_0.70']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main():
    # the runtime first, before JAX starts (importing paper_tables does it too); here rather
    # than at import, so that tests can import `hybrid` without it
    from frcnn_jax.runtime import configure_runtime

    configure_runtime()
    import jax
    import paper_tables

    from frcnn_jax import sharding, training
    from frcnn_jax.config import config_from_file
    from frcnn_jax.models import build_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "shapes_tiny.py"))
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--seeds", default="1,2,3,4")
    parser.add_argument(
        "--setting",
        default="shapes_tiny, 2000 steps, pretrained (pretrain_shapes_tiny_fpn, 3000 steps)",
        help="the paper tables' setting whose trainings are swapped",
    )
    parser.add_argument("--table", default="schemes")
    parser.add_argument(
        "--swap",
        action="append",
        help="NAME=ROW LABEL, once per row swapped (default: the training schemes' rows)",
    )
    parser.add_argument("--rows", default=str(ROOT / "experiments" / "results_paper.jsonl"))
    parser.add_argument("--out", help="rows written (default: by --table)")
    args = parser.parse_args()
    swaps = parse_swaps(args.swap) if args.swap else SCHEMES
    if args.out is None:
        suffix = "" if args.table == "schemes" else f"_table{args.table}"
        args.out = str(ROOT / "experiments" / f"results_swap_proposals{suffix}.jsonl")
    paper_rows, out = Rows(args.rows), Rows(args.out)
    base = paper_tables.scaled(
        paper_tables.paper_setting(config_from_file(args.config)), args.steps
    )
    defined = {row.label: row for row in paper_tables.table_rows(args.table, base)}
    unknown = sorted(set(swaps) - set(defined))
    if unknown:
        raise SystemExit(f"--swap: no such row of table {args.table}: {unknown}")
    fields = hybrid_fields({label: defined[label] for label in swaps})
    mesh = sharding.data_mesh()
    for seed in (int(s) for s in args.seeds.split(",")):
        trained = {}
        for label, name in swaps.items():
            found = paper_rows.find(table=args.table, row=label, seed=seed, setting=args.setting)
            if found and found[-1]["map"] is not None:
                trained[name] = found[-1]
        todo = [
            (det, rpn)
            for det in trained
            for rpn in trained
            if not out.find(
                table=args.table, seed=seed, detector=det, rpn=rpn, setting=args.setting
            )
        ]
        if not todo:
            continue
        config = paper_tables.with_fields(base, (*fields, ("train.seed", seed)))
        model = build_model(config)
        weights = {name: paper_tables.restore(t["workdir"], mesh) for name, t in trained.items()}
        for det, rpn in todo:
            done = dict(seed=seed, detector=det, rpn=rpn, setting=args.setting)
            variables = hybrid(weights[rpn], weights[det])
            result = training.evaluation.evaluate(config, model, jax.device_put(variables), mesh)
            count = config.model.rpn.test_post_nms_top_n
            row = {
                "table": args.table,
                **done,
                "map": result["voc"]["mAP"],
                "proposals": count,
                "recall_0.70": result["recall"][f"recall@{count}"]["0.70"],
                "detector_training": trained[det]["training_id"],
                "rpn_training": trained[rpn]["training_id"],
            }
            if det == rpn and abs(row["map"] - trained[det]["map"]) > 1e-6:
                raise SystemExit(
                    f"seed {seed}: {det}'s own detector as a hybrid gives "
                    f"{row['map']:.6f}, its row {trained[det]['map']:.6f}"
                )
            out.add(row)
            print(f"seed {seed}: {det} on {rpn}'s proposals: {row['map']:.4f}", flush=True)
    command = shlex.join(["python", "experiments/swap_proposals.py", *sys.argv[1:]])
    mine = [r for r in out.all if r.get("setting") == args.setting and r["table"] == args.table]
    pathlib.Path(args.out).with_suffix(".md").write_text(markdown(mine, args.table, command))


if __name__ == "__main__":
    main()
