"""``dualroute bench layer`` / ``bench lm``: time the MoE layer and the MoE language model against
their fair baselines, side by side.

Every comparison runs in one process, alternating the contenders round by round so that a
noisy neighbour slows both, and reports medians and ratios (never absolute pass/fail).

``--device cuda`` runs on the GPU (the clock is read only after ``torch.cuda.synchronize()``, so a
step's time is its kernels' time, not its launch time); ``--dtype`` sets the precision: ``bench
layer`` builds its modules and inputs in it, ``bench lm`` keeps float32 weights and runs the forward
under ``torch.autocast`` (mixed precision, as training does).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..layer import DenseFFN, MoEConfig, MoELayer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def device_arg(text: str) -> torch.device:
    """argparse ``type`` of ``--device``: cpu, cuda or cuda:N, accepted only where this process can use it."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; expected cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise argparse.ArgumentTypeError(f"device {text!r} is not supported; expected cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"device {text!r} is not available: torch {torch.__version__} "
                                         "sees no CUDA device")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"device {text!r} is not available: torch sees "
                                         f"{torch.cuda.device_count()} CUDA device(s)")
    return device


def dtype_arg(text: str) -> torch.dtype:
    """argparse ``type`` of ``--dtype``: a name in ``DTYPES``."""
    if text not in DTYPES:
        raise argparse.ArgumentTypeError(f"unknown dtype {text!r}; expected one of {', '.join(DTYPES)}")
    return DTYPES[text]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def add_device_options(p: argparse.ArgumentParser, dtype_help: str) -> None:
    p.add_argument("--device", type=device_arg, default="cpu", help="cpu (default), cuda or cuda:N")
    p.add_argument("--dtype", type=dtype_arg, default="float32", metavar="{" + ",".join(DTYPES) + "}",
                   help=dtype_help)


def parse_counts(p: argparse.ArgumentParser, argv: list[str], counts: tuple[str, ...]) -> argparse.Namespace:
    """Parse ``argv``; a count below 1 is a usage error naming its flag. On the CPU, set ``--threads``."""
    args = p.parse_args(argv)
    for name in counts:
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.device.type == "cpu":
        torch.set_num_threads(args.threads)
    return args


def preset_configs(p: argparse.ArgumentParser, presets: str, overrides: list[str]) -> dict:
    """``{name: RunConfig}`` for the comma-separated language-model presets, each with the overrides applied;
    an image preset is a usage error."""
    from ..models import LMConfig
    from ..train.presets import get_preset, override

    names = [n for n in presets.split(",") if n]
    if not names:
        p.error("--presets names no preset")
    configs = {n: override(get_preset(n), overrides) for n in names}
    for name, cfg in configs.items():
        if not isinstance(cfg.model, LMConfig):
            p.error(f"--presets: {name!r} is an image classifier; this benchmark times language models")
    return configs


def synchronizer(device: torch.device) -> Callable[[], None] | None:
    """What waits for the device's queued work before the clock is read: None on the CPU (nothing is queued)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return None


def device_setup(device: torch.device, threads: int) -> dict:
    """The device fields of a benchmark's JSON ``setup``; ``threads`` counts only on the CPU."""
    if device.type == "cuda":
        return {"device": str(device), "device_name": torch.cuda.get_device_name(device), "threads": None,
                "cuda": torch.version.cuda, "float32_matmul_precision": torch.get_float32_matmul_precision()}
    return {"device": "cpu", "device_name": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "threads": threads}


