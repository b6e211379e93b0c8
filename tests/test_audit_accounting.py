"""Accounting for the audit: published vectors, invariants, ledger reconstruction."""

from __future__ import annotations

import math

import pytest

from fedrec.audit import accounting
from fedrec.audit.accounting import (
    audit_channel,
    composed_worst_case,
    epsilon_pld,
    epsilon_prv,
    epsilon_rdp,
    merge_history,
)

DELTA = 1e-5
# research/privacy.md §4 table ([run]: Opacus 1.6 RDP, dp-accounting 0.6.0 PLD at 1e-4)
A = [(1.1, 0.01, 1000)]  # Opacus RDP 1.7118, Opacus PRV 1.5255, Google PLD 1.5154
E = [(1.0, 0.05, 200)]  # Opacus RDP 5.3676, Google PLD 4.7659


@pytest.mark.parametrize(("history", "expected"), [(A, 1.7118), (E, 5.3676)])
def test_rdp_matches_privacy_md_table(history: list, expected: float) -> None:
    # Execute / Assert (tolerance 1e-3, privacy.md §4 "Suggested test tolerances")
    assert epsilon_rdp(history, DELTA) == pytest.approx(expected, abs=1e-3)


@pytest.mark.parametrize(("history", "expected"), [(A, 1.5154), (E, 4.7659)])
def test_pld_matches_privacy_md_table(history: list, expected: float) -> None:
    # Execute / Assert (tolerance 0.02, privacy.md §4)
    assert epsilon_pld(history, DELTA) == pytest.approx(expected, abs=0.02)


def test_prv_matches_privacy_md_table() -> None:
    # Source: privacy.md §4 row A, Opacus PRV column (eps_error 0.01): 1.5255
    assert epsilon_prv(A, DELTA) == pytest.approx(1.5255, abs=1e-3)


def test_rdp_matches_opacus_own_test_vector() -> None:
    # Source: opacus/tests/accountants_test.py::test_rdp_accountant (Opacus 1.6): σ = 1.5,
    # q = 0.04, steps = int(90 / 0.04) = 2250, δ = 1e-5 → 7.32911117143
    assert epsilon_rdp([(1.5, 0.04, 2250)], DELTA) == pytest.approx(7.32911117143, abs=1e-9)


def test_rdp_equals_opacus_accountant_on_a_mixed_history() -> None:
    # Prepare: our cached one-step RDP must give exactly what RDPAccountant gives
    from opacus.accountants import RDPAccountant

    history = [(1.0, 0.05, 20), (1.2, 0.04, 30), (1.0, 0.05, 5)]
    acc = RDPAccountant()
    acc.history = list(history)

    # Execute / Assert
    assert epsilon_rdp(history, DELTA) == acc.get_epsilon(DELTA)


def test_rdp_is_at_least_pld() -> None:
    # Prepare: small settings so the PLD stays fast; RDP is 8-14 % above PLD (privacy.md §4)
    for history in ([(1.0, 0.05, 20)], [(2.0, 0.01, 100)], [(0.8, 0.1, 10)]):
        # Execute
        rdp, pld = epsilon_rdp(history, DELTA), epsilon_pld(history, DELTA, interval=1e-3)

        # Assert
        assert rdp >= pld > 0


@pytest.mark.parametrize("fn", [epsilon_rdp, epsilon_prv, epsilon_pld])
def test_no_noise_gives_infinite_epsilon(fn) -> None:
    assert fn([(0.0, 0.01, 10)], DELTA) == math.inf


@pytest.mark.parametrize("fn", [epsilon_rdp, epsilon_prv, epsilon_pld])
def test_empty_history_spends_nothing(fn) -> None:
    assert fn([], DELTA) == 0.0


def test_invalid_delta_is_refused_with_the_value() -> None:
    with pytest.raises(ValueError, match="Found 1.5"):
        epsilon_rdp(A, 1.5)


def test_merge_history_merges_consecutive_equal_events_like_opacus() -> None:
    # Prepare
    events = [(1.0, 0.05, 20), (1.0, 0.05, 20), (1.1, 0.05, 20), (1.0, 0.05, 0), (1.0, 0.05, 5)]

    # Execute / Assert
    assert merge_history(events) == [(1.0, 0.05, 40), (1.1, 0.05, 20), (1.0, 0.05, 5)]


def test_composition_across_channels_between_max_and_sum() -> None:
    # Prepare: three channels with different (σ, q)
    histories = {
        "ecommerce": [(1.0, 0.05, 40)],
        "finance": [(1.2, 0.04, 40)],
        "social": [(0.9, 0.02, 40)],
    }

    # Execute
    out = composed_worst_case(histories, DELTA, "rdp", pld_interval=1e-3)

    # Assert
    assert out["max_single"] < out["epsilon"] < out["naive_sum"]
    assert out["epsilon_pld"] <= out["epsilon"]


def _ledger(
    epsilons: list[float], statuses: list[str], sigma: float = 1.0, q: float = 0.05
) -> list[dict]:
    total, lines = 0, []
    for i, (eps, status) in enumerate(zip(epsilons, statuses, strict=True), start=1):
        steps = 20 if status in ("trained", "rejected") else 0
        total += steps
        lines.append(
            {
                "round": i,
                "channel": "finance",
                "status": status,
                "epsilon": eps,
                "delta": DELTA,
                "noise-multiplier": sigma,
                "sample-rate": q,
                "steps": steps,
                "total-steps": total,
                "accountant": "rdp",
                "dp-enabled": True,
                "max-grad-norm": 1.0,
                "grad-sample-mode": "ghost",
            }
        )
    return lines


