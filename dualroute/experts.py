"""Stacked expert weights and the grouped matmul that runs each expert on its own rows.

Shapes: N routed rows sorted by expert, D model dim, F expert hidden dim, O output dim
(= D unless set), E experts. ``counts_E`` holds how many of the sorted rows each expert owns.

Kinds: ``linear`` (the seed's expert, ``x W + b``), ``mlp`` (``act(x W1 + b1) W2 + b2``),
``swiglu`` (``(silu(x W1) * x W3) W2``; W1 and W3 are stored side by side as one
``w13`` so one grouped matmul computes both). A new kind (a convolutional expert, say)
subclasses nothing: it is one more branch in ``Experts.forward`` with its own weights, fed
the same ``(x_ND, counts_E)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

ExpertKind = Literal["linear", "mlp", "swiglu"]
Activation = Literal["gelu", "relu", "silu"]


@dataclass(frozen=True)
class ExpertConfig:
    dim: int  # D
    hidden: int  # F (ignored by the linear kind)
    num_experts: int  # E
    kind: ExpertKind = "swiglu"
    activation: Activation = "gelu"  # mlp kind only
    bias: bool = False
    out_dim: int | None = None  # O; defaults to D

    def __post_init__(self) -> None:
        for name in ("dim", "hidden", "num_experts"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.out_dim is not None and (not isinstance(self.out_dim, int) or self.out_dim < 1):
            raise ValueError(f"out_dim must be a positive int or None, got {self.out_dim!r}")
        if self.kind not in ("linear", "mlp", "swiglu"):
            raise ValueError(f"unknown expert kind {self.kind!r}; expected 'linear', 'mlp' or 'swiglu'")
        if self.activation not in ("gelu", "relu", "silu"):
            raise ValueError(f"unknown activation {self.activation!r}; expected 'gelu', 'relu' or 'silu'")

    @property
    def output_dim(self) -> int:
        return self.dim if self.out_dim is None else self.out_dim


class Experts(nn.Module):
    """E experts with stacked weights; ``forward(x_ND, counts_E) -> y_NO``.

    Rows must be sorted by expert: rows ``[offset_e, offset_e + counts_E[e])`` belong to
    expert ``e``. Experts with no rows are never computed.
    """

    def __init__(self, cfg: ExpertConfig) -> None:
        super().__init__()
        self.cfg = cfg
        E, D, Fh, O = cfg.num_experts, cfg.dim, cfg.hidden, cfg.output_dim
        if cfg.kind == "linear":
            self.w1 = _stacked_weight(E, D, O)
            self.b1 = nn.Parameter(torch.zeros(E, O)) if cfg.bias else None
        else:
            width = 2 * Fh if cfg.kind == "swiglu" else Fh
            name = "w13" if cfg.kind == "swiglu" else "w1"
            self.register_parameter(name, _stacked_weight(E, D, width))
            self.b1 = nn.Parameter(torch.zeros(E, width)) if cfg.bias else None
            self.w2 = _stacked_weight(E, Fh, O)
            self.b2 = nn.Parameter(torch.zeros(E, O)) if cfg.bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Same scale as nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
        for name, param in self.named_parameters():
            fan_in = self.cfg.dim if name in ("w1", "w13", "b1") else self.cfg.hidden
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(param, -bound, bound)

    def first_weight(self) -> torch.Tensor:
        return self.w13 if self.cfg.kind == "swiglu" else self.w1

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        h_NF = grouped_mm(x_ND, self.first_weight(), counts_E, self.b1)
        if self.cfg.kind == "linear":
            return h_NF
        return grouped_mm(self._activate(h_NF), self.w2, counts_E, self.b2)

    def forward_one(self, e: int, x_TD: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` applied to every row: the plain, loop-free definition (for references)."""
        h = x_TD @ self.first_weight()[e]
        if self.b1 is not None:  # cast: under autocast h is in the autocast dtype, as F.linear's would be
            h = h + self.b1[e].to(h.dtype)
        if self.cfg.kind == "linear":
            return h
        y = self._activate(h) @ self.w2[e]
        return y if self.b2 is None else y + self.b2[e].to(y.dtype)

    def _activate(self, h: torch.Tensor) -> torch.Tensor:
        if self.cfg.kind == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            return F.silu(gate) * up
        return _activate(h, self.cfg.activation)


def _stacked_weight(E: int, fan_in: int, fan_out: int) -> nn.Parameter:
    """An ``(E, fan_in, fan_out)`` weight; routed experts (E > 1) store it out-major.

    The shape (what ``state_dict`` and every caller see) is always ``(E, in, out)``. With E > 1
    the memory is ``(E, out, in)``, as ``nn.Linear`` and Hugging Face store theirs: BLAS and
    ``torch._grouped_mm`` run a routed layer's small per-expert products (tens to hundreds of rows)
    faster in this layout (see ``dualroute bench hf`` at T=16-256), and CUDA's grouped GEMM wants
    its second operand column-major. A one-expert stack is a dense FFN (``DenseFFN``, shared
    experts), whose one-token decode product is a matrix-vector product that MKL runs markedly
    faster in-major, so it keeps the plain layout.
    """
    if E == 1:
        return nn.Parameter(torch.empty(E, fan_in, fan_out))
    return nn.Parameter(torch.empty(E, fan_out, fan_in).transpose(1, 2))


