"""What the trainer does differently on several ranks (expert + data parallelism), behind one small interface.

``SingleProcess`` is the plain trainer: every hook is the identity or a no-op. ``ExpertParallel``
is the same run spread over the W = EP x DP ranks of a process group, laid out on a ("dp", "ep")
device mesh (``dualroute.parallel.mesh``):

* every rank builds the same model (same seed) and keeps E/EP experts (``apply_expert_parallel`` over
  its "ep" group); the DP replicas along "dp" hold the same shards;
* ``train.batch_size`` is the GLOBAL batch: every rank draws it with the same generator and trains
  on its contiguous share of ``batch_size / W`` rows, so W ranks train on exactly the rows one
  process would, and the data generator (saved in checkpoints) is the same on every rank;
* gradients: replicated parameters under DistributedDataParallel over all W ranks (buckets reduced
  while backward runs; ``no_sync`` on all but the last micro-batch), expert shards averaged over "dp"
  and scaled after backward (``reduce_expert_grads``), clipped by the norm of the whole model; the
  aux balance losses are computed on the global batch (``use_global_balance_losses``); the loss and
  the expert loads are reduced over ranks before anything reads them, so logs, the finite-loss check
  and the correction-bias update agree on every rank;
* evaluation and the sample: every rank runs the same validation batches (the experts are spread
  over the ranks, so all must take part); the metrics equal one process's;
* rank 0 alone writes the run directory; the others wait at a barrier while it saves. Checkpoints
  hold the gathered (unsharded) weights and optimizer state: they are single-process checkpoints
  and resume on any W that divides E and the batch.

``launch(expert_parallel, cfg, device, data_parallel)`` checks the world size (EP x DP = WORLD_SIZE),
starts the process group if needed (with ``train.dist_timeout_s``, so a dead or stalled peer is an
error, not a hang), builds the mesh and yields the ranks.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from dualroute.layer import MoEAux, MoELayer
from dualroute.parallel import (ParallelLayout, apply_expert_parallel, clip_grad_norm_, data_parallel_grads,
                                gather_expert_state, gather_optimizer_state, init_distributed, init_mesh,
                                load_full_optimizer_state, load_full_state_dict, reduce_expert_grads,
                                replicate_with_ddp, use_global_balance_losses)
from dualroute.parallel.comm import check_same_on_all_ranks, collective_device
from dualroute.parallel.expert_parallel import unshardable
from dualroute.train.checkpoint import latest_checkpoint
from dualroute.train.metrics_log import JsonlLogger
from dualroute.train.optim import match_state_layout
from dualroute.train.presets import RunConfig, run_config_to_dict

T = TypeVar("T")
Batch = tuple[torch.Tensor, ...]
GradSync = Literal["ddp", "manual"]  # replicated gradients: DistributedDataParallel, or data_parallel_grads


class SingleProcess:
    """One process: the trainer as it always was."""

    rank, world = 0, 1

    @property
    def is_main(self) -> bool:
        """This rank writes the run directory, logs and prints."""
        return self.rank == 0

    def check(self, cfg: RunConfig) -> None:
        pass

    def shard(self, model: nn.Module) -> nn.Module:
        return model

    def seed_own_rng(self) -> None:
        pass

    def my_rows(self, batch: Batch) -> Batch:
        return batch

    @contextmanager
    def micro_batch(self, model: nn.Module, sync: bool) -> Iterator[nn.Module]:
        """The module to run one training micro-batch through; ``sync``: its backward is the step's last."""
        yield model

    def mean(self, *values: float) -> tuple[float, ...]:
        return values

    def total_loads(self, aux: list[MoEAux]) -> list[MoEAux]:
        return aux

    def reduce_and_clip_grads(self, model: nn.Module, params: list[nn.Parameter], max_norm: float) -> float:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))

    def full_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
        return model.state_dict(), optimizer.state_dict()

    def load_full_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict,
                        optimizer_state: dict) -> None:
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optimizer_state)
        match_state_layout(optimizer)

    def metrics_log(self, path: Path) -> JsonlLogger | _NoLog:
        return JsonlLogger(path)

    def from_main(self, fn: Callable[[], T]) -> T:
        """``fn()`` computed by rank 0, on every rank."""
        return fn()

    def barrier(self) -> None:
        pass


