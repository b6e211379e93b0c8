"""One platform's channel of one trained run, loaded once and kept warm for its requests.

Owns: :class:`Platform` (the channel's catalogue, its users' histories, the item matrix, the
run's :class:`~fedrec.serving.recommend.Recommender`, the lexical index and the query
encoder), :func:`inputs_stamp` (the files a load reads, for hot reload) and the request errors
(:class:`UnknownUser`, :class:`BadRequest`). ``fedrec recommend``, ``fedrec serve`` and
``fedrec export`` all load through :meth:`Platform.load`.

Privacy: a platform serves its own users from its own data. Histories and queries stay in
this process; nothing here sends anything anywhere.

Must not: import ``fedrec.client``, ``deploy``, ``audit``, ``simulations`` or ``cli``.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedrec.serving.recommend import (
    Recommender,
    RecommendError,
    load_run_config,
    personal_file,
    released_prior,
)
from fedrec.serving.search import LRU, query_key

log = logging.getLogger(__name__)


class UnknownUser(RecommendError):
    """A user id the platform holds no interactions for (HTTP 404)."""


class BadRequest(RecommendError):
    """A request that cannot be served as given: an empty query, an unknown item (HTTP 400)."""


@dataclass(frozen=True)
class Version:
    """What a loaded platform serves: the checkpoint's round and file, the catalogue size."""

    round: int
    checkpoint: str
    items: int
    users: int
    loaded_at: float  # Unix time

    def as_dict(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "checkpoint": self.checkpoint,
            "items": self.items,
            "users": self.users,
            "loaded_at": self.loaded_at,
        }


def _stat(path: Path | None) -> tuple[str, int, int] | None:
    if path is None:
        return None
    try:
        st = path.stat()
    except OSError:
        return None
    return (str(path), st.st_mtime_ns, st.st_size)


def inputs_stamp(run_dir: Path, channel: str, data_dir: Path) -> tuple[Any, ...]:
    """Name, mtime and size of every file a load of ``channel`` reads: a newer checkpoint, a
    node's new personalised weights or prior, a grown catalogue or new interactions change it.
    Only ``stat`` calls: cheap enough to poll every second."""
    checkpoints = sorted((run_dir / "checkpoints").glob("round-*.safetensors"))
    files = [
        run_dir / "config.json",
        checkpoints[-1] if checkpoints else None,
        personal_file(run_dir, channel),
        _newest_prior(run_dir, channel),
        data_dir / "manifest.json",
        data_dir / channel / "items.csv",
        data_dir / channel / "interactions.csv",
    ]
    return tuple(_stat(p) for p in files)


def _newest_prior(run_dir: Path, channel: str) -> Path | None:
    from fedrec.shared.prior import PRIOR_GLOB, newest_kept

    nodes = run_dir / "nodes"
    return newest_kept([nodes / channel, nodes / f"{channel}-0"], PRIOR_GLOB)


class QueryEncoder:
    """The run's item encoder applied to search queries, with an LRU cache of recent queries.

    One lock around the encoder: a fast tokenizer must not be used from two threads at once.
    """

    def __init__(self, encoder: Any, cache_size: int = 4096) -> None:
        self.encoder = encoder
        self._cache: LRU[np.ndarray] = LRU(cache_size)
        self._lock = threading.Lock()

    def __call__(self, text: str) -> np.ndarray:
        key = query_key(text)
        return self._cache.get(key, lambda: self._encode(key))

    def _encode(self, key: str) -> np.ndarray:
        with self._lock:
            vec = np.asarray(self.encoder.encode([key])[0], dtype=np.float32)
        vec.flags.writeable = False
        return vec

    def warm(self) -> None:
        """Load the encoder's weights now rather than on the first search."""
        self.encoder.encode(["warm up"])


