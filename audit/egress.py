"""Log integrity and egress checks for the audit.

Owns: verifying the hash chains of a run's logs (server privacy ledger, egress log, the
clients' own ledgers) against the heads kept in ``results.json``, and re-checking every logged
reply against the wire allowlist (:data:`shared.wire.ALLOWLIST`) and the model's parameter
shapes (``model.json``), independently of the server's own check at receipt.

A log whose chain is broken, or that does not end at the head recorded in ``results.json``, is
reported as not trusted: its content is still audited, but nothing read from it is vouched for.

Must not: import ``server/`` or ``client/``; trust an entry's own ``violations`` list to be
complete (it is reported, and every entry is checked again here).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord

from fedrec.shared import hashlog, wire

LEDGER = "privacy-ledger.jsonl"
EGRESS = "egress.jsonl"
NODES = "nodes"

# Logged record type (wire.describe) -> the Flower record class the allowlist names.
RECORD_TYPES: dict[str, type] = {
    "arrays": ArrayRecord,
    "metrics": MetricRecord,
    "config": ConfigRecord,
}
TYPE_NAMES = {cls: name for name, cls in RECORD_TYPES.items()}

# Flower serialises an Array as a .npy buffer: data bytes plus a small header (128 bytes for
# the shapes here). More than this over shape × itemsize would be a hidden payload.
NPY_HEADER_MAX = 4096

# Error replies: the budget refusal is part of the protocol; any other error carries free text
# (an exception message) that no allowlist covers. The number is the wire contract
REFUSED_CODE = wire.REFUSED_CODE
REASON_CHARS = 300  # how much of an error reason the report quotes

INTACT, TAMPERED, MISSING, UNVERIFIED_TAIL = "intact", "tampered", "missing", "unverified-tail"


def verify_log(
    path: Path, expected_head: str | None, *, name: str, tail_checked_by: str = ""
) -> dict[str, Any]:
    """Verify one hash-chained log; status is intact, tampered, missing or unverified-tail.

    Args:
        path: the log file.
        expected_head: the head recorded in ``results.json`` (``None``: none recorded, so a
            truncated tail cannot be detected and a clean chain is ``unverified-tail``).
        name: how the log is named in messages (path relative to the run directory).
        tail_checked_by: where a truncated tail is caught instead of by a recorded head (a
            client's ledger: its last history must equal the server ledger's); a clean chain
            is then ``intact``, with this as a note.
    """
    if not path.exists():
        recorded = expected_head not in (None, hashlog.GENESIS)
        return {
            "log": name,
            "status": TAMPERED if recorded else MISSING,
            "entries": 0,
            "head": hashlog.GENESIS,
            "expected_head": expected_head,
            "problem": f"{name}: missing"
            + (" although results.json records its head (removed?)" if recorded else ""),
        }
    verdict = hashlog.verify(path, expected_head=expected_head)
    if not verdict.ok:
        status, problem = TAMPERED, verdict.problem.replace(str(path), name)
    elif expected_head is None and tail_checked_by:
        status, problem = INTACT, f"{name}: chain intact; tail checked by {tail_checked_by}"
    elif expected_head is None:
        status = UNVERIFIED_TAIL
        problem = (
            f"{name}: chain intact, but no head recorded elsewhere: a truncated tail would not "
            "be detected"
        )
    else:
        status, problem = INTACT, ""
    return {
        "log": name,
        "status": status,
        "entries": verdict.entries,
        "head": verdict.head,
        "expected_head": expected_head,
        "problem": problem,
    }


def verify_logs(
    run_dir: Path, log_heads: Mapping[str, str] | None, *, channels: Sequence[str] = ()
) -> dict[str, dict[str, Any]]:
    """Verify the server's ledger and egress log, and every ``nodes/<channel>`` ledger.

    Args:
        run_dir: the run directory.
        log_heads: ``results.json``'s ``log_heads`` (``None`` if the run wrote no results).
        channels: configured channels; their node ledgers are looked for in ``nodes/``.
    """
    heads = dict(log_heads or {})
    out = {
        name: verify_log(run_dir / name, heads.get(name), name=name) for name in (LEDGER, EGRESS)
    }
    nodes = run_dir / NODES
    if nodes.is_dir():
        found = sorted(p.name for p in nodes.iterdir() if (p / LEDGER).exists())
        for ch in sorted(set(found) | set(channels)):
            name = f"{NODES}/{ch}/{LEDGER}"
            out[name] = verify_log(
                run_dir / name,
                heads.get(name),
                name=name,
                tail_checked_by="the accounting (its last history = the server ledger's)",
            )
    return out


def _dims(shape: Any) -> tuple[int, ...] | None:
    if not isinstance(shape, list | tuple) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        return None
    return tuple(shape)


def _is_scalar(value: Any) -> bool:
    """One value, not a list; None is a non-finite float as the log's strict JSON writes it."""
    return value is None or isinstance(value, bool | int | float | str)


