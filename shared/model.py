"""The model: a user-profile tower and a scorer over constant item vectors.

Owns: the one architecture that every channel trains and the server aggregates
(:class:`CrossPlatformModel`: a shared tower W_h; per platform ``W_o``, ``b`` and its own
tower W_c; each platform trains its :class:`RecModel` view), and the history summaries it
reads. Item vectors come from the central text encoder and are inputs, never parameters: there
is no per-user table, and the federated model has no per-item table, so nothing in its weights
is indexed by a user or an item. A platform's own model may add per-item tables
(``spec.item_table``, below).

Design (DP utility decides it: under DP-SGD an MLP scorer over ``[p, c, p*c]`` stayed near
chance in a probe, while a dot-product scorer whose untrained scores already correlate with the
target learned):
  * profile  p = W_h x + W_c x + MLP(x),  x = [mean(h), recent(h)]  (B, D); W_c starts at 0
  * query    u = tau * (W_o p + b)                                (B, E)  back in item space
  * score    s(c) = <u, c>  = tau * <W_o^T c, p> + tau * <b, c>    for each item vector c
This is a dot-product scorer with a trainable projection of item vectors (``W_o^T c``), an
item prior carried by text (``<b, c>``) and an MLP residual. With ``spec.item_prior`` each item
vector carries one more column, the platform's own popularity prior in logits over ``TAU``
(:func:`with_prior`; the platform computes it from its own users and keeps it), and the
bias on that column is a learned weight beta, 1 at the start: the score adds ``beta * prior``. The projection is applied on the
user side, so every parameterised layer sees (B, ...) inputs: per-user gradients are cheap,
and full ranking is one matrix product with the constant item matrix.
``W_h`` and ``W_o`` start from the same random orthonormal projection, so the untrained model
already ranks by text similarity to the history; DP-SGD only has to learn corrections
(recency, interest transitions, popularity carried by text). The MLP's last layer and ``b``
start at zero. The tower and head are ``nn.Linear`` layers (no raw parameters, no weight
tying): all Opacus grad-sample modes, ghost clipping included, support them.

The per-item tables (``spec.item_table`` = N rows, ``model.item-table``; a platform's own model
only) let items the text cannot tell apart be told apart, as ID embeddings do in SASRec or
BPR, on both sides of the score:
  * history  p += mean_{j in window} H_j + mean_{j in last RECENT} H'_j   (H, H': N x D)
  * output   item i's projection becomes W_o^T c_i + R_i                  (R: N x D)
All three start at zero, so the model starts as the one without them. H and H' are
:class:`HistoryBag` layers read with the history's item ids. For R the user vector carries
tau * s * p after its E columns and is scored against the item matrix with R's rows appended
(:meth:`RecModel.score_matrix`), so full ranking stays one matrix product; training reads R's
gradient through a per-user term of the loss (:class:`OutputTable`), never through a (users x
catalogue) block of the model's graph. Both layers have samplers that give Opacus each
user's gradient and its norm exactly (``fedrec.client.samplers``), and items added after
training have no rows (they rank by text alone).

The sequence tower (``spec.tower = "attention"``, SASRec-like: Kang and McAuley, ICDM 2018)
reads the ordered history x_1..x_T (item vectors, most recent last) and adds an order-aware
residual to the mean tower's profile at every position t:
  * base     b_t = W_h f_t + W_c f_t,  f_t = [mean(x_1..x_t), mean(x_{t-2}..x_t)]   (B, T, D)
  * sequence z_t = W_in x_t + P onehot(T-t) (P: a position vector per distance from the end)
             z   = z + A(LN z),  z = z + F(LN z)   (per block; A is causal self-attention,
                   position t attends to 1..t, F a GELU feed-forward)
  * profile  p_t = b_t + W_s LN(z_t)                       W_s starts at 0
so the untrained attention tower is the untrained mean tower (W_in starts as its projection).
Training predicts x_{t+1} from p_t at positions of a user's window drawn at once, from one
causal pass; b_t is computed at those positions only, over the whole history before t (its
last max-history items, as the profile served, p_T, reads them). Each layer is an ``nn.Linear`` called once per forward (ghost clipping refuses a layer
called twice); layer norms have no parameters, and positions are a linear map of a one-hot
slot, so the tower has no raw parameters either.

Must not: import ``fedrec.server`` or ``fedrec.client``.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedrec.shared.config import FEDERATED_ITEM_TABLE, TOWERS, ConfigError, FedrecConfig
from fedrec.shared.data import Sequences

RECENT = 3  # the "recent" summary averages the last RECENT history items
TAU = 20.0  # fixed logit scale for the dot product (cosine-like inputs)


@dataclass(frozen=True)
class ModelSpec:
    item_dim: int = 384
    dim: int = 64
    hidden: int = 0
    seed: int = 0
    own_tower: bool = False  # a platform's own tower, added to the shared one (zero at start)
    item_prior: bool = False  # item vectors carry one more column: the platform's item prior
    head_scale: float = 1.0  # the head reads head_scale * profile (as ModelConfig.head_scale)
    tower: str = "mean"  # "mean": history summaries; "attention": + a causal sequence residual
    blocks: int = 1  # attention blocks (tower = "attention")
    attention_heads: int = 2
    max_history: int = 50  # positions the sequence tower knows (its window)
    item_table: int = 0  # rows of the per-item tables H, H', R (the catalogue's items; 0: none)

    @property
    def in_dim(self) -> int:
        """Columns of the item matrix the model reads: text vector [+ prior]."""
        return self.item_dim + int(self.item_prior)


def with_prior(items: torch.Tensor, prior: np.ndarray) -> torch.Tensor:
    """(N, E) item vectors + an (N,) item prior in logits -> (N, E+1).

    The column holds ``prior / TAU``: the head's bias on it (beta, 1 at the start) turns it
    back into ``beta * prior`` added to each item's score.
    """
    if prior.shape != (len(items),):
        raise ValueError(
            f"the item prior has shape {prior.shape}, the catalogue {len(items)} items"
        )
    column = torch.from_numpy(np.asarray(prior, dtype=np.float32) / TAU).unsqueeze(1)
    return torch.cat([items, column], dim=1)


def summarize_history(
    hist: torch.Tensor, mask: torch.Tensor, query: torch.Tensor | None = None
) -> torch.Tensor:
    """[masked mean of all history, masked mean of the last RECENT items] -> (B, 2*E).

    Args:
        hist: (B, L, E) item vectors, most recent last, left-padded.
        mask: (B, L) bool, True where ``hist`` holds an item.
        query: optional (B, E) search-query vectors; when given, the recent summary becomes
            the average of the recent items and the query (or the query alone).
    """
    m = mask.to(hist.dtype).unsqueeze(-1)  # (B, L, 1)
    mean = (hist * m).sum(1) / m.sum(1).clamp(min=1.0)  # (B, E)
    rm = m.clone()
    rm[:, : max(hist.shape[1] - RECENT, 0)] = 0.0
    recent = (hist * rm).sum(1) / rm.sum(1).clamp(min=1.0)  # (B, E)
    if query is not None:
        has_recent = (rm.sum(1) > 0).to(hist.dtype)  # (B, 1)
        recent = has_recent * 0.5 * (recent + query) + (1 - has_recent) * query
    return torch.cat([mean, recent], dim=-1)  # (B, 2E)


def causal_summaries(
    x: torch.Tensor, mask: torch.Tensor, slots: torch.Tensor | None = None
) -> torch.Tensor:
    """:func:`summarize_history` of the prefixes of a left-padded window that end at ``slots``.

    Args:
        x: (B, T, E) item vectors, most recent last; mask: (B, T) bool.
        slots: (B, P) positions; default every position (P = T).
    Returns:
        (B, P, 2E): [mean of the items in slots <= t, mean of the last RECENT of them] for
        each t in ``slots``; zeros where t is padding. t = T-1 gives ``summarize_history``.
    """
    if slots is None:
        slots = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
    m = mask.to(x.dtype).unsqueeze(-1)  # (B, T, 1)
    total, count = (x * m).cumsum(1), m.cumsum(1)  # running sums (B, T, E), (B, T, 1)

    def at(a: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # a[b, t], 0 where t < 0
        got = a.gather(1, t.clamp(min=0).unsqueeze(-1).expand(-1, -1, a.shape[-1]))
        return got * (t >= 0).unsqueeze(-1).to(a.dtype)

    now_sum, now_n = at(total, slots), at(count, slots)  # (B, P, E), (B, P, 1)
    old_sum, old_n = at(total, slots - RECENT), at(count, slots - RECENT)
    mean = now_sum / now_n.clamp(min=1.0)
    recent = (now_sum - old_sum) / (now_n - old_n).clamp(min=1.0)
    return torch.cat([mean, recent], dim=-1) * at(m, slots)  # (B, P, 2E)


def summarize_prefixes(
    items: torch.Tensor, seqs: Sequences, rows: np.ndarray, cut: np.ndarray, max_history: int
) -> torch.Tensor:
    """:func:`summarize_history` of many prefixes at once, without padded histories.

    Row ``j``, column ``p`` summarises the prefix ``seqs[rows[j]][:cut[j, p]]`` (its last
    ``max_history`` items); ``cut == 0`` marks an unused slot and gives zeros. Each window mean
    is one row of a sparse (prefixes x items) averaging matrix times the item matrix, so a
    step reads each window's items once and never builds (prefixes, max_history, E) tensors.

    Args:
        items: (N, E) item vectors.
        rows: (B,) row indices of ``seqs``.
        cut: (B, P) prefix lengths, each in [0, len(row)].
    Returns:
        (B, P, 2E) float32, equal to ``summarize_history`` of the padded prefixes.
    """
    cut = np.asarray(cut, dtype=np.int64)
    if np.any(cut > seqs.lengths()[rows][:, None]) or np.any(cut < 0):
        raise ValueError("a prefix length is outside [0, length of its row]")
    starts = np.broadcast_to(seqs.offsets[rows][:, None], cut.shape).ravel()  # per window

    def window_mean(width: int) -> torch.Tensor:
        lo = np.maximum(cut - width, 0).ravel()
        counts = cut.ravel() - lo  # items per window
        ends = np.cumsum(counts)
        first = starts + lo  # first item position per window
        pos = np.arange(ends[-1] if len(ends) else 0) + np.repeat(first - (ends - counts), counts)
        with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
            warnings.simplefilter("ignore", UserWarning)
            averaging = torch.sparse_csr_tensor(
                torch.from_numpy(np.concatenate([[0], ends])),
                torch.from_numpy(seqs.item_index[pos]),
                torch.from_numpy(np.repeat(1.0 / np.maximum(counts, 1), counts).astype(np.float32)),
                size=(cut.size, len(items)),
                check_invariants=False,  # built valid above; checking costs a pass over it
            )
        return (averaging @ items).view(*cut.shape, items.shape[1])

    return torch.cat([window_mean(max_history), window_mean(min(RECENT, max_history))], dim=-1)


def item_scores(users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """(..., W) user vectors x (N, W) score matrix -> (..., N) scores: ``u @ items.T``.

    The score matrix is the item matrix, or with an output table the model's
    :meth:`RecModel.score_matrix`."""
    return users @ items.T


class HistoryBag(nn.Module):
    """A per-item table read as bags: item indices (..., L) -> the mean of their rows (..., D).

    Indices outside [0, rows) (padding -1, items added after training) read no row; a bag
    with no row reads zeros. One ``embedding_bag`` call, so a step never builds the
    (..., L, D) rows it averages. ``weight`` has ``rows + 1`` rows, the last one for "no
    item" (never read). Opacus clips it per user through fedrec's samplers
    (``fedrec.client.samplers``): its positional input is the indices alone.
    """

    def __init__(self, rows: int, dim: int) -> None:
        super().__init__()
        self.rows = rows
        self.weight = nn.Parameter(torch.zeros(rows + 1, dim))

    def entries(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(..., L) indices -> (the row each entry reads, ``rows`` for none; its weight in
        its bag's mean, 0 for none), both (..., L)."""
        has = (ids >= 0) & (ids < self.rows)
        w = has.to(self.weight.dtype)
        return torch.where(has, ids, self.rows), w / w.sum(-1, keepdim=True).clamp(min=1.0)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows, _ = self.entries(ids)
        flat = rows.reshape(-1, ids.shape[-1])
        out = nn.functional.embedding_bag(flat, self.weight, mode="mean", padding_idx=self.rows)
        return out.view(*ids.shape[:-1], self.weight.shape[1])


