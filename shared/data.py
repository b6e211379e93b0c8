"""In-memory data model for channels: public catalogues and private interactions.

Owns: the types every layer passes around. Loading, validation and writing live in
:mod:`fedrec.shared.datasets`; the synthetic world and the MovieLens converters in
:mod:`fedrec.simulations.world` and :mod:`fedrec.simulations.movielens`.

Must not: import ``fedrec.server`` or ``fedrec.client``, or do I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

EVENT_TYPES = ("view", "click", "purchase", "apply", "follow", "like", "join", "rate", "save")


@dataclass(frozen=True)
class Catalogue:
    """A channel's public item catalogue; row ``i`` is item index ``i`` everywhere."""

    channel: str
    item_ids: np.ndarray  # (N,) str
    titles: np.ndarray  # (N,) str
    descriptions: np.ndarray  # (N,) str
    categories: np.ndarray  # (N,) str
    attributes: np.ndarray  # (N,) str, "key=value; key=value"

    def __len__(self) -> int:
        return len(self.item_ids)

    def texts(self) -> list[str]:
        """The text the item encoder reads: title, category, description, attributes."""
        return [
            ". ".join(p for p in (t, c, d, a) if p)
            for t, c, d, a in zip(
                self.titles, self.categories, self.descriptions, self.attributes, strict=True
            )
        ]


@dataclass(frozen=True)
class Interactions:
    """A channel's private interactions, sorted by (user, timestamp, file row)."""

    channel: str
    user_ids: np.ndarray  # (M,) str
    item_index: np.ndarray  # (M,) int64, row in the channel's Catalogue
    timestamps: np.ndarray  # (M,) int64, Unix seconds
    events: np.ndarray  # (M,) str
    queries: np.ndarray  # (M,) str, "" when the interaction had no search query

    def __len__(self) -> int:
        return len(self.user_ids)


@dataclass(frozen=True)
class Sequences:
    """Per-user item sequences in time order (CSR layout): user ``u`` owns
    ``item_index[offsets[u]:offsets[u+1]]``. User ids exist only on the client."""

    users: np.ndarray  # (U,) str
    offsets: np.ndarray  # (U+1,) int64
    item_index: np.ndarray  # (M,) int64

    def __len__(self) -> int:
        return len(self.users)

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def to_sequences(interactions: Interactions) -> Sequences:
    """Group interactions (already sorted by user, then time) into per-user sequences."""
    users = interactions.user_ids
    if len(users) == 0:
        return Sequences(
            np.array([], dtype=str), np.zeros(1, dtype=np.int64), np.array([], np.int64)
        )
    change = np.flatnonzero(users[1:] != users[:-1]) + 1
    starts = np.concatenate([[0], change]).astype(np.int64)
    offsets = np.concatenate([starts, [len(users)]]).astype(np.int64)
    return Sequences(users[starts], offsets, interactions.item_index.astype(np.int64))
