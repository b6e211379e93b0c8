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
# Reference values, Poisson-subsampled Gaussian at δ = 1e-5, computed with the libraries' own
# accountants: Opacus 1.6 RDPAccountant (default orders; Google dp-accounting's RdpAccountant
# gives the same to 3e-4), Opacus 1.6 PRVAccountant (eps_error 0.01, delta_error δ/1000, its
# upper bound) and dp-accounting 0.6.0 PLDAccountant (value_discretization_interval 1e-4).
A = [(1.1, 0.01, 1000)]  # Opacus RDP 1.7118, Opacus PRV 1.5255, Google PLD 1.5154
E = [(1.0, 0.05, 200)]  # Opacus RDP 5.3676, Google PLD 4.7659


@pytest.mark.parametrize(("history", "expected"), [(A, 1.7118), (E, 5.3676)])
def test_rdp_matches_reference_values(history: list, expected: float) -> None:
    # Execute / Assert (tolerance 1e-3: two RDP computations agreed to 3e-4 on such settings)
    assert epsilon_rdp(history, DELTA) == pytest.approx(expected, abs=1e-3)


@pytest.mark.parametrize(("history", "expected"), [(A, 1.5154), (E, 4.7659)])
def test_pld_matches_reference_values(history: list, expected: float) -> None:
    # Execute / Assert (tolerance 0.02, the audit's PRV-vs-PLD tolerance; same interval 1e-4)
    assert epsilon_pld(history, DELTA) == pytest.approx(expected, abs=0.02)


def test_prv_matches_reference_value() -> None:
    # Source: setting A above, Opacus 1.6 PRVAccountant (eps_error 0.01, upper bound): 1.5255
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
    # Prepare: small settings so the PLD stays fast (RDP was 8.5-14.1 % above PLD on the
    # settings of the reference values)
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


# --- the per-line and per-channel checks of audit_channel, one at a time ----------------------


def test_round_logged_twice_or_out_of_order_is_a_problem() -> None:
    # Execute: rounds 1 and 3 seen so far, the last one 3
    fine = accounting.round_problems(4, {1, 3}, 3)
    twice = accounting.round_problems(3, {1, 3}, 3)
    late = accounting.round_problems(2, {1, 3}, 3)

    # Assert
    assert fine == []
    assert twice == ["round 3 appears twice (several shards? then each line needs a 'shard' field)"]
    assert late == ["round 2 after round 3 (out of order)"]


def test_line_with_another_accountant_or_delta_is_a_problem() -> None:
    # Prepare
    same = {"accountant": "rdp", "delta": 1e-5}
    other = {"accountant": "prv", "delta": 2e-5}

    # Execute / Assert: absent keys mean the run's
    assert accounting.setting_problems(same, "rdp", DELTA) == []
    assert accounting.setting_problems({}, "rdp", DELTA) == []
    assert accounting.setting_problems(other, "rdp", DELTA) == [
        "accountant 'prv' differs from the run's 'rdp'",
        "delta 2e-05 differs from the run's 1e-05",
    ]


def test_spent_line_adds_its_event_or_a_noiseless_one() -> None:
    # Prepare
    line = {"noise-multiplier": 1.0, "sample-rate": 0.05, "steps": 20}

    # Execute
    normal = accounting.spent_event(line)
    dp_off = accounting.spent_event({**line, "dp-enabled": False})
    no_sigma = accounting.spent_event({"sample-rate": 0.05, "steps": 20})
    no_q = accounting.spent_event({"noise-multiplier": 1.0, "steps": 20})
    bad_steps = accounting.spent_event({**line, "steps": -1})

    # Assert: σ = 0 (no noise) where DP was off or σ unknown; q = 1 where q is unknown
    assert normal == ((1.0, 0.05, 20), None)
    assert dp_off == ((0.0, 0.05, 20), None)
    assert no_sigma[0] == (0.0, 0.05, 20) and "counted as no noise" in str(no_sigma[1])
    assert no_q[0] == (0.0, 1.0, 20)
    assert bad_steps == (None, "'steps' must be a non-negative integer. Found -1.")


def test_unspent_round_with_steps_is_a_problem() -> None:
    # Execute / Assert
    assert accounting.unspent_steps_problem("refused", 0) is None
    assert accounting.unspent_steps_problem("failed", 20) == (
        "a failed round logs 20 steps; it should add none "
        "(if the client trained, its ε is missing from this ledger)"
    )


def test_total_steps_must_be_the_sum_so_far() -> None:
    # Execute / Assert: 20 + 20 trained so far
    assert accounting.total_steps_problem(40, 40) is None
    assert accounting.total_steps_problem(None, 40) is None
    assert accounting.total_steps_problem(60, 40) == (
        "total-steps 60 but the trained rounds so far add up to 40"
    )