class OutputTable(nn.Module):
    """Per-item output rows R (rows x D): item i's score adds <a, R_i> for the user's D
    columns a = tau * s * p after its E columns (:meth:`RecModel.score_matrix` appends R to
    the item matrix).

    Training reads R's gradient through :meth:`forward`, a per-user term linear in R, so no
    (users x catalogue) block of the model's graph is built: with the loss's gradient with
    respect to each prediction's scores G (B, P, N) and the users' D columns A (B, P, D),
    both held constant, user b's term is sum_{p,i} G[b,p,i] <A[b,p], R_i> and its gradient
    G_b^T A_b is user b's gradient of R (:class:`fedrec.client.training.LinearizedLoss` adds
    it to the loss). Opacus clips it per user through samplers registered beside fedrec's DP
    lifecycle (``fedrec.client.samplers``).
    """

    def __init__(self, rows: int, dim: int) -> None:
        super().__init__()
        self.rows = rows
        self.weight = nn.Parameter(torch.zeros(rows, dim))

    def forward(self, a: torch.Tensor, score_grads: torch.Tensor) -> torch.Tensor:
        """(B, ..., D) user columns, (B, ..., N >= rows) score gradients -> (B,) terms."""
        g = score_grads[..., : self.rows].reshape(-1, self.rows)
        return ((g @ self.weight).view(a.shape) * a).flatten(1).sum(1)

    def padded(self, n: int) -> torch.Tensor:
        """The rows of a catalogue of ``n`` items (n, D): zeros for items past the table."""
        w = self.weight[:n]
        return nn.functional.pad(w, [0, 0, 0, n - len(w)])


