"""``dualroute bench generate``: per-token latency of KV-cache greedy decoding, MoE presets against their
dense twin. Each MoE preset is also timed as it ran before this project's decoding changes, in the same
process: off the CPU with its routers' NaN checks read back per layer (``deferred_finite_checks`` makes
one read per forward pass); on the CPU through the sort-based dispatch (``MoELayer._route_direct`` runs
a handful of rows' experts directly)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from torch import nn

from .. import layer as layer_mod
from .. import routing
from ..models import TransformerLM
from .common import (Contender, add_device_options, describe_device, device_setup, dtype_name, parse_counts,
                     preset_configs, synchronizer, time_alternating, write_json)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="dualroute bench generate", description=__doc__)
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
        write_json(args.json, result)
    return 0