class ExpertParallel(SingleProcess):
    """This rank of the default process group, on the ("dp", "ep") mesh of ``layout``: the experts are
    sharded over its "ep" group, everything else is replicated on all W ranks.

    ``grad_sync="ddp"`` (the trainer's): replicated gradients under DistributedDataParallel; ``"manual"``:
    the hand-written all-reduce after the whole backward (``data_parallel_grads``), kept for comparison.
    """

    def __init__(self, layout: ParallelLayout | None = None, grad_sync: GradSync = "ddp") -> None:
        if grad_sync not in ("ddp", "manual"):
            raise ValueError(f"grad_sync must be 'ddp' or 'manual', got {grad_sync!r}")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.layout = layout or ParallelLayout(expert_parallel=self.world)
        self.mesh = init_mesh(self.layout)  # the default group's timeout: train.dist_timeout_s under torchrun
        self.grad_sync = grad_sync
        self.ddp: nn.Module | None = None
        self.device = collective_device(None)

    def check(self, cfg: RunConfig) -> None:
        """Every rank must train the same config; the global batch must split evenly. Raises on every rank."""
        text = json.dumps(run_config_to_dict(cfg), sort_keys=True)
        digest = hashlib.sha256(text.encode()).hexdigest()[:16]
        check_same_on_all_ranks("the run config (hash of its JSON; start every rank with the same preset, "
                                "overrides and config file)", digest, None)
        if cfg.train.batch_size % self.world:
            raise ValueError(f"train.batch_size={cfg.train.batch_size} (the global batch) cannot be split evenly "
                             f"over world={self.world} ranks")

    def shard(self, model: nn.Module) -> nn.Module:
        """Keep this rank's experts, balance losses of the global batch, DDP for the replicated parameters.
        With EP = 1, a model without MoE layers (a dense twin), or whose MoE layers route their own way
        (``unshardable``: e.g. ConvMoELayer), trains with plain DDP over every parameter; its balance
        losses are then each rank's own."""
        layers = [m for m in model.modules() if isinstance(m, MoELayer)]
        if self.layout.expert_parallel > 1 or (layers and all(unshardable(m) is None for m in layers)):
            apply_expert_parallel(model, self.mesh.ep_group, world_size=self.layout.expert_parallel)
            use_global_balance_losses(model, self.mesh.balance_group)
        if self.grad_sync == "ddp":
            self.ddp = replicate_with_ddp(model, self.mesh.grad_group)
        return model

    def seed_own_rng(self) -> None:
        """Ranks > 0 leave the shared torch RNG stream (derived from it and the rank), so dropout masks
        and router noise differ between ranks. Rank 0 keeps the stream checkpoints save."""
        if self.rank > 0:
            torch.manual_seed(int(torch.randint(2**62, ())) + self.rank)

    def my_rows(self, batch: Batch) -> Batch:
        x, y = batch
        if not isinstance(x, torch.Tensor) or x.shape[0] % self.world:
            what = "a tuple of tensors" if isinstance(x, tuple) else f"{x.shape[0]} rows"
            raise ValueError(f"{self.world} ranks split each batch into equal row shares; this task's batches are "
                             f"{what} (the translation task's token-bucketed batches are not supported on several "
                             f"ranks yet: train it in one process)")
        rows = x.shape[0] // self.world
        return x[self.rank * rows : (self.rank + 1) * rows], y[self.rank * rows : (self.rank + 1) * rows]

    @contextmanager
    def micro_batch(self, model: nn.Module, sync: bool) -> Iterator[nn.Module]:
        """DDP around ``model``; without ``sync`` (all micro-batches but the last) its gradients only accumulate."""
        if self.ddp is None:
            yield model
            return
        if self.ddp.module is not model:
            raise ValueError("micro_batch: pass the model this rank sharded (ranks.shard's result)")
        if sync:
            yield self.ddp
            return
        with self.ddp.no_sync():
            yield self.ddp

    def mean(self, *values: float) -> tuple[float, ...]:
        """Means over ranks (equal shares of the batch: the global batch's value)."""
        flat = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(flat)
        return tuple((flat / self.world).tolist())

    def total_loads(self, aux: list[MoEAux]) -> list[MoEAux]:
        """The aux results with loads and drops summed over ranks (the global batch's); routing stays local."""
        if not aux:
            return aux
        parts = [[a.tokens_per_expert_E, a.tokens_per_group_G, a.dropped_per_expert_E, a.num_dropped.view(1)]
                 for a in aux]
        flat = torch.cat([t.to(self.device, torch.int64) for p in parts for t in p])
        dist.all_reduce(flat)
        out, offset = [], 0
        for a, p in zip(aux, parts):
            E, G = p[0].numel(), p[1].numel()
            loads = flat[offset : offset + 2 * E + G + 1].to(a.tokens_per_expert_E.device)
            out.append(replace(a, tokens_per_expert_E=loads[:E], tokens_per_group_G=loads[E : E + G],
                               dropped_per_expert_E=loads[E + G : 2 * E + G], num_dropped=loads[-1]))
            offset += 2 * E + G + 1
        return out

    def reduce_and_clip_grads(self, model: nn.Module, params: list[nn.Parameter], max_norm: float) -> float:
        if self.ddp is None:  # the hand-written all-reduce of every replicated gradient, after backward
            data_parallel_grads(model, dp_group=self.mesh.dp_group)
        else:  # DDP has averaged the replicated ones during backward
            reduce_expert_grads(model, self.world, self.mesh.dp_group)
        return float(clip_grad_norm_(model, max_norm, self.mesh.ep_group))

    def full_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
        """The unsharded model's and optimizer's state dicts (collectives: every rank calls it)."""
        return gather_expert_state(model), gather_optimizer_state(model, optimizer)

    def load_full_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict,
                        optimizer_state: dict) -> None:
        load_full_state_dict(model, model_state)
        load_full_optimizer_state(model, optimizer, optimizer_state)
        match_state_layout(optimizer)

    def metrics_log(self, path: Path) -> JsonlLogger | _NoLog:
        return JsonlLogger(path) if self.is_main else _NoLog()

    def from_main(self, fn: Callable[[], T]) -> T:
        """Rank 0 computes ``fn()`` and sends it (or the exception it raised) to every rank."""
        box: list[Any] = [None]
        if self.is_main:
            try:
                box = [(True, fn())]
            except Exception as e:  # noqa: BLE001 - re-raised on every rank below
                box = [(False, e)]
        dist.broadcast_object_list(box, src=0)
        ok, value = box[0]
        if not ok:
            raise value
        return value

    def barrier(self) -> None:
        dist.barrier()  # bounded by the process group's timeout


