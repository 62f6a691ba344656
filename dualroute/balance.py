"""Load balancing at both routing levels: weighted aux losses, and aux-loss-free bias updates.

Shapes: T tokens, E experts, G groups, K experts and J groups chosen per token.

Two families, usable together:

* Auxiliary losses (``BalanceConfig`` weights), computed by the layer and returned in its aux
  result: Switch/GShard ``E * sum_i f_i P_i`` and ST-MoE z-loss at the expert level and the
  group level, plus Shazeer 2017's importance and load CV^2 at the expert level.
* Auxiliary-loss-free balancing (DeepSeek-V3, Wang et al. 2024 "Auxiliary-Loss-Free Load
  Balancing"): selection-only biases ``expert_bias_E`` / ``group_bias_G`` (``RouterOptions(
  correction_bias=True)``), moved after each optimizer step by ``bias += rate * sign(mean_load -
  load)``. It is an explicit call (``update_correction_biases``), never a side effect of forward.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable

import torch
from torch import nn

from . import losses
from .config_types import check_field_types
from .routing import Router, Routing


@dataclass(frozen=True)
class BalanceConfig:
    """Weights of the auxiliary losses (0 = not computed)."""

    switch: float = 0.0  # expert-level Switch/GShard loss
    group_switch: float = 0.0  # group-level Switch loss (f over chosen groups, P = p(g))
    z: float = 0.0  # expert router z-loss
    group_z: float = 0.0  # group router z-loss (learned group router only)
    importance: float = 0.0  # Shazeer 2017 CV^2 of summed router probabilities
    load: float = 0.0  # CV^2 of the summed kept gate values (see losses.load_loss)

    def __post_init__(self) -> None:
        check_field_types(self)
        for f in fields(self):
            losses.check_loss_weight(f.name, getattr(self, f.name))

    def active(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) > 0}


def aux_losses(routing: Routing, cfg: BalanceConfig, mask_T: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The unweighted losses whose weight in ``cfg`` is non-zero."""
    E, G = routing.scores_TE.shape[-1], routing.group_scores_TG.shape[-1]
    compute = {
        "switch": lambda: losses.switch_balance_loss(routing.probs_TE, routing.expert_ids_TK, E, mask_T),
        "group_switch": lambda: losses.switch_balance_loss(routing.group_probs_TG, routing.group_ids_TJ, G, mask_T),
        "z": lambda: losses.router_z_loss(routing.expert_logits_TE, mask_T),
        "group_z": lambda: _group_z(routing, mask_T),
        "importance": lambda: losses.importance_loss(routing.probs_TE, mask_T),
        "load": lambda: losses.load_loss(routing.weights_TK, routing.expert_ids_TK, E, mask_T),
    }
    return {name: compute[name]() for name in cfg.active()}


def global_aux_losses(routing: Routing, cfg: BalanceConfig, mask_T: torch.Tensor | None,
                      sum_over_ranks: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, torch.Tensor]:
    """:func:`aux_losses` of the batch of every rank together (data / expert parallelism).

    Every loss is a function of per-unit sums over tokens (Switch: assignment counts, summed
    probabilities, token and assignment counts; z: summed squared logsumexp and token count;
    importance / load: summed probabilities / gate values). This rank's sums go into one flat float64
    vector; ``sum_over_ranks`` must return that vector summed over the ranks, differentiably (an
    all-reduce whose backward sums the gradients: every rank adds the same loss). The losses are then
    those of one process on the concatenated batch, value and gradient. ``sum_over_ranks = lambda v: v``
    gives :func:`aux_losses`.
    """
    E, G = routing.scores_TE.shape[-1], routing.group_scores_TG.shape[-1]
    stats = {
        "switch": lambda: losses.switch_stats(routing.probs_TE, routing.expert_ids_TK, E, mask_T),
        "group_switch": lambda: losses.switch_stats(routing.group_probs_TG, routing.group_ids_TJ, G, mask_T),
        "z": lambda: losses.z_loss_sums(routing.expert_logits_TE, mask_T),
        "group_z": lambda: _group_z_sums(routing, mask_T),
        "importance": lambda: (losses.importance_sum(routing.probs_TE, mask_T),),
        "load": lambda: (losses.load_sum(routing.weights_TK, routing.expert_ids_TK, E, mask_T),),
    }
    local = {name: stats[name]() for name in cfg.active()}
    if not local:
        return {}
    parts = [t for values in local.values() for t in values]
    total = sum_over_ranks(torch.cat([t.double().reshape(-1) for t in parts]))
    summed, offset = [], 0
    for t in parts:  # back to each sum's shape and dtype (integer counts are exact in float64)
        piece = total[offset : offset + t.numel()].view(t.shape)
        summed.append(piece.to(t.dtype) if t.is_floating_point() else piece.detach().round().to(t.dtype))
        offset += t.numel()
    out, i = {}, 0
    for name, values in local.items():
        mine, i = summed[i : i + len(values)], i + len(values)
        if name in ("switch", "group_switch"):
            out[name] = losses.switch_from_stats(*mine)
        elif name in ("z", "group_z"):
            out[name] = mine[0] / mine[1].clamp(min=1)
        else:
            out[name] = losses.cv_squared(mine[0])
    return out


