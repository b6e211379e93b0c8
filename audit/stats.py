"""Empirical privacy audit statistics: pure functions over canary scores.

Owns: the one-run audit of Steinke, Nasr and Jagielski (2023), membership-inference metrics
(ROC, AUC, TPR at low FPR) with the ε they imply under DP (Kairouz, Oh, Viswanath 2015) and
Clopper–Pearson confidence, and the Gaussian canary-cosine estimator of Andrew et al. (2024)
with the μ-GDP → (ε, δ) conversion of Dong, Roth, Su (2022). Each function names its source
and formula.

Convention: a higher score means "more likely a member / included".

Must not: import ``server/`` or ``client/``; do I/O; train or inject canaries (the trainer
does, and passes the scores here).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from scipy import stats as sps

EPS_SEARCH_MAX = 100.0  # ε beyond this is "unbounded" for every audit here


def _bisect_largest(pred: Callable[[float], bool], lo: float, hi: float, iters: int = 60) -> float:
    """Largest x in [lo, hi] with ``pred(x)`` true, for ``pred`` true below and false above."""
    if not pred(lo):
        return lo
    if pred(hi):
        return hi
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if pred(mid):
            lo = mid
        else:
            hi = mid
    return lo


# --- One-run audit ------------------------------------------------------------------------


def p_value_one_run(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """P-value of ``v`` correct guesses out of ``r`` under the null "M is (ε, δ)-DP".

    Steinke, Nasr, Jagielski, "Privacy Auditing with One (1) Training Run", NeurIPS 2023,
    Theorem 3.1 / Proposition 5.2 as in the paper's appendix code and in
    ``jax_privacy.auditing`` (``_one_run_p_value``)::

        q = e^ε / (1 + e^ε)
        β = P[Bin(r, q) ≥ v]
        α = max_{1 ≤ i ≤ v} (1/i) · P[v − i ≤ Bin(r, q) < v]
        p = min(β + 2·m·δ·α, 1)

    Args:
        m: number of canaries (each included with probability 1/2).
        r: number of guesses made (abstentions excluded).
        v: number of correct guesses.
        eps: ε of the null hypothesis.
        delta: δ of the null hypothesis.
    """
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m. Found m={m}, r={r}, v={v}.")
    q = 1.0 / (1.0 + math.exp(-eps))
    beta = float(sps.binom.sf(v - 1, r, q))
    alpha = 0.0
    if v > 0 and delta > 0:
        # pmf(v-1), pmf(v-2), ..., pmf(0): running sums over i are P[v-i <= Bin < v]
        cum = np.cumsum(sps.binom.pmf(np.arange(v - 1, -1, -1), r, q))
        alpha = float(np.max(cum / np.arange(1, v + 1)))
    return min(beta + alpha * delta * 2 * m, 1.0)


def epsilon_one_run(m: int, r: int, v: int, delta: float, p: float = 0.05) -> float:
    """Largest ε that ``v`` correct of ``r`` guesses rejects at level ``p`` (0 if none).

    Bisection on :func:`p_value_one_run`, which increases with ε (Steinke et al. 2023, §5).
    """
    return _bisect_largest(lambda e: p_value_one_run(m, r, v, e, delta) < p, 0.0, EPS_SEARCH_MAX)


def one_run_ceiling(m: int, r: int, delta: float, p: float = 0.05) -> float:
    """The most ε that ``m`` canaries with ``r`` guesses can certify: all ``r`` guesses right.

    Steinke et al. 2023, §6 (the bound saturates with m). For δ = 0, r = 100, p = 0.05 it is
    ln(q / (1 − q)) with q = 0.05^(1/100), i.e. 3.493.
    """
    return epsilon_one_run(m, r, r, delta, p)


def one_run_guesses(
    scores: Sequence[float] | np.ndarray,
    included: Sequence[bool] | np.ndarray,
    k_pos: int,
    k_neg: int,
) -> tuple[int, int]:
    """Guess "included" for the ``k_pos`` highest scores and "excluded" for the ``k_neg``
    lowest, abstain on the rest; return ``(r, v)`` = (guesses, correct guesses).

    Ties are broken by position (stable sort), never by the truth.
    """
    s = np.asarray(scores, dtype=float)
    inc = np.asarray(included, dtype=bool)
    if s.shape != inc.shape or s.ndim != 1:
        raise ValueError(
            f"scores and included must be 1-d of equal length. Found {s.shape}, {inc.shape}."
        )
    if k_pos < 0 or k_neg < 0 or k_pos + k_neg > len(s):
        raise ValueError(f"need 0 <= k_pos + k_neg <= m={len(s)}. Found ({k_pos}, {k_neg}).")
    order = np.argsort(-s, kind="stable")
    v = int(inc[order[:k_pos]].sum())
    if k_neg:
        v += int((~inc[order[len(s) - k_neg :]]).sum())
    return k_pos + k_neg, v


def one_run_audit(
    scores: Sequence[float] | np.ndarray,
    included: Sequence[bool] | np.ndarray,
    k_pos_list: Sequence[int],
    k_neg_list: Sequence[int],
    delta: float,
    p: float = 0.05,
) -> dict[str, Any]:
    """One-run ε lower bound at confidence 1 − p, Bonferroni over pre-registered guesses.

    Steinke, Nasr, Jagielski 2023 (one training run, m canaries each included with
    probability 1/2). ``k_pos_list[j]`` and ``k_neg_list[j]`` form the j-th pre-registered
    guess (k₊, k₋); each is tested at level p / n (Bonferroni, as
    ``jax_privacy.auditing.epsilon_one_run`` does by default) and the largest bound is kept.
    The bound is valid for any (ε, δ)-DP training run.

    Returns:
        ``{"epsilon_lb", "k_pos", "k_neg", "r", "v", "m", "p", "p_per_test", "tests",
        "ceiling"}`` where ``ceiling`` is :func:`one_run_ceiling` for the largest r at
        p / n: the most this audit could have certified.
    """
    if len(k_pos_list) != len(k_neg_list) or not k_pos_list:
        raise ValueError(
            "k_pos_list and k_neg_list must be non-empty and pair up. Found lengths "
            f"{len(k_pos_list)}, {len(k_neg_list)}."
        )
    m = len(np.asarray(scores))
    level = p / len(k_pos_list)
    tests = []
    for kp, kn in zip(k_pos_list, k_neg_list, strict=True):
        r, v = one_run_guesses(scores, included, int(kp), int(kn))
        eps = epsilon_one_run(m, r, v, delta, level)
        tests.append({"k_pos": int(kp), "k_neg": int(kn), "r": r, "v": v, "epsilon_lb": eps})
    best = max(tests, key=lambda t: t["epsilon_lb"])
    ceiling = max(one_run_ceiling(m, int(t["r"]), delta, level) for t in tests)
    return {**best, "m": m, "p": p, "p_per_test": level, "tests": tests, "ceiling": ceiling}


def _scores(scores_in: Any, scores_out: Any) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(scores_in, dtype=float).ravel()
    b = np.asarray(scores_out, dtype=float).ravel()
    if a.size == 0 or b.size == 0:
        raise ValueError(f"need members and non-members. Found {a.size} and {b.size}.")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("scores must be finite")
    return a, b


def roc_curve(scores_in: Any, scores_out: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC of the threshold attack "member iff score ≥ τ" (Yeom et al. 2018).

    Returns:
        ``(fpr, tpr, thresholds)``, from (0, 0) at τ = +∞ to (1, 1), one point per distinct
        score (ties move both rates at once).
    """
    a, b = _scores(scores_in, scores_out)
    thr = np.unique(np.concatenate([a, b]))[::-1]
    # counts of scores >= each threshold
    tpr = (a.size - np.searchsorted(np.sort(a), thr, side="left")) / a.size
    fpr = (b.size - np.searchsorted(np.sort(b), thr, side="left")) / b.size
    return (
        np.concatenate([[0.0], fpr]),
        np.concatenate([[0.0], tpr]),
        np.concatenate([[np.inf], thr]),
    )


