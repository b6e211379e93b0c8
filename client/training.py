"""Local training and evaluation on one channel's private data (pure functions, no Flower).

Owns: turning a channel's sequences into per-user training examples, DP-SGD with Opacus
(one user = one example = the privacy unit, Poisson-sampled), and leave-last-out evaluation.

Privacy notes:
  * Each example is one user: several prefixes of that user's training history, each with
    the item that followed, re-drawn at every step from that user's own data, and one loss
    (their mean). Poisson sampling over users makes Opacus's per-sample guarantee a per-user
    guarantee.
  * Negatives are drawn uniformly from the public catalogue, per example; never other users'
    positives (in-batch) and never by a popularity computed from private data.
  * The held-out last item of every user is never trained on.

Must not: import ``server/``; send anything (replies are built in ``client/app.py``).
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from fedrec.client.dp import DPSession
from fedrec.shared.config import FedrecConfig
from fedrec.shared.data import Sequences
from fedrec.shared.metrics import metrics_from_ranks, rank_of_target, sample_negatives, sampled_rank
from fedrec.shared.model import RecModel, item_scores, summarize_prefixes

if TYPE_CHECKING:
    from opacus.optimizers import DPOptimizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainSpec:
    steps: int = 20
    batch_size: int = 128
    negatives: int = 0  # as TrainConfig: softmax over the whole catalogue
    positions: int = 12
    lr: float = 0.003
    head_lr_scale: float = 2.5  # for a model at head scale 1 (TrainConfig: 1.25 at scale 2)
    optimizer: str = "adam"
    scores_dtype: str = "auto"  # as TrainConfig.scores_dtype
    max_history: int = 50
    proximal_mu: float = 0.0
    head_pull: float = 0.0  # as TrainConfig.head_pull
    seed: int = 0

    @classmethod
    def from_config(
        cls, cfg: FedrecConfig, *, steps: int, seed: int, proximal_mu: float = 0.0
    ) -> TrainSpec:
        t = cfg.train
        return cls(
            steps=steps,
            batch_size=t.batch_size,
            negatives=t.negatives,
            positions=t.positions,
            lr=t.lr,
            head_lr_scale=t.head_lr_scale,
            optimizer=t.optimizer,
            scores_dtype=t.scores_dtype,
            max_history=cfg.model.max_history,
            proximal_mu=proximal_mu,
            head_pull=t.head_pull,
            seed=seed,
        )


def resolve_scores_dtype(name: str, cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """``train.scores-dtype`` to "float32" or "bfloat16": "auto" takes bfloat16 only where the
    CPU has native bfloat16 dot products (AVX512-BF16 or AMX on Linux); elsewhere bfloat16
    matrix products are emulated and slower than float32."""
    if name != "auto":
        return name
    try:
        flags = cpuinfo.read_text().split()
    except OSError:
        return "float32"
    return "bfloat16" if {"avx512_bf16", "amx_bf16"} & set(flags) else "float32"


@dataclass(frozen=True)
class TrainResult:
    loss: float
    steps: int
    sample_rate: float
    noise_multiplier: float
    epsilon: float  # after this call; 0 without DP
    optimizer_state: dict | None = None  # local optimizer moments (never sent anywhere)


def trainable_users(seqs: Sequences) -> int:
    """Users with a history prefix and a next item (2 or more interactions): the examples
    :class:`UserExamples` makes, the privacy units Opacus samples, and the count the sample
    rate and δ are computed from."""
    return int((seqs.lengths() >= 2).sum())


@dataclass(frozen=True)
class Split:
    """Leave-last-out: ``train`` holds every user's history but the last item; ``target`` is it.

    Users with fewer than 2 interactions have nothing to evaluate and are dropped here.
    """

    train: Sequences
    target: np.ndarray  # (U,) item index of the held-out item


def leave_last_out(seqs: Sequences) -> Split:
    lengths = seqs.lengths()
    keep = np.flatnonzero(lengths >= 2)
    starts, ends = seqs.offsets[keep], seqs.offsets[keep + 1]
    target = seqs.item_index[ends - 1]
    parts = [seqs.item_index[s : e - 1] for s, e in zip(starts, ends, strict=True)]
    new_len = (ends - 1 - starts).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(new_len)]).astype(np.int64)
    items = np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
    return Split(Sequences(seqs.users[keep], offsets, items), target.astype(np.int64))


def pad_histories(
    seqs: Sequences, rows: np.ndarray, ends: np.ndarray, max_len: int
) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded (most recent last) history windows ``items[end-max_len:end]`` per row."""
    hist = np.zeros((len(rows), max_len), dtype=np.int64)
    mask = np.zeros((len(rows), max_len), dtype=bool)
    for i, (r, e) in enumerate(zip(rows, ends, strict=True)):
        s = seqs.offsets[r]
        window = seqs.item_index[max(s, s + e - max_len) : s + e]
        if len(window):
            hist[i, -len(window) :] = window
            mask[i, -len(window) :] = True
    return hist, mask


