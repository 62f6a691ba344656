"""Drop-in mode: swap the MoE blocks inside a loaded transformers model for dualroute ``MoELayer``s.

The rest of the model (attention, caches, ``generate``, losses) stays transformers' own; each MoE
block becomes an ``HFMoEAdapter`` holding a ``MoELayer`` with the block's weights and returning what
the block returned (the hidden states; in transformers 4.x also the router logits). In transformers 5
router logits are collected by hooks on the router module; the adapter feeds its logits through a
stand-in of that router class carrying the same hooks, so ``output_router_logits`` keeps working.
"""

from __future__ import annotations

import torch
from torch import nn

from ..balance import BalanceConfig
from ..layer import MoELayer
from .hf_config import SUPPORTED_MODEL_TYPES, arch_from_hf
from .weights import DictSource, _Taker, read_moe

HF_INSTALL_HINT = 'this needs transformers: pip install "dualroute[hf]"'
_BLOCK_CLASSES = {
    "mixtral": "MixtralSparseMoeBlock",
    "qwen2_moe": "Qwen2MoeSparseMoeBlock",
    "deepseek_v3": "DeepseekV3MoE",
    "olmoe": "OlmoeSparseMoeBlock",
}


def require_transformers():
    try:
        import transformers
    except ImportError as e:
        raise ImportError(HF_INSTALL_HINT) from e
    return transformers


class HFMoEAdapter(nn.Module):
    """``forward(hidden_states) -> hidden_states`` (or ``(hidden_states, router_logits)``), by a ``MoELayer``."""

    def __init__(self, moe: MoELayer, returns_logits: bool, tap: nn.Module | None) -> None:
        super().__init__()
        self.moe = moe
        self.returns_logits = returns_logits
        self.router_tap = tap

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        y, aux = self.moe(hidden_states)
        logits_TE = aux.routing.expert_logits_TE
        if self.router_tap is not None:
            self.router_tap(logits_TE)
        return (y, logits_TE) if self.returns_logits else y


def swap_moe_blocks(hf_model: nn.Module, *, balance: BalanceConfig | None = None) -> list[str]:
    """Replace every MoE block of a Mixtral / Qwen2-MoE / DeepSeek-V3 / OLMoE transformers model in place.

    Returns the names of the replaced modules. The new layers copy the block weights (dualroute's
    stacked layout), on the block's device and dtype, routers in float32; the model keeps its mode.
    """
    require_transformers()
    config = getattr(hf_model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    arch = arch_from_hf(config.to_dict(), balance, source=f"{type(hf_model).__name__}.config")
    blocks = [(name, m) for name, m in hf_model.named_modules() if type(m).__name__ == _BLOCK_CLASSES[model_type]]
    for name, block in blocks:
        parent_name, _, child = name.rpartition(".")
        parent = hf_model.get_submodule(parent_name) if parent_name else hf_model
        setattr(parent, child, _adapter(block, arch.moe, model_type, name))
    return [name for name, _ in blocks]


def _adapter(block: nn.Module, cfg, model_type: str, name: str) -> HFMoEAdapter:
    weight = next(p for n, p in block.named_parameters() if "experts" in n)
    source = DictSource(dict(block.state_dict()), f"{name} ({type(block).__name__})")
    taker = _Taker(source, "the model config")
    state = read_moe(taker, "", cfg, model_type)
    taker.check_all_used()
    with torch.device("meta"):
        moe = MoELayer(cfg)
    moe.load_state_dict({k: v.to(weight.device, torch.float32 if k.startswith("router.") else weight.dtype)
                         for k, v in state.items()}, strict=True, assign=True)
    gate = getattr(block, "gate", None)
    legacy = isinstance(gate, nn.Linear)  # transformers 4.x: the block itself returns the router logits
    returns_logits = legacy and model_type != "deepseek_v3"
    adapter = HFMoEAdapter(moe, returns_logits, None if legacy or gate is None else _tap_like(gate))
    return adapter.train(block.training)


def _tap_like(router: nn.Module) -> nn.Module:
    """An instance of ``router``'s class that only passes logits through, with ``router``'s forward hooks."""
    cls = type(router)
    tap_cls = type(f"{cls.__name__}LogitsTap", (cls,), {
        "__init__": lambda self: nn.Module.__init__(self),
        "forward": lambda self, logits: (logits,),
    })
    tap = tap_cls()
    tap._forward_hooks.update(router._forward_hooks)
    return tap
