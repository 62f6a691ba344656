"""The ``dualroute`` console script: train, eval, generate, compare, convert, inspect, bench, translate.

Config overrides are dotted ``key=value`` words (``train.steps=200``, ``--model.moe.num_experts=16``,
``--data.path corpus.txt``) anywhere on the command line. Expected failures (unknown preset or key, a
missing checkpoint, a bad data path) print one ``error: ...`` line and exit with status 2; set
``DUALROUTE_TRACEBACK=1`` to see the traceback instead. At start the command has glibc's malloc keep freed
memory for the next step (``dualroute.memory``; ``DUALROUTE_KEEP_FREED_MEMORY=0`` turns that off).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from pathlib import Path

_OVERRIDE = re.compile(r"^(--)?[A-Za-z_]\w*(\.\w+)+(=|$)")
_EXPECTED = (ValueError, TypeError, KeyError, OSError, ImportError, ArithmeticError, RuntimeError)
LOCKSTEP_TURN = 50  # compare --lockstep's steps per turn: ~10 s of the lm presets, warm caches within a turn


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # raise instead of exiting, so main() returns 2
        raise UsageError(f"{self.prog}: {message}")


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separate dotted ``key=value`` overrides (also ``--key value``) from the other arguments."""
    rest, overrides = [], []
    i = 0
    while i < len(argv):
        word = argv[i]
        if _OVERRIDE.match(word) and "=" in word:
            overrides.append(word.removeprefix("--"))
        elif _OVERRIDE.match(word) and word.startswith("--") and i + 1 < len(argv):
            overrides.append(f"{word[2:]}={argv[i + 1]}")
            i += 1
        else:
            rest.append(word)
        i += 1
    return rest, overrides


def build_parser() -> argparse.ArgumentParser:
    from dualroute.cli_support import add_sampling_options
    from dualroute.train.presets import DEFAULT_PRESET, PRESETS

    parser = _Parser(prog="dualroute", description="Dual-layer routed mixture-of-experts: train, evaluate, "
                     "sample and compare small models.", allow_abbrev=False,
                     epilog="Config overrides: dotted key=value words, e.g. train.steps=200 "
                            "model.moe.num_experts=16 --data.path=corpus.txt")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("train", help="train a preset", allow_abbrev=False)
    p.add_argument("preset", nargs="?", default=None,
                   help=f"one of {', '.join(PRESETS)} (default {DEFAULT_PRESET})")
    p.add_argument("--config", help="TOML file applied on top of the preset")
    p.add_argument("--out", help="run directory (train.out_dir)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in its directory from the newest checkpoint, with the run's saved "
                        "config (overrides still apply, e.g. train.steps=2000 to extend it); "
                        "without a checkpoint, start it")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--expert-parallel", type=int, default=None, metavar="N",
                   help="shard the experts over N processes, each training on 1/N of the batch; launch with "
                        "torchrun --nproc-per-node N -m dualroute train ... --expert-parallel N (N = WORLD_SIZE)")
    p.add_argument("--data-parallel", type=int, default=None, metavar="D",
                   help="D replicas of the (--expert-parallel E) expert shards: W = E x D processes (WORLD_SIZE), "
                        "each training on 1/W of the batch; e.g. torchrun --nproc-per-node 4 ... "
                        "--expert-parallel 2 --data-parallel 2")

    p = sub.add_parser("eval", help="validation metrics of a checkpoint", allow_abbrev=False)
    p.add_argument("path", help="checkpoint directory, or a run directory (its newest checkpoint)")
    p.add_argument("--out", default=None, help="folder for the task's figures (a classifier's confusion.png); "
                   "default: the run directory")

    p = sub.add_parser("generate", help="sample text from a language-model checkpoint (or, with --hf PATH, "
                       "a Hugging Face MoE folder: dualroute generate --hf PATH --help)", allow_abbrev=False,
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("path", help="checkpoint directory, or a run directory (its newest checkpoint)")
    p.add_argument("--prompt", default="The ", help="text to continue")
    add_sampling_options(p, max_new_tokens=200)

    p = sub.add_parser(
        "compare", help="train presets x seeds and set them against the dense twin", allow_abbrev=False,
        description="Train every preset with every seed (same overrides and --config for all), then tabulate them "
                    "at equal steps, by the steps and training seconds each takes to reach the dense twin's final "
                    "validation loss (as ratios to the twin's), and at the twin's training-time budget; mean ± std "
                    "over seeds. Writes compare.md, compare.json and compare.png to --out.",
        epilog="Time to target is interpolated linearly between evaluations, so it is known only to within one "
               "eval interval: evaluate often, e.g. train.eval_every=10 for a 400-step run (2.5% of it). Training "
               "seconds exclude evaluation and checkpointing, so frequent evals cost wall time, not measured time. "
               "A dense twin takes model.moe.* overrides on the MoE config it is the twin of, keeping its width "
               "equal to the MoE models' active experts.")
    p.add_argument("--presets", default="lm-dense,lm-flat,lm-dual", help="comma-separated preset names")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    p.add_argument("--baseline", metavar="PRESET", help="the preset to measure against (default: the one preset "
                   "whose model is dense, e.g. lm-dense)")
    p.add_argument("--config", help="TOML file applied on top of every preset (before the overrides)")
    p.add_argument("--steps", type=int, default=None, help="train.steps for every run")
    p.add_argument("--lrs", metavar="LR,LR,...", help="learning-rate sweep: each preset trains the first seed at "
                   "each rate and keeps its best (lowest final val_loss) for all seeds")
    p.add_argument("--lockstep", type=int, nargs="?", const=LOCKSTEP_TURN, default=None, metavar="N",
                   help="train each seed's presets together in one process, N steps of each in turn (default "
                   f"{LOCKSTEP_TURN}), so that a machine whose speed drifts over the minutes slows them alike; the "
                   "runs are the same, bit for bit")
    p.add_argument("--out", default="runs/compare", help="output directory")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--report-only", action="store_true", help="train nothing: rewrite compare.md and compare.png "
                   "from the compare.json of an earlier compare in --out; without one, tabulate the finished runs "
                   "of --presets x --seeds found in OUT/<preset>/seed<s> (e.g. trained separately with dualroute "
                   "train ... train.seed=S --out OUT/<preset>/seedS) and write compare.json")

    sub.add_parser("bench", help="benchmarks: layer, lm, generate, balance, hf, ep, mt, scaling (dualroute bench layer --help)", add_help=False)
    sub.add_parser("convert", help="Hugging Face MoE checkpoint <-> dualroute; a trained LM -> transformers "
                   "(dualroute convert --help)",
                   add_help=False)
    sub.add_parser("inspect", help="routing figures and report of a checkpoint (dualroute inspect --help)",
                   add_help=False)
    sub.add_parser("translate", help="translate text with a translation or G2P checkpoint (dualroute translate "
                   "--help)", add_help=False)
    return parser


