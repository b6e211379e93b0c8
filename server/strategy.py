"""Strategies: Flower's FedAvg / FedAdam / FedProx, extended (not forked) to check every reply
against the wire allowlist, log what crossed the boundary, keep the privacy ledger, record
refusals and missing channels, and checkpoint every round.

Must not: import ``fedrec.client``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from logging import INFO, WARNING
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedProx

from fedrec.server.rundir import TIMING_CHANNEL, TIMING_PHASE, RunDir
from fedrec.shared import wire
from fedrec.shared.config import FedrecConfig
from fedrec.shared.model import head_owner

# Error codes with which the SuperLink reports a node it could not reach.
UNAVAILABLE = {
    ErrorCode.NODE_UNAVAILABLE,
    ErrorCode.REPLY_MESSAGE_UNAVAILABLE,
    ErrorCode.MESSAGE_UNAVAILABLE,
}


if TYPE_CHECKING:
    # At run time the mixin comes first in a class with one of FedAvg's subclasses (below);
    # typed as a FedAvg, its super() calls are checked against the strategy it extends.
    _Strategy = FedAvg
else:
    _Strategy = object


class RecordingMixin(_Strategy):
    """Checks, records and checkpoints around the parent strategy's aggregation."""

    def setup_recording(
        self,
        run: RunDir,
        shapes: dict[str, tuple[int, ...]],
        node_channels: dict[int, tuple[str, int]],
        round_offset: int = 0,
    ) -> None:
        self.run = run
        self.shapes = shapes
        self.node_channels = node_channels
        self.round_offset = round_offset
        self.last_eval: dict[str, dict[str, float]] = {}
        self.last_privacy: dict[str, dict[str, Any]] = {}
        self.round_status: dict[int, dict[str, str]] = {}
        self.sent: list[Message] = []
        self.current = ArrayRecord()  # the global arrays of the round being trained
        self.started = 0.0  # when the current phase's messages went out (time.monotonic)
        self.train_seconds = 0.0

    # Flower counts rounds from 1 in every start(); a resumed run continues the numbering.
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.current = arrays
        self.started = time.monotonic()
        self.sent = list(
            super().configure_train(server_round + self.round_offset, arrays, config, grid)
        )
        return self.sent

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.started = time.monotonic()
        self.sent = list(
            super().configure_evaluate(server_round + self.round_offset, arrays, config, grid)
        )
        return self.sent

    def _label(self, node: int, content: RecordDict | None) -> tuple[str, int]:
        """(channel, shard) a node serves: from its reply, else from the items hand-shake."""
        found = wire.sender(content) if content is not None else None
        if found is not None:
            self.node_channels.setdefault(node, found)
            return found
        return self.node_channels.get(node, (f"node-{node}", 0))

    def _screen(
        self, round_: int, kind: str, replies: Iterable[Message]
    ) -> tuple[list[Message], dict[str, str]]:
        """Egress-log every reply; keep only clean ones; return status per node label."""
        kept: list[Message] = []
        status: dict[str, str] = {}
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error() and node == SUPERLINK_NODE_ID:
                # The SuperLink answers for a node it cannot reach: find that node.
                sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in self.sent}
                node = sent_to.get(msg.metadata.reply_to_message_id, node)
            content = None if msg.has_error() else msg.content
            channel, shard = self._label(node, content)
            label = _node_label(channel, shard)
            where = {"round": round_, **_who(channel, shard), "node": node}
            if content is None:
                reason = msg.error.reason or ""
                code = msg.error.code
                status[label] = (
                    "refused"
                    if code == wire.REFUSED_CODE
                    else "missing"
                    if code in UNAVAILABLE
                    else "failed"
                )
                error = {"code": msg.error.code, "reason": reason[:2000]}
                self.run.egress(
                    {
                        **where,
                        "kind": kind,
                        "error": error,
                        "records": {},
                        "bytes": 0,
                        "sha256": "",
                        "violations": [],
                    }
                )
                if kind == "train":
                    self.run.ledger(
                        {**where, "status": status[label], "reason": reason[:2000], "steps": 0}
                    )
                log(WARNING, "round %d: %s %s: %s", round_, label, status[label], reason[:300])
                continue
            violations = wire.check_reply(kind, content, self.shapes)
            self.run.egress(
                {**where, "kind": kind, **wire.describe(content), "violations": violations}
            )
            if violations:
                status[label] = "rejected"
                if kind == "train":  # the node trained (and spent ε) even if we refuse its reply
                    report = content.get(wire.PRIVACY)
                    spent = dict(report) if isinstance(report, ConfigRecord) else {}
                    self.run.ledger(
                        {**where, **spent, "status": "rejected", "reason": "; ".join(violations)}
                    )
                log(
                    WARNING, "round %d: %s reply rejected: %s", round_, label, "; ".join(violations)
                )
                continue
            status[label] = "ok"
            kept.append(msg)
        return kept, status

    def _missing(self, status: dict[str, str]) -> list[tuple[str, int]]:
        return sorted(
            cs for cs in set(self.node_channels.values()) if _node_label(*cs) not in status
        )

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        round_ = server_round + self.round_offset
        kept, status = self._screen(round_, "train", replies)
        for msg in kept:
            channel, shard = self._label(msg.metadata.src_node_id, msg.content)
            report = dict(msg.content[wire.PRIVACY]) if wire.PRIVACY in msg.content else {}
            self.last_privacy[_node_label(channel, shard)] = report
            self.run.ledger(
                {
                    "round": round_,
                    **_who(channel, shard),
                    "node": msg.metadata.src_node_id,
                    "status": "trained",
                    **report,
                }
            )
            self.run.metrics(
                round_, _node_label(channel, shard), "train", wire.scalar_metrics(msg.content)
            )
        for channel, shard in self._missing(status):
            status[_node_label(channel, shard)] = "missing"
            self.run.ledger(
                {
                    "round": round_,
                    **_who(channel, shard),
                    "status": "missing",
                    "reason": "no reply this round (node down or timed out)",
                    "steps": 0,
                }
            )
        self.round_status[round_] = status
        self._own_heads(kept)
        arrays, metrics = super().aggregate_train(server_round, kept)
        if arrays is not None:
            self.run.checkpoint(round_, {k: arrays[k].numpy() for k in arrays.keys()})
        self.train_seconds = time.monotonic() - self.started
        return arrays, metrics

    def _own_heads(self, kept: list[Message]) -> None:
        """Give every reply the same value for each platform head (its own platform's mean),
        so the parent strategy's aggregate of a head is that platform's update alone."""
        heads = [k for k in self.current.keys() if head_owner(k) is not None]
        if not heads:  # model.heads = "shared"
            return
        replies = [
            (
                self._label(m.metadata.src_node_id, m.content)[0],
                float(wire.scalar_metrics(m.content)[wire.NUM_EXAMPLES]),
                wire.model_arrays(m.content),
            )
            for m in kept
        ]
        current = {k: self.current[k].numpy() for k in heads}
        pooled = pool_heads(
            [(ch, w, {k: a[k].numpy() for k in heads}) for ch, w, a in replies], current
        )
        for _, _, arrays in replies:
            for k, v in pooled.items():
                arrays[k] = Array(np.ascontiguousarray(v))

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        round_ = server_round + self.round_offset
        kept, _ = self._screen(round_, "evaluate", replies)
        for msg in kept:
            label = _node_label(*self._label(msg.metadata.src_node_id, msg.content))
            values = wire.scalar_metrics(msg.content)
            self.last_eval[label] = values
            self.run.metrics(round_, label, "evaluate", values)
        line = " | ".join(
            f"{ch}: ndcg@10={m[wire.NDCG10]:.4f} ε={_eps(self.last_privacy.get(ch))}"
            for ch, m in sorted(self.last_eval.items())
        )
        status = self.round_status.get(round_, {})
        odd = {ch: s for ch, s in status.items() if s != "ok"}
        times = {"train-seconds": self.train_seconds}
        times["evaluate-seconds"] = time.monotonic() - self.started
        self.run.metrics(round_, TIMING_CHANNEL, TIMING_PHASE, times)
        log(
            INFO,
            "[fedrec] round %d: %s%s (train %.1fs, evaluate %.1fs)",
            round_,
            line,
            f" | not trained: {odd}" if odd else "",
            times["train-seconds"],
            times["evaluate-seconds"],
        )
        return super().aggregate_evaluate(server_round, kept)


