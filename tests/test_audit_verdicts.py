"""The report's verdicts, one check at a time, on hand-made parts of a report."""

from __future__ import annotations

import math
from typing import Any

import pytest

from fedrec.audit import verdicts
from fedrec.audit.verdicts import FAIL, PASS, SKIP, WARN


def _log(name: str, status: str, entries: int = 3, problem: str = "") -> dict[str, Any]:
    return {"log": name, "status": status, "entries": entries, "problem": problem}


def _channel(epsilon: float, refused: list[int] | None = None) -> dict[str, Any]:
    return {"epsilon": epsilon, "rounds_refused": refused or []}


def _acc(**change: Any) -> dict[str, Any]:
    """A consistent two-channel accounting result; ``change`` overrides its keys."""
    acc: dict[str, Any] = {
        "accountant": "rdp",
        "cross_check": "pld",
        "dp_enabled": True,
        "target_epsilon": 8.0,
        "channels": {"ecommerce": _channel(3.368), "finance": _channel(2.970, [3])},
        "composed": {"epsilon": 4.038, "naive_sum": 6.338},
        "problems": [],
        "violations": [],
        "notes": [],
    }
    return {**acc, **change}


def _eg(**change: Any) -> dict[str, Any]:
    return {"replies": 12, "bytes": 3156, "violations": [], "errors": [], **change}


def _violation(entry: int, problem: str) -> dict[str, Any]:
    return {
        "where": f"egress.jsonl: entry {entry}",
        "round": 1,
        "channel": "finance",
        "kind": "train",
        "source": "audit",
        "problem": problem,
    }


def _error(refused: bool) -> dict[str, Any]:
    return {
        "where": "egress.jsonl: entry 4",
        "round": 2,
        "channel": "finance",
        "code": 4030 if refused else 1,
        "refused": refused,
        "reason": "privacy-refused: budget" if refused else "Traceback ... ValueError",
    }


# --- fault injection ------------------------------------------------------------------------


def test_fault_injection_fails_only_when_the_noise_was_off() -> None:
    # Execute
    off = verdicts.check_fault_injection(False)
    on = verdicts.check_fault_injection(True)

    # Assert
    assert off is None
    assert on is not None and on.status == FAIL
    assert on.line.startswith("FAULT INJECTION: audit.disable-noise was on")


# --- logs (hash chains) ---------------------------------------------------------------------


def test_intact_logs_pass_with_their_entry_counts() -> None:
    # Prepare
    logs = {"a": _log("privacy-ledger.jsonl", "intact", 6), "b": _log("egress.jsonl", "intact", 12)}

    # Execute
    v = verdicts.check_logs(logs)

    # Assert
    assert v.status == PASS
    assert v.line == (
        "LOGS: intact: privacy-ledger.jsonl (6 entries), egress.jsonl (12 entries); "
        "heads match results.json"
    )


def test_a_tampered_log_fails_and_lists_the_unverified_ones_too() -> None:
    # Prepare: one edited log, one missing, one without a recorded head
    logs = {
        "a": _log("privacy-ledger.jsonl", "tampered", problem="entry modified"),
        "b": _log("egress.jsonl", "missing", problem="egress.jsonl: missing"),
        "c": _log("nodes/x/privacy-ledger.jsonl", "unverified-tail", problem="tail unverified"),
    }

    # Execute
    v = verdicts.check_logs(logs)

    # Assert: TAMPERED wins over MISSING in the line; every problem is a detail
    assert v.status == FAIL
    assert v.line == "LOGS: TAMPERED: privacy-ledger.jsonl, egress.jsonl: not trusted"
    assert v.details == ("entry modified", "egress.jsonl: missing", "tail unverified")


def test_a_missing_log_alone_is_reported_as_missing() -> None:
    # Execute
    v = verdicts.check_logs({"a": _log("egress.jsonl", "missing")})

    # Assert
    assert (v.status, v.line) == (FAIL, "LOGS: MISSING: egress.jsonl: not trusted")


def test_an_unverified_tail_is_a_warning() -> None:
    # Execute
    v = verdicts.check_logs({"a": _log("privacy-ledger.jsonl", "unverified-tail", problem="p")})

    # Assert
    assert v.status == WARN
    assert v.line == "LOGS: chains intact, tail unverified for privacy-ledger.jsonl"
    assert v.details == ("p",)


