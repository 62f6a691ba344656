"""Convolutional experts: an MoE layer that routes whole images (feature maps) to conv blocks.

Shapes: B images, C channels (the layer's ``dim``), H x W feature map, F expert hidden channels,
E experts, G groups, J groups and K experts chosen per image, N = B*K routed images, X = C*H*W.

Each expert is a small residual-branch conv block, ``conv3x3(C -> F) -> act -> conv3x3(F -> C)``
(padding 1, so H x W is kept). ``ConvMoELayer`` is the token layer with one token per image:

* routing: the same two-level ``Router`` (group router, expert router, correction biases, balance
  losses) on the globally average-pooled features ``x_BC``, one decision per image;
* dispatch: the same sort-based plan (``plan_dispatch``, capacities included) over B "tokens"; an image
  is one row of X numbers, so ``dispatch`` / ``combine`` gather and sum whole feature maps;
* experts: ``ConvExperts`` runs expert e's block on its contiguous ``(n_e, C, H, W)`` segment;
* combine: ``y_b = sum_k w_bk f_{e_bk}(x_b)``; the model adds the residual.

The aux result is the token layer's ``MoEAux`` with T = B, so balancing, logging and ``inspect`` work
unchanged. ``ConvFFN`` is the dense twin: one conv block of hidden width K*F, the same multiply-adds per
image as K experts. ``reference.reference_conv_forward`` is the plain per-image loop it is tested against.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .dispatch import combine, dispatch, plan_dispatch
from .experts import ExpertConfig, _activate, _compute_dtype
from .layer import MoEAux, MoEConfig, MoELayer
from .routing import Router, Routing

KERNEL = 3  # every conv of a block: 3x3, stride 1, padding 1


class ConvExperts(nn.Module):
    """E conv blocks with stacked weights; ``forward(x_NCHW, counts_E) -> y_NCHW``.

    Images must be sorted by expert: images ``[offset_e, offset_e + counts_E[e])`` belong to expert ``e``.
    Experts with no images are never computed.
    """

    def __init__(self, cfg: ExpertConfig) -> None:
        super().__init__()
        if cfg.kind != "conv":
            raise ValueError(f"ConvExperts builds expert kind 'conv', got {cfg.kind!r}")
        if cfg.out_dim not in (None, cfg.dim):
            raise ValueError(f"conv experts keep the channel count: out_dim must be None or {cfg.dim}, "
                             f"got {cfg.out_dim!r}")
        self.cfg = cfg
        E, C, Fh = cfg.num_experts, cfg.dim, cfg.hidden
        self.w1_EFCkk = nn.Parameter(torch.empty(E, Fh, C, KERNEL, KERNEL))
        self.w2_ECFkk = nn.Parameter(torch.empty(E, C, Fh, KERNEL, KERNEL))
        self.b1_EF = nn.Parameter(torch.empty(E, Fh)) if cfg.bias else None
        self.b2_EC = nn.Parameter(torch.empty(E, C)) if cfg.bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Conv2d's default scale: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = in channels * 3 * 3.
        for name, param in self.named_parameters():
            fan_in = (self.cfg.dim if name in ("w1_EFCkk", "b1_EF") else self.cfg.hidden) * KERNEL * KERNEL
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(param, -bound, bound)

    def forward(self, x_NCHW: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """One conv block per non-empty segment (one host read of the counts)."""
        # One unbind per weight: its backward stacks the experts' gradients once (indexing w[e] per expert
        # would fill a zero (E, ...) tensor per expert in backward).
        w1s, w2s = self.w1_EFCkk.unbind(0), self.w2_ECFkk.unbind(0)
        b1s = [None] * len(w1s) if self.b1_EF is None else self.b1_EF.unbind(0)
        b2s = [None] * len(w2s) if self.b2_EC is None else self.b2_EC.unbind(0)
        pieces, start = [], 0
        for e, n in enumerate(counts_E.tolist()):
            if n:
                pieces.append(self._block(x_NCHW[start : start + n], w1s[e], b1s[e], w2s[e], b2s[e]))
                start += n
        return torch.cat(pieces) if pieces else x_NCHW.new_zeros(x_NCHW.shape)

    def forward_one(self, e: int, x_NCHW: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` on every image: the plain definition (reference, dense twin)."""
        b1 = None if self.b1_EF is None else self.b1_EF[e]
        b2 = None if self.b2_EC is None else self.b2_EC[e]
        return self._block(x_NCHW, self.w1_EFCkk[e], b1, self.w2_ECFkk[e], b2)

    def _block(self, x_NCHW, w1_FCkk, b1_F, w2_CFkk, b2_C) -> torch.Tensor:
        x_NCHW, w1_FCkk, b1_F, w2_CFkk, b2_C = _compute_dtype(x_NCHW, w1_FCkk, b1_F, w2_CFkk, b2_C)
        h_NFHW = _activate(F.conv2d(x_NCHW, w1_FCkk, b1_F, padding=KERNEL // 2), self.cfg.activation)
        return F.conv2d(h_NFHW, w2_CFkk, b2_C, padding=KERNEL // 2)

    def macs_per_pixel(self) -> int:
        """Multiply-adds per pixel of one expert's block, both convs (weights only)."""
        return 2 * self.cfg.dim * self.cfg.hidden * KERNEL * KERNEL


class ConvFFN(nn.Module):
    """One dense conv block (a single-expert stack): the non-MoE blocks and the dense twin."""

    def __init__(self, channels: int, hidden: int, activation: str = "gelu", bias: bool = False) -> None:
        super().__init__()
        self.inner = ConvExperts(ExpertConfig(channels, hidden, 1, "conv", activation, bias))

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        return self.inner.forward_one(0, x_BCHW)


def check_conv_moe(cfg: MoEConfig) -> None:
    """What a conv MoE layer supports of ``MoEConfig``: token-choice routing, no shared experts."""
    if not isinstance(cfg, MoEConfig):
        raise TypeError(f"expected a MoEConfig, got {type(cfg).__name__}")
    if cfg.expert_kind != "conv":
        raise ValueError(f"ConvMoELayer needs expert_kind='conv', got {cfg.expert_kind!r}")
    if cfg.routing_mode != "token_choice":
        raise ValueError(f"conv experts support routing_mode 'token_choice' only, got {cfg.routing_mode!r}")
    if cfg.num_shared_experts or cfg.shared_gate or cfg.shared_hidden is not None:
        raise ValueError(f"conv experts have no shared experts (num_shared_experts={cfg.num_shared_experts}, "
                         f"shared_gate={cfg.shared_gate}, shared_hidden={cfg.shared_hidden})")
    if cfg.out_dim not in (None, cfg.dim):
        raise ValueError(f"conv experts keep the channel count: out_dim must be None or {cfg.dim}, got {cfg.out_dim}")


class ConvMoELayer(MoELayer):
    """``forward(x_BCHW, mask_B=None) -> (y_BCHW, aux)``: each image to its K conv experts among J groups.

    A ``MoELayer`` whose tokens are images (``cfg.dim`` = channels C): it shares the router, the dispatch
    plan, capacities and the aux result (``make_aux``), so code that finds MoE layers by type (parameter
    and FLOP counts, balancing, inspection) sees it as one. ``mask_B`` (bool, True = real image) keeps
    padding images out of the statistics and balance losses.
    """

    def __init__(self, cfg: MoEConfig) -> None:
        check_conv_moe(cfg)
        nn.Module.__init__(self)  # not MoELayer.__init__: its experts are token FFNs
        self.cfg = cfg
        self.router = Router(cfg.router_config())
        self.experts = ConvExperts(cfg.expert_config())
        self.shared = None

    def forward(self, x_BCHW: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, MoEAux]:
        self._check_input(x_BCHW)
        pooled_BC = x_BCHW.mean(dim=(2, 3))  # what the router sees: one vector per image
        mask_B = self._flatten_mask(mask, pooled_BC)
        return self.route_and_compute(x_BCHW, self.router(pooled_BC), mask_B)

    def route_and_compute(self, x_BCHW: torch.Tensor, routing: Routing, mask_B: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, MoEAux]:
        """Dispatch whole images, run each expert on its images, combine; for a routing decided elsewhere."""
        cfg = self.cfg
        B, C, H, W = x_BCHW.shape
        capacity, group_capacity = self._capacities(B)
        plan = plan_dispatch(routing.expert_ids_TK, routing.weights_TK, cfg.num_experts, capacity,
                             group_capacity, cfg.num_groups)
        x_NX = dispatch(x_BCHW.reshape(B, C * H * W), plan)
        if capacity is not None or group_capacity is not None:  # dropped images sit at the end: skip them
            x_NX = x_NX[: plan.num_rows - int(plan.dropped_E.sum())]
        y_NCHW = self.experts(x_NX.view(x_NX.shape[0], C, H, W), plan.counts_E)
        y_BX = combine(y_NCHW.reshape(y_NCHW.shape[0], C * H * W), routing.weights_TK, plan)
        load_E = plan.counts_E + plan.dropped_E if mask_B is None else None  # the plan already counted
        return y_BX.view(B, C, H, W), self.make_aux(routing, plan.dropped_E, mask_B, load_E)

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"ConvMoELayer expects a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"ConvMoELayer expects a floating-point tensor, got dtype {x.dtype}")
        if x.dim() != 4 or x.shape[1] != self.cfg.dim:
            raise ValueError(f"expected feature maps of shape (B, {self.cfg.dim}, H, W), got {tuple(x.shape)}")
