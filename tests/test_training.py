"""Local training and evaluation (client/training.py): the leave-last-out split, per-user
examples, negatives, and the errors for data that cannot be trained or evaluated."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedrec.client import training
from fedrec.client.training import (
    Split,
    TrainSpec,
    UserExamples,
    evaluate,
    leave_last_out,
    model_scorer,
    pad_histories,
    train_local,
)
from fedrec.shared.data import Sequences
from fedrec.shared.model import ModelSpec, RecModel
from fedrec.simulations.baselines import popularity_scorer, text_similarity_scorer
from tests.tiny import CliResult, fedrec_cli

torch.set_num_threads(1)

DIM = 384
N_TOPICS = 12


def sequences(rows: list[list[int]]) -> Sequences:
    """CSR sequences from per-user item lists (users named u0, u1, ...)."""
    lengths = np.array([len(r) for r in rows], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    flat = np.array([i for r in rows for i in r], dtype=np.int64)
    return Sequences(np.array([f"u{k}" for k in range(len(rows))]), offsets, flat)


def topic_world(
    n_users: int = 64, n_items: int = 120, shift: int = 0, seed: int = 0
) -> tuple[torch.Tensor, Sequences]:
    """12 random unit topic centres in 384-d; item i = centre[i % 12] + noise (norm ~0.5),
    normalised. Each user has 3..10 items; the k-th is drawn from topic (t0 + shift * k) % 12,
    so ``shift=0`` is one topic per user and ``shift=1`` an interest that moves on each time."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(N_TOPICS, DIM))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    topic = np.arange(n_items) % N_TOPICS
    items = centres[topic] + rng.normal(size=(n_items, DIM)) * (0.5 / np.sqrt(DIM))
    items /= np.linalg.norm(items, axis=1, keepdims=True)
    rows = []
    for t0 in rng.integers(0, N_TOPICS, size=n_users):
        length = int(rng.integers(3, 11))
        pools = [np.flatnonzero(topic == (t0 + shift * k) % N_TOPICS) for k in range(length)]
        rows.append([int(rng.choice(pool)) for pool in pools])
    return torch.tensor(items, dtype=torch.float32), sequences(rows)


# ------------------------------------------------------------------------------ split


def test_leave_last_out_holds_out_the_last_item_and_drops_short_users() -> None:
    # Prepare: u0 has 1 interaction (dropped), u1 has 2, u2 has 4.
    seqs = sequences([[7], [1, 2], [3, 4, 5, 6]])

    # Execute
    split = leave_last_out(seqs)

    # Assert
    assert split.train.users.tolist() == ["u1", "u2"]
    assert split.target.tolist() == [2, 6]
    assert split.train.offsets.tolist() == [0, 1, 4]
    assert split.train.item_index.tolist() == [1, 3, 4, 5]


def test_leave_last_out_of_nobody_usable_is_empty() -> None:
    split = leave_last_out(sequences([[1], [2]]))

    assert len(split.train) == 0 and len(split.target) == 0
    assert split.train.offsets.tolist() == [0]


def test_pad_histories_left_pads_and_keeps_the_most_recent_window() -> None:
    # Prepare: one user with items 10..16; windows ending before position 5 and 2.
    seqs = sequences([[10, 11, 12, 13, 14, 15, 16]])

    # Execute
    hist, mask = pad_histories(seqs, np.array([0, 0]), np.array([5, 2]), max_len=3)

    # Assert
    assert hist.tolist() == [[12, 13, 14], [0, 10, 11]]
    assert mask.tolist() == [[True, True, True], [False, True, True]]


# ------------------------------------------------------------------------------ examples


