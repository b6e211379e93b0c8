"""The shared model: a user-profile tower and a scorer over constant item vectors.

Owns: the one architecture that every channel trains and the server aggregates. Item vectors
come from the central text encoder and are inputs, never parameters: there is no per-user or
per-item embedding table, so nothing in the weights is indexed by a user or an item.

Design (DP utility decides it, see research/privacy.md §1):
  * profile  p = W_h x + MLP(x),  x = [mean(h), recent(h)]        (B, D)
  * query    u = tau * (W_o p + b)                                (B, E)  back in item space
  * score    s(c) = <u, c>  = tau * <W_o^T c, p> + tau * <b, c>    for each item vector c
This is a dot-product scorer with a trainable projection of item vectors (``W_o^T c``), an
item prior carried by text (``<b, c>``) and an MLP residual. The projection is applied on the
user side, so every parameterised layer sees (B, ...) inputs: per-user gradients are cheap,
and full ranking is one matrix product with the constant item matrix.
``W_h`` and ``W_o`` start from the same random orthonormal projection, so the untrained model
already ranks by text similarity to the history; DP-SGD only has to learn corrections
(recency, interest transitions, popularity carried by text). The MLP's last layer and ``b``
start at zero. Every layer is ``nn.Linear`` (no raw parameters, no weight tying): all Opacus
grad-sample modes, ghost clipping included, support it.

Must not: import ``server/`` or ``client/``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from shared.config import FedrecConfig

RECENT = 3  # the "recent" summary averages the last RECENT history items
TAU = 20.0  # fixed logit scale for the dot product (cosine-like inputs)


@dataclass(frozen=True)
class ModelSpec:
    item_dim: int = 384
    dim: int = 64
    hidden: int = 0
    seed: int = 0


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


class RecModel(nn.Module):
    """User-profile tower + dot-product scorer with an MLP residual."""

    def __init__(self, spec: ModelSpec = ModelSpec()) -> None:
        super().__init__()
        if not 0 < spec.dim <= spec.item_dim:
            raise ValueError(
                f"model.dim must be in [1, item vector size {spec.item_dim}]. Found {spec.dim}."
            )
        self.spec = spec
        e, d = spec.item_dim, spec.dim
        self.profile_lin = nn.Linear(2 * e, d, bias=False)
        self.profile_mlp = (
            nn.Sequential(nn.Linear(2 * e, spec.hidden), nn.GELU(), nn.Linear(spec.hidden, d))
            if spec.hidden > 0
            else None
        )
        self.to_items = nn.Linear(d, e)  # W_o and the item prior b
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        g = torch.Generator().manual_seed(self.spec.seed)
        e, d = self.spec.item_dim, self.spec.dim
        q, _ = torch.linalg.qr(torch.randn(e, d, generator=g))  # (E, D) orthonormal columns
        s = (e / d) ** 0.5
        self.profile_lin.weight.copy_(torch.cat([0.5 * s * q.T, 0.5 * s * q.T], dim=1))
        self.to_items.weight.copy_(s * q)
        self.to_items.bias.zero_()
        if self.profile_mlp is None:
            return
        for layer in (self.profile_mlp[0], self.profile_mlp[2]):
            bound = 1.0 / layer.in_features**0.5
            layer.weight.uniform_(-bound, bound, generator=g)
            layer.bias.zero_()
        self.profile_mlp[2].weight.zero_()

    def user_code(
        self, hist: torch.Tensor, mask: torch.Tensor, query: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The user's D-dimensional profile p: (B, L, E), (B, L) [, (B, E)] -> (B, D)."""
        x = summarize_history(hist, mask, query)  # (B, 2E)
        p = self.profile_lin(x)  # (B, D)
        if self.profile_mlp is not None:
            p = p + self.profile_mlp(x)
        return p

    def profile(
        self, hist: torch.Tensor, mask: torch.Tensor, query: torch.Tensor | None = None
    ) -> torch.Tensor:
        """User vector in item space: (B, L, E), (B, L) [, (B, E)] -> (B, E)."""
        return TAU * self.to_items(self.user_code(hist, mask, query))  # (B, E)

    @torch.no_grad()
    def item_codes(self, items: torch.Tensor) -> torch.Tensor:
        """Items in the profile space, for serving: (N, E) -> (N, D+1) = [W_o^T c, <b, c>].

        ``TAU * (codes[:, :D] @ p + codes[:, D])`` equals ``score_items(profile, items)`` and
        reads a matrix E/(D+1) times smaller per request.
        """
        w, b = self.to_items.weight, self.to_items.bias  # (E, D), (E,)
        return torch.cat([items @ w, (items @ b).unsqueeze(-1)], dim=1)

    @staticmethod
    def score_items(profile: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Full ranking: (B, E) user vectors x (N, E) item vectors -> (B, N) scores."""
        return profile @ items.T

    def forward(self, hist: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The user vector (B, E); a candidate's score is its dot product with it.

        Scores are computed outside the model against the constant, public item matrix, so
        each user's loss depends on that user's data and public items only.
        """
        return self.profile(hist, mask)


def build_model(cfg: FedrecConfig, item_dim: int) -> RecModel:
    """The run's model: every party builds it from the same config, so shapes match."""
    return RecModel(
        ModelSpec(item_dim=item_dim, dim=cfg.model.dim, hidden=cfg.model.hidden, seed=cfg.seed)
    )


def param_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape: exactly what a train reply may carry."""
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}
