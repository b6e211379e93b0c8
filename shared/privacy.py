"""Privacy accounting as pure functions: ε of an accountant history, σ for a planned run, the
Poisson sample rate, and the errors that make DP fail closed.

The accountant is Opacus's (RDP by default, PRV optional): its state is the list of
``(noise_multiplier, sample_rate, steps)`` events, which composes exactly. The lifecycle that
uses these (plan, restore, check, train, record) is :class:`fedrec.client.dp.DPSession`.

Must not: import ``server/`` or ``client/``; hold state.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any

from fedrec.shared.errors import FedrecError

Event = tuple[float, float, int]  # (noise_multiplier, sample_rate, steps)


class BudgetExceeded(FedrecError, RuntimeError):
    """Training would take ε past the target; nothing was trained."""


class PrivacyConfigError(FedrecError, ValueError):
    """A DP setting is invalid for this channel's data (e.g. δ ≥ 1/users)."""


def make_accountant(name: str) -> Any:
    """A fresh Opacus accountant: ``"rdp"`` or ``"prv"``."""
    from opacus.accountants import PRVAccountant, RDPAccountant

    if name == "rdp":
        return RDPAccountant()
    if name == "prv":
        return PRVAccountant()
    raise PrivacyConfigError(f"accountant must be 'rdp' or 'prv'. Found {name!r}.")


def epsilon_of(history: list[Event], delta: float, accountant: str) -> float:
    """ε after the given events, at δ, with the named Opacus accountant (0 for no events)."""
    events = [(float(s), float(q), int(n)) for s, q, n in history if n > 0]
    if not events:
        return 0.0
    if any(s <= 0 for s, _, _ in events):
        return math.inf
    acc = make_accountant(accountant)
    acc.history = list(events)
    import numpy as np

    # PRV evaluates log(1 - q) on both branches of a np.where: at q = 1 (a full-batch event,
    # such as the item prior's release) numpy warns about a branch it then discards
    with np.errstate(divide="ignore"):
        return float(acc.get_epsilon(delta=delta))


@functools.lru_cache(maxsize=64)
def plan_noise_multiplier(
    *,
    target_epsilon: float,
    target_delta: float,
    sample_rate: float,
    steps: int,
    accountant: str,
    before: tuple[Event, ...] = (),
) -> float:
    """Smallest σ (to 0.01 in ε) such that ``steps`` steps at ``sample_rate`` stay ≤ target ε.

    Computed once for the whole planned run (all rounds x local steps), never per round:
    per-round calibration spends the budget again every round. Cached: a node asks again
    every round with the same arguments, and the search takes about 0.7 s.

    ``before``: events that compose ahead of these steps (the item-prior release); σ is then
    the smallest for which the whole history stays ≤ the target.
    """
    if before:
        return _plan_after(before, target_epsilon, target_delta, sample_rate, steps, accountant)
    import numpy as np
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings(), np.errstate(divide="ignore"):
        # The search probes small σ, whose best RDP order is the largest one Opacus tries;
        # the σ it returns is accounted again, warnings on, whenever ε is computed. (PRV at
        # q = 1: see epsilon_of.)
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=target_delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=accountant,
                epsilon_tolerance=0.01,
            )
        )


def _plan_after(
    before: tuple[Event, ...],
    target_epsilon: float,
    target_delta: float,
    sample_rate: float,
    steps: int,
    accountant: str,
) -> float:
    """Bisection on σ over the composed history (Opacus's own search takes no prefix).

    It starts from σ without the prefix (a lower bound: events only add ε) and stops, as
    Opacus's search does, once ε is within 0.01 under the target.
    """

    def eps(sigma: float) -> float:
        return epsilon_of([*before, (sigma, sample_rate, steps)], target_delta, accountant)

    if epsilon_of(list(before), target_delta, accountant) >= target_epsilon:
        raise PrivacyConfigError(
            f"the events before training already spend ε ≥ {target_epsilon}: nothing is left "
            "for DP-SGD. Raise dp.target-epsilon or lower dp.prior-share."
        )
    lo = plan_noise_multiplier(
        target_epsilon=target_epsilon,
        target_delta=target_delta,
        sample_rate=sample_rate,
        steps=steps,
        accountant=accountant,
    )
    e_lo, hi = eps(lo), 1.05 * lo
    e_hi = eps(hi)
    while e_hi > target_epsilon:
        lo, e_lo, hi = hi, e_hi, hi + 2 * (hi - lo)
        e_hi = eps(hi)
    # regula falsi (Illinois): ε(σ) is smooth and decreasing, so few evaluations suffice
    side = 0
    while target_epsilon - e_hi > 0.01 and hi - lo > 1e-4 * hi:
        f_lo, f_hi = e_lo - target_epsilon, e_hi - target_epsilon  # > 0, <= 0
        mid = hi - f_hi * (hi - lo) / (f_hi - f_lo)
        mid = min(max(mid, lo + 1e-3 * (hi - lo)), hi - 1e-3 * (hi - lo))
        e_mid = eps(mid)
        if e_mid > target_epsilon:
            lo, e_lo = mid, e_mid
            if side == -1:
                e_hi = target_epsilon + (e_hi - target_epsilon) / 2
            side = -1
        else:
            hi, e_hi = mid, e_mid
            if side == 1:
                e_lo = target_epsilon + (e_lo - target_epsilon) / 2
            side = 1
    return hi


def sample_rate_for(num_users: int, batch_size: int) -> float:
    """The Poisson rate of DP-SGD: 1 / number of batches (Opacus samples at 1 / len(loader)),
    the number of batches counted from the user count rounded up to its
    :data:`~fedrec.shared.wire.COUNT_BUCKET`. The rate is sent to the server; counted from
    the exact user count, it would tell the server that count to within one batch, finer
    than the bucketed ``num-examples``. The expected batch is then at most ``batch_size``."""
    from fedrec.shared.wire import bucket_count

    if num_users <= 0:
        raise PrivacyConfigError("no users to train on: the channel has no usable histories")
    return 1.0 / math.ceil(bucket_count(num_users) / batch_size)
