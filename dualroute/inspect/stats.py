"""Routing statistics as pure functions on numpy arrays: loads, balance, co-selection, specialisation,
stability between two checkpoints, and the routing history of a training log.

Shapes: T tokens, E experts, G groups, M = E / G experts per group, K experts and J groups chosen per
token, Y labels (image classes, or token ids for text), U units (experts or groups), S logged steps,
L MoE layers. An id of -1 is an empty slot (expert-choice routing leaves them) and is skipped everywhere.

Counts come back as int64 arrays and shares as float64, so the report and the figures read the same
numbers. Entropies are in nats (as in ``dualroute.losses``), mutual information in bits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dualroute.losses import max_violation

LOG_KEYS = ("maxvio", "group_maxvio", "entropy", "group_entropy", "dropped", "val_maxvio", "val_entropy")


@dataclass(frozen=True)
class LayerRouting:
    """What one MoE layer decided for every inspected token, gathered over batches."""

    expert_ids_TK: np.ndarray  # int64
    weights_TK: np.ndarray  # float: the combine weights
    group_ids_TJ: np.ndarray  # int64
    tokens_per_expert_E: np.ndarray  # int64, routed rows before capacity (the layer's own count)
    tokens_per_group_G: np.ndarray  # int64, each token once per kept group
    num_dropped: int  # rows dropped by capacity
    entropy_T: np.ndarray  # per token, of the router's distribution over experts (nats)
    group_entropy_T: np.ndarray  # per token, over groups

    @property
    def num_experts(self) -> int:
        return len(self.tokens_per_expert_E)

    @property
    def num_groups(self) -> int:
        return len(self.tokens_per_group_G)


@dataclass(frozen=True)
class LayerStats:
    """Balance figures of one layer over all inspected tokens."""

    num_tokens: int
    tokens_per_expert_E: np.ndarray
    tokens_per_group_G: np.ndarray
    usage_GM: np.ndarray  # tokens_per_expert_E as G rows of M experts
    maxvio: float  # max load / mean load - 1, experts
    group_maxvio: float
    entropy: float  # mean over tokens, nats (ln E = uniform)
    group_entropy: float
    dropped_rate: float  # dropped rows / routed rows
    coselect_EE: np.ndarray  # tokens that chose both i and j; the diagonal is the tokens that chose i


def layer_stats(r: LayerRouting) -> LayerStats:
    E, G = r.num_experts, r.num_groups
    rows = int(r.tokens_per_expert_E.sum())
    return LayerStats(
        num_tokens=len(r.expert_ids_TK),
        tokens_per_expert_E=r.tokens_per_expert_E,
        tokens_per_group_G=r.tokens_per_group_G,
        usage_GM=r.tokens_per_expert_E.reshape(G, E // G),
        maxvio=max_violation(torch.from_numpy(r.tokens_per_expert_E)),
        group_maxvio=max_violation(torch.from_numpy(r.tokens_per_group_G)),
        entropy=_mean(r.entropy_T),
        group_entropy=_mean(r.group_entropy_T),
        dropped_rate=r.num_dropped / rows if rows else 0.0,
        coselect_EE=coselection(r.expert_ids_TK, E),
    )


def _mean(x: np.ndarray) -> float:
    return float(x.mean()) if len(x) else 0.0


def coselection(ids_TK: np.ndarray, num_units: int) -> np.ndarray:
    """``C[i, j]`` = tokens whose chosen set holds both i and j (the diagonal: tokens that chose i)."""
    U = num_units
    counts = np.zeros(U * U, dtype=np.int64)
    K = ids_TK.shape[1]
    for a in range(K):
        for b in range(K):
            ok_T = (ids_TK[:, a] >= 0) & (ids_TK[:, b] >= 0)
            counts += np.bincount(ids_TK[ok_T, a] * U + ids_TK[ok_T, b], minlength=U * U)
    return counts.reshape(U, U)


def contingency(labels_T: np.ndarray, ids_TK: np.ndarray, num_labels: int, num_units: int) -> np.ndarray:
    """``counts_YU[y, u]``: routed rows (token, slot) of tokens labelled y that went to unit u."""
    labels_TK = np.broadcast_to(labels_T[:, None], ids_TK.shape)
    valid_TK = ids_TK >= 0
    flat = labels_TK[valid_TK] * num_units + ids_TK[valid_TK]
    return np.bincount(flat, minlength=num_labels * num_units).reshape(num_labels, num_units)


def mutual_information(counts_YU: np.ndarray) -> tuple[float, float]:
    """``(I(Y; U), H(Y))`` in bits: the plug-in estimate from a table of joint counts.

    I = H(Y) when the unit determines the label (0 when they are independent). The plug-in estimate is
    biased upwards by about ``(cells - 1) / (2 n ln 2)`` bits for n rows; compare with shuffled labels.
    """
    total = counts_YU.sum()
    if total == 0:
        return 0.0, 0.0
    p_YU = counts_YU / total
    p_Y, p_U = p_YU.sum(1), p_YU.sum(0)
    nz = p_YU > 0
    mi = float((p_YU[nz] * np.log2(p_YU[nz] / np.outer(p_Y, p_U)[nz])).sum())
    h_y = float(-(p_Y[p_Y > 0] * np.log2(p_Y[p_Y > 0])).sum())
    return max(mi, 0.0), h_y


def top1(ids_TK: np.ndarray, weights_TK: np.ndarray) -> np.ndarray:
    """Each token's chosen unit with the largest combine weight (-1 if it has none)."""
    w_TK = np.where(ids_TK >= 0, weights_TK, -np.inf)
    return ids_TK[np.arange(len(ids_TK)), w_TK.argmax(1)] if ids_TK.shape[1] else np.full(len(ids_TK), -1)