def auc(scores_in: Any, scores_out: Any) -> float:
    """Area under the ROC: P[s_in > s_out] + ½·P[s_in = s_out] (Mann–Whitney U / (n_in·n_out)).

    Computed from mid-ranks: U = Σ rank(s_in) − n_in(n_in + 1)/2.
    """
    a, b = _scores(scores_in, scores_out)
    ranks = sps.rankdata(np.concatenate([a, b]))
    u = ranks[: a.size].sum() - a.size * (a.size + 1) / 2.0
    return float(u / (a.size * b.size))


def tpr_at_fpr(scores_in: Any, scores_out: Any, fpr: float) -> float:
    """Largest TPR over thresholds whose empirical FPR is ≤ ``fpr`` (no interpolation).

    Carlini et al., "Membership Inference Attacks From First Principles", S&P 2022: report TPR
    at low FPR (1 %, 0.1 %) rather than AUC alone.
    """
    f, t, _ = roc_curve(scores_in, scores_out)
    return float(t[f <= fpr + 1e-12].max())


def clopper_pearson(k: int, n: int, alpha: float) -> tuple[float, float]:
    """Exact one-sided bounds at level ``alpha`` each for a binomial proportion k/n.

    Clopper and Pearson 1934: lower = Beta⁻¹(α; k, n−k+1), upper = Beta⁻¹(1−α; k+1, n−k).
    """
    if not 0 <= k <= n or n <= 0:
        raise ValueError(f"need 0 <= k <= n, n > 0. Found k={k}, n={n}.")
    lo = 0.0 if k == 0 else float(sps.beta.ppf(alpha, k, n - k + 1))
    hi = 1.0 if k == n else float(sps.beta.ppf(1 - alpha, k + 1, n - k))
    return lo, hi