# --- accounting -----------------------------------------------------------------------------


def test_accounting_without_a_ledger_fails() -> None:
    # Execute
    v = verdicts.check_accounting(_acc(), ledger_present=False)

    # Assert
    assert (v.status, v.line) == (
        FAIL,
        "ACCOUNTING: not verifiable: privacy-ledger.jsonl missing",
    )


def test_accounting_problems_fail_with_the_first_in_the_line() -> None:
    # Prepare
    problems = ["round 2: ledger ε 2.4813 ≠ recomputed 2.9702", "round 3: no epsilon"]

    # Execute
    v = verdicts.check_accounting(_acc(problems=problems), ledger_present=True)

    # Assert
    assert v.status == FAIL
    assert v.line == (
        "ACCOUNTING: INCONSISTENT (2 problems): round 2: ledger ε 2.4813 ≠ recomputed 2.9702"
    )
    assert v.details == tuple(problems)


def test_accounting_with_dp_off_is_a_warning() -> None:
    # Execute
    v = verdicts.check_accounting(_acc(dp_enabled=False), ledger_present=True)

    # Assert
    assert (v.status, v.line) == (WARN, "ACCOUNTING: DP disabled for this run: ε = ∞")


def test_consistent_accounting_passes_and_names_the_accountants() -> None:
    # Prepare: a PRV run over one channel, with one note
    acc = _acc(
        accountant="prv",
        cross_check="pld, rdp",
        channels={"finance": _channel(2.5)},
        notes=["a note"],
    )

    # Execute
    v = verdicts.check_accounting(acc, ledger_present=True)

    # Assert: singular "channel"
    assert v.status == PASS
    assert v.line == (
        "ACCOUNTING: consistent: ledger ε equals the PRV recomputation on 1 channel; the "
        "PLD, RDP cross-check agrees (RDP ≥ PLD)"
    )
    assert v.details == ("a note",)


# --- budget ---------------------------------------------------------------------------------


def test_budget_within_target_names_the_largest_epsilon_refusals_and_composition() -> None:
    # Execute
    v = verdicts.check_budget(_acc())

    # Assert: 3.368 (ecommerce) > 2.970 (finance)
    assert v.status == PASS
    assert v.line == (
        "BUDGET: within target: max ε 3.368 (ecommerce) ≤ target 8.000; refused rounds: "
        "finance [3]; composed worst case (user on all channels) ε 4.038 (naive sum 6.338)"
    )


def test_budget_ignores_an_unknown_epsilon_when_taking_the_largest() -> None:
    # Prepare: finance's ε could not be computed (NaN); one channel, so no composition
    acc = _acc(channels={"finance": _channel(math.nan), "social": _channel(1.25)}, composed=None)

    # Execute
    v = verdicts.check_budget(acc)

    # Assert
    assert v.line == "BUDGET: within target: max ε 1.250 (social) ≤ target 8.000"


def test_budget_without_target_says_so() -> None:
    # Execute
    v = verdicts.check_budget(_acc(target_epsilon=None, channels={"f": _channel(1.0)}))

    # Assert
    assert v.line == "BUDGET: within target: max ε 1.000 (f) (no target set)"


def test_budget_violation_fails_with_the_first_violation() -> None:
    # Prepare
    violation = "finance: round 2: ε 2.9702 exceeds the target 2.9"

    # Execute
    v = verdicts.check_budget(_acc(violations=[violation]))

    # Assert
    assert (v.status, v.line) == (FAIL, f"BUDGET: VIOLATED: {violation}")
    assert v.details == (violation,)


@pytest.mark.parametrize(
    ("change", "line"),
    [
        ({"dp_enabled": False}, "BUDGET: not applicable: DP disabled (ε = ∞)"),
        ({"channels": {}}, "BUDGET: no channel trained; nothing spent"),
    ],
)
def test_budget_without_dp_or_without_channels_is_a_warning(
    change: dict[str, Any], line: str
) -> None:
    # Execute
    v = verdicts.check_budget(_acc(**change))

    # Assert
    assert (v.status, v.line) == (WARN, line)


