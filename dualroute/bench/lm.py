"""``dualroute bench lm``: training-step time of the presets' MoE language models against their dense twin,
and with ``--parts`` one MoE layer's forward + backward split by stage.

``--dtype`` bfloat16 / float16 keeps float32 weights and runs the forward under ``torch.autocast``
(mixed precision, as training does).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from torch import nn

from ..layer import DenseFFN, MoEConfig, MoELayer
from .common import (Contender, add_device_options, autocast, describe_device, device_setup, dtype_name,
                     parse_counts, preset_configs, synchronizer, time_alternating, train_step, write_json)


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

    step.optimizer = optimizer  # so a benchmark can time the update on its own
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


def main(argv: list[str]) -> int:
    from ..models import TransformerLM

    p = argparse.ArgumentParser(prog="dualroute bench lm", description=__doc__.split("\n\n")[0])
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
        write_json(args.json, result)
    return 0
