"""The wire contract: message types, record keys, metric names, and the reply allowlist.

Owns: every key that crosses between a client and the server. Replies are built only through
:func:`build_reply`, which refuses anything outside the allowlist (fail closed), and checked
again on receipt with :func:`check_reply`. :func:`describe` turns a reply into the egress-log
entry (keys, shapes, dtypes, bytes, sha256) that the server writes for every reply it receives.

What may leave a client, and nothing else:
  * train: the shared model's weights (exactly its parameter names and shapes), the training
    loss (only where the node's policy has ``send-loss = true``), the aggregation weight, and
    the privacy report (:data:`PRIVACY_KEYS`: ε, δ, noise multiplier, clipping bound, sample
    rate, steps, accountant, item-prior releases, noise source, the node policy's digest, the
    node ledger's head);
  * evaluate: aggregate ranking metrics and the number of evaluated users;
  * items: an acknowledgement (rows cached, fingerprint), both about public data.
Metric and config values are single numbers, strings or booleans: a list could carry
per-example values.
Never: interactions, user ids or indices, per-example values or gradients, the items a user
touched, optimizer state.
Counts (``num-examples``) are sent rounded up to a multiple of :data:`COUNT_BUCKET`: they reveal
the platform's size to the server at that granularity. They are not covered by DP; the audit
says so.

Must not: import ``fedrec.server`` or ``fedrec.client``.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedrec.shared.errors import FedrecError

# Message types (Flower: "train", "evaluate", and "query.<name>" for our own).
ITEMS_QUERY = "items"  # handled by @app.query(ITEMS_QUERY), type "query.items"

# Record keys (FedAvg's defaults for arrays/config).
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
PRIVACY = "privacy"
INFO = "info"
ITEMS = "items"

# Config keys the server sends.
SERVER_ROUND = "server-round"
PROXIMAL_MU = "proximal-mu"
ITEMS_FINGERPRINT = "items-fingerprint"
CHANNEL = "channel"
SHARD = "shard"  # which shard of a channel a node serves (disjoint users, own accountant)

# Error code of a reply that refuses to train (privacy budget spent, bad DP setting).
REFUSED_CODE = 4030

# Metric names.
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
HR10, NDCG10, RECALL20, MRR = "hr@10", "ndcg@10", "recall@20", "mrr"
HR20, NDCG20 = "hr@20", "ndcg@20"
RANKING_METRICS = (HR10, NDCG10, HR20, NDCG20, RECALL20, MRR)
ROWS = "rows"

# Privacy report keys (Opacus vocabulary).
EPSILON = "epsilon"
DELTA = "delta"
NOISE_MULTIPLIER = "noise-multiplier"
MAX_GRAD_NORM = "max-grad-norm"
SAMPLE_RATE = "sample-rate"
STEPS = "steps"
TOTAL_STEPS = "total-steps"
ACCOUNTANT = "accountant"
GRAD_SAMPLE_MODE = "grad-sample-mode"
DP_ENABLED = "dp-enabled"
# the item-prior release: its noise multiplier and how many releases the history holds
PRIOR_NOISE_MULTIPLIER = "prior-noise-multiplier"
PRIOR_RELEASES = "prior-releases"
# which generator drew the DP noise (fedrec.client.noise), the node policy's sha256, and the
# hash of the node's ledger's last line (the server keeps it; the node checks it next time)
NOISE_SOURCE = "noise-source"
POLICY = "policy"
LEDGER_HEAD = "ledger-head"
PRIVACY_KEYS = (
    EPSILON,
    DELTA,
    NOISE_MULTIPLIER,
    MAX_GRAD_NORM,
    SAMPLE_RATE,
    STEPS,
    TOTAL_STEPS,
    ACCOUNTANT,
    GRAD_SAMPLE_MODE,
    DP_ENABLED,
    PRIOR_NOISE_MULTIPLIER,
    PRIOR_RELEASES,
    NOISE_SOURCE,
    POLICY,
    LEDGER_HEAD,
)

COUNT_BUCKET = 100

Record = ArrayRecord | MetricRecord | ConfigRecord

# kind -> record key -> (record type, allowed keys or None for "model parameters").
ALLOWLIST: dict[str, dict[str, tuple[type[Record], tuple[str, ...] | None]]] = {
    "train": {
        ARRAYS: (ArrayRecord, None),
        METRICS: (MetricRecord, (TRAIN_LOSS, NUM_EXAMPLES)),
        PRIVACY: (ConfigRecord, PRIVACY_KEYS),
        INFO: (ConfigRecord, (CHANNEL, SHARD)),
    },
    "evaluate": {
        METRICS: (MetricRecord, (*RANKING_METRICS, NUM_EXAMPLES)),
        INFO: (ConfigRecord, (CHANNEL, SHARD)),
    },
    ITEMS: {
        METRICS: (MetricRecord, (ROWS,)),
        INFO: (ConfigRecord, (CHANNEL, SHARD, ITEMS_FINGERPRINT)),
    },
}


class EgressViolation(FedrecError, ValueError):
    """A reply holds something outside the allowlist; nothing is sent or accepted."""


def bucket_count(n: int) -> int:
    """Round a count up to a multiple of :data:`COUNT_BUCKET` (0 stays 0)."""
    return int(math.ceil(n / COUNT_BUCKET) * COUNT_BUCKET)


def shape_problems(
    got: Mapping[str, tuple[int, ...]], param_shapes: Mapping[str, tuple[int, ...]]
) -> list[str]:
    """How ``got`` (array name -> shape) differs from exactly the model's parameters."""
    out: list[str] = []
    if set(got) != set(param_shapes):
        extra = sorted(set(got) - set(param_shapes))
        missing = sorted(set(param_shapes) - set(got))
        out.append(f"arrays must be exactly the model parameters; extra {extra}, missing {missing}")
    for k in sorted(set(got) & set(param_shapes)):
        if tuple(got[k]) != tuple(param_shapes[k]):
            out.append(
                f"array {k!r} has shape {tuple(got[k])}, the model's is {tuple(param_shapes[k])}"
            )
    return out


