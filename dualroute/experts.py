"""Stacked expert weights and the grouped matmul that runs each expert on its own rows.

Shapes: N routed rows sorted by expert, D model dim, F expert hidden dim, O output dim
(= D unless set), E experts. ``counts_E`` holds how many of the sorted rows each expert owns.

Kinds: ``linear`` (the seed's expert, ``x W + b``), ``mlp`` (``act(x W1 + b1) W2 + b2``),
``swiglu`` (``(silu(x W1) * x W3) W2``; W1 and W3 are stored side by side as one
``w13`` so one grouped matmul computes both). A new kind (a convolutional expert, say)
subclasses nothing: it is one more branch in ``Experts.forward`` with its own weights, fed
the same ``(x_ND, counts_E)``.

Two ways to run the experts, chosen per call (``padded_blocks``):

* ``grouped_mm``: ``torch._grouped_mm`` on the sorted rows. On CUDA in bfloat16 (compute capability
  >= 9.0) that is one fused grouped GEMM. Elsewhere PyTorch runs it as a loop of one matmul per expert:
  on a GPU each reads its row offset back to the host (one synchronisation per expert and matmul); on
  the CPU each small product is split over the intra-op threads, which join after it.
* ``Experts._forward_padded``: one ``torch.bmm`` per block of consecutive experts, every expert's rows
  padded to the largest count of its block (``PaddedBlocks``). On CUDA without the fused kernel (float32,
  float16) one block over all experts replaces those per-expert round trips with one host read of the
  capacity (``dualroute bench lm --device cuda``). On the CPU, opt-in (``PADDED_DEVICE_TYPES``), a few
  blocks run many small experts (``cpu_blocks``): faster than the loop on an oversubscribed machine,
  slower on a quiet one.

On the CPU, when a call's hidden activations outgrow the last-level cache (``CPU_CHUNK_MIN_BYTES``), the
``grouped_mm`` way runs in chunks of consecutive experts (``cache_chunks``), each through both matmuls before
the next, so that the activation and the second matmul read what is still in cache.

``segment_mm`` is the plain reference these are tested against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .config_types import check_field_types

# "conv": a 3x3 conv block over feature maps, built by ``dualroute.conv_experts`` (not by ``Experts``).
ExpertKind = Literal["linear", "mlp", "swiglu", "conv"]
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
        if self.kind not in ("linear", "mlp", "swiglu", "conv"):
            raise ValueError(f"unknown expert kind {self.kind!r}; expected 'linear', 'mlp', 'swiglu' or 'conv'")
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
        if cfg.kind == "conv":
            raise ValueError("expert kind 'conv' runs on feature maps (B, C, H, W): build it with "
                             "dualroute.conv_experts (ConvMoELayer, ConvFFN), not Experts / MoELayer / DenseFFN")
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
        blocks = padded_blocks(x_ND, counts_E)
        if blocks is not None:
            return self._forward_padded(x_ND, counts_E, blocks)
        w2, b2 = getattr(self, "w2", None), getattr(self, "b2", None)
        chunks = cache_chunks(x_ND, counts_E, self.first_weight()) if w2 is not None else None
        if chunks is None:
            return self._forward_grouped(x_ND, counts_E, self.first_weight(), self.b1, w2, b2)
        experts, rows = (list(c) for c in zip(*chunks))
        pieces = zip(x_ND.split(rows), counts_E.split(experts),
                     *(_split_experts(t, experts) for t in (self.first_weight(), self.b1, w2, b2)))
        return torch.cat([self._forward_grouped(*piece) for piece in pieces])

    def _forward_grouped(self, x_ND: torch.Tensor, counts_E: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None,
                         w2: torch.Tensor | None, b2: torch.Tensor | None) -> torch.Tensor:
        """The experts whose weights are given (a run of consecutive experts, or all) on their sorted rows."""
        h_NF = grouped_mm(x_ND, w1, counts_E, b1)
        if self.cfg.kind == "linear":
            return h_NF
        return grouped_mm(self._activate(h_NF), w2, counts_E, b2)

    def _forward_padded(self, x_ND: torch.Tensor, counts_E: torch.Tensor, blocks: PaddedBlocks) -> torch.Tensor:
        """``forward`` computed on padded blocks (``PaddedBlocks``): expert e's rows at the top of its
        ``capacity`` rows, one ``torch.bmm`` per block of experts and matmul.

        The padding rows below start as zeros, are computed with the rest and are never read back, so
        they add nothing to any gradient. Each block's capacity must be at least its experts' largest count.
        """
        N, D = x_ND.shape
        x_ND, w1, b1, w2, b2 = _compute_dtype(
            x_ND, self.first_weight(), self.b1, getattr(self, "w2", None), getattr(self, "b2", None))
        capacity_E = blocks.capacity_E(counts_E.device)
        slot_N = pad_slots(counts_E, capacity_E, N)
        x_RD = x_ND.new_zeros(blocks.rows, D).index_copy(0, slot_N, x_ND)
        h_RF = batched_mm(x_RD, w1, blocks, b1, capacity_E)
        y_RO = h_RF if self.cfg.kind == "linear" else batched_mm(self._activate(h_RF), w2, blocks, b2, capacity_E)
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


# Devices where the padded path may run instead of the loop-backed torch._grouped_mm, by rule:
# * CUDA without a fused grouped kernel: one block over all experts. The loop would read each expert's row
#   offset back to the host.
# * The CPU, only where the user adds "cpu" here (``cpu_blocks``: many experts, more than one thread). MKL
#   splits each product of the loop over the threads and joins them after it; on an oversubscribed machine
#   each join can wait for a descheduled thread, and blocks of whole experts per thread measured 1.65-1.89x
#   the dense FFN at E=64 against the loop's 3.1-6.1x (docs/benchmarks.md). On a quiet machine the loop,
#   which computes no padding, was the faster: E=64 at 1.27-1.62x against 1.57-1.72x in three runs of
#   ``dualroute bench layer``, and a 16-expert LM step 14-18% faster (docs/benchmarks.md). So it is off.
PADDED_DEVICE_TYPES: tuple[str, ...] = ("cuda",)
# Largest (padded rows) / N at which the padded path runs: padding rows are computed for nothing.
PAD_MAX_WASTE = 1.5
# Blocks of consecutive experts on the CPU, each padded to its own largest count: fewer padding rows
# than one block (bench layer's E=64 counts: 1.21-1.29x N against 1.34x) for three more bmm calls per
# matmul, each of which can wait on a busy machine.
CPU_PAD_BLOCKS = 4
# Fewer experts keep the loop: with 8, four blocks of two save few joins (24 bmm calls a layer step against
# 48 products), and in a scratch A/B of the lm-dual-small step (E=8) the blocks were no faster than the loop.
CPU_PAD_MIN_EXPERTS = 16


@dataclass(frozen=True)
class PaddedBlocks:
    """The padded layout of ``Experts._forward_padded``: consecutive experts ``[first, end)`` of a block
    each own ``capacity`` rows; blocks follow one another in one ``(rows, D)`` tensor. One block over all
    experts is an ``(E, capacity, D)`` batch."""

    blocks: tuple[tuple[int, int, int], ...]  # (first expert, end expert, capacity) per block, in expert order

    @property
    def rows(self) -> int:
        return sum((end - first) * capacity for first, end, capacity in self.blocks)

    def capacity_E(self, device: torch.device | str) -> torch.Tensor:
        per_expert = [capacity for first, end, capacity in self.blocks for _ in range(first, end)]
        return torch.tensor(per_expert, device=device)

    @staticmethod
    def of_counts(counts: list[int], parts: int) -> PaddedBlocks:
        """``parts`` blocks of (nearly) equal numbers of consecutive experts, each padded to its largest count."""
        E = len(counts)
        cuts = [round(i * E / parts) for i in range(parts + 1)]
        return PaddedBlocks(tuple((a, b, max(counts[a:b])) for a, b in zip(cuts, cuts[1:]) if b > a))


def padded_blocks(x_ND: torch.Tensor, counts_E: torch.Tensor) -> PaddedBlocks | None:
    """The padded layout for ``Experts._forward_padded``, or None where ``grouped_mm`` runs.

    Never for one expert (a dense FFN), no rows, or under torch.compile; only on ``PADDED_DEVICE_TYPES``.
    On CUDA: one block, where the dtype the experts compute in (autocast's, else the input's) has no fused
    grouped kernel. On the CPU: ``cpu_blocks``. Either way the padding stays within ``PAD_MAX_WASTE``. It
    reads the counts on the host: one synchronisation on a GPU, where the loop-backed
    ``torch._grouped_mm`` would make one per expert.
    """
    E, N, device = counts_E.shape[0], x_ND.shape[0], x_ND.device
    if E == 1 or N == 0 or device.type not in PADDED_DEVICE_TYPES or torch.compiler.is_compiling():
        return None
    if device.type == "cpu":
        blocks = cpu_blocks(counts_E.tolist(), torch.get_num_threads())
    else:
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else x_ND.dtype
        blocks = None if has_fused_grouped_mm(device, dtype) else PaddedBlocks(((0, E, int(counts_E.max())),))
    return blocks if blocks is not None and blocks.rows <= PAD_MAX_WASTE * N else None


def cpu_blocks(counts: list[int], threads: int) -> PaddedBlocks | None:
    """The CPU's rule: ``CPU_PAD_BLOCKS`` blocks for at least ``CPU_PAD_MIN_EXPERTS`` experts on more than
    one thread, else None (the loop)."""
    if threads < 2 or len(counts) < CPU_PAD_MIN_EXPERTS:
        return None
    return PaddedBlocks.of_counts(counts, min(len(counts), CPU_PAD_BLOCKS))


# On the CPU a layer whose hidden activations (rows x first-matmul width) outgrow the last-level cache runs its
# experts in chunks of consecutive experts, each taken through both matmuls and the activation before the next
# (``cache_chunks``): the elementwise work and the second matmul then read activations that are still in cache.
# On this project's VM (AMD EPYC, 32 MiB L3, 2 threads) 8 experts of D=512, F=1024 on 8,192 rows (64 MiB of
# activations) ran 1.19-1.22x faster per expert (forward, and forward with backward); at 32 MiB and below a
# chunk per expert was level or slower, as each chunk adds a few small calls. transformers' per-expert loop
# has this locality by construction: it is why its eager block beat the grouped matmul at T=4096. Only where
# the activations outweigh the weights (at least D rows per expert on average): each chunk's weight gradient
# comes back in pieces that backward concatenates, and for 64 experts of D=512, F=1024 on 128 rows each
# (384 MB of weights) that concatenation made the layer's training step 1.5x slower, not faster.
CPU_CHUNK_MIN_BYTES = 48 * 2**20  # chunk only above this much activation, ...
CPU_CHUNK_BYTES = 8 * 2**20  # ... into chunks of about this much (at least one expert each)


def cache_chunks(x_ND: torch.Tensor, counts_E: torch.Tensor, w1_EDF: torch.Tensor) -> list[tuple[int, int]] | None:
    """``(experts, rows)`` of each chunk of consecutive experts for ``Experts.forward`` on the CPU, or None for
    one pass over all of them: below ``CPU_CHUNK_MIN_BYTES`` of hidden activations, with fewer than D rows per
    expert, on other devices, under torch.compile."""
    (N, D), (E, width) = x_ND.shape, (w1_EDF.shape[0], w1_EDF.shape[-1])
    if x_ND.device.type != "cpu" or N < E * D or torch.compiler.is_compiling():
        return None
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x_ND.dtype
    row_bytes = width * dtype.itemsize
    if N * row_bytes <= CPU_CHUNK_MIN_BYTES:
        return None
    chunks, experts, rows = [], 0, 0
    for n in counts_E.tolist():
        if rows and (rows + n) * row_bytes > CPU_CHUNK_BYTES:  # a chunk holds rows, or it is still open
            chunks.append((experts, rows))
            experts, rows = 0, 0
        experts, rows = experts + 1, rows + n
    return chunks + [(experts, rows)] if chunks else None


def _split_experts(w_EIO: torch.Tensor | None, sizes: list[int]) -> tuple[torch.Tensor | None, ...]:
    """Runs of ``sizes`` consecutive experts of a stacked weight or bias, as views whose backward builds the
    gradient once in the parameter's own memory layout (an out-major weight is split in that layout)."""
    if w_EIO is None:
        return (None,) * len(sizes)
    if w_EIO.dim() == 3 and is_out_major(w_EIO):
        return tuple(w.transpose(1, 2) for w in w_EIO.transpose(1, 2).split(sizes))
    return w_EIO.split(sizes)


