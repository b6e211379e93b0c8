"""The shared RecModel (fedrec.shared.model): shapes, Opacus compatibility, the text-similarity
initialisation, and the history summary."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedrec.shared.model import (
    RECENT,
    TAU,
    ModelSpec,
    RecModel,
    item_scores,
    param_shapes,
    summarize_history,
)

torch.set_num_threads(1)

DIM = 384
N_TOPICS = 12


def topic_items(n_items: int = 120, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """Unit item vectors = one of 12 random unit topic centres + noise (norm ~0.5), and each
    item's topic. Item i belongs to topic i % 12."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(N_TOPICS, DIM))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    topic = np.arange(n_items) % N_TOPICS
    items = centres[topic] + rng.normal(size=(n_items, DIM)) * (0.5 / np.sqrt(DIM))
    items /= np.linalg.norm(items, axis=1, keepdims=True)
    return torch.tensor(items, dtype=torch.float32), topic


def test_shapes() -> None:
    # Prepare
    model = RecModel()
    b, seq_len, n = 4, 7, 30
    hist = torch.randn(b, seq_len, DIM)
    mask = torch.ones(b, seq_len, dtype=torch.bool)

    # Execute
    users = model(summarize_history(hist, mask))
    profile = model.profile(hist, mask)
    full = model.score_items(profile, torch.randn(n, DIM))
    several = model(torch.randn(b, 5, 2 * DIM))  # several prefixes per user

    # Assert
    assert users.shape == (b, DIM)
    torch.testing.assert_close(users, profile)
    assert full.shape == (b, n)
    assert summarize_history(hist, mask).shape == (b, 2 * DIM)
    assert several.shape == (b, 5, DIM)


def test_param_shapes_lists_every_parameter_and_nothing_indexed_by_item() -> None:
    # Prepare
    spec = ModelSpec(dim=16, hidden=8)

    # Execute
    shapes = param_shapes(RecModel(spec))

    # Assert: no tensor has a row per item or per user (weights carry no interaction data).
    assert shapes == {
        "profile_lin.weight": (16, 2 * DIM),
        "profile_mlp.0.weight": (8, 2 * DIM),
        "profile_mlp.0.bias": (8,),
        "profile_mlp.2.weight": (16, 8),
        "profile_mlp.2.bias": (16,),
        "to_items.weight": (DIM, 16),
        "to_items.bias": (DIM,),
    }


def test_every_parameter_is_trainable_and_opacus_compatible() -> None:
    # Prepare
    from opacus.validators import ModuleValidator

    model = RecModel()
    users = model.profile(torch.randn(3, 5, DIM), torch.ones(3, 5, dtype=torch.bool))  # (3, E)
    logits = users @ torch.randn(DIM, 4)  # (3, 4) candidate scores

    # Execute
    logits.logsumexp(1).sum().backward()
    problems = ModuleValidator.validate(model, strict=True)

    # Assert
    assert problems == []
    assert all(p.requires_grad and p.grad is not None for p in model.parameters())
    assert list(model.buffers()) == []  # item vectors are inputs, never state


def test_model_dim_must_fit_the_item_vectors() -> None:
    # The init projects 384-d items onto `dim` orthonormal directions: at most 384 of them.
    with pytest.raises(ValueError, match="model.dim"):
        RecModel(ModelSpec(item_dim=16, dim=32))


def test_same_seed_same_weights_different_seed_different_weights() -> None:
    a, b, c = RecModel(ModelSpec(seed=1)), RecModel(ModelSpec(seed=1)), RecModel(ModelSpec(seed=2))

    same = all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    diff = torch.equal(a.profile_lin.weight, c.profile_lin.weight)

    assert same and not diff


def test_untrained_model_ranks_by_text_similarity() -> None:
    # Prepare: 32 users, each with 6 items of one topic (12 topics x 10 items).
    items, topic = topic_items()
    rng = np.random.default_rng(1)
    user_topic = rng.integers(0, N_TOPICS, size=32)
    hist = torch.stack(
        [items[rng.choice(np.flatnonzero(topic == t), 6, replace=False)] for t in user_topic]
    )  # (32, 6, 384)
    mask = torch.ones(32, 6, dtype=torch.bool)
    model = RecModel()

    # Execute
    with torch.no_grad():
        scores = model.score_items(model.profile(hist, mask), items).numpy()  # (32, 120)
    cosine = (torch.nn.functional.normalize(hist.mean(1), dim=1) @ items.T).numpy()
    corr = np.array([np.corrcoef(s, c)[0, 1] for s, c in zip(scores, cosine, strict=True)])
    top10 = np.argsort(-scores, axis=1)[:, :10]

    # Assert: scores follow text similarity, so the top 10 are the user's own topic.
    assert corr.mean() > 0.8 and corr.min() > 0.6
    assert (topic[top10] == user_topic[:, None]).mean() > 0.9


