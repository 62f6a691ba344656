"""Expert parallelism applied to a built model: each rank keeps E/W experts, and tokens travel.

Shapes: T local tokens, K experts per token, D model dim, O output dim, W ranks, L = E/W experts
per rank, P (token, destination rank) pairs this rank sends, R pairs it receives, C = D + K.

``apply_expert_parallel(model)`` slices every ``MoELayer``'s stacked expert weights to this
rank's contiguous range (see ``placement``) and swaps the layer's class for
``ExpertParallelMoELayer`` (as FSDP2's ``fully_shard`` does), whose ``route_and_compute`` is:

1. route locally (the router is replicated) and pair each token with the ranks that own its
   experts: a token goes to a rank ONCE, carrying its K combine weights (zero for slots that
   live elsewhere) and the local ids of the experts it uses there;
2. exchange pair counts, all-to-all the pairs (uneven splits, differentiable);
3. on the destination, sort the received slots by local expert, run the experts, and sum each
   pair's slots with their weights: one output row per pair;
4. all-to-all the rows back and add them up per token.

Sending a token once per rank (not once per expert) is what lets placement pay: with dual-layer
routing and ``G % W == 0`` a token crosses the wire at most J times, with flat top-k up to K.
The aux result is the single-process layer's for the local tokens; after
``use_global_balance_losses`` its balance losses are those of the whole batch (all ranks).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.distributed import ProcessGroup

from ..balance import global_aux_losses
from ..dispatch import DispatchPlan, combine, dispatch, plan_dispatch
from ..experts import Experts
from ..layer import MoEAux, MoELayer
from ..routing import Routing
from .comm import Traffic, all_reduce_sum, all_to_all, check_same_on_all_ranks, exchange_counts, group_rank_and_size
from .placement import Placement


@dataclass(eq=False)
class ExpertShard:
    """Which experts this rank holds, for one layer, and the meter its collectives write to."""

    group: ProcessGroup | None
    rank: int
    placement: Placement
    traffic: Traffic
    # The balance losses: of this rank's tokens (False), or of the batch of every rank of ``balance_group``
    # together (``use_global_balance_losses``), as one process on the concatenated batch.
    global_balance: bool = False
    balance_group: ProcessGroup | None = None

    @property
    def world(self) -> int:
        return self.placement.world

    @property
    def first(self) -> int:
        return self.placement.expert_range(self.rank)[0]

    @property
    def num_local(self) -> int:
        return self.placement.local_experts


def apply_expert_parallel(model: nn.Module, group: ProcessGroup | None = None, *,
                          world_size: int | None = None) -> nn.Module:
    """Shard the experts of every ``MoELayer`` in ``model`` over ``group``; returns ``model``.

    Every check that can fail (``world_size`` given but not the group's size, E not divisible by
    the world size, no MoE layer, applied twice) raises ValueError on every rank before any
    collective; then one all-gather checks that all ranks built the same MoE layers. Build the
    optimizer afterwards: the expert parameters are replaced by their local slices.
    """
    rank, world = group_rank_and_size(group)
    if world_size is not None and world_size != world:
        raise ValueError(f"expert parallelism over {world_size} ranks was asked for, but the process group "
                         f"has {world} ranks")
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no MoELayer to shard")
    for layer in layers:
        if isinstance(layer, ExpertParallelMoELayer):
            raise ValueError("apply_expert_parallel was already applied to this model")
        why = unshardable(layer)
        if why is not None:
            raise ValueError(why)
        Placement.of(layer.cfg, world)  # validates E % W
    signature = [(layer.cfg, str(layer.experts.first_weight().dtype)) for layer in layers]
    check_same_on_all_ranks("the MoE layers' configs", signature, group)
    for layer in layers:
        shard = ExpertShard(group, rank, Placement.of(layer.cfg, world), Traffic())
        _keep_local_experts(layer.experts, shard.first, shard.num_local)
        layer.__class__ = _expert_parallel_class(type(layer))
        layer.ep = shard
    return model


def unshardable(layer: MoELayer) -> str | None:
    """Why ``apply_expert_parallel`` cannot shard ``layer`` (None: it can). The sharded forward is
    ``MoELayer``'s token-choice routing of (T, D) tokens; a layer that routes its own way is refused."""
    if layer.cfg.routing_mode != "token_choice":
        return f"expert parallelism supports token-choice routing only, got routing_mode={layer.cfg.routing_mode!r}"
    if type(layer).route_and_compute is not MoELayer.route_and_compute:
        return (f"expert parallelism shards MoELayer's token routing; {type(layer).__name__} overrides "
                f"route_and_compute (it routes its own inputs), so its experts cannot be sharded")
    return None


