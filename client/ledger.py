"""A node's privacy ledger, kept so that it fails closed.

The ledger (``privacy-ledger.jsonl`` in the node's state dir) is a hash-chained log of
everything the node released: DP-SGD training calls with the accountant's whole history, the
item prior's release, evaluations, refusals, and operator resets. Two more files sit beside it:

* ``node.json``: the node's identity (a random id made when its ledger starts, and its
  channel); every ledger line carries the id, so a ledger copied from another node is refused;
* ``privacy-ledger.head.json``: the anchor, the last line's hash and the line count, rewritten
  atomically after every append and, when the policy names a ``ledger-key``, HMAC-SHA256 keyed
  so that nobody without the key can re-anchor an edited ledger.

:meth:`NodeLedger.check` refuses (``LedgerError``) a ledger that is missing while its anchor or
identity exists (the node has trained before), a ledger whose chain is broken (a line edited,
removed or reordered), one that does not contain its anchor's head (truncated or replaced), a
line of another node or channel, and an anchor whose key does not check. A ledger that extends
its anchor (a crash between the append and the anchor's rewrite) is accepted: it records more
spending, never less. :func:`reset` is the only way back to an empty ledger: the operator's
explicit, logged reset, which keeps the old files and starts the new ledger with a ``reset``
line that the audit reports.

Must not: import ``fedrec.server``; send anything.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedrec.shared import hashlog
from fedrec.shared.fsio import atomic_write_text, locked
from fedrec.shared.privacy import PrivacyConfigError

LEDGER = "privacy-ledger.jsonl"
IDENTITY = "node.json"
TRAINED, REFUSED, RELEASED, EVALUATED, RESET = (
    "trained",
    "refused",
    "released",
    "evaluated",
    "reset",
)
Event = tuple[float, float, int]


class LedgerError(PrivacyConfigError):
    """The node's ledger cannot be trusted; the node refuses to train or evaluate."""

    exit_code = 2


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass
class NodeLedger:
    """The ledger of one node: ``path`` and the files beside it.

    Args:
        path: the ledger file.
        channel: the channel this node serves (each line's ``channel`` must match).
        key: bytes that key the anchor (the policy's ``ledger-key`` file), or None.
    """

    path: Path
    channel: str
    key: bytes | None = None

    @property
    def anchor_path(self) -> Path:
        return self.path.with_name(self.path.stem + ".head.json")

    @property
    def identity_path(self) -> Path:
        return self.path.with_name(IDENTITY)

    # ------------------------------------------------------------------ reading

    def node_id(self) -> str | None:
        if not self.identity_path.exists():
            return None
        try:
            return str(json.loads(self.identity_path.read_text(encoding="utf-8"))["node-id"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise LedgerError(f"node identity {self.identity_path} is unreadable ({exc})") from None

    def entries(self) -> list[dict[str, Any]]:
        """The checked ledger's lines (empty for a node that never recorded anything).

        Raises:
            LedgerError: the ledger cannot be trusted (see the module docstring).
        """
        self.check()
        return hashlog.read(self.path)

    def check(self) -> None:
        """Fail closed on a missing, broken, truncated, foreign or badly keyed ledger."""
        anchor = self._anchor()
        node_id = self.node_id()
        fix = (
            "Restore the node's state dir from its backup, or, if the loss is accepted, reset "
            f"the ledger explicitly: fedrec node reset-ledger --state-dir {self.path.parent} "
            f'--channel {self.channel} --reason "..." --yes (the audit reports every reset).'
        )
        if not self.path.exists():
            if anchor is not None or node_id is not None:
                raise LedgerError(
                    f"privacy ledger {self.path} is missing, but this node has recorded privacy "
                    f"spending before ({(self.anchor_path if anchor is not None else self.identity_path).name} is there). "
                    f"Refusing to start from ε = 0. {fix}"
                )
            return
        verdict = hashlog.verify(self.path)
        if not verdict.ok:
            raise LedgerError(
                f"privacy ledger {self.path} failed verification: {verdict.problem}. {fix}"
            )
        if anchor is None:
            raise LedgerError(
                f"privacy ledger {self.path} has no anchor ({self.anchor_path.name}): it cannot be told from a "
                f"truncated one. {fix}"
            )
        if self.key is not None and not hmac.compare_digest(
            str(anchor.get("mac", "")), self._mac(anchor)
        ):
            raise LedgerError(
                f"privacy ledger anchor {self.anchor_path} is not signed with this node's "
                f"ledger-key: the ledger may have been rewritten. {fix}"
            )
        if not hashlog.contains(self.path, str(anchor.get("head", ""))):
            raise LedgerError(
                f"privacy ledger {self.path} ends at {verdict.head[:12]}… and does not contain "
                f"its anchor's head {str(anchor.get('head', ''))[:12]}…: lines were removed "
                f"(truncated) or the file was replaced. {fix}"
            )
        for lineno, entry in enumerate(hashlog.read(self.path), start=1):
            if entry.get("node-id") != node_id or entry.get("channel") != self.channel:
                raise LedgerError(
                    f"privacy ledger {self.path}:{lineno} belongs to node "
                    f"{entry.get('node-id')!r} / channel {entry.get('channel')!r}, this node is "
                    f"{node_id!r} / {self.channel!r}: a ledger of another node. {fix}"
                )

    def _anchor(self) -> dict[str, Any] | None:
        if not self.anchor_path.exists():
            return None
        try:
            anchor = json.loads(self.anchor_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise LedgerError(f"ledger anchor {self.anchor_path} is unreadable ({exc})") from None
        if not isinstance(anchor, dict):
            raise LedgerError(f"ledger anchor {self.anchor_path} is not a JSON object")
        return anchor

    def _mac(self, anchor: dict[str, Any]) -> str:
        assert self.key is not None
        body = {k: anchor.get(k) for k in ("head", "entries", "node-id")}
        blob = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
        return hmac.new(self.key, blob, hashlib.sha256).hexdigest()

    # ------------------------------------------------------------------ writing

    def append(self, entry: dict[str, Any]) -> dict[str, Any]:
        """Append one line (with this node's id and channel) and re-anchor, under one lock."""
        with locked(self.anchor_path):
            self.check()
            node_id = self.node_id() or self._create_identity()
            record = hashlog.append(
                self.path, {"time": now(), **entry, "channel": self.channel, "node-id": node_id}
            )
            self._write_anchor(record["hash"], len(hashlog.read(self.path)), node_id)
            return record

    def _create_identity(self) -> str:
        node_id = uuid.uuid4().hex
        body = {"node-id": node_id, "channel": self.channel, "created": now()}
        atomic_write_text(self.identity_path, json.dumps(body, indent=1) + "\n")
        return node_id

    def _write_anchor(self, head: str, entries: int, node_id: str) -> None:
        anchor: dict[str, Any] = {"head": head, "entries": entries, "node-id": node_id}
        if self.key is not None:
            anchor["mac"] = self._mac(anchor)
            anchor["key-id"] = hashlog.key_id(self.key)
        atomic_write_text(self.anchor_path, json.dumps(anchor, indent=1) + "\n")

    # ------------------------------------------------------------------ queries

    def last_history(self) -> tuple[str, list[Event], list[Event]] | None:
        """``(accountant, history, releases)`` of the last line that carries a history."""
        for entry in reversed(self.entries()):
            if isinstance(entry.get("history"), list):
                return (
                    str(entry.get("accountant", "")),
                    events(entry["history"]),
                    events(entry.get("releases")),
                )
        return None

    def last_run(self) -> str | None:
        """The run of the last line that carries a history."""
        for entry in reversed(self.entries()):
            if isinstance(entry.get("history"), list):
                return str(entry.get("run", ""))
        return None

    def history_before(self, run: str) -> list[Event]:
        """The accountant's history before ``run``'s first line: what earlier runs spent."""
        before: list[Event] = []
        for entry in self.entries():
            if entry.get("run") == run:
                break
            if isinstance(entry.get("history"), list):
                before = events(entry["history"])
        return before

    def holds(self, head: str) -> bool:
        """Whether this ledger still holds ``head`` (a line's hash that it reported earlier),
        or starts after an operator's reset, which the audit reports."""
        return hashlog.contains(self.path, head) or any(
            e.get("status") == RESET for e in self.entries()
        )

    def evaluations(self, run: str) -> tuple[int, int]:
        """``(in this run, in the node's lifetime)`` evaluations on record."""
        done = [e for e in self.entries() if e.get("status") == EVALUATED]
        return sum(1 for e in done if e.get("run") == run), len(done)


def events(raw: object) -> list[Event]:
    """Accountant events kept as JSON lists."""
    if not isinstance(raw, list):
        return []
    return [(float(s), float(q), int(n)) for s, q, n in raw]


def subtract(history: Iterable[Event], base: Iterable[Event]) -> list[Event]:
    """The events of ``history`` after its prefix ``base`` (Opacus merges a step into the last
    event when (σ, q) repeat, so the prefix's last event may have grown)."""
    rest = list(history)
    for sigma, q, n in base:
        if not rest or (rest[0][0], rest[0][1]) != (sigma, q) or rest[0][2] < n:
            raise LedgerError("the accountant's history does not extend the earlier runs' history")
        left = rest[0][2] - n
        rest = ([(sigma, q, left)] if left else []) + rest[1:]
    return rest


def reset(state_dir: Path, channel: str, reason: str, key: bytes | None = None) -> Path:
    """The operator's explicit reset: the old ledger, anchor and identity are kept under a
    ``reset-<time>`` name, and a new ledger starts with a ``reset`` line naming the old head,
    its line count and ``reason``. Returns the new ledger's path.

    Raises:
        LedgerError: no reason was given.
    """
    if not reason.strip():
        raise LedgerError("a ledger reset needs a --reason (it is recorded and audited)")
    path = state_dir / LEDGER
    ledger = NodeLedger(path, channel, key)
    old_head = hashlog.head(path) if path.exists() else hashlog.GENESIS
    old_lines = len(hashlog.read(path)) if path.exists() else 0
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    kept = []
    for f in (ledger.path, ledger.anchor_path, ledger.identity_path):
        if f.exists():
            moved = f.with_name(f"{f.name}.reset-{stamp}")
            f.rename(moved)
            kept.append(moved.name)
    ledger.append(
        {
            "run": "",
            "round": 0,
            "status": RESET,
            "steps": 0,
            "reason": reason.strip(),
            "previous-head": old_head,
            "previous-entries": old_lines,
            "previous-files": kept,
        }
    )
    return path
