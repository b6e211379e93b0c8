"""Hybrid search: a query and (optionally) a user's history in one ranking.

Owns: :class:`LexicalIndex` (BM25 over the catalogue's item text, from ``bm25s``: a
maintained, sparse-matrix BM25 needing only numpy and scipy; English stop words and Snowball
stemming from PyStemmer, so "funds" finds "fund") and :class:`HybridSearch`:

  1. anchors: BM25 of the query and the cosine between the encoded query and each item's text
     vector, fused by reciprocal rank fusion (Cormack, Clarke and Büttcher, SIGIR 2009:
     ``sum_r 1 / (K + rank_r)``, K = 60); the best ``anchors`` items say what the query is
     about (lexical and text matches are precise at the top, not deep down);
  2. topic: the ``depth`` items nearest the anchors' centroid in the model's item space
     (``W_o^T c``, learned from the platforms' interactions), so items that go with the
     anchors count even when their text shares no word with the query; then re-centred
     ``recentre`` times on the nearer half of the topic itself (pseudo-relevance feedback in
     the manner of Rocchio, 1971), which pulls a centroid that a stray anchor or an anchor at
     the edge of the topic displaced back into the topic's core;
  3. personal order: the topic's items ranked by the run's model scoring the user's history
     with the query blended in (what ``fedrec recommend --query`` ranks by), then every
     other item in that same order. Without a history the model knows nothing personal
     (only popularity): the fused lexical and text matches come first, then the topic.

Nothing here is fitted to anyone's data (RRF and the centroids have no parameters learned
from interactions), so search costs no privacy budget beyond the model's. ``anchors``,
``depth`` and ``recentre`` were chosen on half of the held-out queries of the default world
(``fedrec.simulations.bench.search`` reports both halves). Seen items are left out.

Must not: import ``fedrec.client``; log queries or user ids.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

import numpy as np

RRF_K = 60.0  # the constant of Cormack et al.; ranks past ~K count little


class LexicalIndex:
    """BM25 (Lucene's variant, k1 = 1.5, b = 0.75) over item texts."""

    def __init__(self, texts: Sequence[str]) -> None:
        import bm25s
        import Stemmer

        self._stemmer = Stemmer.Stemmer("english")
        tokenizer = bm25s.tokenization.Tokenizer(stopwords="en", stemmer=self._stemmer)
        corpus = tokenizer.tokenize(list(texts), return_as="ids", show_progress=False)
        self._bm25 = bm25s.BM25()
        self._bm25.index(corpus, show_progress=False)
        self._stems: dict[str, int] = dict(tokenizer.get_vocab_dict())
        self._stop = frozenset(tokenizer.stopwords)
        self._split = re.compile(tokenizer.splitter.__self__.pattern).findall
        self._lock = threading.Lock()  # a PyStemmer stemmer is not thread-safe
        self.size = len(texts)

    def terms(self, query: str) -> list[int]:
        """The query's stems that occur in the catalogue, by the index's own rules
        (lower case, the same word pattern, stop words, stemmer), as term ids. Done here,
        not by ``bm25s``'s tokenizer, whose caches would grow with every new query word."""
        words = [w for w in self._split(query.lower()) if w not in self._stop]
        with self._lock:
            stems = self._stemmer.stemWords(words)
        return [self._stems[s] for s in stems if s in self._stems]

    def scores(self, query: str) -> np.ndarray:
        """(N,) BM25 score of every item; all zeros when no query word is in the catalogue."""
        ids = self.terms(query)
        if not ids:
            return np.zeros(self.size, dtype=np.float32)
        return np.asarray(self._bm25.get_scores(ids), dtype=np.float32)


def ranked(
    scores: np.ndarray, depth: int, exclude: np.ndarray, positive: bool = False
) -> np.ndarray:
    """Rows of the ``depth`` best ``scores``, best first, ``exclude`` left out (and, with
    ``positive``, rows scoring 0 or less: BM25 gives 0 to items sharing no query word)."""
    s = np.asarray(scores, dtype=np.float32)
    rows = np.flatnonzero(s > 0) if positive else np.arange(len(s))  # BM25: a few rows
    if len(exclude):
        rows = rows[~np.isin(rows, exclude)]
    n = min(depth, len(rows))
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    top = rows[np.argpartition(-s[rows], n - 1)[:n]]
    return top[np.lexsort((top, -s[top]))].astype(np.int64)  # ties: lower row first


def query_key(text: str) -> str:
    """A query as its caches key it: lower case, runs of white space as one space."""
    return " ".join(text.lower().split())


V = TypeVar("V")


class LRU(Generic[V]):
    """A thread-safe map of the ``size`` most recently used keys; :meth:`get` computes a
    missing value outside the lock (two threads missing one key at once both compute it)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._map: OrderedDict[str, V] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str, make: Callable[[], V]) -> V:
        with self._lock:
            if key in self._map:
                self._map.move_to_end(key)
                return self._map[key]
        value = make()
        with self._lock:
            self._map[key] = value
            if len(self._map) > self.size:
                self._map.popitem(last=False)
        return value


def rrf(rankings: Sequence[np.ndarray]) -> np.ndarray:
    """Rows of every ranking, ordered by reciprocal rank fusion ``sum_r 1 / (RRF_K + rank)``
    (ranks from 1), best first."""
    fused: dict[int, float] = {}
    for rows in rankings:
        for rank, row in enumerate(rows.tolist(), 1):
            fused[row] = fused.get(row, 0.0) + 1.0 / (RRF_K + rank)
    order = sorted(fused.items(), key=lambda kv: -kv[1])
    return np.array([row for row, _ in order], dtype=np.int64)


def recentred_topic(
    nearest: Callable[[np.ndarray, int], np.ndarray],
    space: np.ndarray,
    anchors: np.ndarray,
    depth: int,
    recentre: int,
) -> np.ndarray:
    """The ``depth`` rows of ``space`` nearest the ``anchors``' centroid (``nearest(vector,
    n)`` gives the ``n`` nearest rows, nearest first), then ``recentre`` times the ``depth``
    rows nearest the centroid of the topic's nearer half."""
    topic = nearest(space[anchors].mean(0), depth)
    for _ in range(recentre):
        core = topic[: max(1, len(topic) // 2)]
        topic = nearest(space[core].mean(0), depth)
    return topic


class HybridSearch:
    """BM25 and text similarity find the query's topic; the user's model score orders it.

    Args:
        recommender: the channel's :class:`~fedrec.serving.recommend.Recommender`.
        lexical: the channel's :class:`LexicalIndex`.
        anchors: how many of the fused lexical and text matches define the topic.
        depth: how many items the topic holds (and each lexical / text list).
        recentre: how many times the topic is re-centred on its nearer half.
        cache_size: how many queries' rankings are kept (they depend on the query alone).
    """

    def __init__(
        self,
        recommender: Any,
        lexical: LexicalIndex,
        anchors: int = 10,
        depth: int = 100,
        recentre: int = 2,
        cache_size: int = 4096,
    ) -> None:
        from fedrec.serving.index import ItemIndex

        self.recommender, self.lexical = recommender, lexical
        self.anchors, self.depth, self.recentre = anchors, depth, recentre
        self._rankings: LRU[dict[str, np.ndarray]] = LRU(cache_size)
        text = np.asarray(recommender.items[:, : recommender.text_dim].numpy(), np.float32)
        self.text_index = ItemIndex(text, recommender.index_kind)
        space = recommender.codes[:, :-1]  # (N, D): W_o^T c, the model's item space
        self.space = space / np.maximum(np.linalg.norm(space, axis=1, keepdims=True), 1e-12)
        self.space_index = ItemIndex(self.space, recommender.index_kind)

    def rankings(self, query: str, query_vec: np.ndarray) -> dict[str, np.ndarray]:
        """The query's rankings (item rows, best first, seen items kept: they only place the
        query): ``lexical``, ``semantic``, ``text`` (those two fused), ``anchors`` and
        ``topic``. Cached by :func:`query_key`: they depend on the query alone."""
        return self._rankings.get(query_key(query), lambda: self._rank(query, query_vec))

    def _rank(self, query: str, query_vec: np.ndarray) -> dict[str, np.ndarray]:
        none = np.zeros(0, dtype=np.int64)
        lexical = ranked(self.lexical.scores(query), self.depth, none, positive=True)
        semantic = self.text_index.search(query_vec[None], self.depth)[0][0]
        text = rrf([lexical, semantic])
        anchors = text[: self.anchors]
        topic = recentred_topic(
            lambda v, n: self.space_index.search(v[None], n)[0][0],
            self.space,
            anchors,
            self.depth,
            self.recentre,
        )
        found = {"lexical": lexical, "semantic": semantic, "text": text, "anchors": anchors}
        for rows in (*found.values(), topic):
            rows.flags.writeable = False  # shared by every request for the query
        return {**found, "topic": topic}

    def search(
        self, query: str, query_vec: np.ndarray, history: np.ndarray, k: int
    ) -> list[tuple[int, float]]:
        """Top-``k`` (item row, model score) for a query and a history (may be empty)."""
        seen = np.unique(history)
        found = self.rankings(query, query_vec)
        topic = found["topic"][~np.isin(found["topic"], seen)]
        vec = self.recommender.user_vectors([history], query_vec[None])[0]
        scores = self.recommender.scores(vec, topic)
        topic = topic[np.argsort(-scores, kind="stable")]
        if len(seen) == 0:
            text = found["text"]
            topic = np.concatenate([text, topic[~np.isin(topic, text)]])
        topic = topic[:k]
        out = [
            (int(r), float(s))
            for r, s in zip(topic, self.recommender.scores(vec, topic), strict=True)
        ]
        if len(out) < k:  # a small topic: the rest in the personal order
            rows, rest = self.recommender.top(vec[None], k, [np.concatenate([seen, topic])])[0]
            out += [(int(r), float(s)) for r, s in zip(rows, rest, strict=True)][: k - len(out)]
        return out