def _violations(
    kind: str, records: Mapping[str, Any], param_shapes: Mapping[str, tuple[int, ...]]
) -> list[str]:
    if kind not in ALLOWLIST:
        return [f"unknown reply kind {kind!r}; expected one of {sorted(ALLOWLIST)}"]
    allowed = ALLOWLIST[kind]
    out: list[str] = []
    for name, record in records.items():
        if name not in allowed:
            out.append(f"{kind} reply: record {name!r} is not allowed (allowed: {sorted(allowed)})")
            continue
        rtype, keys = allowed[name]
        if not isinstance(record, rtype):
            out.append(f"{kind} reply: record {name!r} must be a {rtype.__name__}")
            continue
        if isinstance(record, ArrayRecord):  # model parameters: exactly their names and shapes
            got = {k: tuple(int(d) for d in record[k].shape) for k in record.keys()}
            out += [f"{kind} reply: {p}" for p in shape_problems(got, param_shapes)]
            continue
        for k, value in record.items():
            if keys is None or k not in keys:
                out.append(f"{kind} reply: key {k!r} in {name!r} is not allowed")
            elif isinstance(value, list):
                out.append(
                    f"{kind} reply: {name}.{k} is a list, not a scalar (per-example values?)"
                )
    for name in allowed:
        if name not in records and not (kind == "train" and name == PRIVACY):
            out.append(f"{kind} reply: record {name!r} is missing")
    return out


