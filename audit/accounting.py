"""Privacy accounting for the audit: recompute ε from a run's privacy ledger, independently.

Owns: the three ε functions (Opacus RDP, Opacus PRV, Google ``dp_accounting`` PLD) over an
Opacus-style history of ``(noise_multiplier, sample_rate, steps)`` events, the reconstruction of
each channel's history from the server's privacy ledger, the per-channel checks (ledger ε equals
the recomputation, RDP ≥ PLD, budget), the worst case with lost rounds counted as spent
(:func:`worst_case`), the composed worst case for a user present on several channels, and the
fixed wording of the privacy statement (privacy unit, trust model, what is not
protected).

Every mechanism here is the Poisson-subsampled Gaussian of DP-SGD (Abadi et al. 2016) with
add/remove-one adjacency. RDP: Mironov 2017 and Mironov, Talwar, Zhang 2019, with the conversion
of Balle et al. 2020 as Opacus implements it. PRV: Gopi, Lee, Wutschitz 2021. PLD: Meiser and
Mohammadi 2018, Koskela et al. 2020, as ``dp_accounting.pld`` implements it (pessimistic
estimate).

Tolerances. Computed on six settings at δ = 1e-5 (q from 0.0043 to 0.05, σ from 1 to 4, 200 to
14,063 steps) with Opacus 1.6 and dp-accounting 0.6.0 (PLD at discretisation interval 1e-4):
Opacus RDP and Google's ``RdpAccountant`` agree to 3e-4; Opacus PRV (``eps_error`` 0.01,
``delta_error`` δ/1000, upper bound) equals the PLD ε + 0.0100 ± 0.0003; RDP is 8.5 to 14.1 %
above PLD. Hence 1e-3 (relative) between two computations with the same accountant, 0.02 between
PRV and PLD, and RDP ≥ PLD.

Must not: import ``server/`` or ``client/``; read files (callers pass parsed entries).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal

from fedrec.shared import wire

Event = tuple[float, float, int]  # (noise_multiplier, sample_rate, steps), as in Opacus
History = list[Event]

ACCOUNTANTS = ("rdp", "prv")
PLD_INTERVAL = 1e-4  # value_discretization_interval of the PLD cross-check (see Tolerances)
SAME_ACCOUNTANT_RTOL = 1e-3  # ledger ε vs recomputation with the same accountant
RDP_PLD_RTOL = 1e-3  # RDP must be ≥ PLD up to the PLD's discretisation error
PRV_PLD_ATOL = 0.02  # Opacus PRV came out at PLD + its eps_error 0.01 (± 0.0003)

# Ledger keys that are not wire keys (the rest are wire.PRIVACY_KEYS).
ROUND = "round"
STATUS = "status"
REASON = "reason"
HISTORY = "history"
SHARD = "shard"  # optional: which shard of a channel (disjoint users, own accountant)
TRAINED, REFUSED, MISSING = "trained", "refused", "missing"
FAILED, REJECTED = "failed", "rejected"
RELEASED = "released"  # a node ledger line: the item prior was released (its history has it)
# A rejected reply (egress violation) was still trained: the client spent ε on it.
SPENT = (TRAINED, REJECTED)
NOT_SPENT = (REFUSED, MISSING, FAILED)
BUDGET_RTOL = 1e-6  # the client's guard allows this slack (shared.privacy.check_budget)

PRIVACY_UNIT = "one user of one platform (channel)"
ADJACENCY = "add/remove one user (all of that user's training interactions on that platform)"
TRUST_MODEL = (
    "Federated, local DP: each platform runs DP-SGD on its own users before anything leaves it. "
    "The server (and anyone who sees the global model) sees each platform's DP-noised model "
    "weights, aggregate metrics and bucketed counts; raw interactions, user ids and per-user "
    "values never leave the platform. What of this holds against the server itself depends on "
    "each node's own privacy policy, which the server cannot change: see 'Against the server'. "
    "No secure aggregation."
)
PROTECTED = (
    "Every model update a platform sends (all DP-SGD iterates, hence every checkpoint and the "
    "final model), for each user of that platform, composed over all rounds of the run."
)


def merge_history(events: Iterable[Sequence[float]]) -> History:
    """Normalise events to ``(σ, q, steps)`` and merge consecutive equal ``(σ, q)`` like Opacus.

    Opacus' accountants append a new entry only when ``(noise_multiplier, sample_rate)``
    changes; merging keeps our reconstruction comparable entry by entry with a client's saved
    accountant history. Events with no steps are dropped.
    """
    out: History = []
    for ev in events:
        sigma, q, steps = float(ev[0]), float(ev[1]), int(ev[2])
        if steps <= 0:
            continue
        if out and out[-1][0] == sigma and out[-1][1] == q:
            out[-1] = (sigma, q, out[-1][2] + steps)
        else:
            out.append((sigma, q, steps))
    return out


def _check(history: Sequence[Sequence[float]], delta: float) -> History | float:
    """Validate; return ε directly for the trivial cases (nothing spent: 0, no noise: inf)."""
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1). Found {delta}.")
    merged = merge_history(history)
    for sigma, q, steps in merged:
        if not 0.0 <= q <= 1.0 or sigma < 0.0 or math.isnan(sigma):
            raise ValueError(
                f"event (noise_multiplier={sigma}, sample_rate={q}, steps={steps}) is invalid: "
                "need noise_multiplier >= 0 and sample_rate in [0, 1]"
            )
    merged = [ev for ev in merged if ev[1] > 0.0]  # q = 0 never touches the data
    if not merged:
        return 0.0
    if any(sigma == 0.0 for sigma, _, _ in merged):
        return math.inf  # no noise: no finite guarantee (Opacus PRV would raise OverflowError)
    return merged


@lru_cache(maxsize=1024)
def _rdp_one_step(sigma: float, q: float) -> Any:
    """RDP of one step of the subsampled Gaussian at Opacus' default orders (cached)."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp as rdp_analysis

    return rdp_analysis.compute_rdp(
        q=q, noise_multiplier=sigma, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS
    )


