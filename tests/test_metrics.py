"""Ranking metrics (fedrec.shared.metrics) on vectors small enough to check by hand.

Formulas (the fedrec.shared.metrics docstring): with one relevant item,
rank = 1 + #(other candidates scored >= the target), HR@K = 1[rank <= K],
NDCG@K = 1/log2(rank + 1) if rank <= K else 0, MRR = 1/rank.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedrec.shared import wire
from fedrec.shared.metrics import metrics_from_ranks, rank_of_target, sample_negatives, sampled_rank

NOTHING_SEEN = [np.zeros(0, dtype=np.int64)]


def test_rank_three_gives_hand_computed_metrics() -> None:
    # Prepare: 5 items, the target (item 2) has the 3rd highest score.
    scores = np.array([[0.9, 0.8, 0.7, 0.1, 0.2]])
    target = np.array([2])

    # Execute
    ranks = rank_of_target(scores, target, NOTHING_SEEN)
    m = metrics_from_ranks(ranks)

    # Assert: HR@10 = 1, NDCG@10 = 1/log2(3 + 1) = 0.5, MRR = 1/3.
    assert ranks.tolist() == [3]
    assert m[wire.HR10] == 1.0
    assert m[wire.NDCG10] == pytest.approx(0.5)
    assert m[wire.MRR] == pytest.approx(1 / 3)
    assert m[wire.RECALL20] == 1.0


def test_rank_beyond_the_cutoff_scores_zero_at_k_but_counts_in_mrr() -> None:
    # Prepare: ranks 1, 12 and 25 (by hand: NDCG@10 = (1 + 0 + 0)/3, NDCG@20 adds 1/log2(13)).
    ranks = np.array([1, 12, 25])

    # Execute
    m = metrics_from_ranks(ranks)

    # Assert
    assert m[wire.HR10] == pytest.approx(1 / 3)
    assert m[wire.HR20] == pytest.approx(2 / 3)
    assert m[wire.NDCG10] == pytest.approx(1 / 3)
    assert m[wire.NDCG20] == pytest.approx((1 + 1 / math.log2(13)) / 3)
    assert m[wire.MRR] == pytest.approx((1 + 1 / 12 + 1 / 25) / 3)


def test_ties_count_against_the_target() -> None:
    # Prepare: the target (item 0) ties with items 1 and 2; item 3 is below.
    scores = np.array([[0.5, 0.5, 0.5, 0.1]])

    # Execute
    ranks = rank_of_target(scores, np.array([0]), NOTHING_SEEN)

    # Assert: both tied items are ranked above the target -> rank 3, not 1.
    assert ranks.tolist() == [3]


def test_seen_items_are_excluded_but_the_target_is_kept() -> None:
    # Prepare: items 0 and 1 beat the target (item 2); item 0 was already seen. The target
    # also appears in the seen list (a re-interaction) and must still be ranked.
    scores = np.array([[0.9, 0.8, 0.7, 0.1, 0.2]])
    seen = [np.array([0, 2])]

    # Execute
    ranks = rank_of_target(scores, np.array([2]), seen)

    # Assert: only item 1 is still above the target.
    assert ranks.tolist() == [2]


def test_rank_of_target_is_per_user() -> None:
    # Prepare: two users over the same 4 items, different targets and seen items.
    scores = np.array([[4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0]])
    target = np.array([3, 0])
    seen = [np.array([0]), np.array([], dtype=np.int64)]

    # Execute
    ranks = rank_of_target(scores, target, seen)

    # Assert: user 0: items 1, 2 above (0 excluded) -> 3; user 1: all three above -> 4.
    assert ranks.tolist() == [3, 4]


def test_sampled_rank_counts_only_the_sampled_negatives() -> None:
    # Prepare: target item 0 scores 0.5; negatives 1 (0.9), 2 (0.5, a tie) and 3 (0.1).
    # Item 4 (0.99) beats the target but is not sampled.
    scores = np.array([[0.5, 0.9, 0.5, 0.1, 0.99]])
    negatives = np.array([[1, 2, 3]])

    # Execute
    ranks = sampled_rank(scores, np.array([0]), negatives)

    # Assert: 1 + #(0.9, 0.5 >= 0.5) = 3.
    assert ranks.tolist() == [3]


def test_sample_negatives_avoids_seen_items_and_the_target() -> None:
    # Prepare: 30 items; each of 20 users saw 0..19 and has target 20, so only 21..29 remain.
    rng = np.random.default_rng(0)
    target = np.full(20, 20)
    seen = [np.arange(20)] * 20

    # Execute
    negs = sample_negatives(rng, 30, target, seen, n=9)

    # Assert
    assert negs.shape == (20, 9)
    assert set(negs.ravel().tolist()) == set(range(21, 30))


def test_sample_negatives_refuses_when_too_few_unseen_items() -> None:
    rng = np.random.default_rng(0)

    with pytest.raises(ValueError, match="cannot draw"):
        sample_negatives(rng, 10, np.array([5]), [np.arange(5)], n=5)


def test_metrics_from_no_ranks_raises() -> None:
    with pytest.raises(ValueError, match="no users"):
        metrics_from_ranks([])  # type: ignore[arg-type]


def test_non_finite_scores_are_refused() -> None:
    # Prepare: a diverged model scores everything NaN.
    scores = np.full((1, 4), np.nan)

    # Execute / Assert: metrics must not come out as HR=1, NDCG=inf.
    with pytest.raises(ValueError, match="finite"):
        rank_of_target(scores, np.array([0]), NOTHING_SEEN)