class _NoLog:
    """The metrics log of ranks > 0: nothing is written."""

    def log(self, record: dict[str, Any]) -> None:
        pass

    def __enter__(self) -> _NoLog:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


# ------------------------------------------------------------------------------------------- launch


def launched_world() -> int:
    """Processes in this run: the initialised process group's size, else torchrun's ``WORLD_SIZE``, else 1."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


_abandoned_group = False  # a process group launch() started broke mid-run: it cannot be torn down


def abandoned_process_group() -> bool:
    """True once a run's collective failed in a process group that ``launch`` started (torchrun). Such a
    group cannot be destroyed, and interpreter shutdown then aborts in its threads (SIGABRT, "terminate
    called without an active exception"): the caller should leave with ``os._exit`` instead."""
    return _abandoned_group


@contextmanager
def launch(expert_parallel: int | None, cfg: RunConfig, device: torch.device,
           data_parallel: int | None = None, grad_sync: GradSync = "ddp") -> Iterator[SingleProcess]:
    """The ranks of this run; ``expert_parallel`` x ``data_parallel`` (None = 1 each) must equal the
    launched world size.

    Under torchrun (``WORLD_SIZE`` > 1, no process group yet) the group is started here with
    ``train.dist_timeout_s`` and torn down after a normal exit; a group started by the caller (e.g.
    ``run_workers``) is used as it is. A RuntimeError on several ranks (a collective failed: a peer
    died or stalled) is re-raised naming this rank and the run directory's last checkpoint.
    """
    for flag, value in (("--expert-parallel", expert_parallel), ("--data-parallel", data_parallel)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{flag} must be an int >= 1, got {value!r}")
    layout = ParallelLayout(expert_parallel=expert_parallel or 1, data_parallel=data_parallel or 1)
    world = launched_world()
    if layout.world != world:
        if data_parallel is None:
            asked = f"--expert-parallel {layout.expert_parallel}{' (not given)' if expert_parallel is None else ''}"
        else:
            asked = (f"--expert-parallel {layout.expert_parallel} x --data-parallel {layout.data_parallel} "
                     f"= {layout.world}")
        raise ValueError(f"{asked} must equal the number of launched processes, WORLD_SIZE={world}: launch "
                         f"`torchrun --nproc-per-node N -m dualroute train ... --expert-parallel N` with one N, "
                         f"or --expert-parallel E --data-parallel D with E x D = N x NNODES")
    if world == 1:
        yield SingleProcess()
        return
    started_here = not dist.is_initialized()
    if started_here:
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        init_distributed("nccl" if device.type == "cuda" else "gloo", cfg.train.dist_timeout_s)
    ranks = ExpertParallel(layout, grad_sync)
    try:
        yield ranks
    except RuntimeError as e:
        global _abandoned_group
        _abandoned_group = _abandoned_group or started_here
        last = latest_checkpoint(cfg.train.out_dir) if ranks.is_main else None
        where = f"{last} (intact)" if last is not None else f"the checkpoints in {cfg.train.out_dir} (intact)"
        raise RuntimeError(f"rank {ranks.rank} of {ranks.world} stopped: {e} -- if another rank died or stalled, "
                           f"every rank stops within train.dist_timeout_s; continue from {where} with --resume") from e
    ranks.barrier()  # train() returns on every rank once the run directory is complete
    ranks.mesh.destroy()
    if started_here:
        dist.destroy_process_group()