def epsilon_rdp(history: Sequence[Sequence[float]], delta: float) -> float:
    """ε at ``delta`` as Opacus' ``RDPAccountant.get_epsilon`` computes it.

    Same orders, same per-event ``compute_rdp(...) * steps``, same sum and conversion
    (Balle et al. 2020, ``privacy_analysis.get_privacy_spent``), so the result is identical to
    the accountant's; the one-step RDP of each ``(σ, q)`` is cached, which makes ε-per-round
    curves cheap (the fractional orders cost about 0.05 s per event).

    Args:
        history: ``(noise_multiplier, sample_rate, steps)`` events, composed in any order.
        delta: target δ in (0, 1).

    Returns:
        ε; 0 for an empty history, ``inf`` if any event has no noise.
    """
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp as rdp_analysis

    checked = _check(history, delta)
    if isinstance(checked, float):
        return checked
    rdp = sum(_rdp_one_step(sigma, q) * steps for sigma, q, steps in checked)
    with warnings.catch_warnings():
        # "Optimal order is the smallest alpha": only for ε so large that it does not matter.
        warnings.simplefilter("ignore", UserWarning)
        eps, _ = rdp_analysis.get_privacy_spent(
            orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta
        )
    return float(eps)


def epsilon_prv(history: Sequence[Sequence[float]], delta: float) -> float:
    """ε at ``delta`` by Opacus' ``PRVAccountant`` (Gopi et al. 2021), its upper bound.

    Uses Opacus' defaults (``eps_error=0.01``, ``delta_error=δ/1000``), as ``PrivacyEngine``
    does, so a client's reported ε is reproduced exactly.
    """
    checked = _check(history, delta)
    if isinstance(checked, float):
        return checked
    return _prv_cached(tuple(checked), float(delta))


@lru_cache(maxsize=256)
def _prv_cached(events: tuple[Event, ...], delta: float) -> float:
    import numpy as np
    from opacus.accountants import PRVAccountant

    acc = PRVAccountant()
    acc.history = list(events)
    try:
        with np.errstate(divide="ignore"):  # log(1 - q) at q = 1 (a one-off release): -inf
            return float(acc.get_epsilon(delta))
    except OverflowError:  # so little noise that the PRV domain overflows
        return math.inf


@lru_cache(maxsize=256)
def _pld_event(sigma: float, q: float, steps: int, interval: float) -> Any:
    """PLD of ``steps`` Poisson-subsampled Gaussian steps, built as ``PLDAccountant`` does.

    Cached: building the subsampled-Gaussian PLD is the slow part, and a channel's final
    history and the cross-channel composition share the same events.
    """
    from dp_accounting.pld import privacy_loss_distribution as pld_lib

    return pld_lib.from_gaussian_mechanism(
        standard_deviation=sigma, value_discretization_interval=interval, sampling_prob=q
    ).self_compose(steps)


@lru_cache(maxsize=256)
def _pld_cached(events: tuple[Event, ...], delta: float, interval: float) -> float:
    from dp_accounting.pld import privacy_loss_distribution as pld_lib

    pld = pld_lib.identity(value_discretization_interval=interval)
    for sigma, q, steps in events:
        pld = pld.compose(_pld_event(sigma, q, steps, interval))
    return float(pld.get_epsilon_for_delta(delta))


def epsilon_pld(
    history: Sequence[Sequence[float]], delta: float, *, interval: float = PLD_INTERVAL
) -> float:
    """ε at ``delta`` by Google ``dp_accounting``'s PLD (pessimistic estimate).

    The independent cross-check: not Opacus code. The same operations as
    ``dp_accounting.pld.PLDAccountant`` composing ``SelfComposedDpEvent(PoissonSampledDpEvent(
    q, GaussianDpEvent(σ)), steps)`` (add/remove adjacency), with the per-event PLDs cached.
    Composition is commutative, so events with the same ``(σ, q)`` anywhere in the history are
    grouped into one self-composition.

    Args:
        history: ``(noise_multiplier, sample_rate, steps)`` events.
        delta: target δ in (0, 1).
        interval: ``value_discretization_interval``; 1e-4 is the interval of the reference
            values in the module docstring, a coarser one is faster and still an upper bound.
    """
    checked = _check(history, delta)
    if isinstance(checked, float):
        return checked
    grouped: dict[tuple[float, float], int] = {}
    for sigma, q, steps in checked:
        grouped[(sigma, q)] = grouped.get((sigma, q), 0) + steps
    events = tuple(sorted((s, q, t) for (s, q), t in grouped.items()))
    return _pld_cached(events, float(delta), float(interval))


def epsilon(
    history: Sequence[Sequence[float]],
    delta: float,
    accountant: str,
    *,
    pld_interval: float = PLD_INTERVAL,
) -> float:
    """ε by name: ``"rdp"``, ``"prv"`` (Opacus) or ``"pld"`` (dp_accounting)."""
    if accountant == "rdp":
        return epsilon_rdp(history, delta)
    if accountant == "prv":
        return epsilon_prv(history, delta)
    if accountant == "pld":
        return epsilon_pld(history, delta, interval=pld_interval)
    raise ValueError(f"accountant must be one of rdp, prv, pld. Found {accountant!r}.")


