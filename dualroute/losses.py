"""Auxiliary router losses and balance metrics, as pure functions.

Shapes: T tokens, E units routed to, K units chosen per token. The same functions serve both routing
levels: at the group level read E as G (groups) and K as J (groups chosen per token).

Conventions shared by every function here:

* ``mask_T`` is an optional bool tensor, True for a real token and False for padding. Padded tokens are left
  out of every statistic (counts and means alike) and get exactly zero gradient. A mask with no True entry
  makes every loss 0, never NaN.
* ``selected_TK`` holds int64 unit indices in [0, E); -1 means "no selection" (a slot left unused or dropped)
  and is ignored.
* Losses upcast bf16/fp16 inputs to float32 (float64 stays float64) and return a 0-dim tensor that is
  differentiable w.r.t. the probabilities / logits. Metrics run without grad and return python floats or an
  int64 count tensor, for logging.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

CV_EPS = 1e-10  # added to mean^2 in the CV^2 losses so an all-zero statistic gives 0, not NaN


# --------------------------------------------------------------------------------------------- validation


def check_loss_weight(name: str, value: float) -> float:
    """Return ``float(value)``; ValueError naming ``name`` if it is negative, NaN or infinite."""
    weight = float(value)
    if not math.isfinite(weight) or weight < 0:
        raise ValueError(f"loss weight {name} must be finite and >= 0, got {value!r}")
    return weight


def _check_mask(mask_T: torch.Tensor | None, num_tokens: int) -> None:
    if mask_T is None:
        return
    if mask_T.dtype != torch.bool:
        raise ValueError(f"mask_T must have dtype torch.bool, got {mask_T.dtype}")
    if tuple(mask_T.shape) != (num_tokens,):
        raise ValueError(f"mask_T must have shape ({num_tokens},), got {tuple(mask_T.shape)}")


def _check_float_TE(name: str, x_TE: torch.Tensor) -> None:
    if x_TE.dim() != 2:
        raise ValueError(f"{name} must be 2-D (T, E), got shape {tuple(x_TE.shape)}")
    if not x_TE.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {x_TE.dtype}")


def _check_selected(selected_TK: torch.Tensor, num_tokens: int | None, num_experts: int) -> None:
    if selected_TK.dim() != 2 or num_tokens not in (None, selected_TK.shape[0]):
        rows = "T" if num_tokens is None else num_tokens
        raise ValueError(f"selected_TK must have shape ({rows}, K), got {tuple(selected_TK.shape)}")
    if selected_TK.is_floating_point() or selected_TK.dtype == torch.bool:
        raise ValueError(f"selected_TK must be an integer tensor, got {selected_TK.dtype}")
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    # One host sync; an out-of-range index would otherwise be a device-side assert on CUDA.
    if selected_TK.numel() and (selected_TK.min() < -1 or selected_TK.max() >= num_experts):
        lo, hi = int(selected_TK.min()), int(selected_TK.max())
        raise ValueError(f"selected_TK values must be in [-1, {num_experts}), got range [{lo}, {hi}]")


def _upcast(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _token_mask(mask_T: torch.Tensor | None, num_tokens: int, device: torch.device) -> torch.Tensor:
    return torch.ones(num_tokens, dtype=torch.bool, device=device) if mask_T is None else mask_T


def _valid_slots(selected_TK: torch.Tensor, mask_T: torch.Tensor | None) -> torch.Tensor:
    """Bool (T, K): a real selection of a real token."""
    valid_TK = selected_TK >= 0
    return valid_TK if mask_T is None else valid_TK & mask_T[:, None]


def _scatter_to_units(values_TK: torch.Tensor, selected_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Sum ``values_TK`` into their units; entries at -1 must already be zero in ``values_TK``."""
    out_E = values_TK.new_zeros(num_experts)
    return out_E.scatter_add(0, selected_TK.clamp(min=0).reshape(-1), values_TK.reshape(-1))


