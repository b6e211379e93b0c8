"""Privacy accounting that survives rounds, processes and restarts.

Owns: planning the noise multiplier for a whole run, the accountant history as plain data,
the budget check that runs *before* training (fail closed), and the client's on-disk ledger.

The accountant is Opacus's (RDP by default, PRV optional): its state is the list of
``(noise_multiplier, sample_rate, steps)`` events, which composes exactly. Restoring that
list and adding the next round's steps gives the same ε as one continuous training of the
same total steps (research/privacy.md §3), so ε covers the whole run, never one round.

Must not: import ``server/`` or ``client/``.
"""

from __future__ import annotations

import functools
import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedrec.shared import hashlog

Event = tuple[float, float, int]  # (noise_multiplier, sample_rate, steps)


class BudgetExceeded(RuntimeError):
    """Training would take ε past the target; nothing was trained."""


class PrivacyConfigError(ValueError):
    """A DP setting is invalid for this channel's data (e.g. δ ≥ 1/users)."""


def _accountant(name: str) -> Any:
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
    acc = _accountant(accountant)
    acc.history = list(events)
    return float(acc.get_epsilon(delta=delta))


@functools.lru_cache(maxsize=64)
def plan_noise_multiplier(
    *, target_epsilon: float, target_delta: float, sample_rate: float, steps: int, accountant: str
) -> float:
    """Smallest σ (to 0.01 in ε) such that ``steps`` steps at ``sample_rate`` stay ≤ target ε.

    Computed once for the whole planned run (all rounds x local steps), never per round:
    per-round calibration spends the budget again every round. Cached: a node asks again
    every round with the same arguments, and the search takes about 0.7 s.
    """
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        # The search probes small σ, whose best RDP order is the largest one Opacus tries;
        # the σ it returns is accounted again, warnings on, whenever ε is computed.
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


def sample_rate_for(num_users: int, batch_size: int) -> float:
    """Poisson rate as Opacus derives it from a DataLoader: 1 / number of batches."""
    if num_users <= 0:
        raise PrivacyConfigError("no users to train on: the channel has no usable histories")
    return 1.0 / math.ceil(num_users / batch_size)


@dataclass
class PrivacyState:
    """A channel's accountant history; plain data, JSON round-trippable."""

    accountant: str
    delta: float
    history: list[Event] = field(default_factory=list)

    def epsilon(self) -> float:
        return epsilon_of(self.history, self.delta, self.accountant)

    def total_steps(self) -> int:
        return sum(int(n) for _, _, n in self.history)

    def epsilon_after(self, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        return epsilon_of(
            [*self.history, (noise_multiplier, sample_rate, steps)], self.delta, self.accountant
        )

    def check_budget(
        self, *, noise_multiplier: float, sample_rate: float, steps: int, target_epsilon: float
    ) -> float:
        """Return ε after the planned steps, or raise :class:`BudgetExceeded` (fail closed).

        A 1e-6 relative slack absorbs the rounding of the σ search, nothing more.
        """
        after = self.epsilon_after(noise_multiplier, sample_rate, steps)
        if after > target_epsilon * (1 + 1e-6):
            raise BudgetExceeded(
                f"privacy budget: {steps} more steps (noise_multiplier={noise_multiplier:.4g}, "
                f"sample_rate={sample_rate:.4g}) would take ε from {self.epsilon():.4f} to "
                f"{after:.4f}, past the target {target_epsilon} at δ={self.delta:g} "
                f"({self.accountant}). Not training. Raise dp.target-epsilon or plan fewer "
                "rounds/steps."
            )
        return after

    def record(self, noise_multiplier: float, sample_rate: float, steps: int) -> None:
        """Append steps, merging with the last event when (σ, q) are unchanged (as Opacus does)."""
        if steps <= 0:
            return
        if self.history and self.history[-1][:2] == (noise_multiplier, sample_rate):
            s, q, n = self.history[-1]
            self.history[-1] = (s, q, n + steps)
        else:
            self.history.append((noise_multiplier, sample_rate, steps))

    def to_json(self) -> str:
        return json.dumps(
            {"accountant": self.accountant, "delta": self.delta, "history": self.history}
        )

    @classmethod
    def from_json(cls, text: str) -> PrivacyState:
        d = json.loads(text)
        return cls(
            accountant=str(d["accountant"]),
            delta=float(d["delta"]),
            history=[(float(s), float(q), int(n)) for s, q, n in d["history"]],
        )


def append_ledger(
    path: Path,
    *,
    state: PrivacyState,
    round_: int,
    steps: int,
    noise_multiplier: float,
    sample_rate: float,
    status: str,
    channel: str,
) -> dict[str, Any]:
    """One line per training call on the node's disk (hash-chained, fsynced)."""
    return hashlog.append(
        path,
        {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "channel": channel,
            "round": round_,
            "status": status,
            "steps": steps,
            "noise-multiplier": noise_multiplier,
            "sample-rate": sample_rate,
            "epsilon": state.epsilon(),
            "delta": state.delta,
            "accountant": state.accountant,
            "history": [list(e) for e in state.history],
        },
    )


def restore_from_ledger(path: Path, accountant: str, delta: float) -> PrivacyState:
    """The accountant as the ledger last recorded it; refuses a tampered ledger (fail closed)."""
    state = PrivacyState(accountant=accountant, delta=delta)
    if not path.exists():
        return state
    verdict = hashlog.verify(path)
    if not verdict.ok:
        raise PrivacyConfigError(
            f"privacy ledger {path} failed verification: {verdict.problem}. Refusing to train "
            "with an accountant that cannot be trusted."
        )
    entries = hashlog.read(path)
    if entries:
        last = entries[-1]
        if last["accountant"] != accountant:
            raise PrivacyConfigError(
                f"privacy ledger {path} was kept with accountant {last['accountant']!r}, "
                f"the run asks for {accountant!r}: ε would not compose. Use the same accountant."
            )
        state.history = [(float(s), float(q), int(n)) for s, q, n in last["history"]]
    return state