def epsilon_from_rates(tpr: float, fpr: float, delta: float) -> float:
    """ε any (ε, δ)-DP mechanism must have for a test with these rates (Kairouz et al. 2015).

    Every test satisfies TPR ≤ e^ε·FPR + δ and 1 − FPR ≤ e^ε·(1 − TPR) + δ, hence
    ε ≥ max(ln((TPR − δ)/FPR), ln((1 − FPR − δ)/(1 − TPR))), and ≥ 0.
    """
    out = 0.0
    if tpr - delta > 0:
        out = max(out, math.inf if fpr <= 0 else math.log((tpr - delta) / fpr))
    if 1 - fpr - delta > 0:
        out = max(out, math.inf if tpr >= 1 else math.log((1 - fpr - delta) / (1 - tpr)))
    return out


def mia_audit(
    scores_in: Any,
    scores_out: Any,
    delta: float,
    *,
    fprs: Sequence[float] = (0.01, 0.001),
    confidence: float = 0.95,
) -> dict[str, Any]:
    """ε lower bound from the threshold attack at pre-registered FPRs, with confidence.

    At each target FPR the threshold τ is the most permissive whose empirical FPR ≤ target;
    TPR is bounded below and FPR above by Clopper–Pearson at level (1 − confidence)/(2·n_fpr)
    each (Bonferroni over both rates and all targets), then :func:`epsilon_from_rates`
    (Jagielski et al. 2020; Nasr et al. 2021). Choosing τ on the same non-member scores makes
    this indicative rather than a strict certificate; a held-out τ would make it strict.
    """
    a, b = _scores(scores_in, scores_out)
    alpha = (1 - confidence) / (2 * len(fprs))
    rows = []
    f, t, thr = roc_curve(a, b)
    for target in fprs:
        ok = f <= target + 1e-12
        i = int(np.flatnonzero(ok)[np.argmax(t[ok])])
        tau = float(thr[i])
        tp, fp = int((a >= tau).sum()), int((b >= tau).sum())
        tpr_lo, _ = clopper_pearson(tp, a.size, alpha)
        _, fpr_hi = clopper_pearson(fp, b.size, alpha)
        rows.append(
            {
                "fpr_target": float(target),
                "threshold": tau,
                "tpr": tp / a.size,
                "fpr": fp / b.size,
                "tpr_lower": tpr_lo,
                "fpr_upper": fpr_hi,
                "epsilon_lb": epsilon_from_rates(tpr_lo, fpr_hi, delta),
            }
        )
    best = max(rows, key=lambda x: x["epsilon_lb"])
    return {"epsilon_lb": best["epsilon_lb"], "confidence": confidence, "at": rows}


