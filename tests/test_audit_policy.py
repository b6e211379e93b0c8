"""The audit against the server: each node's policy, its refusals, its ledger, the flags, the
worst-case ε, and the trust statement derived from the policy in force.

Run directories are hand-made (:func:`tests.test_audit_rundir.make_run_dir`: node ledgers
written by the node's own ``NodeLedger``, ``node-policy.toml`` as a simulation writes it)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from fedrec.audit import accounting, trust
from fedrec.audit.nodes import check_node_ledger
from fedrec.audit.report import build_report, write_report
from fedrec.client.ledger import LEDGER, LedgerError, NodeLedger, reset
from fedrec.shared import hashlog
from fedrec.shared.policy import NodePolicy, write_policy
from tests.test_audit_rundir import FAST_PLD, REFUSED_CODE, make_run_dir

SECURE = "chacha20-os-key"


def audit(run: Path, **kwargs: Any) -> dict[str, Any]:
    return build_report(run, pld_interval=FAST_PLD, **kwargs)


def verdict(report: dict[str, Any], name: str) -> dict[str, Any]:
    return next(v for v in report["verdicts"] if v["name"] == name)


def flags(report: dict[str, Any]) -> list[str]:
    return [f"{f['status']}: {f['line']}" for f in report["nodes"]["flags"]]


def statement(report: dict[str, Any]) -> dict[str, Any]:
    (only,) = report["statement"]["against_the_server"]
    return only


def edit_config(run: Path, **run_config: Any) -> None:
    config = json.loads((run / "config.json").read_text())
    config["run_config"].update(run_config)
    (run / "config.json").write_text(json.dumps(config))


# ------------------------------------------------------------------ the trust statement


def text(st: dict[str, Any]) -> tuple[str, str]:
    return "\n".join(st["holds"]), "\n".join(st["does_not_hold"])


# policy key -> (a value other than the default, words that must then be in holds (+) or in
# does_not_hold (-)). Every key of NodePolicy is here (checked below).
CHANGES: dict[str, tuple[Any, list[str]]] = {
    "dp_required": (False, ["-dp-required = false: the node trains WITHOUT DP"]),
    "lifetime_epsilon": (4.0, ["+kept ≤ 4 at δ = 1e-05"]),
    "max_delta": (1e-6, ["+kept ≤ 10 at δ = 1e-06"]),
    "min_noise_multiplier": (1.5, ["+noise of multiplier ≥ 1.5"]),
    "max_sample_rate": (0.2, ["+at a sample rate ≤ 0.2"]),
    "accountants": (("prv",), ["+accountant (prv)"]),
    "allow_canaries": (True, ["-Audit canaries (audit.canaries) are ACCEPTED"]),
    "allow_noise_off": (True, ["-Noise-off requests (audit.disable-noise) are ACCEPTED"]),
    "max_evaluations_per_run": (5, ["+capped at 5 per run and 200"]),
    "max_evaluations": (50, ["+capped at 20 per run and 50 over"]),
    "send_loss": (True, ["-The training loss is sent (send-loss = true)"]),
    "secure_noise": (False, ["-secure-noise = false"]),
    "ledger_key": ("/keys/ledger.key", ["+The ledger's anchor is keyed"]),
}


def test_every_policy_key_has_a_statement_case() -> None:
    keys = {f.name for f in dataclasses.fields(NodePolicy)} - {"source"}
    assert set(CHANGES) == keys


def test_the_default_policy_statement() -> None:
    holds, open_ = text(trust.against_the_server(NodePolicy(), nodes=["shop"]))

    for needle in (
        "Training is always DP-SGD",
        "kept ≤ 10 at δ = 1e-05 by the node's own accountant (rdp, prv)",
        "noise of multiplier ≥ 0.5, at a sample rate ≤ 1 counted from the bucketed user count",
        "Noise-off requests (audit.disable-noise) are refused.",
        "Audit canaries (audit.canaries) are refused.",
        "capped at 20 per run and 200 over the node's lifetime",
        "The training loss stays on the node",
        SECURE,
        "fails closed",
    ):
        assert needle in holds, needle
    for needle in (
        "Evaluation replies are exact",
        "The server chooses the model weights it sends",
        "--trusted-entities",
        "rounded up to a multiple of 100",
        "anchor is not keyed",
    ):
        assert needle in open_, needle
    assert "ACCEPTED" not in open_ and "WITHOUT DP" not in open_


@pytest.mark.parametrize("key", sorted(CHANGES))
def test_changing_a_policy_key_changes_the_statement(key: str) -> None:
    # Prepare
    value, needles = CHANGES[key]
    default = trust.against_the_server(NodePolicy())

    # Execute
    changed = trust.against_the_server(NodePolicy(**{key: value}))

    # Assert: the statement moved, and says what the new value means, on the right side
    assert (changed["holds"], changed["does_not_hold"]) != (
        default["holds"],
        default["does_not_hold"],
    )
    holds, open_ = text(changed)
    for needle in needles:
        assert needle[1:] in (holds if needle[0] == "+" else open_), (needle, changed)


@pytest.mark.parametrize(
    ("key", "refused"),
    [
        ("allow_noise_off", "Noise-off requests (audit.disable-noise) are refused."),
        ("allow_canaries", "Audit canaries (audit.canaries) are refused."),
        ("dp_required", "Training is always DP-SGD"),
        ("send_loss", "The training loss stays on the node"),
    ],
)
def test_a_switch_that_is_allowed_is_no_longer_claimed(key: str, refused: str) -> None:
    on = not getattr(NodePolicy(), key)

    holds, _ = text(trust.against_the_server(NodePolicy(**{key: on})))

    assert refused not in holds


def test_huge_evaluation_caps_are_effectively_unbounded() -> None:
    st = trust.against_the_server(NodePolicy(max_evaluations_per_run=10**6))

    holds, open_ = text(st)
    assert "capped" not in holds and "effectively unbounded" in open_


def test_an_unknown_policy_claims_nothing() -> None:
    st = trust.against_the_server(None, digest="ab" * 32)

    assert st["holds"] == [] and "unknown (digest abababababab…)" in st["policy"]
    assert "No node policy is known" in st["does_not_hold"][0]


def test_a_reported_noise_source_that_is_not_secure_is_not_claimed() -> None:
    holds, open_ = text(
        trust.against_the_server(NodePolicy(), noise_sources=[trust.FIXED_SEED_SOURCE])
    )

    assert SECURE not in holds
    assert "reproducible" in open_


# ------------------------------------------------------------------ the policy in the report


def test_the_report_states_the_policy_the_nodes_held(tmp_path: Path) -> None:
    # Prepare
    policy = NodePolicy(lifetime_epsilon=6.0, max_evaluations_per_run=5)
    run = make_run_dir(tmp_path, policy=policy)

    # Execute
    report = audit(run)

    # Assert: one policy, reported by every node, matching the file; the statement is its
    v = verdict(report, "node-policy")
    assert v["status"] == "pass" and policy.digest()[:12] in v["line"]
    assert report["nodes"]["policy_file"]["digest"] == policy.digest()
    for node in report["nodes"]["nodes"].values():
        assert node["policy"] == policy.digest() and node["policy_basis"] == "reported"
        assert node["noise_sources"] == [SECURE]
    st = statement(report)
    assert st["nodes"] == ["ecommerce", "finance"]
    assert "kept ≤ 6 at δ = 1e-05" in "\n".join(st["holds"])
    assert "capped at 5 per run" in "\n".join(st["holds"])
    assert "holds against the server as well" not in report["statement"]["setting_and_trust_model"]


def test_a_policy_file_the_nodes_did_not_hold_fails(tmp_path: Path) -> None:
    # Prepare: the nodes held the default; the run directory's file says something else
    run = make_run_dir(tmp_path)
    write_policy(run / "node-policy.toml", NodePolicy(lifetime_epsilon=1.0))

    # Execute
    report = audit(run)

    # Assert
    v = verdict(report, "node-policy")
    assert v["status"] == "fail" and not report["ok"]
    assert any("did not hold the policy the run directory records" in d for d in v["details"])
    # the nodes' own digest is not known, so nothing is claimed for them
    st = statement(report)
    assert st["holds"] == [] and NodePolicy().digest()[:12] in st["policy"]


def test_a_deployment_without_policy_files_reports_the_digest_only(tmp_path: Path) -> None:
    # Prepare: as a deployment's run dir: the nodes reported their digest, no policy file or
    # node ledgers are in the run directory
    policy = NodePolicy(send_loss=True)
    run = make_run_dir(tmp_path, policy=policy)
    (run / "node-policy.toml").unlink()
    shutil.rmtree(run / "nodes")

    # Execute
    unknown = audit(run)
    given = audit(run, node_policies=[policy])

    # Assert: without the file, a warning and no claim; with it, the policy's statement
    v = verdict(unknown, "node-policy")
    assert v["status"] == "warn" and "no node policy known" in v["line"]
    assert policy.digest()[:12] in v["line"]
    assert statement(unknown)["holds"] == []
    assert "where a node's policy sends it" in "\n".join(unknown["statement"]["not_protected"])
    assert verdict(given, "node-policy")["status"] == "pass"
    assert "The training loss is sent" in "\n".join(statement(given)["does_not_hold"])


def test_the_cli_takes_the_platforms_policy_files(tmp_path: Path) -> None:
    # Prepare
    from fedrec.audit.cli import register

    policy = NodePolicy(max_evaluations=77)
    run = make_run_dir(tmp_path, policy=policy)
    (run / "node-policy.toml").unlink()
    write_policy(tmp_path / "platform.toml", policy)
    app = typer.Typer()
    register(app)

    # Execute
    result = CliRunner().invoke(
        app,
        ["audit", str(run), "--node-policy", str(tmp_path / "platform.toml"), "--pld-interval",
         str(FAST_PLD)],
        env={"COLUMNS": "300"},
    )  # fmt: skip

    # Assert
    assert result.exit_code == 0, result.output
    assert "NODE POLICY:" in result.output and "ε worst case" in result.output
    report = json.loads((run / "audit" / "audit.json").read_text())
    assert "capped at 20 per run and 77 over" in "\n".join(statement(report)["holds"])
    assert "What does not hold against the server" in (run / "audit" / "audit.md").read_text()


# ------------------------------------------------------------------ refusals


def append_egress(run: Path, entry: dict[str, Any]) -> None:
    """Log one more reply, as the server does, and record the new head in results.json."""
    hashlog.append(run / "egress.jsonl", entry)
    results = json.loads((run / "results.json").read_text())
    results["log_heads"]["egress.jsonl"] = hashlog.head(run / "egress.jsonl")
    (run / "results.json").write_text(json.dumps(results))


def test_every_refusal_is_listed(tmp_path: Path) -> None:
    # Prepare: a train refusal (server ledger, node ledger) and an evaluation refusal (egress)
    run = make_run_dir(tmp_path, refuse={"finance": {3}})
    append_egress(
        run,
        {
            "round": 3,
            "channel": "ecommerce",
            "kind": "evaluate",
            "node": 0,
            "error": {"code": REFUSED_CODE, "reason": "privacy-refused: evaluation cap: 20"},
            "records": {},
            "bytes": 0,
            "sha256": "",
            "violations": [],
        },
    )

    # Execute
    report = audit(run)

    # Assert
    found = {(r["source"], r["node"], r["round"], r["kind"]) for r in report["nodes"]["refusals"]}
    assert found == {
        ("privacy-ledger.jsonl", "finance", 3, "train"),
        ("nodes/finance/privacy-ledger.jsonl", "finance", 3, "—"),
        ("egress.jsonl", "ecommerce", 3, "evaluate"),
    }
    evaluation = next(r for r in report["nodes"]["refusals"] if r["kind"] == "evaluate")
    assert evaluation["status"] == "refused" and "evaluation cap" in evaluation["reason"]
    assert "3 refusals listed" in verdict(report, "node-policy")["line"]
    written = write_report(report, tmp_path / "out")
    assert "Refusals (3)" in written["audit.md"].read_text()


# ------------------------------------------------------------------ flags


def test_nodes_that_accepted_a_noise_off_request_fail(tmp_path: Path) -> None:
    # Prepare: a policy that accepts noise off, and a run that asked for it
    run = make_run_dir(tmp_path, policy=NodePolicy(allow_noise_off=True))
    edit_config(run, **{"audit.disable-noise": True})

    # Execute
    report = audit(run)

    # Assert: the verdict fails, and the statement says noise-off requests are accepted
    v = verdict(report, "node-policy")
    assert v["status"] == "fail"
    assert any("accepted a noise-off request" in d for d in v["details"])
    assert any("accepts noise-off requests (allow-noise-off = true)" in d for d in v["details"])
    assert "Noise-off requests (audit.disable-noise) are ACCEPTED" in "\n".join(
        statement(report)["does_not_hold"]
    )
    assert verdict(report, "fault-injection")["status"] == "fail"


def test_a_noise_off_request_every_node_refused_is_a_warning(tmp_path: Path) -> None:
    # Prepare: every node refused every round
    run = make_run_dir(tmp_path, refuse={"ecommerce": {1, 2, 3}, "finance": {1, 2, 3}})
    edit_config(run, **{"audit.disable-noise": True})

    # Execute
    report = audit(run)

    # Assert
    assert verdict(report, "fault-injection")["status"] == "warn"
    assert not any("accepted a noise-off request" in f for f in flags(report))


@pytest.mark.parametrize(
    ("policy", "run_config", "status", "needle"),
    [
        ({"allow_canaries": True}, {"audit.canaries": 10}, "warn", "a canary run"),
        ({"allow_canaries": True}, {}, "warn", "accepts audit canaries"),
        ({"dp_required": False}, {"dp.enabled": False}, "warn", "trained WITHOUT DP"),
        ({"dp_required": False}, {}, "warn", "trains without DP when asked"),
        ({"max_evaluations_per_run": 10**6}, {}, "warn", "effectively unbounded"),
        ({"max_evaluations": 10**6}, {}, "warn", "effectively unbounded"),
        ({"max_evaluations_per_run": 2}, {}, "fail", "3 evaluations in this run, above"),
        ({"secure_noise": False}, {}, "warn", "secure-noise = false"),
    ],
    ids=[
        "canary-run",
        "canaries-allowed",
        "dp-off-run",
        "dp-not-required",
        "per-run-cap-huge",
        "lifetime-cap-huge",
        "more-evaluations-than-the-cap",
        "secure-noise-off",
    ],
)
def test_a_policy_or_run_outside_the_safe_defaults_is_flagged(
    tmp_path: Path, policy: dict[str, Any], run_config: dict[str, Any], status: str, needle: str
) -> None:
    # Prepare
    run = make_run_dir(tmp_path, policy=NodePolicy(**policy))
    edit_config(run, **run_config)

    # Execute
    report = audit(run)

    # Assert
    v = verdict(report, "node-policy")
    assert v["status"] == status, flags(report)
    assert any(f.startswith(status) and needle in f for f in flags(report)), flags(report)


@pytest.mark.parametrize(
    ("source", "status"),
    [("torch-mt19937-os-seed", "warn"), ("torch-mt19937-fixed-seed", "fail")],
)
def test_a_noise_source_other_than_chacha20_is_flagged(
    tmp_path: Path, source: str, status: str
) -> None:
    run = make_run_dir(tmp_path, noise_source=source)

    report = audit(run)

    assert verdict(report, "node-policy")["status"] == status
    assert any(f"noise source {source}" in f for f in flags(report))
    assert SECURE not in "\n".join(statement(report)["holds"])


def test_a_ledger_reset_is_reported_with_its_reason(tmp_path: Path) -> None:
    # Prepare: finance's operator reset its ledger; the run's lines are then written again
    run = make_run_dir(tmp_path)
    folder = run / "nodes" / "finance"
    lines = hashlog.read(folder / LEDGER)
    reset(folder, "finance", "disk lost on 2026-12-04; users re-consented")
    for line in lines:
        NodeLedger(folder / LEDGER, "finance").append(
            {k: v for k, v in line.items() if k not in ("prev", "hash", "node-id", "channel")}
        )

    # Execute
    report = audit(run)

    # Assert
    (found,) = report["nodes"]["resets"]
    assert found["node"] == "finance" and "disk lost" in found["reason"]
    assert verdict(report, "node-policy")["status"] == "warn"
    assert any("ledger RESET" in f and "disk lost" in f for f in flags(report))
    assert verdict(report, "node-ledgers")["status"] == "pass"
    assert "Ledger resets" in write_report(report, tmp_path / "out")["audit.md"].read_text()


# ------------------------------------------------------------------ the worst case


def test_a_lost_round_is_counted_as_spent_in_the_worst_case(tmp_path: Path) -> None:
    # Prepare: finance timed out in round 2; on record it is below the target, with round 2
    # counted at round 1's σ and q it is above
    run = make_run_dir(tmp_path, channels=("finance",), lost={"finance": {2}}, target=3.2)

    # Execute
    report = audit(run)

    # Assert
    finance = report["accounting"]["channels"]["finance"]
    assert finance["history"] == [[1.0, 0.05, 40]]
    assert finance["worst_case"]["events"] == [[1.0, 0.05, 20]]
    assert finance["epsilon_worst_case"] == pytest.approx(
        accounting.epsilon_rdp([(1.0, 0.05, 60)], 1e-5)
    )
    assert finance["epsilon"] < 3.2 < finance["epsilon_worst_case"]
    budget = verdict(report, "budget")
    assert budget["status"] == "warn" and "worst case" in budget["line"]
    assert "round 2 (missing): 20 steps, σ, q of round 1" in budget["details"]
    guarantee = report["statement"]["guarantee"]
    assert guarantee.startswith(f"ε ≤ {finance['epsilon_worst_case']:.3f}")
    assert "1 lost round(s)" in guarantee


def test_a_failed_round_of_a_channel_that_never_trained_uses_the_policy_floor() -> None:
    # Prepare: one failed round, no trained round, σ planned from the target (not fixed)
    lines = [{"round": 1, "channel": "shop", "status": "failed", "steps": 0, "reason": "crash"}]
    config = {"dp.accountant": "rdp", "dp.target-delta": 1e-5, "train.local-steps": 5}

    # Execute
    known = accounting.audit_accounting(lines, config, policy_floor=(2.0, 0.5))
    unknown = accounting.audit_accounting(lines, config)

    # Assert
    shop = known["channels"]["shop"]
    assert shop["epsilon"] == 0.0
    assert shop["worst_case"]["events"] == [[2.0, 0.5, 5]]
    assert shop["epsilon_worst_case"] == pytest.approx(
        accounting.epsilon_rdp([(2.0, 0.5, 5)], 1e-5)
    )
    assert unknown["channels"]["shop"]["epsilon_worst_case"] == float("inf")
    assert known["composed"]["epsilon_worst_case"] == shop["epsilon_worst_case"]


def test_a_refused_round_is_not_counted_in_the_worst_case(tmp_path: Path) -> None:
    run = make_run_dir(tmp_path, channels=("finance",), refuse={"finance": {2}})

    finance = audit(run)["accounting"]["channels"]["finance"]

    assert (
        finance["worst_case"]["events"] == []
        and finance["epsilon_worst_case"] == finance["epsilon"]
    )


# ------------------------------------------------------------------ tampered node ledgers


def _rewrite(path: Path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def _copy_other(run: Path) -> None:
    for name in (LEDGER, "privacy-ledger.head.json"):
        shutil.copy(run / "nodes" / "ecommerce" / name, run / "nodes" / "finance" / name)


TAMPERS: dict[str, tuple[Callable[[Path], None], str]] = {
    "deleted": (lambda p: p.unlink(), "missing, although the node recorded spending"),
    "truncated": (lambda p: _rewrite(p, _lines(p)[:-1]), "truncated"),
    "edited": (
        lambda p: _rewrite(p, [x.replace('"steps": 20', '"steps": 10') for x in _lines(p)]),
        "chain broken",
    ),
    "reordered": (lambda p: _rewrite(p, _lines(p)[::-1]), "chain broken"),
    "other-nodes": (lambda p: _copy_other(p.parent.parent.parent), "another node's ledger"),
    "anchor-deleted": (
        lambda p: p.with_name("privacy-ledger.head.json").unlink(),
        "no anchor",
    ),
}


@pytest.mark.parametrize("tamper", sorted(TAMPERS))
def test_a_tampered_node_ledger_fails_the_audit_as_it_fails_the_node(
    tmp_path: Path, tamper: str
) -> None:
    # Prepare
    run = make_run_dir(tmp_path)
    path = run / "nodes" / "finance" / LEDGER
    change, needle = TAMPERS[tamper]
    change(path)

    # Execute
    report = audit(run)

    # Assert: the audit does not trust it, and neither would the node
    v = verdict(report, "node-ledgers")
    assert v["status"] == "fail" and not report["ok"]
    assert v["details"][0].startswith("nodes/finance/privacy-ledger.jsonl: ")
    assert needle in v["details"][0], v["details"]
    assert report["nodes"]["ledger_checks"]["nodes/ecommerce/privacy-ledger.jsonl"]["status"] == (
        "intact"
    )
    with pytest.raises(LedgerError):
        NodeLedger(path, "finance").check()


def test_a_keyed_anchor_is_checked_with_the_key_the_policy_names(tmp_path: Path) -> None:
    # Prepare: the nodes key their anchors; an attacker without the key cuts finance's last
    # line and re-anchors the shorter ledger
    key = tmp_path / "ledger.key"
    key.write_text("k" * 64)
    run = make_run_dir(tmp_path, policy=NodePolicy(ledger_key=str(key)))
    clean = audit(run)
    path = run / "nodes" / "finance" / LEDGER
    _rewrite(path, _lines(path)[:-1])
    anchor_path = path.with_name("privacy-ledger.head.json")
    anchor = json.loads(anchor_path.read_text())
    anchor.update(head=hashlog.head(path), entries=anchor["entries"] - 1)
    anchor_path.write_text(json.dumps(anchor))

    # Execute
    report = audit(run)
    key.unlink()  # an auditor without the key
    without_key = check_node_ledger(path.parent, "finance", "finance")

    # Assert
    assert verdict(clean, "node-ledgers")["status"] == "pass"
    assert "2 keyed anchors checked" in verdict(clean, "node-ledgers")["line"]
    v = verdict(report, "node-ledgers")
    assert v["status"] == "fail" and "not signed with the node's ledger-key" in v["line"]
    assert without_key["status"] == "intact" and without_key["keyed"]
    assert not without_key["key_checked"]


# ------------------------------------------------------------------ a real run


@pytest.mark.simulation
@pytest.mark.slow
def test_a_real_run_reports_its_nodes_policy_refusals_and_ledgers(tmp_path: Path) -> None:
    # Prepare: Flower's Simulation Engine, 3 channels x 2 rounds; the nodes' policy allows
    # one evaluation per run, so round 2's evaluations are refused
    from fedrec.shared.config import from_run_config
    from fedrec.simulations.flower import run_simulation
    from tests.tiny import save_tiny_bert, write_small_world

    policy = NodePolicy(max_delta=1e-4, max_evaluations_per_run=1)
    run = tmp_path / "run"
    cfg = from_run_config(
        {
            "model.item-prior": "none",
            "num-server-rounds": 2,
            "data-dir": str(write_small_world(tmp_path / "world")),
            "run-dir": str(run),
            "cache-dir": str(tmp_path / "cache"),
            "encoder-dir": str(save_tiny_bert(tmp_path / "bert")),
            "train.local-steps": 2,
            "train.negatives": 20,
            "dp.accountant": "rdp",
            "dp.target-delta": 1e-4,
            "eval.max-users": 50,
            "model.dim": 16,
            "round-timeout": 300.0,
        }
    )
    run_simulation(run, cfg.to_run_config(), 3, node_policy=policy)

    # Execute
    report = audit(run)

    # Assert: the policy every node reported is the file's; each refused its second evaluation
    assert verdict(report, "node-policy")["status"] == "pass", flags(report)
    assert verdict(report, "node-ledgers")["status"] == "pass"
    for ch in cfg.channels:
        node = report["nodes"]["nodes"][ch]
        assert node["policy"] == policy.digest() and node["policy_basis"] == "reported"
        assert node["noise_sources"] == [SECURE] and node["evaluations"] == 1
    refused = [r for r in report["nodes"]["refusals"] if "evaluation cap" in r["reason"]]
    assert {(r["node"], r["source"]) for r in refused} == {
        (ch, src) for ch in cfg.channels for src in ("egress.jsonl", f"nodes/{ch}/{LEDGER}")
    }
    assert "capped at 1 per run and 200" in "\n".join(statement(report)["holds"])

    # Execute / Assert: one node's ledger cut by a line is not trusted
    path = run / "nodes" / cfg.channels[0] / LEDGER
    _rewrite(path, _lines(path)[:-1])
    assert verdict(audit(run), "node-ledgers")["status"] == "fail"
