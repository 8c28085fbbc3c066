"""Which half of a detector holds it back: the RPN of one training scheme's detector feeding the
Fast R-CNN of another's, on the paper tables' trained weights.

    python experiments/swap_proposals.py [--seeds 0,1,2,3,4] [--config configs/shapes_tiny.py]
        [--steps 2000] [--start pretrained] [--rows experiments/results_paper.jsonl]
        [--out experiments/results_swap_proposals.jsonl]

For each seed and each ordered pair of the training-schemes table's rows (`SCHEMES`), the hybrid
detector takes the proposals of one training (its backbone and RPN head, as an RPN with its own
features: `model.rpn.shared_features` False) and the detection network of the other (its
backbone, box head and predictor), and is evaluated as the tables evaluate (mAP@0.5 and the
RPN's recall on the test split). A hybrid of a training with itself is that training's own
detector: its mAP must equal the table's row (checked). If swapping in approximate joint's
proposals lifts another scheme's detection network to joint's mAP, the gap between them is the
proposals'; if not, the detection network's. Every evaluation is a line of `--out` (a rerun
skips the finished ones); the table goes next to it (`.md`). Seed 0 is left out by default: its
joint detector was trained again on another machine after its schemes row (the row's weights
are gone, so its hybrids could not be checked against the row).
"""

import argparse
import pathlib

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


def hybrid(rpn_variables, detector_variables):
    """Variables of an unshared-features detector: the RPN (its own backbone and head) from
    `rpn_variables`, the detection network from `detector_variables`."""
    rpn, det = rpn_variables["params"], detector_variables["params"]
    params = {k: det[k] for k in DETECTION}
    params["rpn_backbone"], params["rpn_head"] = rpn["backbone"], rpn["rpn_head"]
    return {"params": params}


def markdown(found, command):
    lines = ["# Swapping proposals between training schemes", ""]
    lines += result_rows.provenance(command)
    names = list(SCHEMES.values())
    lines += [
        "mAP@0.5 (%) of the detection network of the row's training on the proposals of the "
        "column's training, mean over the seeds (their count); the diagonal is each training's "
        "own detector. RPN recall@0.7 of the top 300 proposals in brackets (the column's RPN).",
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
    parser.add_argument("--rows", default=str(ROOT / "experiments" / "results_paper.jsonl"))
    parser.add_argument("--out", default=str(ROOT / "experiments" / "results_swap_proposals.jsonl"))
    args = parser.parse_args()
    paper_rows, out = Rows(args.rows), Rows(args.out)
    base = paper_tables.scaled(
        paper_tables.paper_setting(config_from_file(args.config)), args.steps
    )
    mesh = sharding.data_mesh()
    label = {short: long for long, short in SCHEMES.items()}
    for seed in (int(s) for s in args.seeds.split(",")):
        table = {}
        for long, short in SCHEMES.items():
            row = paper_rows.find(table="schemes", row=long, seed=seed, setting=args.setting)
            if row and row[-1]["map"] is not None:
                table[short] = row[-1]
        for det in table:
            for rpn in table:
                if out.find(seed=seed, detector=det, rpn=rpn, setting=args.setting):
                    continue
                config = paper_tables.with_fields(
                    base,
                    (
                        ("train.seed", seed),
                        ("model.rpn.shared_features", False),
                        ("eval.proposal_recall", True),
                    ),
                )
                variables = hybrid(
                    paper_tables.restore(table[rpn]["workdir"], mesh),
                    paper_tables.restore(table[det]["workdir"], mesh),
                )
                result = training.evaluation.evaluate(
                    config, build_model(config), jax.device_put(variables), mesh
                )
                found = {
                    "seed": seed,
                    "detector": det,
                    "rpn": rpn,
                    "setting": args.setting,
                    "map": result["voc"]["mAP"],
                    "recall_0.70": result["recall"]["recall@300"]["0.70"],
                    "detector_training": table[det]["training_id"],
                    "rpn_training": table[rpn]["training_id"],
                }
                if det == rpn and abs(found["map"] - table[det]["map"]) > 1e-6:
                    raise SystemExit(
                        f"seed {seed}: {label[det]}'s own detector as a hybrid gives "
                        f"{found['map']:.6f}, its row {table[det]['map']:.6f}"
                    )
                out.add(found)
                print(f"seed {seed}: {det} on {rpn}'s proposals: {found['map']:.4f}", flush=True)
    command = "python experiments/swap_proposals.py"
    pathlib.Path(args.out).with_suffix(".md").write_text(markdown(out.all, command))


if __name__ == "__main__":
    main()