def test_summary_ignores_padding() -> None:
    # Prepare: the same 4 items, once unpadded and once left-padded to 9 with garbage vectors.
    torch.manual_seed(0)
    real = torch.randn(1, 4, DIM)
    padded = torch.cat([100 * torch.randn(1, 5, DIM), real], dim=1)
    mask = torch.ones(1, 4, dtype=torch.bool)
    padded_mask = torch.cat([torch.zeros(1, 5, dtype=torch.bool), mask], dim=1)
    model = RecModel()

    # Execute
    short, long = summarize_history(real, mask), summarize_history(padded, padded_mask)
    with torch.no_grad():
        p_short, p_long = model.profile(real, mask), model.profile(padded, padded_mask)

    # Assert
    torch.testing.assert_close(short, long)
    torch.testing.assert_close(p_short, p_long)


def test_summary_is_mean_of_all_and_mean_of_the_last_three() -> None:
    # Prepare: 5 scalar-like items (value k in every coordinate), most recent last.
    assert RECENT == 3
    hist = torch.arange(1.0, 6.0).view(1, 5, 1).expand(1, 5, DIM)
    mask = torch.ones(1, 5, dtype=torch.bool)

    # Execute
    summary = summarize_history(hist, mask)

    # Assert: mean(1..5) = 3, mean(3, 4, 5) = 4.
    torch.testing.assert_close(summary[0, :DIM], torch.full((DIM,), 3.0))
    torch.testing.assert_close(summary[0, DIM:], torch.full((DIM,), 4.0))


def test_recent_summary_of_a_short_history_uses_what_there_is() -> None:
    # Prepare: 2 items left-padded into 6 slots.
    hist = torch.zeros(1, 6, DIM)
    hist[0, 4], hist[0, 5] = 2.0, 4.0
    mask = torch.tensor([[False, False, False, False, True, True]])

    # Execute
    summary = summarize_history(hist, mask)

    # Assert: both halves are mean(2, 4) = 3.
    torch.testing.assert_close(summary, torch.full((1, 2 * DIM), 3.0))


def test_query_is_blended_into_the_recent_summary() -> None:
    # Prepare: recent items 3, 4, 5 (mean 4) and a query vector of 8 -> recent = (4 + 8)/2.
    hist = torch.arange(1.0, 6.0).view(1, 5, 1).expand(1, 5, DIM)
    mask = torch.ones(1, 5, dtype=torch.bool)
    query = torch.full((1, DIM), 8.0)
    model = RecModel()

    # Execute
    summary = summarize_history(hist, mask, query)
    with torch.no_grad():
        with_query, without = model.profile(hist, mask, query), model.profile(hist, mask)

    # Assert
    torch.testing.assert_close(summary[0, :DIM], torch.full((DIM,), 3.0))  # mean unchanged
    torch.testing.assert_close(summary[0, DIM:], torch.full((DIM,), 6.0))
    assert not torch.allclose(with_query, without)


def test_query_alone_is_the_recent_summary_of_an_empty_history() -> None:
    hist = torch.zeros(1, 4, DIM)
    mask = torch.zeros(1, 4, dtype=torch.bool)
    query = torch.full((1, DIM), 8.0)

    summary = summarize_history(hist, mask, query)

    torch.testing.assert_close(summary[0, :DIM], torch.zeros(DIM))
    torch.testing.assert_close(summary[0, DIM:], torch.full((DIM,), 8.0))


