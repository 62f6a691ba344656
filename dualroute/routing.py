"""Routers: score groups (level 1) and experts (level 2), pick the top ones.

Shapes: T tokens, D model dim, G groups, M experts per group, E = G*M experts,
J groups kept per token, K experts kept per token.

Two kinds of level-1 router:

* ``learned`` (Shazeer et al. 2017, hierarchical MoE): the group router has its own
  weights, ``p(g) = softmax(W_g x + b_g)``; the expert router scores experts inside
  each group, ``p(i|g) = softmax_{i in g}(W_r x + b_r)`` (or a sigmoid). Expert ``i``
  of group ``g`` weighs ``p(g) * p(i|g)``; the K best of the J kept groups are used.
* ``derived`` (DeepSeek-V2/V3 group-limited routing): expert scores
  ``s = softmax|sigmoid(W_r x + b_r)`` over all E; a group's score is computed from its
  experts' scores (sum of the top two, or the max); experts outside the J best groups
  are masked and the K best remaining experts are used with weight ``s_i``.

With G = 1 both reduce to flat top-k routing; with K = E (and J = G) every expert is
used, which is the seed's dense soft mixture ``y = sum_i p_i f_i(x)``.

Ties, at both levels and on every device: among equal scores the lowest index wins (``top_indices``),
and the K kept experts are listed best first, equal scores in index order. Ties are between equal computed
values: on the CPU two equal tokens need not get bit-equal logits from a matmul, nor bit-equal sigmoid scores
(PyTorch's vectorised sigmoid and its scalar remainder round differently), so their rows may not tie.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .config_types import check_field_types

GroupRouterKind = Literal["learned", "derived"]
GroupScore = Literal["top2_sum", "max", "sum"]
ScoreFunc = Literal["softmax", "sigmoid"]


@dataclass(frozen=True)
class RouterOptions:
    """How the router scores and weighs; sizes live in ``RouterConfig``."""

    group_router: GroupRouterKind = "learned"
    group_score: GroupScore = "top2_sum"  # derived kind only
    score_func: ScoreFunc = "softmax"
    bias: bool = True  # the seed's router is softmax(W_r x + b_r)
    renormalize: bool = True  # rescale the K kept weights to sum to 1
    scaling_factor: float = 1.0  # multiplies the routed weights (DeepSeek routed_scaling_factor)
    correction_bias: bool = False  # selection-only bias buffers (DeepSeek-V3)
    noisy_gating: bool = False  # Shazeer 2017 learned Gaussian noise on logits, training only
    jitter_eps: float = 0.0  # Switch input jitter x * U(1-eps, 1+eps), training only
    check_finite: bool = True  # raise on NaN/Inf router logits instead of routing garbage

    def __post_init__(self) -> None:
        check_field_types(self)
        _check_choice("group_router", self.group_router, ("learned", "derived"))
        _check_choice("group_score", self.group_score, ("top2_sum", "max", "sum"))
        _check_choice("score_func", self.score_func, ("softmax", "sigmoid"))
        if not isinstance(self.scaling_factor, (int, float)) or not math.isfinite(self.scaling_factor) \
                or self.scaling_factor <= 0:
            raise ValueError(f"scaling_factor must be finite and > 0, got {self.scaling_factor!r}")
        if not isinstance(self.jitter_eps, (int, float)) or not (0.0 <= self.jitter_eps < 1.0):
            raise ValueError(f"jitter_eps must be in [0, 1), got {self.jitter_eps!r}")


@dataclass(frozen=True)
class RouterConfig:
    """Sizes of the two routing levels plus the options. Validated on construction."""

    dim: int  # D
    num_experts: int  # E
    experts_per_token: int = 2  # K
    num_groups: int = 1  # G
    groups_per_token: int = 1  # J
    options: RouterOptions = field(default_factory=lambda: RouterOptions())

    def __post_init__(self) -> None:
        check_field_types(self)
        for name in ("dim", "num_experts", "experts_per_token", "num_groups", "groups_per_token"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        E, G, J, K = self.num_experts, self.num_groups, self.groups_per_token, self.experts_per_token
        if E % G != 0:
            raise ValueError(f"num_experts ({E}) must be divisible by num_groups ({G})")
        if J > G:
            raise ValueError(f"groups_per_token ({J}) must be <= num_groups ({G})")
        if K > J * (E // G):
            raise ValueError(
                f"experts_per_token ({K}) must be <= groups_per_token * experts_per_group "
                f"({J} * {E // G} = {J * (E // G)})"
            )
        if not isinstance(self.options, RouterOptions):
            raise TypeError(f"options must be a RouterOptions, got {type(self.options).__name__}")
        opt = self.options
        if opt.group_router == "derived" and opt.group_score == "top2_sum" and G > 1 and E // G < 2:
            raise ValueError("group_score 'top2_sum' needs at least 2 experts per group")

    @property
    def experts_per_group(self) -> int:
        return self.num_experts // self.num_groups


def _check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; expected one of {allowed}")


@dataclass(frozen=True)
class Routing:
    """What the router decided for T tokens, in the routing dtype (float32, or float64).

    ``weights_TK`` are the combine weights (after renormalisation and scaling);
    ``scores_TE`` the full per-expert probabilities the weights were taken from
    (``p(g) p(i|g)`` for the learned kind), used by balance losses.
    """

    expert_ids_TK: torch.Tensor  # int64
    weights_TK: torch.Tensor  # float32
    group_ids_TJ: torch.Tensor  # int64
    expert_logits_TE: torch.Tensor
    scores_TE: torch.Tensor
    group_logits_TG: torch.Tensor | None  # learned kind only
    group_scores_TG: torch.Tensor  # p(g) (learned) or the derived group score (what groups are ranked by)

    @property
    def probs_TE(self) -> torch.Tensor:
        """Per-token distribution over experts (scores normalised to sum to 1), for balance losses."""
        return _normalise(self.scores_TE)

    @property
    def group_probs_TG(self) -> torch.Tensor:
        """Per-token distribution over groups: p(g), or the experts' probabilities summed per group."""
        T, E = self.scores_TE.shape
        G = self.group_scores_TG.shape[-1]
        return self.probs_TE.view(T, G, E // G).sum(-1)  # E // G, not -1: T may be 0


class Router(nn.Module):
    """Two-level top-k router. ``forward(x_TD) -> Routing``; routing math runs in float32."""

    def __init__(self, cfg: RouterConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.opt = opt = cfg.options
        self.gate = nn.Linear(cfg.dim, cfg.num_experts, bias=opt.bias)
        learned_groups = opt.group_router == "learned" and cfg.num_groups > 1
        self.group_gate = nn.Linear(cfg.dim, cfg.num_groups, bias=opt.bias) if learned_groups else None
        self.noise = nn.Linear(cfg.dim, cfg.num_experts, bias=False) if opt.noisy_gating else None
        if self.noise is not None:
            nn.init.zeros_(self.noise.weight)
        if opt.correction_bias:
            self.register_buffer("expert_bias_E", torch.zeros(cfg.num_experts))
            self.register_buffer("group_bias_G", torch.zeros(cfg.num_groups))
        else:
            self.expert_bias_E = None
            self.group_bias_G = None

    def forward(self, x_TD: torch.Tensor) -> Routing:
        opt = self.opt
        device_type = x_TD.device.type  # entering autocast costs more than the router at one token: only if on
        with torch.autocast(device_type, enabled=False) if torch.is_autocast_enabled(device_type) else _NO_CONTEXT:
            x_TD = x_TD.to(routing_dtype(x_TD.dtype))
            if self.training and opt.jitter_eps > 0:
                x_TD = x_TD * torch.empty_like(x_TD).uniform_(1 - opt.jitter_eps, 1 + opt.jitter_eps)
            logits_TE, group_logits_TG = self._logits(x_TD)
            if self.noise is not None and self.training:
                logits_TE = logits_TE + torch.randn_like(logits_TE) * F.softplus(_router_linear(x_TD, self.noise))
            if opt.check_finite:
                _check_finite(logits_TE, group_logits_TG)
            if opt.group_router == "learned":
                return self._route_learned(logits_TE, group_logits_TG)
            return self._route_derived(logits_TE)

    def _logits(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.group_gate is None:
            return _router_linear(x_TD, self.gate), None
        # Both levels in one matmul (and one in backward for each of x and W): at small widths the
        # per-call cost of a (T, D) x (D, E) product is comparable to its arithmetic.
        weight = torch.cat([self.gate.weight, self.group_gate.weight]).to(x_TD.dtype)
        bias = None if self.gate.bias is None else torch.cat([self.gate.bias, self.group_gate.bias]).to(x_TD.dtype)
        logits_TX = F.linear(x_TD, weight, bias)
        return logits_TX[:, : self.cfg.num_experts], logits_TX[:, self.cfg.num_experts :]

    def _route_learned(self, logits_TE: torch.Tensor, group_logits_TG: torch.Tensor | None) -> Routing:
        cfg = self.cfg
        T, G, M = logits_TE.shape[0], cfg.num_groups, cfg.experts_per_group
        if group_logits_TG is None:  # one group (flat top-k): p(g) = 1, the group is always kept
            group_scores_TG = logits_TE.new_ones(T, 1)
            group_ids_TJ = torch.zeros(T, 1, dtype=torch.int64, device=logits_TE.device)
            scores_TE = _score(logits_TE, self.opt.score_func)
            return self._pick_experts(logits_TE, scores_TE, group_ids_TJ, None, group_scores_TG)
        within_TGM = _score(logits_TE.view(T, G, M), self.opt.score_func)  # p(i|g)
        group_scores_TG = group_logits_TG.softmax(dim=-1)
        scores_TE = (group_scores_TG.unsqueeze(-1) * within_TGM).reshape(T, G * M)
        group_ids_TJ = _top_groups(group_scores_TG, self.group_bias_G, cfg.groups_per_token)
        return self._pick_experts(logits_TE, scores_TE, group_ids_TJ, group_logits_TG, group_scores_TG)

    def _route_derived(self, logits_TE: torch.Tensor) -> Routing:
        cfg = self.cfg
        T, G, M = logits_TE.shape[0], cfg.num_groups, cfg.experts_per_group
        scores_TE = _score(logits_TE, self.opt.score_func)
        choice_TGM = self._selection_scores(scores_TE).detach().view(T, G, M)
        if self.opt.group_score == "top2_sum" and M >= 2:
            group_scores_TG = choice_TGM.topk(2, dim=-1).values.sum(-1)
        elif self.opt.group_score == "sum":
            group_scores_TG = choice_TGM.sum(-1)
        else:
            group_scores_TG = choice_TGM.amax(-1)
        group_ids_TJ = _top_groups(group_scores_TG, self.group_bias_G, cfg.groups_per_token)
        return self._pick_experts(logits_TE, scores_TE, group_ids_TJ, None, group_scores_TG)

    def _selection_scores(self, scores_TE: torch.Tensor) -> torch.Tensor:
        return scores_TE if self.expert_bias_E is None else scores_TE + self.expert_bias_E

    def _pick_experts(self, logits_TE, scores_TE, group_ids_TJ, group_logits_TG, group_scores_TG) -> Routing:
        cfg = self.cfg
        T, G, M = scores_TE.shape[0], cfg.num_groups, cfg.experts_per_group
        choice_TE = self._selection_scores(scores_TE).detach()
        if cfg.groups_per_token < G:  # hide experts of groups that were not kept
            keep_TG = torch.zeros(T, G, dtype=torch.bool, device=scores_TE.device)
            keep_TG.scatter_(1, group_ids_TJ, True)
            keep_TE = keep_TG.unsqueeze(-1).expand(T, G, M).reshape(T, G * M)
            choice_TE = choice_TE.masked_fill(~keep_TE, float("-inf"))
        expert_ids_TK = top_indices(choice_TE, cfg.experts_per_token)
        weights_TK = scores_TE.gather(1, expert_ids_TK)
        if self.opt.renormalize:
            weights_TK = weights_TK / (weights_TK.sum(-1, keepdim=True) + 1e-20)
        if self.opt.scaling_factor != 1.0:
            weights_TK = weights_TK * self.opt.scaling_factor
        return Routing(
            expert_ids_TK=expert_ids_TK,
            weights_TK=weights_TK,
            group_ids_TJ=group_ids_TJ,
            expert_logits_TE=logits_TE,
            scores_TE=scores_TE,
            group_logits_TG=group_logits_TG,
            group_scores_TG=group_scores_TG,
        )


_NO_CONTEXT = contextlib.nullcontext()


def routing_dtype(dtype: torch.dtype) -> torch.dtype:
    """Routing math runs in float32 (float64 for float64 inputs), whatever autocast says."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _router_linear(x_TD: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    bias = None if linear.bias is None else linear.bias.to(x_TD.dtype)
    return F.linear(x_TD, linear.weight.to(x_TD.dtype), bias)


def _normalise(scores_TE: torch.Tensor) -> torch.Tensor:
    return scores_TE / scores_TE.sum(-1, keepdim=True).clamp(min=1e-20)


def _score(logits: torch.Tensor, score_func: str) -> torch.Tensor:
    return logits.softmax(dim=-1) if score_func == "softmax" else logits.sigmoid()


def _top_groups(group_scores_TG: torch.Tensor, group_bias_G: torch.Tensor | None, J: int) -> torch.Tensor:
    choice_TG = group_scores_TG.detach()
    if group_bias_G is not None:
        choice_TG = choice_TG + group_bias_G
    return top_indices(choice_TG, J)


# From this many float32 scores, ``top_indices`` runs topk on a tie-free int64 key; below it (decoding a few
# tokens) and in float64, a stable sort, whose cost grows faster but which is one call instead of a handful.
# Router forward + backward at T=4096, D=512, E in {8, 64}, against plain topk (CPU, in-process A/B): the key
# within noise (-5% to +9%), the sort +2% to +23%; at T=1 the sort +2% to +32%, the key +40% to +90%.
TIE_FREE_KEY_MIN_NUMEL = 8192


def top_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest scores along the last dim, largest first; equal scores: the lowest index first.

    ``torch.topk`` promises no order among equal values (a zeroed router, a float32 sigmoid saturated at 1.0),
    and its choice differs between devices and versions. Both ways here follow the one rule on every device.
    """
    if scores.dtype == torch.float32 and scores.numel() >= TIE_FREE_KEY_MIN_NUMEL:
        return _tie_free_key(scores).topk(k, dim=-1).indices
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]


def _tie_free_key(scores: torch.Tensor) -> torch.Tensor:
    """int64 keys, one per float32 score, in the scores' order and then lower index first: ``bits * n - index``
    where ``bits`` is the score's int32 pattern made monotonic (a negative float's magnitude bits flipped)."""
    bits = (scores + 0.0).view(torch.int32).to(torch.int64)  # + 0.0: -0.0 becomes 0.0, so the two tie
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    n = scores.shape[-1]
    return bits * n - torch.arange(n, device=scores.device)


# Device types where reading a number back costs no synchronisation, so routers check their logits
# at once even inside ``deferred_finite_checks`` (the error then comes before any more work is done).
IMMEDIATE_CHECK_DEVICE_TYPES: tuple[str, ...] = ("cpu",)

_pending = threading.local()


@contextlib.contextmanager
def deferred_finite_checks() -> Iterator[None]:
    """Routers called inside keep their NaN/Inf check on the device; one host read at the end checks them all.

    A router's finite check reads one number back per layer; on a GPU each read waits for all queued
    work, which dominates decoding a token at a time. The models run their blocks inside this context,
    so a forward pass makes one such read instead of one per MoE layer, and still raises the same
    ``ValueError`` (naming the layer) before returning anything computed from the bad logits. On
    ``IMMEDIATE_CHECK_DEVICE_TYPES`` (the CPU) routers check at once as outside it. Contexts nest.
    """
    outer = getattr(_pending, "flags", None)
    _pending.flags = flags = []
    try:
        yield
    finally:
        _pending.flags = outer
    if flags and bool(torch.stack(flags).any()):
        layer = int(torch.stack(flags).int().argmax())
        raise ValueError(
            f"router logits of the MoE layer run {_ordinal(layer)} in this forward pass contain NaN or Inf "
            "(check the layer input and the router weights for non-finite values)"
        )


def _ordinal(i: int) -> str:
    n = i + 1
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _check_finite(logits_TE: torch.Tensor, group_logits_TG: torch.Tensor | None) -> None:
    # A NaN logit makes the selection return arbitrary experts; stop here with a clear message.
    # One reduction and one host read per layer (set check_finite=False to skip it; inside
    # deferred_finite_checks the read is shared by all layers). The largest magnitude is NaN or Inf exactly
    # when some logit is (max propagates NaN) and, unlike a sum, cannot overflow on finite logits of 1e36;
    # abs + amax costs two to three times a sum, and a tenth of isfinite().all() at T=4096, on the CPU.
    if logits_TE.numel() == 0:  # no token: nothing to check (amax has no identity)
        return
    largest = logits_TE.abs().amax()
    if group_logits_TG is not None:
        largest = torch.maximum(largest, group_logits_TG.abs().amax())
    flags = getattr(_pending, "flags", None)
    if torch.compiler.is_compiling():
        torch._assert_async(torch.isfinite(largest), "dualroute: router logits contain NaN or Inf")
    elif flags is not None and largest.device.type not in IMMEDIATE_CHECK_DEVICE_TYPES:
        flags.append(~torch.isfinite(largest))
    elif not math.isfinite(largest.item()):
        raise ValueError(
            "router logits contain NaN or Inf (check the layer input and the router weights for "
            "non-finite values)"
        )
