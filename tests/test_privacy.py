"""Privacy: Opacus invariants on our model, accounting, the budget guard, the ledger, and the
DP configuration checks.

The three DP-SGD invariants are the ones Opacus's own tests check: per-user clipped gradients
have norm <= C, the noise has std sigma*C/B, and DP off equals plain training.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import tomllib
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from fedrec.client.dp import DPSession
from fedrec.client.ledger import NodeLedger
from fedrec.client.training import (
    LinearizedLoss,
    PerUserCrossEntropy,
    TrainSpec,
    UserExamples,
    candidate_scores,
    linearized_loss,
    output_grads,
    train_local,
)
from fedrec.shared import privacy
from fedrec.shared.config import (
    ConfigError,
    DPConfig,
    FedrecConfig,
    check_delta,
    from_run_config,
)
from fedrec.shared.data import Sequences
from fedrec.shared.model import ModelSpec, RecModel
from fedrec.shared.privacy import (
    BudgetExceeded,
    PrivacyConfigError,
    epsilon_of,
    plan_noise_multiplier,
)

torch.set_num_threads(1)

DIM = 384
N_TOPICS = 12
ROOT = Path(__file__).resolve().parents[1]


def session(
    sigma: float,
    *,
    c: float = 1.0,
    target_epsilon: float = 100.0,
    users: int = 64,
    batch_size: int = 13,  # 64 users count as 100 (their bucket): ceil(100 / 13) = 8 batches
    accountant: str = "rdp",
    ledger: Path | None = None,
    saved: dict | None = None,
) -> DPSession:
    """A DP session with a fixed noise multiplier (no planning) for ``users`` users."""
    dp = DPConfig(
        target_epsilon=target_epsilon,
        max_grad_norm=c,
        noise_multiplier=sigma,
        accountant=accountant,
    )
    return DPSession(
        dp,
        users=users,
        batch_size=batch_size,
        planned_steps=1,
        channel="shop",
        ledger=NodeLedger(ledger, "shop") if ledger is not None else None,
        saved=saved,
    )


def topic_world(
    n_users: int = 64, n_items: int = 120, seed: int = 0
) -> tuple[torch.Tensor, Sequences]:
    """12 random unit topic centres in 384-d; item i = centre[i % 12] + noise (norm ~0.5),
    normalised. Each user has 3..10 items of one topic."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(N_TOPICS, DIM))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    topic = np.arange(n_items) % N_TOPICS
    items = centres[topic] + rng.normal(size=(n_items, DIM)) * (0.5 / np.sqrt(DIM))
    items /= np.linalg.norm(items, axis=1, keepdims=True)
    lengths = rng.integers(3, 11, size=n_users)
    flat = [
        int(rng.choice(np.flatnonzero(topic == t)))
        for t, n in zip(rng.integers(0, N_TOPICS, size=n_users), lengths, strict=True)
        for _ in range(n)
    ]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    users = np.array([f"u{k}" for k in range(n_users)])
    return torch.tensor(items, dtype=torch.float32), Sequences(users, offsets, np.array(flat))


def flat_params(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def one_batch(
    n_users: int = 8, ids: bool = False, negatives: int = 20
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """The item matrix and one fixed batch (x, cands), or (x, ids, cands) with ``ids``, of
    ``n_users`` examples, 4 predictions per user (fewer for short users)."""
    items, seqs = topic_world()
    spec = TrainSpec(negatives=negatives, positions=4, max_history=10)
    inputs, cands = UserExamples(seqs, items, spec, ids=ids).__getitems__(list(range(n_users)))
    return items, (*inputs.values(), cands)


def call(model: torch.nn.Module, batch: tuple[torch.Tensor, ...], rows: slice = slice(None)):  # noqa: ANN201
    """``model`` on a batch's inputs (x [, ids]) at ``rows``."""
    return model(**{k: t[rows] for k, t in zip(("x", "ids"), batch[:-1], strict=False)})


def make_private(
    model: RecModel,
    batch: tuple[torch.Tensor, ...],
    *,
    mode: str,
    noise_multiplier: float,
    max_grad_norm: float,
    lr: float = 0.1,
    loss: torch.nn.Module | None = None,
):  # noqa: ANN202
    """Opacus on ``model`` with a loader that yields exactly ``batch`` (no Poisson sampling),
    fedrec's samplers registered as ``DPSession`` registers them."""
    from opacus import PrivacyEngine

    import fedrec.client.samplers  # noqa: F401

    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(*batch), batch_size=len(batch[0])
    )
    made = PrivacyEngine(accountant="rdp").make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=lr),
        data_loader=loader,
        criterion=loss or PerUserCrossEntropy(),
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        poisson_sampling=False,
        grad_sample_mode=mode,
    )
    if mode == "ghost":
        net, opt, criterion, loader = made
    else:
        (net, opt, loader), criterion = made, loss or PerUserCrossEntropy()
    return net, opt, criterion, next(iter(loader))


