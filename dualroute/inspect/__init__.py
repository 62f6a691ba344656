"""What the routers of a trained checkpoint do: loads, balance, co-selection, specialisation, how routing
moved during training and between checkpoints, as PNG figures and a ``report.md`` that links them.

    from dualroute.inspect import inspect_checkpoint
    report = inspect_checkpoint("runs/lm-dual", "runs/lm-dual/inspect")

The pipeline is ``collect`` (load, run, gather each layer's routing) -> ``analysis`` (every number,
once) -> ``figures`` and ``report`` (both read the same ``Analysis``). ``stats`` holds the pure
functions. ``dualroute inspect`` is ``cli_hook.inspect_main``.
"""

from __future__ import annotations

import os
from pathlib import Path

from .analysis import Analysis, Heatmap, Specialisation, analyse
from .collect import Inspected, check_comparable, load, open_checkpoint, route
from .report import check_output, write_report
from .stats import (LayerRouting, LayerStats, Stability, coselection, contingency, layer_stats, mutual_information,
                    routing_history, stability, top1)


def analyse_checkpoint(path: str | os.PathLike, *, data: str | os.PathLike | None = None,
                       compare: str | os.PathLike | None = None, batches: int = 8, device: str = "cpu") -> Analysis:
    """Route ``batches`` validation batches through the checkpoint (or run directory) at ``path``; analyse.

    ``data`` replaces the path of the run's data config; ``compare`` is a second checkpoint routed on the
    same tokens. Bad input raises FileNotFoundError or ValueError naming the path.
    """
    from dualroute.train.trainer import resolve_device

    a = load(path, data, batches, resolve_device(device))
    b = None
    if compare is not None:
        b = open_checkpoint(compare, data, batches, resolve_device(device))
        check_comparable(a, b)
        b = route(b, a)
    return analyse(a, b)


def inspect_checkpoint(path: str | os.PathLike, out: str | os.PathLike, **options) -> Path:
    """``analyse_checkpoint(path, **options)`` written as figures and ``report.md`` into ``out``; returns the
    report's path. An output folder that cannot be written is reported before any work is done."""
    out = check_output(out)
    return write_report(analyse_checkpoint(path, **options), out)


__all__ = ["Analysis", "Heatmap", "Inspected", "LayerRouting", "LayerStats", "Specialisation", "Stability", "analyse",
           "analyse_checkpoint", "check_comparable", "check_output", "contingency", "coselection",
           "inspect_checkpoint", "layer_stats", "load", "mutual_information", "open_checkpoint", "route",
           "routing_history", "stability", "top1", "write_report"]
