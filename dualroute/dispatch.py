"""Sort-based dropless dispatch: order the N = T*K routed rows by expert, and back.

Shapes: T tokens, K experts per token, N = T*K routed rows, D model dim, E experts.

``plan_dispatch`` sorts the flat ``(token, slot)`` rows by expert once. ``dispatch`` gathers
token rows into that order; ``combine`` sums each token's K expert outputs with their routing
weights. Every step in either direction is a gather: the weighted sum reads the K rows of a
token through the inverse permutation (one ``embedding_bag``), and its backward reads
``grad_out`` by token; no scatter-add is needed.

With a capacity, each expert (and/or each group of experts) keeps at most C rows, highest
routing weight first, and among equal weights the earlier token, then the token's earlier slot
(the later token drops first); the dropped rows are sorted to the end, are never computed, and
contribute zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class DispatchPlan:
    order_N: torch.Tensor  # sorted position -> flat row (token * K + slot); dropped rows last
    inverse_N: torch.Tensor  # flat row -> sorted position
    token_N: torch.Tensor  # sorted position -> token
    counts_E: torch.Tensor  # kept rows per expert (int64)
    dropped_E: torch.Tensor  # dropped rows per expert (int64)
    num_tokens: int
    top_k: int

    @property
    def num_rows(self) -> int:
        return self.order_N.shape[0]


def expert_capacity(num_tokens: int, top_k: int, num_units: int, capacity_factor: float) -> int:
    """Rows an expert (or a group: pass G) may take: ``ceil(capacity_factor * T * K / units)``."""
    return math.ceil(capacity_factor * num_tokens * top_k / num_units)


def plan_dispatch(
    expert_ids_TK: torch.Tensor,
    weights_TK: torch.Tensor,
    num_experts: int,
    capacity: int | None = None,
    group_capacity: int | None = None,
    num_groups: int = 1,
) -> DispatchPlan:
    """Sort rows by expert. ``capacity`` caps rows per expert, ``group_capacity`` rows per group
    (expert ``e`` is in group ``e // (E / G)``); overflow rows with the lowest weight are dropped, and among
    equal weights the later flat row (later token, then later slot) drops first."""
    T, K = expert_ids_TK.shape
    ids_N = expert_ids_TK.reshape(-1)
    device = ids_N.device
    total_E = _bincount(ids_N, num_experts)
    if capacity is None and group_capacity is None:
        order_N = torch.argsort(ids_N, stable=True)
        counts_E = total_E
    else:
        keep_N = _keep_within_capacity(ids_N, weights_TK.reshape(-1).detach(), num_experts, capacity,
                                       group_capacity, num_groups)
        key_N = torch.where(keep_N, ids_N, num_experts)  # dropped rows: a virtual expert E, sorted last
        order_N = torch.argsort(key_N, stable=True)
        counts_E = _bincount(key_N, num_experts + 1)[:num_experts]
    inverse_N = torch.empty_like(order_N)
    inverse_N[order_N] = torch.arange(order_N.shape[0], device=device)
    return DispatchPlan(
        order_N=order_N,
        inverse_N=inverse_N,
        token_N=torch.div(order_N, K, rounding_mode="floor"),
        counts_E=counts_E,
        dropped_E=total_E - counts_E,
        num_tokens=T,
        top_k=K,
    )


def _bincount(ids_N: torch.Tensor, num_experts: int) -> torch.Tensor:
    # scatter_add keeps a static output shape (bincount's depends on the data), for torch.compile.
    counts_E = torch.zeros(num_experts, dtype=torch.int64, device=ids_N.device)
    return counts_E.scatter_add_(0, ids_N, torch.ones_like(ids_N))


def _keep_within_capacity(ids_N, weights_N, num_experts, capacity, group_capacity, num_groups):
    keep_N = torch.ones_like(ids_N, dtype=torch.bool)
    if group_capacity is not None:  # level 1 first: a row dropped by its group uses no expert slot
        groups_N = torch.div(ids_N, num_experts // num_groups, rounding_mode="floor")
        keep_N &= _rank_within(groups_N, weights_N, num_groups) < group_capacity
    if capacity is not None:
        units_N = torch.where(keep_N, ids_N, num_experts)
        keep_N &= _rank_within(units_N, weights_N, num_experts + 1) < capacity
    return keep_N


def _rank_within(units_N: torch.Tensor, weights_N: torch.Tensor, num_units: int) -> torch.Tensor:
    """Each row's place among its unit's rows, heaviest first (0 = heaviest), equal weights in flat row order."""
    by_weight_N = torch.argsort(weights_N, descending=True, stable=True)  # stable on every device
    order_N = by_weight_N[torch.argsort(units_N[by_weight_N], stable=True)]  # two stable sorts = lexsort
    counts_U = _bincount(units_N, num_units)
    start_U = torch.cumsum(counts_U, 0) - counts_U
    rank_N = torch.empty_like(order_N)
    rank_N[order_N] = torch.arange(order_N.shape[0], device=order_N.device) - start_U[units_N[order_N]]
    return rank_N


class _GatherTokens(torch.autograd.Function):
    """x_TD -> x_ND (each token K times, in sorted order). Backward: sum each token's K rows."""

    @staticmethod
    def forward(ctx, x_TD, token_N, inverse_TK):
        ctx.save_for_backward(inverse_TK)
        return x_TD.index_select(0, token_N)

    @staticmethod
    def backward(ctx, grad_ND):
        (inverse_TK,) = ctx.saved_tensors
        # embedding_bag sums the K rows of each token in one pass (no (T, K, D) temporary).
        return F.embedding_bag(inverse_TK, grad_ND.contiguous(), mode="sum"), None, None


class _Combine(torch.autograd.Function):
    """``out[t] = sum_k w[t, k] * y[inverse[t, k]]`` as one weighted embedding-bag sum.

    Backward, in sorted-row order: ``grad_y[n] = w[n] * grad_out[token(n)]`` and
    ``grad_w[n] = <grad_out[token(n)], y[n]>`` (then back to ``(t, k)`` order).
    """

    @staticmethod
    def forward(ctx, y_ND, w_TK, inverse_TK, token_N, order_N):
        ctx.save_for_backward(y_ND, w_TK, inverse_TK, token_N, order_N)
        return F.embedding_bag(inverse_TK, y_ND, per_sample_weights=w_TK, mode="sum")

    @staticmethod
    def backward(ctx, grad_TD):
        y_ND, w_TK, inverse_TK, token_N, order_N = ctx.saved_tensors
        need_y, need_w = ctx.needs_input_grad[:2]
        g_ND = grad_TD.index_select(0, token_N)
        grad_y = grad_w = None
        if need_y:
            grad_y = g_ND * w_TK.reshape(-1).index_select(0, order_N).unsqueeze(1)
        if need_w:
            grad_w_N = torch.linalg.vecdot(g_ND, y_ND)
            grad_w = grad_w_N.index_select(0, inverse_TK.reshape(-1)).view(w_TK.shape)
        return grad_y, grad_w, None, None, None


def dispatch(x_TD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """Token rows in expert order, ``(N, D)``. Dropped rows are included (at the end)."""
    if not (torch.is_grad_enabled() and x_TD.requires_grad):  # inference: skip the autograd.Function machinery
        return x_TD.index_select(0, plan.token_N)
    return _GatherTokens.apply(x_TD, plan.token_N, plan.inverse_N.view(plan.num_tokens, plan.top_k))


def combine(y_ND: torch.Tensor, weights_TK: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """``out[t] = sum_k weights[t, k] * y[row of (t, k)]``; rows past ``y_ND`` (dropped) count as 0."""
    N = plan.num_rows
    if y_ND.shape[0] < N:  # dropped rows were not computed
        y_ND = torch.cat([y_ND, y_ND.new_zeros(N - y_ND.shape[0], y_ND.shape[1])])
    inverse_TK = plan.inverse_N.view(plan.num_tokens, plan.top_k)
    w_TK = weights_TK.to(y_ND.dtype)
    if not (torch.is_grad_enabled() and (y_ND.requires_grad or w_TK.requires_grad)):
        return F.embedding_bag(inverse_TK, y_ND, per_sample_weights=w_TK, mode="sum")
    return _Combine.apply(y_ND, w_TK, inverse_TK, plan.token_N, plan.order_N)