class Platform:
    """One channel of one run, everything a request reads, loaded by :meth:`load`."""

    def __init__(
        self,
        *,
        run_dir: Path,
        channel: str,
        data_dir: Path,
        catalogue: Any,
        histories: Any,
        recommender: Recommender,
        queries: QueryEncoder,
        version: Version,
        stamp: tuple[Any, ...],
        incomplete: bool,
    ) -> None:
        from fedrec.serving.search import HybridSearch, LexicalIndex

        self.run_dir, self.channel, self.data_dir = run_dir, channel, data_dir
        self.catalogue, self.histories, self.recommender = catalogue, histories, recommender
        self.queries, self.version, self.stamp = queries, version, stamp
        self.incomplete = incomplete
        self.user_rows = {str(u): i for i, u in enumerate(histories.users.tolist())}
        self.item_rows = {str(i): r for r, i in enumerate(catalogue.item_ids.tolist())}
        self.titles = np.asarray(catalogue.titles, dtype=str)
        self.search_engine = HybridSearch(recommender, LexicalIndex(catalogue.texts()))

    @classmethod
    def load(
        cls,
        run_dir: Path,
        channel: str,
        *,
        data: Path | None = None,
        cache_dir: Path | None = None,
        encoder: Any = None,
        index_kind: str = "auto",
    ) -> Platform:
        """Read the run's config, the channel's dataset, the encoded catalogue (through the
        encoder cache: only new or changed items are encoded) and the newest checkpoint.

        ``encoder``: an :class:`~fedrec.server.encoder.ItemEncoder` already loaded (a reload
        reuses the warm one); default: the run's own (``encoder-dir`` in its config).
        """
        from fedrec.server.encoder import (
            EncodingCache,
            ItemEncoder,
            default_cache_dir,
            encode_catalogue,
        )
        from fedrec.server.rundir import INCOMPLETE
        from fedrec.shared.data import to_sequences
        from fedrec.shared.datasets import load_catalogue, load_interactions
        from fedrec.shared.prior import popularity_counts, prior_logits

        cfg = load_run_config(run_dir)
        if channel not in cfg.channels:
            raise RecommendError(
                f"channel {channel!r} is not in this run (it has {', '.join(cfg.channels)})."
            )
        data_dir = Path(data) if data is not None else Path(cfg.data_dir)
        if not (data_dir / "manifest.json").is_file():
            raise RecommendError(
                f"the run's dataset {data_dir} is not there (moved or deleted?). Fix: pass "
                "--data with the folder that now holds it."
            )
        stamp = inputs_stamp(run_dir, channel, data_dir)
        if encoder is None:
            encoder = ItemEncoder(Path(cfg.encoder_dir) if cfg.encoder_dir else None)
        cache = EncodingCache(
            Path(cache_dir or cfg.cache_dir)
            if (cache_dir or cfg.cache_dir)
            else default_cache_dir()
        )
        catalogue = load_catalogue(data_dir, channel)
        matrix = encode_catalogue(catalogue, encoder, cache)
        histories = to_sequences(load_interactions(data_dir, channel, catalogue))
        prior = None
        if released_prior(run_dir, channel) is None:
            # not the node's run dir (a deployment keeps it on the node): the platform's own
            # exact popularity, which serving its own users never sends anywhere
            prior = prior_logits(popularity_counts(histories, len(catalogue)))
        recommender = Recommender.from_run(
            run_dir, channel, np.asarray(matrix.matrix), catalogue.item_ids, prior, index_kind
        )
        checkpoints = sorted((run_dir / "checkpoints").glob("round-*.safetensors"))
        version = Version(
            round=recommender.round,
            checkpoint=checkpoints[-1].name if checkpoints else "",
            items=len(catalogue),
            users=len(histories),
            loaded_at=time.time(),
        )
        return cls(
            run_dir=run_dir,
            channel=channel,
            data_dir=data_dir,
            catalogue=catalogue,
            histories=histories,
            recommender=recommender,
            queries=QueryEncoder(encoder),
            version=version,
            stamp=stamp,
            incomplete=(run_dir / INCOMPLETE).exists(),
        )

    # -- what a request asks for -----------------------------------------------------------

    def history(self, user: str) -> np.ndarray:
        """The user's item rows, oldest first."""
        r = self.user_rows.get(user)
        if r is None:
            raise UnknownUser(
                f"user {user!r} has no interactions on channel {self.channel!r}. Fix: check the "
                "id, send the history inline (POST /recommend), or search without a user."
            )
        h = self.histories
        return np.asarray(h.item_index[h.offsets[r] : h.offsets[r + 1]], dtype=np.int64)

    def rows_of(self, item_ids: list[str]) -> np.ndarray:
        """Catalogue rows of ``item_ids``; every unknown id is named in one error."""
        unknown = [i for i in item_ids if i not in self.item_rows]
        if unknown:
            shown = ", ".join(repr(i) for i in unknown[:5]) + (" ..." if len(unknown) > 5 else "")
            raise BadRequest(
                f"{len(unknown)} history item(s) not in the {self.channel} catalogue: {shown}. "
                "Fix: send item ids of this channel's catalogue."
            )
        return np.array([self.item_rows[i] for i in item_ids], dtype=np.int64)

    def recommend(self, history: np.ndarray, k: int) -> list[tuple[int, float]]:
        """Top-``k`` (item row, score) for a history, seen items left out."""
        history = self.recommender.check_history(history)
        if len(history) == 0:
            raise BadRequest(
                "the history is empty: there is nothing to recommend from. Fix: send at least "
                "one item, or search with a query."
            )
        vec = self.recommender.user_vectors([history])
        rows, scores = self.recommender.top(vec, k, [history])[0]
        return list(zip(rows.tolist(), scores.tolist(), strict=True))

    def search(self, query: str, history: np.ndarray, k: int) -> list[tuple[int, float]]:
        """Top-``k`` (item row, fused score) for a query and a history (may be empty)."""
        if not query.strip():
            raise BadRequest("the query is empty. Fix: give words to search for.")
        history = self.recommender.check_history(history)
        return self.search_engine.search(query, self.queries(query), history, k)

    def items(self, ranked: list[tuple[int, float]]) -> list[dict[str, Any]]:
        """Ranked (row, score) pairs as ``{"item_id", "title", "score"}``."""
        return [
            {"item_id": str(self.catalogue.item_ids[r]), "title": str(self.titles[r]), "score": s}
            for r, s in ranked
        ]
