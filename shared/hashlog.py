"""Append-only, hash-chained JSON Lines logs (privacy ledgers, egress log).

Each line is a strict JSON object (an ε of ∞ is written as null) with two extra fields: ``prev`` (the previous line's ``hash``, or
:data:`GENESIS` for the first) and ``hash`` = sha256 of ``prev`` and the canonical JSON of the
entry without ``hash``. Editing, deleting or reordering any line breaks the chain from there
on, and :func:`verify` says where. Truncation of the tail is caught by comparing the last hash
with one kept elsewhere (results.json keeps the head of each log).

An unkeyed chain proves only that the file is consistent with itself: whoever can write the
run directory can drop lines and recompute every hash. With a key the operator keeps outside
the run directory (:data:`KEY_ENV` names its file), :func:`sign_heads` adds an HMAC-SHA256 of
the heads, which nobody without the key can recompute (:func:`check_signed_heads`).

Must not: import ``fedrec.server`` or ``fedrec.client``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedrec.shared import fsio
from fedrec.shared.errors import FedrecError

GENESIS = "0" * 64


def _canonical(entry: dict[str, Any]) -> bytes:
    return json.dumps(entry, sort_keys=True, separators=(",", ":"), default=str).encode()


def chain_hash(prev: str, entry: dict[str, Any]) -> str:
    body = {k: v for k, v in entry.items() if k != "hash"}
    body["prev"] = prev
    return hashlib.sha256(prev.encode() + _canonical(body)).hexdigest()


def head(path: Path) -> str:
    """The ``hash`` of the last line, or :data:`GENESIS` for a missing or empty log."""
    if not path.exists():
        return GENESIS
    last = GENESIS
    with path.open("rb") as fh:
        for line in fh:
            if line.strip():
                last = json.loads(line)["hash"]
    return last


def contains(path: Path, wanted: str) -> bool:
    """Whether some line of the log at ``path`` has hash ``wanted`` (the log extends a head
    recorded earlier); :data:`GENESIS` is in every log."""
    if wanted == GENESIS:
        return True
    if not path.exists():
        return False
    with path.open("rb") as fh:
        for line in fh:
            try:
                if line.strip() and json.loads(line).get("hash") == wanted:
                    return True
            except (ValueError, AttributeError):  # a damaged line: verify() reports it
                continue
    return False


def append(path: Path, entry: dict[str, Any]) -> dict[str, Any]:
    """Append one entry, chained to the current head, under the log's lock (two writers never
    fork the chain); flushed and fsynced before returning."""
    record: dict[str, Any] = {}

    def line() -> str:
        prev = head(path)
        record.update(fsio.finite(entry), prev=prev)  # strict JSON: ∞ and NaN as null
        record["hash"] = chain_hash(prev, record)
        return json.dumps(record, sort_keys=True, default=str, allow_nan=False)

    fsio.locked_append(path, line)
    return record


def read(path: Path) -> list[dict[str, Any]]:
    """All entries (with their chain fields); a missing file is an empty log."""
    if not path.exists():
        return []
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


@dataclass(frozen=True)
class Verdict:
    ok: bool
    entries: int
    head: str
    problem: str = ""


def verify(path: Path, expected_head: str | None = None) -> Verdict:
    """Check the chain line by line; optionally that it ends at ``expected_head``."""
    prev = GENESIS
    n = 0
    if not path.exists():
        return Verdict(False, 0, GENESIS, f"{path}: missing")
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                return Verdict(False, n, prev, f"{path}:{lineno}: not JSON ({exc.msg})")
            if rec.get("prev") != prev:
                return Verdict(
                    False, n, prev, f"{path}:{lineno}: chain broken (line removed or reordered)"
                )
            if chain_hash(prev, rec) != rec.get("hash"):
                return Verdict(False, n, prev, f"{path}:{lineno}: entry modified (hash mismatch)")
            prev = rec["hash"]
            n += 1
    if expected_head is not None and prev != expected_head:
        return Verdict(
            False,
            n,
            prev,
            f"{path}: ends at {prev[:12]}…, expected {expected_head[:12]}… "
            "(log truncated or replaced)",
        )
    return Verdict(True, n, prev)


KEY_ENV = "FEDREC_RUN_KEY"  # path of the key file that signs a run's log heads
MIN_KEY_BYTES = 32


class RunKeyError(FedrecError, ValueError):
    """The run key file is unusable (missing, unreadable, too short)."""

    exit_code = 2


def load_key(path: str | Path) -> bytes:
    """The key in ``path`` (its bytes, surrounding whitespace removed; e.g. the output of
    ``openssl rand -hex 32``); at least :data:`MIN_KEY_BYTES` bytes."""
    try:
        key = Path(path).read_bytes().strip()
    except OSError as exc:
        raise RunKeyError(
            f"run key {path}: cannot read it ({exc.strerror}). Fix: point {KEY_ENV} or --key "
            "at the key file (create one with: openssl rand -hex 32 > run.key)."
        ) from None
    if len(key) < MIN_KEY_BYTES:
        raise RunKeyError(
            f"run key {path}: {len(key)} bytes; at least {MIN_KEY_BYTES} are needed. Fix: "
            "openssl rand -hex 32 > run.key"
        )
    return key


def key_from_env() -> bytes | None:
    """The key named by :data:`KEY_ENV`, or None when it is not set (an unusable one raises)."""
    path = os.environ.get(KEY_ENV, "")
    return load_key(path) if path else None


def resolve_key_env() -> None:
    """Check the key :data:`KEY_ENV` names now, before any work, and make its path absolute,
    since the ServerApp that reads it runs in another folder."""
    path = os.environ.get(KEY_ENV, "")
    if path:
        os.environ[KEY_ENV] = str(Path(path).resolve())
        load_key(os.environ[KEY_ENV])


def key_id(key: bytes) -> str:
    """A public name for a key (the first 16 hex digits of its sha256), to tell keys apart."""
    return hashlib.sha256(key).hexdigest()[:16]


def sign_heads(key: bytes, heads: dict[str, str]) -> dict[str, str]:
    """``{"alg", "key_id", "mac"}``: HMAC-SHA256 of the heads' canonical JSON."""
    mac = hmac.new(key, _canonical(dict(heads)), hashlib.sha256).hexdigest()
    return {"alg": "hmac-sha256", "key_id": key_id(key), "mac": mac}


def check_signed_heads(key: bytes, heads: dict[str, str], signed: dict[str, str]) -> bool:
    """Whether ``signed`` (from :func:`sign_heads`) is ``key``'s MAC of exactly ``heads``."""
    want = sign_heads(key, heads)["mac"]
    return isinstance(signed.get("mac"), str) and hmac.compare_digest(want, signed["mac"])
