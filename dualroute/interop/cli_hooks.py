"""Entry points for the console script: ``dualroute convert`` and ``dualroute generate --hf``.

Each is ``main(argv) -> exit status``: 0 on success, 2 with one ``error: ...`` line on stderr for bad
input (a missing folder, an unsupported model, mismatched weights) or bad arguments. Set
``DUALROUTE_TRACEBACK=1`` to get the traceback instead.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..cli_support import add_sampling_options, run_command

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def convert_main(argv: list[str]) -> int:
    """``dualroute convert SRC DST --to {dualroute,hf}``: between a Hugging Face folder and a dualroute checkpoint."""
    parser = argparse.ArgumentParser(
        prog="dualroute convert", description="Convert a Mixtral / Qwen2-MoE / DeepSeek-V3 / OLMoE checkpoint "
        "between the Hugging Face format (config.json + safetensors) and a dualroute checkpoint, or export a "
        "language model trained by `dualroute train` (--to hf): as a native Mixtral checkpoint when it is exactly "
        "one, else in the Hub's custom-code format (trust_remote_code=True); --to dualroute brings such an "
        "export back to a training checkpoint.")
    parser.add_argument("src", help="a Hugging Face folder (config.json), a dualroute checkpoint (meta.json), or a "
                        "run directory of dualroute train")
    parser.add_argument("dst", help="output folder")
    parser.add_argument("--to", required=True, choices=("dualroute", "hf"), help="output format")
    parser.add_argument("--dtype", choices=tuple(_DTYPES), default=None, help="weight dtype (default: as stored)")
    parser.add_argument("--max-shard-gb", type=float, default=5.0, help="hf output: shard size in GiB")
    return _run(parser, argv, _convert)


def _convert(args: argparse.Namespace) -> int:
    from .export import is_custom_export, is_training_run
    from .hf import copy_extra_files, load_model, save_dualroute, save_hf

    if not Path(args.src).exists():
        raise FileNotFoundError(f"no such folder: {args.src} (expected a Hugging Face folder, a dualroute checkpoint "
                                "or a run directory of dualroute train)")
    if Path(args.dst).resolve() == Path(args.src).resolve():
        raise ValueError(f"destination {args.dst} is the source folder; choose another one")
    if is_training_run(args.src) or is_custom_export(args.src):
        return _convert_trained(args, custom=is_custom_export(args.src))
    model = load_model(args.src, dtype=_DTYPES.get(args.dtype))
    if args.to == "hf":
        save_hf(model, args.dst, max_shard_bytes=int(args.max_shard_gb * 2**30))
    else:
        save_dualroute(model, args.dst)
    copied = copy_extra_files(args.src, args.dst)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.dst} ({args.to} format, {model.cfg.model_type}, {n_params:,} parameters"
          + (f"; copied {', '.join(copied)}" if copied else "") + ")")
    return 0


def _convert_trained(args: argparse.Namespace, custom: bool) -> int:
    """A run of ``dualroute train`` -> transformers (``--to hf``); a custom-code export back (``--to dualroute``)."""
    from .export import export_run, import_custom_export

    if custom and args.to == "dualroute":
        path = import_custom_export(args.src, args.dst)
        print(f"wrote {path} (a dualroute training checkpoint: dualroute generate / eval read it)")
        return 0
    if custom:
        raise ValueError(f"{args.src} is already a transformers export of a dualroute run (model_type 'dualroute'); "
                         "--to dualroute converts it back")
    if args.to != "hf":
        raise ValueError(f"{args.src} is a dualroute training run already; --to hf exports it for transformers")
    export = export_run(args.src, args.dst, dtype=_DTYPES.get(args.dtype),
                        max_shard_bytes=int(args.max_shard_gb * 2**30))
    print(export.describe())
    return 0


def generate_hf_main(argv: list[str]) -> int:
    """``dualroute generate --hf PATH --prompt-ids 1,2,3 --max-new-tokens N``: continue a prompt with a loaded model."""
    parser = argparse.ArgumentParser(
        prog="dualroute generate --hf", description="Generate with a Hugging Face MoE checkpoint (or its "
        "dualroute conversion) run by dualroute. Token ids in and out; text too if the folder has tokenizer.json.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--hf", required=True, metavar="PATH", help="Hugging Face folder or dualroute checkpoint")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt-ids", help="comma-separated token ids, e.g. 1,2,3")
    prompt.add_argument("--prompt", help="text (needs tokenizer.json in the folder and the tokenizers package)")
    add_sampling_options(parser, max_new_tokens=32)
    parser.add_argument("--dtype", choices=tuple(_DTYPES), default=None)
    parser.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-sequence token")
    return _run(parser, argv, _generate)


def _generate(args: argparse.Namespace) -> int:
    from .hf import load_model

    model = load_model(args.hf, dtype=_DTYPES.get(args.dtype))
    tokenizer = _tokenizer(Path(args.hf))
    ids = _prompt_ids(args, tokenizer, model.cfg.vocab_size)
    eos, pad = (None, None) if args.ignore_eos else _special_ids(Path(args.hf), model.cfg.hf_config)
    generator = torch.Generator().manual_seed(args.seed)
    out = model.generate(torch.tensor([ids]), args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                         top_p=args.top_p, generator=generator, eos_token_id=eos, pad_token_id=pad)[0].tolist()
    print("ids:", ",".join(map(str, out)))
    if tokenizer is not None:
        print("text:", tokenizer.decode(out))
    return 0


def _prompt_ids(args: argparse.Namespace, tokenizer, vocab_size: int) -> list[int]:
    if args.prompt is not None:
        if tokenizer is None:
            raise ValueError(f"--prompt needs {Path(args.hf) / 'tokenizer.json'} and the tokenizers package; "
                             "pass --prompt-ids instead")
        ids = tokenizer.encode(args.prompt).ids
    else:
        try:
            ids = [int(t) for t in args.prompt_ids.split(",") if t.strip()]
        except ValueError:
            raise ValueError(f"--prompt-ids must be comma-separated integers, got {args.prompt_ids!r}") from None
    if not ids:
        raise ValueError("the prompt is empty")
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise ValueError(f"prompt token ids {bad} are outside the vocabulary [0, {vocab_size})")
    return ids


def _tokenizer(folder: Path):
    path = folder / "tokenizer.json"
    if not path.is_file():
        return None
    try:
        from tokenizers import Tokenizer
    except ImportError:
        return None
    return Tokenizer.from_file(str(path))


def _special_ids(folder: Path, config: dict) -> tuple[int | list[int] | None, int | None]:
    """End and pad token ids: generation_config.json first (as transformers does), then config.json."""
    gen = folder / "generation_config.json"
    source = json.loads(gen.read_text()) if gen.is_file() else {}
    eos = source.get("eos_token_id", config.get("eos_token_id"))
    pad = source.get("pad_token_id", config.get("pad_token_id"))
    return eos, pad


def _run(parser: argparse.ArgumentParser, argv: list[str], command) -> int:
    return run_command(parser, argv, command)
