"""Benchmark: latency of ``Recommender.recommend`` (top-10, seen items excluded) on a
100k-item catalogue. Prints p50/p95 over repeated requests (the model and item matrix are
loaded once, as a serving process would).

    .venv/bin/python -m fedrec.simulations.bench.recommend [--items 100000] [--requests 300]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from fedrec.serving.recommend import Recommender
from fedrec.shared.model import ModelSpec, RecModel


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    matrix = rng.standard_normal((args.items, 384)).astype(np.float32)
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    ids = np.array([f"item-{i}" for i in range(args.items)])
    rec = Recommender(RecModel(ModelSpec()).eval(), ids, torch.from_numpy(matrix), 50)
    query = matrix[0]
    times = []
    for r in range(args.requests):
        history = rng.integers(0, args.items, size=int(rng.integers(1, 60)))
        t = time.perf_counter()
        top = rec.recommend(history, 10, query if r % 2 else None)
        times.append(time.perf_counter() - t)
        assert len(top) == 10 and not {int(i.split("-")[1]) for i, _ in top} & set(history.tolist())
    ms = np.array(times[10:]) * 1000  # first requests warm up caches
    print(f"items={args.items} requests={len(ms)} threads={args.threads}")
    print(
        f"top-10 latency: p50 {np.median(ms):.2f} ms, p95 {np.percentile(ms, 95):.2f} ms, max {ms.max():.2f} ms"
    )


if __name__ == "__main__":
    main()
