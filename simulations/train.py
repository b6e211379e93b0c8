"""``fedrec train``: train the shared model on one channel alone, locally, with DP, and compare
it with the two baselines.

Owns: the command line around :func:`client.training.train_local` for one channel (no Flower,
no server): loading the channel and its encoded item matrix, the leave-last-out split, planning
the noise multiplier for the whole run (research/privacy.md §3: σ once, for all steps), and the
result table. :func:`fit` is the reusable core (``simulations/bench_quality.py`` calls it).

Must not: hold training logic the apps need (that is ``client/training.py``); import torch,
Opacus or the data loaders at module import time, so that ``fedrec --help`` stays instant.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    import torch

    from client.training import Split, TrainSpec
    from shared.model import RecModel

ACCOUNTANT = "rdp"  # Opacus's default for planning; the same accountant reports ε
GRAD_SAMPLE_MODE = "ghost"  # fastest correct mode for this model (research/privacy.md §2)
METRIC_COLUMNS = {"ndcg@10": "NDCG@10", "hr@10": "HR@10", "recall@20": "Recall@20", "mrr": "MRR"}


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

    from client.training import DPSpec, evaluate, model_scorer, train_local
    from shared import privacy
    from shared.config import check_delta
    from shared.model import ModelSpec, RecModel

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

    from client.training import leave_last_out
    from server.encoder import load_item_matrix
    from shared.data import to_sequences
    from shared.datasets import load_channel, load_manifest

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


def register(app: typer.Typer) -> None:
    """Add ``fedrec train`` to the fedrec app."""

    @app.command("train")
    def train(
        data: Annotated[
            Path,
            typer.Option(
                "--data", exists=True, file_okay=False, help="Dataset folder (with manifest.json)."
            ),
        ],
        channel: Annotated[str, typer.Option(help="The channel to train on.")],
        items: Annotated[
            Path | None,
            typer.Option(
                help="Folder with <channel>.items.npz from fedrec encode. [default: DATA/encoded]"
            ),
        ] = None,
        epsilon: Annotated[float, typer.Option(help="Target ε for the whole run.")] = 8.0,
        delta: Annotated[float, typer.Option(help="Target δ; must be < 1/users.")] = 1e-5,
        no_dp: Annotated[
            bool, typer.Option("--no-dp", help="Train without DP (no privacy guarantee).")
        ] = False,
        steps: Annotated[int, typer.Option(min=1, help="Optimizer steps for the whole run.")] = 200,
        batch_size: Annotated[
            int, typer.Option(min=1, help="Users per batch (Poisson-sampled with DP).")
        ] = 128,
        lr: Annotated[float, typer.Option(help="Adam learning rate.")] = 0.003,
        max_grad_norm: Annotated[
            float, typer.Option(help="Per-user clipping bound C (DP only).")
        ] = 1.0,
        seed: Annotated[int, typer.Option(help="Seed for the model and the example draws.")] = 0,
        max_eval_users: Annotated[
            int, typer.Option(min=1, help="Evaluate on at most this many users.")
        ] = 2000,
    ) -> None:
        """Train one channel's model locally (DP-SGD by default) and compare it with the
        popularity and text-similarity baselines on its held-out last items."""
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table

        console = Console()

        def fail(message: object) -> typer.Exit:
            console.print(f"[red]error:[/red] {escape(str(message))}")
            return typer.Exit(1)

        if not no_dp and not epsilon > 0:
            raise typer.BadParameter(f"must be > 0. Found {epsilon}.", param_hint="--epsilon")
        if not no_dp and not 0 < delta < 1:
            raise typer.BadParameter(f"must be in (0, 1). Found {delta}.", param_hint="--delta")
        if not lr > 0:
            raise typer.BadParameter(f"must be > 0. Found {lr}.", param_hint="--lr")
        if not max_grad_norm > 0:
            raise typer.BadParameter(
                f"must be > 0. Found {max_grad_norm}.", param_hint="--max-grad-norm"
            )

        with console.status(f"loading channel {channel}"):
            try:
                item_vectors, split = load_channel_data(
                    data, channel, items if items is not None else data / "encoded"
                )
            except (OSError, ValueError) as exc:  # DataError(s), ItemMatrixError are ValueErrors
                raise fail(exc) from None

        from client.training import TrainSpec, evaluate
        from simulations.baselines import popularity_scorer, text_similarity_scorer

        spec = TrainSpec(steps=steps, batch_size=batch_size, lr=lr, seed=seed)
        n = len(item_vectors)
        ev = {"max_history": spec.max_history, "max_users": max_eval_users, "seed": seed}
        try:
            scorers = {
                "popularity": popularity_scorer(split.train, n),
                "text similarity": text_similarity_scorer(item_vectors),
            }
            baselines = {name: evaluate(f, n, split, **ev)[0] for name, f in scorers.items()}
            what = "without DP" if no_dp else f"with DP, target ε={epsilon:g}"
            with console.status(f"training {steps} steps {what}"), quiet_opacus():
                _, result = fit(
                    item_vectors,
                    split,
                    spec,
                    epsilon=None if no_dp else epsilon,
                    delta=delta,
                    max_grad_norm=max_grad_norm,
                    channel=channel,
                    max_eval_users=max_eval_users,
                )
        except ValueError as exc:
            raise fail(exc) from None

        table = Table(
            "",
            *METRIC_COLUMNS.values(),
            title=f"{escape(channel)}: leave-last-out, full ranking, "
            f"{result.evaluated_users} users",
        )
        model_row = "model (no DP)" if no_dp else f"model (DP, ε={result.epsilon:.2f})"
        for name, m in [*baselines.items(), (model_row, result.metrics)]:
            table.add_row(escape(name), *(f"{m[c]:.4f}" for c in METRIC_COLUMNS))
        console.print(table)
        privacy_table = Table("ε", "δ", "σ", "q", "steps", "batch", "trained users", "seconds")
        privacy_table.add_row(
            "∞ (no DP)" if no_dp else f"{result.epsilon:.3f}",
            "-" if no_dp else f"{result.delta:g}",
            "-" if no_dp else f"{result.noise_multiplier:.4f}",
            f"{result.sample_rate:.4g}",
            str(result.steps),
            str(min(batch_size, result.trained_users)),
            str(result.trained_users),
            f"{result.seconds:.1f}",
        )
        console.print(privacy_table)
        if no_dp:
            console.print("[yellow]trained without DP: the model carries no privacy guarantee.")
