"""``fedrec recommend``: top-K items for one user of one channel from a trained run.

Runs on the platform's side: it reads the user's local history, never sends it anywhere.
An optional free-text query is encoded with the same item encoder and blended into the
user's recent interests (search and recommendation in one call). Items added to the
catalogue after training are recommendable as soon as they are encoded (the encoder cache
encodes only new or changed items), because the model scores item *text vectors*, not ids.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import typer

from fedrec.shared.errors import FedrecError


class RecommendError(FedrecError, ValueError):
    """The request cannot be served (unknown user or channel, no history and no query...)."""

    exit_code = 2


@dataclass
class Recommender:
    """A loaded model + one channel's item matrix; ``recommend`` is the per-request path."""

    model: Any
    item_ids: np.ndarray
    items: Any  # torch (N, E)
    max_history: int
    codes: Any = None  # torch (N, D+1): items in the profile space, computed once

    def __post_init__(self) -> None:
        if self.codes is None:
            self.codes = self.model.item_codes(self.items)

    @classmethod
    def from_run(
        cls,
        run_dir: Path,
        channel: str,
        item_matrix: np.ndarray,
        item_ids: np.ndarray,
        prior: np.ndarray | None = None,
    ) -> Recommender:
        """``prior``: the platform's item prior in logits, for a model that has one; by
        default the one its node released in this run (``nodes/<channel>/``). Items added
        after it was released get 0 (no interactions)."""
        import torch

        from fedrec.server.rundir import RunDir
        from fedrec.shared.model import build_model, mix_shared, param_shapes, with_prior
        from fedrec.shared.wire import shape_problems

        run = RunDir(run_dir, create=False)
        try:
            last = run.last_checkpoint()
        except ValueError as exc:
            raise RecommendError(str(exc)) from None
        if last is None:
            raise RecommendError(
                f"{run_dir} has no checkpoint (checkpoints/round-*.safetensors): train first"
            )
        cfg = load_run_config(run.path)
        model = build_model(cfg, item_matrix.shape[1])
        shapes = param_shapes(model)
        problems = shape_problems({k: v.shape for k, v in last[1].items()}, shapes)
        if problems:
            raise RecommendError(
                f"checkpoint round {last[0]} of {run_dir} does not fit the model its config.json "
                f"describes with {item_matrix.shape[1]}-dimensional item vectors "
                f"({'; '.join(problems[:3])}). Fix: serve with the run's own encoder "
                "(encoder-dir in config.json) and an unedited config.json."
            )
        model.load_state_dict(
            {k: torch.from_numpy(v.copy()) for k, v in last[1].items()}, strict=True
        )
        if cfg.train.personal_mix > 0:  # the node's personalised model, where it kept one
            own = _personal(run.path, channel)
            if own is not None:
                mix_shared(model, own, cfg.train.personal_mix)
        try:
            channel_model = model.channel_model(channel)
        except ValueError as exc:
            raise RecommendError(f"{run_dir}: {exc}") from None
        channel_model.eval()
        items = torch.from_numpy(np.array(item_matrix, dtype=np.float32))
        if channel_model.spec.item_prior:
            prior = released_prior(run.path, channel) if prior is None else prior
            if prior is None:
                raise RecommendError(
                    f"{run_dir}/nodes/{channel} holds no item prior (item-prior-run*.npy), and "
                    "the model scores with one: serve on the platform whose node trained it"
                )
            if len(prior) > len(items):
                raise RecommendError(
                    f"the item prior has {len(prior)} items, the catalogue {len(items)}: "
                    "items were removed since training; retrain"
                )
            items = with_prior(items, np.pad(prior, (0, len(items) - len(prior))))
        return cls(channel_model, item_ids, items, cfg.model.max_history)

    def recommend(
        self, history: np.ndarray, k: int = 10, query: np.ndarray | None = None
    ) -> list[tuple[str, float]]:
        """Top-``k`` (item id, score) for a history of item indices (oldest first)."""
        import torch

        history = np.asarray(history, dtype=np.int64)
        if len(history) == 0 and query is None:
            raise RecommendError(
                "the user has no history on this channel; pass --query to search instead"
            )
        if len(history) and (history.min() < 0 or history.max() >= len(self.items)):
            raise RecommendError(
                f"history refers to item indices outside the catalogue (0..{len(self.items) - 1})"
            )
        window = history[-self.max_history :]
        hist = torch.zeros((1, max(len(window), 1)), dtype=torch.long)
        mask = torch.zeros_like(hist, dtype=torch.bool)
        if len(window):
            hist[0, :] = torch.from_numpy(window)
            mask[0, :] = True
        q = None
        if query is not None:  # text vector; 0 in the item prior's column, if the model has one
            q = torch.zeros((1, self.items.shape[1]))
            q[0, : len(query)] = torch.from_numpy(np.asarray(query, dtype=np.float32))
        with torch.inference_mode():
            from fedrec.shared.model import TAU

            p = self.model.user_code(self.items[hist], mask, q)[0]  # (D,)
            d = len(p)
            scores = TAU * (self.codes[:, :d] @ p + self.codes[:, d])  # (N,)
            seen = np.unique(history)
            if len(seen):
                scores[torch.from_numpy(seen)] = -torch.inf  # already seen
            k = min(k, len(scores) - len(seen))
            top = torch.topk(scores, k)
        return [
            (str(self.item_ids[i]), float(s))
            for s, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)
        ]