# --- Gaussian canary-cosine estimator (white box) ------------------------------------------


def gdp_delta(eps: float, mu: float) -> float:
    """δ(ε) of μ-GDP: Φ(−ε/μ + μ/2) − e^ε·Φ(−ε/μ − μ/2) (Dong, Roth, Su 2022, Cor. 2.13).

    The second term is computed in log space so that large ε and μ do not overflow.
    """
    if mu <= 0:
        return 0.0
    first = sps.norm.cdf(-eps / mu + mu / 2)
    second = math.exp(eps + sps.norm.logcdf(-eps / mu - mu / 2))
    return float(max(first - second, 0.0))


def gdp_epsilon(mu: float, delta: float) -> float:
    """Smallest ε ≥ 0 with δ(ε) ≤ ``delta`` for μ-GDP; δ(ε) decreases in ε, so bisection."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1). Found {delta}.")
    if mu <= 0 or gdp_delta(0.0, mu) <= delta:
        return 0.0
    if math.isinf(mu):
        return math.inf
    hi = 1.0
    while gdp_delta(hi, mu) > delta:
        hi *= 2
        if hi > 1e6:
            return math.inf
    lo = 0.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if gdp_delta(mid, mu) > delta:
            lo = mid
        else:
            hi = mid
    return hi


def canary_cosine_audit(cos_in: Any, cos_out: Any, delta: float) -> dict[str, Any]:
    """One-shot ε estimate from canary cosines (Andrew et al., ICLR 2024).

    Andrew, Kairouz, Oh, Oprea, McMahan, Suriyakumar, "One-shot Empirical Privacy Estimation
    for Federated Learning": random canary directions are inserted into the clients' updates;
    the cosines of the final model delta with inserted canaries (``cos_in``) and with canary
    directions that were never inserted (``cos_out``, null distribution) are compared.
    Treating both as Gaussians with the null's spread, μ = (mean_in − mean_out) / std_out
    and the mechanism is μ-GDP; ε follows from :func:`gdp_epsilon` at ``delta``.

    This is an estimate, not a bound: it can fall above the accountant's ε by chance.

    Returns:
        ``{"mu", "epsilon", "mean_in", "mean_out", "std_out", "n_in", "n_out"}``.
    """
    a, b = _scores(cos_in, cos_out)
    if b.size < 2:
        raise ValueError(f"need at least 2 null cosines. Found {b.size}.")
    std = float(b.std(ddof=1))
    diff = float(a.mean() - b.mean())
    mu = (math.inf if diff > 0 else 0.0) if std == 0 else max(diff / std, 0.0)
    return {
        "mu": mu,
        "epsilon": gdp_epsilon(mu, delta),
        "mean_in": float(a.mean()),
        "mean_out": float(b.mean()),
        "std_out": std,
        "n_in": int(a.size),
        "n_out": int(b.size),
    }


def epsilon_from_canary_cosines(cos_in: Any, cos_out: Any, delta: float) -> float:
    """The ε estimate of :func:`canary_cosine_audit` (Andrew et al., ICLR 2024) alone."""
    return float(canary_cosine_audit(cos_in, cos_out, delta)["epsilon"])