class CausalBlock(nn.Module):
    """Pre-norm causal self-attention and a GELU feed-forward, each with a residual."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ConfigError(
                [f"model.dim ({dim}) must be a multiple of model.attention-heads ({heads})."]
            )
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.mix = nn.Linear(dim, dim)
        self.ff_in = nn.Linear(dim, 4 * dim)
        self.ff_out = nn.Linear(4 * dim, dim)

    def forward(self, z: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """(B, T, D), (B, 1, T, T) bool (query t may read key s) -> (B, T, D)."""
        b, t, d = z.shape
        qkv = self.qkv(nn.functional.layer_norm(z, (d,)))  # (B, T, 3D)
        q, k, v = qkv.view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed)  # (B, H, T, d/H)
        z = z + self.mix(a.transpose(1, 2).reshape(b, t, d))
        out: torch.Tensor = z + self.ff_out(
            nn.functional.gelu(self.ff_in(nn.functional.layer_norm(z, (d,))))
        )
        return out


class SequenceTower(nn.Module):
    """Item embedding W_in and the order-aware residual W_s LN(z_t) of the module docstring."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        d = spec.dim
        self.length = spec.max_history
        self.embed = nn.Linear(spec.in_dim, d, bias=False)  # W_in
        self.position = nn.Linear(self.length, d, bias=False)  # P, read by a one-hot slot
        self.blocks = nn.ModuleList(
            CausalBlock(d, spec.attention_heads) for _ in range(spec.blocks)
        )
        self.out = nn.Linear(d, d, bias=False)  # W_s, zero at start

    def forward(self, e: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Embedded items e = W_in x (B, T, D), left-padded, most recent in the last slot, and
        mask (B, T) bool -> the residual at every position (B, T, D)."""
        b, t, _ = e.shape
        if t > self.length:
            raise ValueError(
                f"a window of {t} items is longer than model.max-history {self.length}"
            )
        slots = torch.eye(self.length, dtype=e.dtype, device=e.device)[self.length - t :]
        z = e + self.position(slots.expand(b, t, self.length))  # (B, T, D)
        causal = torch.ones(t, t, dtype=torch.bool, device=e.device).tril()
        # a padding slot reads only itself (an all-masked row would give NaN)
        allowed = causal & (mask.unsqueeze(1) | torch.eye(t, dtype=torch.bool, device=e.device))
        for block in self.blocks:
            z = block(z, allowed.unsqueeze(1))
        out: torch.Tensor = self.out(nn.functional.layer_norm(z, (z.shape[-1],)))  # (B, T, D)
        return out


class RecModel(nn.Module):
    """User-profile tower + dot-product scorer with an MLP residual."""

    def __init__(self, spec: ModelSpec = ModelSpec()) -> None:
        super().__init__()
        if not 0 < spec.dim <= spec.item_dim:
            raise ConfigError(
                [
                    f"model.dim must be in [1, item vector size {spec.item_dim}] (the item "
                    f"encoder's output size). Found {spec.dim}. Fix: --set model.dim="
                    f"{min(spec.item_dim, 64)} or an encoder with larger vectors."
                ]
            )
        if spec.tower not in TOWERS:
            raise ConfigError([f"model.tower must be one of {list(TOWERS)}. Found {spec.tower!r}."])
        self.spec = spec
        e, d = spec.in_dim, spec.dim
        w = 2 * e  # the summaries' width
        self.seq = SequenceTower(spec) if spec.tower == "attention" else None
        self.profile_lin = nn.Linear(w, d, bias=False)
        self.profile_mlp = (
            nn.Sequential(nn.Linear(w, spec.hidden), nn.GELU(), nn.Linear(spec.hidden, d))
            if spec.hidden > 0
            else None
        )
        self.profile_own = nn.Linear(w, d, bias=False) if spec.own_tower else None
        self.to_items = nn.Linear(d, e)  # W_o and the item prior b
        n = spec.item_table
        self.item_table = OutputTable(n, d) if n else None  # R
        self.history_table = HistoryBag(n, d) if n else None  # H
        self.recent_table = HistoryBag(n, d) if n else None  # H'
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        g = torch.Generator().manual_seed(self.spec.seed)
        e, d = self.spec.item_dim, self.spec.dim
        q, _ = torch.linalg.qr(torch.randn(e, d, generator=g))  # (E, D) orthonormal columns
        s = (e / d) ** 0.5
        if self.spec.item_prior:  # the prior column: read by nothing but beta = 1
            q = torch.cat([q, torch.zeros(1, d)])
        self.profile_lin.weight.copy_(torch.cat([0.5 * s * q.T, 0.5 * s * q.T], dim=1))
        if self.seq is not None:  # W_in starts as the same projection
            self.seq.embed.weight.copy_(s * q.T)
        self.to_items.weight.copy_(s * q / self.spec.head_scale)
        self.to_items.bias.zero_()
        if self.spec.item_prior:
            self.to_items.bias[-1] = 1.0
        if self.profile_own is not None:
            self.profile_own.weight.zero_()
        for table in (self.item_table, self.history_table, self.recent_table):
            if table is not None:
                table.weight.zero_()
        if self.seq is not None:
            self.seq.position.weight.normal_(0.0, 0.02, generator=g)
            for layer in [m for m in self.seq.modules() if isinstance(m, nn.Linear)]:
                if layer not in (self.seq.embed, self.seq.position):
                    bound = 1.0 / layer.in_features**0.5
                    layer.weight.uniform_(-bound, bound, generator=g)
                    if layer.bias is not None:
                        layer.bias.zero_()
            self.seq.out.weight.zero_()
        if self.profile_mlp is None:
            return
        layers = [m for m in self.profile_mlp if isinstance(m, nn.Linear)]
        for layer in layers:
            bound = 1.0 / layer.in_features**0.5
            layer.weight.uniform_(-bound, bound, generator=g)
            layer.bias.zero_()
        layers[-1].weight.zero_()

    def user_code(
        self,
        hist: torch.Tensor,
        mask: torch.Tensor,
        query: torch.Tensor | None = None,
        ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The user's D-dimensional profile p: (B, L, E), (B, L) [, (B, E)] -> (B, D).

        ``hist`` is left-padded, most recent last. A query enters the base summary only.
        ``ids`` (B, L): the history's item indices, which a model with item tables reads.
        """
        if ids is not None:
            ids = torch.where(mask, ids, -1)
        p = self.code(summarize_history(hist, mask, query), ids)
        if self.seq is not None:
            p = p + self.seq(self.seq.embed(hist), mask)[:, -1]
        return p

    def sequence_code(
        self,
        x: torch.Tensor,
        mask: torch.Tensor,
        slots: torch.Tensor | None = None,
        summaries: torch.Tensor | None = None,
        ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Profiles p_t after prefixes of left-padded windows (B, T, E), (B, T): at every
        position (B, T, D), or at ``slots`` (B, P) only (B, P, D). ``summaries`` (B, P, 2E)
        are the base's summaries of those prefixes over the whole history (its last
        max-history items, as served), and ``ids`` (B, P, L) those prefixes' item indices
        for item tables; without summaries, of the window alone."""
        if slots is None:
            slots = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
        if summaries is None:
            summaries = causal_summaries(x, mask, slots)
        p = self.code(summaries, ids)  # (B, P, D)
        if self.seq is not None:
            residual = self.seq(self.seq.embed(x), mask)  # (B, T, D)
            p = p + residual.gather(1, slots.unsqueeze(-1).expand(-1, -1, residual.shape[-1]))
        return p

    def code(self, x: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        """History summaries (..., 2E) [and, for item tables, the same histories' item
        indices (..., L)] -> profiles (..., D)."""
        p: torch.Tensor = self.profile_lin(x)
        if self.profile_own is not None:
            p = p + self.profile_own(x)
        if self.profile_mlp is not None:
            p = p + self.profile_mlp(x)
        if self.history_table is not None and self.recent_table is not None:
            if ids is None:
                raise ValueError("a model with item tables needs the histories' item indices")
            p = p + self.table_code(ids)
        return p

    def table_code(self, ids: torch.Tensor) -> torch.Tensor:
        """History windows' item indices (..., L), left-padded, most recent last (-1, or an
        index past the table's rows: no row) -> mean of their H rows + mean of the last
        RECENT ones' H' rows (..., D)."""
        assert self.history_table is not None and self.recent_table is not None
        out: torch.Tensor = self.history_table(ids) + self.recent_table(ids[..., -RECENT:])
        return out

    def profile(
        self,
        hist: torch.Tensor,
        mask: torch.Tensor,
        query: torch.Tensor | None = None,
        ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """User vector in item space: (B, L, E), (B, L) [, (B, E), (B, L)] -> (B, E [+ D])."""
        return self.to_user_vector(self.user_code(hist, mask, query, ids))

    @torch.no_grad()
    def item_codes(self, items: torch.Tensor) -> torch.Tensor:
        """Items in the profile space, for serving: (N, E) -> (N, D+1) = [W_o^T c, <b, c>].

        ``TAU * (codes[:, :D] @ p + codes[:, D])`` equals ``score_items(profile, items)`` and
        reads a matrix E/(D+1) times smaller per request.
        """
        w, b = self.to_items.weight, self.to_items.bias  # (E, D), (E,)
        proj = items @ w  # (N, D)
        if self.item_table is not None:
            proj = proj + self.item_table.padded(len(proj))
        return torch.cat([self.spec.head_scale * proj, (items @ b).unsqueeze(-1)], dim=1)

    def score_items(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Full ranking: (B, W) user vectors x (N, E) item vectors -> (B, N) scores."""
        return item_scores(users, self.score_matrix(items))

    @torch.no_grad()
    def score_matrix(self, items: torch.Tensor) -> torch.Tensor:
        """What user vectors are scored against: the items (N, E), followed with an output
        table by its rows (N, E + D; items past the table: zeros). A constant: training
        reads R's gradient through :meth:`table_term`."""
        if self.item_table is None:
            return items
        return torch.cat([items, self.item_table.padded(len(items))], dim=1)

    def table_term(self, users: torch.Tensor, score_grads: torch.Tensor) -> torch.Tensor:
        """The output table's per-user training term (B,) (:class:`OutputTable`) for user
        vectors (B, P, E + D) and the loss's gradient with respect to their scores."""
        assert self.item_table is not None
        out: torch.Tensor = self.item_table(users[..., self.spec.in_dim :].detach(), score_grads)
        return out

    def to_user_vector(self, p: torch.Tensor) -> torch.Tensor:
        """Profiles (..., D) -> user vectors u = tau * (W_o p + b) (..., E), followed with an
        output table by tau * s * p (..., D), the columns that read its rows."""
        x = self.spec.head_scale * p
        out: torch.Tensor = TAU * self.to_items(x)
        if self.item_table is not None:
            out = torch.cat([out, TAU * x], dim=-1)
        return out

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        slots: torch.Tensor | None = None,
        summaries: torch.Tensor | None = None,
        ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Training inputs -> user vectors in item space.

        Without ``mask`` (mean tower): history summaries (..., 2E) -> (..., E), one per prefix.
        ``ids`` (..., L): each prefix's last max-history item indices, for item tables.
        With it: a left-padded window of item vectors (B, T, E) and its mask (B, T) -> the user
        vector after each prefix, (B, T, E), or only after the slots ``slots`` (B, P) ->
        (B, P, E), with their ``summaries`` if given (:meth:`sequence_code`).

        A candidate's score is its dot product with the user vector. Scores are computed
        outside the model against the constant, public item matrix, so each user's loss
        depends on that user's data and public items only.
        """
        if mask is None:
            return self.to_user_vector(self.code(x, ids))
        return self.to_user_vector(self.sequence_code(x, mask, slots, summaries, ids))


SHARED_HEAD = "shared"  # the head's key when every platform shares one (model.heads = "shared")


class CrossPlatformModel(nn.Module):
    """The federated model: one user tower shared by every platform, and a head per platform.

    A head is ``to_items`` (W_o and the text-carried item prior b): how a profile reads in one
    catalogue's region of the item space; with ``spec.own_tower`` it also holds
    ``profile_own``, the platform's own tower, whose output adds to the shared tower's
    (a shared-plus-specific split in the spirit of STAR, Sheng et al. 2021). It starts at zero,
    so the model starts as the shared tower alone. Each platform trains the tower and its own
    head; the server averages the tower over all platforms and each head over its own platform
    only, so a small platform's head is not diluted by the others' updates: per-platform
    parts guard against negative transfer, where a platform does worse federated than alone.
    ``model.heads = "shared"`` gives the fully shared model (one head) for comparison.

    Parameter names: ``profile_lin.*`` (``profile_mlp.*``, ``seq.*``: shared like the rest
    of the tower) and ``heads.<channel>.*``.
    """

    def __init__(
        self, spec: ModelSpec, channels: tuple[str, ...], per_channel: bool = True
    ) -> None:
        super().__init__()
        base = RecModel(spec)
        self.spec, self.per_channel = spec, per_channel
        self.profile_lin, self.profile_mlp = base.profile_lin, base.profile_mlp
        self.seq = base.seq
        keys = channels if per_channel else (SHARED_HEAD,)
        head = nn.ModuleDict({"to_items": base.to_items})
        if base.profile_own is not None:
            head["profile_own"] = base.profile_own
        self.heads = nn.ModuleDict({k: copy.deepcopy(head) for k in keys})

    def channel_model(self, channel: str) -> RecModel:
        """``channel``'s model: the shared tower and its head, parameters shared with ``self``
        (training it trains them)."""
        key = channel if self.per_channel else SHARED_HEAD
        if key not in self.heads:
            raise ValueError(
                f"the model has no head for channel {channel!r}; it has {sorted(self.heads)}"
            )
        m = RecModel(self.spec)
        m.profile_lin, m.profile_mlp, m.seq = self.profile_lin, self.profile_mlp, self.seq
        m.to_items = _head_layer(self.heads, key, "to_items")
        m.profile_own = _head_layer(self.heads, key, "profile_own") if self.spec.own_tower else None
        return m

    @torch.no_grad()
    def head_mean(self) -> dict[str, torch.Tensor]:
        """Every platform's head averaged, under :class:`RecModel`'s parameter names
        (``to_items.weight``, ``to_items.bias``, ``profile_own.weight``): the centre that
        MR-MTL pulls each platform's head toward. Empty with one head."""
        if len(self.heads) < 2:
            return {}
        states = [head.state_dict() for head in self.heads.values()]
        return {k: torch.stack([st[k] for st in states]).mean(0) for k in states[0]}


@torch.no_grad()
def mix_shared(model: nn.Module, own: dict[str, np.ndarray], weight: float) -> None:
    """In place: every parameter outside the per-platform heads becomes
    ``(1 - weight) * itself + weight * own[name]`` (a node's personalisation)."""
    for name, p in model.named_parameters():
        if head_owner(name) is None and name in own:
            p.mul_(1.0 - weight).add_(torch.from_numpy(own[name]).to(p.dtype), alpha=weight)


def shared_weights(model: nn.Module) -> dict[str, np.ndarray]:
    """The parameters outside the per-platform heads, as arrays."""
    return {
        k: v.detach().numpy().copy() for k, v in model.state_dict().items() if head_owner(k) is None
    }


def _head_layer(heads: nn.ModuleDict, key: str, name: str) -> nn.Linear:
    """``heads[key][name]``: every head is a ModuleDict of ``nn.Linear`` layers."""
    head = heads[key]
    layer = head[name] if isinstance(head, nn.ModuleDict) else None
    if not isinstance(layer, nn.Linear):
        raise TypeError(f"heads.{key}.{name} is a {type(layer).__name__}, not an nn.Linear")
    return layer


def head_owner(name: str) -> str | None:
    """The channel whose head a parameter belongs to (``heads.<channel>.*``); None if shared."""
    parts = name.split(".")
    return parts[1] if parts[0] == "heads" and parts[1] != SHARED_HEAD else None


def model_spec(cfg: FedrecConfig, item_dim: int, n_items: int = 0) -> ModelSpec:
    """The architecture the run config names (own towers for ``model.heads = channel-tower``;
    with ``model.item-table``, item tables of ``n_items`` rows)."""
    if cfg.model.item_table and n_items <= 0:
        raise ValueError("model.item-table needs the catalogue's number of items")
    return ModelSpec(
        item_dim=item_dim,
        dim=cfg.model.dim,
        hidden=cfg.model.hidden,
        seed=cfg.seed,
        own_tower=cfg.model.heads == "channel-tower",
        item_prior=cfg.model.item_prior != "none",
        head_scale=cfg.model.head_scale,
        tower=cfg.model.tower,
        blocks=cfg.model.blocks,
        attention_heads=cfg.model.attention_heads,
        max_history=cfg.model.max_history,
        item_table=n_items if cfg.model.item_table else 0,
    )


def build_model(cfg: FedrecConfig, item_dim: int) -> CrossPlatformModel:
    """The run's model: every party builds it from the same config, so shapes match."""
    if cfg.model.item_table:
        raise ConfigError([FEDERATED_ITEM_TABLE])
    return CrossPlatformModel(
        model_spec(cfg, item_dim), cfg.channels, per_channel=cfg.model.heads != "shared"
    )


def build_channel_model(cfg: FedrecConfig, item_dim: int, n_items: int = 0) -> RecModel:
    """One platform's model on its own (local-only and pooled baselines): the same
    architecture as one platform's view of :func:`build_model`, own tower included, and
    with ``model.item-table`` item tables over its ``n_items`` items."""
    return RecModel(model_spec(cfg, item_dim, n_items))


def param_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape: exactly what a train reply may carry."""
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}
