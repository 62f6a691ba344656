"""Stacked expert weights and the grouped matmul that runs each expert on its own rows.

Shapes: N routed rows sorted by expert, D model dim, F expert hidden dim, O output dim
(= D unless set), E experts. ``counts_E`` holds how many of the sorted rows each expert owns.

Kinds: ``linear`` (the seed's expert, ``x W + b``), ``mlp`` (``act(x W1 + b1) W2 + b2``),
``swiglu`` (``(silu(x W1) * x W3) W2``; W1 and W3 are stored side by side as one
``w13`` so one grouped matmul computes both). A new kind (a convolutional expert, say)
subclasses nothing: it is one more branch in ``Experts.forward`` with its own weights, fed
the same ``(x_ND, counts_E)``.

Two ways to run the experts, chosen per call (``padded_capacity``):

* ``grouped_mm``: ``torch._grouped_mm`` on the sorted rows. On CUDA in bfloat16 (compute capability
  >= 9.0) that is one fused grouped GEMM. Elsewhere PyTorch runs it as a loop of one matmul per expert,
  which on the CPU is cheap but on a GPU reads each expert's row offset back to the host: one
  synchronisation per expert and matmul.
* ``Experts._forward_padded``: one ``torch.bmm`` over an ``(E, capacity, D)`` block, every expert's
  rows padded to the largest count. On CUDA without the fused kernel (float32, float16) it replaces
  those per-expert round trips with one host read of the capacity (``dualroute bench lm --device cuda``).

``segment_mm`` is the plain reference both are tested against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .config_types import check_field_types

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
        check_field_types(self)
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
        self.register_load_state_dict_post_hook(_restore_stacked_layout)

    def reset_parameters(self) -> None:
        # Same scale as nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
        for name, param in self.named_parameters():
            fan_in = self.cfg.dim if name in ("w1", "w13", "b1") else self.cfg.hidden
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(param, -bound, bound)

    def first_weight(self) -> torch.Tensor:
        return self.w13 if self.cfg.kind == "swiglu" else self.w1

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        capacity = padded_capacity(x_ND, counts_E)
        if capacity is not None:
            return self._forward_padded(x_ND, counts_E, capacity)
        h_NF = grouped_mm(x_ND, self.first_weight(), counts_E, self.b1)
        if self.cfg.kind == "linear":
            return h_NF
        return grouped_mm(self._activate(h_NF), self.w2, counts_E, self.b2)

    def _forward_padded(self, x_ND: torch.Tensor, counts_E: torch.Tensor, capacity: int) -> torch.Tensor:
        """``forward`` computed on an ``(E, capacity, D)`` block: expert e's rows at the top of block e.

        The padding rows below start as zeros, are computed with the rest and are never read back, so
        they add nothing to any gradient. ``capacity`` must be at least ``counts_E.max()``.
        """
        E, (N, D) = self.cfg.num_experts, x_ND.shape
        x_ND, w1, b1, w2, b2 = _compute_dtype(
            x_ND, self.first_weight(), self.b1, getattr(self, "w2", None), getattr(self, "b2", None))
        slot_N = pad_slots(counts_E, capacity, N)
        x_ECD = x_ND.new_zeros(E * capacity, D).index_copy(0, slot_N, x_ND).view(E, capacity, D)
        h_ECF = batched_mm(x_ECD, w1, b1)
        y_ECO = h_ECF if self.cfg.kind == "linear" else batched_mm(self._activate(h_ECF), w2, b2)
        y_RO = y_ECO.reshape(E * capacity, -1)
        return _TakeRows.apply(y_RO, slot_N) if y_RO.requires_grad else y_RO.index_select(0, slot_N)

    def forward_one(self, e: int, x_TD: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` applied to every row: the plain, loop-free definition (references, dense FFNs, and
        the layer's direct path for a handful of rows). Dtypes as in ``forward``: autocast's where it is on,
        else input and weights must agree (TypeError)."""
        mine = (None if w is None else w[e] for w in (self.b1, getattr(self, "w2", None), getattr(self, "b2", None)))
        x_TD, w1, b1, w2, b2 = _compute_dtype(x_TD, self.first_weight()[e], *mine)  # expert e's weights only
        h = x_TD @ w1
        if b1 is not None:
            h = h + b1
        if self.cfg.kind == "linear":
            return h
        y = self._activate(h) @ w2
        return y if b2 is None else y + b2

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


