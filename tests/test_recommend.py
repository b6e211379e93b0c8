"""``fedrec recommend``'s serving path (fedrec.serving.recommend) on a hand-made run directory:
it loads the last checkpoint, serves a platform with its own head, excludes seen items,
blends a query, ranks items added after training (cold start) and refuses bad requests; and
the run directory's check that a checkpoint fits the model before a run resumes from it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedrec.server.rundir import RunDir
from fedrec.serving.recommend import Recommender, RecommendError
from fedrec.shared.config import FedrecConfig, ModelConfig
from fedrec.shared.model import build_model, param_shapes

DIM = 384
N_ITEMS = 40


def _run(
    tmp_path: Path, prior: str = "none"
) -> tuple[Path, np.ndarray, np.ndarray, torch.nn.Module]:
    """A run directory whose round-2 checkpoint holds a model with distinct heads."""
    cfg = FedrecConfig(channels=("shop", "bank"), model=ModelConfig(item_prior=prior))
    model = build_model(cfg, DIM)
    with torch.no_grad():  # make the two platforms' heads differ, as training would
        bias = model.heads["bank"]["to_items"].bias
        bias[:DIM].add_(torch.randn(DIM, generator=torch.Generator().manual_seed(1)))
    run = RunDir(tmp_path / "run")
    run.start(cfg.to_run_config(), list(cfg.channels), param_shapes(model))
    run.checkpoint(1, {k: np.zeros_like(v.numpy()) for k, v in model.state_dict().items()})
    run.checkpoint(2, {k: v.numpy() for k, v in model.state_dict().items()})
    rng = np.random.default_rng(0)
    items = rng.normal(size=(N_ITEMS, DIM)).astype(np.float32)
    items /= np.linalg.norm(items, axis=1, keepdims=True)
    ids = np.array([f"bank-{i}" for i in range(N_ITEMS)])
    return run.path, items, ids, model


def test_a_model_with_an_item_prior_serves_with_the_prior_its_node_released(
    tmp_path: Path,
) -> None:
    # Prepare: the bank node kept its released prior in the run dir, as a simulation does
    run_dir, items, ids, model = _run(tmp_path, prior="popularity")
    prior = np.zeros(N_ITEMS, dtype=np.float32)
    prior[[5, 9]] = 1e4  # two items far more popular than any text score
    (run_dir / "nodes" / "bank").mkdir(parents=True)
    np.save(run_dir / "nodes" / "bank" / "item-prior-run7.npy", prior)

    # Execute
    top = Recommender.from_run(run_dir, "bank", items, ids).recommend(np.array([3]), k=2)
    missing = Recommender.from_run
    # Assert: beta = 1 adds the prior to the score; without a kept prior, a clear refusal
    assert {item for item, _ in top} == {"bank-5", "bank-9"}
    with pytest.raises(RecommendError, match="no item prior"):
        missing(run_dir, "shop", items, ids)


def test_top_k_uses_the_platforms_own_head_and_excludes_seen_items(tmp_path: Path) -> None:
    # Prepare
    run_dir, items, ids, model = _run(tmp_path)
    history = np.array([3, 7, 7, 11])
    rec = Recommender.from_run(run_dir, "bank", items, ids)

    # Execute
    top = rec.recommend(history, k=10)

    # Assert: the same ranking as the bank view of the last checkpoint, seen items excluded.
    bank = model.channel_model("bank")
    x = torch.from_numpy(items)
    with torch.no_grad():
        scores = bank.score_items(
            bank.profile(x[torch.from_numpy(history)][None], torch.ones(1, 4, dtype=torch.bool)), x
        )[0]
    scores[[3, 7, 11]] = -torch.inf
    expected = [f"bank-{i}" for i in torch.topk(scores, 10).indices.tolist()]
    assert [item for item, _ in top] == expected
    assert not {"bank-3", "bank-7", "bank-11"} & {item for item, _ in top}
    values = [s for _, s in top]
    assert values == sorted(values, reverse=True)
    shop_top = Recommender.from_run(run_dir, "shop", items, ids).recommend(history, k=10)
    assert shop_top != top  # another platform's head ranks differently


def test_an_item_added_after_training_is_recommendable(tmp_path: Path) -> None:
    # Prepare: a new catalogue entry whose vector matches what the user's profile asks for.
    run_dir, items, ids, _ = _run(tmp_path)
    history = np.array([0, 1, 2])
    user = Recommender.from_run(run_dir, "bank", items, ids)
    with torch.no_grad():
        wanted = user.model.profile(
            torch.from_numpy(items[history])[None], torch.ones(1, 3, dtype=torch.bool)
        )[0]
    new = (wanted / wanted.norm()).numpy()[None]
    grown = Recommender.from_run(
        run_dir, "bank", np.concatenate([items, new]), np.append(ids, "bank-new")
    )

    # Execute
    top = grown.recommend(history, k=1)

    # Assert: no weight is indexed by item, so the new item ranks first once encoded.
    assert top[0][0] == "bank-new"


def test_a_query_alone_serves_a_user_without_history(tmp_path: Path) -> None:
    run_dir, items, ids, _ = _run(tmp_path)
    rec = Recommender.from_run(run_dir, "bank", items, ids)

    with_query = rec.recommend(np.array([], dtype=np.int64), k=5, query=items[4])

    assert len(with_query) == 5
    with pytest.raises(RecommendError, match="no history"):
        rec.recommend(np.array([], dtype=np.int64), k=5)


def test_bad_requests_are_refused_with_the_reason(tmp_path: Path) -> None:
    run_dir, items, ids, _ = _run(tmp_path)

    with pytest.raises(RecommendError, match="no head for channel 'travel'"):
        Recommender.from_run(run_dir, "travel", items, ids)
    rec = Recommender.from_run(run_dir, "bank", items, ids)
    with pytest.raises(RecommendError, match="outside the catalogue"):
        rec.recommend(np.array([1, N_ITEMS]))
    with pytest.raises(RecommendError, match="no checkpoint"):
        Recommender.from_run(tmp_path, "bank", items, ids)


def test_resuming_from_a_checkpoint_of_another_model_names_the_differences(
    tmp_path: Path,
) -> None:
    # Prepare: a run whose checkpoints hold the default model (own towers per platform)
    run_dir, *_ = _run(tmp_path)
    run = RunDir(run_dir)
    heads_only = param_shapes(
        build_model(
            FedrecConfig(
                channels=("shop", "bank"), model=ModelConfig(heads="channel", item_prior="none")
            ),
            DIM,
        )
    )

    # Execute / Assert: the same model resumes; a heads-only model is told what differs
    assert (
        run.last_checkpoint(
            param_shapes(
                build_model(
                    FedrecConfig(channels=("shop", "bank"), model=ModelConfig(item_prior="none")),
                    DIM,
                )
            )
        )[0]
        == 2
    )
    with pytest.raises(ValueError, match="does not fit the run's model") as err:
        run.last_checkpoint(heads_only)
    assert (
        "extra ['heads.bank.profile_own.weight', 'heads.shop.profile_own.weight'], missing []"
        in str(err.value)
    )
    assert "config.json" in str(err.value)
