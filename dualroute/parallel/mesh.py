"""The layout of a run on W = DP x EP ranks: a 2-D ``DeviceMesh`` with dims ``("dp", "ep")``.

Shapes: W ranks, EP ranks per expert-parallel group, DP data-parallel replicas, ``W = DP * EP``.

Rank ``r = d * EP + e`` sits at mesh coordinate ``(d, e)``. Along ``"ep"`` (ranks ``d*EP .. d*EP+EP-1``,
consecutive: one machine when ``--nproc-per-node EP``) the experts are sharded and tokens travel by
all-to-all; along ``"dp"`` (ranks ``e, EP + e, 2*EP + e, ...``) the same expert shard is replicated and
its gradients are averaged. Everything else (attention, norms, embeddings, routers, shared experts) is
replicated on all W ranks and averaged over all of them. ``DP = 1`` is plain expert parallelism over
W ranks; ``EP = 1`` is plain data parallelism with every expert on every rank.

Two more groups span all W ranks, each with its own communicator: DDP's gradient buckets (reduced
asynchronously during backward) and the global balance losses (an all-reduce inside forward and
backward). Keeping them apart from the expert all-to-alls means collectives that overlap in time
never share a group. Every group has the finite timeout given (``init_device_mesh`` would give its
subgroups the 30-minute default).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

MESH_DIMS = ("dp", "ep")


@dataclass(frozen=True)
class ParallelLayout:
    """How W ranks split the work: ``expert_parallel`` ranks share the experts of one replica,
    ``data_parallel`` replicas train on different rows."""

    expert_parallel: int = 1  # EP
    data_parallel: int = 1  # DP

    def __post_init__(self) -> None:
        for name in ("expert_parallel", "data_parallel"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {value!r}")
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")

    @property
    def world(self) -> int:  # W
        return self.expert_parallel * self.data_parallel

    def coords(self, rank: int) -> tuple[int, int]:
        """``(d, e)``: this rank's data-parallel replica and its place in the expert-parallel group."""
        return divmod(rank, self.expert_parallel)


@dataclass(eq=False)
class ParallelMesh:
    """The groups of one rank: its expert-parallel group, its data-parallel group, and two all-rank groups."""

    layout: ParallelLayout
    device_mesh: DeviceMesh
    ep_group: ProcessGroup  # the EP ranks that hold this replica's experts (along "ep")
    dp_group: ProcessGroup  # the DP ranks that hold the same expert shard as this one (along "dp")
    grad_group: ProcessGroup  # all W ranks: DDP's gradient buckets
    balance_group: ProcessGroup  # all W ranks: the global balance losses

    @property
    def rank(self) -> int:
        return dist.get_rank()

    @property
    def world(self) -> int:
        return self.layout.world

    def destroy(self) -> None:
        """Tear down the groups ``init_mesh`` made (every rank calls it, after a run that ended well)."""
        for group in (self.ep_group, self.dp_group, self.grad_group, self.balance_group):
            if group is not None and group is not dist.group.WORLD:
                dist.destroy_process_group(group)


def init_mesh(layout: ParallelLayout, timeout_s: float | None = None) -> ParallelMesh:
    """The mesh and groups of ``layout`` in the initialised default process group (every rank calls it).

    Every group gets ``timeout_s``, by default the default group's own timeout (``init_distributed``'s,
    e.g. ``train.dist_timeout_s``). Raises ValueError (on every rank, before any collective) when
    ``layout.world`` is not the process group's size."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialized; call dualroute.parallel.init_distributed first")
    if layout.world != dist.get_world_size():
        raise ValueError(f"expert parallel {layout.expert_parallel} x data parallel {layout.data_parallel} = "
                         f"{layout.world} ranks, but the process group has {dist.get_world_size()}")
    backend = dist.get_backend()
    timeout_s = default_group_timeout_s(fallback_s=300.0) if timeout_s is None else timeout_s
    options = _options(backend, timeout_s)
    mesh = init_device_mesh("cuda" if backend == "nccl" else "cpu", (layout.data_parallel, layout.expert_parallel),
                            mesh_dim_names=MESH_DIMS, backend_override={d: (backend, options) for d in MESH_DIMS})
    timeout = timedelta(seconds=timeout_s)
    grad_group = dist.new_group(timeout=timeout, backend=backend, group_desc="dualroute_grads")
    balance_group = dist.new_group(timeout=timeout, backend=backend, group_desc="dualroute_balance")
    return ParallelMesh(layout, mesh, ep_group=mesh["ep"].get_group(), dp_group=mesh["dp"].get_group(),
                        grad_group=grad_group, balance_group=balance_group)


def _options(backend: str, timeout_s: float):
    if backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
    elif backend == "gloo":
        options = dist.ProcessGroupGloo._Options()
    else:
        raise ValueError(f"the dp x ep mesh supports the gloo and nccl backends, got {backend!r}")
    options._timeout = timedelta(seconds=timeout_s)
    return options


def default_group_timeout_s(fallback_s: float) -> float:
    """The default process group's collective timeout in seconds (``fallback_s`` where this torch hides it)."""
    device = torch.device("cuda" if dist.get_backend() == "nccl" else "cpu")
    try:
        return dist.group.WORLD._get_backend(device).options._timeout.total_seconds()
    except (AttributeError, RuntimeError):
        return fallback_s