def pool_heads(
    replies: list[tuple[str, float, Mapping[str, np.ndarray]]],
    current: Mapping[str, np.ndarray],
) -> dict[str, np.ndarray]:
    """Each platform head's value after a round: the weighted mean over the replies of the
    platform that owns it (its shards), or ``current`` if that platform sent none.

    Args:
        replies: (channel, weight, arrays) per accepted train reply.
        current: the global arrays sent this round.
    """
    out: dict[str, np.ndarray] = {}
    for k, value in current.items():
        owner = head_owner(k)
        if owner is None:
            continue
        own = [(w, a[k]) for ch, w, a in replies if ch == owner]
        total = sum(w for w, _ in own)
        out[k] = (
            sum((w / total * a for w, a in own), np.zeros_like(value))
            if own and total > 0
            else value
        )
    return out


def _who(channel: str, shard: int) -> dict[str, Any]:
    """Log fields naming a node: ``shard`` only for the extra shards of a channel, so that
    the usual one-node-per-platform logs (and their audits) are keyed by channel alone."""
    return {"channel": channel, "shard": shard} if shard else {"channel": channel}


def _node_label(channel: str, shard: int) -> str:
    """``channel`` for shard 0 (the usual one node per platform), ``channel-N`` for others."""
    return channel if shard == 0 else f"{channel}-{shard}"


def _eps(report: dict[str, Any] | None) -> str:
    if not report or wire.EPSILON not in report:
        return "-"
    e = float(report[wire.EPSILON])
    return "inf" if math.isinf(e) else f"{e:.3f}"


class RecordingFedAvg(RecordingMixin, FedAvg):
    pass


class RecordingFedAvgM(RecordingMixin, FedAvgM):
    pass


class RecordingFedAdam(RecordingMixin, FedAdam):
    pass


class RecordingFedProx(RecordingMixin, FedProx):
    pass


def make_strategy(cfg: FedrecConfig) -> RecordingMixin:
    """The configured strategy; it waits for ``min-nodes`` platforms and needs them all to reply
    only as far as ``min-nodes`` says (a missing platform is recorded, the others go on)."""
    common: dict[str, Any] = {
        "fraction_train": 1.0,
        "fraction_evaluate": 1.0,
        "min_train_nodes": cfg.min_nodes,
        "min_evaluate_nodes": cfg.min_nodes,
        "min_available_nodes": cfg.min_nodes,
    }
    if cfg.strategy.name == "fedavgm":
        return RecordingFedAvgM(**common, server_learning_rate=cfg.strategy.server_lr)
    if cfg.strategy.name == "fedadam":
        return RecordingFedAdam(**common, eta=cfg.strategy.server_lr, eta_l=cfg.train.lr)
    if cfg.strategy.name == "fedprox":
        return RecordingFedProx(**common, proximal_mu=cfg.strategy.proximal_mu)
    return RecordingFedAvg(**common)
