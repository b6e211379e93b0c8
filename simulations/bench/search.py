"""Benchmark: search quality on a run's held-out query-bearing interactions.

Each user's last interaction is held out of training (leave-last-out); those that carry a
search query are the cases: rank the interacted item given the query and the history before
it, seen items left out. Compared: query-only text similarity, BM25 alone, today's blend
(the model with the query blended into the history: ``fedrec recommend --query``) and the
hybrid search of ``fedrec serve``. HR@10 and NDCG@10 on all cases and on the two halves (even
and odd case numbers; the hybrid's settings were chosen on the even half); with
``--recentre N ...`` also the hybrid with N re-centrings of its topic. Then the issue's
finance query, with no user.

    .venv/bin/python -m fedrec.simulations.bench.search RUN_DIR [--channel ecommerce]
        [--recentre 0 1 3]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from fedrec.serving.platform import Platform
from fedrec.serving.recommend import RecommendError
from fedrec.serving.search import HybridSearch, ranked
from fedrec.shared.datasets import load_interactions

RETIREMENT = "low fee index fund for retirement"


def rank_of(rows: np.ndarray, target: int) -> int | None:
    where = np.flatnonzero(rows == target)
    return int(where[0]) if len(where) else None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--channel", default="ecommerce")
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--recentre", type=int, nargs="*", default=[], help="also these variants")
    args = ap.parse_args()
    k = args.k

    t0 = time.perf_counter()
    platform = Platform.load(args.run_dir, args.channel, data=args.data)
    interactions = load_interactions(platform.data_dir, args.channel, platform.catalogue)
    h = platform.histories
    cases = []
    for u in range(len(h)):
        a, b = int(h.offsets[u]), int(h.offsets[u + 1])
        if b - a >= 2 and interactions.queries[b - 1]:
            cases.append(
                (
                    h.item_index[a : b - 1],
                    int(h.item_index[b - 1]),
                    str(interactions.queries[b - 1]),
                )
            )
    vectors = platform.queries.encoder.encode([q for _, _, q in cases])
    print(
        f"{args.run_dir} {args.channel}: {len(cases)} held-out interactions with a query "
        f"(loaded and encoded in {time.perf_counter() - t0:.1f}s)"
    )

    engine, rec = platform.search_engine, platform.recommender
    variants = {
        f"hybrid, {n} re-centrings": HybridSearch(rec, engine.lexical, recentre=n)
        for n in args.recentre
    }
    methods = ("text similarity", "BM25", "today's blend", "hybrid", *variants)
    ranks: dict[str, list[int | None]] = {m: [] for m in methods}
    t1 = time.perf_counter()
    for (history, target, query), qvec in zip(cases, vectors, strict=True):
        seen = np.unique(history)
        ranks["text similarity"].append(
            rank_of(engine.text_index.search(qvec[None], k, [seen])[0][0], target)
        )
        ranks["BM25"].append(
            rank_of(ranked(engine.lexical.scores(query), k, seen, positive=True), target)
        )
        blend = rec.top(rec.user_vectors([history], qvec[None]), k, [seen])[0][0]
        ranks["today's blend"].append(rank_of(blend, target))
        hybrid = np.array([r for r, _ in engine.search(query, qvec, history, k)])
        ranks["hybrid"].append(rank_of(hybrid, target))
        for name, variant in variants.items():
            rows = np.array([r for r, _ in variant.search(query, qvec, history, k)])
            ranks[name].append(rank_of(rows, target))
    per_case = (time.perf_counter() - t1) / max(len(cases), 1) * 1000
    print(f"{per_case:.2f} ms per case for all methods (queries encoded beforehand)\n")

    even = np.arange(len(cases)) % 2 == 0
    print(f"| method | HR@{k} | NDCG@{k} | HR@{k} even half | HR@{k} odd half |")
    print("|---|---|---|---|---|")
    hr_of = {}
    for m in methods:
        r = ranks[m]
        hit = np.array([x is not None for x in r])
        gain = np.array([0.0 if x is None else 1.0 / np.log2(x + 2) for x in r])
        hr_of[m] = hit.mean()
        print(
            f"| {m} | {hit.mean():.3f} | {gain.mean():.3f} | {hit[even].mean():.3f} | {hit[~even].mean():.3f} |"
        )
    best = max(hr_of["BM25"], hr_of["today's blend"])
    print(f"\nhybrid HR@{k} / best of BM25 and today's blend: {hr_of['hybrid'] / best:.2f}x")

    try:
        finance = Platform.load(args.run_dir, "finance", data=args.data)
    except RecommendError as exc:  # another world: no finance channel
        print(f"(no finance check: {exc})")
        return
    empty = np.zeros(0, dtype=np.int64)
    top = finance.search(RETIREMENT, empty, 5)
    print(f"\nfinance, {RETIREMENT!r}, no user (hybrid):")
    for row, score in top:
        print(f"  {finance.catalogue.item_ids[row]}  {finance.titles[row]}  ({score:.2f})")
    blended = finance.recommender.recommend(empty, 5, finance.queries(RETIREMENT))
    print("today's blend:")
    titles = dict(zip(finance.catalogue.item_ids, finance.titles, strict=True))
    for item, score in blended:
        print(f"  {item}  {titles[item]}  ({score:.2f})")


if __name__ == "__main__":
    main()