@pytest.mark.parametrize("max_history", [1, 2, 3, 4, 50])
def test_summarize_prefixes_and_history_ids_equal_the_padded_prefixes(
    max_history: int,
) -> None:
    # Prepare: rows of lengths 1..9 and every prefix length 0..len (0 = unused slot).
    from fedrec.client.training import history_ids, pad_histories
    from fedrec.shared.data import Sequences
    from fedrec.shared.model import summarize_prefixes

    rng = np.random.default_rng(3)
    items = torch.nn.functional.normalize(torch.randn(40, DIM), dim=1)
    lengths = np.arange(1, 10)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    seqs = Sequences(
        np.array([f"u{k}" for k in lengths]), offsets, rng.integers(0, 40, offsets[-1])
    )
    rows = np.array([8, 0, 4, 8, 2])
    cut = np.stack([rng.integers(0, seqs.lengths()[r] + 1, size=6) for r in rows])  # (5, 6)

    # Execute
    fast = summarize_prefixes(items, seqs, rows, cut, max_history)
    ids = history_ids(seqs, rows, cut, max_history)

    # Assert: slot by slot, the padded-history summary of the same prefix and its item
    # indices (-1: padding); zeros and no items when unused.
    assert fast.shape == (5, 6, 2 * DIM) and ids.shape == (5, 6, max_history)
    for j, r in enumerate(rows):
        for p, c in enumerate(cut[j]):
            if c == 0:
                assert torch.count_nonzero(fast[j, p]) == 0 and (ids[j, p] == -1).all()
                continue
            hist, mask = pad_histories(seqs, np.array([r]), np.array([c]), max_history)
            assert ids[j, p].tolist() == np.where(mask, hist, -1)[0].tolist()
            slow = summarize_history(items[torch.from_numpy(hist)], torch.from_numpy(mask))[0]
            torch.testing.assert_close(fast[j, p], slow, rtol=0, atol=1e-6)


def test_summarize_prefixes_rejects_a_prefix_longer_than_its_row() -> None:
    from fedrec.shared.data import Sequences
    from fedrec.shared.model import summarize_prefixes

    seqs = Sequences(np.array(["u0"]), np.array([0, 2]), np.array([0, 1]))
    with pytest.raises(ValueError, match="prefix length"):
        summarize_prefixes(torch.randn(3, DIM), seqs, np.array([0]), np.array([[3]]), 50)


def test_cross_platform_model_shares_the_tower_and_keeps_a_head_per_platform() -> None:
    from fedrec.shared.model import CrossPlatformModel, head_owner

    model = CrossPlatformModel(ModelSpec(dim=8), ("shop", "bank"))
    shop, bank = model.channel_model("shop"), model.channel_model("bank")

    # Training a platform's model trains the federated model's tower and that head only.
    before = {k: v.clone() for k, v in model.state_dict().items()}
    (shop.profile(torch.randn(2, 3, DIM), torch.ones(2, 3, dtype=torch.bool)) ** 2).sum().backward()
    with torch.no_grad():
        for p in shop.parameters():
            p -= p.grad
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}

    assert changed == {
        "profile_lin.weight",
        "heads.shop.to_items.weight",
        "heads.shop.to_items.bias",
    }
    assert bank.profile_lin is shop.profile_lin and bank.to_items is not shop.to_items
    assert [head_owner(k) for k in model.state_dict()] == [None, "shop", "shop", "bank", "bank"]
    with pytest.raises(ValueError, match="no head for channel 'travel'"):
        model.channel_model("travel")
    shared = CrossPlatformModel(ModelSpec(dim=8), ("shop", "bank"), per_channel=False)
    assert shared.channel_model("shop").to_items is shared.channel_model("travel").to_items
    assert [head_owner(k) for k in shared.state_dict()] == [None, None, None]


def test_own_towers_start_at_zero_add_to_the_shared_tower_and_stay_per_platform() -> None:
    from fedrec.shared.model import CrossPlatformModel

    spec = ModelSpec(dim=8, own_tower=True)
    model = CrossPlatformModel(spec, ("shop", "bank"))
    shop, bank = model.channel_model("shop"), model.channel_model("bank")
    x = torch.randn(4, 2 * DIM)

    # At the start the own tower is zero: the model is the shared tower alone.
    torch.testing.assert_close(shop.code(x), shop.profile_lin(x))

    # Training shop's model moves shop's own tower, not bank's; the tower adds to the shared one.
    (shop(x) ** 2).sum().backward()
    with torch.no_grad():
        for p in shop.parameters():
            p -= 1e-3 * p.grad
    assert shop.profile_own is model.heads["shop"]["profile_own"]
    assert shop.profile_own.weight.abs().sum() > 0 and bank.profile_own.weight.abs().sum() == 0
    torch.testing.assert_close(shop.code(x), shop.profile_lin(x) + shop.profile_own(x))
    assert sorted(k for k in model.state_dict() if k.startswith("heads.shop")) == [
        "heads.shop.profile_own.weight",
        "heads.shop.to_items.bias",
        "heads.shop.to_items.weight",
    ]


