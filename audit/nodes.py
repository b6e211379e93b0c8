"""What the nodes held and did: their privacy policy, their own ledgers, their refusals.

Owns:

* the node policy in force: ``node-policy.toml`` in the run directory (a simulation writes the
  policy every node held there), policies the auditor gives (``fedrec audit --node-policy``),
  and the digests the nodes reported (the privacy report the server ledger copies, and every
  line of the nodes' own ledgers);
* the check of each node ledger under ``nodes/`` by the rules the node itself fails closed on
  (missing while its anchor or identity is there, broken chain, no anchor, anchor's head not in
  the ledger, a keyed anchor whose MAC does not check, a line of another node or channel),
  written here again so that the audit does not rely on the node's code;
* every refusal (server ledger, node ledgers, evaluation errors in the egress log), every
  ledger reset, and the flags below.

Flags, each ``warn`` or ``fail``:

* fail: the node-policy file's digest differs from the one a node reported (the statement
  built from the file would be wrong); nodes trained although the run asked for noise off
  (``audit.disable-noise``); more evaluations in this run than the node's per-run cap; a fixed-
  seed noise source (the noise is reproducible);
* warn: no policy known for a node (a deployment: digest only); a node reported several
  digests (its policy changed during the run); a policy that allows noise off, canaries, or
  training without DP; a canary or no-DP run the nodes trained in; evaluation caps above
  :data:`~.trust.EVALUATIONS_PER_RUN_BOUND` per run or :data:`~.trust.EVALUATIONS_BOUND` in a
  lifetime, or more lifetime evaluations than the cap (the cap was lowered later);
  ``secure-noise = false`` or a noise source other than ``chacha20-os-key``; a ledger reset.

Must not: import ``server/`` or ``client/``; write anything.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from fedrec.shared import hashlog, wire
from fedrec.shared.errors import FedrecError
from fedrec.shared.policy import NodePolicy, load_policy

from . import trust
from .egress import LEDGER, NODES, TAMPERED
from .verdicts import FAIL, WARN

NODE_POLICY = "node-policy.toml"  # fedrec.simulations.flower.NODE_POLICY
IDENTITY = "node.json"  # fedrec.client.ledger.IDENTITY
ANCHOR = "privacy-ledger.head.json"  # the anchor beside the ledger
INTACT, ABSENT = "intact", "absent"
REASON_CHARS = 300
SPENT = ("trained", "rejected")
REFUSALS = ("refused", "failed", "rejected")  # server ledger statuses listed as refusals


def node_key(entry: Mapping[str, Any]) -> str | None:
    """The node a server log line is about, named as its folder: ``channel[-shard]``."""
    ch = entry.get(wire.CHANNEL)
    if not isinstance(ch, str):
        return None
    shard = entry.get(wire.SHARD)
    return ch if shard is None else f"{ch}-{shard}"


def _folder_label(name: str, labels: Iterable[str]) -> str:
    """A node folder's label: ``ch-0`` is ``ch`` when the server logs that node as ``ch``."""
    known = set(labels)
    if name not in known and name.endswith("-0") and name[:-2] in known:
        return name[:-2]
    return name


# --- one node ledger, checked --------------------------------------------------------------


