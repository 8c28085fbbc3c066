import functools

import chex
import jax
import numpy as np
import pytest
import torch
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler

from frcnn_jax import ops


def split(result, positive, negative):
    """(sampled positives, sampled negatives) as sets, checking the layout contract."""
    indices, valid = np.asarray(result.indices), np.asarray(result.valid)
    num = int(valid.sum())
    assert valid[:num].all() and not valid[num:].any(), "valid must be a prefix"
    assert (indices[num:] == 0).all(), "padded indices must be 0"
    chosen = indices[:num]
    assert len(set(chosen.tolist())) == num, "a candidate was drawn twice"
    is_pos = positive[chosen]
    assert not np.any(is_pos[1:] & ~is_pos[:-1]), "positives must come first"
    assert (positive[chosen] | negative[chosen]).all(), "sampled a candidate that is neither"
    return set(chosen[is_pos].tolist()), set(chosen[~is_pos].tolist())


def masks(num, positives, negatives):
    positive = np.zeros(num, bool)
    negative = np.zeros(num, bool)
    positive[list(positives)] = True
    negative[list(negatives)] = True
    return positive, negative


class SampleBalancedTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_quotas(self):
        sample = self.variant(
            functools.partial(ops.sample_balanced, num_samples=256, positive_fraction=0.5)
        )
        key = jax.random.key(0)
        cases = [
            # (positives, negatives, expected #pos, expected #neg)
            (range(0, 300), range(300, 5000), 128, 128),  # plenty of both
            (range(0, 10), range(300, 5000), 10, 246),  # scarce positives: negatives fill up
            (range(0, 10), range(300, 320), 10, 20),  # scarce both: padding
            (range(0, 300), range(300, 310), 128, 10),  # scarce negatives
            ((), range(300, 5000), 0, 256),  # empty image: all negatives
            ((), (), 0, 0),  # no candidates at all
        ]
        for positives, negatives, num_pos, num_neg in cases:
            positive, negative = masks(5000, positives, negatives)
            pos, neg = split(sample(key, positive, negative), positive, negative)
            self.assertEqual((len(pos), len(neg)), (num_pos, num_neg))

    @chex.variants(with_jit=True, without_jit=True)
    def test_deterministic_for_a_key(self):
        positive, negative = masks(1000, range(0, 100), range(100, 900))
        sample = self.variant(
            functools.partial(ops.sample_balanced, num_samples=64, positive_fraction=0.25)
        )
        first = sample(jax.random.key(1), positive, negative)
        again = sample(jax.random.key(1), positive, negative)
        other = sample(jax.random.key(2), positive, negative)
        np.testing.assert_array_equal(first.indices, again.indices)
        assert not np.array_equal(first.indices, other.indices)

    @chex.variants(with_jit=True, without_jit=True)
    def test_no_sample_size_takes_every_candidate_in_order_whatever_the_key(self):
        positive = np.array([0, 1, 0, 0, 1, 0], bool)
        negative = np.array([1, 1, 0, 1, 0, 0], bool)  # index 1 is both: a positive
        sample = self.variant(
            functools.partial(ops.sample_balanced, num_samples=None, positive_fraction=0.25)
        )
        for key in (jax.random.key(0), jax.random.key(9)):
            result = sample(key, positive, negative)
            np.testing.assert_array_equal(result.indices, np.arange(6))
            np.testing.assert_array_equal(result.valid, [1, 1, 0, 1, 1, 0])
        empty = sample(jax.random.key(0), np.zeros(3, bool), np.zeros(3, bool))
        assert not np.asarray(empty.valid).any()

    def test_candidates_marked_both_count_as_positive(self):
        positive, negative = masks(10, range(0, 3), range(0, 10))
        result = ops.sample_balanced(
            jax.random.key(0), positive, negative, num_samples=4, positive_fraction=0.5
        )
        pos, neg = split(result, positive, negative & ~positive)
        self.assertEqual(len(pos), 2)
        self.assertTrue(neg.isdisjoint(range(0, 3)))

    def test_every_candidate_equally_likely(self):
        # 40 positives drawn 8 at a time and 100 negatives drawn 8 at a time, over 5000 keys.
        # Chi-square statistics against uniform; critical values at p = 0.001 for 39 and 99
        # degrees of freedom are 72.05 and 148.23.
        positive, negative = masks(300, range(10, 50), range(100, 200))
        keys = jax.random.split(jax.random.key(3), 5000)
        results = jax.jit(
            jax.vmap(
                lambda k: ops.sample_balanced(
                    k, positive, negative, num_samples=16, positive_fraction=0.5
                )
            )
        )(keys)
        indices = np.asarray(results.indices)[np.asarray(results.valid)]
        counts = np.bincount(indices, minlength=300)
        for group, critical in ((range(10, 50), 72.05), (range(100, 200), 148.23)):
            observed = counts[list(group)]
            expected = observed.sum() / len(group)
            chi2 = ((observed - expected) ** 2 / expected).sum()
            assert chi2 < critical, f"chi-square {chi2:.1f} >= {critical}"
        assert counts[:10].sum() == 0 and counts[50:100].sum() == 0 and counts[200:].sum() == 0

    def test_equals_torchvision_when_everything_fits(self):
        rng = np.random.default_rng(0)
        labels = rng.choice([-1, 0, 1], size=400, p=[0.8, 0.15, 0.05])
        positive, negative = labels == 1, labels == 0
        sampler = BalancedPositiveNegativeSampler(256, 0.5)
        (pos_mask,), (neg_mask,) = sampler([torch.from_numpy(labels)])
        result = ops.sample_balanced(
            jax.random.key(0), positive, negative, num_samples=256, positive_fraction=0.5
        )
        pos, neg = split(result, positive, negative)
        self.assertEqual(pos, set(np.flatnonzero(pos_mask.numpy()).tolist()))
        self.assertEqual(neg, set(np.flatnonzero(neg_mask.numpy()).tolist()))

    def test_bad_input(self):
        key = jax.random.key(0)
        with pytest.raises(ValueError, match=r"positive, negative must have the same length"):
            ops.sample_balanced(
                key, np.ones(5, bool), np.ones(6, bool), num_samples=2, positive_fraction=0.5
            )
        with pytest.raises(ValueError, match=r"positive_fraction must lie in \[0, 1\]"):
            ops.sample_balanced(
                key, np.ones(5, bool), np.ones(5, bool), num_samples=2, positive_fraction=2.0
            )
