"""One platform training alone, in one process, without Flower: the local-only comparison row,
``fedrec train`` and the benchmarks.

Owns: :func:`fit` (a fresh model trained on one channel's leave-last-out split, DP-SGD through
the same :class:`~fedrec.client.dp.DPSession` as the ClientApp, then evaluated) and
:func:`load_channel_data` (a channel's item matrix and split from a dataset folder).

Must not: import ``server/``; import torch or Opacus at module import time.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from fedrec.client.training import Split, TrainSpec
    from fedrec.shared.config import DPConfig
    from fedrec.shared.model import RecModel


@dataclass(frozen=True)
class Fit:
    """What one training run spent and reached."""

    metrics: dict[str, float]
    evaluated_users: int
    trained_users: int
    epsilon: float  # math.inf without DP
    delta: float  # 0 without DP
    noise_multiplier: float  # 0 without DP
    sample_rate: float
    steps: int
    seconds: float  # training only
    sampled: dict[str, float] | None = None  # LOO + N sampled negatives (``fit(sampled=N)``)


@contextlib.contextmanager
def quiet_opacus() -> Iterator[None]:
    """Silence, inside this block only, Opacus's per-step torch notice about full backward
    hooks (ghost clipping's second pass); every other warning still shows."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        yield


def fit(
    items: torch.Tensor,
    split: Split,
    spec: TrainSpec,
    *,
    dp: DPConfig | None,
    channel: str = "channel",
    max_eval_users: int | None = None,
    model: RecModel | None = None,
    sampled: int = 0,
) -> tuple[RecModel, Fit]:
    """Train ``model`` (a fresh one-tower :class:`RecModel` by default) on ``split.train`` and
    evaluate it on ``split`` (full ranking).

    With ``dp``, DP-SGD through a :class:`~fedrec.client.dp.DPSession` whose run is
    ``spec.steps`` steps: σ is planned so that they spend at most ``dp.target_epsilon``.
    Without it, plain training. A model whose spec has an item prior gets the channel's
    popularity (released through the same session under DP, exact without). With
    ``sampled`` = N > 0, the same users are also ranked against N sampled unseen items.

    Raises:
        ValueError: δ is not below 1/users, or no user can be trained on.
    """
    import torch

    from fedrec.client.dp import DPSession
    from fedrec.client.training import evaluate, model_scorer, train_local, trainable_users
    from fedrec.shared import privacy
    from fedrec.shared.model import ModelSpec, RecModel, with_prior
    from fedrec.shared.prior import popularity_counts, prior_logits

    users = trainable_users(split.train)
    if users == 0:
        raise ValueError(
            f"channel {channel!r}: no user has 3 or more interactions, so after holding out "
            "each user's last item nobody has a history and a next item to train on"
        )
    if model is None:
        model = RecModel(ModelSpec(item_dim=int(items.shape[1]), seed=spec.seed))
    session = None
    if dp is not None:
        session = DPSession(
            dp,
            users=users,
            batch_size=spec.batch_size,
            planned_steps=spec.steps,
            channel=channel,
            item_prior=model.spec.item_prior,
        )
    start = time.perf_counter()
    if model.spec.item_prior:
        counts = popularity_counts(split.train, len(items))
        if session is not None:
            counts = session.release_prior(counts, round_=0)
        items = with_prior(items, prior_logits(counts))
    result = train_local(model, items, split.train, spec, dp=session)
    seconds = time.perf_counter() - start

    def ranked(negatives: int) -> tuple[dict[str, float], int]:
        return evaluate(
            model_scorer(model, items),
            len(items),
            split,
            max_history=spec.max_history,
            max_users=max_eval_users,
            sampled=negatives,
            seed=spec.seed,
        )

    with torch.inference_mode():
        metrics, evaluated = ranked(0)
        against = ranked(sampled)[0] if sampled else None
    return model, Fit(
        metrics=metrics,
        evaluated_users=evaluated,
        trained_users=users,
        epsilon=result.epsilon if session else math.inf,
        delta=session.delta if session else 0.0,
        noise_multiplier=session.noise_multiplier if session else 0.0,
        sample_rate=privacy.sample_rate_for(users, spec.batch_size),
        steps=result.steps,
        seconds=seconds,
        sampled=against,
    )


def load_channel_data(data: Path, channel: str, items_dir: Path) -> tuple[torch.Tensor, Split]:
    """The channel's item matrix (rows = catalogue rows) and its leave-last-out split.

    Raises:
        FileNotFoundError: the item matrix was never written (run ``fedrec encode``).
        ValueError: the dataset or the item matrix is malformed or stale.
    """
    import numpy as np
    import torch

    from fedrec.client.training import leave_last_out
    from fedrec.shared.data import to_sequences
    from fedrec.shared.datasets import load_channel, load_manifest
    from fedrec.shared.items import load_item_matrix

    known = list(load_manifest(data).channels)
    if channel not in known:
        raise ValueError(f"unknown channel {channel!r}; {data} has {known}.")
    path = items_dir / f"{channel}.items.npz"
    if not path.is_file():
        raise FileNotFoundError(
            f"no item matrix at {path}. Encode the catalogues first: fedrec encode {data}"
            + ("" if items_dir == data / "encoded" else f" --out {items_dir}")
        )
    catalogue, interactions = load_channel(data, channel)
    matrix = load_item_matrix(path)
    if matrix.channel != channel or not np.array_equal(matrix.item_ids, catalogue.item_ids):
        raise ValueError(
            f"{path} does not match the {channel!r} catalogue in {data} (channel "
            f"{matrix.channel!r}, {len(matrix)} items vs {len(catalogue)}, or other item ids): "
            f"it is stale. Re-encode: fedrec encode {data}"
        )
    items = torch.from_numpy(np.array(matrix.matrix, dtype=np.float32))  # writable copy
    return items, leave_last_out(to_sequences(interactions))
