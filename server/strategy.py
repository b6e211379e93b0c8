"""Strategies: Flower's FedAvg / FedAdam / FedProx, extended (not forked) to check every reply
against the wire allowlist, log what crossed the boundary, keep the privacy ledger, record
refusals and missing channels, and checkpoint every round.

Also owns who may serve a channel (:func:`claim_refusal`: one node per channel and shard per
run, and the ``node-channels`` binding), sending rounds only to admitted nodes, and when a run
counts as failed (:func:`run_failure`: no platform trained in any round).

Must not: import ``fedrec.client``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from logging import INFO, WARNING
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedProx

from fedrec.server.rundir import LEDGER, TIMING_CHANNEL, TIMING_PHASE, RunDir
from fedrec.shared import hashlog, wire
from fedrec.shared.config import FedrecConfig
from fedrec.shared.model import head_owner

# The ServerApp's hand-shake with new nodes: node ids -> (admitted: node -> (channel, shard),
# refused: node -> reason). See server/app.py deliver_items.
Admit = Callable[[list[int]], tuple[dict[int, tuple[str, int]], dict[int, str]]]

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
    """Checks, records and checkpoints around the parent strategy's aggregation.

    A strategy that keeps state between rounds (FedAdam's moments, FedAvgM's momentum) saves
    it with each checkpoint (:meth:`server_state`) and takes it back on resume
    (:meth:`restore_server_state`), so that a resumed run continues where it stopped.
    """

    name = "fedavg"  # the run config's strategy name

    def setup_recording(
        self,
        run: RunDir,
        shapes: dict[str, tuple[int, ...]],
        node_channels: dict[int, tuple[str, int]],
        round_offset: int = 0,
        *,
        refused_nodes: Mapping[int, str] | None = None,
        admit: Admit | None = None,
    ) -> None:
        """``node_channels``: the nodes admitted so far; ``refused_nodes``: node -> why it may
        not serve; ``admit``: hand-shake with nodes that join later (``None``: send to every
        node not refused, and label nodes by their replies)."""
        self.run = run
        self.shapes = shapes
        self.node_channels = node_channels
        self.refused_nodes = dict(refused_nodes or {})
        self.admit = admit
        self.round_offset = round_offset
        self.reasons: dict[str, str] = {}  # node label -> why it last did not train
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
        self._admit_new(grid)
        sent = super().configure_train(server_round + self.round_offset, arrays, config, grid)
        self.sent = [m for m in sent if self._serves(m.metadata.dst_node_id)]
        heads = self.ledger_heads()
        for m in self.sent:  # each node checks that its ledger still holds what it sent last
            record = m.content.get(wire.CONFIG)
            if isinstance(record, ConfigRecord):
                for label, head in heads.items():
                    record[f"{wire.LEDGER_HEAD}.{label}"] = head
        return self.sent

    def ledger_heads(self) -> dict[str, str]:
        """Node label -> the head of its own ledger that its last accepted train reply
        reported, from the run's ledger (so a resumed server has them too)."""
        heads: dict[str, str] = {}
        for entry in hashlog.read(self.run.path / LEDGER):
            head = entry.get(wire.LEDGER_HEAD)
            if entry.get("status") == "trained" and isinstance(head, str):
                heads[_node_label(str(entry.get("channel")), int(entry.get("shard", 0)))] = head
        return heads

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.started = time.monotonic()
        sent = super().configure_evaluate(server_round + self.round_offset, arrays, config, grid)
        self.sent = [m for m in sent if self._serves(m.metadata.dst_node_id)]
        return self.sent

    def _admit_new(self, grid: Grid) -> None:
        """Hand-shake with nodes that connected after the last one (a platform that came up
        late, or a new key claiming a channel): they are admitted or refused before any
        round reaches them."""
        known = self.node_channels.keys() | self.refused_nodes.keys()
        new = sorted(n for n in grid.get_node_ids() if n not in known)
        if new and self.admit is not None:
            admitted, refused = self.admit(new)
            self.node_channels.update(admitted)
            self.refused_nodes.update(refused)

    def _serves(self, node: int) -> bool:
        """Whether a round goes to ``node``: never to a refused one; with a hand-shake, only
        to the admitted ones (a node whose hand-shake failed is asked again next round)."""
        if node in self.refused_nodes:
            return False
        return self.admit is None or node in self.node_channels

    def _label(self, node: int, content: RecordDict | None) -> tuple[str, int]:
        """(channel, shard) a node serves: what the hand-shake admitted, else what its reply
        says (a node cannot switch channels mid-run by saying another in a reply)."""
        found = wire.sender(content) if content is not None else None
        if found is not None:
            return self.node_channels.setdefault(node, found)
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
                    self.reasons[label] = reason
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
                if kind == "train":
                    self.reasons[label] = "reply rejected: " + "; ".join(
                        violations
                    )  # the node trained (and spent ε) even if we refuse its reply
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
            self.reasons[_node_label(channel, shard)] = "no reply (node down or timed out)"
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
        # The run's round, not this start()'s: FedAdam's bias correction goes on after a resume.
        arrays, metrics = super().aggregate_train(round_, kept)
        if arrays is not None:
            state = self.server_state()
            if state:  # first: a checkpoint never lacks its state
                self.run.save_server_state(round_, self.name, state)
            self.run.checkpoint(round_, {k: arrays[k].numpy() for k in arrays.keys()})
        self.train_seconds = time.monotonic() - self.started
        return arrays, metrics

    def server_state(self) -> dict[str, np.ndarray]:
        """The parent strategy's state besides the global arrays, keyed ``<part>/<parameter>``
        (empty for FedAvg and FedProx, which keep none)."""
        return {}

    def server_state_shapes(
        self, shapes: Mapping[str, tuple[int, ...]]
    ) -> dict[str, tuple[int, ...]]:
        """Names and shapes of :meth:`server_state` once a round was aggregated, for a model
        with parameters ``shapes``."""
        return {}

    def restore_server_state(
        self, state: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]]
    ) -> None:
        """Continue from a :meth:`server_state` of an earlier run, already checked against
        :meth:`server_state_shapes` (:meth:`~fedrec.server.rundir.RunDir.server_state`)."""

    def resume_state(self, run: RunDir, round_: int, shapes: Mapping[str, tuple[int, ...]]) -> bool:
        """Take back the state saved in ``run`` after ``round_`` (the checkpoint a run resumes
        from); False if none was saved.

        Raises:
            RunDirError: the saved state is unreadable, of another strategy, or does not fit.
        """
        state = run.server_state(round_, self.name, self.server_state_shapes(shapes))
        if state is None:
            return False
        self.restore_server_state(state, shapes)
        return True

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


