"""What a client node knows about itself: its channel, its own data, its node-local disk.

Owns: resolving the node (deployment: ``--node-config``; simulation: partition id -> channel
through the run config), loading *only this channel's* interactions, the item-matrix cache
on the node's disk (keyed by fingerprint), and where the node keeps its ledger, optimizer state
and timings (the DP lifecycle itself is :class:`fedrec.client.dp.DPSession`).

Must not: import ``server/``; read another channel's interactions.
"""

from __future__ import annotations

import io
import json
import os
import re
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from fedrec.shared.config import FedrecConfig
from fedrec.shared.data import Sequences, to_sequences
from fedrec.shared.errors import FedrecError
from fedrec.shared.fsio import atomic_write_bytes
from fedrec.shared.prior import prior_file

STATE_KEY = "privacy"  # context.state ConfigRecord holding the accountant
LEDGER = "privacy-ledger.jsonl"
TIMINGS = "timings.jsonl"  # node-local: seconds each handler took (never sent)
NODES = "nodes"  # simulation: <run dir>/nodes/<channel>[-<shard>] is each node's disk


class NodeConfigError(FedrecError, ValueError):
    """The node cannot tell which channel it serves, or where its data is."""


@dataclass(frozen=True)
class Node:
    channel: str
    data_dir: Path
    state_dir: Path
    shard: int = 0
    num_shards: int = 1

    @property
    def ledger(self) -> Path:
        return self.state_dir / LEDGER


def default_state_dir(channel: str) -> Path:
    """``$XDG_STATE_HOME/fedrec/<channel>`` (``~/.local/state/fedrec/<channel>``): outside the
    data dir, so that a node restarted with a fresh copy of its data keeps its ledger."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "fedrec" / channel


def resolve_node(node_config: dict[str, Any], cfg: FedrecConfig) -> Node:
    """Deployment: node-config ``channel``, ``data-dir``, ``state-dir`` (default
    :func:`default_state_dir`). Simulation: the
    partition id picks ``channels[pid % n]`` and shard ``pid // n``; data comes from the
    run's ``data-dir`` and node-local files go under ``<run-dir>/nodes/<channel>[-shard]``."""
    if "channel" in node_config:
        channel = str(node_config["channel"])
        data_dir = str(node_config.get("data-dir", cfg.data_dir))
        state_dir = str(node_config.get("state-dir", ""))
        if not data_dir:
            raise NodeConfigError(
                f"node for channel {channel!r} has no data-dir: start the SuperNode with "
                '--node-config \'channel="..." data-dir="/path/to/dataset" state-dir="..."\''
            )
        if not state_dir:
            state_dir = str(default_state_dir(channel))
        return Node(channel, Path(data_dir), Path(state_dir))
    if "partition-id" not in node_config:
        raise NodeConfigError(
            "node-config has neither 'channel' (deployment) nor 'partition-id' (simulation)"
        )
    pid, total = int(node_config["partition-id"]), int(node_config["num-partitions"])
    n = len(cfg.channels)
    if total % n:
        raise NodeConfigError(
            f"{total} simulated nodes cannot be split evenly over {n} channels {list(cfg.channels)}"
        )
    channel, shard, shards = cfg.channels[pid % n], pid // n, total // n
    suffix = f"-{shard}" if shards > 1 else ""
    if not cfg.run_dir or not cfg.data_dir:
        raise NodeConfigError("simulation needs run-dir and data-dir in the run config")
    return Node(
        channel,
        Path(cfg.data_dir),
        Path(cfg.run_dir) / NODES / f"{channel}{suffix}",
        shard,
        shards,
    )


@lru_cache(maxsize=4)
def _load_sequences(data_dir: str, channel: str, mtime: float) -> tuple[Sequences, int]:
    from fedrec.shared.datasets import load_catalogue, load_interactions

    catalogue = load_catalogue(data_dir, channel)
    return to_sequences(load_interactions(data_dir, channel, catalogue)), len(catalogue)


def record_timing(node: Node, server_round: int, phase: str, seconds: float) -> None:
    """Append how long this node's ``phase`` handler took; stays on the node's disk (timing
    depends on Poisson batch sizes, so it is not sent). Simulation reads it to split a round's
    wall time into the nodes' own work and Flower's overhead."""
    node.state_dir.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"round": server_round, "phase": phase, "seconds": round(seconds, 4)})
    with (node.state_dir / TIMINGS).open("a", encoding="utf-8") as fh:
        fh.write(line + "\n")