def test_head_scale_starts_as_the_same_function_and_grows_w_o_gradient_share() -> None:
    # Prepare: the same seed at head scale 1 and 3
    g = torch.Generator().manual_seed(0)
    items = torch.nn.functional.normalize(torch.randn(50, 32, generator=g), dim=1)
    x = torch.randn(6, 64, generator=g)
    plain = RecModel(ModelSpec(item_dim=32, dim=8, seed=1))
    scaled = RecModel(ModelSpec(item_dim=32, dim=8, seed=1, head_scale=3.0))

    # Execute
    scores = {m: (mod(x) @ items.T) for m, mod in (("plain", plain), ("scaled", scaled))}
    grads = {}
    for name, mod in (("plain", plain), ("scaled", scaled)):
        mod.zero_grad()
        scores[name].logsumexp(1).sum().backward(retain_graph=True)
        grads[name] = (mod.to_items.weight.grad.norm(), mod.profile_lin.weight.grad.norm())

    # Assert: identical scores; W_o's gradient x3, the tower's unchanged; serving codes agree
    torch.testing.assert_close(scores["scaled"], scores["plain"])
    torch.testing.assert_close(grads["scaled"][0], 3 * grads["plain"][0])
    torch.testing.assert_close(grads["scaled"][1], grads["plain"][1])
    codes = scaled.item_codes(items)
    p = scaled.code(x)
    torch.testing.assert_close(TAU * (p @ codes[:, :8].T + codes[:, 8]), scores["scaled"])


def test_the_score_matrix_appends_the_output_rows_and_zeros_for_later_items() -> None:
    # by hand: E = 2, D = 1, 3 items, output rows for the first 2 (a third item came later)
    model = RecModel(ModelSpec(item_dim=2, dim=1, item_table=2))
    with torch.no_grad():
        model.item_table.weight.copy_(torch.tensor([[10.0], [20.0]]))
    items = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    users = torch.tensor([[2.0, 3.0, 1.0]])  # u = (2, 3), then the column read by the rows

    assert model.score_matrix(items).tolist() == [
        [1.0, 0.0, 10.0],
        [0.0, 1.0, 20.0],
        [1.0, 1.0, 0.0],
    ]
    assert model.score_items(users, items).tolist() == [[12.0, 23.0, 5.0]]
    assert item_scores(users[:, :2], items).tolist() == [[2.0, 3.0, 5.0]]


def test_item_tables_start_as_the_plain_model_and_serving_reads_them_as_training_does() -> None:
    # Prepare: the same seed with and without tables of 50 rows; 60 items (10 added later);
    # 6 left-padded histories of up to 5 items, some of them items added later
    g = torch.Generator().manual_seed(0)
    items = torch.nn.functional.normalize(torch.randn(60, 32, generator=g), dim=1)
    hist = torch.randint(0, 60, (6, 5), generator=g)
    mask = torch.ones(6, 5, dtype=torch.bool)
    mask[0, :3] = mask[1, :1] = False
    x = summarize_history(items[hist], mask)  # the training input of the same histories
    ids = torch.where(mask, hist, -1)
    plain = RecModel(ModelSpec(item_dim=32, dim=8, seed=1, head_scale=2.0))
    table = RecModel(ModelSpec(item_dim=32, dim=8, seed=1, head_scale=2.0, item_table=50))
    start = table.score_items(table(x, ids=ids), items)
    with torch.no_grad():
        for layer in (table.item_table, table.history_table, table.recent_table):
            layer.weight.normal_(generator=g)

    # Execute
    trained = table.score_items(table(x, ids=ids), items)
    served = table.profile(items[hist], mask, ids=hist)
    codes = table.item_codes(items)

    # Assert: zero at the start; afterwards the output rows move the first 50 items only,
    # the served profile equals training's, and the serving codes rank as training scores
    torch.testing.assert_close(start, item_scores(plain(x), items))
    assert (trained[:, :50] != start[:, :50]).all()
    torch.testing.assert_close(table.score_items(served, items), trained)
    p = table.user_code(items[hist], mask, ids=hist)
    torch.testing.assert_close(
        TAU * (p @ codes[:, :8].T + codes[:, 8]), trained, rtol=1e-4, atol=1e-4
    )  # float32, scores ~100