def test_examples_are_prefixes_of_the_training_split_only() -> None:
    # Prepare: held-out items (90+) never occur in the training split.
    full = sequences([[1, 2, 3, 90], [4, 5, 91], [6, 92], [7, 8, 9, 10, 93]])
    split = leave_last_out(full)
    items = torch.nn.functional.normalize(torch.randn(100, DIM), dim=1)
    examples = UserExamples(split.train, items, TrainSpec(negatives=3, positions=2))
    train_rows = [
        split.train.item_index[s:e].tolist()
        for s, e in zip(split.train.offsets[:-1], split.train.offsets[1:], strict=True)
    ]

    # Execute: many redraws of every example.
    seen_targets = set()
    for _ in range(50):
        idx = list(range(len(examples)))
        inputs, cands = examples.__getitems__(idx)
        x = inputs["x"]
        assert x.shape == (3, 2, 2 * DIM) and cands.shape == (3, 2, 4)
        for k, row in enumerate(examples.rows[idx]):
            seq = train_rows[row]
            used = [p for p in range(2) if cands[k, p, 0] >= 0]
            # Assert: min(positions, len - 1) predictions; each summarises a prefix of the
            # user's own training sequence and names the item that followed it.
            assert len(used) == min(2, len(seq) - 1)
            assert (cands[k, len(used) :] == -1).all()
            cuts = set()
            for p in used:
                target = int(cands[k, p, 0])
                seen_targets.add(target)
                t = seq.index(target)  # items are unique per row here
                assert t >= 1
                cuts.add(t)
                mean = items[seq[:t]].mean(0)
                torch.testing.assert_close(x[k, p, :DIM], mean, rtol=0, atol=1e-6)
            assert len(cuts) == len(used)  # distinct prefixes

    # Assert: u2 ([6] after the split) has no prefix+next pair and is never an example;
    # no held-out item is ever a training target; every possible target is drawn.
    assert len(examples) == 3
    assert seen_targets.isdisjoint({90, 91, 92, 93})
    assert seen_targets == {2, 3, 5, 8, 9, 10}


def test_draw_prefixes_are_distinct_and_cover_every_position_uniformly() -> None:
    # Prepare: a user of length 9 has prefixes 1..8; 4 are drawn per access.
    examples = UserExamples(
        sequences([[0] * 9, [0, 1]]), torch.randn(2, DIM), TrainSpec(positions=4)
    )

    # Execute: 4,000 draws for the long user.
    cut = examples.draw_prefixes(np.full(1000, 9))
    short = examples.draw_prefixes(np.array([2]))

    # Assert: in [1, 8], distinct per row, each prefix 500 +- 5 sigma times
    # (binomial sigma = sqrt(1000 * 0.5 * 0.5) = 15.8); the short user has one prefix.
    assert cut.min() >= 1 and cut.max() <= 8
    assert all(len(set(r)) == 4 for r in cut.tolist())
    counts = np.bincount(cut.ravel(), minlength=9)[1:]
    assert np.abs(counts - 500).max() < 5 * 15.8
    assert short.tolist() == [[1, 0, 0, 0]]


def test_negatives_are_uniform_over_the_catalogue() -> None:
    # Prepare: 20 items; 200 users x 100 negatives = 20,000 draws, 1,000 expected per item.
    n_items = 20
    examples = UserExamples(
        sequences([[0, 1]] * 200), torch.randn(n_items, DIM), TrainSpec(negatives=100)
    )

    # Execute
    _, cands = examples.__getitems__(list(range(200)))
    counts = np.bincount(cands[:, 0, 1:].numpy().ravel(), minlength=n_items)

    # Assert: every item in [0, N) is drawn, none outside, each within 5 sigma of 1,000
    # (binomial sigma = sqrt(20000 * 0.05 * 0.95) = 30.8).
    assert len(counts) == n_items
    assert np.abs(counts - 1000).max() < 5 * 30.8


def test_examples_of_an_empty_poisson_batch_are_empty_tensors() -> None:
    examples = UserExamples(
        sequences([[0, 1, 2]]), torch.randn(10, DIM), TrainSpec(negatives=4, positions=3)
    )

    inputs, cands = examples.__getitems__([])
    x = inputs["x"]

    assert x.shape == (0, 3, 2 * DIM) and cands.shape == (0, 3, 5)


def test_per_user_loss_averages_each_users_predictions_then_the_users() -> None:
    # Prepare: user 0 has two predictions, one over 2 live candidates (loss ln 2) and one over
    # 4 equal logits (ln 4); user 1 has one prediction over 4 (ln 4) and a padding slot.
    logits = torch.zeros(2, 2, 4)
    logits[0, 0, 2:] = -1e9  # 2 live candidates -> loss ln 2
    labels = torch.tensor([[0, 1], [3, -1]])

    # Execute
    per_user = training.PerUserCrossEntropy("none")(logits, labels)
    mean = training.PerUserCrossEntropy()(logits, labels)

    # Assert: user 0: (ln 2 + ln 4) / 2; user 1: ln 4 (padding ignored); mean of users.
    expected = torch.tensor([(np.log(2) + np.log(4)) / 2, np.log(4)], dtype=torch.float32)
    torch.testing.assert_close(per_user, expected)
    torch.testing.assert_close(mean, expected.mean())
    # the packed form (one row per used prediction, row-major) gives the same losses
    packed = logits[labels >= 0]  # (3, 4)
    torch.testing.assert_close(training.PerUserCrossEntropy("none")(packed, labels), expected)