def describe_device(device: torch.device, threads: int) -> str:
    """``cpu, 2 threads`` or ``cuda:0 (NVIDIA H200)``, for a header line."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu, {threads} threads"


def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` to ``dtype`` on ``device``; no context at all for None or float32."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


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


@dataclass
class Contender:
    name: str
    step: Callable[[], None]


def _output(result):
    return result[0] if isinstance(result, tuple) else result


def train_step(module: nn.Module, x_TD: torch.Tensor, grad_TD: torch.Tensor,
               amp_dtype: torch.dtype | None = None) -> Callable[[], None]:
    """One forward + backward; gradients are dropped each time as an optimizer's zero_grad would.
    With ``amp_dtype`` the forward runs under ``torch.autocast`` to it (the backward outside, as usual)."""
    x_TD = x_TD.detach().requires_grad_(True)

    def step() -> None:
        module.zero_grad(set_to_none=True)
        x_TD.grad = None
        with autocast(x_TD.device, amp_dtype):
            y = _output(module(x_TD))
        y.backward(grad_TD)

    return step


def infer_step(module: nn.Module, x_TD: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        with torch.inference_mode():
            module(x_TD)

    return step


def time_alternating(contenders: list[Contender], repeats: int, warmup: int = 1,
                     sync: Callable[[], None] | None = None) -> dict[str, float]:
    """Median seconds per call of each contender, measured round-robin.

    ``sync`` (see ``synchronizer``) runs before the clock starts and before it stops, so an
    asynchronous device's queued work is inside the measured interval and no earlier work is."""
    times: dict[str, list[float]] = {c.name: [] for c in contenders}
    for i in range(warmup + repeats):
        for c in contenders:
            if sync is not None:
                sync()
            start = time.perf_counter()
            c.step()
            if sync is not None:
                sync()
            elapsed = time.perf_counter() - start
            if i >= warmup:
                times[c.name].append(elapsed)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _moe(D: int, F: int, E: int, K: int, G: int = 1, J: int = 1) -> MoELayer:
    return MoELayer(MoEConfig(dim=D, hidden=F, num_experts=E, experts_per_token=K, num_groups=G, groups_per_token=J))