def use_global_balance_losses(model: nn.Module, group: ProcessGroup | None = None) -> nn.Module:
    """Compute every sharded layer's aux balance losses on the batch of all ranks of ``group`` together
    (default: the default process group, i.e. every rank holds a share of the batch); returns ``model``.

    The losses then equal one process's on the concatenated batch, and so do their gradients once the
    replicated gradients are averaged over the ranks (DDP or ``data_parallel_grads``). Each layer call
    with a balance loss on adds one all-reduce (forward) and one more in backward. Every rank of
    ``group`` must call each layer the same number of times.
    """
    layers = expert_parallel_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no expert-parallel layer: call apply_expert_parallel first")
    for _, layer in layers:
        layer.ep.global_balance, layer.ep.balance_group = True, group
    return model


def expert_parallel_layers(model: nn.Module) -> list[tuple[str, ExpertParallelMoELayer]]:
    """``(qualified name, layer)`` of every sharded layer, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, ExpertParallelMoELayer)]


def traffic(model: nn.Module, reset: bool = False) -> Traffic:
    """This rank's traffic summed over the model's expert-parallel layers since the last reset."""
    total = Traffic()
    for _, layer in expert_parallel_layers(model):
        total = total + layer.ep.traffic
        if reset:
            layer.ep.traffic.reset()
    return total


class ExpertParallelMoELayer(MoELayer):
    """An ``MoELayer`` whose ``experts`` hold only this rank's slice; made by ``apply_expert_parallel``."""

    ep: ExpertShard

    def route_and_compute(
        self, x_TD: torch.Tensor, routing: Routing, mask_T: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, MoEAux]:
        plan = self._capacity_plan(routing, x_TD.shape[0])
        keep_TK = None if plan is None else _kept_slots(plan)
        y_TD = expert_parallel_ffn(x_TD, routing.expert_ids_TK, routing.weights_TK, keep_TK, self.experts, self.ep)
        return y_TD, _local_aux(self, routing, plan, mask_T)

    def make_aux(self, routing: Routing, dropped_E: torch.Tensor, mask_T: torch.Tensor | None,
                 tokens_per_expert_E: torch.Tensor | None = None) -> MoEAux:
        """The single-process layer's aux result for this rank's tokens; with ``ep.global_balance``, its
        balance losses are those of the whole batch (every rank of ``ep.balance_group``): one all-reduce of
        their per-unit sums, differentiable (``global_aux_losses``). Loads stay local."""
        aux = super().make_aux(routing, dropped_E, mask_T, tokens_per_expert_E)
        if not self.ep.global_balance or not self.cfg.balance.active():
            return aux
        group = self.ep.balance_group
        values = global_aux_losses(routing, self.cfg.balance, mask_T, lambda v: all_reduce_sum(v, group))
        return replace(aux, given_losses=values).computed()

    def _capacity_plan(self, routing: Routing, T: int) -> DispatchPlan | None:
        """With a capacity, the local drop decision (capacity from the LOCAL token count, as the
        single-process layer would decide on this rank's batch); None when dropless."""
        capacity, group_capacity = self._capacities(T)
        if capacity is None and group_capacity is None:
            return None
        cfg = self.cfg
        return plan_dispatch(routing.expert_ids_TK, routing.weights_TK, cfg.num_experts, capacity,
                             group_capacity, cfg.num_groups)


_CLASSES: dict[type, type] = {MoELayer: ExpertParallelMoELayer}


def _expert_parallel_class(cls: type) -> type:
    if cls not in _CLASSES:  # a subclass of MoELayer keeps its own methods
        _CLASSES[cls] = type(f"ExpertParallel{cls.__name__}", (ExpertParallelMoELayer, cls), {})
    return _CLASSES[cls]


def _keep_local_experts(experts: Experts, first: int, count: int) -> None:
    """Replace each stacked parameter (leading dim E) by its ``[first, first + count)`` slice."""
    for name, param in list(experts.named_parameters(recurse=False)):
        local = param.detach()[first : first + count].clone()
        setattr(experts, name, nn.Parameter(local, requires_grad=param.requires_grad))
    experts.cfg = replace(experts.cfg, num_experts=count)


# ----------------------------------------------------------------------------- the forward


@dataclass(frozen=True)
class _Pairs:
    token_P: torch.Tensor  # pairs sorted by destination rank, then token
    local_ids_PK: torch.Tensor  # int32: the slot's expert id on the destination, -1 if elsewhere
    here_PK: torch.Tensor  # bool: the slot's expert is on the pair's destination
    send_W: torch.Tensor  # pairs per destination rank
    rows_W: torch.Tensor  # kept (token, expert) rows per destination rank


