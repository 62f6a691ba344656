"""Data parallelism for what expert parallelism replicates, with the gradient scaling that makes
W ranks equal one process on the concatenated batch.

Each rank computes the MEAN loss over its own batch, ``L_r``; one process on the concatenated
batch (equal local batches) computes ``L = (1/W) sum_r L_r``. So:

* a replicated parameter (attention, norms, embeddings, routers, shared experts) has
  ``dL/dθ = (1/W) sum_r dL_r/dθ``: all-reduce its gradient and divide by W (average);
* an expert parameter lives on one rank only, and the all-to-all backward already delivers the
  gradient of every rank's loss to it: its grad is ``sum_r dL_r/dθ``, so divide by W and do NOT
  all-reduce it (its shards are different parameters on each rank).

``data_parallel_grads`` does both; call it once per optimizer step, after every backward (of all
micro-batches) and before clipping and ``optimizer.step()``. A gradient that is None on some
ranks and not others (an expert shard that received no rows, say) becomes zeros, as it would be
on one process. Clip with ``clip_grad_norm_``, whose norm counts every expert shard once.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import ProcessGroup

from ..layer import MoEAux
from .comm import collective_device, group_rank_and_size
from .expert_parallel import expert_parallel_layers


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The sharded parameters: each rank holds different ones under the same names."""
    return [p for _, layer in expert_parallel_layers(model) for p in layer.experts.parameters()]


def replicated_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every other trainable parameter (tied parameters once): the same on every rank."""
    sharded = {id(p) for p in expert_parameters(model)}
    return [p for p in model.parameters() if p.requires_grad and id(p) not in sharded]


@torch.no_grad()
def data_parallel_grads(model: nn.Module, group: ProcessGroup | None = None) -> None:
    """Average replicated gradients over ranks; divide expert-shard gradients by the world size."""
    _, world = group_rank_and_size(group)
    replicated, sharded = replicated_parameters(model), expert_parameters(model)
    _fill_missing_grads(replicated + sharded, group)
    _all_reduce_mean([p.grad for p in replicated if p.grad is not None], world, group)
    for p in sharded:
        if p.grad is not None:
            p.grad.div_(world)


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float, group: ProcessGroup | None = None) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over the whole (sharded) model; returns the total norm.

    Call after ``data_parallel_grads``: replicated grads are then equal on every rank and count
    once; the squared norms of the expert shards are summed over ranks.
    """
    replicated = [p.grad for p in replicated_parameters(model) if p.grad is not None]
    sharded = [p.grad for p in expert_parameters(model) if p.grad is not None]
    device = collective_device(group)
    sharded_sq = _sum_of_squares(sharded, device)
    dist.all_reduce(sharded_sq, group=group)
    replicated_sq = _sum_of_squares(replicated, device)
    total = (replicated_sq + sharded_sq).sqrt()
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in replicated + sharded:
        g.mul_(scale.to(g.device, g.dtype))
    return total.float()


def _sum_of_squares(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float64, device=device)
    for g in grads:
        total += g.double().square().sum().to(device)
    return total


@torch.no_grad()
def sum_loads_over_ranks(auxes: list[MoEAux], group: ProcessGroup | None = None) -> list[MoEAux]:
    """The aux results with ``tokens_per_expert_E`` / ``tokens_per_group_G`` summed over ranks.

    Pass these to ``update_correction_biases``: every rank then nudges its (replicated) router
    biases by the global load, as one process would, and the replicas stay equal.
    """
    if not auxes:
        return []
    flat = torch.cat([torch.cat([a.tokens_per_expert_E, a.tokens_per_group_G]) for a in auxes])
    flat = flat.to(collective_device(group))
    dist.all_reduce(flat, group=group)
    out, offset = [], 0
    for a in auxes:
        E, G = a.tokens_per_expert_E.numel(), a.tokens_per_group_G.numel()
        loads = flat[offset : offset + E + G].to(a.tokens_per_expert_E.device)
        out.append(replace(a, tokens_per_expert_E=loads[:E], tokens_per_group_G=loads[E:]))
        offset += E + G
    return out


def _fill_missing_grads(params: list[nn.Parameter], group: ProcessGroup | None) -> None:
    """Zero-fill a None grad wherever another rank has that parameter's grad."""
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=collective_device(group))
    dist.all_reduce(has, op=dist.ReduceOp.MAX, group=group)
    for p, anyone in zip(params, has.tolist()):
        if anyone and p.grad is None:
            p.grad = torch.zeros_like(p)


def _all_reduce_mean(grads: list[torch.Tensor], world: int, group: ProcessGroup | None) -> None:
    """One all-reduce per dtype over a flat buffer of the gradients, then divide by W."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for dtype in sorted(by_dtype, key=str):  # the same order on every rank
        bucket = by_dtype[dtype]
        flat = torch.cat([g.reshape(-1) for g in bucket])
        dist.all_reduce(flat, group=group)
        flat.div_(world)
        offset = 0
        for g in bucket:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
