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
    from fedrec.shared.model import RecModel

ACCOUNTANT = "rdp"  # Opacus's default for planning; the same accountant reports ε
GRAD_SAMPLE_MODE = "ghost"  # fastest correct mode for this model (research/privacy.md §2)


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


@contextlib.contextmanager
def quiet_opacus() -> Iterator[None]:
    """Silence, inside this block only, Opacus's per-step torch notice about full backward
    hooks (ghost clipping's second pass); every other warning still shows."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        yield


def trainable_users(split: Split) -> int:
    """Users with a history prefix and a next item in the training split (the privacy units
    Opacus samples): the count the sample rate and δ must be computed from."""
    return int((split.train.lengths() >= 2).sum())


def fit(
    items: torch.Tensor,
    split: Split,
    spec: TrainSpec,
    *,
    epsilon: float | None,
    delta: float,
    max_grad_norm: float = 1.0,
    channel: str = "channel",
    max_eval_users: int | None = None,
) -> tuple[RecModel, Fit]:
    """Train a fresh model on ``split.train`` and evaluate it on ``split`` (full ranking).

    With ``epsilon``, DP-SGD: σ is planned once so that ``spec.steps`` Poisson-sampled steps
    spend at most ``epsilon`` at ``delta``; without it, plain training.

    Raises:
        ValueError: δ is not below 1/users, or no user can be trained on.
    """
    import torch

    from fedrec.client.training import DPSpec, evaluate, model_scorer, train_local
    from fedrec.shared import privacy
    from fedrec.shared.config import check_delta
    from fedrec.shared.model import ModelSpec, RecModel

    users = trainable_users(split)
    if users == 0:
        raise ValueError(
            f"channel {channel!r}: no user has 3 or more interactions, so after holding out "
            "each user's last item nobody has a history and a next item to train on"
        )
    batch = min(spec.batch_size, users)  # as train_local sizes its loader
    q = privacy.sample_rate_for(users, batch)
    model = RecModel(ModelSpec(item_dim=int(items.shape[1]), seed=spec.seed))
    sigma, eps = 0.0, math.inf
    start = time.perf_counter()
    if epsilon is None:
        train_local(model, items, split.train, spec)
    else:
        problem = check_delta(delta, users, channel)
        if problem:
            raise ValueError(problem)
        sigma = privacy.plan_noise_multiplier(
            target_epsilon=epsilon,
            target_delta=delta,
            sample_rate=q,
            steps=spec.steps,
            accountant=ACCOUNTANT,
        )
        state = privacy.PrivacyState(accountant=ACCOUNTANT, delta=delta)
        dp = DPSpec(sigma, max_grad_norm, epsilon, GRAD_SAMPLE_MODE)
        eps = train_local(model, items, split.train, spec, dp=dp, state=state).epsilon
    seconds = time.perf_counter() - start
    with torch.inference_mode():
        metrics, evaluated = evaluate(
            model_scorer(model, items),
            len(items),
            split,
            max_history=spec.max_history,
            max_users=max_eval_users,
            seed=spec.seed,
        )
    return model, Fit(
        metrics=metrics,
        evaluated_users=evaluated,
        trained_users=users,
        epsilon=eps,
        delta=delta if epsilon is not None else 0.0,
        noise_multiplier=sigma,
        sample_rate=q,
        steps=spec.steps,
        seconds=seconds,
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
