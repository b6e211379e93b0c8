"""The audit's verdicts: one small pure function per check, each giving one line for people.

Owns: the statuses (pass, warn, fail, skip), :class:`Verdict`, and the checks in the order the
report lists them: fault injection, log integrity (hash chains), the run's results (missing or
the run incomplete), accounting consistency, budget (on record, and the worst case with lost
rounds counted as spent), egress (allowlist and shapes), evidence (the run directory's files
agree on the rounds and the spend), the node policy's flags, the node ledgers, empirical
audits, files; and :func:`check_empirical_claim`, the
comparison of one empirical audit's ε with the ε it tests. A run is OK when no verdict fails.

Inputs are the parts of the report that :mod:`.egress`, :mod:`.accounting` and :mod:`.evidence`
computed (plain dicts, as in ``audit.json``).

Must not: import ``server/`` or ``client/``; read files; compute ε (that is :mod:`.accounting`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

from . import egress
from .document import fmt

Status = Literal["pass", "warn", "fail", "skip"]
PASS: Final = "pass"
WARN: Final = "warn"
FAIL: Final = "fail"
SKIP: Final = "skip"

Report = Mapping[str, Any]  # one part of the report, as in audit.json


@dataclass(frozen=True)
class Verdict:
    name: str
    status: Status
    line: str
    details: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        """As in ``audit.json``: ``{"name", "status", "line", "details"}``."""
        return {
            "name": self.name,
            "status": self.status,
            "line": self.line,
            "details": list(self.details),
        }


def _plural(n: int, word: str, suffix: str = "s") -> str:
    return f"{n} {word}{suffix * (n != 1)}"


def check_fault_injection(fault_injected: bool, *, trained: bool = True) -> Verdict | None:
    """The audit's own fault injection (``audit.disable-noise``): the claimed ε is not real
    once a node trained; asked for and refused by every node: a warning."""
    if not fault_injected:
        return None
    if not trained:
        return Verdict(
            "fault-injection",
            WARN,
            "FAULT INJECTION: audit.disable-noise was asked for; no node trained "
            "(every node refused it)",
        )
    return Verdict(
        "fault-injection",
        FAIL,
        "FAULT INJECTION: audit.disable-noise was on: "
        "no DP noise was added, the reported ε does not hold",
    )


def check_logs(logs: Mapping[str, Report]) -> Verdict:
    """Hash-chain integrity: fail if a log is tampered with or missing, warn if a chain is
    intact but its tail cannot be verified (no head recorded in ``results.json``)."""
    bad = [v for v in logs.values() if v["status"] in (egress.TAMPERED, egress.MISSING)]
    weak = [v for v in logs.values() if v["status"] == egress.UNVERIFIED_TAIL]
    if bad:
        word = "TAMPERED" if any(v["status"] == egress.TAMPERED for v in bad) else "MISSING"
        return Verdict(
            "logs",
            FAIL,
            f"LOGS: {word}: {', '.join(v['log'] for v in bad)}: not trusted",
            tuple(v["problem"] for v in bad + weak),
        )
    if weak:
        return Verdict(
            "logs",
            WARN,
            f"LOGS: chains intact, tail unverified for {', '.join(v['log'] for v in weak)}",
            tuple(v["problem"] for v in weak),
        )
    summary = ", ".join(f"{v['log']} ({v['entries']} entries)" for v in logs.values())
    return Verdict("logs", PASS, f"LOGS: intact: {summary}; heads match results.json")


RESULTS_PRESENT, RESULTS_INCOMPLETE = "present", "incomplete"
RESULTS_MISSING, RESULTS_NO_HEADS = "missing", "no-heads"


def check_results(state: str) -> Verdict | None:
    """``results.json`` holds the log heads that prove no ledger line was cut from the tail.

    Missing while the run's ``INCOMPLETE`` marker is there: the run stopped early (warn; the
    rest is still checked). Missing without the marker: the run finished (or never marked
    itself) and the file was removed afterwards, so the tail check was taken away: fail. There
    but without both heads (unreadable, not an object, ``log_heads`` removed): fail as well.
    """
    if state == RESULTS_NO_HEADS:
        return Verdict(
            "results",
            FAIL,
            "RESULTS: NO LOG HEADS: results.json does not record the heads of "
            f"{egress.LEDGER} and {egress.EGRESS} (unreadable, not a JSON object, or log_heads "
            "removed): a cut ledger tail cannot be detected. Restore results.json from the "
            "run's copy or backup",
        )
    if state == RESULTS_INCOMPLETE:
        return Verdict(
            "results",
            WARN,
            "RESULTS: run INCOMPLETE: it stopped early (INCOMPLETE marker, no results.json); "
            "the ledger's tail could not be checked against a recorded head, everything else "
            "was checked",
        )
    if state == RESULTS_MISSING:
        return Verdict(
            "results",
            FAIL,
            "RESULTS: MISSING: results.json is absent and the run has no INCOMPLETE marker, "
            "so it finished and the file was removed: the recorded log heads are gone and a "
            "cut ledger tail cannot be detected. Restore results.json from the run's copy or "
            "backup; only a run that stopped early may lack it (it keeps INCOMPLETE)",
            (
                "results.json: missing; a run writes INCOMPLETE at its start and removes it "
                "only after writing results.json",
            ),
        )
    return None


def check_evidence(ev: Report | None) -> Verdict | None:
    """The run directory's records of what ran (:mod:`.evidence`): fail on any disagreement
    (rounds removed from the ledger and its chain recomputed leave the other files behind)."""
    if ev is None:
        return None
    problems: Sequence[str] = ev["problems"]
    if problems:
        return Verdict(
            "evidence",
            FAIL,
            f"EVIDENCE: the run's files DISAGREE ({_plural(len(problems), 'problem')}): "
            f"{problems[0]}",
            tuple(problems),
        )
    rounds: Mapping[str, Sequence[int]] = ev["rounds"]
    ledger = rounds.get(egress.LEDGER) or []
    others = [name for name, found in rounds.items() if found and name != egress.LEDGER]
    span = f"rounds {min(ledger)}-{max(ledger)}" if ledger else "no rounds"
    return Verdict(
        "evidence",
        PASS,
        f"EVIDENCE: agrees: the ledger's {span} match {', '.join(others) or 'no other file'}",
    )


def check_accounting(acc: Report, *, ledger_present: bool) -> Verdict:
    """The ledger's ε against the recomputation and the cross-check (:mod:`.accounting` lists
    every disagreement in ``problems``): fail on any problem or without a ledger."""
    if not ledger_present:
        return Verdict(
            "accounting", FAIL, "ACCOUNTING: not verifiable: privacy-ledger.jsonl missing"
        )
    problems: Sequence[str] = acc["problems"]
    if problems:
        return Verdict(
            "accounting",
            FAIL,
            f"ACCOUNTING: INCONSISTENT ({_plural(len(problems), 'problem')}): {problems[0]}",
            tuple(problems),
        )
    if not acc["dp_enabled"]:
        return Verdict("accounting", WARN, "ACCOUNTING: DP disabled for this run: ε = ∞")
    n = len(acc["channels"])
    return Verdict(
        "accounting",
        PASS,
        f"ACCOUNTING: consistent: ledger ε equals the {acc['accountant'].upper()} "
        f"recomputation on {_plural(n, 'channel')}; the {acc['cross_check'].upper()} "
        "cross-check agrees (RDP ≥ PLD)",
        tuple(acc["notes"]),
    )


def _largest_epsilon(eps: Mapping[str, float]) -> str:
    """The channel with the largest ε (an unknown ε, NaN, counts as less than any)."""
    return max(eps, key=lambda c: eps[c] if not math.isnan(eps[c]) else -1)


def check_budget(acc: Report) -> Verdict:
    """The target ε: fail if :mod:`.accounting` found it exceeded (or DP off although
    configured on), else the largest ε with refused rounds and the composed worst case."""
    if acc["violations"]:
        return Verdict(
            "budget", FAIL, f"BUDGET: VIOLATED: {acc['violations'][0]}", tuple(acc["violations"])
        )
    if not acc["dp_enabled"]:
        return Verdict("budget", WARN, "BUDGET: not applicable: DP disabled (ε = ∞)")
    per: Mapping[str, Report] = acc["channels"]
    if not per:
        return Verdict("budget", WARN, "BUDGET: no channel trained; nothing spent")
    eps = {c: float(r["epsilon"]) for c, r in per.items()}
    worst = _largest_epsilon(eps)
    target = acc["target_epsilon"]
    target_txt = f"≤ target {fmt(target)}" if target is not None else "(no target set)"
    refused = {c: r["rounds_refused"] for c, r in per.items() if r["rounds_refused"]}
    ref = (
        "; refused rounds: " + ", ".join(f"{c} {r}" for c, r in refused.items()) if refused else ""
    )
    comp = acc.get("composed") or {}
    tail = (
        f"; composed worst case (user on all channels) ε {fmt(comp.get('epsilon'))} "
        f"(naive sum {fmt(comp.get('naive_sum'))})"
        if len(per) > 1 and comp
        else ""
    )
    lost = {c: r["worst_case"] for c, r in per.items() if r.get("worst_case", {}).get("events")}
    if lost:
        wc = {c: float(per[c]["epsilon_worst_case"]) for c in lost}
        top = _largest_epsilon(wc)
        tail += (
            f"; worst case with lost rounds counted as spent ({', '.join(sorted(lost))}): "
            f"max ε {fmt(wc[top])} ({top})"
        )
        if target is not None and wc[top] > float(target) * (1 + 1e-6):
            return Verdict(
                "budget",
                WARN,
                f"BUDGET: on record max ε {fmt(eps[worst])} ({worst}) {target_txt}, but the "
                f"worst case with lost rounds counted as spent is ε {fmt(wc[top])} ({top}), "
                "above the target",
                tuple(b for r in lost.values() for b in r["basis"]),
            )
    return Verdict(
        "budget",
        PASS,
        f"BUDGET: within target: max ε {fmt(eps[worst])} ({worst}) {target_txt}{ref}{tail}",
        tuple(b for r in lost.values() for b in r["basis"]),
    )


def check_egress(eg: Report, *, egress_present: bool, shapes_known: bool) -> Verdict:
    """Every logged reply within the wire allowlist and the model's shapes: fail on any
    violation or without an egress log; warn on error replies whose reason is free text (only
    the budget refusal's code is part of the protocol)."""
    if not egress_present:
        return Verdict("egress", FAIL, "EGRESS: not verifiable: egress.jsonl missing")
    violations: Sequence[Report] = eg["violations"]
    if violations:
        first = violations[0]
        return Verdict(
            "egress",
            FAIL,
            f"EGRESS: {len(violations)} VIOLATION{'S' * (len(violations) != 1)} in "
            f"{eg['replies']} replies: {first['where']}: {first['problem']}",
            tuple(
                f"{v['where']} (round {v['round']}, {v['channel']}, {v['kind']}, "
                f"{v['source']}): {v['problem']}"
                for v in violations
            ),
        )
    free_text = [x for x in eg["errors"] if not x["refused"]]
    if free_text:
        return Verdict(
            "egress",
            WARN,
            f"EGRESS: within the allowlist, but {len(free_text)} error "
            f"repl{'ies' if len(free_text) != 1 else 'y'} carried free-text reasons "
            "(not covered by the allowlist)",
            tuple(
                f"{x['where']} (round {x['round']}, {x['channel']}, code {x['code']}): "
                f"{x['reason']}"
                for x in free_text
            ),
        )
    checked = "and the model's parameter shapes" if shapes_known else ""
    return Verdict(
        "egress",
        PASS,
        f"EGRESS: clean: {eg['replies']} replies, {eg['bytes']:,} bytes, all within the "
        f"allowlist {checked}".rstrip(),
    )


def check_empirical_claim(
    name: str, *, bound: bool, control: bool, epsilon: float, claim: float | None
) -> tuple[Status, str]:
    """One empirical audit's ε against the ε it tests; returns ``(status, line)``.

    ``bound``: ``epsilon`` is a lower bound valid for any (ε, δ)-DP run (one-run, MIA), so
    exceeding the claim (by more than 1e-6) contradicts it: fail. Otherwise it is an estimate
    (canary cosines), which can exceed the claim by chance: warn. A non-private ``control``
    run must show power: ε > 0 passes, ε = 0 warns. Without a claim: warn.
    """
    word = "ε_LB" if bound else "ε estimate"
    if control:
        if epsilon > 0:
            return (
                PASS,
                f"{name}: non-private control, {word} {fmt(epsilon)} > 0: the audit has power",
            )
        return (
            WARN,
            f"{name}: non-private control, {word} {fmt(epsilon)} = 0: the audit shows no power",
        )
    if claim is None:
        return WARN, f"{name}: {word} {fmt(epsilon)}, no claimed ε to compare with"
    if epsilon <= claim + 1e-6:
        return PASS, f"{name}: {word} {fmt(epsilon)} ≤ claimed ε {fmt(claim)}: consistent"
    verdict = "the guarantee is CONTRADICTED" if bound else "suspicious"
    return (
        FAIL if bound else WARN,
        f"{name}: {word} {fmt(epsilon)} > claimed ε {fmt(claim)}: {verdict}",
    )


def check_empirical(emp: Mapping[str, Report] | None) -> Verdict:
    """All empirical audits together: the worst of their statuses; skip if none was given."""
    if not emp:
        return Verdict("empirical", SKIP, "EMPIRICAL: no empirical audit given")
    statuses = [r["status"] for r in emp.values()]
    status: Status = FAIL if FAIL in statuses else (WARN if WARN in statuses else PASS)
    head = {
        PASS: "consistent with the guarantee",
        WARN: "see details",
        FAIL: "CONTRADICTS the guarantee",
    }[status]
    lines = tuple(str(r["line"]) for r in emp.values())
    return Verdict("empirical", status, f"EMPIRICAL: {head}: " + "; ".join(lines), lines)


def check_node_policy(nodes: Report | None) -> Verdict | None:
    """The nodes' policies and what they accepted (:mod:`.nodes` lists the flags and why each
    is a warning or a failure): the worst flag's status, every flag a detail; without flags,
    the policies in force. ``None`` when the run has no node in its logs and no policy file."""
    if nodes is None or (not nodes["nodes"] and not nodes["policy_file"]["present"]):
        return None
    flags: Sequence[Report] = nodes["flags"]
    refusals = len(nodes["refusals"])
    tail = f"; {_plural(refusals, 'refusal')} listed" if refusals else ""
    if flags:
        status: Status = FAIL if any(f["status"] == FAIL for f in flags) else WARN
        return Verdict(
            "node-policy",
            status,
            f"NODE POLICY: {_plural(len(flags), 'flag')}: {flags[0]['line']}{tail}",
            tuple(f"{f['status'].upper()}: {f['line']}" for f in flags),
        )
    held = "; ".join(
        f"{d[:12]}… held by {', '.join(p['nodes']) or 'no node in the logs'}"
        for d, p in nodes["policies"].items()
    )
    return Verdict("node-policy", PASS, f"NODE POLICY: {held or 'none'}{tail}")


def check_node_ledgers(nodes: Report | None) -> Verdict | None:
    """Each node ledger under ``nodes/`` by the node's own fail-closed rules: fail if any is
    deleted, truncated, edited, reordered, another node's or wrongly keyed."""
    checks: Mapping[str, Report] = (nodes or {}).get("ledger_checks") or {}
    if not checks:
        return None
    bad = [c for c in checks.values() if c["status"] == egress.TAMPERED]
    if bad:
        return Verdict(
            "node-ledgers",
            FAIL,
            f"NODE LEDGERS: {len(bad)} of {len(checks)} NOT TRUSTED: {bad[0]['problem']}",
            tuple(c["problem"] for c in bad),
        )
    keyed = sum(1 for c in checks.values() if c["key_checked"])
    unchecked = sum(1 for c in checks.values() if c["keyed"] and not c["key_checked"])
    extra = f", {keyed} keyed anchors checked" if keyed else ""
    extra += f", {unchecked} keyed anchors not checked (no key)" if unchecked else ""
    return Verdict(
        "node-ledgers",
        PASS,
        f"NODE LEDGERS: {len(checks)} intact (chain, anchor, identity){extra}",
    )


def check_files(missing: Sequence[str], read_problems: Sequence[str]) -> Verdict | None:
    """Files a complete run has but this one lacks, and unreadable lines: a warning (a crashed
    or deployment run lacks some; what they would have shown is reported as unverifiable by the
    other checks)."""
    if not missing and not read_problems:
        return None
    unreadable = f"; {len(read_problems)} unreadable lines/files" if read_problems else ""
    return Verdict(
        "files",
        WARN,
        f"FILES: missing {', '.join(missing) or 'none'}{unreadable}",
        tuple(read_problems),
    )


SIGNATURE_VALID, SIGNATURE_INVALID = "valid", "invalid"
SIGNATURE_ABSENT, SIGNATURE_UNCHECKED = "absent", "unchecked"


def check_signature(state: str | None) -> Verdict | None:
    """The HMAC of the log heads in results.json, checked with the operator's run key.

    Without a key the chains prove only that each log is consistent with itself; the signed
    heads prove that nobody without the key rewrote them. Key given and the MAC matches: pass;
    key given and no MAC, or a MAC of other heads or another key: fail; a MAC and no key
    given: warn (not checked). ``None``: no key and nothing signed (the verdict is omitted).
    """
    if state is None:
        return None
    if state == SIGNATURE_VALID:
        return Verdict("signature", PASS, "SIGNATURE: log heads signed with the given run key")
    if state == SIGNATURE_UNCHECKED:
        return Verdict(
            "signature",
            WARN,
            "SIGNATURE: results.json carries signed log heads, not checked: give the run key "
            "(fedrec audit --key FILE, or FEDREC_RUN_KEY)",
        )
    what = (
        "results.json carries no signed log heads, though a run key was given (the run was "
        "written without FEDREC_RUN_KEY, or the signature was removed)"
        if state == SIGNATURE_ABSENT
        else "the signed log heads do not match the recorded heads under the given key, or the "
        "logs no longer reach them (heads rewritten or lines removed, or another key signed)"
    )
    return Verdict("signature", FAIL, f"SIGNATURE: {state.upper()}: {what}")


def all_verdicts(
    *,
    fault_injected: bool,
    logs: Mapping[str, Report],
    acc: Report,
    eg: Report,
    emp: Mapping[str, Report] | None,
    missing: Sequence[str],
    read_problems: Sequence[str],
    ledger_present: bool,
    egress_present: bool,
    shapes_known: bool,
    results: str = RESULTS_PRESENT,
    evidence: Report | None = None,
    signature: str | None = None,
    nodes: Report | None = None,
    trained: bool = True,
) -> list[Verdict]:
    """Every check, in the report's order (fault injection, results, evidence, node policy,
    node ledgers and files only when they apply)."""
    found = [
        check_fault_injection(fault_injected, trained=trained),
        check_logs(logs),
        check_results(results),
        check_signature(signature),
        check_accounting(acc, ledger_present=ledger_present),
        check_budget(acc),
        check_egress(eg, egress_present=egress_present, shapes_known=shapes_known),
        check_evidence(evidence),
        check_node_policy(nodes),
        check_node_ledgers(nodes),
        check_empirical(emp),
        check_files(missing, read_problems),
    ]
    return [v for v in found if v is not None]
