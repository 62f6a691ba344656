"""``dualroute bench layer``: one MoE layer's forward + backward against its fair baselines, side by side:
the dense FFN of the same active size, the seed's all-experts mixture, flat top-k, more experts, larger K,
and decode-sized inputs, each comparison in a round of its own; and the least memory traffic E=64's weights
cost a training step (``e64_traffic_floor_over_dense``: the E=64 ratio if that traffic were its only extra
cost). On the CPU the E=8 layer is also timed in one pass over its experts, without the cache-sized chunks
(``experts.cache_chunks``; at T=4096 its activations are 64 MiB), and the E=64 layer on the opt-in padded
expert blocks (``experts.cpu_blocks``), against the dense FFN.

``--device cuda`` runs on the GPU; ``--dtype`` sets the precision the modules and inputs are built in.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from torch import nn

from .. import experts
from ..layer import DenseFFN, MoEConfig, MoELayer
from .common import (Contender, add_device_options, describe_device, device_setup, dtype_name, infer_step,
                     page_faults, parse_counts, synchronizer, time_alternating, train_step, write_json)


class SeedMixture(nn.Module):
    """The seed's dense soft mixture: every expert on every token, ``y = sum_i p_i f_i(x)``.

    Written the seed's way (a Python loop over experts), sharing the MoE layer's weights.
    """

    def __init__(self, layer: MoELayer) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        probs_TE = self.layer.router.gate(x_TD).softmax(dim=-1)
        y_TD = 0
        for e in range(self.layer.cfg.num_experts):
            y_TD = y_TD + probs_TE[:, e : e + 1] * self.layer.experts.forward_one(e, x_TD)
        return y_TD


def without_chunks(step: Callable[[], None]) -> Callable[[], None]:
    """``step`` with the CPU's cache-sized expert chunks (``experts.cache_chunks``) off: one pass over all
    experts, as before them."""
    def run() -> None:
        saved = experts.CPU_CHUNK_MIN_BYTES
        experts.CPU_CHUNK_MIN_BYTES = float("inf")
        try:
            step()
        finally:
            experts.CPU_CHUNK_MIN_BYTES = saved
    return run


def weight_traffic(module: nn.Module) -> Callable[[], None]:
    """The memory traffic a training step of ``module`` cannot avoid, whatever its kernels: every weight read
    twice (the forward, and the backward's input gradient) and a gradient as large written once. Timed beside
    the layers, it is the part of a step that grows with the parameters rather than with the compute."""
    weights = [w.detach() for w in module.parameters()]
    grads = [torch.empty_like(w) for w in weights]

    def step() -> None:
        for w, g in zip(weights, grads):
            g.copy_(w)  # one read, one write
            w.sum()  # the second read
    return step


def _moe(D: int, F: int, E: int, K: int, G: int = 1, J: int = 1) -> MoELayer:
    return MoELayer(MoEConfig(dim=D, hidden=F, num_experts=E, experts_per_token=K, num_groups=G, groups_per_token=J))


def with_cpu_blocks(step: Callable[[], None]) -> Callable[[], None]:
    """``step`` with the CPU's opt-in padded expert blocks on (``experts.cpu_blocks``) instead of the
    per-expert loop of ``torch._grouped_mm``."""
    def run() -> None:
        saved = experts.PADDED_DEVICE_TYPES
        experts.PADDED_DEVICE_TYPES = (*saved, "cpu")
        try:
            step()
        finally:
            experts.PADDED_DEVICE_TYPES = saved
    return run


def bench_layer(T: int, D: int, F: int, repeats: int, decode_repeats: int, seed: int = 0,
                device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> tuple[dict, dict]:
    """Median seconds of each round's contenders, and on the CPU the minor page faults per training step of
    the E=64 and E=8 layers and the dense FFN; modules and inputs live on ``device`` in ``dtype``.

    Weights and inputs are drawn on the CPU (the same numbers whatever the device), then moved."""
    device = torch.device(device)
    sync = synchronizer(device)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_TD = torch.randn(T, D, generator=gen).to(device, dtype)
    g_TD = torch.randn(T, D, generator=gen).to(device, dtype)

    def on(module: nn.Module) -> nn.Module:
        return module.to(device, dtype)

    moe8 = on(_moe(D, F, 8, 2))
    dense = on(DenseFFN(D, 2 * F))  # same active size as K=2 experts of width F
    rounds = {}

    rounds["moe_vs_dense"] = time_alternating([
        Contender("moe_E8_K2", train_step(moe8, x_TD, g_TD)),
        Contender("dense_F2x", train_step(dense, x_TD, g_TD)),
        Contender("seed_all_experts_E8", train_step(SeedMixture(moe8), x_TD, g_TD)),
    ], repeats, sync=sync)
    if device.type == "cpu":  # the same E=8 layer in one pass over its experts (no cache-sized chunks)
        rounds["chunks_E8"] = time_alternating([
            Contender("moe_E8_K2", train_step(moe8, x_TD, g_TD)),
            Contender("moe_E8_K2_one_pass", without_chunks(train_step(moe8, x_TD, g_TD))),
        ], repeats, sync=sync)
    rounds["dual_vs_flat"] = time_alternating([
        Contender("dual_G4_J2_E16_K2", train_step(on(_moe(D, F, 16, 2, G=4, J=2)), x_TD, g_TD)),
        Contender("flat_E16_K2", train_step(on(_moe(D, F, 16, 2)), x_TD, g_TD)),
    ], repeats, sync=sync)
    # E=64 in rounds of its own: its weight gradients are 32x the dense FFN's (400 MB at D=512, F=1024),
    # allocated afresh every step, and a round that also runs another 400 MB contender (the padded blocks)
    # times the allocator's state as much as the layers (E=64 read 1.98x dense in such a round, 1.03-1.07x
    # in rounds of two in the same minutes).
    moe64 = on(_moe(D, F, 64, 2))
    rounds["scaling_E"] = time_alternating([
        Contender("moe_E64_K2", train_step(moe64, x_TD, g_TD)),
        Contender("moe_E8_K2", train_step(moe8, x_TD, g_TD)),
        Contender("dense_F2x", train_step(dense, x_TD, g_TD)),
    ], repeats, sync=sync)
    # What E=64's 32x weights cost in memory traffic alone, beside the dense FFN's step (see ``ratios``).
    rounds["weights_E64"] = time_alternating([
        Contender("weight_traffic_E64", weight_traffic(moe64)),
        Contender("weight_traffic_dense", weight_traffic(dense)),
        Contender("dense_F2x", train_step(dense, x_TD, g_TD)),
    ], repeats, sync=sync)
    rounds["larger_K"] = time_alternating([
        Contender("moe_E8_K4", train_step(on(_moe(D, F, 8, 4)), x_TD, g_TD)),
        Contender("moe_E8_K2", train_step(moe8, x_TD, g_TD)),
    ], repeats, sync=sync)
    if device.type == "cpu":  # the same E=64 layer on the CPU's opt-in padded blocks
        rounds["blocks_E64"] = time_alternating([
            Contender("moe_E64_K2_blocks", with_cpu_blocks(train_step(moe64, x_TD, g_TD))),
            Contender("dense_F2x", train_step(dense, x_TD, g_TD)),
        ], repeats, sync=sync)
    for n in (1, 16):
        rounds[f"decode_T{n}"] = time_alternating([
            Contender("moe_E8_K2", infer_step(moe8, x_TD[:n])),
            Contender("dense_F2x", infer_step(dense, x_TD[:n])),
        ], decode_repeats, warmup=5, sync=sync)
    faults = page_faults([Contender("moe_E64_K2", train_step(moe64, x_TD, g_TD)),
                          Contender("moe_E8_K2", train_step(moe8, x_TD, g_TD)),
                          Contender("dense_F2x", train_step(dense, x_TD, g_TD))]) if device.type == "cpu" else {}
    return rounds, faults


def ratios(rounds: dict) -> dict[str, float]:
    r = {
        "moe_over_dense": rounds["moe_vs_dense"]["moe_E8_K2"] / rounds["moe_vs_dense"]["dense_F2x"],
        "allexperts_over_moe": rounds["moe_vs_dense"]["seed_all_experts_E8"] / rounds["moe_vs_dense"]["moe_E8_K2"],
        "dual_over_flat": rounds["dual_vs_flat"]["dual_G4_J2_E16_K2"] / rounds["dual_vs_flat"]["flat_E16_K2"],
        "e64_over_dense": rounds["scaling_E"]["moe_E64_K2"] / rounds["scaling_E"]["dense_F2x"],
        "e64_over_e8": rounds["scaling_E"]["moe_E64_K2"] / rounds["scaling_E"]["moe_E8_K2"],
        "k4_over_k2": rounds["larger_K"]["moe_E8_K4"] / rounds["larger_K"]["moe_E8_K2"],
    }
    # The ratio E=64 would have if moving its weights and gradients were all it cost beyond the dense FFN.
    w = rounds["weights_E64"]
    r["e64_traffic_floor_over_dense"] = 1 + (w["weight_traffic_E64"] - w["weight_traffic_dense"]) / w["dense_F2x"]
    if "chunks_E8" in rounds:  # > 1: the chunks are faster
        r["one_pass_over_chunks_e8"] = rounds["chunks_E8"]["moe_E8_K2_one_pass"] / rounds["chunks_E8"]["moe_E8_K2"]
    if "blocks_E64" in rounds:
        r["blocks_e64_over_dense"] = rounds["blocks_E64"]["moe_E64_K2_blocks"] / rounds["blocks_E64"]["dense_F2x"]
    for n in (1, 16):
        r[f"decode_T{n}_moe_over_dense"] = rounds[f"decode_T{n}"]["moe_E8_K2"] / rounds[f"decode_T{n}"]["dense_F2x"]
    return r


TARGETS = {  # (comparison, bound) from the project's acceptance list
    "moe_over_dense": ("<=", 1.10),
    "allexperts_over_moe": (">=", 3.5),
    "dual_over_flat": ("<=", 1.10),
    "e64_over_dense": ("<=", 1.30),
}


def _verdict(key: str, value: float) -> str:
    if key not in TARGETS:
        return ""
    op, bound = TARGETS[key]
    ok = value <= bound if op == "<=" else value >= bound
    return f"target {op} {bound:.2f}: {'met' if ok else 'MISSED'}"


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="dualroute bench layer", description=__doc__)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--decode-repeats", type=int, default=200)
    p.add_argument("--threads", type=int, default=2, help="CPU threads (--device cpu only)")
    add_device_options(p, "weights and inputs (default float32)")
    p.add_argument("--json", metavar="PATH")
    args = parse_counts(p, argv, ("tokens", "dim", "hidden", "repeats", "decode_repeats", "threads"))
    rounds, faults = bench_layer(args.tokens, args.dim, args.hidden, args.repeats, args.decode_repeats,
                                 device=args.device, dtype=args.dtype)
    setup = device_setup(args.device, args.threads)
    result = {
        "setup": {
            "T": args.tokens, "D": args.dim, "F": args.hidden, "dtype": dtype_name(args.dtype), **setup,
            "expert_kind": "swiglu", "repeats": args.repeats, "torch": torch.__version__,
            "machine": setup["device_name"],
            "timing": "median seconds per forward+backward (decode: per inference forward)"
                      + (", after torch.cuda.synchronize()" if args.device.type == "cuda" else ""),
        },
        "medians_s": rounds,
        "minor_faults_per_step": faults,
        **ratios(rounds),
    }
    print(f"dualroute bench layer: T={args.tokens} D={args.dim} F={args.hidden} {dtype_name(args.dtype)}, "
          f"{describe_device(args.device, args.threads)}, torch {torch.__version__}")
    for group, medians in rounds.items():
        print(f"  {group}: " + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in medians.items()))
    if faults:
        print("  minor page faults per training step: " + ", ".join(
            f"{k} {v:,.0f} ({v * 4096 / 2**20:,.0f} MiB of 4 KiB pages)" for k, v in faults.items()))
    for key, value in ratios(rounds).items():
        print(f"  {key:28s} {value:6.3f}  {_verdict(key, value)}")
    if args.json:
        write_json(args.json, result)
    return 0
