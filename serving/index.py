"""Top-k search over a catalogue's item codes by inner product, seen items excluded.

Owns: :class:`ItemIndex`, the one place a request's full scan over the catalogue happens.
It wraps FAISS (Meta's similarity-search library, maintained, with AVX2 and AVX-512 kernels
chosen at run time) rather than a hand-written scan, because an exact float32 scan of 100k
codes reads the whole matrix for every request and memory bandwidth, not arithmetic, bounds it.

Kinds:
  * ``exact``: ``IndexFlatIP``, every code in float32; results equal a float32 matrix product.
  * ``fp16`` / ``sq8``: ``IndexScalarQuantizer`` with 16-bit floats (half the bytes scanned)
    or 8-bit codes (a quarter), whose candidates, ``refine`` times as many as asked for, are
    rescored exactly by ``IndexRefineFlat``: the scores returned are exact, only the candidate
    set is approximate (its recall@10 against the exact scan is measured by
    ``fedrec.simulations.bench.serve``).
  * ``auto``: ``exact`` up to :data:`EXACT_UP_TO` items, ``fp16`` above.

Codes are padded with zero columns to a multiple of 16: FAISS's SIMD scalar-quantizer kernels
only run on such widths (at 65 columns its scan is about ten times slower), and zeros change
no inner product.

Must not: know about users, models or HTTP.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

KINDS = ("auto", "exact", "fp16", "sq8")
EXACT_UP_TO = 20_000  # below this a float32 scan fits in cache and is already sub-millisecond


class ItemIndex:
    """Inner-product top-k over ``codes`` (N, C) float32.

    Args:
        codes: one row per item; a request's vector has the same C columns.
        kind: one of :data:`KINDS`.
        refine: with ``sq8``, how many candidates per result are rescored exactly.
    """

    def __init__(self, codes: np.ndarray, kind: str = "auto", refine: int = 4) -> None:
        import faiss

        if kind not in KINDS:
            raise ValueError(f"index kind must be one of {', '.join(KINDS)}. Found {kind!r}.")
        codes = np.ascontiguousarray(codes, dtype=np.float32)
        if codes.ndim != 2 or len(codes) == 0:
            raise ValueError(f"codes must be a non-empty (N, C) matrix. Found shape {codes.shape}.")
        self.kind = ("exact" if len(codes) <= EXACT_UP_TO else "fp16") if kind == "auto" else kind
        self.size, self.width = codes.shape
        self._padded = -(-self.width // 16) * 16
        codes = self._pad(codes)
        index: Any
        if self.kind == "exact":
            index = faiss.IndexFlatIP(self._padded)
        else:
            qtype = {"fp16": faiss.ScalarQuantizer.QT_fp16, "sq8": faiss.ScalarQuantizer.QT_8bit}
            base = faiss.IndexScalarQuantizer(
                self._padded, qtype[self.kind], faiss.METRIC_INNER_PRODUCT
            )
            index = faiss.IndexRefineFlat(base)
            index.k_factor = float(refine)
            index.train(codes)
        index.add(codes)
        self._index = index

    def _pad(self, x: np.ndarray) -> np.ndarray:
        out = np.zeros((len(x), self._padded), dtype=np.float32)
        out[:, : self.width] = x
        return out

    def search(
        self, vectors: np.ndarray, k: int, seen: Sequence[np.ndarray] | None = None
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per row of ``vectors`` (B, C): (rows, scores) of its top ``k`` items, best first,
        leaving out ``seen[b]`` (item rows); fewer than ``k`` when the catalogue runs out."""
        vectors = np.atleast_2d(vectors)
        if vectors.shape[1] != self.width:
            raise ValueError(f"vectors have {vectors.shape[1]} columns, the index {self.width}")
        vectors = self._pad(vectors)
        seen = [np.zeros(0, np.int64)] * len(vectors) if seen is None else list(seen)
        if len(seen) != len(vectors):
            raise ValueError(f"{len(seen)} seen lists for {len(vectors)} vectors")
        seen = [np.unique(np.asarray(s, dtype=np.int64)) for s in seen]
        fetch = min(self.size, k + max(len(s) for s in seen))  # room to drop the seen ones
        scores, rows = self._index.search(vectors, fetch)  # (B, fetch) each
        out = []
        for b, exclude in enumerate(seen):
            keep = rows[b] >= 0  # faiss pads with -1 when fewer results exist
            if len(exclude):
                keep &= ~np.isin(rows[b], exclude)
            r, s = rows[b][keep][:k], scores[b][keep][:k]
            out.append((r.astype(np.int64), s.astype(np.float32)))
        return out
