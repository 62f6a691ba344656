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

On a DP x EP mesh (``mesh.py``) the same expert shard lives on the DP ranks of its "dp" group, and
its gradient is ``(1/W) * sum over that group`` (each replica's all-to-all backward brought the
gradients of its own EP ranks' losses): pass ``dp_group``.

``replicate_with_ddp`` hands the replicated parameters to PyTorch's DistributedDataParallel instead:
its buckets are all-reduced while backward still runs (communication overlaps computation), and
``no_sync()`` skips them on all but the last micro-batch. The expert shards are excluded from its
buckets; ``reduce_expert_grads`` scales them (and averages them over ``dp_group``) after backward.
``data_parallel_grads`` stays as the hand-written path (``dualroute bench ep`` times both).
"""

from __future__ import annotations

import inspect
from dataclasses import replace

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import ProcessGroup
from torch.nn.parallel import DistributedDataParallel

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
def data_parallel_grads(model: nn.Module, group: ProcessGroup | None = None, *,
                        dp_group: ProcessGroup | None = None) -> None:
    """Average replicated gradients over the ranks of ``group`` (all W of them); expert-shard gradients:
    summed over ``dp_group`` (the ranks holding the same shard; None: each shard lives on one rank), / W."""
    _, world = group_rank_and_size(group)
    replicated = replicated_parameters(model)
    _fill_missing_grads(replicated, group)
    _all_reduce_mean([p.grad for p in replicated if p.grad is not None], world, group)
    reduce_expert_grads(model, world, dp_group)


@torch.no_grad()
def reduce_expert_grads(model: nn.Module, world: int, dp_group: ProcessGroup | None = None) -> None:
    """Expert-shard gradients after backward: a missing one becomes zeros (a shard that received no rows: one
    process's stacked weight always has a gradient), summed over ``dp_group`` if given, divided by ``world``."""
    grads = []
    for p in expert_parameters(model):
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    if dp_group is not None and dist.get_world_size(dp_group) > 1:
        _all_reduce_mean(grads, world, dp_group)
        return
    for g in grads:
        g.div_(world)


def replicate_with_ddp(model: nn.Module, group: ProcessGroup | None = None, *,
                       bucket_cap_mb: float = 25.0) -> DistributedDataParallel:
    """``DistributedDataParallel`` over ``group`` for the replicated parameters of ``model``.

    The expert shards are excluded from its buckets and from its initial broadcast (they differ between
    ranks); call ``reduce_expert_grads`` after the last backward of a step. Train through the returned
    module (its forward prepares the buckets; ``no_sync()`` for all but the last micro-batch) and keep
    using ``model`` itself for everything else (state dicts, evaluation). Buffers are not broadcast: the
    correction biases stay equal because every rank updates them from the same summed loads.
    Every replicated parameter must get a gradient in every backward (DDP's ``find_unused_parameters``
    is off).
    """
    sharded = {id(p) for p in expert_parameters(model)}
    ignored = [name for name, p in model.named_parameters() if id(p) in sharded]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
    # torch >= 2.11 names the option forward_sync_buffers (and warns about broadcast_buffers)
    no_buffer_sync = {"forward_sync_buffers": False} \
        if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters \
        else {"broadcast_buffers": False}
    return DistributedDataParallel(model, process_group=group, bucket_cap_mb=bucket_cap_mb, **no_buffer_sync)


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float, group: ProcessGroup | None = None) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over the whole (sharded) model; returns the total norm.

    Call after ``data_parallel_grads`` (or DDP's backward and ``reduce_expert_grads``): replicated grads
    are then equal on every rank and count once; the squared norms of the expert shards are summed over
    ``group``, the ranks that hold one copy of every expert (default: the layers' expert-parallel group).
    """
    replicated = [p.grad for p in replicated_parameters(model) if p.grad is not None]
    sharded = [p.grad for p in expert_parameters(model) if p.grad is not None]
    if group is None:
        layers = expert_parallel_layers(model)
        group = layers[0][1].ep.group if layers else None
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