def has_fused_grouped_mm(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch._grouped_mm`` is one fused kernel here (CUDA, bfloat16, compute capability >= 9.0)
    rather than PyTorch's loop over the groups."""
    return (device.type == "cuda" and dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) >= (9, 0)
            and _grouped_mm_works(device, dtype))


def pad_slots(counts_E: torch.Tensor, capacity: int | torch.Tensor, N: int) -> torch.Tensor:
    """``slot_N[n]``: where sorted row n lives in the padded layout, each expert e owning ``capacity``
    (an int, or one per expert) rows after those of experts ``< e``."""
    E = counts_E.shape[0]
    start_E = torch.cumsum(counts_E, 0) - counts_E
    if isinstance(capacity, int):
        padded_start_E = torch.arange(E, device=counts_E.device) * capacity
    else:
        padded_start_E = torch.cumsum(capacity, 0) - capacity
    shift_E = padded_start_E - start_E
    return torch.arange(N, device=counts_E.device) + torch.repeat_interleave(shift_E, counts_E, output_size=N)


def batched_mm(x_RD: torch.Tensor, w_EDF: torch.Tensor, blocks: PaddedBlocks, b_EF: torch.Tensor | None = None,
               capacity_E: torch.Tensor | None = None) -> torch.Tensor:
    """``y = x @ w[e] (+ b[e])`` over the padded rows of each expert (``capacity_E``: rows per expert,
    needed with a bias)."""
    needs_grad = torch.is_grad_enabled() and (x_RD.requires_grad or w_EDF.requires_grad)
    y_RF = _BatchedMM.apply(x_RD, w_EDF, blocks) if needs_grad else _block_bmm(x_RD, w_EDF, blocks)
    if b_EF is None:
        return y_RF
    return y_RF + torch.repeat_interleave(b_EF, capacity_E, dim=0, output_size=blocks.rows)


