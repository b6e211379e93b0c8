"""Tampering that keeps every hash chain valid, and a removed results.json: the audit must fail.

The attack of issue #16: remove a round from the ledgers, recompute each chain with the public
``hashlog.chain_hash`` and write the new heads into ``results.json``. The chains then verify;
the other files of the run directory (checkpoints, ``rounds_completed`` and ``round_status``,
``metrics.jsonl``, ``egress.jsonl``, the clients' own ledgers) still say what really ran.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from fedrec.audit import accounting
from fedrec.audit.report import build_report, write_report
from fedrec.shared import hashlog
from tests.test_audit_rundir import FAST_PLD, make_run_dir, verdicts

LEDGER = "privacy-ledger.jsonl"


def rechain(path: Path, entries: list[dict[str, Any]]) -> str:
    """Rewrite a log with the public chain function, as an attacker can; return its new head."""
    prev, lines = hashlog.GENESIS, []
    for e in entries:
        body = {k: v for k, v in e.items() if k not in ("prev", "hash")}
        body["prev"] = prev
        body["hash"] = prev = hashlog.chain_hash(prev, body)
        lines.append(json.dumps(body, sort_keys=True))
    path.write_text("".join(line + "\n" for line in lines))
    return prev


def edit_log(run: Path, name: str, keep: Any = None, change: Any = None) -> None:
    """Drop the entries ``keep`` rejects, apply ``change`` to the rest, re-chain, and write the
    new head into results.json when it records one for this log."""
    entries = [e for e in hashlog.read(run / name) if keep is None or keep(e)]
    head = rechain(run / name, [change(e) if change else e for e in entries])
    results = json.loads((run / "results.json").read_text())
    if name in results["log_heads"]:
        results["log_heads"][name] = head
        (run / "results.json").write_text(json.dumps(results))


def edit_results(run: Path, **change: Any) -> None:
    results = json.loads((run / "results.json").read_text())
    (run / "results.json").write_text(json.dumps({**results, **change}))


def evidence_problems(report: dict[str, Any]) -> list[str]:
    return report["evidence"]["problems"]


# --- the attack of the issue ----------------------------------------------------------------


def test_dropping_the_last_round_and_rechaining_every_ledger_fails(tmp_path: Path) -> None:
    # Prepare: five rounds; round 5 removed from the server's and the client's ledger, both
    # chains recomputed and the server ledger's new head written into results.json
    run = make_run_dir(tmp_path, channels=("finance",), rounds=5, target=20.0)
    spent = build_report(run, pld_interval=FAST_PLD)["accounting"]["channels"]["finance"]
    edit_log(run, LEDGER, keep=lambda e: e["round"] != 5)
    edit_log(run, "nodes/finance/privacy-ledger.jsonl", keep=lambda e: e["round"] != 5)

    # Execute
    report = build_report(run, pld_interval=FAST_PLD)

    # Assert: the chains and the accounting are consistent (that was the bypass) ...
    v = verdicts(report)
    assert v["logs"] == "pass" and v["accounting"] == "pass"
    assert report["accounting"]["channels"]["finance"]["epsilon"] < spent["epsilon"]
    # ... but the checkpoint, results.json, metrics and egress log of round 5 contradict it
    assert v["evidence"] == "fail" and not report["ok"]
    problems = evidence_problems(report)
    assert any(p.startswith("checkpoints/round-0005.safetensors: round 5") for p in problems)
    assert any("rounds_completed = 5" in p and "round(s) 5" in p for p in problems)
    assert any(p.startswith("metrics.jsonl has lines for round(s) 5") for p in problems)
    assert any("egress.jsonl: entry" in p and "round 5" in p for p in problems)


def test_dropping_a_round_everywhere_but_the_checkpoints_still_fails(tmp_path: Path) -> None:
    # Prepare: round 5 also removed from the egress log (re-chained) and metrics.jsonl
    run = make_run_dir(tmp_path, channels=("finance",), rounds=5, target=20.0)
    for name in (LEDGER, "nodes/finance/privacy-ledger.jsonl", "egress.jsonl"):
        edit_log(run, name, keep=lambda e: e["round"] != 5)
    metrics = [m for m in (run / "metrics.jsonl").read_text().splitlines() if '"round": 5' not in m]
    (run / "metrics.jsonl").write_text("\n".join(metrics) + "\n")

    # Execute
    report = build_report(run, pld_interval=FAST_PLD)

    # Assert
    assert verdicts(report)["evidence"] == "fail"
    problems = evidence_problems(report)
    assert [p.split(" ", 1)[0] for p in problems] == [
        "results.json",  # rounds_completed = 5
        "results.json:",  # round_status of round 5
        "checkpoints/round-0005.safetensors:",
    ]


def test_dropping_a_round_from_the_server_ledger_only_is_caught_by_the_clients_ledger(
    tmp_path: Path,
) -> None:
    # Prepare: results.json and the checkpoints edited too, only nodes/ left as it was
    run = make_run_dir(tmp_path, channels=("finance",), rounds=5, target=20.0)
    edit_log(run, LEDGER, keep=lambda e: e["round"] != 5)
    (run / "checkpoints" / "round-0005.safetensors").unlink()
    status = json.loads((run / "results.json").read_text())["round_status"]
    edit_results(run, rounds_completed=4, round_status={k: status[k] for k in "1234"})

    # Execute
    report = build_report(run, pld_interval=FAST_PLD)

    # Assert
    assert verdicts(report)["accounting"] == "fail"
    assert any(
        "entry 5: round 5: the client trained 20 steps" in p and "has no line" in p
        for p in report["accounting"]["problems"]
    )


# --- one cross-check each ---------------------------------------------------------------------


def test_a_gap_in_one_channel_is_a_removed_line(tmp_path: Path) -> None:
    # Prepare: ecommerce's round 2 removed (finance still has it), chain recomputed
    run = make_run_dir(tmp_path, rounds=3, nodes=False)
    edit_log(run, LEDGER, keep=lambda e: not (e["channel"] == "ecommerce" and e["round"] == 2))

    # Execute
    report = build_report(run, pld_interval=FAST_PLD)

    # Assert
    assert verdicts(report)["evidence"] == "fail"
    assert "privacy-ledger.jsonl: ecommerce has no line for round(s) 2 (it has rounds 1, 3" in (
        "\n".join(evidence_problems(report))
    )


def test_rounds_completed_below_the_ledger_fails(tmp_path: Path) -> None:
    # Prepare
    run = make_run_dir(tmp_path, channels=("finance",), rounds=3)
    edit_results(run, rounds_completed=2)

    # Execute
    report = build_report(run, pld_interval=FAST_PLD)

    # Assert
    assert verdicts(report)["evidence"] == "fail"
    assert (
        "privacy-ledger.jsonl records round(s) 3, after results.json's rounds_completed = 2"
        in evidence_problems(report)
    )


def test_round_status_disagreeing_with_the_ledger_fails(tmp_path: Path) -> None:
    # Prepare: results.json says finance refused round 2; the ledger says it trained
    run = make_run_dir(tmp_path, rounds=3)
    status = json.loads((run / "results.json").read_text())["round_status"]
    status["2"]["finance"] = "refused"
    edit_results(run, round_status=status)

    # Execute
    report = build_report(run, pld_interval=FAST_PLD)

    # Assert
    assert verdicts(report)["evidence"] == "fail"
    assert any(
        p.startswith("results.json: round_status says finance was 'refused' in round 2; ")
        and "status 'trained'" in p
        for p in evidence_problems(report)
    )


def test_checkpoint_of_a_round_nobody_trained_fails(tmp_path: Path) -> None:
    # Prepare: every channel refused round 3, yet a checkpoint of round 3 exists
    run = make_run_dir(tmp_path, rounds=3, refuse={"finance": {3}, "ecommerce": {3}})
    (run / "checkpoints" / "round-0003.safetensors").write_bytes(b"")

    # Execute
    report = build_report(run, pld_interval=FAST_PLD)

    # Assert
    assert verdicts(report)["evidence"] == "fail"
    assert evidence_problems(report) == [
        "checkpoints/round-0003.safetensors: round 3 was aggregated, but privacy-ledger.jsonl "
        "has no trained line for round 3 (trained rounds: 1-2): lines removed?"
    ]


def test_training_metrics_of_a_refused_node_fail(tmp_path: Path) -> None:
    # Prepare: a train metrics line (the node's reply was aggregated) for a refused round
    run = make_run_dir(tmp_path, channels=("finance",), rounds=2, refuse={"finance": {2}})
    line = {"round": 2, "channel": "finance", "phase": "train", "metrics": {"num-examples": 4500}}
    with (run / "metrics.jsonl").open("a") as fh:
        fh.write(json.dumps(line) + "\n")

    # Execute
    report = build_report(run, pld_interval=FAST_PLD)

    # Assert
    assert verdicts(report)["evidence"] == "fail"
    assert evidence_problems(report) == [
        "metrics.jsonl:3: finance sent training metrics in round 2 (its reply was aggregated); "
        "privacy-ledger.jsonl has status 'refused'"
    ]


def test_fewer_steps_in_the_ledger_than_the_client_reported_fail(tmp_path: Path) -> None:
    # Prepare: round 2 rewritten as 10 steps with the matching ε (so the accounting is
    # consistent), chains recomputed; the egress log still holds the client's report of 20
    run = make_run_dir(tmp_path, channels=("finance",), rounds=2, nodes=False)
    eps10 = accounting.epsilon_rdp([(1.0, 0.05, 30)], 1e-5)

    def under_report(e: dict[str, Any]) -> dict[str, Any]:
        return {**e, "steps": 10, "total-steps": 30, "epsilon": eps10} if e["round"] == 2 else e

    edit_log(run, LEDGER, change=under_report)

    # Execute
    report = build_report(run, pld_interval=FAST_PLD)

    # Assert
    assert verdicts(report)["accounting"] == "pass"
    assert verdicts(report)["evidence"] == "fail"
    problems = "\n".join(evidence_problems(report))
    assert "(finance, round 2): the client reported 20 steps; privacy-ledger.jsonl entry 2" in (
        problems
    )
    assert "the client reported ε 2.9" in problems


def test_a_client_ledger_with_more_steps_than_the_server_ledger_fails(tmp_path: Path) -> None:
    # Prepare: the client's own line for round 1 says 25 steps; the server's says 20
    run = make_run_dir(tmp_path, channels=("finance",), rounds=2)
    edit_log(
        run,
        "nodes/finance/privacy-ledger.jsonl",
        change=lambda e: {**e, "steps": 25} if e["round"] == 1 else e,
    )

    # Execute
    report = build_report(run, pld_interval=FAST_PLD)

    # Assert
    assert verdicts(report)["accounting"] == "fail"
    assert (
        "nodes/finance/privacy-ledger.jsonl: entry 1: round 1: the client trained 25 steps; "
        "the server's privacy-ledger.jsonl says 20" in report["accounting"]["problems"]
    )


def test_a_client_that_trained_in_a_round_the_server_logged_as_refused_fails(
    tmp_path: Path,
) -> None:
    # Prepare
    run = make_run_dir(tmp_path, channels=("finance",), rounds=2, refuse={"finance": {2}})
    edit_log(
        run,
        "nodes/finance/privacy-ledger.jsonl",
        change=lambda e: {**e, "steps": 20, "status": "trained"} if e["round"] == 2 else e,
    )

    # Execute
    report = build_report(run, pld_interval=FAST_PLD)

    # Assert
    assert verdicts(report)["accounting"] == "fail"
    assert any(
        "round 2: the client trained 20 steps" in p and "status 'refused'" in p
        for p in report["accounting"]["problems"]
    )


# --- results.json ---------------------------------------------------------------------------


def test_results_removed_from_a_finished_run_fails(tmp_path: Path) -> None:
    # Prepare
    run = make_run_dir(tmp_path, channels=("finance",), rounds=2)
    (run / "results.json").unlink()

    # Execute
    report = build_report(run, pld_interval=FAST_PLD)

    # Assert
    results = next(v for v in report["verdicts"] if v["name"] == "results")
    assert results["status"] == "fail" and not report["ok"]
    assert results["line"].startswith("RESULTS: MISSING: results.json is absent and the run has")
    assert "Restore results.json" in results["line"]
    assert report["run"]["incomplete"] is False


def test_a_run_that_stopped_early_is_incomplete_and_still_checked(tmp_path: Path) -> None:
    # Prepare: no results.json, the INCOMPLETE marker kept; a checkpoint without its ledger
    # line (removed) is still found
    run = make_run_dir(tmp_path, channels=("finance",), rounds=2, results=False)
    (run / "checkpoints" / "round-0003.safetensors").write_bytes(b"")

    # Execute
    report = build_report(run, pld_interval=FAST_PLD)

    # Assert
    v = verdicts(report)
    results = next(x for x in report["verdicts"] if x["name"] == "results")
    assert v["results"] == "warn" and report["run"]["incomplete"] is True
    assert "stopped early" in results["line"] and "tail could not be checked" in results["line"]
    assert v["logs"] == "warn" and v["accounting"] == "pass"
    assert v["evidence"] == "fail"


# --- strict JSON ----------------------------------------------------------------------------


def _reject_constant(name: str) -> None:
    raise ValueError(f"not strict JSON: {name}")


def test_an_infinite_epsilon_reads_as_null_or_infinity_and_the_report_is_strict_json(
    tmp_path: Path,
) -> None:
    # Prepare: a round trained without noise (σ = 0): ε = ∞, written as null by strict
    # writers; the second channel's ledger the old way (a bare Infinity)
    run = make_run_dir(tmp_path, rounds=1, nodes=False)
    edit_log(
        run,
        LEDGER,
        change=lambda e: {
            **e,
            "noise-multiplier": 0.0,
            "epsilon": None if e["channel"] == "finance" else math.inf,
        },
    )
    assert "Infinity" in (run / LEDGER).read_text()

    # Execute
    report = build_report(run, pld_interval=FAST_PLD)
    written = write_report(report, tmp_path / "out")

    # Assert: read as ∞ (no "without an epsilon" problem); the budget is exceeded
    assert not any("without an epsilon" in p for p in report["accounting"]["problems"])
    assert report["accounting"]["channels"]["finance"]["epsilon"] == "inf"
    assert verdicts(report)["budget"] == "fail"
    text = written["audit.json"].read_text()
    assert json.loads(text, parse_constant=_reject_constant)["ok"] is False


def test_a_run_without_dp_needs_no_client_ledgers(tmp_path: Path) -> None:
    # Prepare: dp.enabled false; the clients' state folders exist but hold no ledger
    run = make_run_dir(tmp_path, channels=("finance",), rounds=1, nodes=False)
    config = json.loads((run / "config.json").read_text())
    config["run_config"]["dp.enabled"] = False
    (run / "config.json").write_text(json.dumps(config))
    (run / "nodes" / "finance").mkdir(parents=True)
    (run / "nodes" / "finance" / "timings.jsonl").write_text("")

    # Execute
    report = build_report(run, pld_interval=FAST_PLD)

    # Assert
    assert verdicts(report)["logs"] == "pass"
    assert list(report["logs"]) == [LEDGER, "egress.jsonl"]


def _drop_heads(text: str) -> str:
    return json.dumps({k: v for k, v in json.loads(text).items() if k != "log_heads"})


@pytest.mark.parametrize("edit", [_drop_heads, lambda _: "[]"], ids=["no-heads", "a-list"])
def test_results_without_log_heads_fails(tmp_path: Path, edit: Any) -> None:
    # Prepare: the heads removed from results.json, or the file replaced by a JSON list
    run = make_run_dir(tmp_path, channels=("finance",), rounds=1)
    (run / "results.json").write_text(edit((run / "results.json").read_text()))

    # Execute
    report = build_report(run, pld_interval=FAST_PLD)

    # Assert
    results = next(v for v in report["verdicts"] if v["name"] == "results")
    assert results["status"] == "fail" and not report["ok"]
    assert results["line"].startswith("RESULTS: NO LOG HEADS: results.json does not record")
