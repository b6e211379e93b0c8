"""Benchmark: ``fedrec serve`` on a 100k-item catalogue.

1. In process: top-10 of ``--items`` items for a user (``Recommender``: user vector, then the
   index, seen items left out) for each index kind, p50/p99, and recall@10 of the compact
   kinds against the exact float32 scan over the same requests. Also the query encoder's
   latency for one new query (MiniLM, one thread).
   Hybrid search (the default index) for a query met for the first time and again (the
   service caches a query's vector and its rankings, which depend on the query alone).
2. Over HTTP: the real app under uvicorn in a child process on 127.0.0.1, warm; a bounded
   load generator (``--requests`` per run, 1 and 8 concurrent clients, httpx) on
   ``GET /recommend`` and ``GET /search`` (200 queries, each seen once before the timed
   runs, so cached). p50/p99 per request and requests/s.

The catalogue is synthetic (random unit item vectors, titles from a word list) and the model
untrained: latency does not depend on the weights. Loopback only; it stops by itself.

    .venv/bin/python -m fedrec.simulations.bench.serve [--items 100000] [--requests 2000]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

WORDS = (
    "travel rewards card suitcase flyer organic baby food savings account loan mortgage "
    "insurance phone laptop charger cable shoe running jacket rain coffee tea mug book novel "
    "history science kitchen knife pan oven garden seed lamp desk chair sofa bed pillow towel "
    "soap shampoo toy game puzzle music guitar piano camera lens bag wallet watch ring index "
    "fund retirement bond dividend growth cashback festival yoga cycling"
).split()
USERS = 2000


def build_platform(items: int, kind: str, seed: int = 0) -> Any:
    """A Platform over a synthetic catalogue, built directly (no dataset files)."""
    import torch

    from fedrec.server.encoder import ItemEncoder
    from fedrec.serving.platform import Platform, QueryEncoder, Version
    from fedrec.serving.recommend import Recommender
    from fedrec.shared.data import Catalogue, Sequences
    from fedrec.shared.model import ModelSpec, RecModel

    rng = np.random.default_rng(seed)
    encoder = ItemEncoder()
    matrix = rng.standard_normal((items, encoder.dim)).astype(np.float32)
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    ids = np.array([f"item-{i}" for i in range(items)])
    words = np.array(WORDS)
    titles = np.array([" ".join(rng.choice(words, 4)) for _ in range(items)])
    empty = np.full(items, "", dtype=str)
    catalogue = Catalogue("bench", ids, titles, empty, empty, empty)
    lengths = rng.integers(1, 60, size=USERS)
    histories = Sequences(
        np.array([f"user-{u}" for u in range(USERS)]),
        np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        rng.integers(0, items, size=int(lengths.sum())).astype(np.int64),
    )
    spec = ModelSpec(item_dim=encoder.dim)
    rec = Recommender(RecModel(spec).eval(), ids, torch.from_numpy(matrix), 50, kind, 1)
    return Platform(
        run_dir=Path("."),
        channel="bench",
        data_dir=Path("."),
        catalogue=catalogue,
        histories=histories,
        recommender=rec,
        queries=QueryEncoder(encoder),
        version=Version(1, "synthetic", items, USERS, time.time()),
        stamp=(),
        incomplete=False,
    )


def pct(ms: list[float]) -> str:
    a = np.array(ms)
    return f"p50 {np.median(a):.2f} ms, p99 {np.percentile(a, 99):.2f} ms"


def in_process(items: int, n: int) -> None:
    import faiss
    import torch

    from fedrec.serving.index import ItemIndex

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    platform = build_platform(items, "exact")
    rec = platform.recommender
    rng = np.random.default_rng(1)
    users = rng.integers(0, USERS, size=n)
    histories = [platform.history(f"user-{u}") for u in users]
    vectors = [rec.user_vectors([h]) for h in histories]
    exact = [rec.top(v, 10, [h])[0][0] for v, h in zip(vectors, histories, strict=True)]
    print(f"in process, top-10 of {items} items, one thread, {n} requests:")
    for kind in ("exact", "fp16", "sq8"):
        t = time.perf_counter()
        index = ItemIndex(rec.codes, kind)
        built = time.perf_counter() - t
        rec.index = index
        ms, recall = [], []
        for h, ex in zip(histories, exact, strict=True):
            t = time.perf_counter()
            rows = rec.top(rec.user_vectors([h]), 10, [h])[0][0]
            ms.append(1000 * (time.perf_counter() - t))
            recall.append(len(set(rows.tolist()) & set(ex.tolist())) / 10)
        print(
            f"  {kind:5s}: {pct(ms[10:])}; recall@10 vs exact {np.mean(recall):.4f}; "
            f"built in {built:.1f}s"
        )
    engine = build_platform(items, "auto").search_engine
    queries = [" ".join(rng.choice(WORDS, 3)) for _ in range(200)]
    vecs = platform.queries.encoder.encode(queries)
    for label in ("a new query (its vector given)", "the same queries again (cached)"):
        ms = []
        for i, (q, v) in enumerate(zip(queries, vecs, strict=True)):
            t = time.perf_counter()
            engine.search(q, v, histories[i % len(histories)], 10)
            ms.append(1000 * (time.perf_counter() - t))
        print(f"  search ({engine.text_index.kind}), {label}: {pct(ms[10:])}")
    encode = []
    for i in range(50):
        t = time.perf_counter()
        platform.queries.encoder.encode(
            [f"{WORDS[i]} {WORDS[-i - 1]} for {WORDS[(7 * i) % len(WORDS)]}"]
        )
        encode.append(1000 * (time.perf_counter() - t))
    print(f"  one new query through the encoder: {pct(encode[5:])}")


def _serve(items: int, kind: str, port: int, ready: Any) -> None:
    import logging

    import faiss
    import torch
    import uvicorn

    from fedrec.serving.service import Reloader, create_app

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    logging.getLogger("fedrec.serve").setLevel(logging.WARNING)
    platform = build_platform(items, kind)
    platform.queries.warm()
    app = create_app(Reloader(platform, lambda p: p))
    ready.set()
    uvicorn.run(app, host="127.0.0.1", port=port, access_log=False, log_level="warning")


def load(url: str, paths: list[str], clients: int) -> tuple[list[float], float]:
    """Each path requested once, by ``clients`` threads; (latencies in ms, requests/s)."""
    import httpx

    ms: list[float] = []
    lock = threading.Lock()
    nxt = iter(range(len(paths)))

    def worker() -> None:
        with httpx.Client(base_url=url, timeout=30) as http:
            while True:
                with lock:
                    i = next(nxt, None)
                if i is None:
                    return
                t = time.perf_counter()
                r = http.get(paths[i])
                took = 1000 * (time.perf_counter() - t)
                if r.status_code != 200:
                    raise RuntimeError(f"{paths[i]}: {r.status_code} {r.text[:200]}")
                with lock:
                    ms.append(took)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return ms, len(paths) / (time.perf_counter() - t0)


def over_http(items: int, kind: str, n: int) -> None:
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    proc = ctx.Process(target=_serve, args=(items, kind, port, ready), daemon=True)
    proc.start()
    try:
        if not ready.wait(600):
            raise RuntimeError("the service did not start")
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        rng = np.random.default_rng(2)
        queries = [" ".join(rng.choice(WORDS, 3)) for _ in range(200)]
        recommend = [f"/recommend?user=user-{u}&k=10" for u in rng.integers(0, USERS, n)]
        search = [
            f"/search?q={queries[i % 200].replace(' ', '+')}&user=user-{u}&k=10"
            for i, u in enumerate(rng.integers(0, USERS, n))
        ]
        load(url, search[:200] + recommend[:100], 1)  # warm: every query encoded once
        print(f"over HTTP ({kind} index, {items} items, uvicorn, 1 worker), {n} requests each:")
        for name, paths in (("/recommend", recommend), ("/search", search)):
            for clients in (1, 8):
                ms, rps = load(url, paths, clients)
                print(f"  {name:10s} {clients} client(s): {pct(ms)}, {rps:.0f} requests/s")
    finally:
        proc.terminate()
        proc.join(10)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--kind", default="auto", help="index kind for the HTTP runs")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    in_process(args.items, min(args.requests, 1000))
    over_http(args.items, args.kind, args.requests)


if __name__ == "__main__":
    main()