def expert_parallel_ffn(x_TD: torch.Tensor, expert_ids_TK: torch.Tensor, weights_TK: torch.Tensor,
                        keep_TK: torch.Tensor | None, experts: Experts, shard: ExpertShard) -> torch.Tensor:
    """``y[t] = sum_k weights[t, k] * expert_{ids[t, k]}(x[t])`` with the experts spread over ranks."""
    group, meter = shard.group, shard.traffic
    pairs = _pair_up(expert_ids_TK, keep_TK, shard)
    recv_W = exchange_counts(pairs.send_W, group, meter)
    send, recv, rows = torch.stack([pairs.send_W, recv_W, pairs.rows_W]).tolist()  # one host sync: the splits
    _record(meter, shard.rank, expert_ids_TK.shape[0], send, rows)
    w_PK = (weights_TK.index_select(0, pairs.token_P) * pairs.here_PK).to(x_TD.dtype)
    payload_PC = torch.cat([x_TD.index_select(0, pairs.token_P), w_PK], dim=1)
    payload_RC = all_to_all(payload_PC, send, recv, group, meter)
    local_ids_RK = all_to_all(pairs.local_ids_PK, send, recv, group, meter)
    D = x_TD.shape[1]
    y_RO = _run_local_experts(payload_RC[:, :D], payload_RC[:, D:], local_ids_RK, experts)
    y_PO = all_to_all(y_RO, recv, send, group, meter)
    return y_PO.new_zeros(x_TD.shape[0], y_PO.shape[1]).index_add(0, pairs.token_P, y_PO)


def _pair_up(expert_ids_TK: torch.Tensor, keep_TK: torch.Tensor | None, shard: ExpertShard) -> _Pairs:
    T, K = expert_ids_TK.shape
    L, W = shard.num_local, shard.world
    dest_TK = torch.div(expert_ids_TK, L, rounding_mode="floor")
    if keep_TK is not None:  # slots dropped by capacity go nowhere (a virtual rank W)
        dest_TK = dest_TK.masked_fill(~keep_TK, W)
    goes_TW = torch.zeros(T, W + 1, dtype=torch.bool, device=dest_TK.device).scatter_(1, dest_TK, True)[:, :W]
    dest_P, token_P = goes_TW.t().nonzero(as_tuple=True)
    here_PK = dest_TK.index_select(0, token_P) == dest_P.unsqueeze(1)
    local_PK = expert_ids_TK.index_select(0, token_P) - dest_P.unsqueeze(1) * L
    rows_W = torch.zeros(W + 1, dtype=torch.int64, device=dest_TK.device).scatter_add_(
        0, dest_TK.reshape(-1), torch.ones_like(dest_TK.reshape(-1)))[:W]
    return _Pairs(
        token_P=token_P,
        local_ids_PK=torch.where(here_PK, local_PK, -1).to(torch.int32),
        here_PK=here_PK,
        send_W=goes_TW.sum(0),
        rows_W=rows_W,
    )


def _run_local_experts(x_RD: torch.Tensor, w_RK: torch.Tensor, local_ids_RK: torch.Tensor,
                       experts: Experts) -> torch.Tensor:
    """One output row per received pair: its slots here, through their experts, weighted and summed."""
    L = experts.cfg.num_experts
    if x_RD.shape[0] == 0:
        # Nothing arrived, but the backward all-to-all of the payload must still run on this rank
        # (every rank joins every collective), so keep the empty output attached to it.
        return x_RD.new_zeros(0, experts.cfg.output_dim) + 0 * x_RD.sum() + 0 * w_RK.sum()
    ids_RK = torch.where(local_ids_RK >= 0, local_ids_RK.long(), L)  # slots elsewhere: virtual expert L, last
    plan = plan_dispatch(ids_RK, w_RK, L + 1)
    counts_L = plan.counts_E[:L]
    x_ND = dispatch(x_RD, plan)[: plan.num_rows - int(plan.counts_E[L])]
    return combine(experts(x_ND, counts_L), w_RK, plan)  # virtual rows are not computed: they add 0


def _record(meter: Traffic, rank: int, tokens: int, send: list[int], rows: list[int]) -> None:
    meter.tokens += tokens
    meter.rows += sum(rows)
    meter.rows_remote += sum(rows) - rows[rank]
    meter.pairs += sum(send)
    meter.pairs_remote += sum(send) - send[rank]


def _kept_slots(plan: DispatchPlan) -> torch.Tensor:
    """``keep_TK``: the (token, slot) rows the capacity plan keeps."""
    kept = plan.num_rows - int(plan.dropped_E.sum())
    keep_N = torch.zeros(plan.num_rows, dtype=torch.bool, device=plan.order_N.device)
    keep_N[plan.order_N[:kept]] = True
    return keep_N.view(plan.num_tokens, plan.top_k)


def _local_aux(layer: MoELayer, routing: Routing, plan: DispatchPlan | None, mask_T: torch.Tensor | None) -> MoEAux:
    """The single-process layer's aux result for this rank's tokens."""
    dropped_E = plan.dropped_E if plan is not None else torch.zeros(
        layer.cfg.num_experts, dtype=torch.int64, device=routing.expert_ids_TK.device)
    return layer.make_aux(routing, dropped_E, mask_T)