def _audit(lines: list[dict], target: float = 8.0) -> dict:
    return audit_channel(
        "finance", lines, accountant="rdp", delta=DELTA, target_epsilon=target, pld_interval=1e-3
    )


def test_consistent_ledger_has_no_problems() -> None:
    # Prepare: RDP ε after 20 and 40 steps at σ = 1, q = 0.05 (Opacus): 2.4813, 2.9702
    lines = _ledger([2.4813, 2.9702], ["trained", "trained"])

    # Execute
    out = _audit(lines)

    # Assert
    assert out["problems"] == [] and out["violations"] == []
    assert out["history"] == [[1.0, 0.05, 40]]
    assert out["epsilon"] == pytest.approx(2.9702, abs=1e-4)


def test_under_reported_epsilon_is_a_problem() -> None:
    # Prepare: the second round claims the first round's ε
    lines = _ledger([2.4813, 2.4813], ["trained", "trained"])

    # Execute
    out = _audit(lines)

    # Assert
    assert len(out["problems"]) == 1
    assert "round 2: ledger ε 2.4813 ≠ recomputed 2.9702" in out["problems"][0]


def test_refused_round_adds_no_steps() -> None:
    # Prepare
    lines = _ledger([2.4813, 2.4813, 2.9702], ["trained", "refused", "trained"])

    # Execute
    out = _audit(lines)

    # Assert
    assert out["problems"] == []
    assert out["rounds_refused"] == [2]
    assert out["total_steps"] == 40


def test_epsilon_above_target_is_a_violation() -> None:
    # Prepare
    lines = _ledger([2.4813, 2.9702], ["trained", "trained"])

    # Execute
    out = _audit(lines, target=2.5)

    # Assert
    assert out["budget"]["exceeded"] is True
    assert out["violations"] == ["finance: round 2: ε 2.9702 exceeds the target 2.5"]


def test_training_without_dp_gives_infinite_epsilon_and_violation() -> None:
    # Prepare
    lines = _ledger([2.4813, math.inf], ["trained", "trained"])
    lines[1]["dp-enabled"] = False

    # Execute
    out = _audit(lines)

    # Assert
    assert out["epsilon"] == math.inf
    assert not out["dp_enabled"]
    assert any("without DP" in v for v in out["violations"])


def test_not_protected_names_counts_metrics_and_dp_off_channels() -> None:
    # Execute
    items = accounting.not_protected({"dp.enabled": True}, {"social": {"dp_enabled": False}})

    # Assert
    text = " ".join(items)
    assert "social" in items[0]
    assert "num-examples" in text and "Evaluation metrics" in text and "timing" in text


def test_refusal_may_log_the_would_be_epsilon_but_not_less_than_spent() -> None:
    # Prepare: round 2 refused; its line logs the ε it would have reached (2.9702) — allowed;
    # round 3 refused logging less than the 2.4813 already spent — under-reporting
    lines = _ledger([2.4813, 2.9702, 1.0], ["trained", "refused", "refused"])

    # Execute
    out = _audit(lines)

    # Assert
    assert len(out["notes"]) == 1 and "would have reached" in out["notes"][0]
    assert len(out["problems"]) == 1 and "round 3" in out["problems"][0]


def test_prv_run_is_recomputed_with_prv_and_cross_checked_with_rdp_and_pld() -> None:
    # Prepare: a ledger written by a PRV run (ε from Opacus PRV, as the client computes it)
    eps1 = epsilon_prv([(1.0, 0.05, 20)], DELTA)
    eps2 = epsilon_prv([(1.0, 0.05, 40)], DELTA)
    lines = _ledger([eps1, eps2], ["trained", "trained"])
    for line in lines:
        line["accountant"] = "prv"

    # Execute
    out = audit_channel(
        "finance", lines, accountant="prv", delta=DELTA, target_epsilon=8.0, pld_interval=1e-3
    )

    # Assert
    assert out["problems"] == []
    assert out["cross_check"] == "pld, rdp"
    assert out["epsilon_pld"] <= out["epsilon"] + 0.02 <= out["epsilon_rdp"] + 0.02


def test_rejected_round_spends_and_failed_round_does_not() -> None:
    # Prepare: round 2's reply was trained but rejected at egress; round 3's client crashed
    lines = _ledger([2.4813, 2.9702, 2.9702], ["trained", "rejected", "failed"])

    # Execute
    out = _audit(lines)

    # Assert
    assert out["problems"] == []
    assert out["total_steps"] == 40
    assert out["rounds_rejected"] == [2] and out["rounds_missing"] == [3]


def test_shards_are_audited_separately_and_composed_by_worst_shard() -> None:
    # Prepare: finance has two shards (disjoint users); shard 1 trained one round less
    shard0 = _ledger([2.4813, 2.9702], ["trained", "trained"])
    shard1 = _ledger([2.4813], ["trained"])
    for line in shard0:
        line["shard"] = 0
    for line in shard1:
        line["shard"] = 1
    config = {"dp.accountant": "rdp", "dp.target-delta": DELTA, "dp.target-epsilon": 8.0}

    # Execute
    out = accounting.audit_accounting(shard0 + shard1, config, pld_interval=1e-3)

    # Assert: parallel composition inside a channel: the worst shard, not the sum
    assert sorted(out["channels"]) == ["finance-0", "finance-1"]
    assert out["problems"] == []
    assert out["composed"]["epsilon"] == pytest.approx(2.9702, abs=1e-4)