def as_float(value: Any) -> float | None:
    """A ledger number: float, int, ``"inf"``/``"Infinity"`` strings; ``None`` stays ``None``."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def epsilon_of(entry: Mapping[str, Any]) -> float | None:
    """A log line's ε: a number, ``"inf"``, or a bare ``Infinity`` (ledgers written before strict
    JSON); ``null`` is ∞ (strict JSON writes an ε of ∞, no guarantee, as null); ``None`` only
    when the line has no ``epsilon`` key."""
    if wire.EPSILON not in entry:
        return None
    value = entry[wire.EPSILON]
    return math.inf if value is None else as_float(value)


def close(a: float, b: float, rtol: float) -> bool:
    """Equal within ``rtol`` (relative); infinities only equal themselves."""
    if math.isinf(a) or math.isinf(b):
        return a == b
    return math.isclose(a, b, rel_tol=rtol, abs_tol=1e-9)


def _fmt(x: float | None) -> str:
    return "—" if x is None else ("inf" if math.isinf(x) else f"{x:.4f}")


def _events_equal(a: Sequence[Event], b: Sequence[Sequence[float]]) -> bool:
    """The same steps at the same (σ, q), in any order: composition does not depend on it
    (a round lost and trained again puts its steps out of the rounds' order)."""

    def totals(events: Iterable[Sequence[float]]) -> list[tuple[float, float, int]]:
        out: dict[tuple[float, float], int] = {}
        for ev in events:
            key = (float(ev[0]), float(ev[1]))
            out[key] = out.get(key, 0) + int(ev[2])
        return sorted((s, q, n) for (s, q), n in out.items() if n > 0)

    ta, tb = totals(a), totals(b)
    return len(ta) == len(tb) and all(
        t1 == t2 and math.isclose(s1, s2, rel_tol=1e-9) and math.isclose(q1, q2)
        for (s1, q1, t1), (s2, q2, t2) in zip(ta, tb, strict=True)
    )


# --- one channel's ledger: the checks, one per function -------------------------------------


def round_problems(rnd: int, seen: Collection[int], last_round: int) -> list[str]:
    """A round logged twice for one channel (several shards need a ``shard`` field) or after a
    later round (out of order)."""
    out = []
    if rnd in seen:
        out.append(
            f"round {rnd} appears twice (several shards? then each line needs a '{SHARD}' field)"
        )
    if rnd < last_round:
        out.append(f"round {rnd} after round {last_round} (out of order)")
    return out


def setting_problems(entry: Mapping[str, Any], accountant: str, delta: float) -> list[str]:
    """A line whose accountant or δ is not the run's (absent means the run's)."""
    out = []
    line_acc = entry.get(wire.ACCOUNTANT)
    if line_acc is not None and line_acc != accountant:
        out.append(f"accountant {line_acc!r} differs from the run's {accountant!r}")
    line_delta = as_float(entry.get(wire.DELTA))
    if line_delta is not None and not math.isclose(line_delta, delta, rel_tol=1e-9):
        out.append(f"delta {line_delta} differs from the run's {delta}")
    return out


def spent_event(entry: Mapping[str, Any]) -> tuple[Event | None, str | None]:
    """The ``(σ, q, steps)`` event a trained (or rejected) line adds, and a problem if any.

    No event when ``steps`` is not a non-negative integer (the line cannot be counted). A line
    with ``dp-enabled`` false, or without ``noise-multiplier``/``sample-rate``, adds a noiseless
    event (σ = 0: ε = ∞ from then on; q = 1 if unknown), the latter with a problem.
    """
    steps = entry.get(wire.STEPS)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        return None, f"'steps' must be a non-negative integer. Found {steps!r}."
    sigma = as_float(entry.get(wire.NOISE_MULTIPLIER))
    q = as_float(entry.get(wire.SAMPLE_RATE))
    noiseless: Event = (0.0, 1.0 if q is None else q, steps)
    if entry.get(wire.DP_ENABLED) is False:
        return noiseless, None
    if sigma is None or q is None:
        return noiseless, (
            f"trained round without noise-multiplier/sample-rate ({sigma!r}, {q!r}); "
            "counted as no noise"
        )
    return (sigma, q, steps), None


def unspent_steps_problem(status: str, steps: object) -> str | None:
    """A refused, missing or failed round that logs steps: it trained, or the line is wrong."""
    if isinstance(steps, int) and steps > 0:
        return (
            f"a {status} round logs {steps} steps; it should add none "
            "(if the client trained, its ε is missing from this ledger)"
        )
    return None


def total_steps_problem(logged_total: object, total_steps: int) -> str | None:
    """A logged ``total-steps`` that is not the sum of the trained rounds' steps so far."""
    if isinstance(logged_total, int) and logged_total != total_steps:
        return f"total-steps {logged_total} but the trained rounds so far add up to {total_steps}"
    return None


def compare_epsilon(
    rnd: int,
    status: str,
    logged: float | None,
    recomputed: float,
    *,
    accountant: str,
    delta: float,
) -> tuple[Literal["note", "problem"], str] | None:
    """The ledger's ε for a round against the recomputation with the same accountant.

    Equal within :data:`SAME_ACCOUNTANT_RTOL` (relative): ``None``. A refused, missing or
    failed round may log more than was spent (the ε the round would have reached, the reason
    for a refusal): a note. Anything else, or a spent round without ε, is a problem. Nothing to
    compare if the recomputation failed (NaN).
    """
    if logged is None:
        return ("problem", "trained round without an epsilon") if status in SPENT else None
    if math.isnan(recomputed) or close(logged, recomputed, SAME_ACCOUNTANT_RTOL):
        return None
    if status in NOT_SPENT and logged > recomputed:
        return "note", (
            f"round {rnd} ({status}): ledger ε {_fmt(logged)} is above the spent "
            f"{_fmt(recomputed)}; read as the ε the round would have reached"
        )
    return "problem", (
        f"round {rnd}: ledger ε {_fmt(logged)} ≠ recomputed {_fmt(recomputed)} "
        f"({accountant}, δ={delta:g})"
    )


def round_budget_violation(
    channel: str, rnd: int, logged: float | None, recomputed: float, target: float
) -> str | None:
    """A spent round whose ε (the larger of logged and recomputed) exceeds the target by more
    than the client guard's slack, target · (1 + :data:`BUDGET_RTOL`)."""
    known = [x for x in (logged, recomputed) if x is not None and not math.isnan(x)]
    worst = max(known, default=0.0)
    if worst > target * (1 + BUDGET_RTOL):
        return f"{channel}: round {rnd}: ε {_fmt(worst)} exceeds the target {target:g}"
    return None


def rdp_below_pld_problem(channel: str, eps_rdp: float, eps_pld: float) -> str | None:
    """RDP is the looser bound: below PLD (beyond :data:`RDP_PLD_RTOL`, the PLD's
    discretisation error) one of the two computations is wrong."""
    if eps_rdp < eps_pld * (1 - RDP_PLD_RTOL) - 1e-9:
        return (
            f"{channel}: RDP ε {_fmt(eps_rdp)} is below PLD ε {_fmt(eps_pld)}; RDP must be "
            "the looser bound"
        )
    return None


def prv_pld_problem(channel: str, eps_prv: float, eps_pld: float) -> str | None:
    """Opacus PRV and dp_accounting PLD estimate the same ε: apart by more than
    :data:`PRV_PLD_ATOL` + 1 % of the PLD ε, one of them is wrong."""
    if abs(eps_prv - eps_pld) > PRV_PLD_ATOL + 0.01 * eps_pld:
        return (
            f"{channel}: PRV ε {_fmt(eps_prv)} and PLD ε {_fmt(eps_pld)} disagree by more "
            f"than {PRV_PLD_ATOL} + 1%"
        )
    return None


def cross_check_problems(
    channel: str, accountant: str, eps_run: float, eps_pld: float, eps_rdp: float
) -> list[str]:
    """The final ε against the independent accountants (only when all three are finite)."""
    if any(math.isnan(x) or math.isinf(x) for x in (eps_run, eps_pld, eps_rdp)):
        return []
    found = [rdp_below_pld_problem(channel, eps_rdp, eps_pld)]
    if accountant == "prv":
        found.append(prv_pld_problem(channel, eps_run, eps_pld))
    return [p for p in found if p is not None]


@dataclass
class _LedgerWalk:
    """What a channel's ledger lines add up to, line by line: :func:`audit_channel`'s state."""

    channel: str
    accountant: str
    delta: float
    target_epsilon: float | None
    dp_enabled_config: bool
    pld_interval: float
    where: str
    problems: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    curve: list[dict[str, Any]] = field(default_factory=list)
    refused: list[dict[str, Any]] = field(default_factory=list)
    missing: list[dict[str, Any]] = field(default_factory=list)
    seen_rounds: set[int] = field(default_factory=set)
    dp_off_rounds: list[int] = field(default_factory=list)
    mechanism: dict[str, set[Any]] = field(
        default_factory=lambda: {
            k: set() for k in (wire.MAX_GRAD_NORM, wire.GRAD_SAMPLE_MODE, wire.NOISE_MULTIPLIER)
        }
    )
    sample_rates: set[float] = field(default_factory=set)
    settings: dict[int, tuple[float, float]] = field(default_factory=dict)  # round -> (σ, q)
    steps_per_round: set[int] = field(default_factory=set)
    total_steps: int = 0
    releases: int = 0  # item-prior releases counted into ``events`` so far
    last_round: int = 0
    exceeded: bool = False
    _cache: dict[tuple[Event, ...], float] = field(default_factory=dict)

    def add(self, e: Mapping[str, Any], idx: int) -> None:
        at = f"{self.where}: entry {e.get('_line', idx)} (channel {self.channel})"
        rnd = e.get(ROUND)
        if not isinstance(rnd, int) or isinstance(rnd, bool):
            self.problems.append(f"{at}: 'round' must be an integer. Found {rnd!r}.")
            return
        self.problems += [
            f"{at}: {p}" for p in round_problems(rnd, self.seen_rounds, self.last_round)
        ]
        self.seen_rounds.add(rnd)
        self.last_round = max(self.last_round, rnd)
        status = e.get(STATUS)
        if status not in SPENT + NOT_SPENT:
            self.problems.append(
                f"{at}: status must be one of {', '.join(SPENT + NOT_SPENT)}. Found {status!r}."
            )
            return
        self.problems += [f"{at}: {p}" for p in setting_problems(e, self.accountant, self.delta)]
        if status in SPENT:
            if not self._add_spent(e, rnd, at):
                return
        else:
            (self.refused if status == REFUSED else self.missing).append(
                {"round": rnd, "status": status, "reason": str(e.get(REASON, ""))}
            )
            self._problem(at, unspent_steps_problem(status, e.get(wire.STEPS)))
        if status in SPENT:
            self._add_lost(e, rnd, at)
        self._problem(at, total_steps_problem(e.get(wire.TOTAL_STEPS), self.total_steps))
        self._add_epsilon(e, rnd, status, at)

    def _add_lost(self, e: Mapping[str, Any], rnd: int, at: str) -> None:
        """Steps the node's ``total-steps`` holds beyond the rounds on record: trained in a
        round the server never aggregated (lost to a crash, then trained again). They are
        spent: counted at the smallest σ and largest q this channel used so far (fail closed)."""
        logged = e.get(wire.TOTAL_STEPS)
        if not isinstance(logged, int) or logged <= self.total_steps or not self.settings:
            return
        lost = logged - self.total_steps
        sigma = min(s for s, _ in self.settings.values())
        q = max(q for _, q in self.settings.values())
        self.events.append((sigma, q, lost))
        self.total_steps += lost
        self.notes.append(
            f"{at}: round {rnd}: the node reports {lost} more steps than the rounds on record "
            f"(a round it trained that the server never aggregated); counted as spent at "
            f"σ={sigma:.4g}, q={q:.4g}"
        )

    def _problem(self, at: str, problem: str | None) -> None:
        if problem is not None:
            self.problems.append(f"{at}: {problem}")

    def _add_spent(self, e: Mapping[str, Any], rnd: int, at: str) -> bool:
        """Add a trained/rejected line's event; ``False`` if it cannot be counted."""
        event, problem = spent_event(e)
        self._problem(at, problem)
        if event is None:
            return False
        if e.get(wire.DP_ENABLED) is False:
            self.dp_off_rounds.append(rnd)
        elif problem is None:
            self.sample_rates.add(event[1])
            self.settings[rnd] = (event[0], event[1])
        self._add_releases(e, at)
        self.events.append(event)
        self.total_steps += event[2]
        self.steps_per_round.add(event[2])
        for k, values in self.mechanism.items():
            if e.get(k) is not None:
                values.add(e.get(k))
        return True

    def _add_releases(self, e: Mapping[str, Any], at: str) -> None:
        """The item-prior releases the client's history holds by this line (one Gaussian
        mechanism each, (σ, 1, 1)), added ahead of the round's steps as the client did."""
        count = e.get(wire.PRIOR_RELEASES)
        if count is None:
            return
        sigma = as_float(e.get(wire.PRIOR_NOISE_MULTIPLIER))
        if not isinstance(count, int) or isinstance(count, bool) or count < self.releases:
            self.problems.append(
                f"{at}: prior-releases must be an integer that never decreases "
                f"(counted {self.releases} so far). Found {count!r}."
            )
            return
        if count > self.releases and (sigma is None or sigma <= 0):
            self.problems.append(
                f"{at}: {count - self.releases} item-prior release(s) without a positive "
                f"prior-noise-multiplier ({sigma!r}); counted as no noise"
            )
            sigma = 0.0
        self.events += [(float(sigma or 0.0), 1.0, 1)] * (count - self.releases)
        self.releases = count

    def _epsilon_now(self) -> float:
        key = tuple(merge_history(self.events))
        if key not in self._cache:
            self._cache[key] = epsilon(
                self.events, self.delta, self.accountant, pld_interval=self.pld_interval
            )
        return self._cache[key]

    def _add_epsilon(self, e: Mapping[str, Any], rnd: int, status: str, at: str) -> None:
        """Recompute ε after this line, compare it with the logged one, check the budget."""
        try:
            recomputed = self._epsilon_now()
        except Exception as exc:  # a library failure must not hide the rest of the audit
            self.problems.append(f"{at}: could not recompute ε ({type(exc).__name__}: {exc})")
            recomputed = math.nan
        logged = epsilon_of(e)
        found = compare_epsilon(
            rnd, status, logged, recomputed, accountant=self.accountant, delta=self.delta
        )
        if found is not None:
            (self.notes if found[0] == "note" else self.problems).append(f"{at}: {found[1]}")
        if self.target_epsilon is not None and status in SPENT and self.dp_enabled_config:
            over = round_budget_violation(
                self.channel, rnd, logged, recomputed, self.target_epsilon
            )
            if over is not None:
                self.exceeded = True
                self.violations.append(over)
        self.curve.append(
            {
                "round": rnd,
                "status": status,
                "steps": e.get(wire.STEPS) if status in SPENT else 0,
                "total_steps": self.total_steps,
                "epsilon_ledger": logged,
                "epsilon_recomputed": None if math.isnan(recomputed) else recomputed,
            }
        )

    def summary(self, history: History) -> dict[str, Any]:
        """The channel's rounds, steps and mechanism, as :func:`audit_channel` returns them."""
        return {
            "channel": self.channel,
            "accountant": self.accountant,
            "delta": self.delta,
            "history": [list(ev) for ev in history],
            "rounds_trained": sum(1 for c in self.curve if c["status"] == TRAINED),
            "rounds_rejected": [c["round"] for c in self.curve if c["status"] == REJECTED],
            "rounds_refused": [r["round"] for r in self.refused],
            "rounds_missing": [r["round"] for r in self.missing],  # missing or failed
            "refused": self.refused,
            "missing": self.missing,
            "total_steps": self.total_steps,
            "steps_per_round": sorted(self.steps_per_round),
            "sample_rates": sorted(self.sample_rates),
            "noise_multipliers": sorted(self.mechanism[wire.NOISE_MULTIPLIER], key=str),
            "max_grad_norms": sorted(self.mechanism[wire.MAX_GRAD_NORM], key=str),
            "grad_sample_modes": sorted(self.mechanism[wire.GRAD_SAMPLE_MODE], key=str),
            "dp_enabled": not self.dp_off_rounds,
            "dp_off_rounds": self.dp_off_rounds,
            "curve": self.curve,
            "target_epsilon": self.target_epsilon,
        }


def _final_epsilons(
    history: History, delta: float, accountant: str, pld_interval: float
) -> tuple[float, float, float, str | None]:
    """``(run accountant, PLD, RDP)`` ε of the final history; NaN and a message on failure."""
    eps_run = eps_pld = eps_rdp = math.nan
    try:
        eps_run = epsilon(history, delta, accountant, pld_interval=pld_interval)
        eps_pld = epsilon_pld(history, delta, interval=pld_interval)
        eps_rdp = eps_run if accountant == "rdp" else epsilon_rdp(history, delta)
    except Exception as exc:
        return eps_run, eps_pld, eps_rdp, f"could not compute final ε ({type(exc).__name__}: {exc})"
    return eps_run, eps_pld, eps_rdp, None


def audit_channel(
    channel: str,
    entries: Sequence[Mapping[str, Any]],
    *,
    accountant: str,
    delta: float,
    target_epsilon: float | None,
    dp_enabled_config: bool = True,
    node_entries: Sequence[Mapping[str, Any]] | None = None,
    pld_interval: float = PLD_INTERVAL,
    where: str = "privacy-ledger.jsonl",
    planned_steps: int | None = None,
    fallback_sigma: float | None = None,
    fallback_q: float = 1.0,
) -> dict[str, Any]:
    """Recompute one channel's privacy spend from its ledger lines and check them.

    History: each ``trained`` (or ``rejected``: trained, then refused by the server's egress
    check) line adds ``steps`` steps at that round's ``noise-multiplier`` and ``sample-rate``;
    ``refused``, ``missing`` and ``failed`` lines add nothing; a trained line with
    ``dp-enabled`` false adds a noiseless event (ε = ∞ from then on). The budget is exceeded
    when ε > target · (1 + 1e-6), the slack of the client's own guard.

    Args:
        channel: the channel's name.
        entries: its ledger lines in file order, each with ``_line`` (entry number) if known.
        accountant: the run's accountant (``"rdp"`` or ``"prv"``).
        delta: the run's δ (``dp.target-delta``).
        target_epsilon: the run's ``dp.target-epsilon`` (``None``: not set).
        dp_enabled_config: the run's ``dp.enabled``.
        node_entries: the client's own ledger (simulation), to compare histories.
        pld_interval: discretisation of the PLD cross-check.
        where: file name used in problem messages.
        planned_steps, fallback_sigma, fallback_q: what a lost round is counted as in the
            worst case (:func:`worst_case`; the steps are the larger of ``planned_steps``, the
            run's ``train.local-steps``, and the most a round of the channel logged).

    Returns:
        A JSON-able dict: final ε (run accountant, PLD, RDP), the worst-case ε with lost rounds
        counted as spent (``epsilon_worst_case``, ``worst_case``), history, per-round curve,
        refused rounds, budget, and ``problems`` (accounting inconsistencies), ``violations``
        (budget exceeded, DP off although configured on) and ``notes``.
    """
    walk = _LedgerWalk(
        channel, accountant, delta, target_epsilon, dp_enabled_config, pld_interval, where
    )
    for idx, e in enumerate(entries, start=1):
        walk.add(e, idx)
    history = merge_history(walk.events)
    result = walk.summary(history)
    problems, violations, notes = walk.problems, walk.violations, walk.notes
    if walk.dp_off_rounds:
        msg = f"{channel}: rounds {walk.dp_off_rounds} trained without DP (dp-enabled false): ε = ∞"
        (violations if dp_enabled_config else notes).append(msg)
    eps_run, eps_pld, eps_rdp, failed = _final_epsilons(history, delta, accountant, pld_interval)
    if failed is not None:
        problems.append(f"{channel}: {failed}")
    result["epsilon"] = eps_run
    result["epsilon_pld"] = eps_pld
    result["epsilon_rdp"] = eps_rdp
    result["cross_check"] = "pld" if accountant == "rdp" else "pld, rdp"
    try:
        worst = worst_case(
            walk.missing,
            history,
            walk.settings,
            planned_steps=max(
                [*walk.steps_per_round, *([planned_steps] if planned_steps else [])], default=None
            ),
            fallback_sigma=fallback_sigma,
            fallback_q=fallback_q,
            delta=delta,
            accountant=accountant,
            pld_interval=pld_interval,
        )
    except Exception as exc:
        problems.append(f"{channel}: could not compute the worst-case ε ({exc})")
        worst = {"epsilon": math.nan, "lost_rounds": [], "events": [], "basis": []}
    if worst["epsilon"] is None:  # no lost round: the worst case is the record
        worst["epsilon"] = eps_run
    result["worst_case"] = worst
    result["epsilon_worst_case"] = worst["epsilon"]
    problems += cross_check_problems(channel, accountant, eps_run, eps_pld, eps_rdp)
    result["budget"] = {
        "target_epsilon": target_epsilon,
        "spent": eps_run,
        "remaining": None
        if target_epsilon is None or math.isnan(eps_run)
        else target_epsilon - eps_run,
        "any_refused": bool(walk.refused),
        "exceeded": walk.exceeded,
    }
    if node_entries is not None:
        problems.extend(_check_node_ledger(channel, history, walk.curve, node_entries, delta))
    result["problems"] = problems
    result["violations"] = violations
    result["notes"] = notes
    return result


def _check_node_ledger(
    channel: str,
    history: History,
    curve: Sequence[Mapping[str, Any]],
    node_entries: Sequence[Mapping[str, Any]],
    delta: float,
) -> list[str]:
    """Compare the client's own ledger (its saved Opacus history) with the server's ledger.

    Round by round, a client line must not show a spend the server's ledger lacks: steps in a
    round the server logs as not spent (or not at all), more steps than the server's line, or
    another ε (then the server under- or over-reports). At the end, the client's accountant
    history must equal the one rebuilt from the server's ledger.
    """
    where = f"nodes/{channel}/privacy-ledger.jsonl"
    problems: list[str] = []
    server = {c["round"]: c for c in curve}
    server_eps = {c["round"]: c["epsilon_ledger"] for c in curve if c["status"] in SPENT}
    last_history: list[Any] | None = None
    # a round trained, lost and trained again has two lines; the server saw only the last
    last_of_round = {
        e.get(ROUND): idx
        for idx, e in enumerate(node_entries, start=1)
        if e.get(STATUS) == "trained"
    }
    for idx, e in enumerate(node_entries, start=1):
        at = f"{where}: entry {e.get('_line', idx)}"
        rnd = e.get(ROUND)
        node_eps = epsilon_of(e)
        released = e.get(STATUS) == RELEASED  # the item prior, ahead of the round's steps
        steps = e.get(wire.STEPS)
        if not released and isinstance(steps, int) and steps > 0:
            line = server.get(rnd) if isinstance(rnd, int) else None
            if line is None or line["status"] not in SPENT:
                got = "no line" if line is None else f"status {line['status']!r}"
                problems.append(
                    f"{at}: round {rnd}: the client trained {steps} steps; the server's "
                    f"privacy-ledger.jsonl has {got} for {channel} in round {rnd} (that ε is "
                    "not in the server's account)"
                )
            elif isinstance(line["steps"], int) and steps > line["steps"]:
                problems.append(
                    f"{at}: round {rnd}: the client trained {steps} steps; the server's "
                    f"privacy-ledger.jsonl says {line['steps']}"
                )
        if (
            not released
            and last_of_round.get(rnd, idx) == idx
            and rnd in server_eps
            and node_eps is not None
            and server_eps[rnd] is not None
        ):
            if not close(node_eps, server_eps[rnd], SAME_ACCOUNTANT_RTOL):
                problems.append(
                    f"{at}: round {rnd}: the client logged ε {_fmt(node_eps)}, the server's "
                    f"ledger says {_fmt(server_eps[rnd])}"
                )
        hist = e.get(HISTORY)
        if isinstance(hist, list):
            last_history = hist
    if last_history is None:
        if server_eps:
            problems.append(f"{where}: no accountant history although the channel trained")
        return problems
    try:
        node_hist = merge_history(last_history)
    except (TypeError, ValueError, IndexError) as exc:
        return [*problems, f"{where}: unreadable accountant history ({exc})"]
    if not _events_equal(history, node_hist):
        problems.append(
            f"{where}: the client's accountant history {node_hist} differs from the one "
            f"reconstructed from the server's ledger {history}"
        )
    return problems


def _lost_setting(
    rnd: int, settings: Mapping[int, tuple[float, float]]
) -> tuple[float, float, int] | None:
    """``(σ, q, round)`` of the spent round nearest before ``rnd``, else nearest after."""
    before = [r for r in settings if r < rnd]
    after = [r for r in settings if r > rnd]
    if not before and not after:
        return None
    r = max(before) if before else min(after)
    return (*settings[r], r)


def worst_case(
    lost: Sequence[Mapping[str, Any]],
    history: History,
    settings: Mapping[int, tuple[float, float]],
    *,
    planned_steps: int | None,
    fallback_sigma: float | None,
    fallback_q: float,
    delta: float,
    accountant: str,
    pld_interval: float = PLD_INTERVAL,
) -> dict[str, Any]:
    """ε if every lost round had trained: the worst case the server's record allows.

    A lost round is ``missing`` (no reply: the node may have trained and timed out) or
    ``failed`` (an error reply that is not the node's refusal: it may have come after the
    training). Each adds ``planned_steps`` at that round's σ and q, taken from the channel's
    nearest spent round (before it, else after it); without one, σ is ``fallback_sigma`` (the
    run's fixed σ, else the node policy's min-noise-multiplier) and q is ``fallback_q`` (the
    policy's max-sample-rate, else 1). Unknown σ or steps: ε = ∞. Refused rounds add nothing:
    a refusal is the node's own statement that it did not train.

    Returns:
        ``{"epsilon", "lost_rounds", "events", "basis"}``; ``epsilon`` is the on-record ε's
        history plus ``events``, with the run's accountant.
    """
    events: list[Event] = []
    basis: list[str] = []
    for r in lost:
        rnd = int(r["round"])
        found = _lost_setting(rnd, settings)
        sigma: float | None
        if found is not None:
            sigma, q, src = found
            where = f"σ, q of round {src}"
        else:
            sigma, q = fallback_sigma, fallback_q
            where = (
                "no spent round: σ "
                + ("unknown" if sigma is None else f"{sigma:g} (run config or policy floor)")
                + f", q {q:g}"
            )
        if sigma is None or planned_steps is None:
            events.append((0.0, q, max(planned_steps or 1, 1)))
            basis.append(f"round {rnd} ({r['status']}): {where}; counted as no noise (ε = ∞)")
            continue
        events.append((float(sigma), float(q), planned_steps))
        basis.append(f"round {rnd} ({r['status']}): {planned_steps} steps, {where}")
    eps = (
        epsilon([*history, *events], delta, accountant, pld_interval=pld_interval)
        if events
        else None
    )
    return {
        "epsilon": eps,
        "lost_rounds": [int(r["round"]) for r in lost],
        "events": [list(ev) for ev in events],
        "basis": basis,
    }


def _worse(a: float, b: float) -> bool:
    return not math.isnan(a) and (math.isnan(b) or a > b)


def composed_worst_case(
    histories: Mapping[str, Sequence[Sequence[float]]],
    delta: float,
    accountant: str,
    *,
    per_channel: Mapping[str, float] | None = None,
    pld_interval: float = PLD_INTERVAL,
) -> dict[str, Any]:
    """ε for one person who is a user on every channel: all histories in one accountant.

    The channels' mechanisms touch the same person independently, so their privacy losses
    compose (adaptive composition; in RDP the Rényi divergences add order by order). Reported
    next to the naive sum of per-channel ε, which is basic composition and holds only at
    δ × (number of channels).
    """
    all_events = [ev for h in histories.values() for ev in h]
    out: dict[str, Any] = {"channels": sorted(histories), "delta": delta, "accountant": accountant}
    out["epsilon"] = epsilon(all_events, delta, accountant, pld_interval=pld_interval)
    out["epsilon_pld"] = epsilon_pld(all_events, delta, interval=pld_interval)
    if per_channel is None:
        per_channel = {
            c: epsilon(h, delta, accountant, pld_interval=pld_interval)
            for c, h in histories.items()
        }
    out["naive_sum"] = float(sum(per_channel.values()))
    out["naive_sum_delta"] = delta * len(histories)
    out["max_single"] = max(per_channel.values(), default=0.0)
    return out


def audit_accounting(
    ledger: Sequence[Mapping[str, Any]],
    run_config: Mapping[str, Any],
    *,
    channels: Sequence[str] = (),
    node_ledgers: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
    pld_interval: float = PLD_INTERVAL,
    policy_floor: tuple[float, float] | None = None,
) -> dict[str, Any]:
    """Audit the whole server ledger: every channel, then the composed worst case.

    Args:
        ledger: the server's privacy-ledger entries (``_line`` added by the reader if known).
        run_config: the flattened run config (``dp.*`` keys).
        channels: channels the run was configured with (a channel without ledger lines is
            reported).
        node_ledgers: channel → that client's own ledger entries, where they exist.
        pld_interval: discretisation of the PLD cross-check.
        policy_floor: the node policy's ``(min-noise-multiplier, max-sample-rate)``, if known:
            what a lost round of a channel that never trained is counted at in the worst case.
    """
    problems: list[str] = []
    accountant = str(run_config.get("dp.accountant", "")).lower()
    if accountant not in ACCOUNTANTS:
        seen = {e.get(wire.ACCOUNTANT) for e in ledger} - {None}
        guess = next(iter(seen)) if len(seen) == 1 else "rdp"
        problems.append(
            f"config.json: dp.accountant must be one of {ACCOUNTANTS}. Found "
            f"{run_config.get('dp.accountant')!r}; using {guess!r}"
        )
        accountant = guess if guess in ACCOUNTANTS else "rdp"
    delta = as_float(run_config.get("dp.target-delta"))
    if delta is None or not 0 < delta < 1:
        deltas = {d for e in ledger if (d := as_float(e.get(wire.DELTA))) is not None}
        problems.append(
            f"config.json: dp.target-delta must be in (0, 1). Found "
            f"{run_config.get('dp.target-delta')!r}"
        )
        delta = min(deltas) if deltas else 1e-5
    target = as_float(run_config.get("dp.target-epsilon"))
    dp_enabled = run_config.get("dp.enabled", True) is not False
    planned = run_config.get("train.local-steps")
    fixed_sigma = as_float(run_config.get("dp.noise-multiplier"))
    if not dp_enabled:
        fallback_sigma: float | None = 0.0
    elif fixed_sigma is not None and fixed_sigma >= 0:
        fallback_sigma = fixed_sigma
    else:
        fallback_sigma = policy_floor[0] if policy_floor else None

    # A channel split over shards (disjoint users, one accountant each) is audited per shard,
    # named like its node folder ("<channel>-<shard>"), when the ledger says which shard.
    by_channel: dict[str, list[Mapping[str, Any]]] = {}
    base: dict[str, str] = {}
    for idx, e in enumerate(ledger, start=1):
        ch = e.get(wire.CHANNEL)
        if not isinstance(ch, str):
            problems.append(f"privacy-ledger.jsonl: entry {e.get('_line', idx)}: no channel")
            continue
        key = ch if e.get(SHARD) is None else f"{ch}-{e[SHARD]}"
        base[key] = ch
        by_channel.setdefault(key, []).append(e)
    for ch in channels:
        if ch not in base.values():
            problems.append(f"{ch}: configured channel has no line in the privacy ledger")
    per: dict[str, dict[str, Any]] = {}
    for ch in sorted(by_channel):
        per[ch] = audit_channel(
            ch,
            by_channel[ch],
            accountant=accountant,
            delta=delta,
            target_epsilon=target,
            dp_enabled_config=dp_enabled,
            node_entries=(node_ledgers or {}).get(ch),
            pld_interval=pld_interval,
            planned_steps=planned if isinstance(planned, int) and planned > 0 else None,
            fallback_sigma=fallback_sigma,
            fallback_q=policy_floor[1] if policy_floor else 1.0,
        )
    composed: dict[str, Any] | None = None
    if per:
        # A person is in at most one shard of a channel (parallel composition): take each
        # channel's worst shard, then compose across channels.
        worst: dict[str, str] = {}
        worst_lost: dict[str, str] = {}  # the same with lost rounds counted as spent
        for key, r in per.items():
            ch = base[key]
            if ch not in worst or _worse(r["epsilon"], per[worst[ch]]["epsilon"]):
                worst[ch] = key
            wc = r["epsilon_worst_case"]
            if ch not in worst_lost or _worse(wc, per[worst_lost[ch]]["epsilon_worst_case"]):
                worst_lost[ch] = key
        try:
            composed = composed_worst_case(
                {ch: per[key]["history"] for ch, key in worst.items()},
                delta,
                accountant,
                per_channel={ch: per[key]["epsilon"] for ch, key in worst.items()},
                pld_interval=pld_interval,
            )
            lost = [per[key]["worst_case"] for key in worst_lost.values()]
            composed["epsilon_worst_case"] = (
                epsilon(
                    [
                        ev
                        for key in worst_lost.values()
                        for ev in (*per[key]["history"], *per[key]["worst_case"]["events"])
                    ],
                    delta,
                    accountant,
                    pld_interval=pld_interval,
                )
                if any(w["events"] for w in lost)
                else composed["epsilon"]
            )
        except Exception as exc:
            problems.append(f"composed ε: could not compute ({type(exc).__name__}: {exc})")
    return {
        "accountant": accountant,
        "cross_check": "pld" if accountant == "rdp" else "pld, rdp",
        "delta": delta,
        "target_epsilon": target,
        "dp_enabled": dp_enabled,
        "channels": per,
        "composed": composed,
        "problems": problems + [p for r in per.values() for p in r["problems"]],
        "violations": [v for r in per.values() for v in r["violations"]],
        "notes": [n for r in per.values() for n in r["notes"]],
    }


def not_protected(
    run_config: Mapping[str, Any],
    per_channel: Mapping[str, Any],
    *,
    loss_sent: bool | None = None,
) -> list[str]:
    """What the DP guarantee does not cover, for the report: participation and timing, the
    bucketed platform size, evaluation metrics and the training loss (aggregates without noise;
    ``loss_sent`` False: the nodes' policies keep it, None: not known), platform-level
    properties, the public item encoder, hyperparameter choices; first, if so, that the run or
    some channels trained without DP."""
    items = [
        "Participation and timing: which platforms took part in which round, and when.",
        f"Platform size: '{wire.NUM_EXAMPLES}' is sent rounded up to a multiple of "
        f"{wire.COUNT_BUCKET}; the server learns each platform's user count at that granularity.",
        "Evaluation metrics (HR/NDCG/Recall/MRR, evaluated-user counts) are computed on users' "
        "held-out data without DP; they are aggregates, but not covered by ε.",
        "The training loss stays on the nodes (their policies' send-loss = false)."
        if loss_sent is False
        else "The training loss sent with each update (where a node's policy sends it) is "
        "computed on the sampled users without noise; it is an aggregate, but not covered by ε.",
        "Platform-level properties (the platform's user mix, item popularity): ε protects one "
        "user; a group of k users is protected only at about k·ε.",
        "Item text and the central item encoder are public (no private data; they cost no ε).",
        "Hyperparameter choices made by looking at private data, if any, are outside the run.",
    ]
    off = [c for c, r in per_channel.items() if not r.get("dp_enabled", True)]
    if run_config.get("dp.enabled", True) is False:
        items.insert(0, "NOTHING: dp.enabled is false for this run; no DP guarantee at all.")
    elif off:
        items.insert(0, f"Channels that trained with dp-enabled false: {', '.join(off)} (ε = ∞).")
    return items