def check_entry(
    entry: Mapping[str, Any], param_shapes: Mapping[str, Sequence[int]] | None
) -> list[str]:
    """Violations of one egress-log entry against the allowlist and the model's shapes.

    Mirrors :func:`shared.wire.check_reply` on the logged description: record names allowed for
    the reply's kind, record types, keys of metrics/config records within the allowed keys,
    scalar values only (a list would be per-example values), ``num-examples`` bucketed, and
    arrays exactly the model's parameters (names, shapes, and bytes that match shape × dtype).

    Args:
        entry: one line of ``egress.jsonl``.
        param_shapes: ``model.json``'s ``param_shapes``; ``None`` if unknown (then arrays are
            a violation: they cannot be checked).
    """
    kind = entry.get("kind")
    if not isinstance(kind, str) or kind not in wire.ALLOWLIST:
        return [f"unknown reply kind {kind!r}; expected one of {sorted(wire.ALLOWLIST)}"]
    allowed = wire.ALLOWLIST[kind]
    records = entry.get("records")
    if not isinstance(records, Mapping):
        return [f"{kind} reply: 'records' missing or not an object"]
    out: list[str] = []
    for name in sorted(records):
        rec = records[name]
        if name not in allowed:
            out.append(f"{kind} reply: record {name!r} is not allowed (allowed: {sorted(allowed)})")
            continue
        rtype, keys = allowed[name]
        want = TYPE_NAMES.get(rtype, rtype.__name__)
        got = rec.get("type") if isinstance(rec, Mapping) else None
        if got != want:
            out.append(f"{kind} reply: record {name!r} is {got!r}, must be {want!r}")
            continue
        if keys is None:
            out.extend(_check_arrays(kind, name, rec.get("arrays"), param_shapes))
            continue
        values = rec.get("values")
        if not isinstance(values, Mapping):
            out.append(f"{kind} reply: record {name!r} has no 'values' object")
            continue
        out.extend(value_problems(kind, name, values, keys))
    for name in sorted(allowed):
        if name not in records and not (kind == "train" and name == wire.PRIVACY):
            out.append(f"{kind} reply: record {name!r} is missing")
    return out


def _bucketed(count: object) -> bool:
    """A finite number, not a bool, that is a multiple of the wire's count bucket."""
    if isinstance(count, bool) or not isinstance(count, int | float):
        return False
    return math.isfinite(count) and count % wire.COUNT_BUCKET == 0


def value_problems(
    kind: str, name: str, values: Mapping[str, object], keys: Collection[str]
) -> list[str]:
    """A metrics or config record's values against the allowlist: only allowed keys, scalar
    values (a list would be per-example values), ``num-examples`` rounded to the bucket."""
    out: list[str] = []
    for k in sorted(values):
        v = values[k]
        if k not in keys:
            out.append(f"{kind} reply: key {k!r} in {name!r} is not allowed")
        elif not _is_scalar(v):
            out.append(
                f"{kind} reply: {name}.{k} is a {type(v).__name__}, not a scalar "
                "(per-example values?)"
            )
        elif k == wire.NUM_EXAMPLES and not _bucketed(v):
            out.append(
                f"{kind} reply: {name}.{k} = {v!r} is not a multiple of {wire.COUNT_BUCKET} "
                "(raw count sent)"
            )
    return out


def array_problem(kind: str, k: str, meta: object, param_shape: Sequence[int]) -> str | None:
    """One logged array against its model parameter: described, the same shape, and bytes that
    match shape × dtype (plus at most :data:`NPY_HEADER_MAX` of ``.npy`` header)."""
    if not isinstance(meta, Mapping):
        return f"{kind} reply: array {k!r} has no description"
    shape, want = _dims(meta.get("shape")), tuple(int(d) for d in param_shape)
    if shape != want:
        first = "" if shape and want and shape[0] == want[0] else " (first dimension differs)"
        return f"{kind} reply: array {k!r} has shape {shape}, the model's is {want}{first}"
    try:
        itemsize = np.dtype(str(meta.get("dtype"))).itemsize
    except TypeError:
        return f"{kind} reply: array {k!r} has unknown dtype {meta.get('dtype')!r}"
    nbytes, raw = meta.get("bytes"), math.prod(want) * itemsize
    if not isinstance(nbytes, int) or not raw <= nbytes <= raw + NPY_HEADER_MAX:
        return (
            f"{kind} reply: array {k!r} carries {nbytes!r} bytes; its shape {want} and "
            f"dtype {meta.get('dtype')} make {raw} (+ at most {NPY_HEADER_MAX} of header)"
        )
    return None


