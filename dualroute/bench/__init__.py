"""``dualroute bench``: every benchmark of the project, one module per sub-command.

    layer.py     dualroute bench layer: one MoE layer vs the dense FFN of equal active size, flat top-k,
                 64 experts, K=4, decode sizes
    lm.py        dualroute bench lm: the MoE language models' training step vs their dense twin
                 (--parts: one layer by stage)
    generate.py  dualroute bench generate: per-token KV-cache decoding latency vs the dense twin
    balance.py   dualroute bench balance: MaxVio and task loss of each balancing method at both levels
    hf.py        dualroute bench hf: transformers' Mixtral MoE block vs dualroute's, same weights
                 (needs transformers)
    ep.py        dualroute bench ep: bytes sent and step time of expert parallelism, flat vs dual-layer
    mt.py        dualroute bench mt: the encoder-decoder presets' training step vs their dense twin
    scaling.py   dualroute bench scaling: E = 8..64 experts, flat vs dual-layer at a fixed active size:
                 trains them (resumable), then loss at equal steps and time, step time, router share, EP bytes

``common.py`` holds what they share (device/dtype arguments, round-robin timing). A sub-command's module
is imported only when it runs, so importing this package does not import transformers (an optional
extra that only ``bench hf`` needs).
"""

from __future__ import annotations

import importlib
import sys

BENCHES = ("layer", "lm", "generate", "balance", "hf", "ep", "mt", "scaling")  # each a module here with main(argv) -> int


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in BENCHES:
        print(f"usage: dualroute bench {{{','.join(BENCHES)}}} [options]", file=sys.stderr)
        return 2
    return importlib.import_module(f"{__name__}.{argv[0]}").main(argv[1:])