def is_out_major(w_EIO: torch.Tensor) -> bool:
    """Whether a stacked ``(E, in, out)`` weight sits in memory as ``(E, out, in)`` (see ``_stacked_weight``)."""
    return w_EIO.stride(1) == 1 or w_EIO.shape[1] == 1


def out_major(w_EIO: torch.Tensor) -> torch.Tensor:
    """``w_EIO`` with the out-major storage of routed experts (no copy if it already has it)."""
    return w_EIO.transpose(1, 2).contiguous().transpose(1, 2)


def _restore_stacked_layout(module: Experts, incompatible_keys) -> None:
    """After ``load_state_dict(..., assign=True)`` the parameters are the loaded tensors in whatever
    memory layout they came in; give routed experts' weights back the out-major storage of
    ``_stacked_weight`` (same values). A plain load copies into the existing storage and changes nothing."""
    if module.cfg.num_experts == 1:
        return
    for name in ("w1", "w13", "w2"):
        p = getattr(module, name, None)
        if isinstance(p, nn.Parameter) and p.device.type != "meta" and not is_out_major(p):
            setattr(module, name, nn.Parameter(out_major(p.detach()), requires_grad=p.requires_grad))


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
    x_ND, w_EDF, b_EF = _compute_dtype(x_ND, w_EDF, b_EF)
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
    """The portable path: one matmul per non-empty contiguous segment (one host sync).

    The experts' matrices come from one ``unbind`` of the weight in its memory order, whose backward
    stacks their gradients once, already in the parameter's layout. Indexing ``w_EDF[e]`` per expert
    would fill a zero ``(E, D, F)`` tensor per expert in backward, and unbinding an out-major weight
    along its shape would leave a strided copy into the parameter's layout.
    """
    pieces = []
    start = 0
    w_DF = [w.t() for w in w_EDF.transpose(1, 2).unbind(0)] if is_out_major(w_EDF) else w_EDF.unbind(0)
    for e, n in enumerate(counts_E.tolist()):
        if n:
            pieces.append(x_ND[start : start + n] @ w_DF[e])
            start += n
    return torch.cat(pieces) if pieces else x_ND.new_zeros(0, w_EDF.shape[-1])


