"""``dualroute bench hf``: transformers' Mixtral MoE block against the dualroute block with the same weights.

Shapes: T tokens, D model dim, F expert hidden dim, E experts, K experts per token.

transformers 5 runs a MoE block's experts by a selectable ``experts_implementation``: ``eager`` (a
loop over the experts that received tokens), ``batched_mm`` (gathers one weight matrix per routed
row: fast for a handful of tokens, memory ``T*K*3*D*F`` floats) and ``grouped_mm`` (sort by expert,
``torch._grouped_mm``; transformers' default). Kernels that need extra packages (``deepgemm``,
``sonicmoe``) are not run. Every available one is timed, alternating with dualroute's ``MoELayer`` (in
the drop-in adapter) round-robin in one process; the table shows medians and ``hf / dualroute`` ratios
(> 1: dualroute is faster). A contender that raises (a kernel without this device or dtype) is reported
as failed and the others go on.

``--device`` (cpu, cuda) and ``--dtype`` (float32, bfloat16, float16) place every block's weights and
the inputs; dualroute's router stays float32, as ``swap_moe_blocks`` keeps it. On CUDA every timing
waits for the device (``torch.cuda.synchronize()``) before the clock is read.

Roofline evidence: the process also times a large square matmul in the same dtype on the same device
(same thread count on the CPU), before and after the contenders; the larger is the machine's peak. A
second table gives each contender's achieved GFLOP/s on the block's useful matmul FLOPs (``moe_flops``)
and its fraction of that peak, and the least time any implementation could take at the peak, i.e. the
largest speedup over ``hf-grouped_mm`` this machine allows. ``--profile`` (CPU only) adds each
contender's share of self CPU time in matmul kernels (torch.profiler).
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time

import torch

from .common import add_device_options, cache_flusher, describe_device, dtype_name, synchronizer, write_json
from ..interop.swap import require_transformers

_IMPLS = ("eager", "batched_mm", "grouped_mm")
_MODES = ("forward", "forward+backward")
_BASELINE = "hf-grouped_mm"  # transformers' default experts implementation
_PEAK_RUNS = 5  # timed runs of the peak matmul, after one warm-up; the median counts
_PEAK_SIZE = {"cpu": 2048, "cuda": 8192}  # default N of the peak matmul, by device type
_PROFILE_STEPS = 3  # steps under torch.profiler per contender and (T, mode), with --profile
_MATMUL_OPS = ("aten::mm", "aten::bmm", "aten::addmm")  # whose self CPU time is the matmul share


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    transformers = require_transformers()
    torch.manual_seed(args.seed)
    contenders = _contenders(args)
    names = list(contenders)
    peak_before = measure_peak_gflops(args.peak_size, device=args.device, dtype=args.dtype)
    dtype = dtype_name(args.dtype)
    header = (f"dualroute bench hf: Mixtral-like MoE block D={args.dim} F={args.hidden} E={args.experts} "
              f"K={args.top_k} {dtype}, {describe_device(args.device, torch.get_num_threads())}, transformers "
              f"{transformers.__version__}, torch {torch.__version__}, matmul peak {peak_before:.1f} GFLOP/s "
              f"({args.peak_size}x{args.peak_size} {dtype}, median of {_PEAK_RUNS}), "
              + (f"{args.flush_mib} MiB overwritten before each timed call" if args.flush_mib else "caches not flushed"))
    print(header, flush=True)
    records = []
    for T in args.tokens:
        for mode in _MODES:
            records += _measure(contenders, T, mode, args)
    peak_after = measure_peak_gflops(args.peak_size, device=args.device, dtype=args.dtype)
    peak = max(peak_before, peak_after)
    add_roofline(records, peak)
    print()
    print(format_table(records, names))
    print(f"\nMatmul peak {peak_before:.1f} GFLOP/s before the timing, {peak_after:.1f} after; "
          f"the roofline uses the larger, {peak:.1f} GFLOP/s.\n")
    print(format_roofline_table(records, names, peak))
    print()
    print(format_bounds(records, peak))
    if args.profile:
        print()
        print(format_profile_table(records, names))
    if args.json:
        result = {"header": header, "device": str(args.device), "dtype": dtype, "peak_gflops": peak,
                  "peak_gflops_before": peak_before, "peak_gflops_after": peak_after,
                  "peak_matmul_size": args.peak_size,
                  "threads": torch.get_num_threads() if args.device.type == "cpu" else None, "records": records}
        print()
        write_json(args.json, result)
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
    p.add_argument("--peak-size", type=int, default=None,
                   help="N of the N x N @ N x N matmul (in --dtype) timed as the machine's peak "
                        f"(default {_PEAK_SIZE['cpu']} on the CPU, {_PEAK_SIZE['cuda']} on CUDA)")
    add_device_options(p, "every block's weights and the inputs (default float32)")
    p.add_argument("--profile", action="store_true",
                   help=f"also run {_PROFILE_STEPS} steps per contender under torch.profiler and report the "
                        "matmul share of self CPU time (--device cpu only)")
    p.add_argument("--flush-mib", type=int, default=128, metavar="MIB",
                   help="overwrite this many MiB before every timed call, so each contender starts with cold "
                        "caches rather than with what the one before it left (0: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the measurements here")
    return p


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = _parser()
    args = p.parse_args(argv)
    if args.peak_size is None:
        args.peak_size = _PEAK_SIZE[args.device.type]
    if args.profile and args.device.type != "cpu":
        p.error(f"--profile measures self CPU time and needs --device cpu, got --device {args.device}")
    if not args.tokens or min(args.tokens) < 1:
        p.error(f"--tokens must list integers >= 1, got {args.tokens}")
    if args.flush_mib < 0:
        p.error(f"--flush-mib must be >= 0, got {args.flush_mib}")
    for name in ("dim", "hidden", "experts", "top_k", "peak_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.top_k > args.experts:
        p.error(f"--top-k must be <= --experts ({args.experts}), got {args.top_k}")
    if not (math.isfinite(args.budget) and args.budget > 0):
        p.error(f"--budget must be finite and > 0 seconds, got {args.budget}")
    if math.isnan(args.batched_mm_max_gib) or args.batched_mm_max_gib < 0:
        p.error(f"--batched-mm-max-gib must be >= 0, got {args.batched_mm_max_gib}")
    return args


def _ints(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def moe_flops(T: int, D: int, F: int, E: int, K: int, mode: str) -> int:
    """Useful matmul FLOPs of one Mixtral-style MoE block step (a multiply-add counts 2).

    Counted, forward: the router ``x_TD @ W_DE`` (2*T*D*E) and, for each of the T*K routed rows, the
    swiglu expert's three matmuls gate and up (D -> F) and down (F -> D): 2*T*K*3*D*F. Backward
    (``forward+backward``) adds, for every one of these matmuls, the input gradient and the weight gradient,
    each as many FLOPs as the forward matmul: 3x the forward in all. Not counted: softmax / top-k,
    silu and the gating product, the routing-weight scaling and the combine (O(T*K*F) or less), and any
    work an implementation does beyond this (batched_mm's weight gather, padding, dense experts).
    """
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    forward = 2 * T * D * E + 2 * T * K * 3 * D * F
    return forward if mode == "forward" else 3 * forward


def measure_peak_gflops(n: int, runs: int = _PEAK_RUNS, device: torch.device | str = "cpu",
                        dtype: torch.dtype = torch.float32) -> float:
    """GFLOP/s of an ``n x n @ n x n`` matmul in ``dtype`` on ``device`` (at the current thread count on
    the CPU): median of ``runs`` after one warm-up, into a preallocated output, the device synchronized
    before and after each."""
    device = torch.device(device)
    sync = synchronizer(device) or (lambda: None)
    gen = torch.Generator().manual_seed(0)
    a_NN = torch.randn(n, n, generator=gen).to(device, dtype)
    b_NN = torch.randn(n, n, generator=gen).to(device, dtype)
    out_NN = torch.empty(n, n, device=device, dtype=dtype)
    torch.mm(a_NN, b_NN, out=out_NN)
    times = []
    for _ in range(runs):
        sync()
        start = time.perf_counter()
        torch.mm(a_NN, b_NN, out=out_NN)
        sync()
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times) / 1e9


def _contenders(args: argparse.Namespace) -> dict[str, torch.nn.Module]:
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    from ..interop.hf_config import arch_from_hf
    from ..interop.swap import _adapter

    config = MixtralConfig(hidden_size=args.dim, intermediate_size=args.hidden, num_local_experts=args.experts,
                           num_experts_per_tok=args.top_k, num_hidden_layers=1, vocab_size=8)
    reference = MixtralSparseMoeBlock(config)
    with torch.no_grad():
        for p in reference.parameters():
            p.normal_(0.0, 0.02)
    reference.to(args.device, args.dtype)
    blocks: dict[str, torch.nn.Module] = {}
    for impl in _IMPLS:
        block_config = copy.deepcopy(config)
        block_config._experts_implementation = impl
        block = MixtralSparseMoeBlock(block_config).to(args.device, args.dtype)
        block.load_state_dict(reference.state_dict())
        blocks[f"hf-{impl}"] = block
    moe = arch_from_hf(config.to_dict()).moe
    # The adapter takes the block's device and dtype, its router float32 (as swap_moe_blocks does).
    blocks["dualroute"] = _adapter(copy.deepcopy(reference), moe, "mixtral", "bench")
    for block in blocks.values():
        block.train()  # as in fine-tuning; the router has no jitter here, so forward is the same as eval
    return blocks


def _measure(contenders: dict, T: int, mode: str, args: argparse.Namespace) -> list[dict]:
    gen = torch.Generator().manual_seed(args.seed + T)
    x = torch.randn(1, T, args.dim, generator=gen).to(args.device, args.dtype)
    grad = torch.randn(1, T, args.dim, generator=gen).to(args.device, args.dtype)
    gathered_gib = T * args.top_k * 3 * args.dim * args.hidden * x.element_size() / 2**30
    notes = {}
    if gathered_gib > args.batched_mm_max_gib:
        notes["hf-batched_mm"] = f"skipped: gathers {gathered_gib:.1f} GiB of weights"
    outputs = {}  # warm-up, and the outputs to compare
    for n in contenders:
        if n not in notes:
            try:
                outputs[n] = _step(contenders[n], x, grad, mode)
            except RuntimeError as e:  # also torch.OutOfMemoryError; dualroute's own errors are not hidden
                if n == "dualroute":
                    raise
                notes[n] = f"failed: {' '.join(str(e).split())[:200]}"
                print(f"T={T} {mode}: {n} {notes[n]}", flush=True)
    names = list(outputs)
    sync = synchronizer(args.device)
    flush = cache_flusher(args.device, args.flush_mib)
    reference = outputs["dualroute"]
    first = {n: _timed(contenders[n], x, grad, mode, sync, flush) for n in names}
    reps = max(3, min(50, int(args.budget / max(sum(first.values()), 1e-6))))
    times = {n: [first[n]] for n in names}
    for _ in range(reps - 1):
        for n in names:  # round-robin, so drifts in machine load hit every contender alike
            times[n].append(_timed(contenders[n], x, grad, mode, sync, flush))
    shares = {n: matmul_share(contenders[n], x, grad, mode) for n in names} if args.profile else {}
    gflop = moe_flops(T, args.dim, args.hidden, args.experts, args.top_k, mode) / 1e9
    records = []
    for n in contenders:
        skipped = n not in names
        records.append({"T": T, "mode": mode, "contender": n, "reps": 0 if skipped else reps,
                        "median_ms": None if skipped else 1e3 * statistics.median(times[n]),
                        "max_abs_diff_vs_dualroute": None if skipped else
                        float((outputs[n].float() - reference.float()).abs().max()),
                        "expert_gflop": gflop, "matmul_share": shares.get(n), "note": notes.get(n, "")})
    print(f"T={T:5d} {mode:17s} " + "  ".join(
        f"{r['contender']} {r['median_ms']:.2f} ms" if r["median_ms"] is not None
        else f"{r['contender']} {r['note'].partition(':')[0]}"
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


def _timed(block: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor, mode: str, sync=None, flush=None) -> float:
    """Seconds of one step; ``sync`` (see ``common.synchronizer``) waits for the device first and last, and
    ``flush`` (``common.cache_flusher``) runs before the clock starts."""
    if flush is not None:
        flush()
    if sync is not None:
        sync()
    start = time.perf_counter()
    _step(block, x, grad, mode)
    if sync is not None:
        sync()
    return time.perf_counter() - start


def matmul_share(block: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor, mode: str,
                 steps: int = _PROFILE_STEPS) -> float:
    """Fraction of self CPU time in ``_MATMUL_OPS`` over ``steps`` steps under torch.profiler.

    Self time, so wrappers (aten::linear, aten::matmul, and aten::_grouped_mm, which on CPU runs one
    aten::mm per expert group) count only their own overhead, outside the share."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            _step(block, x, grad, mode)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    matmul = sum(e.self_cpu_time_total for e in events if e.key in _MATMUL_OPS)
    return matmul / total if total > 0 else 0.0


def add_roofline(records: list[dict], peak_gflops: float) -> None:
    """Add ``gflops`` (expert_gflop / median seconds) and ``peak_fraction`` (gflops / peak) to every
    timed record; None for skipped ones."""
    for r in records:
        timed = r["median_ms"] is not None
        r["gflops"] = r["expert_gflop"] / (r["median_ms"] / 1e3) if timed else None
        r["peak_fraction"] = r["gflops"] / peak_gflops if timed else None


def _rows(records: list[dict]) -> dict[tuple[int, str], dict[str, dict]]:
    """(T, mode) -> contender -> record, in the records' order."""
    rows: dict[tuple[int, str], dict[str, dict]] = {}
    for r in records:
        rows.setdefault((r["T"], r["mode"]), {})[r["contender"]] = r
    return rows


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


def format_roofline_table(records: list[dict], names: list[str], peak_gflops: float) -> str:
    head = ["T", "mode", "GFLOP", *[f"{n} {unit}" for n in names for unit in ("GFLOP/s", "% of peak")],
            "ms at peak", f"max possible speedup over {_BASELINE}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (T, mode), by_name in _rows(records).items():
        gflop = next(iter(by_name.values()))["expert_gflop"]
        cells = [str(T), mode, f"{gflop:.4g}"]
        for n in names:
            r = by_name[n]
            cells += ["skipped", "-"] if r["gflops"] is None else [f"{r['gflops']:.4g}",
                                                                   f"{100 * r['peak_fraction']:.1f}%"]
        base = by_name.get(_BASELINE)
        cells += [f"{1e3 * gflop / peak_gflops:.3g}",
                  "-" if base is None or base["peak_fraction"] is None else f"{1 / base['peak_fraction']:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(f"\nGFLOP: useful matmul FLOPs of the step (router + T*K routed rows x 3 swiglu matmuls; "
                 f"forward+backward = 3x forward). Peak: {peak_gflops:.1f} GFLOP/s. ms at peak = GFLOP / peak, "
                 f"a compute bound only: at small T moving the weights, not FLOPs, bounds every contender.")
    return "\n".join(lines)


def format_bounds(records: list[dict], peak_gflops: float) -> str:
    """One line per forward+backward row: the least time at the peak, and the largest speedup over
    ``hf-grouped_mm`` (and over dualroute) that any implementation could reach on this machine."""
    lines = [f"Fastest possible forward+backward at the measured peak ({peak_gflops:.1f} GFLOP/s):"]
    for (T, mode), by_name in _rows(records).items():
        if mode != "forward+backward":
            continue
        gflop = next(iter(by_name.values()))["expert_gflop"]
        floor_ms = 1e3 * gflop / peak_gflops
        line = f"  T={T}: {gflop:.4g} GFLOP take >= {floor_ms:.3g} ms"
        for n in (_BASELINE, "dualroute"):
            r = by_name.get(n)
            if r is not None and r["median_ms"] is not None:
                line += (f"; {n} takes {r['median_ms']:.3g} ms ({100 * r['peak_fraction']:.0f}% of peak), "
                         f"so no implementation can be more than {r['median_ms'] / floor_ms:.2f}x faster than it")
        lines.append(line)
    return "\n".join(lines)


def format_profile_table(records: list[dict], names: list[str]) -> str:
    head = ["T", "mode", *[f"{n} matmul share" for n in names]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (T, mode), by_name in _rows(records).items():
        cells = [str(T), mode, *["-" if by_name[n]["matmul_share"] is None else
                                 f"{100 * by_name[n]['matmul_share']:.1f}%" for n in names]]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(f"\nShare of self CPU time in {', '.join(_MATMUL_OPS)} over {_PROFILE_STEPS} profiled steps "
                 f"(torch.profiler, after the timing).")
    return "\n".join(lines)
