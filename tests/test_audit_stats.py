"""Empirical audit statistics: numbers checkable by hand or against a cited source."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedrec.audit import stats


def test_one_run_sanity_delta_zero() -> None:
    # Source: Steinke et al. 2023's test with δ = 0: r = v = 100 guesses right at p = 0.05
    # reject ε while q_ε^100 < 0.05 (q_ε = e^ε / (1 + e^ε)), so ε = ln(q/(1-q)) with
    # q = 0.05^(1/100), i.e. 3.493
    q = 0.05 ** (1 / 100)

    # Execute
    eps = stats.one_run_ceiling(100, 100, 0.0, 0.05)

    # Assert
    assert eps == pytest.approx(math.log(q / (1 - q)), abs=1e-6)
    assert eps == pytest.approx(3.493, abs=1e-3)


@pytest.mark.parametrize(("m", "r", "expected"), [(1000, 100, 3.47), (1000, 1000, 5.78)])
def test_one_run_ceiling_matches_reference_values(m: int, r: int, expected: float) -> None:
    # Source: a separate implementation of the p-value in the paper's appendix code (scipy
    # binom, a loop over i, binary search on ε), δ = 1e-5, p = 0.05, all r guesses right:
    # m = 1000 gives 3.47 at r = 100 and 5.78 at r = 1000
    assert stats.one_run_ceiling(m, r, 1e-5) == pytest.approx(expected, abs=0.01)


def test_p_value_of_no_correct_guess_is_one() -> None:
    assert stats.p_value_one_run(100, 10, 0, 1.0, 1e-5) == 1.0


def test_p_value_increases_with_epsilon() -> None:
    # A larger ε makes the observed success more plausible under the null
    ps = [stats.p_value_one_run(1000, 100, 80, e, 1e-5) for e in (0.5, 1.0, 2.0)]
    assert ps[0] < ps[1] < ps[2]


def test_one_run_guesses_counts_by_hand() -> None:
    # Prepare: top 2 scores are canaries 3 (in) and 0 (out); bottom 1 is canary 2 (out)
    scores = [0.9, 0.1, -1.0, 2.0]
    included = [False, True, False, True]

    # Execute
    r, v = stats.one_run_guesses(scores, included, k_pos=2, k_neg=1)

    # Assert: guesses in(3) right, in(0) wrong, out(2) right
    assert (r, v) == (3, 2)


def test_bonferroni_lowers_the_bound() -> None:
    # Prepare: perfectly separated canaries
    inc = np.arange(200) % 2 == 0
    scores = inc.astype(float)

    # Execute
    one = stats.one_run_audit(scores, inc, [50], [50], 1e-5)["epsilon_lb"]
    two = stats.one_run_audit(scores, inc, [50, 10], [50, 10], 1e-5)["epsilon_lb"]

    # Assert: same best guess, tested at p/2 instead of p
    assert 0 < two < one


def test_random_scores_give_no_evidence() -> None:
    # Prepare
    rng = np.random.default_rng(0)
    inc = rng.random(1000) < 0.5
    scores = rng.normal(size=1000)

    # Execute
    eps = stats.one_run_audit(scores, inc, [50, 100], [50, 100], 1e-5)["epsilon_lb"]

    # Assert
    assert eps < 0.3


def test_auc_by_hand() -> None:
    # Pairs (in, out): (1,2) loses twice, (3,2) wins twice → 2/4; ties count ½
    assert stats.auc([1.0, 3.0], [2.0, 2.0]) == 0.5
    assert stats.auc([3.0, 4.0], [1.0, 2.0]) == 1.0
    assert stats.auc([2.0], [2.0]) == 0.5
    assert stats.auc([1.0, 3.0, 5.0], [2.0, 4.0]) == pytest.approx(3 / 6)


def test_roc_curve_by_hand() -> None:
    # Execute
    fpr, tpr, thr = stats.roc_curve([3.0, 1.0], [2.0, 0.0])

    # Assert: thresholds ∞, 3, 2, 1, 0
    assert thr.tolist() == [math.inf, 3.0, 2.0, 1.0, 0.0]
    assert tpr.tolist() == [0.0, 0.5, 0.5, 1.0, 1.0]
    assert fpr.tolist() == [0.0, 0.0, 0.5, 0.5, 1.0]


def test_tpr_at_low_fpr_by_hand() -> None:
    # Prepare: 1000 non-members 0..999; members 995..1004: at FPR ≤ 1 % (τ = 990, 10 out-scores
    # ≥ τ) all 10 members are caught; at FPR ≤ 0.1 % (τ = 999) only 999, 1000..1004 → 6
    out = np.arange(1000, dtype=float)
    inn = np.arange(995, 1005, dtype=float)

    # Execute / Assert
    assert stats.tpr_at_fpr(inn, out, 0.01) == 1.0
    assert stats.tpr_at_fpr(inn, out, 0.001) == pytest.approx(0.6)


def test_epsilon_from_rates_by_hand() -> None:
    # Kairouz et al. 2015: TPR 0.5, FPR 0.05, δ = 0 → ε ≥ ln(0.5/0.05) = ln 10
    assert stats.epsilon_from_rates(0.5, 0.05, 0.0) == pytest.approx(math.log(10))
    assert stats.epsilon_from_rates(0.05, 0.05, 0.0) == 0.0


def test_clopper_pearson_zero_successes() -> None:
    # Exact: upper bound for 0/10 at one-sided 5 % is 1 - 0.05^(1/10) = 0.2589
    lo, hi = stats.clopper_pearson(0, 10, 0.05)
    assert lo == 0.0
    assert hi == pytest.approx(1 - 0.05 ** (1 / 10))


def test_mia_bound_is_zero_for_identical_distributions() -> None:
    # Prepare
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=2000), rng.normal(size=2000)

    # Execute
    out = stats.mia_audit(a, b, 1e-5)

    # Assert
    assert out["epsilon_lb"] == 0.0
    assert [row["fpr_target"] for row in out["at"]] == [0.01, 0.001]


def test_gdp_epsilon_matches_opacus_conversion() -> None:
    # Source: Opacus opacus.accountants.analysis.gdp.eps_from_mu (Dong, Roth, Su 2022):
    # μ = 1, δ = 1e-5 → 4.3772
    assert stats.gdp_epsilon(1.0, 1e-5) == pytest.approx(4.377178, abs=1e-5)


def test_gdp_delta_inverts_gdp_epsilon() -> None:
    eps = stats.gdp_epsilon(2.0, 1e-6)
    assert stats.gdp_delta(eps, 2.0) == pytest.approx(1e-6, rel=1e-6)


def test_canary_cosines_well_separated_give_large_epsilon() -> None:
    # Prepare: inserted canaries sit 5 null standard deviations above the null cosines
    rng = np.random.default_rng(2)
    cos_out = rng.normal(0.0, 0.01, 1000)
    cos_in = rng.normal(0.05, 0.01, 1000)

    # Execute
    out = stats.canary_cosine_audit(cos_in, cos_out, 1e-5)

    # Assert: μ ≈ 5 → ε ≈ 31 (μ-GDP at δ = 1e-5)
    assert out["mu"] == pytest.approx(5.0, abs=0.3)
    assert stats.epsilon_from_canary_cosines(cos_in, cos_out, 1e-5) == out["epsilon"] > 20


def test_canary_cosines_identical_give_zero_epsilon() -> None:
    # Prepare
    cos = np.random.default_rng(3).normal(0.0, 0.01, 500)

    # Execute / Assert
    assert stats.epsilon_from_canary_cosines(cos, cos, 1e-5) == 0.0


def test_canary_cosines_same_distribution_give_small_epsilon() -> None:
    # Prepare: two samples of the same distribution
    rng = np.random.default_rng(4)
    eps = stats.epsilon_from_canary_cosines(
        rng.normal(0, 0.01, 1000), rng.normal(0, 0.01, 1000), 1e-5
    )

    # Assert: sampling noise alone: μ ≈ ±0.045, ε well under 0.5
    assert eps < 0.5