def _group_z_sums(routing: Routing, mask_T: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    if routing.group_logits_TG is None:  # as _group_z: nothing to penalise, a loss of 0
        return routing.expert_logits_TE.new_zeros(()), torch.ones((), dtype=torch.int64)
    return losses.z_loss_sums(routing.group_logits_TG, mask_T)


def _group_z(routing: Routing, mask_T: torch.Tensor | None) -> torch.Tensor:
    if routing.group_logits_TG is None:  # derived or single group: no group logits to penalise
        return routing.expert_logits_TE.new_zeros(())
    return losses.router_z_loss(routing.group_logits_TG, mask_T)


def weighted_total(values: dict[str, torch.Tensor], cfg: BalanceConfig, like: torch.Tensor) -> torch.Tensor:
    total = like.new_zeros((), dtype=torch.float32)
    for name, value in values.items():
        total = total + getattr(cfg, name) * value
    return total


@torch.no_grad()
def update_correction_bias(
    router: Router, tokens_per_expert_E: torch.Tensor, tokens_per_group_G: torch.Tensor | None, rate: float
) -> None:
    """``bias += rate * sign(mean_load - load)`` for the expert biases (and group biases, if given)."""
    rate = losses.check_loss_weight("rate", rate)
    if router.expert_bias_E is None:
        raise ValueError("this router has no correction bias; build it with RouterOptions(correction_bias=True)")
    _nudge(router.expert_bias_E, tokens_per_expert_E, rate)
    if tokens_per_group_G is not None and router.cfg.num_groups > 1:
        _nudge(router.group_bias_G, tokens_per_group_G, rate)


def _nudge(bias: torch.Tensor, load: torch.Tensor, rate: float) -> None:
    load = load.to(bias.dtype)
    bias.add_(rate * torch.sign(load.mean() - load))


def update_correction_biases(model: nn.Module, auxes: list, rate: float) -> int:
    """Apply :func:`update_correction_bias` to every biased router of ``model``.

    ``auxes`` are the layers' aux results from the step (one per MoE layer call, in module order;
    for gradient accumulation pass the micro-batches' lists concatenated: loads are summed per
    layer). Call after ``optimizer.step()``. Returns how many routers were updated.
    """
    routers = [m for m in model.modules() if isinstance(m, Router)]
    if not routers or not auxes:
        return 0
    if len(auxes) % len(routers):
        raise ValueError(f"got {len(auxes)} aux results for {len(routers)} MoE layers; expected a multiple")
    updated = 0
    for i, router in enumerate(routers):
        if router.expert_bias_E is None:
            continue
        mine = auxes[i :: len(routers)]
        expert_load = sum(a.tokens_per_expert_E for a in mine)
        group_load = sum(a.tokens_per_group_G for a in mine)
        update_correction_bias(router, expert_load, group_load, rate)
        updated += 1
    return updated


def balance_metrics(aux, prefix: str = "") -> dict[str, float]:
    """Loggable balance figures of one layer's aux result, for both levels."""
    r = aux.routing
    rows = max(int(aux.tokens_per_expert_E.sum()), 1)
    return {
        f"{prefix}maxvio": losses.max_violation(aux.tokens_per_expert_E),
        f"{prefix}group_maxvio": losses.max_violation(aux.tokens_per_group_G),
        f"{prefix}entropy": losses.router_entropy(r.probs_TE.detach()),
        f"{prefix}group_entropy": losses.router_entropy(r.group_probs_TG.detach()),
        f"{prefix}dropped_rate": float(aux.num_dropped) / rows,
    }
