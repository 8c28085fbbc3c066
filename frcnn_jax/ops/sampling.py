"""Balanced sampling of positive and negative candidates with a static sample count.

Each candidate draws a uniform random key and `top_k` picks the largest keys: a uniformly random
subset without a permutation of the whole set (the RPN samples 256 of ~20k anchors per image).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from frcnn_jax.ops import _checks


class SampleResult(NamedTuple):
    """Sampled candidates, padded to a static size.

    indices: int32 [S] positions of the sampled candidates: positives first, then negatives;
      padded entries hold 0, so gathering with them is always safe.
    valid: bool [S] true for real samples.
    """

    indices: jax.Array
    valid: jax.Array


def _random_top(key, candidates, k):
    """Positions of k uniformly random candidates (first), and how many candidates there are."""
    keys = jnp.where(candidates, jax.random.uniform(key, candidates.shape), -1.0)
    _, positions = jax.lax.top_k(keys, k)
    return positions.astype(jnp.int32), candidates.sum(dtype=jnp.int32)


def sample_balanced(key, positive, negative, *, num_samples, positive_fraction):
    """Samples up to `num_samples` candidates, at most a `positive_fraction` of them positive.

    torchvision's `BalancedPositiveNegativeSampler` rule: take min(#positives,
    int(num_samples * positive_fraction)) positives, then fill the rest with negatives while
    they last; within each group every candidate is equally likely.

    Args:
      key: PRNG key; the same key gives the same sample.
      positive: bool [N] candidates labelled positive.
      negative: bool [N] candidates labelled negative. A candidate marked both counts as positive;
        one marked neither (ignored anchors, padding) is never sampled.
      num_samples: S, the static number of output slots (256 for the RPN, 128 or 512 RoIs).
        None: no sampling, every candidate is taken (S = N, in index order, positives and
        negatives valid, the rest padding): a deterministic result, as torchvision's sampler
        gives when its batch size exceeds the candidate count (for parity tests).
      positive_fraction: largest share of positives (0.5 RPN, 0.25 Fast R-CNN).

    Returns:
      `SampleResult(indices int32 [S], valid bool [S])`: valid positives first, then valid
      negatives, then padding (index 0, valid False) when candidates run out.
    """
    _checks.check_rank("positive", positive, 1)
    _checks.check_rank("negative", negative, 1)
    _checks.check_same_length(["positive", "negative"], [positive, negative])
    if num_samples is None:
        return SampleResult(
            jnp.arange(positive.shape[0], dtype=jnp.int32),
            jnp.asarray(positive, bool) | jnp.asarray(negative, bool),
        )
    _checks.check_non_negative_int("num_samples", num_samples)
    _checks.check_unit_interval("positive_fraction", positive_fraction)
    positive = jnp.asarray(positive, bool)
    negative = jnp.asarray(negative, bool) & ~positive
    num_candidates = positive.shape[0]
    max_positives = min(int(num_samples * positive_fraction), num_candidates)
    max_negatives = min(num_samples, num_candidates)
    if max_negatives == 0:
        return SampleResult(jnp.zeros((num_samples,), jnp.int32), jnp.zeros((num_samples,), bool))

    pos_key, neg_key = jax.random.split(key)
    pos_positions, num_pos = _random_top(pos_key, positive, max(max_positives, 1))
    neg_positions, num_neg = _random_top(neg_key, negative, max_negatives)
    num_pos = jnp.minimum(num_pos, max_positives)
    num_neg = jnp.minimum(num_neg, num_samples - num_pos)

    slot = jnp.arange(num_samples)
    from_pos = slot < num_pos
    valid = slot < num_pos + num_neg
    pos_pick = pos_positions[jnp.clip(slot, 0, pos_positions.shape[0] - 1)]
    neg_pick = neg_positions[jnp.clip(slot - num_pos, 0, max_negatives - 1)]
    indices = jnp.where(from_pos, pos_pick, jnp.where(valid, neg_pick, 0))
    return SampleResult(indices, valid)
