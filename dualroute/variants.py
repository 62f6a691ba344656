"""Named router variants: the routing recipes of well-known MoE papers, as MoEConfig keyword sets.

Each variant is a function returning the MoEConfig fields that define its routing (how experts
are scored, picked and weighted; K and groups where the recipe fixes them). Sizes, expert kind,
capacity and balance-loss weights stay the caller's: ``router_variant(name, **fields)`` merges
them and builds the ``MoEConfig``. A field that a variant sets may be passed only where the
variant takes it as a parameter (``mixtral(experts_per_token=...)``); passing one it fixes
(``switch`` with ``experts_per_token=2``) is a ValueError.

======================  ============================================================================
``seed``                the seed paper's dense soft mixture: ``y = sum_i softmax(W x + b)_i f_i(x)``
                        (K = E, weights not renormalised, router bias)
``mixtral``             softmax over all E, top-K, renormalised (= softmax over the top-K logits),
                        no router bias (Jiang et al. 2024, "Mixtral of Experts")
``switch``              top-1 softmax, weight = the chosen expert's probability, no renormalisation,
                        no router bias (Fedus et al. 2021, "Switch Transformers")
``deepseek_v3``         sigmoid scores, G groups ranked by the sum of their top-2 scores, J kept,
                        top-K among them, selection-only correction bias, weights renormalised and
                        scaled, no router bias (DeepSeek-AI 2024, "DeepSeek-V3")
``expert_choice``       every expert takes its top C = ceil(capacity_factor T K / E) tokens
                        (Zhou et al. 2022); not causal, see ``expert_choice.py``
======================  ============================================================================
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from .layer import MoEConfig
from .routing import RouterOptions


def seed(num_experts: int = 8) -> dict:
    return dict(num_experts=num_experts, experts_per_token=num_experts, num_groups=1, groups_per_token=1,
                router=RouterOptions(score_func="softmax", bias=True, renormalize=False))


def mixtral(experts_per_token: int = 2) -> dict:
    return dict(experts_per_token=experts_per_token, num_groups=1, groups_per_token=1,
                router=RouterOptions(score_func="softmax", bias=False, renormalize=True))


def switch() -> dict:
    return dict(experts_per_token=1, num_groups=1, groups_per_token=1,
                router=RouterOptions(score_func="softmax", bias=False, renormalize=False))


def deepseek_v3(num_groups: int = 8, groups_per_token: int = 4, experts_per_token: int = 8,
                scaling_factor: float = 2.5) -> dict:
    """Defaults are DeepSeek-V3's (E = 256 there); pass smaller sizes for smaller layers."""
    options = RouterOptions(group_router="derived", group_score="top2_sum", score_func="sigmoid", bias=False,
                            renormalize=True, scaling_factor=scaling_factor, correction_bias=True)
    return dict(num_groups=num_groups, groups_per_token=groups_per_token, experts_per_token=experts_per_token,
                router=options)


def expert_choice(experts_per_token: int = 2, capacity_factor: float = 1.0) -> dict:
    """``experts_per_token`` is the average number of experts per token: it sets C, not a per-token count."""
    return dict(experts_per_token=experts_per_token, capacity_factor=capacity_factor, num_groups=1,
                groups_per_token=1, routing_mode="expert_choice",
                router=RouterOptions(score_func="softmax", bias=False, renormalize=False))


VARIANTS: dict[str, Callable[..., dict]] = {
    "seed": seed,
    "mixtral": mixtral,
    "switch": switch,
    "deepseek_v3": deepseek_v3,
    "expert_choice": expert_choice,
}


def variant_fields(name: str, **fields) -> dict:
    """The MoEConfig keyword set of variant ``name`` merged with the caller's ``fields``."""
    if name not in VARIANTS:
        raise ValueError(f"unknown router variant {name!r}; expected one of {sorted(VARIANTS)}")
    make = VARIANTS[name]
    takes = inspect.signature(make).parameters
    fixed = make(**{k: v for k, v in fields.items() if k in takes})
    clash = sorted(k for k in fields if k in fixed and k not in takes)
    if clash:
        params = f"only {sorted(takes)}" if takes else "none"
        raise ValueError(f"router variant {name!r} sets {clash} itself; variant parameters: {params}")
    rest = {k: v for k, v in fields.items() if k not in takes or k in MoEConfig.__dataclass_fields__}
    return {**rest, **fixed}


def router_variant(name: str, **fields) -> MoEConfig:
    """``router_variant("mixtral", dim=64, hidden=128, num_experts=8)`` -> a validated MoEConfig."""
    return MoEConfig(**variant_fields(name, **fields))
