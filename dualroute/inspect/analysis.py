"""Every number of an inspection, computed once: the figures and the report both read an ``Analysis``.

Shapes: T tokens, E experts, G groups, Y labels (image classes, or token ids for text).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dualroute.train.metrics_log import read_jsonl

from .collect import Inspected
from .stats import (LayerStats, Series, Stability, contingency, layer_stats, mutual_information,
                    routing_history, stability, top1, top_labels)

TOP_TOKENS = 8  # per expert, in the report
HEATMAP_TOKENS = 24  # most frequent tokens shown in the text specialisation heatmap
EXAMPLES = 2  # per expert and layer: tokens shown in context
SHUFFLE_SEED = 0


@dataclass(frozen=True)
class Specialisation:
    """How much one layer's routing tells about the label: the image class, or the token id."""

    label_expert_YE: np.ndarray  # routed rows per (label, expert)
    label_group_YG: np.ndarray  # (token, kept group) pairs per (label, group)
    mi_expert: float  # I(label; expert) in bits, over routed rows
    mi_group: float  # I(label; group) in bits, over kept groups
    label_entropy: float  # H(label) in bits
    mi_expert_shuffled: float  # I(label; expert) with the labels shuffled: the estimate's bias
    mi_expert_first: float | None  # images: the class token only
    mi_expert_first_shuffled: float | None  # images: the class token only, labels shuffled
    label_expert_first_YE: np.ndarray | None  # images: the class token's routed rows per (class, expert)

    @property
    def mi_expert_norm(self) -> float:
        return self.mi_expert / self.label_entropy if self.label_entropy else 0.0

    @property
    def mi_group_norm(self) -> float:
        return self.mi_group / self.label_entropy if self.label_entropy else 0.0


@dataclass(frozen=True)
class Heatmap:
    """One figure of P(expert | label) heatmaps: the layers that route one token stream (all layers where
    there is one stream), the labels shown as rows, and per title one matrix per layer."""

    stream: str  # "" for the only stream; "source" / "target" for an encoder-decoder
    layers: list[int]  # MoE layer indices, in order
    labels: list[int]  # label of each row
    shown: dict[str, list[np.ndarray]]  # title -> per layer (of ``layers``), P(expert | label)


@dataclass
class Analysis:
    inspected: Inspected
    layers: list[LayerStats]
    specialisation: list[Specialisation]
    heatmaps: list[Heatmap]  # the specialisation heatmaps: one per token stream
    top_tokens: list[list[list[tuple[int, int]]]] | None  # text: per layer, per expert, (token id, rows)
    examples: list[list[list[int]]] | None  # text: per layer, per expert, token indices routed there (top-1)
    history: dict[str, Series]  # routing metrics logged during training
    history_path: Path | None
    other: Inspected | None = None  # --compare: the other checkpoint, run on the same tokens
    stability: list[Stability] | None = None


def analyse(a: Inspected, b: Inspected | None = None) -> Analysis:
    """All statistics of ``a`` (and of how ``b`` routes the same tokens differently)."""
    special = [specialise(a, i) for i in range(len(a.layers))]
    history, history_path = _history(a.path.parent / "metrics.jsonl")
    return Analysis(
        inspected=a,
        layers=[layer_stats(r) for r in a.layers],
        specialisation=special,
        heatmaps=[_shown(a, special, stream) for stream in a.streams],
        top_tokens=[top_labels(s.label_expert_YE, TOP_TOKENS) for s in special] if a.token_labels else None,
        examples=[pick_examples(top1(r.expert_ids_TK, r.weights_TK), r.num_experts, EXAMPLES) for r in a.layers]
        if a.token_labels else None,
        history=history,
        history_path=history_path,
        other=b,
        stability=None if b is None else [stability(x, y) for x, y in zip(a.layers, b.layers)],
    )