def _read_object(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    if not path.exists():
        return None, None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return None, f"{path.name} is unreadable ({exc})"
    if not isinstance(data, dict):
        return None, f"{path.name} is not a JSON object"
    return data, None


def _anchor_mac(key: bytes, anchor: Mapping[str, Any]) -> str:
    body = {k: anchor.get(k) for k in ("head", "entries", "node-id")}
    blob = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return hmac.new(key, blob, hashlib.sha256).hexdigest()


def check_node_ledger(
    folder: Path, name: str, channel: str, key: bytes | None = None
) -> dict[str, Any]:
    """One node's ledger by the rules the node fails closed on (see the module docstring).

    Args:
        folder: the node's state folder (``nodes/<channel>[-shard]``).
        name: how the ledger is named in messages.
        channel: the channel the folder's name says, used when ``node.json`` is absent.
        key: the node's ``ledger-key`` bytes, if the auditor has them.

    Returns:
        ``{"ledger", "status" (intact, tampered, absent), "problem", "node_id", "keyed",
        "key_checked"}``.
    """
    out: dict[str, Any] = {
        "ledger": name,
        "status": INTACT,
        "problem": "",
        "node_id": None,
        "keyed": False,
        "key_checked": False,
    }

    def bad(problem: str) -> dict[str, Any]:
        out.update(status=TAMPERED, problem=f"{name}: {problem}")
        return out

    ledger = folder / LEDGER
    identity, problem = _read_object(folder / IDENTITY)
    if problem:
        return bad(problem)
    anchor, problem = _read_object(folder / ANCHOR)
    if problem:
        return bad(problem)
    node_id = identity.get("node-id") if identity else None
    channel = str(identity.get("channel", channel)) if identity else channel
    out["node_id"] = node_id
    if not ledger.exists():
        if anchor is not None or identity is not None:
            found = ANCHOR if anchor is not None else IDENTITY
            return bad(f"missing, although the node recorded spending before ({found} is there)")
        out["status"] = ABSENT
        return out
    verdict = hashlog.verify(ledger)
    if not verdict.ok:
        return bad(
            f"chain broken ({verdict.problem.replace(str(ledger), LEDGER)}): a line was edited, "
            "removed or reordered"
        )
    if anchor is None:
        return bad(f"no anchor ({ANCHOR}): a truncated ledger cannot be told from a whole one")
    out["keyed"] = "mac" in anchor
    if key is not None:
        out["key_checked"] = True
        if not hmac.compare_digest(str(anchor.get("mac", "")), _anchor_mac(key, anchor)):
            return bad(f"{ANCHOR} is not signed with the node's ledger-key: rewritten")
    head = str(anchor.get("head", ""))
    if not hashlog.contains(ledger, head):
        return bad(
            f"does not contain its anchor's head {head[:12]}…: lines were cut from the tail "
            "(truncated) or the file was replaced"
        )
    for lineno, entry in enumerate(hashlog.read(ledger), start=1):
        if entry.get("node-id") != node_id or entry.get("channel") != channel:
            return bad(
                f"line {lineno} belongs to node {entry.get('node-id')!r} / channel "
                f"{entry.get('channel')!r}, this node is {node_id!r} / {channel!r}: another "
                "node's ledger"
            )
    return out


def _channel_of(folder: str, channels: Sequence[str]) -> str:
    """The channel a node folder serves: its name, or its name less a ``-N`` shard suffix."""
    base, _, shard = folder.rpartition("-")
    return base if folder not in channels and shard.isdigit() and base else folder


def node_folders(run_dir: Path) -> list[Path]:
    """``nodes/*`` folders that hold a ledger, its anchor or the node's identity."""
    nodes = run_dir / NODES
    if not nodes.is_dir():
        return []
    return sorted(
        p
        for p in nodes.iterdir()
        if p.is_dir() and any((p / f).exists() for f in (LEDGER, ANCHOR, IDENTITY))
    )


# --- policies ---------------------------------------------------------------------------------


def read_policy_file(run_dir: Path) -> tuple[NodePolicy | None, dict[str, Any]]:
    """``node-policy.toml`` of a simulated run: the policy and ``{"name", "present", "digest",
    "source", "problem"}``."""
    path = run_dir / NODE_POLICY
    info: dict[str, Any] = {
        "name": NODE_POLICY,
        "present": path.exists(),
        "digest": None,
        "source": None,
        "problem": None,
    }
    if not path.exists():
        return None, info
    try:
        policy = load_policy(path)
    except FedrecError as exc:
        info["problem"] = str(exc)
        return None, info
    source = next(
        (
            line.removeprefix("# source:").strip()
            for line in path.read_text(encoding="utf-8").splitlines()
            if line.startswith("# source:")
        ),
        policy.source,
    )
    info.update(digest=policy.digest(), source=source)
    return dataclasses.replace(policy, source=f"{NODE_POLICY}: {source}"), info


def _load_key(policy: NodePolicy | None) -> bytes | None:
    if policy is None or not policy.ledger_key:
        return None
    try:
        return hashlog.load_key(policy.ledger_key)
    except FedrecError:
        return None


class _Node:
    """What the logs say about one node."""

    def __init__(self) -> None:
        self.digests: list[str] = []  # in order of appearance
        self.sources: set[str] = set()
        self.trained = 0
        self.dp_off = 0
        self.evaluations = 0  # evaluate replies the server received in this run
        self.ledger: dict[str, Any] | None = None  # the node's own ledger, summarised
        self.check: dict[str, Any] | None = None

    def saw(self, entry: Mapping[str, Any]) -> None:
        digest = entry.get(wire.POLICY)
        if isinstance(digest, str) and digest and digest not in self.digests:
            self.digests.append(digest)
        source = entry.get(wire.NOISE_SOURCE)
        if isinstance(source, str) and source:
            self.sources.add(source)


def _refusal(
    source: str, node: str, entry: Mapping[str, Any], kind: str, status: str
) -> dict[str, Any]:
    return {
        "source": source,
        "node": node,
        "round": entry.get("round"),
        "kind": kind,
        "status": status,
        "reason": str(entry.get("reason", ""))[:REASON_CHARS],
    }


def _summarise_node_ledger(
    label: str, name: str, entries: Sequence[Mapping[str, Any]], run: object, node: _Node
) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """The node's own ledger: its counts, and its refusals and resets."""
    refusals, resets = [], []
    evaluated_run = evaluated = 0
    lifetime_eps = None
    for e in entries:
        node.saw(e)
        status = e.get("status")
        if status == "refused":
            refusals.append(_refusal(name, label, e, "—", "refused"))
        elif status == "reset":
            resets.append(
                {
                    "node": label,
                    "where": f"{name}: entry {e.get('_line', '?')}",
                    "time": e.get("time"),
                    "reason": str(e.get("reason", ""))[:REASON_CHARS],
                    "previous_head": e.get("previous-head"),
                    "previous_entries": e.get("previous-entries"),
                }
            )
        elif status == "trained" and e.get("dp") is False:
            node.dp_off += 1
        elif status == "evaluated":
            evaluated += 1
            evaluated_run += 1 if not isinstance(run, str) or e.get("run") == run else 0
        if e.get("lifetime-epsilon") is not None:
            lifetime_eps = e.get("lifetime-epsilon")
    summary = {
        "evaluations_run": evaluated_run,
        "evaluations_lifetime": evaluated,
        "lifetime_epsilon": lifetime_eps,
        "resets": len(resets),
    }
    return summary, refusals, resets


def _collect(
    ledger: Sequence[Mapping[str, Any]], replies: Sequence[Mapping[str, Any]]
) -> tuple[dict[str, _Node], list[dict[str, Any]]]:
    """Per node, what the server's ledger and egress log say; the refusals they record."""
    nodes: dict[str, _Node] = {}
    refusals: list[dict[str, Any]] = []
    for e in ledger:
        label = node_key(e)
        if label is None:
            continue
        node = nodes.setdefault(label, _Node())
        node.saw(e)
        status = str(e.get("status", ""))
        if status in SPENT:
            node.trained += 1
            node.dp_off += e.get(wire.DP_ENABLED) is False
        if status in REFUSALS:
            refusals.append(_refusal(LEDGER, label, e, "train", status))
    for e in replies:
        label = node_key(e)
        if label is None or e.get("kind") == "train":  # train errors are on the ledger
            continue
        node = nodes.setdefault(label, _Node())
        err = e.get("error")
        if err is None:
            node.evaluations += e.get("kind") == "evaluate"
            continue
        err = err if isinstance(err, Mapping) else {"reason": str(err)}
        refused = err.get("code") == wire.REFUSED_CODE
        refusals.append(
            _refusal(
                "egress.jsonl",
                label,
                {"round": e.get("round"), "reason": err.get("reason", "")},
                str(e.get("kind", "?")),
                "refused" if refused else "failed",
            )
        )
    return nodes, refusals


def _assign(
    nodes: Mapping[str, _Node], known: Mapping[str, NodePolicy], file_policy: NodePolicy | None
) -> dict[str, tuple[str | None, str]]:
    """Each node's policy digest and on what basis: the digest it reported last, else the
    policy file's (a simulated node that reported none), else none."""
    out: dict[str, tuple[str | None, str]] = {}
    for label, node in nodes.items():
        if node.digests:
            digest = node.digests[-1]
            out[label] = (digest, "reported" if digest in known else "reported, not known")
        elif file_policy is not None:
            out[label] = (file_policy.digest(), f"not reported: {NODE_POLICY}")
        else:
            out[label] = (None, "not reported")
    return out


def _flags(
    nodes: Mapping[str, _Node],
    assigned: Mapping[str, tuple[str | None, str]],
    known: Mapping[str, NodePolicy],
    file_policy: NodePolicy | None,
    run_config: Mapping[str, Any],
    resets: Sequence[Mapping[str, Any]],
) -> list[dict[str, str]]:
    flags: list[dict[str, str]] = []

    def flag(status: str, line: str) -> None:
        flags.append({"status": status, "line": line})

    trained = [n for n, node in sorted(nodes.items()) if node.trained]
    if file_policy is not None:
        for label, node in sorted(nodes.items()):
            other = [d for d in node.digests if d != file_policy.digest()]
            if other:
                flag(
                    FAIL,
                    f"{label}: reported policy {other[0][:12]}…, but {NODE_POLICY} is "
                    f"{file_policy.digest()[:12]}…: the nodes did not hold the policy the run "
                    "directory records",
                )
    for label, node in sorted(nodes.items()):
        if len(node.digests) > 1:
            flag(
                WARN,
                f"{label}: reported {len(node.digests)} policies "
                f"({', '.join(d[:12] + '…' for d in node.digests)}): its policy changed during "
                "the run",
            )
    unknown = sorted(n for n, (d, _) in assigned.items() if d not in known)
    if unknown:
        flag(
            WARN,
            f"no node policy known for {', '.join(unknown)}: only the digests they reported "
            f"({', '.join(sorted({(assigned[n][0] or 'none')[:12] for n in unknown}))}); give "
            "the audit their policy files (--node-policy)",
        )
    if run_config.get("audit.disable-noise") and trained:
        flag(
            FAIL,
            f"{', '.join(trained)} accepted a noise-off request (audit.disable-noise) and "
            "trained: no DP noise, ε does not hold",
        )
    canaries = run_config.get("audit.canaries")
    if isinstance(canaries, int) and canaries > 0 and trained:
        flag(WARN, f"a canary run (audit.canaries = {canaries}): {', '.join(trained)} trained")
    dp_off = [n for n, node in sorted(nodes.items()) if node.dp_off]
    if dp_off or (run_config.get("dp.enabled") is False and trained):
        flag(WARN, f"{', '.join(dp_off or trained)} trained WITHOUT DP: no guarantee (ε = ∞)")
    for digest, policy in sorted(known.items()):
        held = sorted(n for n, (d, _) in assigned.items() if d == digest) or ["(no node)"]
        who = f"policy {digest[:12]}… ({', '.join(held)})"
        if policy.allow_noise_off:
            flag(WARN, f"{who} accepts noise-off requests (allow-noise-off = true)")
        if policy.allow_canaries:
            flag(WARN, f"{who} accepts audit canaries (allow-canaries = true)")
        if not policy.dp_required:
            flag(WARN, f"{who} trains without DP when asked (dp-required = false)")
        if trust.unbounded_evaluations(policy):
            flag(
                WARN,
                f"{who}: evaluations effectively unbounded (max-evaluations-per-run "
                f"{policy.max_evaluations_per_run}, max-evaluations {policy.max_evaluations})",
            )
        if not policy.secure_noise:
            flag(WARN, f"{who}: secure-noise = false (noise not from {trust.SECURE_SOURCE})")
    for label, node in sorted(nodes.items()):
        own = known.get(assigned[label][0] or "")
        if own is not None and node.evaluations > own.max_evaluations_per_run:
            flag(
                FAIL,
                f"{label}: {node.evaluations} evaluations in this run, above its policy's "
                f"max-evaluations-per-run {own.max_evaluations_per_run}",
            )
        lifetime = (node.ledger or {}).get("evaluations_lifetime", 0)
        if own is not None and lifetime > own.max_evaluations:
            flag(
                WARN,
                f"{label}: {lifetime} evaluations on its ledger, above its policy's "
                f"max-evaluations {own.max_evaluations}",
            )
        others = sorted(node.sources - {trust.SECURE_SOURCE})
        if others:
            fixed = trust.FIXED_SEED_SOURCE in others
            flag(
                FAIL if fixed else WARN,
                f"{label}: noise source {', '.join(others)}, not {trust.SECURE_SOURCE}"
                + (": the noise is reproducible from its seed" if fixed else ""),
            )
    for r in resets:
        flag(WARN, f"{r['node']}: ledger RESET ({r['where']}): {r['reason']}")
    return flags


def audit_nodes(
    run_dir: Path,
    *,
    run_config: Mapping[str, Any],
    channels: Sequence[str],
    ledger: Sequence[Mapping[str, Any]],
    replies: Sequence[Mapping[str, Any]],
    node_ledgers: Mapping[str, Sequence[Mapping[str, Any]]],
    given: Sequence[NodePolicy] = (),
) -> dict[str, Any]:
    """The nodes' policies, ledgers, refusals, resets and flags.

    Args:
        run_dir: the run directory (``node-policy.toml``, ``nodes/``).
        run_config: the flattened run config.
        channels: the configured channels.
        ledger: the server's privacy-ledger entries.
        replies: the egress log's entries.
        node_ledgers: node folder name → that node's ledger entries (as read by the report).
        given: policies the auditor gives (the platforms' policy files).

    Returns:
        ``{"policy_file", "policies", "nodes", "refusals", "resets", "ledger_checks",
        "flags", "statements"}``; ``policies`` maps each digest whose policy is known to its
        keys, source and nodes; ``statements`` is what holds against the server, one per
        policy in force (:func:`.trust.against_the_server`).
    """
    file_policy, file_info = read_policy_file(run_dir)
    known = {p.digest(): p for p in given}
    if file_policy is not None:
        known[file_policy.digest()] = file_policy
    nodes, refusals = _collect(ledger, replies)
    resets: list[dict[str, Any]] = []
    checks: dict[str, dict[str, Any]] = {}
    run = run_config.get("run-dir")
    for folder in node_folders(run_dir):
        label = _folder_label(folder.name, nodes)
        node = nodes.setdefault(label, _Node())
        name = f"{NODES}/{folder.name}/{LEDGER}"
        digests = node.digests or ([file_policy.digest()] if file_policy else [])
        key = _load_key(known.get(digests[-1]) if digests else None)
        node.check = checks[name] = check_node_ledger(
            folder, name, _channel_of(folder.name, channels), key
        )
        entries = node_ledgers.get(folder.name)
        if entries is not None:
            node.ledger, found, reset = _summarise_node_ledger(label, name, entries, run, node)
            refusals += found
            resets += reset
    assigned = _assign(nodes, known, file_policy)
    policies = {
        digest: {
            "policy": policy.to_dict(),
            "source": policy.source,
            "nodes": sorted(n for n, (d, _) in assigned.items() if d == digest),
        }
        for digest, policy in known.items()
    }
    per_node = {
        label: {
            "policy": assigned[label][0],
            "policy_basis": assigned[label][1],
            "policy_known": assigned[label][0] in known,
            "reported_digests": node.digests,
            "noise_sources": sorted(node.sources),
            "trained": node.trained,
            "evaluations": node.evaluations,
            "node_ledger": node.ledger,
            "ledger_check": node.check,
        }
        for label, node in sorted(nodes.items())
    }
    return {
        "policy_file": file_info,
        "policies": policies,
        "nodes": per_node,
        "refusals": refusals,
        "resets": resets,
        "ledger_checks": checks,
        "flags": _flags(nodes, assigned, known, file_policy, run_config, resets),
        "statements": _statements(per_node, known, run_config),
    }


def _statements(
    per_node: Mapping[str, Mapping[str, Any]],
    known: Mapping[str, NodePolicy],
    run_config: Mapping[str, Any],
) -> list[dict[str, Any]]:
    """The trust statement (:func:`.trust.against_the_server`) for each policy in force, and
    one for the nodes whose policy is not known."""
    groups: dict[str | None, list[str]] = {}
    for label, n in per_node.items():
        groups.setdefault(n["policy"] if n["policy_known"] else None, []).append(label)
    if not groups:  # no node in the logs: the policy file alone, if any
        groups = {d: [] for d in known} or {None: []}
    out = []
    for digest, labels in sorted(groups.items(), key=lambda kv: (kv[0] is None, kv[0] or "")):
        sources = sorted({s for n in labels for s in per_node[n]["noise_sources"]})
        reported = sorted({d for n in labels for d in per_node[n]["reported_digests"]})
        out.append(
            trust.against_the_server(
                known.get(digest or ""),
                digest=digest or (reported[-1] if reported else None),
                nodes=labels,
                noise_sources=sources,
                run_config=run_config,
            )
        )
    return out