def test_full_softmax_loss_inputs_are_packed_and_match_the_padded_logits() -> None:
    # Prepare: 3 users of 4 positions, 2 of them with padding; no sampled negatives
    torch.manual_seed(0)
    model, items = RecModel(ModelSpec(item_dim=DIM, dim=4)), torch.randn(7, DIM)
    x = torch.randn(3, 4, 2 * DIM)
    cands = torch.tensor([[1, 2, 3, 4], [5, -1, -1, -1], [6, 0, -1, -1]]).unsqueeze(-1)

    # Execute
    logits, labels = training.candidate_scores(model(x), items, cands)
    loss = training.PerUserCrossEntropy("none")(logits, labels)

    # Assert: 7 used predictions, each row the padded model's full-catalogue scores
    used = cands[..., 0] >= 0
    assert logits.shape == (7, 7)
    with torch.no_grad():
        padded = model(x) @ items.T  # (3, 4, 7)
        torch.testing.assert_close(logits.detach(), padded[used])
        torch.testing.assert_close(
            loss, training.PerUserCrossEntropy("none")(padded, labels), rtol=1e-5, atol=1e-6
        )


@pytest.mark.parametrize(("negatives", "table"), [(0, False), (5, False), (0, True), (5, True)])
def test_linearized_loss_has_the_gradient_of_the_per_user_loss(negatives: int, table: bool) -> None:
    # Prepare: two copies of one model (with ``table``, item tables with random rows), a batch
    # with padding, full softmax or sampled negatives
    items, seqs = topic_world(n_users=16)
    spec = TrainSpec(negatives=negatives, positions=4, max_history=10)
    inputs, cands = UserExamples(seqs, items, spec, ids=table).__getitems__(list(range(16)))
    model_spec = ModelSpec(own_tower=True, item_table=len(items) if table else 0)
    direct, linear = RecModel(model_spec), RecModel(model_spec)
    with torch.no_grad():  # trained-looking parameters, so every parameter gets a gradient
        for m in (direct, linear):
            g = torch.Generator().manual_seed(3)
            m.profile_own.weight.copy_(
                torch.linspace(-0.01, 0.01, m.profile_own.weight.numel()).view_as(
                    m.profile_own.weight
                )
            )
            for layer in (m.item_table, m.history_table, m.recent_table):
                if layer is not None:
                    layer.weight.normal_(0.0, 0.01, generator=g)

    # Execute: the loss itself, the output rows inside the graph; and the linearized loss
    scores = items
    if table:
        scores = torch.cat([items, direct.item_table.padded(len(items))], dim=1)
    logits, labels = training.candidate_scores(direct(**inputs), scores, cands)
    loss = training.PerUserCrossEntropy("none")(logits, labels)
    loss.mean().backward()
    per_user, args = training.linearized_loss(linear, linear(**inputs), items, cands)
    training.LinearizedLoss()(*args).backward()

    # Assert: same per-user losses, same gradient for every parameter
    torch.testing.assert_close(per_user, loss.detach())
    for (name, a), b in zip(direct.named_parameters(), linear.parameters(), strict=True):
        assert a.grad is not None and a.grad.abs().sum() > 0, name
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-7, msg=name)


def test_low_precision_scores_stay_close_to_float32() -> None:
    # Prepare
    items, seqs = topic_world(n_users=16)
    inputs, cands = UserExamples(seqs, items, TrainSpec(positions=4)).__getitems__(list(range(16)))
    x = inputs["x"]
    users = RecModel()(x).detach()

    # Execute
    full, labels = training.candidate_scores(users, items, cands)
    low, _ = training.candidate_scores(users, items, cands, low_precision=True)
    g_full = training.output_grads(users, items, cands)[1]
    g_low = training.output_grads(users, items, cands, low_precision=True)[1]

    # Assert: bfloat16 products were used (the scores differ) but keep 8 bits of mantissa:
    # logits within 1% of their scale, gradients pointing the same way; both come back float32.
    assert low.dtype == full.dtype == torch.float32
    assert not torch.equal(low, full)
    assert (low - full).abs().max() <= 0.01 * full.abs().max()
    cos = torch.nn.functional.cosine_similarity(g_low.flatten(1), g_full.flatten(1), dim=1)
    assert cos.min() > 0.999