def cv_squared(x_E: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation, population variance: var(x) / (mean(x)^2 + eps)."""
    return x_E.var(correction=0) / (x_E.mean() ** 2 + CV_EPS)


# --------------------------------------------------------------------------------------------- losses


def switch_stats(probs_TE, selected_TK, num_experts, mask_T):
    """The four sums the Switch loss is made of (shared with BalanceStats and the global-batch losses of
    ``dualroute.balance.global_aux_losses``: sums add up over micro-batches and over ranks).

    Returns (counts_E, probs_sum_E, num_tokens, num_assignments); counts and both totals are detached,
    ``probs_sum_E`` keeps its graph.
    """
    _check_float_TE("probs_TE", probs_TE)
    num_tokens, width = probs_TE.shape
    if width != num_experts:
        raise ValueError(f"probs_TE has {width} units but num_experts={num_experts}")
    _check_selected(selected_TK, num_tokens, num_experts)
    _check_mask(mask_T, num_tokens)
    probs_TE = _upcast(probs_TE)
    keep_T = _token_mask(mask_T, num_tokens, probs_TE.device)
    # where, not multiply: NaN/inf in padded rows must not leak into the sum or its gradient.
    probs_sum_E = torch.where(keep_T[:, None], probs_TE, 0.0).sum(0)
    valid_TK = _valid_slots(selected_TK, mask_T)
    counts_E = _scatter_to_units(valid_TK.to(probs_TE.dtype), selected_TK, num_experts)
    return counts_E, probs_sum_E, keep_T.sum(), valid_TK.sum()


def switch_from_stats(counts_E, probs_sum_E, num_tokens, num_assignments) -> torch.Tensor:
    """The Switch loss from the sums of :func:`switch_stats` (of one batch, or added up over several)."""
    f_E = counts_E / num_assignments.clamp(min=1)
    p_E = probs_sum_E / num_tokens.clamp(min=1)
    return counts_E.numel() * (f_E * p_E).sum()


def switch_balance_loss(
    probs_TE: torch.Tensor,
    selected_TK: torch.Tensor,
    num_experts: int,
    mask_T: torch.Tensor | None = None,
) -> torch.Tensor:
    """Switch Transformer / GShard load-balancing loss ``E * sum_i f_i * P_i``.

    Fedus et al. 2021, "Switch Transformers", eq. 4 (GShard, Lepikhin et al. 2020, uses the same form).

    * ``f_i`` = fraction of routed (token, slot) assignments that go to unit i, counting all K choices of
      every real token; -1 slots are not assignments, so f is normalised by the number of valid
      assignments and sums to 1 (it is T*K when nothing is -1). For the textbook loss pass the selections
      made *before* any capacity drop, otherwise dropped overflow no longer counts against the overloaded
      unit.
    * ``P_i`` = mean over real tokens of ``probs_TE[:, i]`` (the full router distribution).

    Equals 1 when both f and P are uniform and E when all tokens go to one unit with probability 1. f is a
    count, so the gradient flows through P only. Returns 0 when there is no real token or no valid slot.
    """
    return switch_from_stats(*switch_stats(probs_TE, selected_TK, num_experts, mask_T))


def importance_loss(probs_TE: torch.Tensor, mask_T: torch.Tensor | None = None) -> torch.Tensor:
    """Importance loss of Shazeer et al. 2017, "Outrageously Large Neural Networks", eq. 6 (unweighted).

    ``importance_i = sum_t probs_TE[t, i]`` over real tokens, loss = ``cv(importance)^2`` with
    ``cv(x)^2 = var(x) / (mean(x)^2 + eps)``, population variance. 0 when importance is uniform.
    The paper applies it to the sparse gate values; pass those (T x E, zero where not chosen) or the dense
    router probabilities, whichever you mean to balance.
    """
    return cv_squared(importance_sum(probs_TE, mask_T))


def importance_sum(probs_TE: torch.Tensor, mask_T: torch.Tensor | None = None) -> torch.Tensor:
    """``importance_E``: the router probabilities summed over real tokens (what :func:`importance_loss` takes
    the CV^2 of; sums add up over ranks)."""
    _check_float_TE("probs_TE", probs_TE)
    _check_mask(mask_T, probs_TE.shape[0])
    probs_TE = _upcast(probs_TE)
    keep_T = _token_mask(mask_T, probs_TE.shape[0], probs_TE.device)
    return torch.where(keep_T[:, None], probs_TE, 0.0).sum(0)


def load_loss(
    weights_TK: torch.Tensor,
    selected_TK: torch.Tensor,
    num_experts: int,
    mask_T: torch.Tensor | None = None,
) -> torch.Tensor:
    """CV^2 of the soft per-unit load: the common simplification of Shazeer et al. 2017's load loss.

    What it is: the routing weights ``weights_TK`` (the gate values of the chosen units, renormalised or not)
    are scattered to a T x E matrix ``gates_TE`` that is zero where a unit was not chosen;
    ``load_i = sum_t gates_TE[t, i]`` over real tokens and valid (non -1) slots; loss = ``cv(load)^2`` as in
    :func:`importance_loss`. It is differentiable through the kept gate values only.

    What it is not: the paper's ``Load`` (section 4, appendix A) is a smooth estimate of the number of
    tokens per unit, ``sum_t P(unit i stays in the top-k under fresh noise)``, which needs the noisy top-k
    gate's noise std and gives gradient to units that were *not* chosen. This function needs no noise,
    gives no gradient to unchosen units, and measures gate mass, not token counts.
    """
    return cv_squared(load_sum(weights_TK, selected_TK, num_experts, mask_T))


def load_sum(
    weights_TK: torch.Tensor,
    selected_TK: torch.Tensor,
    num_experts: int,
    mask_T: torch.Tensor | None = None,
) -> torch.Tensor:
    """``load_E``: the kept gate values summed per unit (what :func:`load_loss` takes the CV^2 of)."""
    if weights_TK.shape != selected_TK.shape:
        raise ValueError(
            f"weights_TK shape {tuple(weights_TK.shape)} != selected_TK shape {tuple(selected_TK.shape)}"
        )
    _check_float_TE("weights_TK", weights_TK)
    num_tokens = weights_TK.shape[0]
    _check_selected(selected_TK, num_tokens, num_experts)
    _check_mask(mask_T, num_tokens)
    weights_TK = _upcast(weights_TK)
    kept_TK = torch.where(_valid_slots(selected_TK, mask_T), weights_TK, 0.0)
    return _scatter_to_units(kept_TK, selected_TK, num_experts)


def router_z_loss(logits_TE: torch.Tensor, mask_T: torch.Tensor | None = None) -> torch.Tensor:
    """Router z-loss of Zoph et al. 2022, "ST-MoE", eq. 5: ``mean_t logsumexp(logits_TE[t])^2``.

    Mean over real tokens; for zero logits over E units it equals ``ln(E)^2``. Penalises large router
    logits, which keeps the softmax numerically stable.
    """
    squares, num_tokens = z_loss_sums(logits_TE, mask_T)
    return squares / num_tokens.clamp(min=1)


def z_loss_sums(logits_TE: torch.Tensor, mask_T: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum_t logsumexp(logits_TE[t])^2, number of real tokens)`` over real tokens: the z-loss is their
    quotient (sums add up over ranks)."""
    _check_float_TE("logits_TE", logits_TE)
    num_tokens = logits_TE.shape[0]
    _check_mask(mask_T, num_tokens)
    logits_TE = _upcast(logits_TE)
    keep_T = _token_mask(mask_T, num_tokens, logits_TE.device)
    # Zero padded rows before logsumexp so an all -inf padding row cannot make a NaN gradient.
    lse_T = torch.where(keep_T[:, None], logits_TE, 0.0).logsumexp(-1)
    return torch.where(keep_T, lse_T**2, 0.0).sum(), keep_T.sum()


# --------------------------------------------------------------------------------------------- global batch


@dataclass
class BalanceStats:
    """Switch-loss statistics accumulated over micro-batches, for a global-batch balance loss.

    ``update`` adds each micro-batch's per-unit assignment counts (the f numerator), summed router
    probabilities (the P numerator), real-token count and valid-assignment count. Counts and totals are
    detached; ``probs_sum_E`` stays attached, so ``switch_loss()`` backpropagates into the graph of every
    micro-batch seen since the last ``reset()`` (those graphs are kept alive until then). The result equals
    :func:`switch_balance_loss` on the concatenation of the micro-batches. Call ``reset()`` after each
    optimizer step.
    """

    num_experts: int
    counts_E: torch.Tensor | None = None
    probs_sum_E: torch.Tensor | None = None
    num_tokens: torch.Tensor | None = None
    num_assignments: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {self.num_experts}")

    def update(
        self, probs_TE: torch.Tensor, selected_TK: torch.Tensor, mask_T: torch.Tensor | None = None
    ) -> None:
        counts_E, probs_sum_E, num_tokens, num_assignments = switch_stats(
            probs_TE, selected_TK, self.num_experts, mask_T
        )
        if self.counts_E is None:
            self.counts_E, self.probs_sum_E = counts_E.detach(), probs_sum_E
            self.num_tokens, self.num_assignments = num_tokens, num_assignments
            return
        self.counts_E = self.counts_E + counts_E.detach()
        self.probs_sum_E = self.probs_sum_E + probs_sum_E
        self.num_tokens = self.num_tokens + num_tokens
        self.num_assignments = self.num_assignments + num_assignments

    def switch_loss(self) -> torch.Tensor:
        """:func:`switch_balance_loss` over everything accumulated; 0 before any update."""
        if self.counts_E is None:
            return torch.zeros(())
        return switch_from_stats(self.counts_E, self.probs_sum_E, self.num_tokens, self.num_assignments)

    def reset(self) -> None:
        self.counts_E = self.probs_sum_E = self.num_tokens = self.num_assignments = None


# --------------------------------------------------------------------------------------------- metrics


@torch.no_grad()
def load_histogram(
    selected_TK: torch.Tensor, num_experts: int, mask_T: torch.Tensor | None = None
) -> torch.Tensor:
    """int64 ``counts_E``: how many valid (token, slot) assignments of real tokens went to each unit."""
    _check_selected(selected_TK, None, num_experts)
    _check_mask(mask_T, selected_TK.shape[0])
    valid_TK = _valid_slots(selected_TK, mask_T)
    return _scatter_to_units(valid_TK.long(), selected_TK, num_experts)


@torch.no_grad()
def max_violation(counts_E: torch.Tensor) -> float:
    """MaxVio = max_i load_i / mean_i load_i - 1 (Wang et al. 2024, "Auxiliary-Loss-Free Load Balancing").

    0 for perfectly balanced load, E - 1 when one unit takes everything; 0.0 when the total load is 0.
    """
    if counts_E.dim() != 1 or counts_E.numel() == 0:
        raise ValueError(f"counts_E must be a non-empty 1-D tensor, got shape {tuple(counts_E.shape)}")
    counts_E = counts_E.double()
    if bool((counts_E < 0).any()):
        raise ValueError(f"counts_E must be >= 0, got min {counts_E.min().item()}")
    mean = counts_E.mean().item()
    return 0.0 if mean == 0 else counts_E.max().item() / mean - 1.0


@torch.no_grad()
def router_entropy(probs_TE: torch.Tensor, mask_T: torch.Tensor | None = None) -> float:
    """Mean over real tokens of the routing entropy ``-sum_i p_i ln p_i`` in nats (0 ln 0 = 0).

    ln E for uniform probabilities, 0 for one-hot; 0.0 when there is no real token.
    """
    _check_float_TE("probs_TE", probs_TE)
    _check_mask(mask_T, probs_TE.shape[0])
    probs_TE = _upcast(probs_TE)
    entropy_T = -torch.special.xlogy(probs_TE, probs_TE).sum(-1)
    keep_T = _token_mask(mask_T, probs_TE.shape[0], probs_TE.device)
    num_tokens = int(keep_T.sum())
    return 0.0 if num_tokens == 0 else torch.where(keep_T, entropy_T, 0.0).sum().item() / num_tokens


def dropped_rate(num_dropped: int | torch.Tensor, num_rows: int | torch.Tensor) -> float:
    """Fraction of routed rows dropped (e.g. by expert capacity); 0.0 when there are no rows."""
    dropped, rows = int(num_dropped), int(num_rows)
    if rows < 0 or not 0 <= dropped <= rows:
        raise ValueError(f"need 0 <= num_dropped <= num_rows, got num_dropped={dropped}, num_rows={rows}")
    return 0.0 if rows == 0 else dropped / rows