def _check_arrays(
    kind: str, name: str, arrays: Any, param_shapes: Mapping[str, Sequence[int]] | None
) -> list[str]:
    if not isinstance(arrays, Mapping):
        return [f"{kind} reply: record {name!r} has no 'arrays' object"]
    if param_shapes is None:
        return [f"{kind} reply: {len(arrays)} arrays in {name!r} unchecked: model.json missing"]
    out: list[str] = []
    extra = sorted(set(arrays) - set(param_shapes))
    missing = sorted(set(param_shapes) - set(arrays))
    for k in extra:
        shape = _dims(arrays[k].get("shape")) if isinstance(arrays[k], Mapping) else None
        out.append(f"{kind} reply: array {k!r} with shape {shape} is not a model parameter")
    if missing:
        out.append(f"{kind} reply: model parameters missing from {name!r}: {missing}")
    found = (
        array_problem(kind, k, arrays[k], param_shapes[k])
        for k in sorted(set(arrays) & set(param_shapes))
    )
    out.extend(p for p in found if p is not None)
    return out


def audit_egress(
    entries: Sequence[Mapping[str, Any]],
    param_shapes: Mapping[str, Sequence[int]] | None,
    *,
    where: str = EGRESS,
) -> dict[str, Any]:
    """Check every logged reply; summarise per channel (replies, bytes, kinds, violations).

    An entry with ``error`` is an error reply (Flower ``Error``): it must carry no records; it
    is listed under ``errors`` (a budget refusal has code :data:`REFUSED_CODE`; any other
    error's reason is free text that left the client outside the allowlist).

    Returns:
        ``{"channels": {channel: {"replies", "bytes", "kinds", "violations", "errors"}},
        "violations": [{"entry", "round", "channel", "kind", "problem", "source", "where"}],
        "errors": [{"entry", "round", "channel", "kind", "code", "refused", "reason",
        "where"}], "replies", "bytes"}``; ``source`` is ``"audit"`` for what this check found
        and ``"server"`` for what the server itself flagged at receipt.
    """
    channels: dict[str, dict[str, Any]] = {}
    violations: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    for idx, e in enumerate(entries, start=1):
        line = e.get("_line", idx)
        ch = str(e.get(wire.CHANNEL, "?"))
        kind = str(e.get("kind", "?"))
        summary = channels.setdefault(
            ch, {"replies": 0, "bytes": 0, "kinds": {}, "violations": 0, "errors": 0}
        )
        summary["replies"] += 1
        nbytes = e.get("bytes")
        if isinstance(nbytes, int) and not isinstance(nbytes, bool):
            summary["bytes"] += nbytes
        summary["kinds"][kind] = summary["kinds"].get(kind, 0) + 1
        if e.get("error") is not None:
            err = e["error"] if isinstance(e["error"], Mapping) else {"reason": str(e["error"])}
            summary["errors"] += 1
            errors.append(
                {
                    "entry": line,
                    "round": e.get("round"),
                    "channel": ch,
                    "kind": kind,
                    "code": err.get("code"),
                    "refused": err.get("code") == REFUSED_CODE,
                    "reason": str(err.get("reason", ""))[:REASON_CHARS],
                    "where": f"{where}: entry {line}",
                }
            )
            carried = e.get("records")
            found = (
                [("audit", f"{kind} error reply also carries records {sorted(carried)}")]
                if carried
                else []
            )
        else:
            found = [("audit", p) for p in check_entry(e, param_shapes)]
        logged = e.get("violations")
        if logged:
            items = logged if isinstance(logged, list) else [logged]
            found += [("server", str(p)) for p in items]
        for source, problem in found:
            violations.append(
                {
                    "entry": line,
                    "round": e.get("round"),
                    "channel": ch,
                    "kind": kind,
                    "problem": problem,
                    "source": source,
                    "where": f"{where}: entry {line}",
                }
            )
        summary["violations"] += len(found)
    return {
        "channels": channels,
        "violations": violations,
        "errors": errors,
        "replies": sum(c["replies"] for c in channels.values()),
        "bytes": sum(c["bytes"] for c in channels.values()),
    }
