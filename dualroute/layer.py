"""The dual-layer routed MoE layer: router -> dispatch -> experts -> combine (+ shared experts).

Shapes: T tokens, D model dim, F expert hidden dim, E experts, G groups, K experts per token.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from .balance import BalanceConfig, aux_losses, weighted_total
from .config_types import check_field_types
from .dispatch import combine, dispatch, expert_capacity, plan_dispatch
from .expert_choice import choose_tokens, expert_choice_capacity, run_experts
from .experts import ExpertConfig, ExpertKind, Experts
from .routing import Router, RouterConfig, RouterOptions, Routing


# Token-choice calls on at most this many routed rows (T * K) run each row's expert directly when nothing
# needs a gradient (``MoELayer._route_direct``), on devices where reading the expert ids back costs no
# synchronisation. At one decoded token the sort-based dispatch is almost all fixed costs (sort, plan,
# gathers, a grouped matmul over mostly empty experts); `dualroute bench generate` times both ways.
DIRECT_MAX_ROWS = 8
DIRECT_DEVICE_TYPES: tuple[str, ...] = ("cpu",)


@dataclass(frozen=True)
class MoEConfig:
    """A dual-layer MoE layer. ``router`` and ``experts`` are built from these fields."""

    dim: int  # D
    hidden: int  # F, per expert
    num_experts: int = 8  # E
    experts_per_token: int = 2  # K
    num_groups: int = 1  # G
    groups_per_token: int = 1  # J
    expert_kind: ExpertKind = "swiglu"
    router: RouterOptions = field(default_factory=RouterOptions)  # scoring, weighting, balancing options
    expert_bias: bool = False
    activation: str = "gelu"
    out_dim: int | None = None
    num_shared_experts: int = 0  # always-on experts, each of width F (DeepSeekMoE / Qwen-MoE)
    shared_gate: bool = False  # Qwen2-MoE: sigmoid(w . x) scales the shared output
    shared_hidden: int | None = None  # total shared width; None = num_shared_experts * F (Qwen2-MoE sets its own)
    capacity_factor: float | None = None  # rows per expert, training; None = dropless
    eval_capacity_factor: float | None = None  # rows per expert, eval; None = dropless
    group_capacity_factor: float | None = None  # rows per group (level 1), training
    eval_group_capacity_factor: float | None = None  # rows per group, eval
    balance: BalanceConfig = field(default_factory=BalanceConfig)  # aux loss weights
    # "expert_choice": each expert takes its top C tokens (Zhou et al. 2022); NOT causal, G = 1 only.
    # C uses capacity_factor in training, eval_capacity_factor (else capacity_factor, else 1.0) in eval.
    routing_mode: Literal["token_choice", "expert_choice"] = "token_choice"

    def __post_init__(self) -> None:
        check_field_types(self)
        # Building the sub-configs validates every field and names the bad value.
        self.router_config()
        self.expert_config()
        if not isinstance(self.num_shared_experts, int) or self.num_shared_experts < 0:
            raise ValueError(f"num_shared_experts must be an int >= 0, got {self.num_shared_experts!r}")
        if self.shared_hidden is not None and (isinstance(self.shared_hidden, bool)
                                               or not isinstance(self.shared_hidden, int) or self.shared_hidden < 1):
            raise ValueError(f"shared_hidden must be None or a positive int, got {self.shared_hidden!r}")
        for name in ("capacity_factor", "eval_capacity_factor", "group_capacity_factor",
                     "eval_group_capacity_factor"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be None (dropless) or a finite number > 0, got {value!r}")
        if self.routing_mode not in ("token_choice", "expert_choice"):
            raise ValueError(f"unknown routing_mode {self.routing_mode!r}; "
                             "expected 'token_choice' or 'expert_choice'")
        if self.routing_mode == "expert_choice" and self.num_groups != 1:
            raise ValueError(f"routing_mode 'expert_choice' supports num_groups=1 only, "
                             f"got num_groups={self.num_groups}")
        if (self.routing_mode == "token_choice" and self.experts_per_token == 1 and self.num_experts > 1
                and self.router.renormalize):
            warnings.warn("experts_per_token=1 with router.renormalize=True weighs every token's expert 1.0, so "
                          "the router gets no gradient from the model's loss (only from balance losses); set "
                          "router.renormalize=False to weigh it by its probability (Switch Transformer)",
                          UserWarning, stacklevel=3)

    @property
    def shared_width(self) -> int:
        """Total width of the always-on shared experts (0 without them)."""
        if not self.num_shared_experts:
            return 0
        return self.num_shared_experts * self.hidden if self.shared_hidden is None else self.shared_hidden

    def router_config(self) -> RouterConfig:
        return RouterConfig(
            dim=self.dim,
            num_experts=self.num_experts,
            experts_per_token=self.experts_per_token,
            num_groups=self.num_groups,
            groups_per_token=self.groups_per_token,
            options=self.router,
        )

    def expert_config(self) -> ExpertConfig:
        return ExpertConfig(
            dim=self.dim,
            hidden=self.hidden,
            num_experts=self.num_experts,
            kind=self.expert_kind,
            activation=self.activation,
            bias=self.expert_bias,
            out_dim=self.out_dim,
        )


@dataclass(frozen=True)
class MoEAux:
    """Everything the layer decided, for losses, balancing and logging. Nothing is kept on the module.

    ``losses`` (the unweighted aux losses whose weight in ``balance`` is > 0) and ``loss`` (0-dim float32:
    the sum of weight * loss, to add to the task loss) are computed from ``routing`` when the layer ran with
    gradients enabled, and otherwise when first read: inference that never reads them never pays for them
    (at one decoded token they were 4-6% of the layer's time). ``given_losses`` replaces the computed ones
    (expert parallelism's losses over every rank's tokens)."""

    routing: Routing
    tokens_per_expert_E: torch.Tensor  # routed rows per expert, before capacity
    tokens_per_group_G: torch.Tensor  # tokens per group (each token counts once per kept group)
    dropped_per_expert_E: torch.Tensor
    num_dropped: torch.Tensor  # 0-dim int64
    balance: BalanceConfig = field(default_factory=BalanceConfig)  # which losses, and their weights
    mask_T: torch.Tensor | None = None  # the real-token mask the layer was given (None: every row is real)
    given_losses: dict[str, torch.Tensor] | None = None

    @functools.cached_property
    def losses(self) -> dict[str, torch.Tensor]:
        if self.given_losses is not None:
            return self.given_losses
        return aux_losses(self.routing, self.balance, self.mask_T)

    @functools.cached_property
    def loss(self) -> torch.Tensor:
        return weighted_total(self.losses, self.balance, self.routing.expert_logits_TE)

    def computed(self) -> MoEAux:
        """This aux with its losses computed now if gradients are enabled (they then carry the gradient
        whatever the mode at the time they are read)."""
        if torch.is_grad_enabled():
            self.loss  # noqa: B018 (cached_property: computes and keeps losses and loss)
        return self


class DenseFFN(nn.Module):
    """A dense feed-forward block with the same kinds as the experts (the fair baseline)."""

    def __init__(self, dim: int, hidden: int, kind: ExpertKind = "swiglu", activation: str = "gelu",
                 bias: bool = False, out_dim: int | None = None) -> None:
        super().__init__()
        self.inner = Experts(ExpertConfig(dim, hidden, 1, kind, activation, bias, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner.forward_one(0, x)


class SharedExperts(nn.Module):
    """Always-on experts: one dense block of width ``n * F``, optionally scaled by a sigmoid gate."""

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.ffn = DenseFFN(cfg.dim, cfg.shared_width, cfg.expert_kind, cfg.activation, cfg.expert_bias, cfg.out_dim)
        self.gate = nn.Linear(cfg.dim, 1, bias=False) if cfg.shared_gate else None

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        y_TD = self.ffn(x_TD)
        if self.gate is not None:
            y_TD = torch.sigmoid(self.gate(x_TD)) * y_TD
        return y_TD


class MoELayer(nn.Module):
    """``forward(x_D) -> (y, aux)`` for input of shape ``(..., D)``."""

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.router = Router(cfg.router_config())
        self.experts = Experts(cfg.expert_config())
        self.shared = SharedExperts(cfg) if cfg.num_shared_experts else None

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, MoEAux]:
        """``mask`` (shape ``x.shape[:-1]``, bool, True = real token) keeps padding out of the statistics."""
        x_TD = self._flatten(x)
        mask_T = self._flatten_mask(mask, x)
        routing = self.router(x_TD)
        y_TD, aux = self.route_and_compute(x_TD, routing, mask_T)
        if self.shared is not None:
            y_TD = y_TD + self.shared(x_TD)
        return y_TD.view(*x.shape[:-1], y_TD.shape[-1]), aux

    def route_and_compute(
        self, x_TD: torch.Tensor, routing: Routing, mask_T: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, MoEAux]:
        """Dispatch, run the experts and combine, for a routing decided elsewhere."""
        cfg = self.cfg
        if cfg.routing_mode == "expert_choice":
            return self._expert_choice(x_TD, routing, mask_T)
        capacity, group_capacity = self._capacities(x_TD.shape[0])
        if capacity is None and group_capacity is None and self._runs_rows_directly(x_TD, routing):
            return self._route_direct(x_TD, routing, mask_T)
        plan = plan_dispatch(routing.expert_ids_TK, routing.weights_TK, cfg.num_experts, capacity,
                             group_capacity, cfg.num_groups)
        x_ND = dispatch(x_TD, plan)
        if capacity is not None or group_capacity is not None:  # dropped rows sit at the end: skip them
            x_ND = x_ND[: plan.num_rows - int(plan.dropped_E.sum())]
        y_ND = self.experts(x_ND, plan.counts_E)
        y_TD = combine(y_ND, routing.weights_TK, plan)
        load_E = plan.counts_E + plan.dropped_E if mask_T is None else None  # the plan already counted
        return y_TD, self.make_aux(routing, plan.dropped_E, mask_T, load_E)

    def _runs_rows_directly(self, x_TD: torch.Tensor, routing: Routing) -> bool:
        """Whether ``_route_direct`` serves this call: a few routed rows (none is the dispatch's case),
        nothing needs a gradient, and the expert ids can be read on the host for free
        (``DIRECT_DEVICE_TYPES``); not under torch.compile."""
        if not 0 < routing.expert_ids_TK.numel() <= DIRECT_MAX_ROWS or x_TD.device.type not in DIRECT_DEVICE_TYPES:
            return False
        if torch.compiler.is_compiling():
            return False
        return not (torch.is_grad_enabled() and (x_TD.requires_grad or routing.weights_TK.requires_grad
                                                 or any(p.requires_grad for p in self.experts.parameters())))

    def _route_direct(self, x_TD: torch.Tensor, routing: Routing, mask_T: torch.Tensor | None
                      ) -> tuple[torch.Tensor, MoEAux]:
        """``route_and_compute`` for a handful of rows (decoding a token at a time): each (token, slot) row
        runs its own expert, and the K outputs of a token are summed with their weights. Same result as the
        sort-based dispatch, without its fixed costs (sort, plan, gathers, grouped matmul)."""
        T, K = routing.expert_ids_TK.shape
        rows = [self.experts.forward_one(e, x_TD[t : t + 1])
                for t, ids in enumerate(routing.expert_ids_TK.tolist()) for e in ids]
        y_TKO = torch.cat(rows).view(T, K, -1)
        y_TD = torch.linalg.vecdot(routing.weights_TK.to(y_TKO.dtype).unsqueeze(-1), y_TKO, dim=1)
        dropped_E = torch.zeros(self.cfg.num_experts, dtype=torch.int64, device=x_TD.device)
        return y_TD, self.make_aux(routing, dropped_E, mask_T)

    def make_aux(self, routing: Routing, dropped_E: torch.Tensor, mask_T: torch.Tensor | None,
                 tokens_per_expert_E: torch.Tensor | None = None) -> MoEAux:
        """The aux result of a token-choice routing: loads per level (padding excluded) and losses."""
        cfg = self.cfg
        if tokens_per_expert_E is None:
            tokens_per_expert_E = _bincount(routing.expert_ids_TK, cfg.num_experts, mask_T)
        return MoEAux(
            routing=routing,
            tokens_per_expert_E=tokens_per_expert_E,
            tokens_per_group_G=_bincount(routing.group_ids_TJ, cfg.num_groups, mask_T),
            dropped_per_expert_E=dropped_E,
            num_dropped=dropped_E.sum(),
            balance=cfg.balance,
            mask_T=mask_T,
        ).computed()

    def _expert_choice(
        self, x_TD: torch.Tensor, routing: Routing, mask_T: torch.Tensor | None
    ) -> tuple[torch.Tensor, MoEAux]:
        """Each expert takes its top C tokens (see ``expert_choice.py``); num_dropped = tokens no expert took."""
        cfg = self.cfg
        factor = cfg.eval_capacity_factor if not self.training and cfg.eval_capacity_factor else cfg.capacity_factor
        capacity = expert_choice_capacity(x_TD.shape[0], cfg.experts_per_token, cfg.num_experts, factor)
        choice = choose_tokens(routing, capacity, mask_T, cfg.router.scaling_factor)
        aux = MoEAux(
            routing=choice.routing,
            tokens_per_expert_E=choice.tokens_per_expert_E,
            tokens_per_group_G=choice.tokens_per_group_G,
            dropped_per_expert_E=torch.zeros_like(choice.tokens_per_expert_E),
            num_dropped=choice.num_untaken,
            balance=cfg.balance,
            mask_T=mask_T,
        ).computed()
        return run_experts(self.experts, x_TD, choice), aux

    def _capacities(self, T: int) -> tuple[int | None, int | None]:
        cfg = self.cfg
        K = cfg.experts_per_token
        factor = cfg.capacity_factor if self.training else cfg.eval_capacity_factor
        group_factor = cfg.group_capacity_factor if self.training else cfg.eval_group_capacity_factor
        capacity = None if factor is None else expert_capacity(T, K, cfg.num_experts, factor)
        group_capacity = None if group_factor is None else expert_capacity(T, K, cfg.num_groups, group_factor)
        return capacity, group_capacity

    def _flatten(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"MoELayer expects a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"MoELayer expects a floating-point tensor, got dtype {x.dtype}")
        if x.dim() == 0 or x.shape[-1] != self.cfg.dim:
            raise ValueError(f"expected input of shape (..., {self.cfg.dim}), got {tuple(x.shape)}")
        return x.reshape(-1, self.cfg.dim)

    @staticmethod
    def _flatten_mask(mask: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
        if mask is None:
            return None
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
        if mask.shape != x.shape[:-1]:
            raise ValueError(f"mask shape {tuple(mask.shape)} must equal the input's leading shape {tuple(x.shape[:-1])}")
        return mask.reshape(-1)


def _bincount(ids_TK: torch.Tensor, n: int, mask_T: torch.Tensor | None = None) -> torch.Tensor:
    """How many (token, slot) pairs chose each of ``n`` units, padding excluded."""
    if mask_T is None and ids_TK.device.type == "cpu":  # one call (on a GPU bincount would read its size back)
        return torch.bincount(ids_TK.reshape(-1), minlength=n)
    ones_TK = torch.ones_like(ids_TK)
    if mask_T is not None:
        ones_TK = ones_TK * mask_T.unsqueeze(-1)
    counts = torch.zeros(n, dtype=torch.int64, device=ids_TK.device)
    return counts.scatter_add_(0, ids_TK.reshape(-1), ones_TK.reshape(-1))
