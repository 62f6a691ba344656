"""``dualroute bench mt``: training-step time of the encoder-decoder presets (mt-dual, mt-flat) against their
dense twin (mt-dense), on one synthetic batch of Multi30k's shape, timed round-robin in one process."""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from torch import nn

from .common import (Contender, add_device_options, autocast, describe_device, device_setup, dtype_name,
                     parse_counts, synchronizer, time_alternating, write_json)


def seq2seq_train_step(model: nn.Module, src_BS: torch.Tensor, tgt_BT: torch.Tensor,
                       amp_dtype: torch.dtype | None = None) -> Callable[[], None]:
    """One AdamW step (the trainer's optimizer): forward, cross-entropy on the shifted target + aux losses,
    backward."""
    from ..train.optim import build_optimizer
    from ..train.presets import TrainConfig

    t = TrainConfig()
    optimizer = build_optimizer(model, 1e-3, t.weight_decay, t.betas)

    def step() -> None:
        with autocast(src_BS.device, amp_dtype):
            out = model(src_BS, tgt_BT[:, :-1])
            loss = nn.functional.cross_entropy(out.logits.flatten(0, 1), tgt_BT[:, 1:].flatten())
            loss = loss + sum(a.loss for a in out.aux)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def _configs(p: argparse.ArgumentParser, presets: str, overrides: list[str]) -> dict:
    """The encoder-decoder presets, configured as ``dualroute compare`` configures them."""
    from ..models.seq2seq import Seq2SeqConfig
    from ..train.compare import preset_configs

    names = [n for n in presets.split(",") if n]
    if not names:
        p.error("--presets names no preset")
    configs = preset_configs(names, overrides)
    for name, cfg in configs.items():
        if not isinstance(cfg.model, Seq2SeqConfig):
            p.error(f"--presets: {name!r} is not an encoder-decoder preset (mt-*, g2p-*)")
    return configs


def main(argv: list[str]) -> int:
    import dataclasses

    from ..models.seq2seq import Seq2SeqTransformer

    p = argparse.ArgumentParser(prog="dualroute bench mt", description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default="mt-dense,mt-flat,mt-dual")
    p.add_argument("--vocab", type=int, default=8000, help="source = target vocabulary (the presets' BPE size)")
    p.add_argument("--batch", type=int, default=128, help="sentence pairs per step")
    p.add_argument("--src-len", type=int, default=15, help="source tokens per sentence (Multi30k: ~14 mean)")
    p.add_argument("--tgt-len", type=int, default=16, help="target tokens per sentence, bos/eos included")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=1, help="CPU threads (--device cpu only)")
    add_device_options(p, "bfloat16 / float16: forward and loss under torch.autocast (default float32)")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("overrides", nargs="*", help="config overrides for every preset, e.g. model.dim=256")
    args = parse_counts(p, argv, ("vocab", "batch", "src_len", "tgt_len", "repeats", "threads"))
    configs = _configs(p, args.presets, args.overrides)
    amp_dtype = None if args.dtype == torch.float32 else args.dtype
    gen = torch.Generator().manual_seed(0)
    src_BS = torch.randint(4, args.vocab, (args.batch, args.src_len), generator=gen).to(args.device)
    tgt_BT = torch.randint(4, args.vocab, (args.batch, args.tgt_len), generator=gen).to(args.device)
    contenders = []
    for name, cfg in configs.items():
        torch.manual_seed(0)
        model_cfg = dataclasses.replace(cfg.model, src_vocab_size=args.vocab, tgt_vocab_size=args.vocab)
        model = Seq2SeqTransformer(model_cfg).to(args.device)
        contenders.append(Contender(name, seq2seq_train_step(model, src_BS, tgt_BT, amp_dtype)))
    medians = time_alternating(contenders, args.repeats, warmup=2, sync=synchronizer(args.device))
    tokens = args.batch * (args.tgt_len - 1)
    names = list(configs)
    base = names[0]
    print(f"dualroute bench mt: {args.batch} pairs x ({args.src_len} source, {args.tgt_len - 1} target) tokens, "
          f"vocabulary {args.vocab}, {describe_device(args.device, args.threads)}, median of {args.repeats} "
          f"AdamW steps")
    result = {"setup": {"presets": names, "overrides": args.overrides, "dtype": dtype_name(args.dtype),
                        **device_setup(args.device, args.threads), "target_tokens_per_step": tokens,
                        "torch": torch.__version__}, "medians_s": medians}
    for name, seconds in medians.items():
        ratio = seconds / medians[base]
        result[f"{name}_over_{base}"] = ratio
        print(f"  {name:10s} {seconds * 1e3:8.1f} ms/step  {tokens / seconds:9.0f} target tokens/s  "
              f"step time / {base} {ratio:.3f}")
    if args.json:
        write_json(args.json, result)
    return 0