def test_steps_of_a_lost_round_are_counted_as_spent() -> None:
    # Prepare: round 2 was trained, lost (never aggregated) and trained again: the node's
    # total-steps on the second round 2 line says 60, the ledger's rounds add up to 40. RDP ε
    # after 60 steps at σ = 1, q = 0.05 (Opacus 1.6 RDPAccountant): 3.3681, the node's own.
    lines = _ledger([2.4813, 3.3681], ["trained", "trained"])
    lines[1]["total-steps"] = 60

    # Execute
    out = _audit(lines)

    # Assert: no problem; the lost 20 steps are in the history and ε, with a note
    assert out["problems"] == [], out["problems"]
    assert out["history"] == [[1.0, 0.05, 60]]
    assert out["epsilon"] == pytest.approx(3.3681, abs=1e-4)
    assert any("20 more steps than the rounds on record" in n for n in out["notes"])


@pytest.mark.parametrize(
    ("status", "logged", "recomputed", "expected"),
    [
        # within 1e-3 relative: 2.9702 vs 2.9720 differ by 6e-4 relative
        ("trained", 2.9702, 2.9720, None),
        ("trained", 2.4813, 2.9702, ("problem", "round 2: ledger ε 2.4813 ≠ recomputed 2.9702")),
        # a refusal may log the ε it would have reached, never less than was spent
        ("refused", 2.9702, 2.4813, ("note", "round 2 (refused): ledger ε 2.9702 is above")),
        ("refused", 1.0, 2.4813, ("problem", "round 2: ledger ε 1.0000 ≠ recomputed 2.4813")),
        ("trained", None, 2.4813, ("problem", "trained round without an epsilon")),
        ("refused", None, 2.4813, None),
        ("trained", 2.4813, math.nan, None),  # the recomputation failed: nothing to compare
    ],
)
def test_ledger_epsilon_against_the_recomputation(
    status: str, logged: float | None, recomputed: float, expected: tuple[str, str] | None
) -> None:
    # Execute
    got = accounting.compare_epsilon(2, status, logged, recomputed, accountant="rdp", delta=DELTA)

    # Assert
    if expected is None:
        assert got is None
    else:
        assert got is not None and got[0] == expected[0] and got[1].startswith(expected[1])


def test_round_budget_allows_only_the_guard_slack() -> None:
    # Prepare: the slack is 1e-6 relative: target 2.5 allows up to 2.5000025
    target = 2.5

    # Execute
    inside = accounting.round_budget_violation("finance", 2, 2.5000024, 2.5, target)
    outside = accounting.round_budget_violation("finance", 2, 2.4813, 2.5000026, target)
    unknown = accounting.round_budget_violation("finance", 2, None, math.nan, target)

    # Assert: the larger of logged and recomputed counts
    assert inside is None and unknown is None
    assert outside == "finance: round 2: ε 2.5000 exceeds the target 2.5"


def test_rdp_below_pld_beyond_the_tolerance_is_a_problem() -> None:
    # Prepare: 1e-3 relative tolerance: PLD 1.0005 × 0.999 = 0.9995 ≤ 1.0; 1.002 × 0.999 = 1.001
    # Execute / Assert
    assert accounting.rdp_below_pld_problem("f", eps_rdp=1.0, eps_pld=1.0005) is None
    assert accounting.rdp_below_pld_problem("f", eps_rdp=1.0, eps_pld=1.002) == (
        "f: RDP ε 1.0000 is below PLD ε 1.0020; RDP must be the looser bound"
    )


def test_prv_and_pld_apart_beyond_the_tolerance_is_a_problem() -> None:
    # Prepare: tolerance 0.02 + 1 % of PLD: at PLD 1.0, 0.03
    # Execute / Assert
    assert accounting.prv_pld_problem("f", eps_prv=1.029, eps_pld=1.0) is None
    assert accounting.prv_pld_problem("f", eps_prv=0.971, eps_pld=1.0) is None
    assert accounting.prv_pld_problem("f", eps_prv=1.031, eps_pld=1.0) == (
        "f: PRV ε 1.0310 and PLD ε 1.0000 disagree by more than 0.02 + 1%"
    )


def test_cross_check_runs_prv_check_only_for_prv_and_only_on_finite_epsilons() -> None:
    # Prepare: PRV 1.5 vs PLD 1.0 is far apart; RDP 1.6 ≥ PLD
    # Execute
    prv_run = accounting.cross_check_problems("f", "prv", 1.5, 1.0, 1.6)
    rdp_run = accounting.cross_check_problems("f", "rdp", 1.6, 1.0, 1.6)
    infinite = accounting.cross_check_problems("f", "prv", math.inf, 1.0, math.inf)

    # Assert
    assert len(prv_run) == 1 and "PRV ε 1.5000 and PLD ε 1.0000" in prv_run[0]
    assert rdp_run == [] and infinite == []
