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
from collections.abc import Callable, Sequence
from typing import Any

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
    s = np.array(scores, dtype=np.float32)
    s[exclude] = -np.inf
    if positive:
        s[s <= 0] = -np.inf
    n = min(depth, int(np.isfinite(s).sum()))
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    top = np.argpartition(-s, n - 1)[:n]
    return top[np.argsort(-s[top], kind="stable")].astype(np.int64)


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
    """

    def __init__(
        self,
        recommender: Any,
        lexical: LexicalIndex,
        anchors: int = 10,
        depth: int = 100,
        recentre: int = 2,
    ) -> None:
        from fedrec.serving.index import ItemIndex

        self.recommender, self.lexical = recommender, lexical
        self.anchors, self.depth, self.recentre = anchors, depth, recentre
        text = np.asarray(recommender.items[:, : recommender.text_dim].numpy(), np.float32)
        self.text_index = ItemIndex(text, recommender.index_kind)
        space = recommender.codes[:, :-1]  # (N, D): W_o^T c, the model's item space
        self.space = space / np.maximum(np.linalg.norm(space, axis=1, keepdims=True), 1e-12)
        self.space_index = ItemIndex(self.space, recommender.index_kind)

    def rankings(
        self, query: str, query_vec: np.ndarray, history: np.ndarray
    ) -> dict[str, np.ndarray]:
        """Each stage's ranking (item rows, best first; seen items kept in ``lexical``,
        ``semantic`` and ``topic``, which only place the query) and the user vector."""
        none = np.zeros(0, dtype=np.int64)
        lexical = ranked(self.lexical.scores(query), self.depth, none, positive=True)
        semantic = self.text_index.search(query_vec[None], self.depth)[0][0]
        anchors = rrf([lexical, semantic])[: self.anchors]
        topic = recentred_topic(
            lambda v, n: self.space_index.search(v[None], n)[0][0],
            self.space,
            anchors,
            self.depth,
            self.recentre,
        )
        return {"lexical": lexical, "semantic": semantic, "anchors": anchors, "topic": topic}

    def search(
        self, query: str, query_vec: np.ndarray, history: np.ndarray, k: int
    ) -> list[tuple[int, float]]:
        """Top-``k`` (item row, model score) for a query and a history (may be empty)."""
        seen = np.unique(history)
        found = self.rankings(query, query_vec, history)
        topic = found["topic"][~np.isin(found["topic"], seen)]
        vec = self.recommender.user_vectors([history], query_vec[None])[0]
        scores = self.recommender.scores(vec, topic)
        topic = topic[np.argsort(-scores, kind="stable")]
        if len(seen) == 0:
            text = rrf([found["lexical"], found["semantic"]])
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