def load_sequences(node: Node) -> tuple[Sequences, int]:
    """This node's users' sequences (its shard of its channel) and the catalogue size."""
    manifest = node.data_dir / "manifest.json"
    mtime = manifest.stat().st_mtime if manifest.exists() else 0.0
    seqs, n_items = _load_sequences(str(node.data_dir), node.channel, mtime)
    if node.num_shards > 1:
        keep = np.array(
            [zlib.crc32(u.encode()) % node.num_shards == node.shard for u in seqs.users]
        )
        seqs = _subset(seqs, np.flatnonzero(keep))
    return seqs, n_items


def _subset(seqs: Sequences, rows: np.ndarray) -> Sequences:
    lengths = seqs.lengths()[rows]
    parts = [seqs.item_index[seqs.offsets[r] : seqs.offsets[r + 1]] for r in rows]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    items = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    return Sequences(seqs.users[rows], offsets, items.astype(np.int64))


def items_path(node: Node, fingerprint: str) -> Path:
    """Where the matrix of ``fingerprint`` (a sha256 hex digest from the server) is cached;
    anything else is refused, since it becomes a file name on the node's disk."""
    if not isinstance(fingerprint, str) or not re.fullmatch(r"[0-9a-f]{64}", fingerprint):
        raise NodeConfigError(
            f"item-matrix fingerprint {str(fingerprint)[:80]!r} from the server is not a sha256 "
            "hex digest; refused (it would name a file on this node)"
        )
    return node.state_dir / "items" / f"{fingerprint}.npy"


def save_items(node: Node, fingerprint: str, matrix: np.ndarray) -> Path:
    """Cache the channel's item matrix on the node's disk (write, then rename)."""
    path = items_path(node, fingerprint)
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(matrix, dtype=np.float32))
    atomic_write_bytes(path, buffer.getvalue())
    return path


def _optimizer_path(node: Node, run_id: str) -> Path:
    return node.state_dir / f"optimizer-run{run_id}.pt"


def load_optimizer(node: Node, run_id: str) -> dict[str, Any] | None:
    """The node's own optimizer state from its previous round of this run (never sent)."""
    import torch

    path = _optimizer_path(node, run_id)
    return torch.load(path, weights_only=True) if path.exists() else None


def save_optimizer(node: Node, run_id: str, state: dict[str, Any] | None) -> None:
    import torch

    if state is None:
        return
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(_optimizer_path(node, run_id), buffer.getvalue())


def _prior_path(node: Node, run_id: str) -> Path:
    return node.state_dir / prior_file(run_id)


def load_prior(node: Node, run_id: str) -> np.ndarray | None:
    """The item prior (logits) this node released for this run, if it has (never sent)."""
    path = _prior_path(node, run_id)
    return np.load(path) if path.exists() else None


def save_prior(node: Node, run_id: str, prior: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(prior, dtype=np.float32))
    atomic_write_bytes(_prior_path(node, run_id), buffer.getvalue())


def personal_file(run_id: str) -> str:
    return f"personal-run{run_id}.npz"


def load_personal(node: Node, run_id: str) -> dict[str, np.ndarray] | None:
    """The shared weights this node trained last in this run (its own DP outputs; never sent
    again): what ``train.personal-mix`` mixes back into the federation's."""
    path = node.state_dir / personal_file(run_id)
    if not path.exists():
        return None
    with np.load(path) as kept:
        return {k: kept[k] for k in kept.files}


def save_personal(node: Node, run_id: str, weights: dict[str, np.ndarray]) -> None:
    buffer = io.BytesIO()
    savez: Any = np.savez  # numpy's stub types **arrays as its keyword flags
    savez(buffer, **weights)
    atomic_write_bytes(node.state_dir / personal_file(run_id), buffer.getvalue())


def cached_fingerprints(node: Node) -> list[str]:
    folder = node.state_dir / "items"
    return sorted(p.stem for p in folder.glob("*.npy")) if folder.exists() else []


def load_items(node: Node, fingerprint: str) -> np.ndarray:
    path = items_path(node, fingerprint)
    if not path.exists():
        raise FileNotFoundError(
            f"item matrix {fingerprint[:12]}… is not cached on this node ({path}); the server "
            "sends it once at the start of a run (query.items)"
        )
    return np.load(path, mmap_mode="r")