def bench_layer(T: int, D: int, F: int, repeats: int, decode_repeats: int, seed: int = 0,
                device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> dict:
    """Median seconds of each round's contenders; modules and inputs live on ``device`` in ``dtype``.

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
    rounds["dual_vs_flat"] = time_alternating([
        Contender("dual_G4_J2_E16_K2", train_step(on(_moe(D, F, 16, 2, G=4, J=2)), x_TD, g_TD)),
        Contender("flat_E16_K2", train_step(on(_moe(D, F, 16, 2)), x_TD, g_TD)),
    ], repeats, sync=sync)
    rounds["scaling_E"] = time_alternating([
        Contender("moe_E64_K2", train_step(on(_moe(D, F, 64, 2)), x_TD, g_TD)),
        Contender("moe_E8_K2", train_step(moe8, x_TD, g_TD)),
        Contender("moe_E8_K4", train_step(on(_moe(D, F, 8, 4)), x_TD, g_TD)),
        Contender("dense_F2x", train_step(dense, x_TD, g_TD)),
    ], repeats, sync=sync)
    for n in (1, 16):
        rounds[f"decode_T{n}"] = time_alternating([
            Contender("moe_E8_K2", infer_step(moe8, x_TD[:n])),
            Contender("dense_F2x", infer_step(dense, x_TD[:n])),
        ], decode_repeats, warmup=5, sync=sync)
    return rounds


def ratios(rounds: dict) -> dict[str, float]:
    r = {
        "moe_over_dense": rounds["moe_vs_dense"]["moe_E8_K2"] / rounds["moe_vs_dense"]["dense_F2x"],
        "allexperts_over_moe": rounds["moe_vs_dense"]["seed_all_experts_E8"] / rounds["moe_vs_dense"]["moe_E8_K2"],
        "dual_over_flat": rounds["dual_vs_flat"]["dual_G4_J2_E16_K2"] / rounds["dual_vs_flat"]["flat_E16_K2"],
        "e64_over_dense": rounds["scaling_E"]["moe_E64_K2"] / rounds["scaling_E"]["dense_F2x"],
        "e64_over_e8": rounds["scaling_E"]["moe_E64_K2"] / rounds["scaling_E"]["moe_E8_K2"],
        "k4_over_k2": rounds["scaling_E"]["moe_E8_K4"] / rounds["scaling_E"]["moe_E8_K2"],
    }
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


def run_layer(argv: list[str]) -> int:
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
    rounds = bench_layer(args.tokens, args.dim, args.hidden, args.repeats, args.decode_repeats,
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
        **ratios(rounds),
    }
    print(f"dualroute bench layer: T={args.tokens} D={args.dim} F={args.hidden} {dtype_name(args.dtype)}, "
          f"{describe_device(args.device, args.threads)}, torch {torch.__version__}")
    for group, medians in rounds.items():
        print(f"  {group}: " + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in medians.items()))
    for key, value in ratios(rounds).items():
        print(f"  {key:28s} {value:6.3f}  {_verdict(key, value)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}")
    return 0


def lm_train_step(model: nn.Module, idx_BS: torch.Tensor, amp_dtype: torch.dtype | None = None) -> Callable[[], None]:
    """One optimizer step of a language model: forward, loss (+ aux losses), backward, and the trainer's
    AdamW (``build_optimizer``, the default ``TrainConfig``'s weight decay and betas).

    ``amp_dtype`` (bfloat16, float16): the forward and the loss run under ``torch.autocast`` to it."""
    from ..train.presets import TrainConfig
    from ..train.optim import build_optimizer

    t = TrainConfig()
    optimizer = build_optimizer(model, 1e-3, t.weight_decay, t.betas)

    def step() -> None:
        with autocast(idx_BS.device, amp_dtype):
            out = model(idx_BS[:, :-1])
            loss = nn.functional.cross_entropy(out.logits.flatten(0, 1), idx_BS[:, 1:].flatten())
            loss = loss + sum(a.loss for a in out.aux)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def layer_parts(moe_cfg: MoEConfig, T: int, repeats: int, seed: int = 0, device: torch.device | str = "cpu",
                amp_dtype: torch.dtype | None = None) -> dict[str, float]:
    """Median seconds of each stage of one MoE layer's forward + backward on ``T`` tokens, next to the
    dense twin's FFN (width ``K * F``, same kind), timed round-robin in this process.

    ``experts`` runs on rows already sorted by a real routing, so ``experts - dense_ffn`` is what the
    grouped matmuls cost beyond one dense matmul of the same FLOPs; the other stages are what routing
    adds on top. On ``device``; with ``amp_dtype`` every stage's forward runs under autocast (float32
    weights and token rows, as in ``bench lm``; backward outside it), and the routed rows the experts and
    the combine see are in ``amp_dtype`` (what the experts return under autocast).
    """
    from ..dispatch import combine, dispatch, plan_dispatch

    device = torch.device(device)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    layer = MoELayer(moe_cfg).to(device)
    K = moe_cfg.experts_per_token
    dense = DenseFFN(moe_cfg.dim, K * moe_cfg.hidden, moe_cfg.expert_kind, moe_cfg.activation).to(device)
    x_TD = torch.randn(T, moe_cfg.dim, generator=gen).to(device)
    g_TD = torch.randn(T, moe_cfg.dim, generator=gen).to(device)
    with torch.no_grad():
        routing = layer.router(x_TD)
    plan = plan_dispatch(routing.expert_ids_TK, routing.weights_TK, moe_cfg.num_experts)
    rows_dtype = amp_dtype or torch.float32  # what the experts return (and the combine gets) under autocast
    x_ND = torch.randn(T * K, moe_cfg.dim, generator=gen).to(device, rows_dtype).requires_grad_(True)
    g_ND = torch.randn(T * K, moe_cfg.dim, generator=gen).to(device)
    w_TK = routing.weights_TK.clone().requires_grad_(True)
    xg_TD = x_TD.clone().requires_grad_(True)

    def forward_only(forward: Callable[[], object]) -> Callable[[], None]:
        def step() -> None:
            with autocast(device, amp_dtype):
                forward()
        return step

    def forward_backward(forward: Callable[[], torch.Tensor], grad: torch.Tensor | None = None) -> Callable[[], None]:
        def step() -> None:
            # Drop last round's gradients, as zero_grad would: accumulating into them would time an add
            # that a training step does not make (the stage inputs stand for activations).
            layer.zero_grad(set_to_none=True)
            for leaf in (x_ND, w_TK, xg_TD):
                leaf.grad = None
            with autocast(device, amp_dtype):
                out = forward()
            out.backward(grad)
        return step

    stages = {
        "dense_ffn": train_step(dense, x_TD, g_TD, amp_dtype),
        "moe_layer": train_step(layer, x_TD, g_TD, amp_dtype),
        "router": forward_backward(lambda: layer.router(xg_TD).weights_TK.sum()),
        "plan": forward_only(lambda: plan_dispatch(routing.expert_ids_TK, routing.weights_TK, moe_cfg.num_experts)),
        "dispatch": forward_backward(lambda: dispatch(xg_TD, plan), g_ND),
        "experts": forward_backward(lambda: layer.experts(x_ND, plan.counts_E), g_ND.to(rows_dtype)),
        "combine": forward_backward(lambda: combine(x_ND, w_TK, plan), g_TD.to(rows_dtype)),
        "aux": forward_only(lambda: layer.make_aux(routing, plan.dropped_E, None, plan.counts_E)),
    }
    return time_alternating([Contender(name, step) for name, step in stages.items()], repeats, warmup=3,
                            sync=synchronizer(device))


def _print_parts(name: str, parts: dict[str, float]) -> None:
    dense = parts["dense_ffn"]
    print(f"  {name}: one layer's forward+backward by stage, ms (dense twin's FFN {dense * 1e3:.2f}):")
    print(f"    moe_layer {parts['moe_layer'] * 1e3:.2f} = dense FFN + {(parts['moe_layer'] - dense) * 1e3:.2f}")
    print(f"    experts {parts['experts'] * 1e3:.2f} (grouped matmuls: dense FFN + "
          f"{(parts['experts'] - dense) * 1e3:.2f})")
    for key in ("router", "plan", "dispatch", "combine", "aux"):
        print(f"    {key:8s} {parts[key] * 1e3:.2f}")


def run_lm(argv: list[str]) -> int:
    """``dualroute bench lm``: training-step time of the presets' MoE LMs against their dense twin."""
    from ..models import TransformerLM

    p = argparse.ArgumentParser(prog="dualroute bench lm", description=run_lm.__doc__)
    p.add_argument("--presets", default="lm-dense,lm-flat,lm-dual")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=2, help="CPU threads (--device cpu only)")
    add_device_options(p, "bfloat16 / float16: float32 weights, forward and loss under torch.autocast to it "
                          "(default float32: no autocast)")
    p.add_argument("--parts", action="store_true",
                   help="also time each stage of one MoE layer of every MoE preset (router, plan, dispatch, "
                        "experts, combine, aux) next to the dense twin's FFN")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("overrides", nargs="*", help="config overrides for every preset, e.g. model.dim=256")
    args = parse_counts(p, argv, ("repeats", "threads"))
    configs = preset_configs(p, args.presets, args.overrides)
    names = list(configs)
    first = next(iter(configs.values())).train
    amp_dtype = None if args.dtype == torch.float32 else args.dtype
    gen = torch.Generator().manual_seed(0)
    contenders = []
    for name, cfg in configs.items():
        torch.manual_seed(0)
        model = TransformerLM(cfg.model).to(args.device)
        idx_BS = torch.randint(0, cfg.model.vocab_size, (first.batch_size, first.seq_len + 1), generator=gen)
        contenders.append(Contender(name, lm_train_step(model, idx_BS.to(args.device), amp_dtype)))
    medians = time_alternating(contenders, args.repeats, warmup=3, sync=synchronizer(args.device))
    tokens = first.batch_size * first.seq_len
    base = names[0]
    precision = "float32" if amp_dtype is None else f"{dtype_name(amp_dtype)} autocast (float32 weights)"
    print(f"dualroute bench lm: batch {first.batch_size} x {first.seq_len} tokens, {precision}, "
          f"{describe_device(args.device, args.threads)}, median of {args.repeats} AdamW steps")
    result = {"setup": {"presets": names, "overrides": args.overrides, "dtype": dtype_name(args.dtype),
                        "precision": precision, **device_setup(args.device, args.threads),
                        "tokens_per_step": tokens, "torch": torch.__version__}, "medians_s": medians}
    for name, seconds in medians.items():
        ratio = seconds / medians[base]
        result[f"{name}_over_{base}"] = ratio
        print(f"  {name:12s} {seconds * 1e3:8.1f} ms/step  {tokens / seconds:9.0f} tokens/s  "
              f"step time / {base} {ratio:.3f}")
    if args.parts:
        result["parts_s"] = {}
        for name, cfg in configs.items():
            if cfg.model.moe is not None:
                result["parts_s"][name] = parts = layer_parts(cfg.model.moe, tokens, args.repeats, device=args.device,
                                                                      amp_dtype=amp_dtype)
                _print_parts(name, parts)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}")
    return 0


