"""Figures of an ``Analysis``, drawn with matplotlib's Agg canvas (no pyplot, no global backend change).

Each function draws one PNG from arrays computed elsewhere and returns its path. Shapes: E experts,
G groups, M experts per group, Y labels, R shown rows, S logged steps, L layers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from .stats import LayerStats, Series, Stability

DPI = 90
ANNOTATE_MAX = 12  # annotate heatmap cells when both sides are at most this long


def _figure(rows: int, cols: int, width: float, height: float):
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("dualroute inspect draws its figures with matplotlib: pip install matplotlib "
                          "(or pip install dualroute[plots])") from e
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    return fig, fig.subplots(rows, cols, squeeze=False)


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=DPI)
    return path


def _heatmap(fig, ax, values: np.ndarray, title: str, xlabels: Sequence[str], ylabels: Sequence[str],
             percent: bool = True) -> None:
    import matplotlib
    from matplotlib.ticker import PercentFormatter

    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#dddddd")
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, aspect="auto", vmin=0)
    ax.set_title(title, fontsize=9)
    ax.set_xticks(range(len(xlabels)), xlabels, fontsize=7)
    ax.set_yticks(range(len(ylabels)), ylabels, fontsize=8)
    if max(values.shape) <= ANNOTATE_MAX:
        top = np.nanmax(values) if np.isfinite(values).any() else 0
        for (i, j), v in np.ndenumerate(values):
            if np.isfinite(v):
                ax.text(j, i, f"{100 * v:.0f}" if percent else f"{v:.0f}", ha="center", va="center", fontsize=6,
                        color="black" if v > 0.6 * top else "white")
    fig.colorbar(image, ax=ax, shrink=0.8, format=PercentFormatter(1.0, decimals=0) if percent else None)


def _names(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i}" for i in range(n)]


def _titles(titles: Sequence[str] | None, n: int) -> list[str]:
    """How each of ``n`` layers is named in titles: ``titles``, or ``layer 0``, ``layer 1``, ..."""
    return list(titles) if titles is not None else _names("layer ", n)


def load_bars(layers: list[LayerStats], path: Path, titles: Sequence[str] | None = None) -> Path:
    """Per layer: share of routed rows per expert (coloured by group) and per group, with MaxVio."""
    fig, axes = _figure(len(layers), 2, 4.2, 2.2)
    for i, (s, (ax_e, ax_g)) in zip(_titles(titles, len(layers)), zip(layers, axes)):
        G, M = s.usage_GM.shape
        share_E = s.tokens_per_expert_E / max(s.tokens_per_expert_E.sum(), 1)
        share_G = s.tokens_per_group_G / max(s.tokens_per_group_G.sum(), 1)
        colors = [f"C{e // M}" for e in range(G * M)]
        ax_e.bar(range(G * M), share_E, color=colors)
        ax_e.axhline(1 / (G * M), color="k", lw=0.8, ls="--")
        ax_e.set_title(f"{i}: experts (MaxVio {s.maxvio:.2f})", fontsize=9)
        ax_e.set_xticks(range(G * M), _names("e", G * M), fontsize=7)
        ax_g.bar(range(G), share_G, color=[f"C{g}" for g in range(G)])
        ax_g.axhline(1 / G, color="k", lw=0.8, ls="--")
        ax_g.set_title(f"{i}: groups (MaxVio {s.group_maxvio:.2f})", fontsize=9)
        ax_g.set_xticks(range(G), _names("g", G), fontsize=7)
        ax_e.set_ylabel("share of rows", fontsize=8)
    return _save(fig, path)


def usage_heatmaps(layers: list[LayerStats], path: Path, titles: Sequence[str] | None = None) -> Path:
    """Per layer: the G x M grid of expert loads, in % of routed rows."""
    fig, axes = _figure(1, len(layers), 3.0, 2.4)
    for i, (s, ax) in zip(_titles(titles, len(layers)), zip(layers, axes[0])):
        G, M = s.usage_GM.shape
        _heatmap(fig, ax, s.usage_GM / max(s.usage_GM.sum(), 1), f"{i}: % of rows", _names("m", M),
                 _names("g", G))
    return _save(fig, path)


def coselection_heatmaps(layers: list[LayerStats], path: Path, titles: Sequence[str] | None = None) -> Path:
    """Per layer: % of tokens that chose both experts i and j (diagonal left out: it is the load)."""
    fig, axes = _figure(1, len(layers), 3.4, 3.0)
    for i, (s, ax) in zip(_titles(titles, len(layers)), zip(layers, axes[0])):
        E = len(s.tokens_per_expert_E)
        share_EE = s.coselect_EE / max(s.num_tokens, 1)
        np.fill_diagonal(share_EE, np.nan)
        _heatmap(fig, ax, share_EE, f"{i}: % of tokens with both", _names("e", E), _names("e", E))
    return _save(fig, path)


def label_heatmaps(shown: dict[str, list[np.ndarray]], row_names: list[str], ylabel: str, path: Path,
                   titles: Sequence[str] | None = None) -> Path:
    """One row of label x expert heatmaps per entry of ``shown`` (its title -> one matrix per layer)."""
    L = len(next(iter(shown.values())))
    fig, axes = _figure(len(shown), L, 3.4, max(2.6, 0.17 * len(row_names) + 1.0))
    for row, (title, matrices) in zip(axes, shown.items()):
        for i, (values, ax) in zip(_titles(titles, L), zip(matrices, row)):
            _heatmap(fig, ax, values, f"{i}: {title}", _names("e", values.shape[1]), row_names)
            ax.set_ylabel(ylabel, fontsize=8)
    return _save(fig, path)


def group_heatmaps(label_group_YG: list[np.ndarray], row_names: list[str], path: Path) -> Path:
    """Per layer: where each class goes at level 1, P(group | class) in % of its (token, kept group) pairs."""
    shares = [c / np.maximum(c.sum(1, keepdims=True), 1) for c in label_group_YG]
    fig, axes = _figure(1, len(shares), 2.6, 2.8)
    for i, (values, ax) in enumerate(zip(shares, axes[0])):
        _heatmap(fig, ax, values, f"layer {i}: P(group | class) %", _names("g", values.shape[1]), row_names)
    return _save(fig, path)


def history_plot(history: dict[str, Series], step: int | None, path: Path,
                 titles: Sequence[str] | None = None) -> Path:
    """Each logged routing metric over training steps, one line per layer (``titles``: the layers' names, used
    where the log has that many layers)."""
    keys = list(history)
    cols = min(3, len(keys))
    rows = -(-len(keys) // cols)
    fig, axes = _figure(rows, cols, 3.6, 2.4)
    for ax, key in zip(axes.flat, keys):
        series = history[key]
        L = series.values_SL.shape[1]
        names = titles if titles is not None and len(titles) == L else None
        for layer, name in enumerate(_titles(names, L)):
            ax.plot(series.steps_S, series.values_SL[:, layer], lw=1, label=name)
        if step is not None:
            ax.axvline(step, color="k", lw=0.8, ls=":")
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=6)
    return _save(fig, path)


def stability_plot(stability: list[Stability], path: Path, titles: Sequence[str] | None = None) -> Path:
    """Share of tokens whose routing changed between the two checkpoints, and top-1 transitions per layer."""
    L = len(stability)
    fig, axes = _figure(1, L + 1, 3.2, 2.8)
    x = np.arange(L)
    kinds = [("top-1 expert", "top1_changed"), ("expert set", "set_changed"), ("group set", "group_set_changed")]
    for k, (label, name) in enumerate(kinds):
        axes[0, 0].bar(x + (k - 1) * 0.27, [getattr(s, name) for s in stability], width=0.27, label=label)
    axes[0, 0].set_xticks(x, _titles(titles, L), fontsize=7)
    axes[0, 0].set_ylim(0, 1)
    axes[0, 0].set_title("share of tokens that changed", fontsize=9)
    axes[0, 0].legend(fontsize=6)
    for i, (s, ax) in zip(_titles(titles, L), zip(stability, axes[0, 1:])):
        E = s.transitions_EE.shape[0]
        share = s.transitions_EE / np.maximum(s.transitions_EE.sum(1, keepdims=True), 1)
        _heatmap(fig, ax, share, f"{i}: top-1 A (rows) -> B %", _names("e", E), _names("e", E))
    return _save(fig, path)