def _activate(h: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "gelu":
        return F.gelu(h)
    if activation == "relu":
        return F.relu(h)
    return F.silu(h)


def grouped_mm(
    x_ND: torch.Tensor, w_EDF: torch.Tensor, counts_E: torch.Tensor, b_EF: torch.Tensor | None = None
) -> torch.Tensor:
    """``y[n] = x[n] @ w[e(n)] (+ b[e(n)])`` for rows sorted by expert.

    Uses ``torch._grouped_mm`` where it exists and gives correct results for this device
    and dtype (probed once), else a loop over the contiguous segments. Both skip experts
    that own no rows.
    """
    device_type = x_ND.device.type
    if torch.is_autocast_enabled(device_type):  # behave like F.linear under autocast
        dtype = torch.get_autocast_dtype(device_type)
        x_ND, w_EDF = x_ND.to(dtype), w_EDF.to(dtype)
        b_EF = None if b_EF is None else b_EF.to(dtype)
    elif x_ND.dtype != w_EDF.dtype:
        raise TypeError(f"expert input dtype {x_ND.dtype} does not match expert weights {w_EDF.dtype}")
    # The compiler.disable wrapper costs tens of microseconds a call, so eager code calls the function itself.
    run = _grouped_mm_outside_graph if torch.compiler.is_compiling() else _grouped_mm_eager
    y_NF = run(x_ND, w_EDF, counts_E)
    if b_EF is not None:
        y_NF = y_NF + torch.repeat_interleave(b_EF, counts_E, dim=0, output_size=x_ND.shape[0])
    return y_NF


def _grouped_mm_eager(x_ND: torch.Tensor, w_EDF: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    # Under torch.compile this runs outside the graph (_grouped_mm_outside_graph): segment sizes
    # are data-dependent (a loop needs them on the host), and as of torch 2.13 the meta kernel of
    # _grouped_mm accepts only bf16, so fake-tensor tracing of the fp32 CPU kernel fails. Running
    # this one call eagerly costs a graph break; everything around it still compiles.
    if x_ND.shape[0] == 0:
        return x_ND.new_zeros(0, w_EDF.shape[-1])
    if _grouped_mm_works(x_ND.device, x_ND.dtype) and _aligned_for_grouped_mm(x_ND, w_EDF):
        offsets_E = torch.cumsum(counts_E, 0, dtype=torch.int32)
        try:
            return torch._grouped_mm(x_ND, w_EDF, offs=offsets_E)
        except RuntimeError:  # a rule we do not check (new kernels): the loop is always right
            pass
    return segment_mm(x_ND, w_EDF, counts_E)


_grouped_mm_outside_graph = torch.compiler.disable(_grouped_mm_eager)


def _aligned_for_grouped_mm(x_ND: torch.Tensor, w_EDF: torch.Tensor) -> bool:
    """``torch._grouped_mm`` needs 16-byte aligned pointers and strides, in forward and in its
    backward (which multiplies by the transposed weight and the ``(N, F)`` output gradient). Check
    up front: an error raised inside the backward could not fall back to the loop."""
    size = x_ND.element_size()
    strides = [s for t in (x_ND, w_EDF) for s, n in zip(t.stride(), t.shape) if s != 1 and n > 1]
    return (all(t.data_ptr() % 16 == 0 for t in (x_ND, w_EDF))
            and all(s * size % 16 == 0 for s in strides + [w_EDF.shape[-1], x_ND.shape[-1]]))


def segment_mm(x_ND: torch.Tensor, w_EDF: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """The portable path: one matmul per non-empty contiguous segment (one host sync)."""
    pieces = []
    start = 0
    for e, n in enumerate(counts_E.tolist()):
        if n:
            pieces.append(x_ND[start : start + n] @ w_EDF[e])
            start += n
    return torch.cat(pieces) if pieces else x_ND.new_zeros(0, w_EDF.shape[-1])


_PROBED: dict[tuple[str, torch.dtype], bool] = {}


def _grouped_mm_works(device: torch.device, dtype: torch.dtype) -> bool:
    key = (device.type, dtype)
    if key not in _PROBED:
        _PROBED[key] = _probe_grouped_mm(device, dtype)
    return _PROBED[key]


def _probe_grouped_mm(device: torch.device, dtype: torch.dtype) -> bool:
    """Run a tiny grouped matmul (with an empty group) and compare it with the loop."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(24, 16, generator=gen).to(device, dtype)
    w = torch.randn(3, 16, 32, generator=gen).to(device, dtype)
    counts = torch.tensor([8, 0, 16], device=device)
    try:
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            got = torch._grouped_mm(x, w, offs=torch.cumsum(counts, 0, dtype=torch.int32))
    except (RuntimeError, NotImplementedError, TypeError):
        return False
    with torch.no_grad(), torch.autocast(device.type, enabled=False):
        want = segment_mm(x, w, counts)
    tol = 1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-4
    return bool(torch.allclose(got.float(), want.float(), atol=tol * 16, rtol=tol))
