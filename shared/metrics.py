"""Ranking metrics for leave-last-out evaluation (pure functions).

One relevant item per user (the held-out last interaction). ``rank`` is 1 + the number of
candidates scored at least as high as the target (ties count against the target), over the
candidates left after excluding the items the user has already seen. Then, per user:

  HR@K     = 1[rank <= K]                 (= Recall@K with one relevant item)
  NDCG@K   = 1 / log2(rank + 1) if rank <= K else 0   (ideal DCG is 1)
  MRR      = 1 / rank                      (full list, no cut-off)

and each metric is the mean over users: RecBole's full-ranking leave-one-out protocol with the
user's known items excluded (the target stays a candidate). RecBole's own sequential evaluation
excludes nothing but padding and breaks ties in ``torch.topk`` order, so its figures compare
with these only when it is run with the same exclusion.

Must not: import ``fedrec.server`` or ``fedrec.client``.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from fedrec.shared import wire


def rank_of_target(
    scores: np.ndarray, target: np.ndarray, exclude: Iterable[np.ndarray]
) -> np.ndarray:
    """Rank of each user's target among the non-excluded items.

    Args:
        scores: (U, N) scores over the whole catalogue.
        target: (U,) item index of each user's held-out item.
        exclude: per user, item indices already seen (never counted; the target itself is
            kept even if it appears here).

    Returns:
        (U,) int64 ranks, 1 = best.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if not np.isfinite(scores).all():
        raise ValueError(
            "scores are not finite (NaN or infinity): the model diverged (lower train.lr) or its "
            "weights are corrupt; refusing to report metrics"
        )
    u = np.arange(len(target))
    t = scores[u, target]  # (U,)
    beats = scores >= t[:, None]  # (U, N)
    for i, seen in enumerate(exclude):
        seen = np.asarray(seen, dtype=np.int64)
        seen = seen[seen != target[i]]
        beats[i, seen] = False
    ranks: np.ndarray = beats.sum(1).astype(np.int64)  # the target counts itself once
    return ranks


def sampled_rank(scores: np.ndarray, target: np.ndarray, negatives: np.ndarray) -> np.ndarray:
    """Rank of the target among itself and sampled negatives ((U, S) indices)."""
    u = np.arange(len(target))
    t = scores[u, target]
    neg = scores[u[:, None], negatives]  # (U, S)
    ranks: np.ndarray = 1 + (neg >= t[:, None]).sum(1).astype(np.int64)
    return ranks


def metrics_from_ranks(ranks: np.ndarray) -> dict[str, float]:
    """HR@10/20, NDCG@10/20, Recall@20 and MRR from ranks (means over users)."""
    r = np.asarray(ranks, dtype=np.float64)
    if r.size == 0:
        raise ValueError("no users to evaluate: every metric would be undefined")

    def hr(k: int) -> float:
        return float((r <= k).mean())

    def ndcg(k: int) -> float:
        return float(np.where(r <= k, 1.0 / np.log2(r + 1.0), 0.0).mean())

    return {
        wire.HR10: hr(10),
        wire.NDCG10: ndcg(10),
        wire.HR20: hr(20),
        wire.NDCG20: ndcg(20),
        wire.RECALL20: hr(20),
        wire.MRR: float((1.0 / r).mean()),
    }


def sample_negatives(
    rng: np.random.Generator, n_items: int, target: np.ndarray, seen: list[np.ndarray], n: int = 99
) -> np.ndarray:
    """``n`` negatives per user, uniform over items the user has not seen (target excluded).

    The NCF protocol (He et al., WWW'17): the held-out item ranked against 99 sampled items.
    """
    out = np.empty((len(target), n), dtype=np.int64)
    for i in range(len(target)):
        banned = set(np.asarray(seen[i]).tolist()) | {int(target[i])}
        if n_items - len(banned) < n:
            raise ValueError(
                f"cannot draw {n} negatives: only {n_items - len(banned)} unseen items"
            )
        row: list[int] = []
        while len(row) < n:
            draw = rng.integers(0, n_items, size=2 * n)
            row.extend(int(x) for x in draw if int(x) not in banned)
        out[i] = row[:n]
    return out
