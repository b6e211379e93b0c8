"""Opacus's per-user gradients and gradient norms for fedrec's own layers.

Owns: the samplers of :class:`fedrec.shared.model.HistoryBag` (a per-item table read as
bags of history items) and :class:`fedrec.shared.model.OutputTable` (per-item output rows,
read through a per-user term), registered with Opacus when this module is imported
(``DPSession`` imports it before it wraps a model). Ghost clipping reads only each user's
gradient norm, and for both tables it is exact without the per-user (rows x D) gradients.

Maths: a user's bags b = 1..M (one per predicted position) read item i with weight
w_{b,i} (1 / the bag's size, summed over repeats), and the loss's gradient with respect to
bag b's output is g_b (D,). The user's gradient of row i is sum_b w_{b,i} g_b, so with W the
user's (items read x bags) weights and G its (bags x D) output gradients, the gradient is
W G and its squared norm is the sum of (W^T W) * (G G^T), two (M x M) matrices: no per-user
(rows x D) gradient is built. W is dense over the items the user read, found by one sort of
each user's indices.

An output table's term for user u is s_u * sum_{p,i} G[u,p,i] <A[u,p], R_i> (s_u: the loss's
gradient with respect to the term), so user u's gradient is s_u G_u^T A_u (rows x D) and its
squared norm s_u^2 times the sum of (G_u G_u^T) * (A_u A_u^T), two (P x P) matrices.

Must not: import ``fedrec.server``.
"""

from __future__ import annotations

import torch
from opacus.grad_sample.utils import register_grad_sampler, register_norm_sampler
from torch import nn

from fedrec.shared.model import HistoryBag, OutputTable


def user_bags(
    layer: HistoryBag, ids: torch.Tensor, backprops: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each user's distinct items, the weights its bags read them with, and the bags' output
    gradients.

    Args:
        ids: (B, ..., L) the bags' item indices, as the layer was called (M bags per user).
        backprops: (B, ..., D) the loss's gradient with respect to the bags' outputs.
    Returns:
        items (B, T): the items each user read, ``rows`` where a slot holds none;
        W (B, T, M): W[u, t, b] is the weight of items[u, t] in user u's bag b;
        G (B, M, D): the bags' output gradients.
    """
    b, length = ids.shape[0], ids.shape[-1]
    item, weight = layer.entries(ids)
    item, order = item.reshape(b, -1).sort(dim=1)  # "none" (= rows) sorts last
    bags = item.shape[1] // length
    new = torch.ones_like(item, dtype=torch.bool)
    new[:, 1:] = item[:, 1:] != item[:, :-1]
    slot = new.cumsum(1) - 1  # each entry's distinct-item slot
    t = int(slot.max()) + 1 if slot.numel() else 0
    mix = weight.new_zeros(b, t, bags)
    user = torch.arange(b, device=ids.device).unsqueeze(1)
    at = (user * t + slot) * bags + order // length  # (user, slot, bag) of each entry
    mix.view(-1).index_add_(0, at.reshape(-1), weight.reshape(b, -1).gather(1, order).reshape(-1))
    items = torch.full((b, t), layer.rows, dtype=item.dtype, device=ids.device)
    g = backprops.reshape(b, bags, -1).to(mix.dtype)
    return items.scatter_(1, slot, item), mix, g


@register_norm_sampler(HistoryBag)
def bag_norms(
    layer: HistoryBag, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Each user's gradient norm of the table (B,), without the per-user gradients."""
    _, mix, g = user_bags(layer, activations[0], backprops)
    squares = (mix.transpose(1, 2) @ mix * (g @ g.transpose(1, 2))).sum((1, 2))
    return {layer.weight: squares.clamp(min=0).sqrt()}


@register_grad_sampler(HistoryBag)
def bag_grads(
    layer: HistoryBag, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Each user's gradient of the table (B, rows + 1, D)."""
    items, mix, g = user_bags(layer, activations[0], backprops)
    rows = mix @ g  # (B, T, D): the gradient of each distinct item's row
    out = rows.new_zeros(len(rows), layer.rows + 1, rows.shape[2])
    return {layer.weight: out.scatter_add_(1, items.unsqueeze(-1).expand_as(rows), rows)}


@register_norm_sampler(OutputTable)
def output_norms(
    layer: OutputTable, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Each user's gradient norm of the output table (B,)."""
    a, g = _output_inputs(layer, activations)
    squares = ((g @ g.transpose(1, 2)) * (a @ a.transpose(1, 2))).sum((1, 2))
    return {layer.weight: backprops.abs() * squares.clamp(min=0).sqrt()}


@register_grad_sampler(OutputTable)
def output_grads(
    layer: OutputTable, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Each user's gradient of the output table (B, rows, D)."""
    a, g = _output_inputs(layer, activations)
    return {layer.weight: backprops.view(-1, 1, 1) * (g.transpose(1, 2) @ a)}


def _output_inputs(
    layer: OutputTable, activations: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The term's inputs per user: A (B, P, D) and G (B, P, rows)."""
    a, g = activations
    b = a.shape[0]
    return a.reshape(b, -1, a.shape[-1]), g[..., : layer.rows].reshape(b, -1, layer.rows)
