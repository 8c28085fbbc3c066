"""Evaluation reports: a Markdown table like the paper's Table 6 and matplotlib plots."""

import pathlib


def markdown_table(voc_result, *, title=None):
    """mAP and per-class AP (in %, one decimal) as a one-row Markdown table, as in Table 6.

    A class without ground truth shows "n/a" and is left out of the mean.
    """
    names = [c.name for c in voc_result.classes]
    cells = ["n/a" if c.ap is None else f"{100 * c.ap:.1f}" for c in voc_result.classes]
    mean = "n/a" if voc_result.mean_ap is None else f"{100 * voc_result.mean_ap:.1f}"
    metric = "VOC07 11-point" if voc_result.use_07_metric else "area under PR curve"
    lines = []
    if title:
        lines += [f"### {title}", ""]
    lines += [
        "| mAP | " + " | ".join(names) + " |",
        "|---" * (len(names) + 1) + "|",
        f"| {mean} | " + " | ".join(cells) + " |",
        "",
        f"AP in %, IoU >= {voc_result.iou_threshold:g}, {metric}, {voc_result.num_images} images.",
    ]
    return "\n".join(lines) + "\n"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_precision_recall(voc_result, directory):
    """One PNG per class (`pr_<class>.png`) with its precision-recall curve; returns the paths."""
    plt = _pyplot()
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for c in voc_result.classes:
        fig, ax = plt.subplots(figsize=(4, 4))
        if c.ap is None:
            ax.text(0.5, 0.5, "no ground truth", ha="center", va="center")
        else:
            ax.plot(c.recall, c.precision, drawstyle="steps-post")
        ap = "n/a" if c.ap is None else f"{100 * c.ap:.1f}"
        ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision")
        ax.set_title(f"{c.name}: AP {ap} ({c.num_gt} objects)")
        ax.grid(alpha=0.3)
        safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in c.name)
        path = directory / f"pr_{safe}.png"
        fig.savefig(path, dpi=80, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    return paths


def plot_recall_vs_iou(recall_result, path):
    """Recall against IoU threshold, one line per proposal count (Figure 4)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4))
    for n, row in zip(recall_result.num_proposals, recall_result.recall, strict=True):
        ax.plot(recall_result.iou_thresholds, row, marker="o", label=f"{n} proposals")
    ax.set(xlim=(0.5, 1.0), ylim=(0, 1.02), xlabel="IoU", ylabel="recall")
    ax.set_title(f"Proposal recall ({recall_result.num_gt} objects)")
    ax.grid(alpha=0.3)
    ax.legend()
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)
    return path
