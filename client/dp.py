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

Two budgets are enforced at every step. The run's (``dp.target-epsilon`` at ``dp.target-delta``,
what the server asks for) covers this run's events; the node's **lifetime** budget (its
policy's ``lifetime-epsilon`` at ``max-delta``, which the server cannot change) covers every
event on the node's ledger, earlier runs included. σ is planned so that the whole planned run
fits both. If a run has spent more steps than its plan expected by now (a round the node
trained was lost and is trained again after a resume), σ is planned again for the remaining
steps from the history actually spent, so the run can still finish within both budgets.

Must not: import ``server/``; send anything.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from fedrec.client import noise
from fedrec.client.ledger import RELEASED, NodeLedger, events, subtract
from fedrec.shared import privacy
from fedrec.shared.config import DPConfig, check_delta
from fedrec.shared.policy import NodePolicy, sampling_refusals

if TYPE_CHECKING:
    import numpy as np
    import torch
    from opacus.accountants.accountant import IAccountant
    from opacus.optimizers import DPOptimizer
    from torch import nn

Event = privacy.Event
# Benchmarks only: a node whose own environment sets this draws its DP noise from a seed, so
# that runs can be compared pairwise. It is read from the node process's environment, never
# from the run config (which the server writes): noise that the server could determine would
# be no noise against the server. Every ledger line says whether the noise was seeded.
NOISE_SEED_ENV = "FEDREC_BENCH_NOISE_SEED"


def noise_is_seeded() -> bool:
    return NOISE_SEED_ENV in os.environ


class DPSession:
    """DP-SGD for one channel: planned σ, the accountant, the budget checks, the ledger.

    Args:
        dp: the run's DP settings (``dp.enabled`` is not read: a session is DP).
        users: the privacy units Opacus samples from (users with a prefix and a next item).
        batch_size: expected users per batch; the Poisson rate is
            :func:`~fedrec.shared.privacy.sample_rate_for` (it reveals the user count only to
            the 100-user bucket that ``num-examples`` already reveals).
        planned_steps: every DP-SGD step this run plans (rounds x local steps): sizes σ.
        channel: the platform, for messages and ledger lines.
        ledger: the node's ledger; ``None`` keeps the history in memory only.
        saved: ``state_dict()`` of an earlier session of this run (``context.state``).
        item_prior: the run releases the platform's item popularity once
            (:meth:`release_prior`): its σ is planned so that it alone costs
            ``dp.prior_share`` of the target ε, and DP-SGD's σ for what the release leaves.
        policy: the node's own policy: its lifetime budget, minimum σ, maximum sample rate
            and noise source. ``None`` (``fedrec train``, benchmarks): the run's target is the
            only budget.
        run: which run this is (ledger lines carry it): what earlier runs spent is the
            history before this run's first line.
        expected_steps: DP-SGD steps the plan expects this run to have spent before this call
            (rounds before this one x local steps); more on record re-plans σ for the rest.

    Raises:
        PrivacyConfigError: δ is not below 1/users, no user can be trained on, the accountant
            is unknown, a saved state or the ledger cannot be trusted, the lifetime budget is
            spent, or σ or the sample rate is outside the node's policy.
    """

    def __init__(
        self,
        dp: DPConfig,
        *,
        users: int,
        batch_size: int,
        planned_steps: int,
        channel: str,
        ledger: NodeLedger | None = None,
        saved: Mapping[str, Any] | None = None,
        item_prior: bool = False,
        policy: NodePolicy | None = None,
        run: str = "",
        expected_steps: int | None = None,
    ) -> None:
        problem = check_delta(dp.target_delta, users, channel)
        if problem:
            raise privacy.PrivacyConfigError(problem)
        self.channel = channel
        self.run = run
        self.policy = policy
        self.target_epsilon = dp.target_epsilon
        self.delta = dp.target_delta
        self.max_grad_norm = dp.max_grad_norm
        self.accountant_name = dp.accountant
        self.grad_sample_mode = dp.grad_sample_mode
        self.sample_rate = privacy.sample_rate_for(users, batch_size)
        self.ledger = ledger
        self.accountant: IAccountant = privacy.make_accountant(dp.accountant)
        self.releases: list[Event] = []  # this run's events that were not DP-SGD steps
        self.base: list[Event] = ledger.history_before(run) if ledger is not None else []
        self._restore(saved)
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
        pending: tuple[Event, ...] = (
            ((self.prior_noise_multiplier, 1.0, 1),) if item_prior and not self.releases else ()
        )
        self.noise_multiplier = (
            dp.noise_multiplier
            if dp.noise_multiplier >= 0
            else self._plan(planned_steps, expected_steps, pending)
        )
        if policy is not None:
            refused = sampling_refusals(policy, self.noise_multiplier, self.sample_rate)
            if refused:
                raise privacy.PrivacyConfigError("node policy: " + "; ".join(refused))
        self.noise_source = (
            noise.SOURCE_SEEDED
            if noise_is_seeded()
            else noise.SOURCE_SECURE
            if policy is None or policy.secure_noise
            else noise.SOURCE_TORCH
        )

    def _plan(
        self, planned_steps: int, expected_steps: int | None, pending: tuple[Event, ...]
    ) -> float:
        """σ for the run's DP-SGD steps: the larger of what the run's target and what the
        lifetime budget allow. Planned once from the run's start; planned again for the
        remaining steps from what was spent if more steps are on record than expected."""
        spent = self.run_history()
        steps_spent = self.total_steps()
        if expected_steps is not None and steps_spent > expected_steps:
            steps, run_before = max(planned_steps - expected_steps, 1), (*spent, *pending)
        else:
            steps, run_before = planned_steps, (*self.releases, *pending)
        sigma = privacy.plan_noise_multiplier(
            target_epsilon=self.target_epsilon,
            target_delta=self.delta,
            sample_rate=self.sample_rate,
            steps=steps,
            accountant=self.accountant_name,
            before=tuple(run_before),
        )
        if self.policy is None:
            return sigma
        lifetime_before = (*self.base, *run_before)
        ceiling, delta = self.policy.lifetime_epsilon, self.policy.max_delta
        planned = [*lifetime_before, (sigma, self.sample_rate, steps)]
        if privacy.epsilon_of(planned, delta, self.accountant_name) <= ceiling:
            return sigma  # the run's own plan fits what the lifetime has left
        try:
            return privacy.plan_noise_multiplier(
                target_epsilon=ceiling,
                target_delta=delta,
                sample_rate=self.sample_rate,
                steps=steps,
                accountant=self.accountant_name,
                before=tuple(lifetime_before),
            )
        except privacy.PrivacyConfigError:
            raise privacy.PrivacyConfigError(
                f"lifetime budget spent: this node's users have spent ε = "
                f"{self.lifetime_epsilon():.4f} of the policy's lifetime-epsilon {ceiling:g} "
                f"(δ = {delta:g}) in earlier runs; nothing is left for this run"
            ) from None

    # ------------------------------------------------------------------ the accountant

    @property
    def history(self) -> list[Event]:
        """Every event on record for this node: earlier runs' and this run's."""
        return [(float(s), float(q), int(n)) for s, q, n in self.accountant.history]

    def run_history(self) -> list[Event]:
        """This run's events (the history after what earlier runs spent)."""
        return subtract(self.history, self.base)

    def total_steps(self) -> int:
        """This run's DP-SGD steps (the item-prior releases are events, not steps)."""
        return sum(n for _, _, n in self.run_history()) - sum(n for _, _, n in self.releases)

    def epsilon(self) -> float:
        """ε this run spent so far, at the run's δ (0 before any step)."""
        return privacy.epsilon_of(self.run_history(), self.delta, self.accountant_name)

    def lifetime_epsilon(self) -> float:
        """ε every run on this node's ledger spent, at the policy's δ (the run's δ without a
        policy)."""
        delta = self.policy.max_delta if self.policy is not None else self.delta
        return privacy.epsilon_of(self.history, delta, self.accountant_name)

    def check_budget(self, steps: int) -> float:
        """This run's ε after ``steps`` more steps at the planned (σ, q), or raise
        :class:`~fedrec.shared.privacy.BudgetExceeded` (fail closed) if the run's target or
        the node's lifetime budget would be exceeded.

        A 1e-6 relative slack absorbs the rounding of the σ search, nothing more.
        """
        return self._epsilon_after(
            (self.noise_multiplier, self.sample_rate, steps),
            f"{steps} more steps (noise_multiplier={self.noise_multiplier:.4g}, "
            f"sample_rate={self.sample_rate:.4g})",
            "Not training. Raise dp.target-epsilon or plan fewer rounds/steps.",
        )

    def _epsilon_after(self, event: Event, what: str, refusal: str) -> float:
        """This run's ε after ``event``, or raise BudgetExceeded naming ``what``."""
        after = privacy.epsilon_of([*self.run_history(), event], self.delta, self.accountant_name)
        if after > self.target_epsilon * (1 + 1e-6):
            raise privacy.BudgetExceeded(
                f"privacy budget: {what} would take this run's ε from {self.epsilon():.4f} to "
                f"{after:.4f}, past the target {self.target_epsilon} at δ={self.delta:g} "
                f"({self.accountant_name}). {refusal}"
            )
        if self.policy is not None:
            ceiling, delta = self.policy.lifetime_epsilon, self.policy.max_delta
            life = privacy.epsilon_of([*self.history, event], delta, self.accountant_name)
            if life > ceiling * (1 + 1e-6):
                raise privacy.BudgetExceeded(
                    f"lifetime privacy budget: {what} would take ε over every run on this node "
                    f"from {self.lifetime_epsilon():.4f} to {life:.4f}, past the node policy's "
                    f"lifetime-epsilon {ceiling:g} at δ={delta:g} ({self.accountant_name}). "
                    "Not trained; only the platform's operator can change its policy."
                )
        return after

    def state_dict(self) -> dict[str, Any]:
        """What to keep between calls: Opacus's accountant ``state_dict()``, δ and which of
        this run's events were releases."""
        return {
            **self.accountant.state_dict(),
            "delta": self.delta,
            "run": self.run,
            "releases": [list(e) for e in self.releases],
        }

    def to_json(self) -> str:
        return json.dumps(self.state_dict())

    def _restore(self, saved: Mapping[str, Any] | None) -> None:
        """Load the accountant from ``saved`` or from the ledger, whichever has more steps
        (the ledger's releases count for this run only if its last line is this run's)."""
        candidates = [self._from_ledger()]
        if saved is not None:
            state = dict(saved)
            candidates.append(
                (self._checked(state, "this run's saved state"), events(state.get("releases")))
            )
        best, releases = max(candidates, key=lambda c: sum(int(n) for _, _, n in c[0]))
        self.accountant.load_state_dict(
            {"history": list(best), "mechanism": self.accountant.mechanism()}
        )
        self.releases = releases
        subtract(self.history, self.base)  # the history must extend the earlier runs'

    def _checked(self, state: dict[str, Any], where: str) -> list[Event]:
        mechanism = state.get("mechanism")
        if mechanism != self.accountant.mechanism():
            raise privacy.PrivacyConfigError(
                f"{where} was kept with accountant {mechanism!r}, the run asks for "
                f"{self.accountant_name!r}: ε would not compose. Use the same accountant."
            )
        return [(float(s), float(q), int(n)) for s, q, n in state["history"]]

    def _from_ledger(self) -> tuple[list[Event], list[Event]]:
        """The history the ledger last recorded (and this run's releases, if its last line is
        this run's); refuses a ledger that cannot be trusted (fail closed)."""
        if self.ledger is None:
            return self.base, []
        found = self.ledger.last_history()
        if found is None:
            return [], []
        accountant, history, releases = found
        history = self._checked(
            {"mechanism": accountant, "history": history}, f"privacy ledger {self.ledger.path}"
        )
        last_run = self.ledger.last_run()
        return history, releases if last_run == self.run else []

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
        if self.noise_source == noise.SOURCE_SECURE:
            draw = noise.SecureGaussian().normal(1.0, (len(counts),))
        else:
            g = torch.Generator().manual_seed(self.noise_seed(-1 - round_))
            draw = torch.randn(len(counts), generator=g, dtype=torch.float64).numpy()
        self.accountant.step(noise_multiplier=sigma, sample_rate=1.0)
        self.releases.append((sigma, 1.0, 1))
        self.record(round_=round_, steps=0, status=RELEASED)
        return np.asarray(counts, dtype=np.float64) + sigma * draw

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
        Opacus samples at 1 / len(loader): the loader handed to it has the session's number
        of batches (its batch size is not used; Opacus samples each user with probability
        q). The noise comes from :attr:`noise_source`.
        """
        import torch
        from opacus import PrivacyEngine

        from fedrec.client import samplers  # noqa: F401  (registers fedrec's layers with Opacus)

        batches = round(1 / self.sample_rate)
        loader = torch.utils.data.DataLoader(
            loader.dataset,
            batch_sampler=_Batches(len(loader.dataset), batches),  # type: ignore[arg-type]
            collate_fn=loader.collate_fn,
        )

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
                f"{self.sample_rate}"
            )
        if self.noise_source == noise.SOURCE_SECURE:
            noise.install(dp_optimizer)
        return net, dp_optimizer, criterion, dp_loader

    # ------------------------------------------------------------------ the ledger

    def record(
        self, *, round_: int, steps: int, status: str, reason: str = "", kind: str = ""
    ) -> None:
        """One hash-chained, fsynced line per training call (or release, or refusal) on the
        node's disk."""
        if self.ledger is None:
            return
        entry: dict[str, Any] = {
            "run": self.run,
            "round": round_,
            "status": status,
            "steps": steps,
            "noise-multiplier": self.noise_multiplier,
            "sample-rate": self.sample_rate,
            "epsilon": self.epsilon(),
            "delta": self.delta,
            "lifetime-epsilon": self.lifetime_epsilon(),
            "accountant": self.accountant_name,
            "history": [list(e) for e in self.history],
            "releases": [list(e) for e in self.releases],
            "noise-seeded": noise_is_seeded(),
            "noise-source": self.noise_source,
        }
        if self.policy is not None:
            entry["policy"] = self.policy.digest()
        if reason:
            entry["reason"] = reason[:2000]
        if kind:
            entry["kind"] = kind
        self.ledger.append(entry)


class _Batches:
    """A batch sampler of ``batches`` batches over ``n`` examples (the last ones may be
    empty): only its length is read, by Opacus, which replaces it with Poisson sampling."""

    def __init__(self, n: int, batches: int) -> None:
        self.n, self.batches = n, batches

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[list[int]]:
        size = -(-self.n // self.batches)
        for b in range(self.batches):
            yield list(range(b * size, min((b + 1) * size, self.n)))
