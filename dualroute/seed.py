"""The seed paper's ``DualLayerRoutingModel`` as a special case of ``MoELayer``.

The seed's model is a router ``p = softmax(W_r x + b_r)`` and E linear experts
``y_i = W_i x + c_i``, mixed densely: ``y = sum_i p_i y_i``. That is ``MoELayer`` with
K = E (every expert selected), no renormalisation, linear experts with a bias, and a router
bias. Its ``state_dict`` keys are ``router.fc.weight``, ``router.fc.bias``,
``experts.{i}.fc.weight`` and ``experts.{i}.fc.bias``.

Note: the seed's listing writes ``probs[i] * self.experts[i](x)``, which for a batch indexes
row ``i`` of ``probs`` rather than expert ``i``'s column; the text around it (and section 4.3's
formula) mean the per-expert weight ``probs[:, i]``, which is what this reproduces.
"""

from __future__ import annotations

import torch

from .layer import MoEConfig, MoELayer
from .routing import RouterOptions


def seed_config(input_dim: int, output_dim: int, num_experts: int) -> MoEConfig:
    """The ``MoEConfig`` equal to ``DualLayerRoutingModel(input_dim, output_dim, num_experts)``."""
    return MoEConfig(
        dim=input_dim,
        hidden=1,  # unused by linear experts
        num_experts=num_experts,
        experts_per_token=num_experts,
        expert_kind="linear",
        expert_bias=True,
        out_dim=output_dim,
        router=RouterOptions(renormalize=False, bias=True),
    )


def load_seed_state_dict(layer: MoELayer, state_dict: dict[str, torch.Tensor]) -> None:
    """Copy a seed ``DualLayerRoutingModel`` state_dict into ``layer`` (built from ``seed_config``)."""
    E = layer.cfg.num_experts
    expected = {"router.fc.weight", "router.fc.bias"}
    expected |= {f"experts.{i}.fc.{p}" for i in range(E) for p in ("weight", "bias")}
    missing, extra = expected - set(state_dict), set(state_dict) - expected
    if missing or extra:
        raise ValueError(f"not a seed state_dict for {E} experts: missing {sorted(missing)}, unexpected {sorted(extra)}")
    if layer.cfg.expert_kind != "linear" or layer.experts.b1 is None or layer.router.gate.bias is None:
        raise ValueError("the layer must be built from seed_config(...) (linear experts with biases, router bias)")
    with torch.no_grad():
        _copy(layer.router.gate.weight, state_dict["router.fc.weight"], "router.fc.weight")
        _copy(layer.router.gate.bias, state_dict["router.fc.bias"], "router.fc.bias")
        for i in range(E):
            _copy(layer.experts.w1[i], state_dict[f"experts.{i}.fc.weight"].T, f"experts.{i}.fc.weight (transposed)")
            _copy(layer.experts.b1[i], state_dict[f"experts.{i}.fc.bias"], f"experts.{i}.fc.bias")


def _copy(dst: torch.Tensor, src: torch.Tensor, name: str) -> None:
    if dst.shape != src.shape:
        raise ValueError(f"{name}: expected shape {tuple(dst.shape)}, got {tuple(src.shape)}")
    dst.copy_(src)