def build_reply(
    kind: str,
    *,
    param_shapes: Mapping[str, tuple[int, ...]] | None = None,
    arrays: Mapping[str, np.ndarray] | None = None,
    metrics: Mapping[str, float | int] | None = None,
    privacy: Mapping[str, float | int | str | bool] | None = None,
    info: Mapping[str, str | int] | None = None,
) -> RecordDict:
    """Build a reply's content, refusing (raising) if anything is outside the allowlist.

    Raises:
        EgressViolation: with every violation listed; nothing is built.
    """
    records: dict[str, Any] = {}
    if arrays is not None:
        records[ARRAYS] = ArrayRecord(
            {k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()}
        )
    if metrics is not None:
        records[METRICS] = MetricRecord(dict(metrics))
    if privacy is not None:
        records[PRIVACY] = ConfigRecord(dict(privacy))
    if info is not None:
        records[INFO] = ConfigRecord(dict(info))
    problems = _violations(kind, records, param_shapes or {})
    if problems:
        raise EgressViolation("refusing to send: " + "; ".join(problems))
    return RecordDict(records)


def check_reply(
    kind: str, content: RecordDict, param_shapes: Mapping[str, tuple[int, ...]]
) -> list[str]:
    """Server-side re-check of a received reply; returns the violations (empty if clean)."""
    records = dict(content.items())
    return _violations(kind, records, param_shapes)


def sender(content: RecordDict) -> tuple[str, int] | None:
    """``(channel, shard)`` that a reply's info record names; None if it names none (no
    info record, no channel string, or a shard that is not an integer)."""
    info = content.get(INFO)
    if not isinstance(info, ConfigRecord):
        return None
    channel, shard = info.get(CHANNEL), info.get(SHARD, 0)
    if not isinstance(channel, str) or isinstance(shard, bool) or not isinstance(shard, int):
        return None
    return channel, shard


def model_arrays(content: RecordDict) -> ArrayRecord:
    """The arrays record of a train reply that passed :func:`check_reply`.

    Raises:
        EgressViolation: the reply has no arrays record.
    """
    record = content.get(ARRAYS)
    if not isinstance(record, ArrayRecord):
        raise EgressViolation(f"the reply has no {ARRAYS!r} record")
    return record


def scalar_metrics(content: RecordDict) -> dict[str, float]:
    """The metrics record of a reply that passed :func:`check_reply` (so every value is a
    number), as a plain dict.

    Raises:
        EgressViolation: the reply has no metrics record, or a value that is not a number.
    """
    record = content.get(METRICS)
    if not isinstance(record, MetricRecord):
        raise EgressViolation(f"the reply has no {METRICS!r} record")
    out: dict[str, float] = {}
    for k, value in record.items():
        if isinstance(value, list):
            raise EgressViolation(f"{METRICS}.{k} is a list, not a number")
        out[k] = value
    return out


def describe(content: RecordDict) -> dict[str, Any]:
    """What a reply carried, for the egress log: keys, shapes, dtypes, bytes, sha256.

    Values of metrics and privacy reports are aggregate, allowlisted scalars and are logged;
    arrays are logged by shape, dtype and hash only.
    """
    h = hashlib.sha256()
    total = 0
    records: dict[str, Any] = {}
    for name in sorted(content.keys()):
        rec = content[name]
        if isinstance(rec, ArrayRecord):
            arrays = {}
            for k in sorted(rec.keys()):
                a = rec[k]
                h.update(name.encode() + b"/" + k.encode() + b"\0" + a.data)
                total += len(a.data)
                arrays[k] = {"shape": list(a.shape), "dtype": a.dtype, "bytes": len(a.data)}
            records[name] = {"type": "arrays", "arrays": arrays}
        else:
            values = {k: rec[k] for k in sorted(rec.keys())}
            blob = repr(sorted(values.items())).encode()
            h.update(name.encode() + b"\0" + blob)
            total += len(blob)
            kind = "metrics" if isinstance(rec, MetricRecord) else "config"
            records[name] = {"type": kind, "values": values}
    return {"records": records, "bytes": total, "sha256": h.hexdigest()}
