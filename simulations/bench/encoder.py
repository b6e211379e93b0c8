"""Benchmark of the central item encoder; prints figures, asserts nothing.

(a) Throughput of :class:`server.encoder.ItemEncoder` against
    ``sentence_transformers.SentenceTransformer(...).encode(..., normalize_embeddings=True)`` on
    the same weights, texts, batch size, truncation length and thread count, in one process,
    interleaved (ours, theirs, ours, theirs, ...), median of the repetitions; plus the largest
    absolute difference between the two outputs.
(b) :class:`server.encoder.EncodingCache` on a catalogue-sized list of texts: the first pass
    (cold cache, everything encoded) against later passes (warm, nothing encoded).

Needs the ``bench`` extra (sentence-transformers) for (a)::

    python -m fedrec.simulations.bench.encoder [--texts 2000] [--catalogue 10000] [--reps 3]
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np

# Item-like vocabulary: titles, categories, descriptions and attributes of a mixed catalogue.
_WORDS = (
    "travel rewards credit card cashback annual fee premium metal contactless savings account "
    "interest rate mortgage fixed variable loan insurance policy pension fund index tracker "
    "carry-on suitcase hard shell spinner wheels lightweight frequent flyers backpack laptop "
    "sleeve waterproof running shoes trail cushioning breathable mesh organic baby food pouches "
    "puree apple banana spinach toddler snack coffee beans arabica espresso roast grinder "
    "kettle stainless steel kitchen knife chef ceramic non-stick pan oven safe garden hose seeds "
    "tomato basil lamp desk chair ergonomic office sofa velvet bed frame memory foam pillow "
    "cotton towel bamboo shampoo sulfate free wireless headphones noise cancelling bluetooth "
    "battery life charger cable usb phone case camera lens mirrorless tripod novel history "
    "science fiction paperback hardcover board game puzzle family acoustic guitar piano "
    "keyboard smart watch fitness tracker heart rate gold silver ring necklace community "
    "group hiking photography book club meetup event concert tickets streaming subscription"
).split()
_CATEGORIES = ("electronics", "finance", "travel", "home", "kitchen", "sports", "baby", "social")


def item_texts(n: int, *, seed: int, min_words: int = 5, max_words: int = 60) -> list[str]:
    """``n`` distinct catalogue-like texts of ``min_words``..``max_words`` words each."""
    rng = np.random.default_rng(seed)
    texts = []
    for i in range(n):
        words = rng.choice(_WORDS, size=int(rng.integers(min_words, max_words + 1)))
        k = min(len(words), int(rng.integers(2, 7)))
        title = " ".join(words[:k]).capitalize()
        body = " ".join(words[k:])
        category = _CATEGORIES[int(rng.integers(len(_CATEGORIES)))]
        # The sku keeps texts distinct, as item texts in a real catalogue are.
        texts.append(". ".join(p for p in (title, category, body, f"sku={i}") if p))
    return texts


T = TypeVar("T")


def _timed(fn: Callable[[], T]) -> tuple[float, T]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def bench_throughput(texts: list[str], *, batch_size: int, reps: int) -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch
    from sentence_transformers import SentenceTransformer

    from fedrec.server.encoder import ItemEncoder, default_model_dir

    model_dir = default_model_dir()
    ours = ItemEncoder(model_dir, batch_size=batch_size)
    theirs = SentenceTransformer(str(model_dir), device="cpu")
    theirs.max_seq_length = ours.max_length  # same truncation on both sides

    def run_ours() -> np.ndarray:
        return ours.encode(texts)

    def run_theirs() -> np.ndarray:
        return theirs.encode(
            texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True
        )

    lengths = [len(t.split()) for t in texts]
    print(
        f"(a) {len(texts)} texts, {min(lengths)}-{max(lengths)} words (mean "
        f"{np.mean(lengths):.1f}), batch {batch_size}, max_length {ours.max_length}, "
        f"torch threads {torch.get_num_threads()}, {reps} reps interleaved"
    )
    ours.encode(texts[:batch_size])  # warm-up: first-call allocations, kernel selection
    theirs.encode(texts[:batch_size], batch_size=batch_size)
    times: dict[str, list[float]] = {"fedrec ItemEncoder": [], "SentenceTransformer": []}
    outputs: dict[str, np.ndarray] = {}
    for _ in range(reps):
        for name, fn in (("fedrec ItemEncoder", run_ours), ("SentenceTransformer", run_theirs)):
            seconds, out = _timed(fn)
            times[name].append(seconds)
            outputs[name] = np.asarray(out)
    for name, ts in times.items():
        med = statistics.median(ts)
        runs = ", ".join(f"{t:.2f}" for t in ts)
        print(f"    {name:<20} {len(texts) / med:8.1f} items/s  (median {med:.2f} s; runs {runs})")
    ratio = statistics.median(times["SentenceTransformer"]) / statistics.median(
        times["fedrec ItemEncoder"]
    )
    diff = np.abs(outputs["fedrec ItemEncoder"] - outputs["SentenceTransformer"]).max()
    print(f"    speed ratio (ours / theirs, items/s): {ratio:.2f}x")
    print(f"    max |ours - theirs| = {diff:.2e}")


def bench_cache(n: int, *, batch_size: int, warm_reps: int) -> None:
    from fedrec.server.encoder import EncodingCache, ItemEncoder

    encoder = ItemEncoder(batch_size=batch_size)
    texts = item_texts(n, seed=1)
    print(f"(b) EncodingCache, catalogue of {n} texts")
    with tempfile.TemporaryDirectory() as tmp:
        cache = EncodingCache(Path(tmp))
        cold, first = _timed(lambda: cache.encode_items(encoder, texts))
        print(f"    cold: {cold:8.3f} s  ({n / cold:.0f} items/s, stats {cache.last_stats})")
        warm_times = []
        for _ in range(warm_reps):
            # A new EncodingCache each time: the warm path reads the file, as a new process would.
            fresh = EncodingCache(Path(tmp))
            seconds, again = _timed(functools.partial(fresh.encode_items, encoder, texts))
            warm_times.append(seconds)
        warm = statistics.median(warm_times)
        print(f"    warm: {warm:8.3f} s  (median of {warm_reps}; stats {fresh.last_stats})")
        print(f"    speed-up: {cold / warm:.0f}x; warm equals cold: {np.array_equal(first, again)}")
        size = cache.path_for(encoder.fingerprint).stat().st_size
        print(f"    cache file: {size / 2**20:.1f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=2000, help="texts for (a)")
    parser.add_argument("--catalogue", type=int, default=10_000, help="catalogue size for (b)")
    parser.add_argument("--reps", type=int, default=3, help="repetitions for (a) and warm (b)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--skip", choices=("a", "b"), default=None, help="skip one part")
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.skip != "a":
        bench_throughput(item_texts(args.texts, seed=0), batch_size=args.batch_size, reps=args.reps)
    if args.skip != "b":
        bench_cache(args.catalogue, batch_size=args.batch_size, warm_reps=args.reps)


if __name__ == "__main__":
    main()
