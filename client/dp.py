"""One platform's DP lifecycle, owned by one object: :class:`DPSession`.

Every DP-SGD training in fedrec goes through a session, whoever starts it (the ClientApp,
``fedrec train``, ``fedrec simulate``'s local-only rows, the benchmarks and audits):

1. **check** δ against the number of users (δ must be below 1/users);
2. **plan** the noise multiplier σ once for the whole run (all rounds x local steps, at the
   Poisson sample rate Opacus will use): calibrating per round would spend the budget again
   every round;
3. **restore** the accountant: Opacus's own accountant, loaded from its ``state_dict()`` as kept
   in ``context.state`` and in the node's hash-chained ledger; if both exist, the one with more
   steps wins, so ε never resets because a process restarted or a state was lost;
4. **check the budget before training** (fail closed): steps that would take ε past the target
   raise :class:`~fedrec.shared.privacy.BudgetExceeded` and nothing is trained;
5. **train** with Opacus: :meth:`DPSession.make_private` hands the session's accountant to the
   :class:`opacus.PrivacyEngine`, so the steps on record are the steps the optimizer ran;
6. **record** one ledger line per training call (trained or refused) and the state to keep.

The accountant's history of ``(noise_multiplier, sample_rate, steps)`` events composes exactly:
restoring it and adding the next round's steps gives the same ε as one continuous training of
the same total steps, so ε covers the whole run (and every later run on the same ledger).

Must not: import ``server/``; send anything.
"""

from __future__ import annotations

import json
import os
import time
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedrec.shared import hashlog, privacy
from fedrec.shared.config import DPConfig, check_delta

if TYPE_CHECKING:
    import numpy as np
    import torch
    from opacus.accountants.accountant import IAccountant
    from opacus.optimizers import DPOptimizer
    from torch import nn

Event = privacy.Event
TRAINED, REFUSED, RELEASED = "trained", "refused", "released"  # ledger statuses
# Benchmarks only: a node whose own environment sets this draws its DP noise from a seed, so
# that runs can be compared pairwise. It is read from the node process's environment, never
# from the run config (which the server writes): noise that the server could determine would
# be no noise against the server. Every ledger line says whether the noise was seeded.
NOISE_SEED_ENV = "FEDREC_BENCH_NOISE_SEED"


def noise_is_seeded() -> bool:
    return NOISE_SEED_ENV in os.environ