def claim_refusal(
    node: int,
    claim: tuple[str, int] | None,
    served: Mapping[int, tuple[str, int]],
    channels: Collection[str],
    bindings: Mapping[int, str],
    shards: int = 1,
) -> str | None:
    """Why ``node`` may not serve the (channel, shard) it claims; ``None``: admit it.

    A node names its own channel (its ``--node-config``), so without a check any registered
    key could serve a channel a second time, and with a fresh state dir spend that channel's
    users' budget again. The first node to claim a channel and shard in a run keeps it.
    ``bindings`` (run config ``node-channels``; empty: no binding) names the one
    SuperLink-authenticated node id allowed for each channel.

    Args:
        node: the node id the SuperLink authenticated.
        claim: what the node says it serves; ``None`` if it did not say.
        served: node -> (channel, shard) already admitted in this run.
        channels: the run's channels.
        bindings: node id -> channel, from ``node-channels``.
        shards: nodes per channel in this run (shard ids 0..shards-1; a second node cannot
            claim a channel again under another shard id).
    """
    if claim is None:
        return f"node {node} did not say which channel and shard it serves"
    channel, shard = claim
    if not 0 <= shard < shards:
        return f"node {node} claims shard {shard} of {channel!r}; this run has {shards} per channel"
    if channel not in channels:
        return f"node {node} claims channel {channel!r}, which this run does not have ({sorted(channels)})"
    if bindings and node not in bindings:
        return (
            f"node {node} claims channel {channel!r} but node-channels binds no channel to it "
            f"(bound: {', '.join(f'{n}={c}' for n, c in sorted(bindings.items()))})"
        )
    if bindings and bindings[node] != channel:
        return f"node {node} claims channel {channel!r} but node-channels binds it to {bindings[node]!r}"
    holder = next((n for n, cs in served.items() if cs == claim and n != node), None)
    if holder is not None:
        return f"node {node} claims {_node_label(channel, shard)!r}, which node {holder} already serves in this run"
    return None