# Commands with their own argument parsers, imported only when used ("module:function").
_DELEGATED = {
    "bench": "dualroute.bench:main",
    "convert": "dualroute.interop.cli_hooks:convert_main",
    "inspect": "dualroute.inspect.cli_hook:inspect_main",
    "translate": "dualroute.cli_translate:translate_main",
}


def _delegate(argv: list[str]) -> str | None:
    if argv and argv[0] in _DELEGATED:
        return _DELEGATED[argv[0]]
    if argv and argv[0] == "generate" and any(a == "--hf" or a.startswith("--hf=") for a in argv[1:]):
        return "dualroute.interop.cli_hooks:generate_hf_main"
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        from dualroute.memory import keep_freed_memory_from_env

        keep_freed_memory_from_env()  # freed tensors stay in the heap for the next step (dualroute/memory.py)
        target = _delegate(argv)
        if target is not None:
            import importlib

            module, _, func = target.partition(":")
            return getattr(importlib.import_module(module), func)(argv[1:])
        rest, overrides = split_overrides(argv)
        args = build_parser().parse_args(rest)
        return _COMMANDS[args.command](args, overrides)
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0
    except KeyboardInterrupt:
        print("interrupted (the last checkpoint is intact; continue with --resume)", file=sys.stderr)
        return _leave(130)
    except (UsageError, *_EXPECTED) as e:
        if os.environ.get("DUALROUTE_TRACEBACK"):
            raise
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return _leave(2)


def _leave(code: int) -> int:
    """``code``; but after a broken multi-process run, exit at once with it: tearing down the dead process
    group at interpreter exit would abort the process (SIGABRT) after the clear message."""
    if "dualroute.train.distributed" in sys.modules:
        from dualroute.train.distributed import abandoned_process_group

        if abandoned_process_group():
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return code


def _one_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    if isinstance(e, KeyError):
        text = f"missing key {text}"
    return " ".join(text.split())


# ----------------------------------------------------------------------------------------- commands


def cmd_train(args: argparse.Namespace, overrides: list[str]) -> int:
    from dualroute.train.presets import DEFAULT_PRESET, get_preset, override
    from dualroute.train.configio import load_config_file
    from dualroute.train.trainer import format_summary, read_saved_config, train

    if args.out:
        overrides = [f"train.out_dir={args.out}", *overrides]
    cfg = get_preset(args.preset or DEFAULT_PRESET)
    out_dir = override(cfg, [o for o in overrides if o.startswith("train.out_dir=")]).train.out_dir
    saved = Path(out_dir) / "config.json"
    if args.resume and saved.is_file():  # the run's own config; the preset only named its directory
        if args.config:
            raise UsageError("--resume continues with the run's saved config; drop --config (overrides still apply)")
        cfg = read_saved_config(saved)
    elif args.config:
        cfg = load_config_file(args.config, cfg)
    cfg = override(cfg, overrides)
    summary = train(cfg, resume=args.resume, progress=False if args.quiet else None,
                    expert_parallel=args.expert_parallel, data_parallel=args.data_parallel)
    if os.environ.get("RANK", "0") == "0":  # torchrun: rank 0 prints
        print(format_summary(summary))
    return 0


