"""Checkpoints across world sizes: a sharded model's state as the unsharded model's, and back.

Shapes: E experts, L = E/W experts per rank. A full state dict has the same keys as the
unsharded model's (``...experts.w13`` of shape ``(E, D, 2F)``); a rank's model holds the
``[rank*L, (rank+1)*L)`` slice under the same key. So a checkpoint written from W ranks loads
into one process with plain ``load_state_dict``, and ``load_full_state_dict`` loads any full
checkpoint into a model sharded over any W that divides E.

The optimizer goes the same way: ``gather_optimizer_state`` is the ``optimizer.state_dict()`` the
unsharded model's optimizer would hold (each expert parameter's per-parameter tensors, e.g. Adam's
``exp_avg`` / ``exp_avg_sq``, all-gathered to ``(E, ...)``), and ``load_full_optimizer_state``
slices such a state dict for this rank. A run resumed on another world size keeps its moments.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.optim import Optimizer

from .expert_parallel import ExpertParallelMoELayer, expert_parallel_layers


def sharded_keys(model: nn.Module) -> dict[str, ExpertParallelMoELayer]:
    """State-dict key of every expert parameter -> the layer that holds its shard."""
    keys = {}
    for name, layer in expert_parallel_layers(model):
        prefix = f"{name}.experts." if name else "experts."
        for pname, _ in layer.experts.named_parameters():
            keys[prefix + pname] = layer
    return keys


@torch.no_grad()
def gather_expert_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded model's state dict, on every rank (one all-gather per expert parameter)."""
    state = model.state_dict()
    for key, layer in sharded_keys(model).items():
        shard = state[key].contiguous()
        pieces = [torch.empty_like(shard) for _ in range(layer.ep.world)]
        dist.all_gather(pieces, shard, group=layer.ep.group)
        state[key] = torch.cat(pieces)
    return state


@torch.no_grad()
def load_full_state_dict(model: nn.Module, full_state: dict[str, torch.Tensor], strict: bool = True):
    """Load an unsharded state dict into a (possibly) sharded model, keeping this rank's experts.

    Purely local (no collective); returns what ``load_state_dict`` returns."""
    state = dict(full_state)
    for key, layer in sharded_keys(model).items():
        if key not in state:
            continue  # load_state_dict reports it (strict) or skips it
        full, total = state[key], layer.ep.placement.num_experts
        if full.shape[0] != total:
            raise ValueError(f"{key}: the checkpoint holds {full.shape[0]} experts, the model has {total}")
        state[key] = full[layer.ep.first : layer.ep.first + layer.ep.num_local]
    return model.load_state_dict(state, strict=strict)


def _expert_param_indices(model: nn.Module,
                          optimizer: Optimizer) -> dict[int, tuple[nn.Parameter, ExpertParallelMoELayer]]:
    """``optimizer.state_dict()`` index of every expert parameter -> (the parameter, its layer).

    The indices number the parameters of all param groups in order, as ``state_dict`` does; the
    sharded model's parameters keep the unsharded model's order, so the indices are the same."""
    owner = {id(p): layer for _, layer in expert_parallel_layers(model) for p in layer.experts.parameters()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return {i: (p, owner[id(p)]) for i, p in enumerate(params) if id(p) in owner}


@torch.no_grad()
def gather_optimizer_state(model: nn.Module, optimizer: Optimizer) -> dict:
    """``optimizer.state_dict()`` of the unsharded model, on every rank.

    An expert parameter's state tensors shaped like its shard (Adam's moments) are all-gathered
    along the expert dim; the rest (``step``, the param groups) is the same on every rank and kept.
    Every rank must hold state for the same parameters (``data_parallel_grads`` sees to it).
    """
    full = optimizer.state_dict()
    state = dict(full["state"])
    for index, (param, layer) in sorted(_expert_param_indices(model, optimizer).items()):
        if index in state:
            state[index] = {name: _all_gather(value, layer) if _is_shard_shaped(value, param) else value
                            for name, value in state[index].items()}
    return {**full, "state": state}


@torch.no_grad()
def load_full_optimizer_state(model: nn.Module, optimizer: Optimizer, full_state: dict) -> None:
    """Load an unsharded optimizer state dict (``gather_optimizer_state``, or one process's) into
    the optimizer of a sharded model, keeping this rank's experts. Purely local (no collective)."""
    state = dict(full_state["state"])
    for index, (param, layer) in _expert_param_indices(model, optimizer).items():
        if index in state:
            state[index] = {name: _local_experts(value, param, layer, f"optimizer state {name!r} of parameter {index}")
                            for name, value in state[index].items()}
    optimizer.load_state_dict({**full_state, "state": state})


def _is_shard_shaped(value: object, param: nn.Parameter) -> bool:
    return torch.is_tensor(value) and value.shape == param.shape


def _all_gather(shard: torch.Tensor, layer: ExpertParallelMoELayer) -> torch.Tensor:
    pieces = [torch.empty_like(shard) for _ in range(layer.ep.world)]
    dist.all_gather(pieces, shard.contiguous(), group=layer.ep.group)
    return torch.cat(pieces)


def _local_experts(value: object, param: nn.Parameter, layer: ExpertParallelMoELayer, what: str) -> object:
    """This rank's experts of a per-expert state tensor ``(E, ...)``; anything else as it is."""
    if not (torch.is_tensor(value) and value.dim() == param.dim() and value.shape[1:] == param.shape[1:]):
        return value
    total = layer.ep.placement.num_experts
    if value.shape[0] != total:
        raise ValueError(f"{what} holds {value.shape[0]} experts, the model has {total}")
    return value[layer.ep.first : layer.ep.first + layer.ep.num_local]