# ------------------------------------------------------------------------------ training


def test_train_local_without_trainable_users_raises() -> None:
    # Prepare: after a leave-last-out split every user has a single training item.
    split = leave_last_out(sequences([[1, 2], [3, 4]]))
    model = RecModel()

    # Execute / Assert
    with pytest.raises(ValueError, match="nothing to train on"):
        train_local(model, torch.randn(10, DIM), split.train, TrainSpec(steps=1))


def test_train_local_learns_what_text_similarity_cannot() -> None:
    # Prepare: each next item comes from the next topic, so the untrained model (which ranks
    # by similarity to the history) never finds the target; training can learn the shift.
    items, seqs = topic_world(shift=1)
    split = leave_last_out(seqs)
    model = RecModel()
    before, _ = evaluate(model_scorer(model, items), len(items), split)
    spec = TrainSpec(steps=30, batch_size=32, negatives=20, lr=0.003)

    # Execute
    result = train_local(model, items, split.train, spec)
    after, _ = evaluate(model_scorer(model, items), len(items), split)

    # Assert
    assert result.steps == 30 and result.epsilon == 0.0 and result.noise_multiplier == 0.0
    assert before["ndcg@10"] < 0.05
    assert after["ndcg@10"] > 0.25


def test_head_projection_learns_at_head_lr_scale_times_the_rest() -> None:
    # Prepare: the same first SGD step (same seed, same batch) at head-lr-scale 1 and 3.
    items, seqs = topic_world(shift=1)
    split = leave_last_out(seqs)
    deltas = []
    for scale in (1.0, 3.0):
        model = RecModel()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        spec = TrainSpec(
            steps=1, batch_size=32, negatives=20, optimizer="sgd", lr=0.1, head_lr_scale=scale
        )

        # Execute
        train_local(model, items, split.train, spec)
        deltas.append({k: v - before[k] for k, v in model.state_dict().items()})

    # Assert: W_o moved 3x as far; every other parameter (b included) moved the same.
    (slow, fast) = deltas
    assert float(slow["to_items.weight"].norm()) > 0
    assert torch.allclose(fast["to_items.weight"], 3 * slow["to_items.weight"], atol=1e-7)
    for name in ("profile_lin.weight", "to_items.bias"):
        assert torch.allclose(fast[name], slow[name], atol=1e-7), name


def test_proximal_step_pulls_each_parameter_at_its_own_learning_rate() -> None:
    # Prepare: the same SGD step from the same start with mu = 0 and mu = 0.5, the global
    # model 0.1 away from the start. The proximal step after it is w -= lr_group * mu * (w - g).
    items, seqs = topic_world(shift=1)
    split = leave_last_out(seqs)
    start = RecModel().state_dict()
    global_params = {k: v + 0.1 for k, v in start.items()}
    after = []
    for mu in (0.0, 0.5):
        model = RecModel()
        spec = TrainSpec(
            steps=1, batch_size=32, negatives=20, optimizer="sgd", lr=0.1, proximal_mu=mu
        )

        # Execute
        train_local(model, items, split.train, spec, global_params=global_params)
        after.append(model.state_dict())

    # Assert: W_o is pulled at lr x head_lr_scale (0.25), the rest at lr (0.1).
    plain, prox = after
    for name in plain:
        lr = 0.1 * (spec.head_lr_scale if name == "to_items.weight" else 1.0)
        expected = plain[name] - lr * 0.5 * (plain[name] - global_params[name])
        assert torch.allclose(prox[name], expected, atol=1e-6), name


def test_head_pull_moves_only_the_head_toward_the_mean_head() -> None:
    # Prepare: as above, with a mean head 0.1 away from the start for the head's parameters
    # only; the MR-MTL step after the update is h -= lr_group * head_pull * (h - h_mean).
    items, seqs = topic_world(shift=1)
    split = leave_last_out(seqs)
    start = RecModel().state_dict()
    mean = {k: v + 0.1 for k, v in start.items() if k.startswith("to_items.")}
    after = []
    for pull in (0.0, 0.5):
        model = RecModel()
        spec = TrainSpec(
            steps=1, batch_size=32, negatives=20, optimizer="sgd", lr=0.1, head_pull=pull
        )

        # Execute
        train_local(model, items, split.train, spec, head_mean=mean)
        after.append(model.state_dict())

    # Assert: W_o pulled at lr x head_lr_scale, b at lr, the tower not at all.
    plain, pulled = after
    for name in plain:
        if name in mean:
            lr = 0.1 * (spec.head_lr_scale if name == "to_items.weight" else 1.0)
            expected = plain[name] - lr * 0.5 * (plain[name] - mean[name])
        else:
            expected = plain[name]
        assert torch.allclose(pulled[name], expected, atol=1e-6), name