def test_history_tables_average_the_rows_of_the_window_and_of_its_last_items() -> None:
    # by hand: 4 rows, D = 1; H row i = i + 1, H' row i = 10 * (i + 1); RECENT = 3
    model = RecModel(ModelSpec(item_dim=4, dim=1, item_table=4))
    with torch.no_grad():
        model.history_table.weight.copy_(torch.tensor([[1.0], [2.0], [3.0], [4.0], [99.0]]))
        model.recent_table.weight.copy_(torch.tensor([[10.0], [20.0], [30.0], [40.0], [99.0]]))
    ids = torch.tensor(
        [
            [0, 1, 2, 3],  # mean(1, 2, 3, 4) + mean(20, 30, 40)
            [-1, -1, 0, 3],  # padding: mean(1, 4) + mean(10, 40)
            [1, 7, 2, 9],  # items 7 and 9 came later and have no row: mean(2, 3) + 30
            [-1, -1, -1, -1],  # no history: 0
            [2, 2, 0, 2],  # repeats count each time: mean(3, 3, 1, 3) + mean(30, 10, 30)
        ]
    )

    got = model.table_code(ids)

    want = [2.5 + 30.0, 2.5 + 25.0, 2.5 + 30.0, 0.0, 2.5 + 70.0 / 3]
    assert got.squeeze(-1).tolist() == pytest.approx(want, rel=1e-6)


def test_the_federation_refuses_an_item_table() -> None:
    from fedrec.shared.config import ConfigError, from_run_config
    from fedrec.shared.model import build_channel_model, build_model

    cfg = from_run_config({"model.item-table": True})

    with pytest.raises(ConfigError, match="federation does not carry per-item tables"):
        build_model(cfg, 384)
    assert build_channel_model(cfg, 384, 40).item_table.weight.shape == (40, cfg.model.dim)


def test_mix_shared_moves_the_shared_tower_toward_the_nodes_own_and_leaves_heads() -> None:
    # Prepare
    from fedrec.shared.config import FedrecConfig
    from fedrec.shared.model import build_model, mix_shared, shared_weights

    cfg = FedrecConfig(channels=("shop", "bank"))
    model = build_model(cfg, 96)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    own = {k: np.full(v.shape, 2.0, dtype=np.float32) for k, v in shared_weights(model).items()}

    # Execute
    mix_shared(model, own, 0.25)

    # Assert: 0.75 x global + 0.25 x own on the shared tower; every head as it was
    after = model.state_dict()
    assert set(own) == {"profile_lin.weight"}
    torch.testing.assert_close(
        after["profile_lin.weight"], 0.75 * before["profile_lin.weight"] + 0.5
    )
    for k in after:
        if k.startswith("heads."):
            torch.testing.assert_close(after[k], before[k])


# --- the attention tower ---------------------------------------------------------------------


def _window(batch: int = 4, length: int = 8, pad: int = 3, seed: int = 0):
    """Left-padded windows of unit item vectors: row 0 has ``pad`` padding slots."""
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(batch, length, DIM, generator=g), dim=-1)
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[0, :pad] = False
    return x * mask.unsqueeze(-1), mask


@pytest.mark.parametrize("item_prior", [False, True])
def test_untrained_attention_tower_equals_the_untrained_mean_tower(item_prior: bool) -> None:
    # Prepare: the same seed; W_s starts at zero
    mean = RecModel(ModelSpec(seed=3, item_prior=item_prior))
    attention = RecModel(ModelSpec(seed=3, item_prior=item_prior, tower="attention"))
    x, mask = _window()
    if item_prior:
        x = torch.cat([x, torch.randn(*x.shape[:2], 1) * mask.unsqueeze(-1)], dim=-1)
    query = torch.nn.functional.normalize(torch.randn(4, x.shape[-1]), dim=-1)

    # Execute / Assert: with and without a search query
    torch.testing.assert_close(attention.profile(x, mask), mean.profile(x, mask))
    torch.testing.assert_close(attention.profile(x, mask, query), mean.profile(x, mask, query))


def test_attention_tower_is_causal_and_its_last_position_is_the_profile() -> None:
    # Prepare: a trained-looking tower (W_s no longer zero)
    model = RecModel(ModelSpec(tower="attention", blocks=2, max_history=8))
    torch.nn.init.normal_(model.seq.out.weight)
    x, mask = _window()
    changed = x.clone()
    changed[:, -1] = torch.nn.functional.normalize(torch.randn(4, DIM), dim=-1)

    # Execute
    before, after = model(x, mask), model(changed, mask)  # (B, T, E)

    # Assert: a later item moves only the last position; position T is what is served
    torch.testing.assert_close(before[:, :-1], after[:, :-1])
    assert not torch.allclose(before[:, -1], after[:, -1])
    torch.testing.assert_close(before[:, -1], model.profile(x, mask), rtol=1e-4, atol=1e-4)
    assert torch.isfinite(before).all()  # padding slots read only themselves


