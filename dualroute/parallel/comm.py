"""Collectives the expert-parallel layer needs, as autograd ops, plus a byte meter.

Shapes: W ranks in the group, R rows (of any width) moved between them.

``all_to_all`` moves rows with uneven splits; its backward is the reverse all-to-all (the
gradient of a row goes back to the rank it came from), the megablocks "op and its dual" pair.
Every call adds the bytes it sent to *other* ranks to a ``Traffic`` meter, forward and
backward alike, so the meter reads what actually crossed the wire in a training step.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, fields

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup


@dataclass
class Traffic:
    """What one rank's expert-parallel layers routed and sent. Ints, summed over calls.

    ``rows_remote`` is what a per-row dispatch would send (one copy of a token per chosen expert
    on another rank); ``pairs_remote`` is what this one sends (one copy per other rank).
    """

    tokens: int = 0  # local tokens routed
    rows: int = 0  # kept (token, expert) rows
    rows_remote: int = 0  # of which to experts on other ranks
    pairs: int = 0  # (token, destination rank) pairs, this rank included
    pairs_remote: int = 0  # of which to other ranks
    bytes_sent: int = 0  # bytes sent to other ranks by every all-to-all, forward and backward

    def __add__(self, other: Traffic) -> Traffic:
        return Traffic(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def reset(self) -> None:
        for f in fields(self):
            setattr(self, f.name, 0)


def group_rank_and_size(group: ProcessGroup | None) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialized; call dualroute.parallel.init_distributed "
                           "(or torch.distributed.init_process_group with a timeout) first")
    return dist.get_rank(group), dist.get_world_size(group)


def collective_device(group: ProcessGroup | None) -> torch.device:
    """Where small bookkeeping tensors must live for this group's backend (nccl: the current GPU)."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def exchange_counts(send_W: torch.Tensor, group: ProcessGroup | None, meter: Traffic | None = None) -> torch.Tensor:
    """Rank r sends ``send_W[s]`` to rank s; returns ``recv_W`` (what each rank will send here)."""
    ones = [1] * send_W.numel()
    return _all_to_all(send_W, ones, ones, group, meter)


def all_to_all(x_R: torch.Tensor, send_splits: list[int], recv_splits: list[int],
               group: ProcessGroup | None = None, meter: Traffic | None = None) -> torch.Tensor:
    """Rows ``[offset_s, offset_s + send_splits[s])`` of ``x_R`` go to rank s; the result stacks
    what every rank sent here, by source rank. Differentiable in ``x_R``."""
    return _AllToAll.apply(x_R, send_splits, recv_splits, group, meter)


def _all_to_all(x_R, send_splits, recv_splits, group, meter):
    if dist.get_world_size(group) == 1:  # experts not spread (pure data parallelism): nothing to send
        return x_R.clone()
    out_R = x_R.new_empty((sum(recv_splits), *x_R.shape[1:]))
    rank = dist.get_rank(group)
    try:
        dist.all_to_all_single(out_R, x_R.contiguous(), recv_splits, send_splits, group=group)
    except RuntimeError as e:  # name the op: gloo's message only names the socket
        raise RuntimeError(f"expert-parallel all-to-all failed on rank {rank} (a peer died or stalled past the "
                           f"process group's timeout): {e}") from e
    if meter is not None:
        row_bytes = math.prod(x_R.shape[1:]) * x_R.element_size()  # x_R may hold no rows
        meter.bytes_sent += (sum(send_splits) - send_splits[rank]) * row_bytes
    return out_R


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_R, send_splits, recv_splits, group, meter):
        ctx.send_splits, ctx.recv_splits, ctx.group, ctx.meter = send_splits, recv_splits, group, meter
        return _all_to_all(x_R, send_splits, recv_splits, group, meter)

    @staticmethod
    def backward(ctx, grad_R):
        # The dual op: every row's gradient returns to the rank that sent the row.
        grad_x = _all_to_all(grad_R, ctx.recv_splits, ctx.send_splits, ctx.group, ctx.meter)
        return grad_x, None, None, None, None


def all_reduce_sum(x: torch.Tensor, group: ProcessGroup | None = None) -> torch.Tensor:
    """``x`` summed over the ranks of ``group``, differentiably; the backward sums the gradients too.

    For a loss that every rank computes from the global sums (the balance losses of the whole batch,
    ``dualroute.balance.global_aux_losses``): rank r's partial sum feeds the loss of every rank, so its
    gradient is the sum of the gradients every rank's loss sends back. Averaged over the W ranks (DDP,
    ``data_parallel_grads``) that is exactly one process's gradient on the concatenated batch.
    """
    return _AllReduceSum.apply(x, group)


def _all_reduce(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    out = x.detach().clone().contiguous()
    try:
        dist.all_reduce(out, group=group)
    except RuntimeError as e:  # name the op, as _all_to_all does
        raise RuntimeError(f"balance-loss all-reduce failed on rank {dist.get_rank()} (a peer died or stalled past "
                           f"the process group's timeout): {e}") from e
    return out


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


def check_same_on_all_ranks(what: str, signature: object, group: ProcessGroup | None) -> None:
    """Raise ValueError on every rank unless every rank passes an equal ``signature``.

    The signature travels as a fixed-size checksum of its ``repr``, so ranks that disagree on its
    length cannot wedge the all-gather.
    """
    rank, world = group_rank_and_size(group)
    mine = torch.tensor([zlib.crc32(repr(signature).encode())], dtype=torch.int64, device=collective_device(group))
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine, group=group)
    differing = [r for r in range(world) if not torch.equal(gathered[r], gathered[0])]
    if differing:
        raise ValueError(f"ranks disagree on {what}: ranks {differing} differ from rank 0 "
                         f"(this is rank {rank}, with {signature!r})")
