"""Ranking a platform's items for one of its users from a trained run: the one owner of it.

Owns: :class:`Recommender` (a run's model for one channel, its item codes and their
:class:`~fedrec.serving.index.ItemIndex`; every top-k that ``fedrec recommend``, ``fedrec
serve``, ``fedrec export`` and hybrid search return comes from it), :class:`RecommendError`,
and reading what a run directory holds for serving (its config, its node's item prior and
personalised weights).

Runs on the platform's side: it reads the user's local history and never sends it anywhere.
Items added to the catalogue after training are rankable as soon as they are encoded, because
the model scores item *text vectors*, not ids.

Must not: import ``fedrec.client``, ``deploy``, ``audit``, ``simulations`` or ``cli``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedrec.shared.errors import FedrecError


class RecommendError(FedrecError, ValueError):
    """The request cannot be served (unknown user or channel, no history and no query...)."""

    exit_code = 2


@dataclass
class Recommender:
    """A loaded model + one channel's item matrix; :meth:`user_vectors` then :meth:`top` is
    every request's path (:meth:`recommend` for one history)."""

    model: Any
    item_ids: np.ndarray
    items: Any  # torch (N, E)
    max_history: int
    index_kind: str = "auto"  # fedrec.serving.index.KINDS
    round: int = 0  # the checkpoint's round, when loaded from a run

    def __post_init__(self) -> None:
        from fedrec.serving.index import ItemIndex

        # (N, D+1): items in the profile space, computed once; a user's score is codes @ v
        self.codes = np.ascontiguousarray(self.model.item_codes(self.items).numpy(), np.float32)
        self.index = ItemIndex(self.codes, self.index_kind)
        # columns of an item vector that are text (the item prior's column, if any, is last)
        self.text_dim = int(self.items.shape[1]) - int(self.model.spec.item_prior)

    @classmethod
    def from_run(
        cls,
        run_dir: Path,
        channel: str,
        item_matrix: np.ndarray,
        item_ids: np.ndarray,
        prior: np.ndarray | None = None,
        index_kind: str = "auto",
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
        return cls(channel_model, item_ids, items, cfg.model.max_history, index_kind, last[0])

    def user_vectors(
        self, histories: Sequence[np.ndarray], queries: np.ndarray | None = None
    ) -> np.ndarray:
        """(B, D+1) float32 ``TAU * [p, 1]`` per history (item rows, oldest first), so that
        ``codes @ v`` is every item's score. ``queries`` (B, E): text vectors blended into
        the recent summary (:func:`~fedrec.shared.model.summarize_history`)."""
        import torch

        from fedrec.shared.model import TAU

        windows = [np.array(h[-self.max_history :], dtype=np.int64) for h in histories]
        width = max([1, *(len(w) for w in windows)])
        hist = torch.zeros((len(windows), width), dtype=torch.long)  # (B, L), left-padded
        mask = torch.zeros_like(hist, dtype=torch.bool)
        for b, w in enumerate(windows):
            if len(w):
                hist[b, width - len(w) :] = torch.from_numpy(w)
                mask[b, width - len(w) :] = True
        q = None
        if queries is not None:  # 0 in the item prior's column, if the model has one
            q = torch.zeros((len(windows), self.items.shape[1]))
            q[:, : queries.shape[1]] = torch.from_numpy(np.array(queries, dtype=np.float32))
        with torch.inference_mode():
            p = self.model.user_code(self.items[hist], mask, q, ids=hist)  # (B, D)
            v = TAU * torch.cat([p, torch.ones((len(p), 1))], dim=1)  # (B, D+1)
        return np.ascontiguousarray(v.numpy(), dtype=np.float32)

    def check_history(self, history: np.ndarray) -> np.ndarray:
        history = np.asarray(history, dtype=np.int64)
        if len(history) and (history.min() < 0 or history.max() >= len(self.items)):
            raise RecommendError(
                f"history refers to item indices outside the catalogue (0..{len(self.items) - 1})"
            )
        return history

    def top(
        self, vectors: np.ndarray, k: int, seen: Sequence[np.ndarray]
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per user vector: (item rows, scores) of its top ``k``, ``seen[b]`` left out."""
        return self.index.search(vectors, k, seen)

    def scores(self, vector: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Exact scores of the items ``rows`` for one user vector (D+1,)."""
        return np.asarray(self.codes[rows] @ vector, dtype=np.float32)

    def recommend(
        self, history: np.ndarray, k: int = 10, query: np.ndarray | None = None
    ) -> list[tuple[str, float]]:
        """Top-``k`` (item id, score) for a history of item indices (oldest first)."""
        history = self.check_history(history)
        if len(history) == 0 and query is None:
            raise RecommendError(
                "the user has no history on this channel; pass --query to search instead"
            )
        queries = None if query is None else np.asarray(query, dtype=np.float32)[None]
        rows, scores = self.top(self.user_vectors([history], queries), k, [history])[0]
        return [
            (str(self.item_ids[i]), float(s))
            for i, s in zip(rows.tolist(), scores.tolist(), strict=True)
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


def personal_file(run_dir: Path, channel: str) -> Path | None:
    """The file of the shared weights ``channel``'s node kept last in a simulation's run
    dir, if any."""
    from fedrec.shared.prior import newest_kept

    nodes = run_dir / "nodes"
    return newest_kept([nodes / channel, nodes / f"{channel}-0"], "personal-run*.npz")


def _personal(run_dir: Path, channel: str) -> dict[str, np.ndarray] | None:
    """The shared weights ``channel``'s node kept last in a simulation's run dir, if any."""
    path = personal_file(run_dir, channel)
    if path is None:
        return None
    with np.load(path) as kept:
        return {k: kept[k] for k in kept.files}