def _compute_dtype(x_ND: torch.Tensor, *weights: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """Cast to autocast's dtype where autocast is on (as ``F.linear`` would); else insist on one dtype."""
    device_type = x_ND.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        return tuple(None if t is None else t.to(dtype) for t in (x_ND, *weights))
    if weights[0].dtype != x_ND.dtype:
        raise TypeError(f"expert input dtype {x_ND.dtype} does not match expert weights {weights[0].dtype}")
    return (x_ND, *weights)


# Devices where the padded path may run instead of a loop-backed torch._grouped_mm. Not the CPU: there
# PyTorch's per-expert loop costs no synchronisation, and one bmm over padded blocks was up to 25% faster
# in training at some shapes (D=512, F=1024, <= ~140 rows an expert) and up to 12% slower at others
# (D <= 256, as in the LM presets; 2-core VM, MKL), so the loop stays.
PADDED_DEVICE_TYPES = ("cuda",)
# Largest (E * capacity) / N at which the padded path runs: padding rows are computed for nothing.
PAD_MAX_WASTE = 1.5


def padded_capacity(x_ND: torch.Tensor, counts_E: torch.Tensor) -> int | None:
    """Rows per expert block for ``Experts._forward_padded``, or None where ``grouped_mm`` runs.

    The padded path runs on ``PADDED_DEVICE_TYPES`` when the dtype the experts compute in (autocast's,
    else the input's) has no fused grouped kernel there, there are E > 1 experts, not under
    torch.compile, and the padding stays within ``PAD_MAX_WASTE``. It reads ``counts_E.max()`` on the
    host: one synchronisation, where the loop-backed ``torch._grouped_mm`` would make one per expert.
    """
    E, N, device = counts_E.shape[0], x_ND.shape[0], x_ND.device
    if E == 1 or N == 0 or device.type not in PADDED_DEVICE_TYPES or torch.compiler.is_compiling():
        return None
    dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else x_ND.dtype
    if has_fused_grouped_mm(device, dtype):
        return None
    capacity = int(counts_E.max())
    return capacity if E * capacity <= PAD_MAX_WASTE * N else None


def has_fused_grouped_mm(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch._grouped_mm`` is one fused kernel here (CUDA, bfloat16, compute capability >= 9.0)
    rather than PyTorch's loop over the groups."""
    return (device.type == "cuda" and dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) >= (9, 0)
            and _grouped_mm_works(device, dtype))


def pad_slots(counts_E: torch.Tensor, capacity: int, N: int) -> torch.Tensor:
    """``slot_N[n]``: where sorted row n lives in the flattened ``(E * capacity)`` padded layout."""
    E = counts_E.shape[0]
    start_E = torch.cumsum(counts_E, 0) - counts_E
    shift_E = torch.arange(E, device=counts_E.device) * capacity - start_E
    return torch.arange(N, device=counts_E.device) + torch.repeat_interleave(shift_E, counts_E, output_size=N)


def batched_mm(x_ECD: torch.Tensor, w_EDF: torch.Tensor, b_EF: torch.Tensor | None = None) -> torch.Tensor:
    """``y[e] = x[e] @ w[e] (+ b[e])`` over padded expert blocks."""
    needs_grad = torch.is_grad_enabled() and (x_ECD.requires_grad or w_EDF.requires_grad)
    y_ECF = _BatchedMM.apply(x_ECD, w_EDF) if needs_grad else torch.bmm(x_ECD, w_EDF)
    return y_ECF if b_EF is None else y_ECF + b_EF[:, None, :]


class _BatchedMM(torch.autograd.Function):
    """``torch.bmm`` whose weight gradient comes out in the weight's own memory layout.

    Autograd's bmm derivative returns a row-major ``x^T @ dy``; for out-major (routed) expert weights
    that gradient would then be copied into the parameter's layout on every step. Here it is computed
    as ``(dy^T @ x)^T`` for out-major weights, which is the layout the parameter has.
    """

    @staticmethod
    def forward(ctx, x_ECD: torch.Tensor, w_EDF: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x_ECD, w_EDF)
        return torch.bmm(x_ECD, w_EDF)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy_ECF: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        x_ECD, w_EDF = ctx.saved_tensors
        dx_ECD = torch.bmm(dy_ECF, w_EDF.transpose(1, 2)) if ctx.needs_input_grad[0] else None
        dw_EDF = None
        if ctx.needs_input_grad[1]:
            if is_out_major(w_EDF):
                dw_EDF = torch.bmm(dy_ECF.transpose(1, 2), x_ECD).transpose(1, 2)
            else:
                dw_EDF = torch.bmm(x_ECD.transpose(1, 2), dy_ECF)
        return dx_ECD, dw_EDF


class _TakeRows(torch.autograd.Function):
    """``y_RO.index_select(0, slot_N)`` for distinct slots. Backward writes each row's gradient to its
    slot with ``index_copy`` and leaves the other rows zero (autograd's own ``index_select`` backward
    accumulates with ``index_add``, which the distinct slots do not need)."""

    @staticmethod
    def forward(ctx, y_RO: torch.Tensor, slot_N: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(slot_N)
        ctx.rows = y_RO.shape[0]
        return y_RO.index_select(0, slot_N)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy_NO: torch.Tensor) -> tuple[torch.Tensor, None]:
        (slot_N,) = ctx.saved_tensors
        return dy_NO.new_zeros(ctx.rows, dy_NO.shape[1]).index_copy(0, slot_N, dy_NO), None


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
