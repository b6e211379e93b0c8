"""``fedrec train``: train one channel alone, locally, with DP, and compare it with the
popularity and text-similarity baselines.

Owns: the command line (options, messages, tables) around
:func:`fedrec.client.standalone.fit`.

Must not: hold training logic; import torch, Opacus or the data loaders at module import
time, so that ``fedrec --help`` stays instant.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer

METRIC_COLUMNS = {"ndcg@10": "NDCG@10", "hr@10": "HR@10", "recall@20": "Recall@20", "mrr": "MRR"}


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
        item_table: Annotated[
            bool,
            typer.Option(
                "--item-table",
                help=(
                    "Learn per-item tables: a row per item in the history and one added to its "
                    "text vector."
                ),
            ),
        ] = False,
    ) -> None:
        """Train one channel's model locally (DP-SGD by default) and compare it with the
        popularity and text-similarity baselines on its held-out last items."""
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table

        console = Console()

        if not no_dp and not 0 < epsilon < math.inf:
            raise typer.BadParameter(
                f"must be a finite number > 0. Found {epsilon}.", param_hint="--epsilon"
            )
        if not no_dp and not 0 < delta < 1:
            raise typer.BadParameter(f"must be in (0, 1). Found {delta}.", param_hint="--delta")
        if not 0 < lr < math.inf:
            raise typer.BadParameter(f"must be a finite number > 0. Found {lr}.", param_hint="--lr")
        if not 0 < max_grad_norm < math.inf:
            raise typer.BadParameter(
                f"must be > 0. Found {max_grad_norm}.", param_hint="--max-grad-norm"
            )

        from fedrec.client.standalone import fit, load_channel_data, quiet_opacus
        from fedrec.shared.errors import InputError

        with console.status(f"loading channel {channel}"):
            try:
                item_vectors, split = load_channel_data(
                    data, channel, items if items is not None else data / "encoded"
                )
            except (OSError, ValueError) as exc:  # DataError(s), ItemMatrixError are ValueErrors
                raise InputError(str(exc)) from exc

        from fedrec.client.training import TrainSpec, evaluate
        from fedrec.shared.config import DPConfig
        from fedrec.shared.model import ModelSpec, RecModel
        from fedrec.simulations.baselines import popularity_scorer, text_similarity_scorer

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
                    dp=None
                    if no_dp
                    else DPConfig(
                        target_epsilon=epsilon, target_delta=delta, max_grad_norm=max_grad_norm
                    ),
                    channel=channel,
                    max_eval_users=max_eval_users,
                    model=RecModel(
                        ModelSpec(
                            item_dim=int(item_vectors.shape[1]),
                            seed=seed,
                            item_table=n if item_table else 0,
                        )
                    ),
                )
        except ValueError as exc:  # e.g. δ at or above 1/users
            raise InputError(str(exc)) from exc

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