def run_failure(
    round_status: Mapping[int, Mapping[str, str]],
    reasons: Mapping[str, str],
    refused_nodes: Mapping[int, str],
) -> str | None:
    """Why a run failed: no platform trained (an accepted train reply) in any round, or no
    round started (``round_status`` empty: no node was admitted). ``None`` if one trained. The reason names each platform's last status and why, then each refused node.

    Args:
        round_status: round -> node label -> train status (``ok``, ``refused``, ``missing``...).
        reasons: node label -> why it last did not train.
        refused_nodes: node id -> why it was not admitted.
    """
    if any(s == "ok" for status in round_status.values() for s in status.values()):
        return None
    last: dict[str, str] = {}
    for _, status in sorted(round_status.items()):
        last.update(status)
    parts = [f"{label} {s} ({_gist(reasons.get(label, ''))})" for label, s in sorted(last.items())]
    parts += [f"node {n} refused ({_gist(r)})" for n, r in sorted(refused_nodes.items())]
    what = (
        f"no platform trained in any of the {len(round_status)} round(s)"
        if round_status
        else "no node may serve a channel, so no round was started"
    )
    return f"{what}: " + ("; ".join(parts) if parts else "no node answered")


def _gist(reason: str, limit: int = 300) -> str:
    """One line of a reason: its last non-empty line (a traceback's exception), shortened."""
    lines = [line.strip() for line in reason.splitlines() if line.strip()]
    text = lines[-1] if lines else "no reason given"
    return text if len(text) <= limit else text[: limit - 1] + "…"


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
    name = "fedavg"


class RecordingFedAvgM(RecordingMixin, FedAvgM):
    """FedAvgM (Hsu et al., 2019, arXiv:1909.06335); its state is the momentum vector."""

    name = "fedavgm"

    def server_state(self) -> dict[str, np.ndarray]:
        if self.momentum_vector is None or self.current_arrays is None:
            return {}
        # FedAvgM zips the momentum with the arrays by position, in the arrays' key order.
        names = list(self.current_arrays.keys())
        return {f"momentum/{k}": v for k, v in zip(names, self.momentum_vector, strict=True)}

    def server_state_shapes(
        self, shapes: Mapping[str, tuple[int, ...]]
    ) -> dict[str, tuple[int, ...]]:
        if not (self.server_opt and self.server_momentum > 0.0):
            return {}
        return {f"momentum/{k}": v for k, v in shapes.items()}

    def restore_server_state(
        self, state: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]]
    ) -> None:
        # In the model's parameter order: the order of the replies FedAvgM aggregates.
        self.momentum_vector = [np.asarray(state[f"momentum/{k}"]) for k in shapes]


class RecordingFedAdam(RecordingMixin, FedAdam):
    """FedAdam (Reddi et al., 2021, arXiv:2003.00295); its state is the moments m_t, v_t."""

    name = "fedadam"
    _MOMENTS = ("m_t", "v_t")

    def server_state(self) -> dict[str, np.ndarray]:
        if not self.m_t or not self.v_t:
            return {}
        moments = {"m_t": self.m_t, "v_t": self.v_t}
        return {f"{part}/{k}": v for part, values in moments.items() for k, v in values.items()}

    def server_state_shapes(
        self, shapes: Mapping[str, tuple[int, ...]]
    ) -> dict[str, tuple[int, ...]]:
        return {f"{part}/{k}": v for part in self._MOMENTS for k, v in shapes.items()}

    def restore_server_state(
        self, state: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]]
    ) -> None:
        self.m_t = {k: np.asarray(state[f"m_t/{k}"]) for k in shapes}
        self.v_t = {k: np.asarray(state[f"v_t/{k}"]) for k in shapes}


class RecordingFedProx(RecordingMixin, FedProx):
    name = "fedprox"


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
