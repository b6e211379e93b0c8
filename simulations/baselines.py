"""Non-learned reference scorers for leave-last-out evaluation.

Owns: the two baselines every quality table shows next to the trained model, as
:data:`fedrec.client.training.ScoreFn` functions ``(hist, mask) -> (B, N) scores``:

* popularity: ``score(i) = #(training interactions with item i)`` on the channel's own training
  split. It reads private interactions, so it is an evaluation-only reference: never a negative
  sampler or a model input, where the counts would be an access to other users' data that the
  per-user DP guarantee does not cover.
* text similarity: ``score(i) = cos(mean_t h_t, v_i)``, the cosine between the mean of the
  history's item vectors and each item vector. No training, no private data beyond the user's
  own history.

Must not: train anything, or be imported by ``fedrec.client`` or ``fedrec.server``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

    from fedrec.client.training import ScoreFn
    from fedrec.shared.data import Sequences


def popularity_scorer(train: Sequences, n_items: int) -> ScoreFn:
    """Score every item by how often it occurs in ``train`` (the same list for every user).

    Raises:
        ValueError: ``train`` names an item index outside ``[0, n_items)``.
    """
    idx = np.asarray(train.item_index, dtype=np.int64)
    if len(idx) and (idx.min() < 0 or idx.max() >= n_items):
        bad = int(idx[(idx < 0) | (idx >= n_items)][0])
        raise ValueError(
            f"training sequences name item index {bad}, outside the catalogue [0, {n_items})"
        )
    counts = np.bincount(idx, minlength=n_items).astype(np.float32)  # (N,)

    def score(hist: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return np.broadcast_to(counts, (len(hist), n_items))  # (B, N), read-only view

    return score


def text_similarity_scorer(items: torch.Tensor) -> ScoreFn:
    """Cosine between each user's mean history vector and every item vector.

    Args:
        items: (N, E) item vectors (the channel's item matrix).
    """
    vectors = np.asarray(items, dtype=np.float32)
    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)  # (N, E)

    def score(hist: np.ndarray, mask: np.ndarray) -> np.ndarray:
        m = mask.astype(np.float32)[..., None]  # (B, L, 1)
        mean = (unit[hist] * m).sum(1) / np.maximum(m.sum(1), 1.0)  # (B, E)
        mean /= np.maximum(np.linalg.norm(mean, axis=1, keepdims=True), 1e-12)
        return mean @ unit.T  # (B, N)

    return score
