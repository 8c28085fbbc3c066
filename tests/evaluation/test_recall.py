import numpy as np
import pytest

from frcnn_jax.evaluation import ProposalRecall, voc_iou


def test_hand_worked_recall():
    gt = np.array([[0, 0, 10, 10], [100, 100, 110, 110], [50, 50, 60, 60]], np.float32)
    proposals = np.array(
        [
            [0, 0, 10, 10],  # rank 1: gt 0 at IoU 1
            [100, 100, 110, 105],  # rank 2: gt 1 at IoU 0.5
            [100, 100, 110, 110],  # rank 3: gt 1 at IoU 1 (only with >= 3 proposals)
        ],
        np.float32,
    )
    recall = ProposalRecall(num_proposals=(1, 2, 3), iou_thresholds=(0.5, 0.9))
    recall.add(proposals, gt)
    result = recall.result()
    # gt 2 is never found
    np.testing.assert_allclose(result.recall, [[1 / 3, 1 / 3], [2 / 3, 1 / 3], [2 / 3, 2 / 3]])
    np.testing.assert_allclose(result.average_recall, [1 / 3, 1 / 2, 2 / 3])
    assert result.num_gt == 3
    assert result.as_dict()["recall@2"] == {"0.50": 2 / 3, "0.90": 1 / 3, "AR": 0.5}


def test_matches_numpy_reference_with_masks(rng):
    recall = ProposalRecall(num_proposals=(5, 50, 1000))
    best_by_n = {5: [], 50: [], 1000: []}
    for _ in range(10):
        xy = rng.uniform(0, 300, (200, 2))
        proposals = np.concatenate([xy, xy + rng.uniform(1, 100, (200, 2))], 1)
        valid = rng.random(200) < 0.8
        xy = rng.uniform(0, 300, (6, 2))
        gt = np.concatenate([xy, xy + rng.uniform(1, 100, (6, 2))], 1)
        gt_valid = np.array([True] * 5 + [False])
        difficult = np.array([False, True, False, False, False, False])
        recall.add(proposals, gt, proposal_valid=valid, gt_valid=gt_valid, gt_difficult=difficult)
        kept = gt[gt_valid & ~difficult]
        for n in best_by_n:
            iou = voc_iou(kept, proposals[valid][:n])
            best_by_n[n].extend(iou.max(axis=1))
    result = recall.result()
    assert result.num_gt == 40
    for i, n in enumerate((5, 50, 1000)):
        best = np.array(best_by_n[n])
        expected = [(best >= t).mean() for t in result.iou_thresholds]
        np.testing.assert_allclose(result.recall[i], expected)
    assert np.all(np.diff(result.recall, axis=0) >= 0)  # more proposals never lose recall
    assert np.all(np.diff(result.recall, axis=1) <= 0)  # stricter IoU never gains recall


def test_no_proposals_and_no_ground_truth():
    recall = ProposalRecall(num_proposals=(10,))
    recall.add(np.zeros((0, 4)), np.array([[0, 0, 5, 5.0]]))
    recall.add(np.zeros((3, 4)), np.zeros((0, 4)))
    result = recall.result()
    assert result.num_gt == 1 and np.all(result.recall == 0)
    empty = ProposalRecall().result()
    assert empty.num_gt == 0 and empty.recall.shape == (4, 10)
    assert empty.iou_thresholds[0] == 0.5 and empty.iou_thresholds[-1] == pytest.approx(0.95)