def live_scores(model: RecModel, items: torch.Tensor) -> torch.Tensor:
    """The score matrix with the output table's rows inside the graph, so that the loss's
    own gradient reaches them (training reads it through the table's term instead)."""
    if model.item_table is None:
        return items
    return torch.cat([items, model.item_table.padded(len(items))], dim=1)


def per_user_grads(model: RecModel, items: torch.Tensor, batch: tuple[torch.Tensor, ...]):  # noqa: ANN201
    """Brute force: each user's gradient of its own loss, alone, (B, P)."""
    out = []
    for i in range(len(batch[0])):
        model.zero_grad()
        rows = slice(i, i + 1)
        scores = live_scores(model, items)
        logits, labels = candidate_scores(call(model, batch, rows), scores, batch[-1][rows])
        PerUserCrossEntropy()(logits, labels).backward()
        out.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    model.zero_grad()
    return torch.stack(out)


def clip(g: torch.Tensor, c: float) -> torch.Tensor:
    return g * (c / g.norm(dim=1, keepdim=True)).clamp(max=1.0)


# ------------------------------------------------------------------------------ DP-SGD invariants


def test_per_user_gradients_are_clipped_to_max_grad_norm() -> None:
    # Prepare: C far below the natural per-user norms, so clipping is active; no noise.
    items, batch = one_batch()
    model = RecModel()
    brute = per_user_grads(copy.deepcopy(model), items, batch)
    c = 0.05
    net, opt, criterion, b = make_private(
        model, batch, mode="hooks", noise_multiplier=0.0, max_grad_norm=c
    )

    # Execute
    logits, labels = candidate_scores(call(net, b), items, b[-1])
    criterion(logits, labels).backward()
    opt.step()
    n = len(batch[0])
    per_sample = torch.cat([p.grad_sample.reshape(n, -1) for p in model.parameters()], 1)
    opacus_clipped = clip(per_sample, c)
    summed = torch.cat([p.summed_grad.flatten() for p in model.parameters()])

    # Assert: Opacus's per-user gradients are the true ones, clipping was active, every
    # clipped gradient has norm <= C, and the update is built from exactly those.
    torch.testing.assert_close(per_sample, brute, rtol=1e-4, atol=1e-6)
    above = brute.norm(dim=1) > c
    assert above.sum() >= n // 2
    assert opacus_clipped.norm(dim=1).max() <= c * (1 + 1e-5)
    torch.testing.assert_close(
        opacus_clipped[above].norm(dim=1), torch.full((int(above.sum()),), c)
    )
    torch.testing.assert_close(summed, opacus_clipped.sum(0), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize(
    ("mode", "table"),
    [
        ("ghost", False),
        ("hooks", False),
        ("ew", False),
        ("functorch", False),
        ("ghost", True),
        ("hooks", True),
    ],
)
def test_dp_gradient_is_the_mean_of_clipped_per_user_gradients(mode: str, table: bool) -> None:
    # Prepare: no noise; C between the smallest and largest per-user norms (with ``table``, a
    # model with item tables, history bags and output rows alike, which start at zero but
    # whose gradients do not, trained as training does, through the linearized loss).
    items, batch = one_batch(ids=table)
    model = RecModel(ModelSpec(item_table=len(items) if table else 0))
    brute = per_user_grads(copy.deepcopy(model), items, batch)
    norms = brute.norm(dim=1)
    c = float(norms.median())
    net, opt, criterion, b = make_private(
        model,
        batch,
        mode=mode,
        noise_multiplier=0.0,
        max_grad_norm=c,
        loss=LinearizedLoss() if table else None,
    )

    # Execute
    if table:
        criterion(*linearized_loss(model, call(net, b), items, b[-1])[1]).backward()
    else:
        criterion(*candidate_scores(call(net, b), items, b[-1])).backward()
    opt.pre_step()  # clip, accumulate, add (zero) noise, scale by the expected batch size
    grad = torch.cat([p.grad.flatten() for p in model.parameters()])

    # Assert: against the brute-force per-user gradients; every grad-sample mode lands within
    # about 4e-5 relative error on this model.
    assert norms.min() < c < norms.max()
    torch.testing.assert_close(grad, clip(brute, c).mean(0), rtol=1e-3, atol=1e-6)


def test_bag_samplers_give_each_users_own_gradient_of_an_item_table() -> None:
    # Prepare: 5 users x 3 bags x 6 entries over a 7-row table, with padding (-1), items
    # past the table (7, 9), repeats inside a bag and across a user's bags, and a user with
    # no row at all; the gradient with respect to each bag's output is random.
    from fedrec.client.samplers import bag_grads, bag_norms
    from fedrec.shared.model import HistoryBag

    g = torch.Generator().manual_seed(0)
    bag = HistoryBag(7, 4)
    with torch.no_grad():
        bag.weight.normal_(generator=g)
    ids = torch.randint(-1, 10, (5, 3, 6), generator=g)
    ids[0] = torch.tensor([[2, 2, 2, -1, 3, 2], [2, 5, 5, 5, 9, -1], [-1, -1, -1, -1, -1, 2]])
    ids[4] = -1
    backprops = torch.randn(5, 3, 4, generator=g)
    brute = []  # user u's gradient alone: d <bag(ids_u), backprops_u> / d weight
    for u in range(5):
        bag.zero_grad()
        (bag(ids[u : u + 1]) * backprops[u : u + 1]).sum().backward()
        brute.append(bag.weight.grad.clone())
    brute = torch.stack(brute)

    # Execute
    grads = bag_grads(bag, [ids], backprops)[bag.weight]
    norms = bag_norms(bag, [ids], backprops)[bag.weight]

    # Assert
    torch.testing.assert_close(grads, brute)
    torch.testing.assert_close(norms, brute.flatten(1).norm(dim=1))
    assert norms[4] == 0.0 and norms[0] > 0.0


def test_a_dp_session_clips_item_tables_with_fedrecs_samplers() -> None:
    # In a fresh interpreter, so that nothing but the session can have registered the
    # samplers: without them Opacus would fall back to functorch's per-user gradients (slow,
    # and no ghost norms).
    script = """
import torch
from opacus.grad_sample import GradSampleModuleFastGradientClipping as Ghost
from fedrec.client.dp import DPSession
from fedrec.client.training import LinearizedLoss
from fedrec.shared.config import DPConfig
from fedrec.shared.model import HistoryBag, ModelSpec, OutputTable, RecModel

assert HistoryBag not in Ghost.NORM_SAMPLERS, "registered before the session ran"
session = DPSession(DPConfig(noise_multiplier=1.0, grad_sample_mode="ghost"), users=100,
                    batch_size=8, planned_steps=1, channel="c")
data = torch.utils.data.TensorDataset(torch.zeros(8, 770), torch.zeros(8, 3, dtype=torch.long))
model = RecModel(ModelSpec(item_table=5))
net, *_ = session.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1),
                               torch.utils.data.DataLoader(data, batch_size=8), LinearizedLoss())
assert isinstance(net, Ghost)
found = [f"{table[layer].__module__}.{table[layer].__name__}"
         for table in (net.NORM_SAMPLERS, net.GRAD_SAMPLERS) for layer in (HistoryBag, OutputTable)]
assert found == ["fedrec.client.samplers." + name for name in
                 ("bag_norms", "output_norms", "bag_grads", "output_grads")], found
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_output_table_samplers_give_each_users_own_gradient() -> None:
    # Prepare: 4 users x 3 predictions, a 5-row table, score gradients over 6 items (the
    # sixth came after the table and has no row); the loss's gradient with respect to each
    # user's term is random (Opacus scales it by the batch size under mean reduction).
    from fedrec.client.samplers import output_grads as table_grads
    from fedrec.client.samplers import output_norms
    from fedrec.shared.model import OutputTable

    g = torch.Generator().manual_seed(0)
    table = OutputTable(5, 4)
    with torch.no_grad():
        table.weight.normal_(generator=g)
    a, scores = torch.randn(4, 3, 4, generator=g), torch.randn(4, 3, 6, generator=g)
    backprops = torch.randn(4, generator=g)
    brute = []  # user u's gradient alone: d (backprops_u * term_u) / d weight
    for u in range(4):
        table.zero_grad()
        (backprops[u] * table(a[u : u + 1], scores[u : u + 1])).sum().backward()
        brute.append(table.weight.grad.clone())
    brute = torch.stack(brute)

    # Execute
    grads = table_grads(table, [a, scores], backprops)[table.weight]
    norms = output_norms(table, [a, scores], backprops)[table.weight]

    # Assert
    torch.testing.assert_close(grads, brute)
    torch.testing.assert_close(norms, brute.flatten(1).norm(dim=1))


@pytest.mark.parametrize(("low_precision", "table"), [(False, False), (True, False), (False, True)])
def test_ghost_clipping_through_the_linearized_loss_clips_each_user_exactly(
    low_precision: bool, table: bool
) -> None:
    # Prepare: the training path (LinearizedLoss, full-catalogue softmax, optionally bfloat16
    # scores or item tables); C below every per-user norm, so each user's
    # clipped gradient has norm exactly C. With tables, the reference is each user's
    # gradient of its own loss, the output rows inside the graph.
    items, batch = one_batch(ids=table, negatives=0)
    model = RecModel(ModelSpec(item_table=len(items) if table else 0))
    brute_model = copy.deepcopy(model)
    if table:
        brute = per_user_grads(brute_model, items, batch)
    else:
        _, grads, _ = output_grads(call(brute_model, batch), items, batch[-1], low_precision)
        brute = []
        for i in range(len(batch[0])):  # user i's gradient of <output_i, G_i>: J_i^T G_i
            brute_model.zero_grad()
            rows = slice(i, i + 1)
            LinearizedLoss()(call(brute_model, batch, rows), grads[rows]).backward()
            brute.append(torch.cat([p.grad.flatten() for p in brute_model.parameters()]))
        brute = torch.stack(brute)
    c = 0.5 * float(brute.norm(dim=1).min())
    net, opt, criterion, b = make_private(
        model, batch, mode="ghost", noise_multiplier=0.0, max_grad_norm=c, loss=LinearizedLoss()
    )

    # Execute
    criterion(*linearized_loss(model, call(net, b), items, b[-1], low_precision)[1]).backward()
    opt.pre_step()
    grad = torch.cat([p.grad.flatten() for p in model.parameters()])

    # Assert: the update is the mean of the per-user gradients, each scaled to norm C
    torch.testing.assert_close(grad, clip(brute, c).mean(0), rtol=1e-4, atol=1e-7)
    assert float(grad.norm()) <= c * (1 + 1e-5)


@pytest.mark.parametrize("mode", ["ghost", "hooks"])
def test_dp_off_equals_plain_sgd(mode: str) -> None:
    # Prepare: sigma = 0, a clipping bound no gradient reaches, fixed (non-Poisson) batch.
    items, batch = one_batch()
    plain, private = RecModel(), RecModel()
    net, opt, criterion, b = make_private(
        private, batch, mode=mode, noise_multiplier=0.0, max_grad_norm=1e6
    )
    sgd = torch.optim.SGD(plain.parameters(), lr=0.1)

    # Execute
    logits, labels = candidate_scores(call(plain, batch), items, batch[-1])
    PerUserCrossEntropy()(logits, labels).backward()
    sgd.step()
    logits, labels = candidate_scores(call(net, b), items, b[-1])
    criterion(logits, labels).backward()
    opt.step()

    # Assert
    assert not torch.equal(flat_params(plain), flat_params(RecModel()))  # it did train
    torch.testing.assert_close(flat_params(private), flat_params(plain), rtol=0, atol=1e-5)


def _zero_gradient_world() -> tuple[torch.Tensor, Sequences]:
    """Every item has the same vector: all candidates score alike, so each user's gradient is
    zero and a DP update is pure noise."""
    _, seqs = topic_world(n_users=64)
    return torch.full((120, DIM), DIM**-0.5), seqs


def test_noise_std_is_sigma_times_c_over_expected_batch_size() -> None:
    # Prepare: 64 users (counted as their bucket, 100), B = 13 -> 8 batches, sample_rate
    # 1/8, Opacus's expected batch int(64 / 8) = 8; plain SGD, lr 1 for every parameter
    # (the head's projection too).
    items, seqs = _zero_gradient_world()
    model = RecModel()
    before = flat_params(model)
    sigma, c = 2.0, 0.5
    spec = TrainSpec(
        steps=1, batch_size=8, negatives=10, optimizer="sgd", lr=1.0, head_lr_scale=1.0
    )

    # Execute
    train_local(model, items, seqs, spec, dp=session(sigma, c=c))
    update = flat_params(model) - before  # ~130k coordinates

    # Assert: std = sigma * C / 8 = 0.125 (Opacus, loss_reduction="mean"), mean 0.
    expected = sigma * c / 8
    assert float(update.std()) == pytest.approx(expected, rel=0.03)
    assert abs(float(update.mean())) < 5 * expected / len(update) ** 0.5


def test_each_training_call_draws_fresh_noise() -> None:
    # Prepare: two calls with the same spec on pure-noise updates. Noise that a known seed
    # determines is no noise to whoever knows the seed (here: the server, via run config).
    items, seqs = _zero_gradient_world()
    spec = TrainSpec(steps=1, batch_size=8, negatives=10, optimizer="sgd", lr=1.0)
    dp = session(1.0)
    updates = []

    # Execute
    for _ in range(2):
        model = RecModel()
        train_local(model, items, seqs, spec, dp=dp)
        updates.append(flat_params(model) - flat_params(RecModel()))

    # Assert: fresh, unpredictable noise, not the same vector twice.
    assert not torch.allclose(updates[0], updates[1])


def test_benchmark_noise_is_seeded_only_by_the_nodes_own_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: pure-noise updates, as above; the seed comes from the node's environment.
    from fedrec.client.dp import NOISE_SEED_ENV

    items, seqs = _zero_gradient_world()
    spec = TrainSpec(steps=1, batch_size=8, negatives=10, optimizer="sgd", lr=1.0)
    monkeypatch.setenv(NOISE_SEED_ENV, "7")

    def update(channel: str) -> torch.Tensor:
        dp = DPSession(
            DPConfig(target_epsilon=100.0, noise_multiplier=1.0),
            users=64,
            batch_size=8,
            planned_steps=1,
            channel=channel,
        )
        model = RecModel()
        train_local(model, items, seqs, spec, dp=dp)
        return flat_params(model) - flat_params(RecModel())

    # Execute
    first, again, other = update("shop"), update("shop"), update("bank")

    # Assert: the same noise for the same (seed, channel, call); other channels draw their own.
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


# ------------------------------------------------------------------------------ accounting


def test_rdp_matches_opacus_published_vector() -> None:
    # Source: opacus 1.6, opacus/tests/accountants_test.py::AccountingTest.test_rdp_accountant
    # (noise_multiplier 1.5, sample_rate 0.04, steps int(90 / 0.04) = 2250, delta 1e-5).
    eps = epsilon_of([(1.5, 0.04, 2250)], 1e-5, "rdp")

    assert eps == pytest.approx(7.32911117143, abs=1e-8)


@pytest.mark.parametrize(
    ("q", "sigma", "steps", "accountant", "expected"),
    [
        # Opacus 1.6 RDP at δ=1e-5: 1.7118; Google dp_accounting 0.6.0 RDP gives the same.
        (0.01, 1.1, 1000, "rdp", 1.7118),
        # Opacus 1.6 RDP: 5.3676; Google dp_accounting 0.6.0 RDP: 5.3679.
        (0.05, 1.0, 200, "rdp", 5.3676),
        # Opacus 1.6 PRV: 1.5255, equal to Microsoft's prv_accountant upper bound.
        (0.01, 1.1, 1000, "prv", 1.5255),
    ],
)
def test_epsilon_matches_the_cross_checked_table(
    q: float, sigma: float, steps: int, accountant: str, expected: float
) -> None:
    eps = epsilon_of([(sigma, q, steps)], 1e-5, accountant)

    assert eps == pytest.approx(expected, abs=1e-3 if accountant == "prv" else 1e-4)


def test_epsilon_of_nothing_is_zero_and_of_no_noise_is_infinite() -> None:
    assert epsilon_of([], 1e-5, "rdp") == 0.0
    assert epsilon_of([(1.0, 0.1, 0)], 1e-5, "rdp") == 0.0
    assert epsilon_of([(0.0, 0.1, 10)], 1e-5, "rdp") == float("inf")


def test_planned_noise_multiplier_lands_just_under_the_target() -> None:
    # Prepare: a federated plan of q = 0.05, 200 steps, delta 1e-5, target eps 4.
    target = 4.0

    # Execute
    sigma = plan_noise_multiplier(
        target_epsilon=target, target_delta=1e-5, sample_rate=0.05, steps=200, accountant="rdp"
    )
    eps = epsilon_of([(sigma, 0.05, 200)], 1e-5, "rdp")

    # Assert: row E says sigma = 1.0 gives 5.37 > 4, so the plan must add noise.
    assert sigma > 1.0
    assert target - 0.05 <= eps <= target


def test_planning_sigma_keeps_its_search_warnings_to_itself() -> None:
    # Prepare: ecommerce's plan (q = 0.1, 150 steps) at a target no other test caches. Opacus's
    # search warns "Optimal order is the largest alpha" here (checked 2026-11-28).
    with warnings.catch_warnings():
        warnings.simplefilter("error")

        # Execute
        sigma = plan_noise_multiplier(
            target_epsilon=7.5, target_delta=1e-5, sample_rate=0.1, steps=150, accountant="rdp"
        )

    # Assert: no warning escaped, and the plan still holds.
    assert 7.45 <= epsilon_of([(sigma, 0.1, 150)], 1e-5, "rdp") <= 7.5


def test_saved_state_is_opacus_state_dict_and_restores_the_accountant() -> None:
    # Prepare: 2 steps at sigma = 1.25, q = 1/8 (64 users, B = 13) through real training.
    items, seqs = topic_world()
    first = session(1.25)
    train_local(RecModel(), items, seqs, TrainSpec(steps=2, batch_size=8, negatives=10), dp=first)

    # Execute
    saved = json.loads(first.to_json())
    back = session(1.25, saved=saved)

    # Assert: Opacus's own state_dict keys, and the same accountant after the round trip.
    assert saved["mechanism"] == "rdp" and saved["history"] == [[1.25, 0.125, 2]]
    assert back.history == first.history == [(1.25, 0.125, 2)]
    assert back.epsilon() == pytest.approx(first.epsilon())


def test_the_accountant_records_the_steps_the_optimizer_ran() -> None:
    # Prepare
    items, seqs = topic_world()
    dp = session(2.0)

    # Execute
    result = train_local(
        RecModel(), items, seqs, TrainSpec(steps=3, batch_size=8, negatives=10), dp=dp
    )

    # Assert: Opacus's step hook, not the plan, put the 3 steps on record.
    assert result.steps == dp.total_steps() == 3
    assert result.epsilon == pytest.approx(epsilon_of([(2.0, 0.125, 3)], 1e-5, "rdp"))


def test_rounds_compose_to_one_continuous_training() -> None:
    # Prepare: 64 users, B = 13 (q = 1/8); 3 rounds of 2 steps vs one run of 6 steps.
    items, seqs = topic_world()
    carried, once = session(2.0), session(2.0)
    model = RecModel()

    # Execute
    per_round = [
        train_local(
            model, items, seqs, TrainSpec(steps=2, batch_size=8, negatives=10), dp=carried
        ).epsilon
        for _ in range(3)
    ]
    single = train_local(
        RecModel(), items, seqs, TrainSpec(steps=6, batch_size=8, negatives=10), dp=once
    )

    # Assert: same history and epsilon; and epsilon grows every round (no per-round reset).
    assert carried.history == once.history == [(2.0, 0.125, 6)]
    assert per_round[-1] == pytest.approx(single.epsilon, rel=1e-12)
    assert per_round[0] < per_round[1] < per_round[2]


def test_budget_refusal_trains_nothing() -> None:
    # Prepare: a budget of exactly 4 steps at sigma = 2, q = 1/8 (64 users, B = 13); two
    # rounds of 2 steps spend it.
    items, seqs = topic_world()
    sigma = 2.0
    budget = epsilon_of([(sigma, 0.125, 4)], 1e-5, "rdp")
    dp = session(sigma, target_epsilon=budget)
    spec = TrainSpec(steps=2, batch_size=8, negatives=10)
    model = RecModel()
    for _ in range(2):
        train_local(model, items, seqs, spec, dp=dp)
    weights = copy.deepcopy(model.state_dict())

    # Execute / Assert: a third round would exceed the budget.
    with pytest.raises(BudgetExceeded, match="Not training"):
        train_local(model, items, seqs, spec, dp=dp)
    assert dp.history == [(sigma, 0.125, 4)]
    assert dp.epsilon() == pytest.approx(budget)
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())


def test_a_session_plans_sigma_for_the_whole_run() -> None:
    # Prepare: 64 users, B = 13 -> q = 1/8; 5 rounds x 30 steps.
    dp = DPConfig(target_epsilon=8.0, accountant="rdp")

    # Execute
    s = DPSession(dp, users=64, batch_size=13, planned_steps=150, channel="shop")

    # Assert: the σ that 150 steps need, not one round's 30.
    assert s.sample_rate == 0.125
    assert s.noise_multiplier == plan_noise_multiplier(
        target_epsilon=8.0, target_delta=1e-5, sample_rate=0.125, steps=150, accountant="rdp"
    )
    assert s.check_budget(150) <= 8.0 * (1 + 1e-6)
    with pytest.raises(BudgetExceeded):
        s.check_budget(160)


def test_a_session_refuses_delta_at_or_above_one_over_users_and_unknown_accountants() -> None:
    with pytest.raises(PrivacyConfigError, match="1/users"):
        DPSession(DPConfig(target_delta=0.02), users=50, batch_size=8, planned_steps=1, channel="x")
    with pytest.raises(PrivacyConfigError, match="accountant"):
        session(1.0, accountant="gdp")


# ------------------------------------------------------------------------------ ledger


def _write_ledger(path: Path) -> DPSession:
    """Two rounds of 10 steps at (1.1, 0.02) on record, as Opacus's step hook records them."""
    s = session(1.1, ledger=path)
    for round_ in (1, 2):
        for _ in range(10):
            s.accountant.step(noise_multiplier=1.1, sample_rate=0.02)
        s.record(round_=round_, steps=10, status="trained")
    return s


def test_ledger_restores_the_accountant(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "ledger.jsonl"
    written = _write_ledger(path)

    # Execute
    restored = session(1.1, ledger=path)

    # Assert
    assert restored.history == written.history == [(1.1, 0.02, 20)]
    assert restored.epsilon() == pytest.approx(written.epsilon())
    assert session(1.1, ledger=tmp_path / "new" / "ledger.jsonl").history == []


def test_the_ledger_wins_over_a_saved_state_with_fewer_steps(tmp_path: Path) -> None:
    # Prepare: the ledger has 20 steps; this run's saved state only 5 (e.g. an old copy).
    path = tmp_path / "ledger.jsonl"
    _write_ledger(path)
    stale = {"mechanism": "rdp", "history": [[1.1, 0.02, 5]], "delta": 1e-5}
    newer = {"mechanism": "rdp", "history": [[1.1, 0.02, 30]], "delta": 1e-5}

    # Execute / Assert: more steps wins either way, so ε never resets.
    assert session(1.1, ledger=path, saved=stale).total_steps() == 20
    assert session(1.1, ledger=path, saved=newer).total_steps() == 30


def test_a_tampered_ledger_is_refused(tmp_path: Path) -> None:
    # Prepare: rewrite the last entry to claim fewer steps (i.e. a smaller epsilon).
    path = tmp_path / "ledger.jsonl"
    _write_ledger(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    last = json.loads(lines[-1])
    last["history"] = [[1.1, 0.02, 1]]
    path.write_text("\n".join([*lines[:-1], json.dumps(last)]) + "\n", encoding="utf-8")

    # Execute / Assert
    with pytest.raises(PrivacyConfigError, match="failed verification"):
        session(1.1, ledger=path)


def test_a_ledger_kept_with_another_accountant_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    _write_ledger(path)

    with pytest.raises(PrivacyConfigError, match="accountant"):
        session(1.1, ledger=path, accountant="prv")


# ------------------------------------------------------------------------------ configuration


def test_delta_must_be_below_one_over_users() -> None:
    # 100 users -> delta must be < 0.01.
    assert check_delta(0.0099, 100, "shop") is None
    for bad in (0.01, 0.5):
        message = check_delta(bad, 100, "shop")
        assert message is not None and "shop" in message and str(bad) in message


def test_sample_rate_matches_opacus_loader_arithmetic() -> None:
    # 100 users, B = 16 -> ceil(100/16) = 7 batches -> q = 1/7.
    assert privacy.sample_rate_for(100, 16) == pytest.approx(1 / 7)
    # counted from the bucket (101 -> 200 users), so the rate tells no more than num-examples
    assert privacy.sample_rate_for(101, 16) == privacy.sample_rate_for(200, 16) == 1 / 13
    with pytest.raises(PrivacyConfigError):
        privacy.sample_rate_for(0, 16)


def test_run_config_value_problems_are_reported_together() -> None:
    bad = {"strategy": "fedsgd", "dp.target-delta": 1.5, "train.batch-size": 0}
    bad |= {"model.heads": "per-user", "train.positions": 0, "train.scores-dtype": "fp16"}
    bad |= {"train.head-lr-scale": -1.0}

    with pytest.raises(ConfigError) as info:
        from_run_config(bad)

    assert len(info.value.problems) == 7
    text = str(info.value)
    assert "'fedsgd'" in text and "1.5" in text and "train.batch-size" in text
    assert (
        "model.heads must be one of ['channel-tower', 'channel', 'shared']. Found 'per-user'"
        in text
    )
    assert "train.positions" in text and "train.head-lr-scale" in text
    assert "train.scores-dtype must be one of ['auto', 'float32', 'bfloat16']. Found 'fp16'" in text


def test_unknown_keys_and_bad_values_are_reported_at_once() -> None:
    bad = {"dp.epsilon": 8, "strategy": "fedsgd", "dp.target-delta": 1.5}

    with pytest.raises(ConfigError) as info:
        from_run_config(bad)

    text = str(info.value)
    assert "'dp.epsilon'" in text and "'fedsgd'" in text and "1.5" in text


def test_unknown_key_gets_a_hint() -> None:
    with pytest.raises(ConfigError, match="Did you mean 'dp.target-epsilon'"):
        from_run_config({"target-epsilon": 4.0})


def test_pyproject_defaults_equal_the_dataclass_defaults() -> None:
    # Prepare
    with (ROOT / "pyproject.toml").open("rb") as fh:
        run_config = tomllib.load(fh)["tool"]["flwr"]["app"]["config"]

    # Execute / Assert
    assert run_config == FedrecConfig().to_run_config()
    assert from_run_config(run_config) == FedrecConfig()


def test_the_client_refuses_to_train_on_a_tampered_ledger(tmp_path: Path) -> None:
    # Prepare: a node whose ledger claims fewer steps than it recorded (a hash mismatch).
    from flwr.app import Context, RecordDict

    from fedrec.client import local
    from fedrec.client.node import Node

    ledger = tmp_path / "state" / "privacy-ledger.jsonl"
    _write_ledger(ledger)
    lines = ledger.read_text(encoding="utf-8").splitlines()
    last = json.loads(lines[-1])
    last["history"] = [[1.1, 0.02, 1]]
    ledger.write_text("\n".join([*lines[:-1], json.dumps(last)]) + "\n", encoding="utf-8")
    node = Node("shop", tmp_path / "data", tmp_path / "state")
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    _, seqs = topic_world()
    cfg = FedrecConfig(dp=DPConfig(accountant="rdp", noise_multiplier=1.1))

    # Execute / Assert: a refusal the server records (not a crash), saying why.
    with pytest.raises(local.Refused, match=f"{local.BUDGET_REFUSED}.*failed verification"):
        local._guard(cfg, node, context, 3, "train")


# ------------------------------------------------------------------------------ noise and plans


def test_secure_gaussian_has_the_asked_std_and_fresh_keys() -> None:
    from fedrec.client.noise import SecureGaussian

    n, std = 200_000, 3.0
    draws = SecureGaussian().normal(std, (n,))
    z = draws / std

    assert abs(float(z.mean())) < 6 / n**0.5
    assert float(z.std()) == pytest.approx(1.0, abs=6 / (2 * n) ** 0.5)
    assert float((z**4).mean()) == pytest.approx(3.0, abs=0.1)  # Gaussian kurtosis
    assert not np.array_equal(
        SecureGaussian().normal(1.0, (8,)), SecureGaussian().normal(1.0, (8,))
    )


def test_dp_noise_comes_from_the_secure_generator_unless_seeded_for_a_benchmark(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from fedrec.client import noise
    from fedrec.client.dp import NOISE_SEED_ENV
    from fedrec.shared.policy import NodePolicy

    assert session(1.0).noise_source == noise.SOURCE_SECURE
    lax = DPSession(
        DPConfig(noise_multiplier=1.0),
        users=64,
        batch_size=13,
        planned_steps=1,
        channel="shop",
        policy=NodePolicy(secure_noise=False),
    )
    assert lax.noise_source == noise.SOURCE_TORCH
    monkeypatch.setenv(NOISE_SEED_ENV, "1")
    assert session(1.0).noise_source == noise.SOURCE_SEEDED


def test_a_run_that_spent_more_than_planned_is_planned_again_for_the_rest() -> None:
    # Prepare: 3 rounds x 10 steps planned; a lost round 2 was trained twice, so by round 3
    # the run has 30 steps on record where the plan expects 20.
    dp = DPConfig(target_epsilon=4.0, accountant="rdp")
    kwargs = {"users": 64, "batch_size": 13, "planned_steps": 30, "channel": "shop"}
    plan = DPSession(dp, **kwargs)
    spent = {"mechanism": "rdp", "history": [[plan.noise_multiplier, 0.125, 30]], "run": ""}

    # Execute
    again = DPSession(dp, **kwargs, saved=spent, expected_steps=20)
    on_plan = DPSession(
        dp,
        **kwargs,
        saved={**spent, "history": [[plan.noise_multiplier, 0.125, 20]]},
        expected_steps=20,
    )

    # Assert: on plan, σ is unchanged; after the loss, the last 10 steps fit what is left
    assert on_plan.noise_multiplier == plan.noise_multiplier
    assert again.noise_multiplier > plan.noise_multiplier
    assert again.check_budget(10) <= 4.0 * (1 + 1e-6)
    with pytest.raises(BudgetExceeded):
        DPSession(dp, **kwargs, saved=spent).check_budget(10)  # without re-planning
