"""dualroute: dual-layer routed mixture-of-experts for PyTorch.

A group router picks J of G expert groups per token, an expert router picks K experts inside
them; dispatch is sort-based and dropless. See ``MoELayer``.
"""

from .balance import BalanceConfig, balance_metrics, update_correction_biases
from .experts import ExpertConfig, Experts
from .layer import DenseFFN, MoEAux, MoEConfig, MoELayer
from .routing import Router, RouterConfig, RouterOptions, Routing

__version__ = "0.1.0"

__all__ = [
    "BalanceConfig",
    "DenseFFN",
    "ExpertConfig",
    "Experts",
    "MoEAux",
    "MoEConfig",
    "MoELayer",
    "Router",
    "RouterConfig",
    "RouterOptions",
    "Routing",
    "balance_metrics",
    "update_correction_biases",
]