def test_head_mean_averages_every_platforms_head() -> None:
    # Prepare: two platforms' heads set to 1 and 3 everywhere.
    from fedrec.shared.model import CrossPlatformModel

    model = CrossPlatformModel(ModelSpec(own_tower=True), ("a", "b"))
    with torch.no_grad():
        for value, head in zip((1.0, 3.0), model.heads.values(), strict=True):
            for param in head.parameters():
                param.fill_(value)

    # Execute
    mean = model.head_mean()

    # Assert: under RecModel's names, every value 2; the shared tower is not part of it.
    assert sorted(mean) == ["profile_own.weight", "to_items.bias", "to_items.weight"]
    assert all(torch.all(v == 2.0) for v in mean.values())
    assert CrossPlatformModel(ModelSpec(), ("a",)).head_mean() == {}


# ------------------------------------------------------------------------------ evaluation


def test_evaluate_excludes_training_items_and_counts_users() -> None:
    # Prepare: scores prefer lower item indices (item 0 best). User 0 trained on 0 and 1,
    # target 3 -> only item 2 is above it: rank 2. User 1 trained on 5, target 0 -> rank 1.
    split = Split(sequences([[0, 1], [5]]), np.array([3, 0]))

    def score(hist: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return np.tile(-np.arange(6, dtype=np.float64), (len(hist), 1))

    # Execute
    metrics, users = evaluate(score, 6, split)

    # Assert: MRR = (1/2 + 1)/2, NDCG@10 = (1/log2(3) + 1)/2.
    assert users == 2
    assert metrics["mrr"] == pytest.approx(0.75)
    assert metrics["ndcg@10"] == pytest.approx((1 / np.log2(3) + 1) / 2)


def test_evaluate_an_empty_split_raises() -> None:
    empty = leave_last_out(sequences([[1]]))
    model = RecModel()

    with pytest.raises(ValueError, match="no users"):
        evaluate(model_scorer(model, torch.randn(10, DIM)), 10, empty)


def test_evaluate_caps_the_number_of_users() -> None:
    items, seqs = topic_world(n_users=30)
    split = leave_last_out(seqs)

    _, users = evaluate(model_scorer(RecModel(), items), len(items), split, max_users=7)

    assert users == 7


@pytest.mark.parametrize("bad", [25, -3])
def test_item_indices_outside_the_catalogue_are_refused_clearly(bad: int) -> None:
    # Prepare: a 20-item catalogue and a sequence that names item `bad`.
    seqs = sequences([[0, 1, bad, 2], [3, 4, 5]])
    model = RecModel()

    # Execute / Assert
    with pytest.raises(ValueError, match=str(bad)):
        train_local(model, torch.randn(20, DIM), seqs, TrainSpec(steps=2, batch_size=2))


# ------------------------------------------------------------------------------ baselines


def test_popularity_scores_training_counts_for_every_user() -> None:
    # Prepare: item 1 occurs 3 times, items 0 and 2 once, item 3 never.
    train = sequences([[0, 1, 1], [1, 2]])

    # Execute
    scores = popularity_scorer(train, 4)(np.zeros((2, 3), np.int64), np.ones((2, 3), bool))

    # Assert
    assert scores.tolist() == [[1, 3, 1, 0], [1, 3, 1, 0]]


def test_popularity_refuses_items_outside_the_catalogue() -> None:
    with pytest.raises(ValueError, match="item index 4"):
        popularity_scorer(sequences([[0, 4]]), 4)


def test_text_similarity_is_cosine_to_the_mean_history() -> None:
    # Prepare: 2-d items e0, e1, (e0+e1)/sqrt2, -e0 (the scorer takes any dimension).
    # History = items 0 and 1 after one padded slot (which holds item 3 and must not count).
    items = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2**-0.5, 2**-0.5], [-1.0, 0.0]])
    hist = np.array([[3, 0, 1]])
    mask = np.array([[False, True, True]])

    # Execute
    scores = text_similarity_scorer(items)(hist, mask)

    # Assert: mean (0.5, 0.5) -> unit (1, 1)/sqrt2; cosines 0.707, 0.707, 1, -0.707.
    np.testing.assert_allclose(scores, [[2**-0.5, 2**-0.5, 1.0, -(2**-0.5)]], atol=1e-6)