def _load(path: str, overrides: list[str]):
    from dualroute.train.presets import override
    from dualroute.train.trainer import load_run

    if any(o.startswith("model.") for o in overrides):
        raise UsageError("the model config comes from the checkpoint; only data.* and train.* can be overridden")
    return load_run(path, lambda cfg: override(cfg, overrides), device=_device(overrides))


def _device(overrides: list[str]) -> str:
    for o in reversed(overrides):
        if o.startswith("train.device="):
            return o.split("=", 1)[1]
    return "cpu"


def cmd_eval(args: argparse.Namespace, overrides: list[str]) -> int:
    from dualroute.train.trainer import expert_report, precision_autocast, resolve_device

    task, model, ckpt = _load(args.path, overrides)
    device = resolve_device(_device(overrides))
    with precision_autocast(device, task.run_config.train.precision):
        result = task.evaluate(model, device)
    print(f"checkpoint {ckpt.path} (step {ckpt.extra.get('step')})")
    for key, value in result.metrics.items():
        print(f"{key} {value:.4f}")
    for line in getattr(result, "notes", ()):  # e.g. sacrebleu's signatures
        print(line)
    for layer in expert_report(result.expert_counts, result.router_entropy):
        print(f"moe_layer{layer['layer']}_maxvio {layer['maxvio']:.4f}")
    for path in task.write_eval_artifacts(model, result, device, Path(args.out or Path(ckpt.path).parent)):
        print(f"wrote {path}")
    return 0


def cmd_generate(args: argparse.Namespace, overrides: list[str]) -> int:
    from dualroute.train.trainer import precision_autocast, resolve_device

    task, model, _ = _load(args.path, overrides)
    if not task.can_sample:
        what = "a language model without a tokenizer" if task.run_config.is_lm else \
            f"a {task.run_config.task_type.name!r} model"
        raise UsageError(f"{args.path} is {what}; generate needs a language-model checkpoint with a tokenizer")
    with precision_autocast(resolve_device(_device(overrides)), task.run_config.train.precision):
        text = task.sample(model, args.prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                           top_p=args.top_p, seed=args.seed)
    print(text)
    return 0


def cmd_compare(args: argparse.Namespace, overrides: list[str]) -> int:
    from dualroute.train.compare import (find_baseline, gather_runs, preset_configs, read_runs, run_compare,
                                         write_report)

    out = Path(args.out)
    gathered = args.report_only and not (out / "compare.json").is_file()
    runs = read_runs(out) if args.report_only and not gathered else None
    presets = list(runs) if runs else [p.strip() for p in args.presets.split(",") if p.strip()]
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise UsageError(f"--seeds takes comma-separated integers, got {args.seeds!r}") from None
    if not presets or not seeds:
        raise UsageError("compare needs at least one preset and one seed")
    if gathered:  # runs trained separately, in out/<preset>/seed<s>
        runs = gather_runs(out, presets, seeds)
        (out / "compare.json").write_text(json.dumps(runs, indent=1))
    if args.lockstep is not None and args.lockstep < 1:
        raise UsageError(f"--lockstep takes the steps per turn, an integer >= 1, got {args.lockstep}")
    configs = preset_configs(presets, overrides, args.config)  # fail fast on a bad preset, key or file
    baseline = find_baseline(configs, args.baseline)
    if runs:
        print(write_report(runs, out, baseline))
    else:
        print(run_compare(configs, seeds, out, baseline=baseline, steps=args.steps, progress=not args.quiet,
                          lrs=_lrs(args.lrs), lockstep=args.lockstep))
    written = "" if runs and not gathered else f", {out / 'compare.json'}"
    print(f"\nwrote {out / 'compare.md'}, {out / 'compare.png'}{written}")
    return 0


def _lrs(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        lrs = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"--lrs takes comma-separated learning rates, got {text!r}") from None
    if not lrs or not all(math.isfinite(lr) and lr > 0 for lr in lrs) or len(set(lrs)) != len(lrs):
        raise UsageError(f"--lrs takes distinct positive learning rates, got {text!r}")
    return lrs


_COMMANDS = {"train": cmd_train, "eval": cmd_eval, "generate": cmd_generate, "compare": cmd_compare}
