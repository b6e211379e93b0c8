"""A platform's item prior: how popular each item is among the platform's own users.

Owns: the user-level popularity counts and the prior in logits that the model adds to each
item's score (``model.item-prior = popularity``). Each user adds ``1/sqrt(k)`` to each of their
``k`` distinct training items, so adding or removing one user moves the count vector by at most
1 in L2 norm: the Gaussian mechanism with noise multiplier σ releases it at σ × 1.
Under DP the counts are released once per run (:meth:`fedrec.client.dp.DPSession.release_prior`,
composed into the same accountant as DP-SGD); without DP they are used as they are. The prior
stays on the platform: only the head's weight on it (beta) is a model parameter.

Must not: import ``server/`` or ``client/``; hold state.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedrec.shared.data import Sequences


def popularity_counts(seqs: Sequences, n_items: int) -> np.ndarray:
    """(n_items,) float64: sum over users of ``1/sqrt(k_u)`` for each of their distinct items."""
    lengths = seqs.lengths()
    rows = np.repeat(np.arange(len(seqs)), lengths)
    pairs = np.unique(rows * np.int64(n_items) + seqs.item_index)  # distinct (user, item)
    users, items = np.divmod(pairs, n_items)
    distinct = np.bincount(users, minlength=len(seqs))
    weights = 1.0 / np.sqrt(distinct[users])
    return np.bincount(items, weights=weights, minlength=n_items).astype(np.float64)


def prior_logits(counts: np.ndarray) -> np.ndarray:
    """Counts (noised or not) -> the prior in logits, ``log(1 + max(count, 0))``."""
    return np.log1p(np.maximum(np.asarray(counts, dtype=np.float64), 0.0)).astype(np.float32)


PRIOR_GLOB = "item-prior-run*.npy"


def prior_file(run_id: str) -> str:
    """The file a node keeps its released prior of one run in (in its state dir)."""
    return f"item-prior-run{run_id}.npy"


def newest_kept(state_dirs: list[Path], pattern: str) -> Path | None:
    """The newest file matching ``pattern`` in any of these node state dirs, or None."""
    found = sorted(
        (p for d in state_dirs for p in d.glob(pattern)), key=lambda p: p.stat().st_mtime
    )
    return found[-1] if found else None


def released_prior(state_dirs: list[Path]) -> np.ndarray | None:
    """The newest prior kept in any of these node state dirs, or None."""
    path = newest_kept(state_dirs, PRIOR_GLOB)
    return None if path is None else np.load(path)
