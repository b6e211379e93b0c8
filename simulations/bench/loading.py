"""Benchmark: load and validate a channel of 1M interactions over 10k items.

Writes a synthetic one-channel dataset with :func:`shared.datasets.write_dataset` into a
temporary folder, then times :func:`shared.datasets.load_catalogue` plus
:func:`shared.datasets.load_interactions` (median of ``--repeats`` runs) and prints rows,
seconds and rows/s.

Usage: ``python -m fedrec.simulations.bench.loading [--rows 1000000] [--items 10000] [--repeats 3]``
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from fedrec.shared.data import EVENT_TYPES, Catalogue, Interactions
from fedrec.shared.datasets import load_catalogue, load_interactions, write_dataset

CHANNEL = "bench"


def synthetic_channel(
    *, rows: int, items: int, users: int, seed: int
) -> tuple[Catalogue, Interactions]:
    """A catalogue of ``items`` items and ``rows`` interactions by ``users`` users, seeded."""
    rng = np.random.default_rng(seed)
    ids = np.array([f"item-{i:06d}" for i in range(items)])
    catalogue = Catalogue(
        channel=CHANNEL,
        item_ids=ids,
        titles=np.array([f"Item {i}, model {i % 97}" for i in range(items)], dtype=object),
        descriptions=np.array(
            [f'A "synthetic" item number {i}\nwith two lines.' for i in range(items)], dtype=object
        ),
        categories=np.array([f"cat-{i % 50}" for i in range(items)]),
        attributes=np.array([f"brand=b{i % 13}; size={i % 5}" for i in range(items)], dtype=object),
    )
    user_names = np.array([f"user-{u:07d}" for u in range(users)])
    queries = np.array(["", "", "", "red shoes", "cheap flights, paris"], dtype=object)
    interactions = Interactions(
        channel=CHANNEL,
        user_ids=user_names[rng.integers(0, users, rows)],
        item_index=rng.integers(0, items, rows).astype(np.int64),
        timestamps=rng.integers(1_700_000_000, 1_730_000_000, rows).astype(np.int64),
        events=np.array(EVENT_TYPES)[rng.integers(0, len(EVENT_TYPES), rows)],
        queries=queries[rng.integers(0, len(queries), rows)],
    )
    return catalogue, interactions


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--users", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    catalogue, interactions = synthetic_channel(
        rows=args.rows, items=args.items, users=args.users, seed=args.seed
    )
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        out = write_dataset(
            Path(tmp) / "bench",
            name="bench-loading",
            catalogues={CHANNEL: catalogue},
            interactions={CHANNEL: interactions},
            source={"generator": "fedrec.simulations.bench.loading", "seed": args.seed},
        )
        write_s = time.perf_counter() - started
        size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
        print(
            f"wrote {args.rows:,} interactions, {args.items:,} items "
            f"({size / 1e6:.1f} MB) in {write_s:.2f} s"
        )

        times, cpu = [], []
        for _ in range(args.repeats):
            started, started_cpu = time.perf_counter(), time.process_time()
            loaded_catalogue = load_catalogue(out, CHANNEL)
            loaded = load_interactions(out, CHANNEL, loaded_catalogue)
            times.append(time.perf_counter() - started)
            cpu.append(time.process_time() - started_cpu)
        if len(loaded) != args.rows:
            raise RuntimeError(f"loaded {len(loaded)} rows, wrote {args.rows}")
        seconds = statistics.median(times)
        print(f"rows: {len(loaded):,}")
        runs = ", ".join(f"{t:.2f}" for t in times)
        print(f"seconds: {seconds:.2f} (median of {args.repeats}: {runs})")
        # CPU time (all threads) says more than wall time on a machine others are using.
        print(f"cpu seconds: {statistics.median(cpu):.2f}")
        print(f"rows/s: {len(loaded) / seconds:,.0f}")


if __name__ == "__main__":
    main()
