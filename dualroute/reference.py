"""Plain reference for the MoE layer: per-token loops and dense masks, written to be read.

Slow on purpose. Tests compare the fast path (``MoELayer.forward``) with ``reference_forward``
on outputs and on every gradient; it uses the layer's own parameters, so gradients are
comparable parameter by parameter. Capacity factors are modelled (the layer's training or eval
ones, by its mode); training-time noise (jitter, noisy gating) and expert-choice routing are not.

Ties follow the fast path's documented rules, here with Python's stable ``sorted``: among equal
scores the lowest group and expert index win; among equal weights competing for a capacity the
earlier token, then the earlier slot of a token, is kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .layer import MoELayer
from .routing import routing_dtype


def reference_routing(layer: MoELayer, x_TD: torch.Tensor, capacity: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the dense combine matrix ``c_TE`` (weight of expert e for token t, 0 if unused or dropped)
    and the expert logits. ``capacity=False``: no row is dropped, whatever the layer's capacity factors."""
    router = layer.router
    cfg, opt = router.cfg, router.opt
    G, M, J, K = cfg.num_groups, cfg.experts_per_group, cfg.groups_per_token, cfg.experts_per_token
    x32 = x_TD.to(routing_dtype(x_TD.dtype))
    logits_TE = x32 @ router.gate.weight.to(x32.dtype).T
    if router.gate.bias is not None:
        logits_TE = logits_TE + router.gate.bias.to(x32.dtype)
    picks: list[Pick] = []
    for t in range(x_TD.shape[0]):
        logits = logits_TE[t]
        # p_e: the weight expert e would get; `choice`: what ranks experts (p + selection bias).
        if opt.group_router == "learned":
            p_group = _learned_group_probs(router, x32[t])
            p = torch.cat([p_group[g] * _score(logits[g * M:(g + 1) * M], opt.score_func) for g in range(G)])
        else:
            p = _score(logits, opt.score_func)
        choice = p.detach().clone()
        if router.expert_bias_E is not None:
            choice = choice + router.expert_bias_E
        if opt.group_router == "learned":
            group_rank = p_group.detach().clone()
        else:  # the group's score is derived from its experts' selection scores
            group_rank = torch.stack([_group_score(choice[g * M:(g + 1) * M], opt.group_score) for g in range(G)])
        if router.group_bias_G is not None:
            group_rank = group_rank + router.group_bias_G
        kept_groups = sorted(range(G), key=lambda g: -float(group_rank[g]))[:J]
        candidates = [e for e in range(cfg.num_experts) if e // M in kept_groups]
        chosen = sorted(candidates, key=lambda e: -float(choice[e]))[:K]
        w = torch.stack([p[e] for e in chosen])
        if opt.renormalize:
            w = w / (w.sum() + 1e-20)
        w = w * opt.scaling_factor
        picks += [Pick(t, slot, e, w[slot]) for slot, e in enumerate(chosen)]
    c_TE = logits_TE.new_zeros(x_TD.shape[0], cfg.num_experts)
    kept = within_capacity(layer, picks, x_TD.shape[0]) if capacity else picks
    if kept:
        at = (torch.tensor([pick.token for pick in kept]), torch.tensor([pick.expert for pick in kept]))
        c_TE = c_TE.index_put(tuple(i.to(c_TE.device) for i in at), torch.stack([pick.weight for pick in kept]))
    return c_TE, logits_TE


@dataclass(frozen=True)
class Pick:
    """One routed row: token ``token`` sends its ``slot``-th choice, ``expert``, with ``weight``."""

    token: int
    slot: int
    expert: int
    weight: torch.Tensor


def within_capacity(layer: MoELayer, picks: list[Pick], num_tokens: int) -> list[Pick]:
    """The rows that fit the layer's capacities: each group (level 1, first), then each expert, keeps its
    ``ceil(factor * T * K / units)`` heaviest rows; among equal weights the earlier token, then the earlier slot."""
    cfg = layer.cfg
    if layer.training:
        factors = (cfg.group_capacity_factor, cfg.capacity_factor)
    else:
        factors = (cfg.eval_group_capacity_factor, cfg.eval_capacity_factor)
    M = cfg.num_experts // cfg.num_groups
    levels = [(cfg.num_groups, lambda pick: pick.expert // M), (cfg.num_experts, lambda pick: pick.expert)]
    for factor, (num_units, unit_of) in zip(factors, levels):
        if factor is None:
            continue
        capacity = math.ceil(factor * num_tokens * cfg.experts_per_token / num_units)
        heaviest_first = sorted(picks, key=lambda pick: (-float(pick.weight.detach()), pick.token, pick.slot))
        taken = {unit: 0 for unit in range(num_units)}
        kept = []
        for pick in heaviest_first:
            if taken[unit_of(pick)] < capacity:
                taken[unit_of(pick)] += 1
                kept.append(pick)
        picks = kept
    return picks


def reference_forward(layer: MoELayer, x: torch.Tensor) -> torch.Tensor:
    """``y = sum_e c[t, e] * f_e(x_t)`` with every expert run on every token (dense masks)."""
    x_TD = x.reshape(-1, layer.cfg.dim)
    c_TE, _ = reference_routing(layer, x_TD)
    out_dim = layer.experts.cfg.output_dim
    y_TD = x_TD.new_zeros(x_TD.shape[0], out_dim)
    for e in range(layer.cfg.num_experts):
        y_TD = y_TD + c_TE[:, e : e + 1].to(x.dtype) * layer.experts.forward_one(e, x_TD)
    if layer.shared is not None:
        y_TD = y_TD + layer.shared(x_TD)
    return y_TD.reshape(*x.shape[:-1], out_dim)


def _learned_group_probs(router, x_D: torch.Tensor) -> torch.Tensor:
    if router.group_gate is None:
        return torch.ones(1, dtype=x_D.dtype)
    gl = x_D @ router.group_gate.weight.to(x_D.dtype).T
    if router.group_gate.bias is not None:
        gl = gl + router.group_gate.bias.to(x_D.dtype)
    return torch.softmax(gl, dim=0)


def _score(logits: torch.Tensor, score_func: str) -> torch.Tensor:
    return torch.softmax(logits, dim=0) if score_func == "softmax" else torch.sigmoid(logits)


def _group_score(scores_M: torch.Tensor, how: str) -> torch.Tensor:
    if how == "top2_sum" and scores_M.numel() >= 2:
        return scores_M.topk(2).values.sum()
    if how == "sum":
        return scores_M.sum()
    return scores_M.max()


def reference_conv_forward(layer, x_BCHW: torch.Tensor) -> torch.Tensor:
    """A ``ConvMoELayer``'s output by a plain loop: each image through each of its selected experts, weighted by
    ``reference_routing`` of its average-pooled features (capacities included)."""
    c_BE, _ = reference_routing(layer, x_BCHW.mean(dim=(2, 3)))
    images = []
    for b in range(x_BCHW.shape[0]):
        y_CHW = x_BCHW.new_zeros(x_BCHW.shape[1:])
        for e in range(layer.cfg.num_experts):
            if c_BE[b, e] != 0:
                y_CHW = y_CHW + c_BE[b, e].to(x_BCHW.dtype) * layer.experts.forward_one(e, x_BCHW[b : b + 1])[0]
        images.append(y_CHW)
    return torch.stack(images)
