"""The trainer's optimizer: AdamW with the usual no-decay groups, and the rule that keeps a loaded
optimizer state in its parameters' memory layout."""

from __future__ import annotations

import torch
from torch import nn


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float]) -> torch.optim.AdamW:
    """AdamW; norms, biases, embeddings and position/class tokens get no weight decay.

    PyTorch's fused AdamW kernel where the parameters' device and dtype have one (CPU and CUDA, floating
    point): one pass over each parameter instead of a dozen elementwise ops, which matters most for MoE
    models, whose total parameters (all of them updated every step) outnumber the active ones. Elsewhere
    the plain implementation, with the same update rule.
    """
    skip = set()
    for module in model.modules():
        if isinstance(module, (nn.Embedding, nn.RMSNorm, nn.LayerNorm)):
            skip.update(id(p) for p in module.parameters(recurse=False))
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.ndim < 2 or id(p) in skip or "pos_emb" in name or "cls_token" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)
    except (RuntimeError, ValueError):  # a device or dtype without the fused kernel
        return torch.optim.AdamW(groups, lr=lr, betas=betas)


@torch.no_grad()
def match_state_layout(optimizer: torch.optim.Optimizer) -> None:
    """Give every per-parameter state tensor (Adam's moments) its parameter's memory layout.

    A loaded state keeps the layout it was saved or gathered in (an all-gather of expert shards is
    contiguous; routed expert weights are stored out-major), and the fused AdamW kernel walks a
    parameter and its moments as flat memory, so a moment in another layout would be updated against
    the wrong elements. The plain implementation does not care; both get the same values here."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            for name, value in optimizer.state.get(p, {}).items():
                if torch.is_tensor(value) and value.shape == p.shape and value.stride() != p.stride():
                    optimizer.state[p][name] = torch.empty_like(p, dtype=value.dtype).copy_(value)
