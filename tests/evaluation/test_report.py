import numpy as np

from frcnn_jax.evaluation import (
    ProposalRecall,
    VOCEvaluator,
    markdown_table,
    plot_precision_recall,
    plot_recall_vs_iou,
)


def _result():
    evaluator = VOCEvaluator(["cat", "dog/wolf", "bird"])
    gt = np.array([[0, 0, 10, 10], [20, 20, 40, 40]], np.float32)
    det = np.array([[0, 0, 10, 10], [20, 20, 30, 30], [50, 50, 60, 60]], np.float32)
    evaluator.add(det, np.array([0.9, 0.8, 0.7]), np.array([1, 2, 1]), gt, np.array([1, 2]))
    return evaluator.result()


def test_markdown_table_like_table_6():
    text = markdown_table(_result(), title="shapes test")
    lines = text.splitlines()
    assert lines[0] == "### shapes test"
    assert lines[2] == "| mAP | cat | dog/wolf | bird |"
    # cat: 1 TP then 1 FP -> AP 1; dog: IoU 0.25 -> FP -> AP 0; bird: no ground truth
    assert lines[4] == "| 50.0 | 100.0 | 0.0 | n/a |"
    assert "VOC07 11-point" in text and "1 images" in text


def test_plots_are_written(tmp_path):
    paths = plot_precision_recall(_result(), tmp_path / "pr")
    assert [p.name for p in paths] == ["pr_cat.png", "pr_dog_wolf.png", "pr_bird.png"]
    recall = ProposalRecall(num_proposals=(1, 2))
    recall.add(np.array([[0, 0, 10, 10], [0, 0, 5, 5]], np.float32), np.array([[0, 0, 10, 10.0]]))
    path = plot_recall_vs_iou(recall.result(), tmp_path / "recall.png")
    for p in [*paths, path]:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 1000