# --- egress ---------------------------------------------------------------------------------


def test_clean_egress_passes_with_counts() -> None:
    # Execute
    with_shapes = verdicts.check_egress(_eg(), egress_present=True, shapes_known=True)
    without = verdicts.check_egress(_eg(), egress_present=True, shapes_known=False)

    # Assert: 3156 bytes printed with a thousands separator
    assert with_shapes.status == PASS
    assert with_shapes.line == (
        "EGRESS: clean: 12 replies, 3,156 bytes, all within the allowlist and the model's "
        "parameter shapes"
    )
    assert without.line == "EGRESS: clean: 12 replies, 3,156 bytes, all within the allowlist"


def test_missing_egress_log_fails() -> None:
    # Execute
    v = verdicts.check_egress(_eg(), egress_present=False, shapes_known=True)

    # Assert
    assert (v.status, v.line) == (FAIL, "EGRESS: not verifiable: egress.jsonl missing")


def test_egress_violations_fail_with_count_and_first_problem() -> None:
    # Prepare
    eg = _eg(violations=[_violation(3, "extra record"), _violation(5, "raw count")])

    # Execute
    v = verdicts.check_egress(eg, egress_present=True, shapes_known=True)

    # Assert
    assert v.status == FAIL
    assert v.line == "EGRESS: 2 VIOLATIONS in 12 replies: egress.jsonl: entry 3: extra record"
    assert v.details[1] == "egress.jsonl: entry 5 (round 1, finance, train, audit): raw count"


def test_free_text_error_reply_is_a_warning_but_a_budget_refusal_is_not() -> None:
    # Prepare
    refusal_only = _eg(errors=[_error(refused=True)])
    crash = _eg(errors=[_error(refused=True), _error(refused=False)])

    # Execute
    clean = verdicts.check_egress(refusal_only, egress_present=True, shapes_known=True)
    warned = verdicts.check_egress(crash, egress_present=True, shapes_known=True)

    # Assert
    assert clean.status == PASS
    assert warned.status == WARN
    assert warned.line == (
        "EGRESS: within the allowlist, but 1 error reply carried free-text reasons "
        "(not covered by the allowlist)"
    )
    assert warned.details == (
        "egress.jsonl: entry 4 (round 2, finance, code 1): Traceback ... ValueError",
    )


# --- empirical ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bound", "epsilon", "claim", "status", "line"),
    [
        # a lower bound above the claim contradicts it
        (True, 4.188, 0.5, FAIL, "a: ε_LB 4.188 > claimed ε 0.500: the guarantee is CONTRADICTED"),
        # an estimate above the claim is only suspicious
        (False, 4.188, 0.5, WARN, "a: ε estimate 4.188 > claimed ε 0.500: suspicious"),
        # equal up to 1e-6 is consistent
        (True, 2.9702005, 2.97020, PASS, "a: ε_LB 2.970 ≤ claimed ε 2.970: consistent"),
        (True, 0.5, None, WARN, "a: ε_LB 0.500, no claimed ε to compare with"),
    ],
)
def test_empirical_epsilon_against_the_claim(
    bound: bool, epsilon: float, claim: float | None, status: str, line: str
) -> None:
    # Execute
    got = verdicts.check_empirical_claim(
        "a", bound=bound, control=False, epsilon=epsilon, claim=claim
    )

    # Assert
    assert got == (status, line)


def test_bound_just_above_the_tolerance_contradicts() -> None:
    # Prepare: 1e-6 is the slack; 2e-6 above the claim is beyond it
    claim = 2.0

    # Execute
    status, _ = verdicts.check_empirical_claim(
        "a", bound=True, control=False, epsilon=claim + 2e-6, claim=claim
    )

    # Assert
    assert status == FAIL


def test_non_private_control_must_show_power() -> None:
    # Execute: a control has no claim; any ε > 0 shows the audit can detect something
    power = verdicts.check_empirical_claim("c", bound=True, control=True, epsilon=2.5, claim=None)
    none = verdicts.check_empirical_claim("c", bound=True, control=True, epsilon=0.0, claim=None)

    # Assert
    assert power == (PASS, "c: non-private control, ε_LB 2.500 > 0: the audit has power")
    assert none == (WARN, "c: non-private control, ε_LB 0.000 = 0: the audit shows no power")


