"""Expert-choice routing (Zhou et al. 2022, "Mixture-of-Experts with Expert Choice Routing").

Shapes: T tokens, D model dim, O output dim, E experts, C tokens per expert, N = E*C routed rows.

Token choice lets every token pick its K experts. Expert choice turns the choice around: every
expert takes its C best tokens by router score,

    s_TE = the router's scores_TE (softmax over experts per token by default)
    C    = ceil(capacity_factor * T * K / E)          (at most T; capacity_factor None -> 1.0)
    expert e takes top-C tokens of s_TE[:, e];   y_t = sum_{e took t} s_TE[t, e] * f_e(x_t)

so every expert gets exactly C rows (balanced by construction; no balance loss needed) and a token
is taken by anywhere from 0 to E experts. A token that no expert took gets 0 from the routed
experts (only the shared experts, if any, see it).

NOT CAUSAL. Whether expert e takes token t depends on every other token in the batch, later ones
included: changing a future token can change an earlier token's output, and outputs depend on
what else is in the batch. Use it for encoders, classifiers and whole-sequence training; it is
unsuitable for autoregressive decoding (a token cannot be routed before the tokens it competes
with exist).

The ``Routing`` it returns keeps the token-choice field names with one slot per expert:
``expert_ids_TK`` and ``weights_TK`` are (T, E); slot e holds e and weight ``s_TE[t, e]`` if
expert e took token t, else -1 and weight 0. The balance losses and metrics skip -1 slots, so
every ``BalanceConfig`` loss works (``z`` is the usual z-loss of the router logits). Padding
(``mask_T`` False) is taken only if C exceeds the number of real tokens, and then with weight 0.
``RouterOptions.scaling_factor`` multiplies the weights; ``renormalize`` does not apply (a token
has no fixed set of K weights) and correction biases have no effect (a per-expert constant does
not change which tokens an expert ranks highest).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .dispatch import expert_capacity
from .experts import Experts
from .routing import Routing, top_indices


@dataclass(frozen=True)
class ExpertChoice:
    """Which tokens each expert took; rows are grouped by expert, C per expert."""

    token_N: torch.Tensor  # int64 (E*C,): the token of each row
    weights_N: torch.Tensor  # (E*C,): its routing weight (0 for padding)
    counts_E: torch.Tensor  # int64 (E,): C for every expert
    routing: Routing  # (T, E)-slot format, see the module docstring
    tokens_per_expert_E: torch.Tensor  # real tokens taken per expert
    tokens_per_group_G: torch.Tensor  # (1,): real tokens taken by at least one expert (G = 1)
    num_untaken: torch.Tensor  # 0-dim int64: real tokens no expert took


def expert_choice_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float | None) -> int:
    """``C = ceil(capacity_factor * T * K / E)``, at most T (an expert takes a token once)."""
    factor = 1.0 if capacity_factor is None else capacity_factor
    return min(expert_capacity(num_tokens, top_k, num_experts, factor), num_tokens)


def choose_tokens(
    routing: Routing, capacity: int, mask_T: torch.Tensor | None = None, scaling_factor: float = 1.0
) -> ExpertChoice:
    """Each expert takes the ``capacity`` tokens with its highest score (equal scores: the earlier token first,
    on every device; see ``routing.top_indices``)."""
    scores_TE = routing.scores_TE
    T, E = scores_TE.shape
    pick_TE = scores_TE.detach()
    if mask_T is not None:  # padding ranks below every real token
        pick_TE = pick_TE.masked_fill(~mask_T.unsqueeze(-1), float("-inf"))
    token_EC = top_indices(pick_TE.t(), capacity)
    real_EC = torch.ones_like(token_EC, dtype=torch.bool) if mask_T is None else mask_T[token_EC]
    weights_EC = torch.where(real_EC, scores_TE.t().gather(1, token_EC) * scaling_factor, 0.0)

    taken_TE = torch.zeros(E, T, dtype=torch.bool, device=scores_TE.device).scatter(1, token_EC, real_EC).t()
    weights_TE = scores_TE.new_zeros(E, T).scatter(1, token_EC, weights_EC).t()
    ids_TE = torch.where(taken_TE, torch.arange(E, device=scores_TE.device), -1)
    real_T = taken_TE.new_ones(T) if mask_T is None else mask_T
    taken_T = taken_TE.any(-1)
    return ExpertChoice(
        token_N=token_EC.reshape(-1),
        weights_N=weights_EC.reshape(-1),
        counts_E=torch.full((E,), capacity, dtype=torch.int64, device=scores_TE.device),
        routing=replace(routing, expert_ids_TK=ids_TE, weights_TK=weights_TE),
        tokens_per_expert_E=real_EC.sum(-1),
        tokens_per_group_G=(real_T & taken_T).sum().view(1),
        num_untaken=(real_T & ~taken_T).sum(),
    )


def run_experts(experts: Experts, x_TD: torch.Tensor, choice: ExpertChoice) -> torch.Tensor:
    """``y_t = sum over rows n of token t: weights_N[n] * f_{e(n)}(x_t)``, shape (T, O)."""
    x_ND = x_TD.index_select(0, choice.token_N)  # already grouped by expert: C rows each
    y_NO = experts(x_ND, choice.counts_E)
    y_NO = y_NO * choice.weights_N.to(y_NO.dtype).unsqueeze(-1)
    return y_NO.new_zeros(x_TD.shape[0], y_NO.shape[-1]).index_add(0, choice.token_N, y_NO)
