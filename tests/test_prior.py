"""The item prior: user-level popularity counts, their DP release and the model's use of them."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from fedrec.client.dp import DPSession
from fedrec.client.ledger import RELEASED, NodeLedger
from fedrec.shared import hashlog, privacy
from fedrec.shared.config import DPConfig
from fedrec.shared.data import Sequences
from fedrec.shared.model import TAU, ModelSpec, RecModel, summarize_history, with_prior
from fedrec.shared.prior import popularity_counts, prior_logits


def seqs_of(rows: list[list[int]]) -> Sequences:
    lengths = [len(r) for r in rows]
    return Sequences(
        np.array([f"u{i}" for i in range(len(rows))]),
        np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        np.array([i for r in rows for i in r], dtype=np.int64),
    )


def test_counts_weigh_each_users_distinct_items_by_one_over_sqrt_k() -> None:
    # Hand-computed: u0 holds {0, 1} (item 1 twice) -> 1/sqrt(2) each; u1 holds {1} -> 1.
    counts = popularity_counts(seqs_of([[0, 1, 1], [1]]), 3)
    r = 1 / np.sqrt(2)
    np.testing.assert_allclose(counts, [r, r + 1, 0.0])


def test_one_user_moves_the_counts_by_at_most_one_in_l2() -> None:
    # The Gaussian mechanism's σ is in units of this sensitivity.
    rng = np.random.default_rng(0)
    rows = [list(rng.integers(0, 40, size=rng.integers(1, 30))) for _ in range(50)]
    full = popularity_counts(seqs_of(rows), 40)
    for i in range(len(rows)):
        without = popularity_counts(seqs_of(rows[:i] + rows[i + 1 :]), 40)
        assert np.linalg.norm(full - without) <= 1.0 + 1e-12


def test_prior_logits_are_log1p_of_the_nonnegative_part() -> None:
    np.testing.assert_allclose(prior_logits(np.array([-3.0, 0.0, np.e - 1])), [0.0, 0.0, 1.0])


def test_an_untrained_model_adds_the_prior_to_the_text_score() -> None:
    # Prepare: the same seed with and without the prior column
    g = torch.Generator().manual_seed(0)
    items = torch.nn.functional.normalize(torch.randn(30, 16, generator=g), dim=1)
    prior = np.linspace(0.0, 3.0, 30).astype(np.float32)
    plain = RecModel(ModelSpec(item_dim=16, dim=4, seed=3))
    with_p = RecModel(ModelSpec(item_dim=16, dim=4, seed=3, item_prior=True))
    hist = items[torch.tensor([[1, 2, 5]])]
    mask = torch.ones(1, 3, dtype=torch.bool)

    # Execute
    aug = with_prior(items, prior)
    s_plain = plain(summarize_history(hist, mask)) @ items.T
    s_prior = with_p(summarize_history(aug[torch.tensor([[1, 2, 5]])], mask)) @ aug.T

    # Assert: beta starts at 1, and nothing else reads the prior column yet
    torch.testing.assert_close(s_prior - s_plain, torch.from_numpy(prior).unsqueeze(0))
    assert float(with_p.to_items.bias[-1]) == 1.0
    assert TAU * float(aug[0, -1]) == pytest.approx(float(prior[0]))


def _session(tmp_path: Path | None = None, target: float = 8.0) -> DPSession:
    return DPSession(
        DPConfig(target_epsilon=target, accountant="rdp", prior_share=0.1),
        users=500,
        batch_size=50,
        planned_steps=40,
        channel="shop",
        ledger=None if tmp_path is None else NodeLedger(tmp_path / "ledger.jsonl", "shop"),
        item_prior=True,
    )


def test_the_release_costs_its_share_and_dp_sgd_is_planned_for_the_rest() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = _session()
        release = [(s.prior_noise_multiplier, 1.0, 1)]
        alone = privacy.epsilon_of(release, 1e-5, "rdp")
        planned = privacy.epsilon_of([*release, (s.noise_multiplier, 0.1, 40)], 1e-5, "rdp")
        without = DPSession(
            DPConfig(target_epsilon=8.0, accountant="rdp"),
            users=500,
            batch_size=50,
            planned_steps=40,
            channel="shop",
        )
    assert 0.75 <= alone <= 0.8  # at most 0.1 x 8, to the σ search's tolerance
    assert 7.9 <= planned <= 8.0
    assert s.noise_multiplier > without.noise_multiplier  # DP-SGD gets what is left


def test_release_is_one_accounted_event_recorded_and_restored(tmp_path: Path) -> None:
    # Prepare
    counts = np.arange(20, dtype=np.float64)

    # Execute
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = _session(tmp_path)
        noisy = s.release_prior(counts, round_=1)
        again = _session(tmp_path)

    # Assert: noised, one event (σ_p, 1, 1), no DP-SGD step, in the ledger and back again
    assert noisy.shape == counts.shape and not np.allclose(noisy, counts)
    assert s.history == [(s.prior_noise_multiplier, 1.0, 1)] and s.total_steps() == 0
    line = hashlog.read(tmp_path / "ledger.jsonl")[-1]
    assert line["status"] == RELEASED and line["releases"] == [[s.prior_noise_multiplier, 1.0, 1]]
    assert line["epsilon"] == pytest.approx(s.epsilon()) and s.epsilon() > 0
    assert again.history == s.history and again.releases == s.releases
    assert again.total_steps() == 0


def test_a_release_past_the_budget_is_refused_and_releases_nothing() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = _session(target=8.0)
        s.accountant.step(noise_multiplier=0.3, sample_rate=1.0)  # spend it all first
        before = s.history
        with pytest.raises(privacy.BudgetExceeded, match="item prior"):
            s.release_prior(np.zeros(5), round_=2)
    assert s.history == before and s.releases == []