# ------------------------------------------------------------------------------ fedrec train


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One channel 'shop': 150 users, 48 items, encoded matrices under encoded/."""
    from fedrec.simulations.bench.quality import write_tiny_dataset

    return write_tiny_dataset(
        tmp_path_factory.mktemp("data") / "tiny", channels=("shop",), users=150, items=48
    )


def fedrec_train(args: list[str]) -> CliResult:
    """``fedrec train ARGS`` in-process, through the command line's own error path."""
    return fedrec_cli(["train", *args])


def test_fedrec_train_with_dp_prints_baselines_model_and_privacy(tiny_dataset: Path) -> None:
    # Execute: 150 users count as 200 (their bucket), B = 8 -> 25 batches, q = 1/25.
    result = fedrec_train(
        [
            "--data",
            str(tiny_dataset),
            "--channel",
            "shop",
            "--steps",
            "3",
            "--batch-size",
            "8",
            "--epsilon",
            "4",
            "--max-eval-users",
            "40",
        ]
    )

    # Assert
    assert result.exit_code == 0, result.output
    out = result.output
    assert "popularity" in out and "text similarity" in out and "model (DP, ε=" in out
    assert "NDCG@10" in out and "Recall@20" in out and "MRR" in out
    spent = float(out.split("model (DP, ε=")[1].split(")")[0])
    assert 0 < spent <= 4.0
    assert "40 users" in out and "0.04" in out  # evaluated users; q = 1/25