def test_attention_tower_reads_order() -> None:
    # Prepare: the same items in two orders
    model = RecModel(ModelSpec(tower="attention", max_history=8))
    torch.nn.init.normal_(model.seq.out.weight)
    x, mask = _window(pad=0)
    flipped = x.flip(1)

    # Execute / Assert: the mean tower's summary of the full window is the same; the profile not
    assert not torch.allclose(model.profile(x, mask), model.profile(flipped, mask))


def test_attention_forward_at_slots_gathers_positions() -> None:
    model = RecModel(ModelSpec(tower="attention", max_history=8))
    x, mask = _window()
    slots = torch.tensor([[7, 3], [0, 7], [5, 5], [1, 2]])

    every, picked = model(x, mask), model(x, mask, slots)

    torch.testing.assert_close(picked, every.gather(1, slots.unsqueeze(-1).expand(-1, -1, DIM)))


def test_ghost_clipping_norms_of_the_attention_tower_equal_per_user_gradients() -> None:
    # Prepare: Opacus's per-user gradient norms (ghost clipping, the default mode) against
    # each user's gradient computed alone
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    def loss_of(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # per user (B,)
        return (out * target).flatten(1).sum(1)

    model = RecModel(ModelSpec(tower="attention", blocks=2, max_history=8, own_tower=True))
    torch.nn.init.normal_(model.seq.out.weight, std=0.1)
    x, mask = _window()
    target = torch.randn(4, 8, DIM)
    alone = []
    for i in range(4):
        model.zero_grad()
        loss_of(model(x[i : i + 1], mask[i : i + 1]), target[i : i + 1]).sum().backward()
        alone.append(torch.sqrt(sum((p.grad**2).sum() for p in model.parameters())))

    gsm = GradSampleModuleFastGradientClipping(model, batch_first=True, loss_reduction="sum")
    opt = DPOptimizerFastGradientClipping(
        torch.optim.SGD(gsm.parameters(), lr=0.0),
        noise_multiplier=0.0,
        max_grad_norm=1e6,
        expected_batch_size=4,
        loss_reduction="sum",
    )

    class Criterion(torch.nn.Module):
        reduction = "sum"

        def forward(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return loss_of(out, target)

    criterion = DPLossFastGradientClipping(gsm, opt, Criterion(), loss_reduction="sum")

    # Execute
    criterion(gsm(x, mask), target).backward()

    # Assert
    torch.testing.assert_close(
        gsm.per_sample_gradient_norms, torch.stack(alone), rtol=1e-3, atol=1e-4
    )


def test_cross_platform_attention_tower_is_shared_by_every_platform() -> None:
    from fedrec.shared.model import CrossPlatformModel, head_owner

    spec = ModelSpec(tower="attention", own_tower=True)
    model = CrossPlatformModel(spec, ("a", "b"))

    a, b = model.channel_model("a"), model.channel_model("b")

    assert a.seq is b.seq is model.seq
    shared = [n for n in param_shapes(model) if head_owner(n) is None]
    assert {n.split(".")[0] for n in shared} == {"profile_lin", "seq"}
    assert param_shapes(model)["heads.a.profile_own.weight"] == (spec.dim, 2 * spec.item_dim)


def test_attention_heads_must_divide_the_model_dim() -> None:
    from fedrec.shared.config import ConfigError, from_run_config

    with pytest.raises(ConfigError, match="model.attention-heads"):
        from_run_config({"model.tower": "attention", "model.attention-heads": 5})
    with pytest.raises(ConfigError, match="model.tower"):
        from_run_config({"model.tower": "gru"})


def test_causal_summaries_are_the_summaries_of_every_prefix() -> None:
    from fedrec.shared.model import causal_summaries

    x, mask = _window(pad=3)
    slots = torch.tensor([[2, 3, 7], [0, 1, 5], [4, 6, 7], [0, 2, 3]])

    got = causal_summaries(x, mask, slots)  # (B, 3, 2E)

    for b in range(4):
        for p, t in enumerate(slots[b].tolist()):
            want = summarize_history(x[b : b + 1, : t + 1], mask[b : b + 1, : t + 1])[0]
            want = want * mask[b, t]  # a padding slot summarises nothing
            torch.testing.assert_close(got[b, p], want)
