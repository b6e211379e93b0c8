"""Hand-made run directories for the audit, and the report-level checks on them.

:func:`make_run_dir` writes a small run directory the way the server's run writer does (hash-
chained ledger and egress log through ``shared.hashlog``, egress entries through
``shared.wire.build_reply`` + ``describe``), so the audit is tested against the real formats.
Other ``test_audit_*`` modules import it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from fedrec.audit import accounting
from fedrec.audit.report import build_report
from fedrec.client.ledger import NodeLedger
from fedrec.shared import hashlog, wire
from fedrec.shared.policy import NodePolicy, write_policy

PARAM_SHAPES = {"user.weight": [4, 3], "user.bias": [4]}
FAST_PLD = 1e-3  # coarser PLD cross-check in tests: ~10x faster, still an upper bound
DEFAULT_POLICY = NodePolicy()


def _reply_entry(
    rnd: int, channel: str, kind: str, node: int, sigma: float, q: float, steps: int, eps: float
) -> dict[str, Any]:
    shapes = {k: tuple(v) for k, v in PARAM_SHAPES.items()}
    if kind == "train":
        content = wire.build_reply(
            "train",
            param_shapes=shapes,
            arrays={k: np.zeros(v, dtype=np.float32) for k, v in shapes.items()},
            metrics={wire.TRAIN_LOSS: 1.5, wire.NUM_EXAMPLES: 4500},
            privacy={
                wire.EPSILON: eps,
                wire.DELTA: 1e-5,
                wire.NOISE_MULTIPLIER: sigma,
                wire.SAMPLE_RATE: q,
                wire.STEPS: steps,
                wire.ACCOUNTANT: "rdp",
            },
            info={wire.CHANNEL: channel},
        )
    else:
        content = wire.build_reply(
            "evaluate",
            metrics={wire.HR10: 0.25, wire.NDCG10: 0.12, wire.NUM_EXAMPLES: 2000},
            info={wire.CHANNEL: channel},
        )
    return {
        "round": rnd,
        "channel": channel,
        "kind": kind,
        "node": node,
        **wire.describe(content),
        "violations": [],
        "time": "2025-01-01T00:00:00Z",
    }


REFUSED_CODE = 4030  # client.local.REFUSED_CODE


def error_entry(rnd: int, channel: str, node: int, code: int) -> dict[str, Any]:
    """An error reply as server.strategy logs it."""
    return {
        "round": rnd,
        "channel": channel,
        "kind": "train",
        "node": node,
        "error": {
            "code": code,
            "reason": "privacy-refused: budget"
            if code == REFUSED_CODE
            else "Traceback ... ValueError: user 123 has no history",
        },
        "records": {},
        "bytes": 0,
        "sha256": "",
        "violations": [],
        "time": "2025-01-01T00:00:00Z",
    }


def make_run_dir(
    root: Path,
    *,
    channels: tuple[str, ...] = ("ecommerce", "finance"),
    rounds: int = 3,
    sigma: float = 1.0,
    q: float = 0.05,
    steps: int = 20,
    target: float = 8.0,
    refuse: dict[str, set[int]] | None = None,
    nodes: bool = True,
    results: bool = True,
    per_channel: dict[str, tuple[float, float]] | None = None,
    policy: NodePolicy | None = DEFAULT_POLICY,
    lost: dict[str, set[int]] | None = None,
    noise_source: str = "chacha20-os-key",
) -> Path:
    """A small, clean run directory: every channel trains every round unless refused.

    A checkpoint for every round in which some channel trained; without ``results``, the
    ``INCOMPLETE`` marker of a run that stopped early. ``per_channel`` overrides ``(sigma, q)``
    for some channels; ``lost`` rounds of a channel have no reply (``missing``, as the
    server logs a node that timed out). With ``nodes``, each node's ledger is written by the node's own
    :class:`NodeLedger` (identity, anchor) and the nodes held ``policy`` (``node-policy.toml``,
    its digest in every trained line, as a simulation writes them).
    """
    run = root / "run"
    (run / "checkpoints").mkdir(parents=True)
    digest = {}
    if nodes and policy is not None:
        write_policy(run / "node-policy.toml", policy)
        digest = {"policy": policy.digest(), "noise-source": noise_source}
    key = hashlog.load_key(policy.ledger_key) if policy is not None and policy.ledger_key else None
    config = {
        "fedrec_version": "0.1.0",
        "run_config": {
            "dp.target-epsilon": target,
            "dp.target-delta": 1e-5,
            "dp.accountant": "rdp",
            "dp.max-grad-norm": 1.0,
            "dp.grad-sample-mode": "ghost",
            "dp.enabled": True,
            "num-server-rounds": rounds,
            "train.local-steps": steps,
            "train.batch-size": 128,
            "strategy": "fedavg",
            "channels": ",".join(channels),
        },
        "channels": list(channels),
        "started": "2025-01-01T00:00:00Z",
        "versions": {"python": "3.11", "opacus": "1.6.0"},
        "scenario": "test",
    }
    (run / "config.json").write_text(json.dumps(config))
    (run / "model.json").write_text(
        json.dumps({"param_shapes": PARAM_SHAPES, "num_parameters": 16})
    )
    refuse = refuse or {}
    lost = lost or {}
    node = {ch: i for i, ch in enumerate(channels)}
    base = (sigma, q)
    for ch in channels:
        sigma, q = (per_channel or {}).get(ch, base)
        history: list[tuple[float, float, int]] = []
        total = 0
        for rnd in range(1, rounds + 1):
            if rnd in lost.get(ch, set()):
                missing = {"status": "missing", "reason": "no reply this round", "steps": 0}
                hashlog.append(
                    run / "privacy-ledger.jsonl",
                    {"time": "2025-01-01T00:00:00Z", "round": rnd, "channel": ch, **missing},
                )
                continue
            refused = rnd in refuse.get(ch, set())
            if not refused:
                history = accounting.merge_history([*history, (sigma, q, steps)])
                total += steps
            eps = accounting.epsilon_rdp(history, 1e-5)
            # As server.strategy writes it: a refusal is an error reply (code 4030) and a
            # ledger line without a privacy report; a trained line is the client's report.
            if refused:
                line = {
                    "round": rnd,
                    "channel": ch,
                    "status": "refused",
                    "steps": 0,
                    "reason": "privacy-refused: budget",
                }
            else:
                line = {
                    "round": rnd,
                    "channel": ch,
                    "status": "trained",
                    "epsilon": eps,
                    "delta": 1e-5,
                    "noise-multiplier": sigma,
                    "max-grad-norm": 1.0,
                    "sample-rate": q,
                    "steps": steps,
                    "total-steps": total,
                    "accountant": "rdp",
                    "grad-sample-mode": "ghost",
                    "dp-enabled": True,
                    **digest,
                }
            hashlog.append(run / "privacy-ledger.jsonl", {"time": "2025-01-01T00:00:00Z", **line})
            if nodes:
                NodeLedger(run / "nodes" / ch / "privacy-ledger.jsonl", ch, key).append(
                    {
                        "run": str(run),
                        "round": rnd,
                        "steps": 0 if refused else steps,
                        "noise-multiplier": sigma,
                        "sample-rate": q,
                        "epsilon": eps,
                        "delta": 1e-5,
                        "accountant": "rdp",
                        "history": [list(h) for h in history],
                        "status": "refused" if refused else "trained",
                        **({} if refused else digest),
                    },
                )
            if refused:
                hashlog.append(run / "egress.jsonl", error_entry(rnd, ch, node[ch], REFUSED_CODE))
            else:
                hashlog.append(
                    run / "egress.jsonl",
                    _reply_entry(rnd, ch, "train", node[ch], sigma, q, steps, eps),
                )
            hashlog.append(
                run / "egress.jsonl",
                _reply_entry(rnd, ch, "evaluate", node[ch], sigma, q, steps, eps),
            )
            with (run / "metrics.jsonl").open("a") as fh:
                fh.write(
                    json.dumps(
                        {
                            "round": rnd,
                            "channel": ch,
                            "phase": "evaluate",
                            "metrics": {"hr@10": 0.25, "num-examples": 2000},
                        }
                    )
                    + "\n"
                )

    def status(ch: str, rnd: int) -> str:
        if rnd in lost.get(ch, set()):
            return "missing"
        return "refused" if rnd in refuse.get(ch, set()) else "ok"

    for rnd in range(1, rounds + 1):  # as server.strategy: a round with a kept reply
        if any(status(ch, rnd) == "ok" for ch in channels):
            (run / "checkpoints" / f"round-{rnd:04d}.safetensors").write_bytes(b"")
    if results:
        (run / "results.json").write_text(
            json.dumps(
                {
                    "rounds_completed": rounds,
                    "resumed_after": 0,
                    "round_status": {
                        str(rnd): {ch: status(ch, rnd) for ch in channels}
                        for rnd in range(1, rounds + 1)
                    },
                    "channels": {ch: {} for ch in channels},
                    "log_heads": {
                        name: hashlog.head(run / name)
                        for name in ("privacy-ledger.jsonl", "egress.jsonl")
                    },
                    "wall_seconds": 1.0,
                }
            )
        )
    else:  # the server's marker of a run that stopped before writing results.json
        (run / "INCOMPLETE").write_text("started 2025-01-01T00:00:00Z; this run has not finished\n")
    return run


def rewrite_line(path: Path, index: int, change: dict[str, Any] | None) -> None:
    """Edit (``change``) or remove (``None``) line ``index`` without re-chaining: tampering."""
    lines = path.read_text().splitlines()
    if change is None:
        del lines[index]
    else:
        lines[index] = json.dumps({**json.loads(lines[index]), **change}, sort_keys=True)
    path.write_text("\n".join(lines) + "\n")


def verdicts(report: dict[str, Any]) -> dict[str, str]:
    return {v["name"]: v["status"] for v in report["verdicts"]}


def test_clean_run_dir_passes(tmp_path: Path) -> None:
    # Prepare
    run = make_run_dir(tmp_path)

    # Execute
    report = build_report(run, pld_interval=FAST_PLD)

    # Assert
    assert report["ok"], report["verdicts"]
    assert verdicts(report) == {
        "logs": "pass",
        "accounting": "pass",
        "budget": "pass",
        "egress": "pass",
        "evidence": "pass",
        "node-policy": "pass",
        "node-ledgers": "pass",
        "empirical": "skip",
    }
    assert report["egress"]["replies"] == 2 * 3 * 2
    finance = report["accounting"]["channels"]["finance"]
    assert finance["history"] == [[1.0, 0.05, 60]]
    assert finance["rounds_trained"] == 3


def test_refused_round_adds_nothing_and_is_reported(tmp_path: Path) -> None:
    # Prepare
    run = make_run_dir(tmp_path, refuse={"finance": {3}})

    # Execute
    report = build_report(run, pld_interval=FAST_PLD)

    # Assert
    finance = report["accounting"]["channels"]["finance"]
    assert report["ok"]
    assert finance["history"] == [[1.0, 0.05, 40]]
    assert finance["rounds_refused"] == [3]
    assert finance["budget"]["any_refused"] is True
    assert "refused rounds: finance [3]" in report["verdicts"][2]["line"]


def test_edited_ledger_value_is_detected(tmp_path: Path) -> None:
    # Prepare: under-report ε on one line without re-chaining
    run = make_run_dir(tmp_path)
    rewrite_line(run / "privacy-ledger.jsonl", 1, {"epsilon": 0.1})

    # Execute
    report = build_report(run, pld_interval=FAST_PLD)

    # Assert
    v = verdicts(report)
    assert not report["ok"]
    assert v["logs"] == "fail" and v["accounting"] == "fail"
    assert "entry modified" in report["logs"]["privacy-ledger.jsonl"]["problem"]


def test_node_ledger_disagreeing_with_server_ledger_is_detected(tmp_path: Path) -> None:
    # Prepare: the client's own ledger says more steps than the server's ledger accounts for
    run = make_run_dir(tmp_path, channels=("finance",))
    path = run / "nodes" / "finance" / "privacy-ledger.jsonl"
    entries = hashlog.read(path)
    path.unlink()
    for e in entries:
        e = {k: v for k, v in e.items() if k not in ("prev", "hash")}
        e["history"] = [[1.0, 0.05, h[2] + 5] for h in e["history"]]
        hashlog.append(path, e)

    # Execute
    report = build_report(run, pld_interval=FAST_PLD)

    # Assert
    assert verdicts(report)["accounting"] == "fail"
    assert any("differs from the one reconstructed" in p for p in report["accounting"]["problems"])


def test_crashed_run_without_results_or_nodes_is_reported_not_crashed(tmp_path: Path) -> None:
    # Prepare: a deployment-like run that stopped before results.json and metrics.jsonl
    run = make_run_dir(tmp_path, nodes=False, results=False)
    (run / "metrics.jsonl").unlink()

    # Execute
    report = build_report(run, pld_interval=FAST_PLD)

    # Assert
    v = verdicts(report)
    assert report["ok"]
    assert v["logs"] == "warn"  # chains intact, tails unverifiable
    assert set(report["files"]["missing"]) == {"metrics.jsonl", "results.json"}
    assert report["files"]["nodes"] is None


def test_empty_run_dir_fails_closed_without_crashing(tmp_path: Path) -> None:
    # Prepare
    (tmp_path / "run").mkdir()

    # Execute
    report = build_report(tmp_path / "run", pld_interval=FAST_PLD)

    # Assert
    v = verdicts(report)
    assert not report["ok"]
    assert v["accounting"] == "fail" and v["egress"] == "fail" and v["logs"] == "fail"


def test_budget_exceeded_is_a_violation(tmp_path: Path) -> None:
    # Prepare: q=0.05, σ=1 gives RDP ε 2.48 after 20 steps, 2.97 after 40 (Opacus RDP): the
    # second round crosses the target 2.9 and the ledger shows it (a guard that failed)
    run = make_run_dir(tmp_path, channels=("finance",), target=2.9)

    # Execute
    report = build_report(run, pld_interval=FAST_PLD)

    # Assert
    assert verdicts(report)["budget"] == "fail"
    assert report["accounting"]["channels"]["finance"]["budget"]["exceeded"] is True


def test_empirical_bound_above_claim_contradicts_guarantee(tmp_path: Path) -> None:
    # Prepare: perfectly separable canaries give ε_LB 4.19 at m = r = 200 (the one-run ceiling
    # at δ = 1e-5, p = 0.05: every guess right), above the claimed 0.5; random scores give
    # about 0, below the channel's ε
    run = make_run_dir(tmp_path, channels=("finance",))
    included = np.arange(200) % 2 == 0
    scores = included.astype(float) + np.linspace(0, 0.1, 200)
    noise = np.random.default_rng(0).normal(size=200)
    empirical = {
        "canaries": {
            "method": "one-run",
            "scores": scores,
            "included": included,
            "k_pos": [100],
            "k_neg": [100],
            "epsilon_theory": 0.5,
        },
        "ok-claim": {
            "method": "one-run",
            "scores": noise,
            "included": included,
            "k_pos": [20],
            "k_neg": [20],
            "channel": "finance",
        },
    }

    # Execute
    report = build_report(run, empirical, pld_interval=FAST_PLD)

    # Assert
    emp = report["empirical"]
    assert emp["canaries"]["status"] == "fail"
    assert abs(emp["canaries"]["epsilon_lb"] - 4.188) < 1e-3
    assert emp["ok-claim"]["status"] == "pass"
    assert emp["ok-claim"]["epsilon_lb"] < emp["ok-claim"]["epsilon_theory"]
    assert verdicts(report)["empirical"] == "fail"


def test_malformed_empirical_spec_is_reported_not_raised(tmp_path: Path) -> None:
    # Prepare
    run = make_run_dir(tmp_path, channels=("finance",), rounds=1)

    # Execute
    report = build_report(run, {"bad": {"method": "lira"}}, pld_interval=FAST_PLD)

    # Assert
    assert report["empirical"]["bad"]["status"] == "warn"
    assert "method must be one-run, mia or canary-cosine" in report["empirical"]["bad"]["line"]


def test_crash_reply_with_free_text_reason_is_a_warning(tmp_path: Path) -> None:
    # Prepare: one client crashed; its error reason (free text) reached the server
    run = make_run_dir(tmp_path, channels=("finance",), rounds=1, results=False)
    hashlog.append(run / "egress.jsonl", error_entry(2, "finance", 0, 1))
    failed = {"round": 2, "channel": "finance", "status": "failed", "reason": "...", "steps": 0}
    hashlog.append(run / "privacy-ledger.jsonl", failed)  # as server.strategy logs it

    # Execute
    report = build_report(run, pld_interval=FAST_PLD)

    # Assert
    egress_verdict = next(v for v in report["verdicts"] if v["name"] == "egress")
    assert egress_verdict["status"] == "warn"
    assert "free-text" in egress_verdict["line"]
    assert report["ok"]