def _history(path: Path) -> tuple[dict[str, Series], Path | None]:
    """The run's logged routing metrics; none when there is no log, or a line of it is unreadable."""
    if not path.is_file():
        return {}, None
    try:
        return routing_history(read_jsonl(path)), path
    except ValueError as e:  # a run killed mid-write can leave a broken last line
        warnings.warn(f"training history skipped: {e}", stacklevel=3)
        return {}, None


def specialise(a: Inspected, layer: int) -> Specialisation:
    """Label x expert and label x group tables of MoE layer ``layer``, and the mutual information they hold."""
    r, Y, labels_T = a.layers[layer], a.num_labels, a.rows[layer].labels_T
    label_expert_YE = contingency(labels_T, r.expert_ids_TK, Y, r.num_experts)
    mi_expert, h_label = mutual_information(label_expert_YE)
    label_group_YG = contingency(labels_T, r.group_ids_TJ, Y, r.num_groups)
    mi_group, _ = mutual_information(label_group_YG)
    mi_shuffled = _shuffled_mi(labels_T, r.expert_ids_TK, Y, r.num_experts)
    first = first_shuffled = first_YE = None
    if not a.token_labels:
        cls_T = a.rows[layer].positions_T == 0
        first_YE = contingency(labels_T[cls_T], r.expert_ids_TK[cls_T], Y, r.num_experts)
        first, _ = mutual_information(first_YE)
        first_shuffled = _shuffled_mi(labels_T[cls_T], r.expert_ids_TK[cls_T], Y, r.num_experts)
    return Specialisation(label_expert_YE, label_group_YG, mi_expert, mi_group, h_label, mi_shuffled, first,
                          first_shuffled, first_YE)


def _shuffled_mi(labels_T: np.ndarray, ids_TK: np.ndarray, num_labels: int, num_experts: int) -> float:
    """I(label; expert) with the labels permuted: what the estimate gives when routing ignores the label."""
    shuffled_T = np.random.default_rng(SHUFFLE_SEED).permutation(labels_T)
    return mutual_information(contingency(shuffled_T, ids_TK, num_labels, num_experts))[0]


def _shown(a: Inspected, special: list[Specialisation], stream: str) -> Heatmap:
    """What the specialisation heatmaps of the layers routing ``stream`` show: P(expert | label), each row
    summing to 1 over routed rows.

    Images: every class, for all tokens and for the class token alone. Text: the stream's most frequent tokens.
    """
    layers = [i for i, r in enumerate(a.rows) if r.stream == stream]
    mine = [special[i] for i in layers]
    if not a.token_labels:
        rows = list(range(a.num_labels))
        return Heatmap(stream, layers, rows, {
            "P(expert | class) %, all tokens": [_normalise(s.label_expert_YE) for s in mine],
            "P(expert | class) %, class token": [_normalise(s.label_expert_first_YE) for s in mine]})
    frequency_Y = np.bincount(a.rows[layers[0]].labels_T, minlength=a.num_labels)
    rows = [int(y) for y in np.argsort(-frequency_Y, kind="stable")[:HEATMAP_TOKENS] if frequency_Y[y] > 0]
    return Heatmap(stream, layers, rows, {"P(expert | token) %": [_normalise(s.label_expert_YE[rows]) for s in mine]})


def _normalise(counts_YU: np.ndarray) -> np.ndarray:
    """Each row as shares of its total (a row of zeros stays zero)."""
    total = counts_YU.sum(axis=1, keepdims=True)
    return np.divide(counts_YU, total, out=np.zeros(counts_YU.shape), where=total > 0)


def pick_examples(top1_T: np.ndarray, num_experts: int, n: int) -> list[list[int]]:
    """Per expert, up to ``n`` token indices whose top-1 expert it is, spread evenly over the data."""
    picks = []
    for e in range(num_experts):
        mine = np.flatnonzero(top1_T == e)
        at = np.unique(np.linspace(0, len(mine) - 1, n + 2)[1:-1].round().astype(int)) if len(mine) else []
        picks.append([int(mine[i]) for i in at])
    return picks