def top_labels(counts_YU: np.ndarray, n: int) -> list[list[tuple[int, int]]]:
    """Per unit, its ``n`` most frequent labels as ``(label, count)``, count > 0, ties by label."""
    out = []
    for u in range(counts_YU.shape[1]):
        order = np.lexsort((np.arange(counts_YU.shape[0]), -counts_YU[:, u]))[:n]
        out.append([(int(y), int(counts_YU[y, u])) for y in order if counts_YU[y, u] > 0])
    return out


@dataclass(frozen=True)
class Stability:
    """How one layer's routing of the same tokens differs between two checkpoints A and B."""

    num_tokens: int
    top1_changed: float  # share of tokens whose top-1 expert differs
    set_changed: float  # share whose set of K experts differs
    group_set_changed: float  # share whose set of J groups differs
    transitions_EE: np.ndarray  # tokens with top-1 expert i in A and j in B


def stability(a: LayerRouting, b: LayerRouting) -> Stability:
    if a.expert_ids_TK.shape != b.expert_ids_TK.shape or a.group_ids_TJ.shape != b.group_ids_TJ.shape:
        raise ValueError(f"routings differ in shape: experts {a.expert_ids_TK.shape} vs {b.expert_ids_TK.shape}, "
                         f"groups {a.group_ids_TJ.shape} vs {b.group_ids_TJ.shape}")
    E, T = a.num_experts, len(a.expert_ids_TK)
    top_a, top_b = top1(a.expert_ids_TK, a.weights_TK), top1(b.expert_ids_TK, b.weights_TK)
    both_T = (top_a >= 0) & (top_b >= 0)
    transitions = np.bincount(top_a[both_T] * E + top_b[both_T], minlength=E * E).reshape(E, E)
    return Stability(
        num_tokens=T,
        top1_changed=_share(top_a != top_b),
        set_changed=_share(_sets_differ(a.expert_ids_TK, b.expert_ids_TK)),
        group_set_changed=_share(_sets_differ(a.group_ids_TJ, b.group_ids_TJ)),
        transitions_EE=transitions,
    )


def _sets_differ(a_TK: np.ndarray, b_TK: np.ndarray) -> np.ndarray:
    return (np.sort(a_TK, axis=1) != np.sort(b_TK, axis=1)).any(axis=1)


def _share(flags_T: np.ndarray) -> float:
    return float(flags_T.mean()) if len(flags_T) else 0.0


@dataclass(frozen=True)
class Series:
    """One logged routing metric over training: ``values_SL[s, l]`` at ``steps_S[s]`` (NaN: not logged)."""

    steps_S: np.ndarray
    values_SL: np.ndarray


def routing_history(records: list[dict]) -> dict[str, Series]:
    """The routing metrics (``LOG_KEYS``) of a run's ``metrics.jsonl`` records, per layer where logged."""
    history = {}
    for key in LOG_KEYS:
        rows = [(r["step"], v) for r in records if "step" in r and (v := _numbers(r.get(key))) is not None]
        if not rows:
            continue
        L = max(len(v) for _, v in rows)
        values_SL = np.full((len(rows), L), np.nan)
        for s, (_, v) in enumerate(rows):
            values_SL[s, : len(v)] = v
        history[key] = Series(np.array([step for step, _ in rows]), values_SL)
    return history


def _numbers(value) -> np.ndarray | None:
    """A logged number or list of numbers as a 1-D float array; None for anything else."""
    if value is None:
        return None
    try:
        v = np.atleast_1d(np.asarray(value, dtype=np.float64))
    except (TypeError, ValueError):
        return None
    return v if v.ndim == 1 and len(v) else None