class DPSession:
    """DP-SGD for one channel: planned σ, the accountant, the budget check, the ledger.

    Args:
        dp: the run's DP settings (``dp.enabled`` is not read: a session is DP).
        users: the privacy units Opacus samples from (users with a prefix and a next item).
        batch_size: expected users per batch; the Poisson rate is ``1 / ceil(users / batch)``,
            exactly the rate Opacus derives from the data loader.
        planned_steps: every DP-SGD step this run plans (rounds x local steps): sizes σ.
        channel: the platform, for messages and ledger lines.
        ledger: the node's ledger file; ``None`` keeps the history in memory only.
        saved: ``state_dict()`` of an earlier session of this run (``context.state``).
        item_prior: the run releases the platform's item popularity once
            (:meth:`release_prior`): its σ is planned so that it alone costs
            ``dp.prior_share`` of the target ε, and DP-SGD's σ for what the release leaves.

    Raises:
        PrivacyConfigError: δ is not below 1/users, no user can be trained on, the accountant
            is unknown, or a saved state or ledger cannot be trusted.
    """

    def __init__(
        self,
        dp: DPConfig,
        *,
        users: int,
        batch_size: int,
        planned_steps: int,
        channel: str,
        ledger: Path | None = None,
        saved: Mapping[str, Any] | None = None,
        item_prior: bool = False,
    ) -> None:
        problem = check_delta(dp.target_delta, users, channel)
        if problem:
            raise privacy.PrivacyConfigError(problem)
        self.channel = channel
        self.target_epsilon = dp.target_epsilon
        self.delta = dp.target_delta
        self.max_grad_norm = dp.max_grad_norm
        self.accountant_name = dp.accountant
        self.grad_sample_mode = dp.grad_sample_mode
        self.sample_rate = privacy.sample_rate_for(users, batch_size)
        # σ of the item-prior release (0: the run releases none), a Gaussian mechanism of
        # L2 sensitivity 1: one event (σ, sample rate 1, 1 step) in the accountant
        self.prior_noise_multiplier = (
            privacy.plan_noise_multiplier(
                target_epsilon=dp.prior_share * dp.target_epsilon,
                target_delta=dp.target_delta,
                sample_rate=1.0,
                steps=1,
                accountant=dp.accountant,
            )
            if item_prior
            else 0.0
        )
        release: tuple[Event, ...] = ((self.prior_noise_multiplier, 1.0, 1),) if item_prior else ()
        self.noise_multiplier = (
            dp.noise_multiplier
            if dp.noise_multiplier >= 0
            else privacy.plan_noise_multiplier(
                target_epsilon=dp.target_epsilon,
                target_delta=dp.target_delta,
                sample_rate=self.sample_rate,
                steps=planned_steps,
                accountant=dp.accountant,
                before=release,
            )
        )
        self.ledger = ledger
        self.accountant: IAccountant = privacy.make_accountant(dp.accountant)
        self.releases: list[Event] = []  # the accountant's events that were not DP-SGD steps
        self._restore(saved)

    # ------------------------------------------------------------------ the accountant

    @property
    def history(self) -> list[Event]:
        return [(float(s), float(q), int(n)) for s, q, n in self.accountant.history]

    def total_steps(self) -> int:
        """DP-SGD steps on record (the item-prior releases are events, not steps)."""
        return sum(n for _, _, n in self.history) - sum(n for _, _, n in self.releases)

    def epsilon(self) -> float:
        """ε spent so far, at the session's δ, with its accountant (0 before any step)."""
        return privacy.epsilon_of(self.history, self.delta, self.accountant_name)

    def check_budget(self, steps: int) -> float:
        """ε after ``steps`` more steps at the planned (σ, q), or raise
        :class:`~fedrec.shared.privacy.BudgetExceeded` (fail closed).

        A 1e-6 relative slack absorbs the rounding of the σ search, nothing more.
        """
        return self._epsilon_after(
            (self.noise_multiplier, self.sample_rate, steps),
            f"{steps} more steps (noise_multiplier={self.noise_multiplier:.4g}, "
            f"sample_rate={self.sample_rate:.4g})",
            "Not training. Raise dp.target-epsilon or plan fewer rounds/steps.",
        )

    def _epsilon_after(self, event: Event, what: str, refusal: str) -> float:
        """ε after ``event``, or raise BudgetExceeded naming ``what`` (fail closed)."""
        after = privacy.epsilon_of([*self.history, event], self.delta, self.accountant_name)
        if after > self.target_epsilon * (1 + 1e-6):
            raise privacy.BudgetExceeded(
                f"privacy budget: {what} would take ε from {self.epsilon():.4f} to "
                f"{after:.4f}, past the target {self.target_epsilon} at δ={self.delta:g} "
                f"({self.accountant_name}). {refusal}"
            )
        return after

    def state_dict(self) -> dict[str, Any]:
        """What to keep between calls: Opacus's accountant ``state_dict()``, δ and which of
        its events were releases."""
        return {
            **self.accountant.state_dict(),
            "delta": self.delta,
            "releases": [list(e) for e in self.releases],
        }

    def to_json(self) -> str:
        return json.dumps(self.state_dict())

    def _restore(self, saved: Mapping[str, Any] | None) -> None:
        """Load the accountant from ``saved`` or from the ledger, whichever has more steps."""
        candidates = [self._from_ledger()]
        if saved is not None:
            state = dict(saved)
            candidates.append(
                (self._checked(state, "this run's saved state"), _events(state.get("releases")))
            )
        best, releases = max(candidates, key=lambda c: sum(int(n) for _, _, n in c[0]))
        self.accountant.load_state_dict(
            {"history": list(best), "mechanism": self.accountant.mechanism()}
        )
        self.releases = releases

    def _checked(self, state: dict[str, Any], where: str) -> list[Event]:
        mechanism = state.get("mechanism")
        if mechanism != self.accountant.mechanism():
            raise privacy.PrivacyConfigError(
                f"{where} was kept with accountant {mechanism!r}, the run asks for "
                f"{self.accountant_name!r}: ε would not compose. Use the same accountant."
            )
        return [(float(s), float(q), int(n)) for s, q, n in state["history"]]

    def _from_ledger(self) -> tuple[list[Event], list[Event]]:
        """The history (and releases) the ledger last recorded; refuses a tampered ledger
        (fail closed)."""
        if self.ledger is None or not self.ledger.exists():
            return [], []
        verdict = hashlog.verify(self.ledger)
        if not verdict.ok:
            raise privacy.PrivacyConfigError(
                f"privacy ledger {self.ledger} failed verification: {verdict.problem}. "
                "Refusing to train with an accountant that cannot be trusted."
            )
        entries = hashlog.read(self.ledger)
        if not entries:
            return [], []
        last = entries[-1]
        history = self._checked(
            {"mechanism": last["accountant"], "history": last["history"]},
            f"privacy ledger {self.ledger}",
        )
        return history, _events(last.get("releases"))

    # ------------------------------------------------------------------ the item prior

    def release_prior(self, counts: np.ndarray, *, round_: int) -> np.ndarray:
        """The platform's popularity counts (L2 sensitivity 1) plus Gaussian noise of std
        ``prior_noise_multiplier``, accounted as one event and recorded in the ledger.

        Raises:
            BudgetExceeded: the release would take ε past the target (nothing released).
        """
        import numpy as np
        import torch

        sigma = self.prior_noise_multiplier
        if sigma <= 0:
            raise privacy.PrivacyConfigError("this session plans no item-prior release")
        self._epsilon_after(
            (sigma, 1.0, 1),
            f"releasing the item prior (noise_multiplier={sigma:.4g})",
            "Not released. Raise dp.target-epsilon or set model.item-prior = none.",
        )
        g = torch.Generator().manual_seed(self.noise_seed(-1 - round_))
        noise = torch.randn(len(counts), generator=g, dtype=torch.float64).numpy()
        self.accountant.step(noise_multiplier=sigma, sample_rate=1.0)
        self.releases.append((sigma, 1.0, 1))
        self.record(round_=round_, steps=0, status=RELEASED)
        return np.asarray(counts, dtype=np.float64) + sigma * noise

    # ------------------------------------------------------------------ training

    def noise_seed(self, stream: int) -> int:
        """The seed of torch's generator for one training call: from OS entropy, or, where the
        node's environment sets :data:`NOISE_SEED_ENV` (benchmarks), from that value, the
        channel and ``stream`` (which tells a run's calls apart: rounds, shards)."""
        fixed = os.environ.get(NOISE_SEED_ENV)
        if fixed is None:
            return int.from_bytes(os.urandom(8), "little") >> 1
        return zlib.crc32(f"{fixed}/{self.channel}/{stream}".encode())

    def make_private(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loader: torch.utils.data.DataLoader,
        criterion: nn.Module,
    ) -> tuple[nn.Module, DPOptimizer, nn.Module, torch.utils.data.DataLoader]:
        """Opacus's DP-SGD around the given training parts, accounted by this session.

        Returns ``(module, optimizer, criterion, loader)``; the criterion is Opacus's wrapper
        under ghost clipping and the given one otherwise. Each optimizer step adds one step at
        ``(σ, q)`` to the session's accountant (Opacus's step hook), skipped steps none.
        """
        from opacus import PrivacyEngine

        engine = PrivacyEngine(accountant=self.accountant_name)
        engine.accountant = self.accountant  # the engine's step hook records into this one
        made = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            criterion=criterion,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.max_grad_norm,
            poisson_sampling=True,
            grad_sample_mode=self.grad_sample_mode,
        )
        if self.grad_sample_mode == "ghost":
            net, dp_optimizer, criterion, dp_loader = made
        else:
            net, dp_optimizer, dp_loader = made
        if abs(dp_loader.sample_rate - self.sample_rate) > 1e-12:  # the rate σ was planned for
            raise RuntimeError(
                f"Opacus samples at {dp_loader.sample_rate}, the session planned for "
                f"{self.sample_rate}: the loader's batch size does not match the session's"
            )
        return net, dp_optimizer, criterion, dp_loader

    # ------------------------------------------------------------------ the ledger

    def record(self, *, round_: int, steps: int, status: str) -> None:
        """One hash-chained, fsynced line per training call on the node's disk."""
        if self.ledger is None:
            return
        hashlog.append(
            self.ledger,
            {
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "channel": self.channel,
                "round": round_,
                "status": status,
                "steps": steps,
                "noise-multiplier": self.noise_multiplier,
                "sample-rate": self.sample_rate,
                "epsilon": self.epsilon(),
                "delta": self.delta,
                "accountant": self.accountant_name,
                "history": [list(e) for e in self.history],
                "releases": [list(e) for e in self.releases],
                "noise-seeded": noise_is_seeded(),
            },
        )


def _events(raw: object) -> list[Event]:
    """Events kept as JSON lists (a state's or a ledger line's ``releases``)."""
    if not isinstance(raw, list):
        return []
    return [(float(s), float(q), int(n)) for s, q, n in raw]