def check_item_range(seqs: Sequences, n_items: int) -> None:
    """Every item index must name a row of the item matrix (no silent negative wrap-around)."""
    idx = seqs.item_index
    if len(idx) and (idx.min() < 0 or idx.max() >= n_items):
        bad = idx[(idx < 0) | (idx >= n_items)]
        raise ValueError(
            f"{len(bad)} interaction(s) name item indices outside the catalogue [0, {n_items}) "
            f"(e.g. {int(bad[0])}): the sequences and the item matrix do not belong together"
        )


class UserExamples(torch.utils.data.Dataset):
    """One example per user: up to ``spec.positions`` next-item predictions from that user's
    own history, redrawn on every access.

    An example is ``(inputs, cands)``: ``inputs["x"]`` (P, 2E) summarises P distinct prefixes
    of the user's training history (with ``ids``, ``inputs["ids"]`` (P, L) holds their last
    ``max_history`` item indices, for item tables), and ``cands[p, 0]`` is the item that
    followed prefix p, then ``spec.negatives`` uniform public negatives (with 0 negatives the
    loss is a softmax over the whole catalogue). Users with fewer prefixes pad with
    ``cands == -1``. The user's loss is the mean over its predictions
    (:class:`PerUserCrossEntropy`), so its gradient, the one DP-SGD clips, averages many
    predictions: a steadier direction per user than one prediction, at the same privacy cost.

    Works under Opacus's DPDataLoader (Poisson sampling) through ``__getitems__``.
    """

    def __init__(
        self, seqs: Sequences, items: torch.Tensor, spec: TrainSpec, ids: bool = False
    ) -> None:
        self.lengths = seqs.lengths()
        self.rows = np.flatnonzero(self.lengths >= 2)  # as trainable_users: prefix + next item
        self.seqs, self.items, self.spec, self.ids = seqs, items, spec, ids
        self.rng = np.random.default_rng(spec.seed)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        inputs, cands = self.__getitems__([i])
        return {k: v[0] for k, v in inputs.items()}, cands[0]

    def __getitems__(self, idx: list[int]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        rows = self.rows[np.asarray(idx, dtype=np.int64)]
        cut = self.draw_prefixes(self.lengths[rows])  # (B, P), 0 = unused
        inputs = {"x": summarize_prefixes(self.items, self.seqs, rows, cut, self.spec.max_history)}
        if self.ids:
            inputs["ids"] = history_ids(self.seqs, rows, cut, self.spec.max_history)
        used = cut > 0
        nxt = self.seqs.item_index[self.seqs.offsets[rows][:, None] + np.where(used, cut, 0)]
        negs = self.rng.integers(0, len(self.items), size=(*cut.shape, self.spec.negatives))
        cands = np.concatenate([nxt[..., None], negs], axis=-1)
        cands[~used] = -1
        return inputs, torch.from_numpy(cands)

    def draw_prefixes(self, lengths: np.ndarray) -> np.ndarray:
        """Up to P distinct prefix lengths in [1, length - 1] per user, uniformly; 0 pads."""
        p = self.spec.positions
        width = max(int(lengths.max(initial=2)) - 1, p)
        keys = self.rng.random((len(lengths), width))
        keys[np.arange(width)[None, :] >= (lengths - 1)[:, None]] = np.inf  # not a prefix
        order = np.argsort(keys, axis=1)[:, :p]  # (B, P) random distinct slots
        return np.where(np.take_along_axis(keys, order, axis=1) < np.inf, order + 1, 0)


class WindowExamples(UserExamples):
    """One example per user for the sequence tower: a window of up to ``max_history + 1``
    consecutive items of the user's training history, redrawn on every access; up to
    ``spec.positions`` of its positions, drawn uniformly, each predict the item that followed.

    An example is ``(inputs, cands)``: ``inputs`` holds ``x`` (T, E) the window's inputs,
    left-padded with zero vectors (most recent last), ``mask`` (T,) where ``x`` holds an item,
    ``slots`` (P,) the predicting positions, ``summaries`` (P, 2E) the mean tower's summaries
    of the same prefixes over the whole history (and with ``ids``, ``ids`` (P, L) their item
    indices), and ``cands[p, 0]`` the item that followed slot ``slots[p]``, then
    ``spec.negatives`` uniform public negatives; ``cands == -1`` pads. The window ends at a
    uniform point of the history (at its end when the history fits in one window), so every
    stretch of it is trained on. One causal pass gives every position; the user's loss is one
    mean over its predictions, clipped as one example.
    """

    def __getitems__(self, idx: list[int]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        rows = self.rows[np.asarray(idx, dtype=np.int64)]
        n = self.lengths[rows]
        size = np.minimum(n, self.spec.max_history + 1)  # items in the window
        end = self.rng.integers(size, n + 1)  # one past the window's last item
        t = int(size.max(initial=2)) - 1
        first = t - (size - 1)  # slot of each window's first input
        slot = np.arange(t)[None, :] - first[:, None]  # input index, < 0: padding
        used = slot >= 0
        at = self.seqs.offsets[rows][:, None] + (end - size)[:, None] + np.where(used, slot, 0)
        hist = torch.from_numpy(self.seqs.item_index[at])  # (B, T)
        mask = torch.from_numpy(used)
        x = self.items[hist] * mask.unsqueeze(-1).to(self.items.dtype)  # (B, T, E)
        cut = self.draw_prefixes(size)  # (B, P) prefix lengths in the window, 0 = unused
        live = cut > 0
        slots = np.where(live, first[:, None] + cut - 1, 0)
        # the base's summaries of the same prefixes, over the whole history before them
        whole = np.where(live, (end - size)[:, None] + cut, 0)
        summaries = summarize_prefixes(self.items, self.seqs, rows, whole, self.spec.max_history)
        inputs = {"x": x, "mask": mask, "slots": torch.from_numpy(slots), "summaries": summaries}
        if self.ids:
            inputs["ids"] = history_ids(self.seqs, rows, whole, self.spec.max_history)
        nxt = np.take_along_axis(self.seqs.item_index[at + 1], slots, axis=1)
        negs = self.rng.integers(0, len(self.items), size=(*cut.shape, self.spec.negatives))
        cands = np.concatenate([nxt[..., None], negs], axis=-1)
        cands[~live] = -1
        return inputs, torch.from_numpy(cands)


def history_ids(
    seqs: Sequences, rows: np.ndarray, cut: np.ndarray, max_history: int
) -> torch.Tensor:
    """The item indices of the prefixes :func:`summarize_prefixes` summarises: row ``j``,
    column ``p`` holds the last ``max_history`` items of ``seqs[rows[j]][:cut[j, p]]``,
    left-padded with -1, most recent last -> (B, P, max_history) int64."""
    cut = np.asarray(cut, dtype=np.int64)
    k = np.arange(max_history)
    first = max_history - np.minimum(cut, max_history)  # slot of each window's first item
    used = k >= first[..., None]  # (B, P, L)
    at = seqs.offsets[rows][:, None, None] + cut[..., None] - max_history + k
    got = seqs.item_index[np.where(used, at, 0)] if len(seqs.item_index) else np.zeros(at.shape)
    return torch.from_numpy(np.where(used, got, -1).astype(np.int64))


def examples_for(
    model: RecModel, seqs: Sequences, items: torch.Tensor, spec: TrainSpec
) -> UserExamples:
    """The examples a model's tower trains on: windows for the sequence tower, prefixes
    otherwise; with item indices where the model has item tables."""
    kind = WindowExamples if model.spec.tower == "attention" else UserExamples
    return kind(seqs, items, spec, ids=model.spec.item_table > 0)


def _collate(batch: Any) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Identity: :meth:`UserExamples.__getitems__` already returns the batch's tensors."""
    return tuple(batch)


class PerUserCrossEntropy(nn.Module):
    """Cross-entropy averaged over each user's predictions (label -1 = padding), then reduced
    over users by ``reduction`` ("mean", "sum" or "none" for per-user losses, which is how
    Opacus's ghost clipping calls it).

    ``logits`` is (B, P, C), or packed (M, C): one row per used prediction, in the row-major
    order of ``labels >= 0``, as :func:`candidate_scores` gives for a full-catalogue softmax.
    """

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if logits.dim() == labels.dim() + 1:
            ce = nn.functional.cross_entropy(
                logits.flatten(0, 1), labels.flatten().clamp(min=0), reduction="none"
            ).view(labels.shape)  # (B, P)
        else:
            packed = nn.functional.cross_entropy(logits, labels[labels >= 0], reduction="none")
            ce = logits.new_zeros(labels.shape).masked_scatter(labels >= 0, packed)  # (B, P)
        used = (labels >= 0).to(ce.dtype)
        per_user = (ce * used).sum(1) / used.sum(1).clamp(min=1.0)  # (B,)
        if self.reduction == "none":
            return per_user
        return per_user.sum() if self.reduction == "sum" else per_user.mean()


def candidate_logits(users: torch.Tensor, items: torch.Tensor, cands: torch.Tensor) -> torch.Tensor:
    """Scores of each prediction's own candidates: (..., E) x (N, E), (..., C) -> (..., C).

    For catalogues up to :data:`FULL_SCORE_MAX` items, scoring the whole catalogue and picking
    the candidates is cheaper than gathering (..., C, E) candidate vectors.
    """
    if len(items) <= FULL_SCORE_MAX:
        return item_scores(users, items).gather(-1, cands)
    return (items[cands] @ users.unsqueeze(-1)).squeeze(-1)


FULL_SCORE_MAX = 20_000


def candidate_scores(
    users: torch.Tensor, items: torch.Tensor, cands: torch.Tensor, low_precision: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) of user vectors (B, P, E); labels (B, P) with -1 = padding.

    With sampled negatives, logits are (B, P, 1+K). With none, the softmax runs over the whole
    public catalogue and logits are packed, (used predictions, N): a (B, P, N) block would
    spend most of its time on padding when histories are shorter than ``positions``.
    ``low_precision`` computes full-catalogue logits (and their backward) in bfloat16.
    """
    used = cands[..., 0] >= 0
    if cands.shape[-1] == 1:  # no sampled negatives: softmax over the whole public catalogue
        labels = torch.where(used, cands[..., 0], -1)
        if low_precision:
            return item_scores(users[used].bfloat16(), items.bfloat16()).float(), labels
        return item_scores(users[used], items), labels  # (M, N), (B, P)
    logits = candidate_logits(users, items, cands.clamp(min=0))  # (B, P, 1+K)
    collide = cands[..., 1:] == cands[..., :1]  # a negative that is the target is no negative
    logits = torch.cat([logits[..., :1], logits[..., 1:].masked_fill(collide, -1e4)], dim=-1)
    return logits, torch.where(used, 0, -1)


def output_grads(
    users: torch.Tensor,
    items: torch.Tensor,
    cands: torch.Tensor,
    low_precision: bool = False,
    score_grads: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Each user's loss (B,), its gradient with respect to that user's outputs (B, P, W) and,
    with ``score_grads``, with respect to each prediction's scores over the catalogue
    (B, P, N; zeros where a prediction is padding or an item not its candidate).

    One forward and one backward through the catalogue scores (``items``: the score matrix),
    outside the model's graph: see :class:`LinearizedLoss`.
    """
    u = users.detach().requires_grad_()
    with torch.enable_grad():
        logits, labels = candidate_scores(u, items, cands, low_precision)
        per_user = PerUserCrossEntropy("none")(logits, labels)
        if not score_grads:
            (grad,) = torch.autograd.grad(per_user.sum(), u)
            return per_user.detach(), grad, None
        grad, by_score = torch.autograd.grad(per_user.sum(), (u, logits))
    dense = by_score.new_zeros(*cands.shape[:-1], len(items))
    if cands.shape[-1] == 1:  # packed rows of the used predictions
        dense[cands[..., 0] >= 0] = by_score
    else:
        dense.scatter_add_(-1, cands.clamp(min=0), by_score)
    return per_user.detach(), grad, dense


class LinearizedLoss(nn.Module):
    """Per-user ``<output_i, G_i>`` with ``G_i`` = d loss_i / d output_i held constant, plus,
    for a model with an output table, that table's per-user term (``table``,
    :meth:`RecModel.table_term`).

    Its gradient with respect to the model's parameters is exactly the per-user loss's, so
    training on it is training on the loss. What it saves: Opacus's ghost clipping runs two
    backward passes (one for per-user norms, one for the clipped sum); through this loss both
    stop at the model's output instead of crossing the (users x catalogue) scores twice, the
    bulk of a step's cost. Clipping stays exact: both passes read the same ``G``.
    """

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = reduction

    def forward(
        self, outputs: torch.Tensor, grads: torch.Tensor, table: torch.Tensor | None = None
    ) -> torch.Tensor:
        per_user = (outputs * grads).flatten(1).sum(1)
        if table is not None:
            per_user = per_user + table
        if self.reduction == "none":
            return per_user
        return per_user.sum() if self.reduction == "sum" else per_user.mean()


def linearized_loss(
    model: RecModel,
    users: torch.Tensor,
    items: torch.Tensor,
    cands: torch.Tensor,
    low_precision: bool = False,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Each user's loss (B,) and what :class:`LinearizedLoss` takes for ``model``'s outputs
    ``users``: (outputs, their gradients[, the output table's term])."""
    table = model.item_table is not None
    per_user, grads, by_score = output_grads(
        users, model.score_matrix(items), cands, low_precision, score_grads=table
    )
    if by_score is None:
        return per_user, (users, grads)
    return per_user, (users, grads, model.table_term(users, by_score))


def train_step(
    net: nn.Module,
    model: RecModel,
    optimizer: torch.optim.Optimizer,
    criterion: Callable[..., torch.Tensor],
    items: torch.Tensor,
    batch: tuple[dict[str, torch.Tensor], torch.Tensor],
    low_precision: bool = False,
) -> torch.Tensor:
    """One optimiser step on ``batch`` through :class:`LinearizedLoss` (``criterion``, as
    Opacus wraps it under ghost clipping); returns each user's loss. ``net`` is ``model``, or
    Opacus's wrapper around it."""
    optimizer.zero_grad(set_to_none=True)
    inputs, cands = batch  # the model's keyword inputs, the candidates
    per_user, args = linearized_loss(model, net(**inputs), items, cands, low_precision)
    criterion(*args).backward()
    optimizer.step()
    return per_user


HEAD_PROJECTION = "to_items.weight"  # W_o: learns at lr x TrainSpec.head_lr_scale


def _optimizer(model: nn.Module, spec: TrainSpec) -> torch.optim.Optimizer:
    """Adam or SGD with two parameter groups: everything at ``spec.lr``, and the head's
    projection W_o at ``spec.lr * spec.head_lr_scale``."""
    named = list(model.named_parameters())
    groups = [
        {"params": [p for n, p in named if n != HEAD_PROJECTION], "lr": spec.lr},
        {
            "params": [p for n, p in named if n == HEAD_PROJECTION],
            "lr": spec.lr * spec.head_lr_scale,
        },
    ]
    if spec.optimizer == "adam":
        return torch.optim.Adam(groups, lr=spec.lr)
    return torch.optim.SGD(groups, lr=spec.lr)


def _cycle(loader: torch.utils.data.DataLoader, steps: int):  # noqa: ANN202
    done = 0
    while done < steps:
        for batch in loader:
            yield batch
            done += 1
            if done == steps:
                return


def train_local(
    model: RecModel,
    items: torch.Tensor,
    seqs: Sequences,
    spec: TrainSpec,
    *,
    dp: DPSession | None = None,
    global_params: dict[str, torch.Tensor] | None = None,
    head_mean: dict[str, torch.Tensor] | None = None,
    grad_hook: GradHook | None = None,
    optimizer_state: dict | None = None,
) -> TrainResult:
    """Train ``model`` in place for ``spec.steps`` steps; with ``dp``, DP-SGD via Opacus.

    With DP, the session checks the budget first (raises :class:`privacy.BudgetExceeded`,
    nothing trained) and its accountant records the steps the optimizer runs. ``grad_hook``
    runs after per-user clipping and before noise (for white-box audits only).

    Two proximal terms may pull the weights, each applied as a separate step after every
    (noised) update. Neither depends on any user's data, so neither costs ε:

    * FedProx, ``spec.proximal_mu / 2 * ||w - w_global||^2`` over every parameter, toward
      ``global_params`` (Li et al., MLSys 2020);
    * mean-regularised multi-task learning, ``spec.head_pull / 2 * ||h - h_mean||^2`` over the
      platform's head, toward ``head_mean``, the average of every platform's head in the
      global model (MR-MTL; Liu, Hu, Wu and Smith, NeurIPS 2022). The platforms' heads stay
      their own but share what their noisy updates agree on.
    """
    check_item_range(seqs, len(items))
    examples = examples_for(model, seqs, items, spec)
    if len(examples) == 0:
        raise ValueError(
            f"no user has 2 or more training interactions on this channel "
            f"({len(seqs)} users): nothing to train on"
        )
    # Opacus draws Poisson sampling and Gaussian noise from torch's global RNG. Under DP it is
    # seeded from OS entropy (:meth:`DPSession.noise_seed`): noise that a known seed (the run
    # config is known to the server) determines could be regenerated and subtracted.
    # ``spec.seed`` fixes everything else.
    torch.manual_seed(spec.seed if dp is None else dp.noise_seed(spec.seed))
    model.train()
    loader = torch.utils.data.DataLoader(
        examples,
        batch_size=min(spec.batch_size, len(examples)),
        shuffle=dp is None,
        collate_fn=_collate,
        generator=torch.Generator().manual_seed(spec.seed) if dp is None else None,
    )
    sample_rate = 1.0 / len(loader) if dp is None else dp.sample_rate
    optimizer = _optimizer(model, spec)
    base_optimizer = optimizer
    if optimizer_state is not None:
        # Continue the node's own optimizer (Adam moments) across rounds: a fresh Adam every
        # round restarts from noisy first steps. It is computed from DP-noised gradients
        # (post-processing) and stays on the node.
        optimizer.load_state_dict(optimizer_state)
    criterion: nn.Module = LinearizedLoss()
    net: nn.Module = model
    if dp is not None:
        planned_epsilon = dp.check_budget(spec.steps)
        steps_before = dp.total_steps()
        net, dp_optimizer, criterion, loader = dp.make_private(model, optimizer, loader, criterion)
        if grad_hook is not None:
            _install_grad_hook(dp_optimizer, grad_hook)
        optimizer = dp_optimizer
    # (parameter, where it is pulled, step size): a pull moves each parameter at its group's
    # learning rate, as its data gradient does (W_o at lr x head_lr_scale).
    lr_of = {id(p): g["lr"] for g in base_optimizer.param_groups for p in g["params"]}
    anchors = [
        (p, target[name].detach().clone(), lr_of[id(p)] * strength)
        for target, strength in ((global_params, spec.proximal_mu), (head_mean, spec.head_pull))
        if target and strength > 0
        for name, p in model.named_parameters()
        if name in target
    ]
    low_precision = resolve_scores_dtype(spec.scores_dtype) == "bfloat16"
    losses: list[float] = []
    for batch in _cycle(loader, spec.steps):
        per_user = train_step(net, model, optimizer, criterion, items, batch, low_precision)
        with torch.no_grad():
            for p, target, step in anchors:
                p.sub_(step * (p - target))
        if len(per_user):
            losses.append(float(per_user.mean()))
    epsilon, steps = 0.0, spec.steps
    if dp is not None:
        steps = dp.total_steps() - steps_before  # what the optimizer ran, as accounted
        epsilon = planned_epsilon if steps == spec.steps else dp.epsilon()
        _cleanup(net)
    return TrainResult(
        loss=float(np.mean(losses)) if losses else math.nan,
        steps=steps,
        sample_rate=sample_rate,
        noise_multiplier=dp.noise_multiplier if dp else 0.0,
        epsilon=epsilon,
        optimizer_state=base_optimizer.state_dict(),
    )


GradHook = Callable[[torch.optim.Optimizer], None]


def _install_grad_hook(optimizer: DPOptimizer, hook: GradHook) -> None:
    """Run ``hook`` on the sum of clipped per-user gradients (``p.summed_grad``), just before
    Opacus adds noise. The noise multiplier is put back after the noise step, so the
    accountant, whose step hook reads it next, records the planned one whatever the hook did."""
    original = optimizer.add_noise

    def add_noise() -> None:
        sigma = optimizer.noise_multiplier
        hook(optimizer)
        original()
        optimizer.noise_multiplier = sigma

    optimizer.add_noise = add_noise  # type: ignore[method-assign]


def canary_directions(
    shapes: list[tuple[int, ...]], count: int, seed: int, channel: str
) -> np.ndarray:
    """``count`` random unit directions over the flattened parameters, (count, P) float32.

    White-box audit canaries (Andrew et al., "One-shot Empirical Privacy Estimation for
    Federated Learning", ICLR 2024): the client inserts the first ``count // 2``, the auditor
    regenerates all of them from ``(seed, channel)`` and uses the rest as the null. Parameters
    are flattened in ``model.parameters()`` order (the state_dict order of :class:`RecModel`).
    """
    size = int(sum(int(np.prod(s)) for s in shapes))
    rng = np.random.default_rng([seed, zlib.crc32(channel.encode())])
    u = rng.standard_normal((count, size), dtype=np.float32)  # (K, P)
    return u / np.linalg.norm(u, axis=1, keepdims=True)


def canary_grad_hook(
    model: nn.Module,
    directions: np.ndarray,
    *,
    max_grad_norm: float,
    sample_rate: float,
    seed: int,
    disable_noise: bool = False,
) -> GradHook:
    """A ``grad_hook`` that adds gradient canaries ``C * u_j`` to the clipped sum, each
    Poisson-included with the users' ``sample_rate`` (Andrew et al. 2024).

    ``disable_noise`` is FAULT INJECTION for the audit's own test: the noise step adds no
    noise (the noise multiplier is 0 during it), while the accountant keeps recording the
    planned one. Never use it for a real run.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    u = torch.from_numpy(np.ascontiguousarray(directions)) * max_grad_norm  # (K, P)
    rng = np.random.default_rng(seed)

    def hook(optimizer: torch.optim.Optimizer) -> None:
        if disable_noise:
            optimizer.noise_multiplier = 0.0  # type: ignore[attr-defined]
        picked = np.flatnonzero(rng.random(len(u)) < sample_rate)
        if not len(picked):
            return
        flat = u[torch.from_numpy(picked)].sum(0)  # (P,)
        start = 0
        for p in params:
            n = p.numel()
            p.summed_grad.add_(flat[start : start + n].view_as(p))  # type: ignore[attr-defined]
            start += n

    return hook


def _cleanup(net: nn.Module) -> None:
    for name in ("_close", "cleanup"):
        fn = getattr(net, name, None)
        if callable(fn):
            try:
                fn()
            except Exception:  # noqa: BLE001 - best effort; the model weights are already final
                pass


ScoreFn = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (hist, mask) -> (B, N) scores


def model_scorer(model: RecModel, items: torch.Tensor) -> ScoreFn:
    """Full-catalogue scores of the trained model for padded histories."""
    model.eval()

    @torch.inference_mode()
    def score(hist: np.ndarray, mask: np.ndarray) -> np.ndarray:
        h = torch.from_numpy(hist)
        p = model.profile(items[h], torch.from_numpy(mask), ids=h)
        return model.score_items(p, items).numpy()

    return score


def evaluate(
    score: ScoreFn,
    n_items: int,
    split: Split,
    *,
    max_history: int = 50,
    max_users: int | None = None,
    sampled: int = 0,
    seed: int = 0,
    batch: int = 512,
) -> tuple[dict[str, float], int]:
    """Leave-last-out ranking metrics over the full catalogue (seen items excluded).

    With ``sampled > 0`` (e.g. 99), the target is instead ranked against that many uniformly
    sampled unseen items (the NCF protocol), for comparison with papers.

    Returns:
        (metrics, number of evaluated users).
    """
    check_item_range(split.train, n_items)
    rng = np.random.default_rng(seed)
    users = np.arange(len(split.train))
    if max_users is not None and len(users) > max_users:
        users = np.sort(rng.choice(users, size=max_users, replace=False))
    ranks = []
    lengths = split.train.lengths()
    for s in range(0, len(users), batch):
        rows = users[s : s + batch]
        hist, mask = pad_histories(split.train, rows, lengths[rows], max_history)
        scores = score(hist, mask)
        seen = [
            split.train.item_index[split.train.offsets[r] : split.train.offsets[r + 1]]
            for r in rows
        ]
        if sampled:
            negs = sample_negatives(rng, n_items, split.target[rows], seen, sampled)
            ranks.append(sampled_rank(scores, split.target[rows], negs))
        else:
            ranks.append(rank_of_target(scores, split.target[rows], seen))
    r = np.concatenate(ranks) if ranks else np.zeros(0)
    return metrics_from_ranks(r), len(r)
