"""``dualroute bench hf``: transformers' Mixtral MoE block against the dualroute block with the same weights.

Shapes: T tokens, D model dim, F expert hidden dim, E experts, K experts per token.

transformers 5 runs a MoE block's experts by a selectable ``experts_implementation``: ``eager`` (a
loop over the experts that received tokens), ``batched_mm`` (gathers one weight matrix per routed
row: fast for a handful of tokens, memory ``T*K*3*D*F`` floats) and ``grouped_mm`` (sort by expert,
``torch._grouped_mm``; transformers' default). GPU-only kernels (``deepgemm``, ``sonicmoe``) are not
run on CPU. Every available one is timed, alternating with dualroute's ``MoELayer`` (in the drop-in
adapter) round-robin in one process; the table shows medians and ``hf / dualroute`` ratios
(> 1: dualroute is faster).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

from .swap import require_transformers

_IMPLS = ("eager", "batched_mm", "grouped_mm")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    transformers = require_transformers()
    torch.manual_seed(args.seed)
    contenders = _contenders(args)
    header = (f"dualroute bench hf: Mixtral-like MoE block D={args.dim} F={args.hidden} E={args.experts} "
              f"K={args.top_k} float32, cpu, {torch.get_num_threads()} threads, transformers "
              f"{transformers.__version__}, torch {torch.__version__}")
    print(header, flush=True)
    records = []
    for T in args.tokens:
        for mode in ("forward", "forward+backward"):
            records += _measure(contenders, T, mode, args)
    print()
    print(format_table(records, list(contenders)))
    if args.json:
        Path(args.json).write_text(json.dumps({"header": header, "records": records}, indent=1))
        print(f"\nwrote {args.json}")
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dualroute bench hf", description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=_ints, default=[1, 16, 256, 4096], help="comma-separated T values")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--budget", type=float, default=4.0, help="seconds of timing per (T, mode), all contenders")
    p.add_argument("--batched-mm-max-gib", type=float, default=1.0,
                   help="skip batched_mm where its gathered weights would exceed this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the measurements here")
    return p


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def _contenders(args: argparse.Namespace) -> dict[str, torch.nn.Module]:
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    from .hf_config import arch_from_hf
    from .swap import _adapter

    config = MixtralConfig(hidden_size=args.dim, intermediate_size=args.hidden, num_local_experts=args.experts,
                           num_experts_per_tok=args.top_k, num_hidden_layers=1, vocab_size=8)
    reference = MixtralSparseMoeBlock(config)
    with torch.no_grad():
        for p in reference.parameters():
            p.normal_(0.0, 0.02)
    blocks: dict[str, torch.nn.Module] = {}
    for impl in _IMPLS:
        block_config = copy.deepcopy(config)
        block_config._experts_implementation = impl
        block = MixtralSparseMoeBlock(block_config)
        block.load_state_dict(reference.state_dict())
        blocks[f"hf-{impl}"] = block
    moe = arch_from_hf(config.to_dict()).moe
    blocks["dualroute"] = _adapter(copy.deepcopy(reference), moe, "mixtral", "bench")
    for block in blocks.values():
        block.train()  # as in fine-tuning; the router has no jitter here, so forward is the same as eval
    return blocks


def _measure(contenders: dict, T: int, mode: str, args: argparse.Namespace) -> list[dict]:
    gen = torch.Generator().manual_seed(args.seed + T)
    x = torch.randn(1, T, args.dim, generator=gen)
    grad = torch.randn(1, T, args.dim, generator=gen)
    gathered_gib = T * args.top_k * 3 * args.dim * args.hidden * 4 / 2**30
    names = [n for n in contenders if not (n == "hf-batched_mm" and gathered_gib > args.batched_mm_max_gib)]
    outputs = {n: _step(contenders[n], x, grad, mode) for n in names}  # warm-up, and the outputs to compare
    reference = outputs["dualroute"]
    first = {n: _timed(contenders[n], x, grad, mode) for n in names}
    reps = max(3, min(50, int(args.budget / max(sum(first.values()), 1e-6))))
    times = {n: [first[n]] for n in names}
    for _ in range(reps - 1):
        for n in names:  # round-robin, so drifts in machine load hit every contender alike
            times[n].append(_timed(contenders[n], x, grad, mode))
    records = []
    for n in contenders:
        skipped = n not in names
        records.append({"T": T, "mode": mode, "contender": n, "reps": 0 if skipped else reps,
                        "median_ms": None if skipped else 1e3 * statistics.median(times[n]),
                        "max_abs_diff_vs_dualroute": None if skipped else
                        float((outputs[n] - reference).abs().max()),
                        "note": f"skipped: gathers {gathered_gib:.1f} GiB of weights" if skipped else ""})
    print(f"T={T:5d} {mode:17s} " + "  ".join(
        f"{r['contender']} {r['median_ms']:.2f} ms" if r["median_ms"] is not None else f"{r['contender']} skipped"
        for r in records), flush=True)
    return records


def _step(block: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "forward":
        with torch.no_grad():
            return _hidden(block(x))
    x = x.detach().requires_grad_(True)
    y = _hidden(block(x))
    y.backward(grad)
    for p in block.parameters():
        p.grad = None
    return y.detach()


def _hidden(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def _timed(block: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor, mode: str) -> float:
    start = time.perf_counter()
    _step(block, x, grad, mode)
    return time.perf_counter() - start


def format_table(records: list[dict], names: list[str]) -> str:
    hf = [n for n in names if n != "dualroute"]
    head = ["T", "mode", *[f"{n} ms" for n in names], *[f"{n} / dualroute" for n in hf]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows: dict[tuple[int, str], dict[str, float | None]] = {}
    for r in records:
        rows.setdefault((r["T"], r["mode"]), {})[r["contender"]] = r["median_ms"]
    for (T, mode), ms in rows.items():
        ours = ms["dualroute"]
        cells = [str(T), mode, *["skipped" if ms[n] is None else f"{ms[n]:.2f}" for n in names]]
        cells += ["-" if ms[n] is None else f"{ms[n] / ours:.2f}x" for n in hf]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("\nMedians over round-robin repetitions in one process; ratio > 1: dualroute is faster.")
    return "\n".join(lines)
