"""Tests of the empirical audit that runs the pipeline (audit/empirical.py) and of
the client's audit hook (gradient canaries, the noise-off fault injection)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedrec.audit import stats
from fedrec.audit.empirical import (
    CANARY_PREFIX,
    AuditPlan,
    build_audited_dataset,
    canary_cosines,
    canary_items,
    one_run_guesses,
    one_run_scores,
)
from fedrec.client.dp import DPSession
from fedrec.client.training import (
    TrainSpec,
    canary_directions,
    canary_grad_hook,
    train_local,
)
from fedrec.shared.config import ConfigError, DPConfig, from_run_config
from fedrec.shared.data import Sequences
from fedrec.shared.model import ModelSpec, RecModel

EPSILON, DELTA = 8.0, 1e-5


def _random_users(n_users: int, n_items: int, length: int, seed: int) -> Sequences:
    rng = np.random.default_rng(seed)
    items = rng.integers(0, n_items, size=n_users * length)
    offsets = np.arange(0, n_users * length + 1, length, dtype=np.int64)
    return Sequences(np.array([f"u{i}" for i in range(n_users)]), offsets, items)


def _white_box_epsilon(disable_noise: bool) -> tuple[float, float]:
    """(ε estimate, accountant ε) of one in-process DP-SGD run with 100 gradient canaries."""
    torch.manual_seed(0)
    # P = 6,208 parameters, 128 users: sqrt(P) / users is large enough that, without noise,
    # the other users' gradients do not hide a canary (see the module notes in empirical.py)
    n_items, dim, users, batch, steps, k = 60, 64, 128, 32, 40, 100
    items = torch.nn.functional.normalize(torch.randn(n_items, dim), dim=1)
    model = RecModel(ModelSpec(item_dim=dim, dim=32, seed=0))
    seqs = _random_users(users, n_items, 6, seed=1)
    dp = DPSession(
        DPConfig(target_epsilon=EPSILON, target_delta=DELTA),
        users=users,
        batch_size=batch,
        planned_steps=steps,
        channel="ecommerce",
    )
    shapes = [tuple(p.shape) for p in model.parameters()]
    u = canary_directions(shapes, k, seed=3, channel="ecommerce")
    before = np.concatenate([p.detach().numpy().ravel() for p in model.parameters()])
    hook = canary_grad_hook(
        model,
        u[: k // 2],
        max_grad_norm=1.0,
        sample_rate=dp.sample_rate,
        seed=4,
        disable_noise=disable_noise,
    )
    spec = TrainSpec(steps=steps, batch_size=batch, negatives=10, lr=0.05, optimizer="sgd")
    train_local(model, items, seqs, spec, dp=dp, grad_hook=hook)
    after = np.concatenate([p.detach().numpy().ravel() for p in model.parameters()])
    cos = canary_cosines(before - after, u)  # descent moves along -u_j
    return stats.epsilon_from_canary_cosines(cos[: k // 2], cos[k // 2 :], DELTA), dp.epsilon()


@pytest.mark.slow
def test_white_box_flags_a_run_whose_noise_is_off() -> None:
    # Prepare / Execute
    est_off, claimed_off = _white_box_epsilon(disable_noise=True)
    est_on, claimed_on = _white_box_epsilon(disable_noise=False)

    # Assert: both runs claim ε ≈ 8; only the one with noise stays under it
    assert claimed_off == pytest.approx(claimed_on)
    assert claimed_on <= EPSILON + 1e-6
    assert est_off >= 2 * claimed_off, (est_off, est_on)
    assert est_on < claimed_on, (est_off, est_on)


def test_canary_directions_are_unit_seeded_and_per_channel() -> None:
    # Prepare
    shapes = [(3, 4), (5,)]

    # Execute
    a = canary_directions(shapes, 6, seed=1, channel="social")
    b = canary_directions(shapes, 6, seed=1, channel="social")
    c = canary_directions(shapes, 6, seed=1, channel="finance")

    # Assert
    assert a.shape == (6, 17)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_audit_keys_need_dp_and_are_recorded_in_the_run_config() -> None:
    # Prepare / Execute
    cfg = from_run_config({"audit.disable-noise": True, "audit.canaries": 10})

    # Assert
    assert cfg.to_run_config()["audit.disable-noise"] is True
    with pytest.raises(ConfigError, match="audit.canaries and audit.disable-noise"):
        from_run_config({"audit.disable-noise": True, "dp.enabled": False})
    with pytest.raises(ConfigError, match="audit.canaries must be >= 0. Found -1."):
        from_run_config({"audit.canaries": -1})


def test_one_run_scores_subtract_the_means_over_other_targets_and_histories() -> None:
    # Prepare: 3 canaries, targets 0, 1, 2; row i of the score matrix is history i
    table = np.array([[5.0, 1.0, 3.0], [0.0, 2.0, 4.0], [1.0, 1.0, 1.0]])

    def score(hist: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return table[hist[:, 0]]

    # Execute
    y = one_run_scores(score, np.array([[0], [1], [2]]), np.array([0, 1, 2]))

    # Assert, by hand: y_i = own - row mean of the others - column mean of the others
    #   5 - (1+3)/2 - (0+1)/2 = 2.5; 2 - (0+4)/2 - (1+1)/2 = -1; 1 - (1+1)/2 - (3+4)/2 = -3.5
    np.testing.assert_allclose(y, [2.5, -1.0, -3.5])


@pytest.mark.parametrize(("n", "m", "length"), [(250, 200, 1), (100, 30, 3), (12, 11, 1)])
def test_canaries_share_no_history_item_and_no_target(n: int, m: int, length: int) -> None:
    # Execute
    hist, target = canary_items(np.random.default_rng(0), n, m, length)

    # Assert: (250, 200) is the default world's finance size, where independent draws
    # collided; (12, 11) is the tightest fit
    assert hist.shape == (m, length) and target.shape == (m,)
    assert len(np.unique(hist)) == m * length
    assert len(np.unique(target)) == m
    assert not (hist == target[:, None]).any()
    assert hist.max() < n and target.max() < n


def test_canaries_on_a_small_catalogue_spread_items_evenly() -> None:
    # Execute: 300 canaries over the default world's 250 finance items
    hist, target = canary_items(np.random.default_rng(0), 250, 300, 1)

    # Assert: every item is in one or two histories and is one or two canaries' target
    assert set(np.bincount(hist.ravel(), minlength=250).tolist()) == {1, 2}
    assert set(np.bincount(target, minlength=250).tolist()) == {1, 2}
    assert not (hist == target[:, None]).any()


def test_canaries_that_cannot_be_made_are_refused() -> None:
    # Execute / Assert: a 3-item history cannot avoid its target in a 3-item catalogue
    with pytest.raises(ValueError, match="cannot make 2 canaries of 3 history items over 3"):
        canary_items(np.random.default_rng(0), 3, 2, 3)


def test_one_run_guesses_are_pre_registered_and_fit_m() -> None:
    # Execute
    kp, kn = one_run_guesses(60)

    # Assert: k in (10, 20) since 2k <= 60; (k, 0) and (k, k) each
    assert list(zip(kp, kn, strict=True)) == [(10, 0), (10, 10), (20, 0), (20, 20)]


@pytest.fixture(scope="module")
def small_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny import write_small_world

    return write_small_world(tmp_path_factory.mktemp("audit") / "world", people=200)


def test_inclusion_bits_never_reach_the_clients_files(small_world: Path, tmp_path: Path) -> None:
    # Prepare
    from fedrec.shared.datasets import load_channel

    # Execute
    secrets = build_audited_dataset(
        small_world, tmp_path, AuditPlan(canaries=20, seed=0, max_users=40)
    )

    # Assert: the data folder has only dataset files, no secret; included canaries and only
    # they are in it, with history then target; held-out users are gone
    data_files = {
        p.relative_to(tmp_path / "data").as_posix()
        for p in (tmp_path / "data").rglob("*")
        if p.is_file()
    }
    assert all(
        f == "manifest.json" or f.endswith(("items.csv", "interactions.csv")) for f in data_files
    )
    assert (tmp_path / "secrets" / "canaries.json").exists()
    for ch, sec in secrets["channels"].items():
        _, inter = load_channel(tmp_path / "data", ch)
        users = set(inter.user_ids.tolist())
        for i, inc in enumerate(sec["canary_included"]):
            assert (f"{CANARY_PREFIX}-{ch}-{i:04d}" in users) == inc
        assert not users & set(sec["heldout_users"])
        assert not users & set(sec["dropped_users"])
        real = {u for u in users if not u.startswith(CANARY_PREFIX)}
        assert len(real) == 40 - len(sec["heldout_users"]) == 20
        i = sec["canary_included"].index(True)
        rows = inter.item_index[inter.user_ids == f"{CANARY_PREFIX}-{ch}-{i:04d}"]
        t = sec["canary_target"][i]
        assert rows.tolist() == [*sec["canary_history"][i], t, t]
    text = "".join(p.read_text() for p in (tmp_path / "data").rglob("*.json"))
    assert "canary_included" not in text and "heldout" not in text


@pytest.mark.simulation
@pytest.mark.slow
def test_end_to_end_in_the_simulation_engine(
    small_world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    import socket

    from fedrec.audit.empirical import run_empirical_audit
    from tests.tiny import save_tiny_bert

    # Flower's managed local SuperLink listens on fixed ports (39091, 39093) unless told
    # otherwise: a simulation running beside this one would otherwise take over this run.
    for var in ("FLWR_LOCAL_SUPERLINK_HTTP_API_PORT", "FLWR_LOCAL_CONTROL_API_PORT"):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            monkeypatch.setenv(var, str(sock.getsockname()[1]))

    bert = save_tiny_bert(tmp_path / "bert")
    overrides = {
        "encoder-dir": str(bert),
        "cache-dir": str(tmp_path / "cache"),
        "model.dim": 32,
        "model.hidden": 256,  # P = 27,968 parameters: noise-off canaries stand out
        "train.negatives": 20,
        "eval.max-users": 100,
        "num-server-rounds": 1,
        "train.local-steps": 20,
    }

    # Execute
    summary = run_empirical_audit(
        tmp_path / "out",
        world_dir=small_world,
        epsilon=EPSILON,
        plan=AuditPlan(canaries=20, grad_canaries=200),
        runs=("dp", "noise-off"),
        overrides=overrides,
    )

    # Assert: the noise-off run is caught, the DP run's white-box estimate is under its claim,
    # and the fault-injection switch is on record in that run's config.json
    assert summary["fault_injection"]["caught"], summary["fault_injection"]
    dp_rows = [r for r in summary["rows"] if r["method"] == "canary-cosine" and not r["control"]]
    assert dp_rows and all(r["epsilon_empirical"] < r["epsilon_theory"] for r in dp_rows)
    config = json.loads((tmp_path / "out/runs/noise-off/config.json").read_text())
    assert config["run_config"]["audit.disable-noise"] is True
    assert (tmp_path / "out/audit/audit.md").exists()