def test_empirical_verdict_takes_the_worst_status() -> None:
    # Prepare
    emp = {
        "a": {"status": PASS, "line": "a ok"},
        "b": {"status": WARN, "line": "b odd"},
    }

    # Execute
    warned = verdicts.check_empirical(emp)
    failed = verdicts.check_empirical({**emp, "c": {"status": FAIL, "line": "c bad"}})

    # Assert
    assert (warned.status, warned.line) == (WARN, "EMPIRICAL: see details: a ok; b odd")
    assert failed.status == FAIL
    assert failed.line.startswith("EMPIRICAL: CONTRADICTS the guarantee: a ok; b odd; c bad")
    assert failed.details == ("a ok", "b odd", "c bad")


def test_no_empirical_audit_is_skipped() -> None:
    # Execute
    v = verdicts.check_empirical(None)

    # Assert
    assert (v.status, v.line) == (SKIP, "EMPIRICAL: no empirical audit given")


# --- files and the whole list -----------------------------------------------------------------


def test_missing_files_and_unreadable_lines_are_a_warning() -> None:
    # Execute
    nothing = verdicts.check_files([], [])
    some = verdicts.check_files(["results.json"], ["metrics.jsonl:3: not JSON"])
    unreadable_only = verdicts.check_files([], ["x"])

    # Assert
    assert nothing is None
    assert some is not None and some.status == WARN
    assert some.line == "FILES: missing results.json; 1 unreadable lines/files"
    assert some.details == ("metrics.jsonl:3: not JSON",)
    assert unreadable_only is not None
    assert unreadable_only.line == "FILES: missing none; 1 unreadable lines/files"


def test_all_verdicts_keep_the_report_order_and_as_dict_the_json_shape() -> None:
    # Execute
    found = verdicts.all_verdicts(
        fault_injected=True,
        logs={"a": _log("egress.jsonl", "intact")},
        acc=_acc(),
        eg=_eg(),
        emp=None,
        missing=["results.json"],
        read_problems=[],
        ledger_present=True,
        egress_present=True,
        shapes_known=True,
    )

    # Assert
    names = [v.name for v in found]
    assert names == [
        "fault-injection",
        "logs",
        "accounting",
        "budget",
        "egress",
        "empirical",
        "files",
    ]
    assert found[-1].as_dict() == {
        "name": "files",
        "status": "warn",
        "line": "FILES: missing results.json",
        "details": [],
    }


# --- results.json and the cross-checks ------------------------------------------------------


def test_results_verdict_only_when_results_json_is_missing() -> None:
    # Execute
    present = verdicts.check_results(verdicts.RESULTS_PRESENT)
    incomplete = verdicts.check_results(verdicts.RESULTS_INCOMPLETE)
    missing = verdicts.check_results(verdicts.RESULTS_MISSING)

    # Assert
    assert present is None
    assert incomplete is not None and incomplete.status == WARN
    assert incomplete.line.startswith("RESULTS: run INCOMPLETE: it stopped early")
    assert missing is not None and missing.status == FAIL
    assert missing.line.startswith("RESULTS: MISSING: results.json is absent")


def test_evidence_fails_with_the_first_disagreement_and_passes_naming_the_files() -> None:
    # Prepare
    rounds = {"privacy-ledger.jsonl": [1, 2, 3], "checkpoints": [1, 2, 3], "metrics.jsonl": []}

    # Execute
    bad = verdicts.check_evidence({"rounds": rounds, "problems": ["a", "b"]})
    good = verdicts.check_evidence({"rounds": rounds, "problems": []})

    # Assert
    assert bad is not None and bad.status == FAIL
    assert bad.line == "EVIDENCE: the run's files DISAGREE (2 problems): a"
    assert bad.details == ("a", "b")
    assert good is not None and good.status == PASS
    assert good.line == "EVIDENCE: agrees: the ledger's rounds 1-3 match checkpoints"
    assert verdicts.check_evidence(None) is None
