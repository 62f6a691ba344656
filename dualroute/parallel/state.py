"""Checkpoints across world sizes: a sharded model's state as the unsharded model's, and back.

Shapes: E experts, L = E/W experts per rank. A full state dict has the same keys as the
unsharded model's (``...experts.w13`` of shape ``(E, D, 2F)``); a rank's model holds the
``[rank*L, (rank+1)*L)`` slice under the same key. So a checkpoint written from W ranks loads
into one process with plain ``load_state_dict``, and ``load_full_state_dict`` loads any full
checkpoint into a model sharded over any W that divides E.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

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