def load_run_config(run_dir: Path) -> Any:
    """The :class:`~fedrec.shared.config.FedrecConfig` a run recorded in its config.json."""
    from fedrec.shared.config import ConfigError, from_run_config

    path = run_dir / "config.json"
    if not path.is_file():
        raise RecommendError(
            f"{run_dir} is not a run directory (no config.json). Fix: pass the folder fedrec "
            "simulate or a deployment wrote, e.g. runs/<name>/federated-dp."
        )
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))["run_config"]
        return from_run_config(recorded)
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise RecommendError(
            f"{path}: not a readable run record ({type(exc).__name__}: {exc}). Fix: restore "
            "the file the run wrote; fedrec never edits it after the run starts."
        ) from None
    except ConfigError as exc:
        raise RecommendError(f"{path}: the recorded run config is invalid: {exc}") from None


def released_prior(run_dir: Path, channel: str) -> np.ndarray | None:
    """The item prior ``channel``'s node released in this run (a simulation's run dir)."""
    from fedrec.shared.prior import released_prior as newest

    nodes = run_dir / "nodes"
    return newest([nodes / channel, nodes / f"{channel}-0"])  # -0: the first of shards


def _personal(run_dir: Path, channel: str) -> dict[str, np.ndarray] | None:
    """The shared weights ``channel``'s node kept last in a simulation's run dir, if any."""
    from fedrec.shared.prior import newest_kept

    nodes = run_dir / "nodes"
    path = newest_kept([nodes / channel, nodes / f"{channel}-0"], "personal-run*.npz")
    if path is None:
        return None
    with np.load(path) as kept:
        return {k: kept[k] for k in kept.files}


def register(app: typer.Typer) -> None:
    @app.command("recommend")
    def recommend_cmd(
        run_dir: Path = typer.Argument(
            ..., help="A run directory written by fedrec simulate / a deployment."
        ),
        channel: str = typer.Option(..., help="The platform whose catalogue to recommend from."),
        user: str = typer.Option(
            None, help="User id on that platform (their local history is used)."
        ),
        query: str = typer.Option(None, help="Free-text query, blended into the user's interests."),
        k: int = typer.Option(10, min=1, max=10_000, help="How many items."),
        data: Path = typer.Option(None, help="Dataset directory (default: the run's data-dir)."),
        cache_dir: Path = typer.Option(
            None, help="Encoder cache (default: $FEDREC_CACHE_DIR or ~/.cache/fedrec/encoder)."
        ),
    ) -> None:
        """Top-K items for one user (and/or a query) from a trained run."""
        from rich.console import Console
        from rich.table import Table

        from fedrec.server.rundir import INCOMPLETE
        from fedrec.shared.data import to_sequences
        from fedrec.shared.datasets import load_catalogue, load_interactions
        from fedrec.shared.prior import popularity_counts, prior_logits

        console = Console()
        if user is None and query is None:
            raise RecommendError("give --user, --query, or both")
        if query is not None and not query.strip():
            raise RecommendError("--query is empty. Fix: give words to search for, or drop it.")
        cfg = load_run_config(run_dir)
        if channel not in cfg.channels:
            raise RecommendError(
                f"channel {channel!r} is not in this run (it has {', '.join(cfg.channels)})."
            )
        data_dir = data or Path(cfg.data_dir)
        if not (data_dir / "manifest.json").is_file():
            raise RecommendError(
                f"the run's dataset {data_dir} is not there (moved or deleted?). Fix: pass "
                "--data with the folder that now holds it."
            )
        if (run_dir / INCOMPLETE).exists():
            console.print(
                f"[yellow]warning: {run_dir} is an incomplete run (it stopped before its last "
                "round); serving its last checkpoint."
            )
        t0 = time.perf_counter()
        catalogue = load_catalogue(data_dir, channel)
        from fedrec.server.app import encode_catalogues

        matrix = encode_catalogues(
            str(data_dir), (channel,), str(cache_dir or cfg.cache_dir), cfg.encoder_dir
        )[channel]
        seqs = to_sequences(load_interactions(data_dir, channel, catalogue))
        prior = None
        if released_prior(run_dir, channel) is None:
            # not the node's run dir (a deployment keeps it on the node): the platform's own
            # exact popularity, which serving its own users never sends anywhere
            prior = prior_logits(popularity_counts(seqs, len(catalogue)))
        rec = Recommender.from_run(
            run_dir, channel, np.asarray(matrix.matrix), catalogue.item_ids, prior
        )
        history = np.zeros(0, dtype=np.int64)
        if user is not None:
            where = np.flatnonzero(seqs.users == user)
            if len(where) == 0:
                raise RecommendError(
                    f"user {user!r} has no interactions on channel {channel!r}. Fix: check the "
                    "id, or pass --query alone to search."
                )
            r = int(where[0])
            history = seqs.item_index[seqs.offsets[r] : seqs.offsets[r + 1]]
        qvec = None
        if query:
            from fedrec.server.encoder import ItemEncoder

            qvec = ItemEncoder(Path(cfg.encoder_dir) if cfg.encoder_dir else None).encode([query])[
                0
            ]
        t1 = time.perf_counter()
        top = rec.recommend(history, k, qvec)
        t2 = time.perf_counter()
        titles = dict(zip(catalogue.item_ids, catalogue.titles, strict=True))
        table = Table(
            title=f"top {k} on {channel}"
            + (f" for {user}" if user else "")
            + (f", query {query!r}" if query else "")
        )
        for col in ("#", "item_id", "title", "score"):
            table.add_column(col)
        for i, (item, score) in enumerate(top, 1):
            table.add_row(str(i), item, titles[item], f"{score:.3f}")
        console.print(table)
        console.print(
            f"history: {len(history)} items; loaded in {t1 - t0:.2f}s; ranked {len(catalogue)} items in {1000 * (t2 - t1):.1f} ms"
        )