def test_fedrec_train_item_table_trains_rows_per_item(tiny_dataset: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import fedrec.client.standalone as standalone

    trained = []
    fit = standalone.fit

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        model, result = fit(*args, **kwargs)
        trained.append(model)
        return model, result

    monkeypatch.setattr(standalone, "fit", spy)

    result = fedrec_train(
        ["--data", str(tiny_dataset), "--channel", "shop", "--no-dp", "--steps", "3"]
        + ["--batch-size", "8", "--max-eval-users", "20", "--item-table"]
    )

    assert result.exit_code == 0, result.output
    (model,) = trained
    assert model.item_table.weight.shape == (48, model.spec.dim)  # 48 shop items
    assert model.history_table.weight.shape == (49, model.spec.dim)  # and a row for "no item"
    for table in (model.item_table, model.history_table, model.recent_table):
        assert table.weight.abs().sum() > 0  # trained from zero


def test_fedrec_train_without_dp_says_so(tiny_dataset: Path) -> None:
    result = fedrec_train(
        [
            "--data",
            str(tiny_dataset),
            "--channel",
            "shop",
            "--no-dp",
            "--steps",
            "2",
            "--batch-size",
            "8",
            "--max-eval-users",
            "20",
        ]
    )

    assert result.exit_code == 0, result.output
    assert "model (no DP)" in result.output and "no privacy guarantee" in result.output


def test_fedrec_train_asks_for_fedrec_encode_when_the_matrix_is_missing(
    tiny_dataset: Path, tmp_path: Path
) -> None:
    result = fedrec_train(
        ["--data", str(tiny_dataset), "--channel", "shop", "--items", str(tmp_path)]
    )

    assert result.exit_code == 2
    assert "fedrec encode" in result.output and "shop.items.npz" in result.output


def test_fedrec_train_refuses_delta_at_or_above_one_over_users(tiny_dataset: Path) -> None:
    result = fedrec_train(["--data", str(tiny_dataset), "--channel", "shop", "--delta", "0.01"])

    assert result.exit_code == 2
    assert "1/users" in result.output and "0.01" in result.output


def test_fedrec_train_names_the_known_channels(tiny_dataset: Path) -> None:
    result = fedrec_train(["--data", str(tiny_dataset), "--channel", "bank"])

    assert result.exit_code == 2
    assert "'bank'" in result.output and "'shop'" in result.output


@pytest.mark.parametrize("full_score_max", [10_000, 0])
def test_candidate_logits_equal_full_ranking_scores(
    full_score_max: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: both code paths (score the catalogue then pick; gather the candidates).
    monkeypatch.setattr(training, "FULL_SCORE_MAX", full_score_max)
    items, _ = topic_world(n_items=30)
    model = RecModel()
    hist = items[torch.randint(0, 30, (5, 4))]
    mask = torch.ones(5, 4, dtype=torch.bool)
    cands = torch.randint(0, 30, (5, 7))

    # Execute
    with torch.no_grad():
        users = model.profile(hist, mask)
        logits = training.candidate_logits(users, items, cands)
        full = model.score_items(users, items)

    # Assert
    torch.testing.assert_close(logits, torch.gather(full, 1, cands), rtol=1e-5, atol=1e-4)


def test_scores_dtype_auto_follows_the_cpu(tmp_path: Path) -> None:
    # Prepare: cpuinfo files with and without native bfloat16 dot products
    with_bf16, without = tmp_path / "a", tmp_path / "b"
    with_bf16.write_text("flags\t: fpu avx2 avx512f avx512_bf16\n")
    without.write_text("flags\t: fpu avx2 avx512f\n")

    # Execute / Assert: explicit choices pass through; auto reads the CPU's flags
    assert training.resolve_scores_dtype("float32", with_bf16) == "float32"
    assert training.resolve_scores_dtype("bfloat16", without) == "bfloat16"
    assert training.resolve_scores_dtype("auto", with_bf16) == "bfloat16"
    assert training.resolve_scores_dtype("auto", without) == "float32"
    assert training.resolve_scores_dtype("auto", tmp_path / "missing") == "float32"


def test_dp_training_steps_through_empty_poisson_batches() -> None:
    # Prepare: 8 users (counted as 100, their bucket) and B = 13 -> 8 batches: sampled at
    # q = 1/8, so a step draws nobody with probability (7/8)^8 = 0.34; 20 steps see at least
    # one empty batch except with probability 2e-4.
    from fedrec.client.dp import DPSession
    from fedrec.shared.config import DPConfig

    items, seqs = topic_world(n_users=8)
    dp = DPSession(
        DPConfig(target_epsilon=1e9, noise_multiplier=1.0),
        users=8,
        batch_size=13,
        planned_steps=20,
        channel="shop",
    )

    # Execute
    result = train_local(
        RecModel(), items, seqs, TrainSpec(steps=20, batch_size=1, positions=4), dp=dp
    )

    # Assert: every step ran and was accounted, empty ones included
    assert result.steps == 20 and dp.total_steps() == 20
    assert np.isfinite(result.loss)


# ------------------------------------------------------------------ windows (attention tower)


def test_windows_predict_the_next_item_of_the_users_own_training_history() -> None:
    # Prepare: held-out items (90+) never occur in the training split; windows of 4 inputs
    full = sequences([[1, 2, 3, 90], [4, 5, 6, 7, 8, 9, 10, 11, 91], [12, 13, 92], [14, 93]])
    split = leave_last_out(full)
    items = torch.nn.functional.normalize(torch.randn(100, DIM), dim=1)
    spec = TrainSpec(negatives=2, positions=3, max_history=4)
    examples = training.WindowExamples(split.train, items, spec)
    train_rows = [
        split.train.item_index[s:e].tolist()
        for s, e in zip(split.train.offsets[:-1], split.train.offsets[1:], strict=True)
    ]

    # Execute: many redraws
    ends, targets = set(), set()
    for _ in range(60):
        inputs, cands = examples.__getitems__(list(range(len(examples))))
        x, mask, slots, summaries = (inputs[k] for k in ("x", "mask", "slots", "summaries"))
        assert x.shape[0] == mask.shape[0] == 3 and slots.shape == (3, 3)
        assert cands.shape == (3, 3, 3)
        for k, row in enumerate(examples.rows):
            seq = train_rows[row]
            held = [int(torch.argmax(items @ v)) for v in x[k][mask[k]]]  # the window's items
            # Assert: left-padded, consecutive items of the user's history, at most 4
            assert not mask[k, : x.shape[1] - len(held)].any() and len(held) <= 4
            start = seq.index(held[0])
            assert seq[start : start + len(held)] == held
            ends.add((row, start + len(held)))
            used = cands[k, :, 0] >= 0
            assert int(used.sum()) == min(3, len(held))
            for p in np.flatnonzero(used.numpy()):
                slot = int(slots[k, p])
                assert mask[k, slot]
                before = held[: slot - (x.shape[1] - len(held)) + 1]
                # the target is the item that followed the prefix ending at that slot
                assert int(cands[k, p, 0]) == seq[start + len(before)]
                # the base summary covers the whole history before it, not the window only
                prefix = seq[: start + len(before)]
                mean = items[prefix[-spec.max_history :]].mean(0)
                torch.testing.assert_close(summaries[k, p, :DIM], mean, rtol=0, atol=1e-6)
                targets.add(int(cands[k, p, 0]))

    # Assert: u3 ([14]) is no example; the long user's (8 training items) 4 inputs end at
    # every point that leaves a next item; no held-out item is a target
    assert len(examples) == 3
    assert {e for r, e in ends if r == 1} == {4, 5, 6, 7}
    assert targets.isdisjoint({90, 91, 92, 93})


def test_train_local_attention_tower_learns_and_trains_under_dp() -> None:
    from fedrec.client.dp import DPSession
    from fedrec.shared.config import DPConfig

    items, seqs = topic_world(shift=1)
    split = leave_last_out(seqs)
    spec = TrainSpec(steps=30, batch_size=32, negatives=20, max_history=10)
    model = RecModel(ModelSpec(tower="attention", max_history=10))
    before, _ = evaluate(model_scorer(model, items), len(items), split, max_history=10)

    train_local(model, items, split.train, spec)
    after, _ = evaluate(model_scorer(model, items), len(items), split, max_history=10)
    unbounded = DPConfig(target_epsilon=1e9, noise_multiplier=1.0)
    dp = DPSession(unbounded, users=64, batch_size=32, planned_steps=3, channel="shop")
    private = RecModel(ModelSpec(tower="attention", max_history=10))
    result = train_local(private, items, split.train, TrainSpec(steps=3, max_history=10), dp=dp)

    assert before["ndcg@10"] < 0.05
    assert after["ndcg@10"] > 0.25
    assert result.steps == 3 and dp.total_steps() == 3 and np.isfinite(result.loss)


@pytest.mark.parametrize("tower", ["mean", "attention"])
def test_item_tables_learn_a_sequence_that_text_cannot_tell_apart(tower: str) -> None:
    # Prepare: 30 items with one and the same text vector; every user walks the catalogue in
    # order (item i is followed by item i + 1 mod 30) from a random start. Text ranks every
    # item alike, so only the item tables can learn "what came last decides what comes next".
    n, rng = 30, np.random.default_rng(0)
    items = torch.nn.functional.normalize(torch.ones(n, DIM), dim=1)
    seqs = sequences([[(s + k) % n for k in range(8)] for s in rng.integers(0, n, size=96)])
    split = leave_last_out(seqs)
    spec = TrainSpec(steps=60, batch_size=32, positions=4, max_history=10, lr=0.01)
    scores = {}

    # Execute: the same training with and without tables
    for rows in (0, n):
        model = RecModel(ModelSpec(tower=tower, max_history=10, item_table=rows))
        train_local(model, items, split.train, spec)
        scores[rows] = evaluate(model_scorer(model, items), n, split, max_history=10)[0]

    # Assert: without tables every item scores alike (a tie ranks the target last: NDCG@10
    # 0 here; a random order of the 23 unseen items would give about 0.2); with them the next
    # item is found first for almost every user
    assert scores[0]["ndcg@10"] < 0.35
    assert scores[n]["ndcg@10"] > 0.9


@pytest.mark.parametrize("tower", ["mean", "attention"])
def test_item_tables_train_under_dp(tower: str) -> None:
    from fedrec.client.dp import DPSession
    from fedrec.shared.config import DPConfig

    items, seqs = topic_world()
    split = leave_last_out(seqs)
    unbounded = DPConfig(target_epsilon=1e9, noise_multiplier=1.0)
    dp = DPSession(unbounded, users=64, batch_size=32, planned_steps=3, channel="shop")
    model = RecModel(ModelSpec(tower=tower, max_history=10, item_table=len(items)))
    tables = (model.item_table, model.history_table, model.recent_table)
    spec = TrainSpec(steps=3, batch_size=32, max_history=10)
    clipped = []  # per step: each table's sum of clipped per-user gradients, before noise

    def hook(optimizer: torch.optim.Optimizer) -> None:
        clipped.append([float(t.weight.summed_grad.abs().sum()) for t in tables])

    result = train_local(model, items, split.train, spec, dp=dp, grad_hook=hook)

    # Assert: the steps ran and were accounted, and the users' own (clipped) gradients, not
    # only the noise, reached every table at every step
    assert result.steps == 3 and dp.total_steps() == 3 and np.isfinite(result.loss)
    assert len(clipped) == 3 and all(g > 0 for step in clipped for g in step), clipped