def run_generate(argv: list[str]) -> int:
    """``dualroute bench generate``: per-token latency of KV-cache greedy decoding, MoE presets against their
    dense twin. Each MoE preset is also timed as it ran before this project's decoding changes, in the same
    process: off the CPU with its routers' NaN checks read back per layer (``deferred_finite_checks`` makes
    one read per forward pass); on the CPU through the sort-based dispatch (``MoELayer._route_direct`` runs
    a handful of rows' experts directly)."""
    from .. import layer as layer_mod
    from .. import routing
    from ..models import TransformerLM

    p = argparse.ArgumentParser(prog="dualroute bench generate", description=run_generate.__doc__)
    p.add_argument("--presets", default="lm-dense,lm-dual")
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--prompt", type=int, default=8, help="prompt tokens (batch of one)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2, help="CPU threads (--device cpu only)")
    add_device_options(p, "weights (default float32)")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("overrides", nargs="*", help="config overrides for every preset, e.g. model.dim=1024")
    args = parse_counts(p, argv, ("new_tokens", "prompt", "repeats", "threads"))
    configs = {n: run.model for n, run in preset_configs(p, args.presets, args.overrides).items()}
    names = list(configs)
    for name, cfg in configs.items():
        if args.prompt + args.new_tokens > cfg.max_seq_len:
            p.error(f"--prompt + --new-tokens = {args.prompt + args.new_tokens} exceeds {name}'s max_seq_len "
                    f"({cfg.max_seq_len})")

    direct = args.device.type in layer_mod.DIRECT_DEVICE_TYPES
    before = "sort-based dispatch" if direct else "check per layer"

    def decode(model: nn.Module, prompt: torch.Tensor, as_before: bool) -> Callable[[], None]:
        def step() -> None:
            saved = routing.IMMEDIATE_CHECK_DEVICE_TYPES, layer_mod.DIRECT_MAX_ROWS
            if as_before and direct:
                layer_mod.DIRECT_MAX_ROWS = 0
            elif as_before:
                routing.IMMEDIATE_CHECK_DEVICE_TYPES = saved[0] + (args.device.type,)
            try:
                model.generate(prompt, args.new_tokens, temperature=0)
            finally:
                routing.IMMEDIATE_CHECK_DEVICE_TYPES, layer_mod.DIRECT_MAX_ROWS = saved
        return step

    gen = torch.Generator().manual_seed(0)
    contenders = []
    for name, cfg in configs.items():
        torch.manual_seed(0)
        model = TransformerLM(cfg).to(args.device, args.dtype).eval()
        prompt = torch.randint(0, cfg.vocab_size, (1, args.prompt), generator=gen).to(args.device)
        contenders.append(Contender(name, decode(model, prompt, False)))
        if cfg.moe is not None:
            contenders.append(Contender(f"{name} ({before})", decode(model, prompt, True)))
    medians = time_alternating(contenders, args.repeats, warmup=1, sync=synchronizer(args.device))
    per_token = {name: seconds / args.new_tokens for name, seconds in medians.items()}
    base = names[0]
    print(f"dualroute bench generate: {args.new_tokens} greedy tokens after a {args.prompt}-token prompt, batch 1, "
          f"{dtype_name(args.dtype)}, {describe_device(args.device, args.threads)}, median of {args.repeats}")
    for name, seconds in per_token.items():
        print(f"  {name:32s} {seconds * 1e3:8.3f} ms/token  / {base} {seconds / per_token[base]:.3f}")
    if args.json:
        result = {"setup": {"presets": names, "overrides": args.overrides, "dtype": dtype_name(args.dtype),
                            "new_tokens": args.new_tokens, "prompt": args.prompt,
                            **device_setup(args.device, args.threads), "torch": torch.__version__},
                  "seconds_per_token": per_token}
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    import sys

    argv = sys.argv[1:] if argv is None else argv
    benches = {  # module:function, imported only when asked for
        "layer": "dualroute.bench:run_layer",
        "lm": "dualroute.bench:run_lm",
        "generate": "dualroute.bench:run_generate",
        "balance": "dualroute.bench.balance:main",
        "hf": "dualroute.bench.hf:main",
        "ep": "dualroute.bench.ep:main",
    }
    if not argv or argv[0] not in benches:
        print(f"usage: dualroute bench {{{','.join(benches)}}} [options]", file=sys.stderr)
        return 2
    module, _, func = benches[argv[0]].partition(":")
    return getattr(importlib.import_module(module), func)(argv[1:])