def _block_views(t_RX: torch.Tensor, blocks: PaddedBlocks):
    """``(first, end, t_ECX)`` per block: the block's rows of ``t_RX`` as an (experts, capacity, X) view."""
    row = 0
    for first, end, capacity in blocks.blocks:
        n = (end - first) * capacity
        yield first, end, t_RX[row : row + n].view(end - first, capacity, t_RX.shape[1])
        row += n


def _block_bmm(x_RD: torch.Tensor, w_EDF: torch.Tensor, blocks: PaddedBlocks) -> torch.Tensor:
    y_RF = x_RD.new_empty(blocks.rows, w_EDF.shape[-1])
    for (first, end, x_ECD), (_, _, y_ECF) in zip(_block_views(x_RD, blocks), _block_views(y_RF, blocks)):
        torch.bmm(x_ECD, w_EDF[first:end], out=y_ECF)
    return y_RF


class _BatchedMM(torch.autograd.Function):
    """``_block_bmm``: one ``torch.bmm`` per block, every block written into one output, and a backward
    that writes each block's gradients into one input gradient and one weight gradient in the weight's
    own memory layout.

    Autograd's bmm derivative would return a row-major ``x^T @ dy`` per block, to be stacked and then
    copied into an out-major (routed) weight's layout on every step. Here each block's gradient is
    computed as ``(dy^T @ x)^T`` for out-major weights, straight into the layout the parameter has.
    Experts of no block, or whose blocks have no rows, get exact zeros.
    """

    @staticmethod
    def forward(ctx, x_RD: torch.Tensor, w_EDF: torch.Tensor, blocks: PaddedBlocks) -> torch.Tensor:
        ctx.save_for_backward(x_RD, w_EDF)
        ctx.blocks = blocks
        return _block_bmm(x_RD, w_EDF, blocks)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy_RF: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x_RD, w_EDF = ctx.saved_tensors
        blocks = ctx.blocks
        dx_RD = _block_bmm(dy_RF, w_EDF.transpose(1, 2), blocks) if ctx.needs_input_grad[0] else None
        dw_EDF = None
        if ctx.needs_input_grad[1]:
            out_major_w = is_out_major(w_EDF)
            E, D, F = w_EDF.shape
            dw = w_EDF.new_empty(E, F, D) if out_major_w else w_EDF.new_empty(E, D, F)
            for (first, end, x_ECD), (_, _, dy_ECF) in zip(_block_views(x_RD, blocks), _block_views(dy_RF, blocks)):
                if x_ECD.shape[1] == 0:  # a block of experts without rows
                    dw[first:end].zero_()
                elif out_major_w:
                    torch.bmm(dy_ECF.transpose(1, 2), x_ECD, out=dw[first:end])
                else:
                    torch.bmm(x_ECD.transpose(1, 2), dy_ECF, out=dw[first:end])
            dw_EDF = dw.transpose(1, 2) if out_major_w else dw
        return dx_RD, dw_EDF, None


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
