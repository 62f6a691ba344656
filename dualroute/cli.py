"""The ``dualroute`` console script: train, eval, generate, compare, convert, inspect, bench.

Config overrides are dotted ``key=value`` words (``train.steps=200``, ``--model.moe.num_experts=16``,
``--data.path corpus.txt``) anywhere on the command line. Expected failures (unknown preset or key, a
missing checkpoint, a bad data path) print one ``error: ...`` line and exit with status 2; set
``DUALROUTE_TRACEBACK=1`` to see the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Any

_OVERRIDE = re.compile(r"^(--)?[A-Za-z_]\w*(\.\w+)+(=|$)")
_EXPECTED = (ValueError, TypeError, KeyError, OSError, ImportError, ArithmeticError, RuntimeError)


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

    p = sub.add_parser("eval", help="validation metrics of a checkpoint", allow_abbrev=False)
    p.add_argument("path", help="checkpoint directory, or a run directory (its newest checkpoint)")

    p = sub.add_parser("generate", help="sample text from a language-model checkpoint (or, with --hf PATH, "
                       "a Hugging Face MoE folder: dualroute generate --hf PATH --help)", allow_abbrev=False,
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("path", help="checkpoint directory, or a run directory (its newest checkpoint)")
    p.add_argument("--prompt", default="The ", help="text to continue")
    add_sampling_options(p, max_new_tokens=200)

    p = sub.add_parser("compare", help="train presets x seeds and tabulate them", allow_abbrev=False)
    p.add_argument("--presets", default="lm-dense,lm-flat,lm-dual", help="comma-separated preset names")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    p.add_argument("--steps", type=int, default=None, help="train.steps for every run")
    p.add_argument("--out", default="runs/compare", help="output directory")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    sub.add_parser("bench", help="benchmarks: layer, balance, hf, ep (dualroute bench layer --help)", add_help=False)
    sub.add_parser("convert", help="Hugging Face MoE checkpoint <-> dualroute (dualroute convert --help)",
                   add_help=False)
    sub.add_parser("inspect", help="routing figures and report of a checkpoint (dualroute inspect --help)",
                   add_help=False)
    return parser


# Commands with their own argument parsers, imported only when used ("module:function").
_DELEGATED = {
    "bench": "dualroute.bench:main",
    "convert": "dualroute.interop.cli_hooks:convert_main",
    "inspect": "dualroute.inspect.cli_hook:inspect_main",
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
                    expert_parallel=args.expert_parallel)
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
    for layer in expert_report(result.expert_counts, result.router_entropy):
        print(f"moe_layer{layer['layer']}_maxvio {layer['maxvio']:.4f}")
    return 0


def cmd_generate(args: argparse.Namespace, overrides: list[str]) -> int:
    from dualroute.train.tasks import LMTask
    from dualroute.train.trainer import precision_autocast, resolve_device

    task, model, _ = _load(args.path, overrides)
    if not isinstance(task, LMTask):
        raise UsageError(f"{args.path} is an image classifier; generate needs a language-model checkpoint")
    with precision_autocast(resolve_device(_device(overrides)), task.run_config.train.precision):
        text = task.sample(model, args.prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                           top_p=args.top_p, seed=args.seed)
    print(text)
    return 0


def cmd_compare(args: argparse.Namespace, overrides: list[str]) -> int:
    from dualroute.train.presets import get_preset, override

    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if not presets or not seeds:
        raise UsageError("compare needs at least one preset and one seed")
    configs = {p: override(get_preset(p), overrides) for p in presets}  # fail fast on a bad preset or key
    out = Path(args.out)
    runs: dict[str, list[dict[str, Any]]] = {p: [] for p in presets}
    # Seed-major order: a slow spell on a shared machine then hits every preset, not just one.
    for seed in seeds:
        for preset, base in configs.items():
            extra = [f"train.seed={seed}", f"train.out_dir={out / preset / f'seed{seed}'}"]
            if args.steps is not None:
                extra.append(f"train.steps={args.steps}")
            runs[preset].append(_run_one(override(base, extra), not args.quiet))
    table = compare_table(runs)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.md").write_text(table + "\n")
    (out / "compare.json").write_text(json.dumps(runs, indent=1))
    plot_compare(runs, out / "compare.png")
    print(table)
    print(f"\nwrote {out / 'compare.md'}, {out / 'compare.png'}, {out / 'compare.json'}")
    return 0


def _run_one(cfg, progress: bool) -> dict[str, Any]:
    from dualroute.train.metrics_log import read_jsonl
    from dualroute.train.trainer import train

    summary = train(cfg, progress=None if progress else False)
    evals = [r for r in read_jsonl(Path(cfg.train.out_dir) / "metrics.jsonl") if "val_loss" in r]
    return {"summary": summary.to_dict(), "evals": evals}


# ----------------------------------------------------------------------------------------- compare


def _mean_std(values: list[float], fmt: str = ".4f") -> str:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return f"{mean:{fmt}} ± {std:{fmt}}"


def _at_step(evals: list[dict], step: int, key: str) -> float:
    """``key`` at the last eval at or before ``step``."""
    return [r for r in evals if r["step"] <= step][-1][key]


def _at_time(evals: list[dict], seconds: float, key: str) -> float:
    """``key`` at ``seconds`` of training time, linearly interpolated between evals."""
    import numpy as np

    return float(np.interp(seconds, [r["train_time"] for r in evals], [r[key] for r in evals]))


def compare_table(runs: dict[str, list[dict[str, Any]]]) -> str:
    """Markdown table: mean ± std over seeds at equal steps and at equal training time."""
    all_runs = [r for rs in runs.values() for r in rs]
    step = min(r["evals"][-1]["step"] for r in all_runs)
    seconds = min(r["evals"][-1]["train_time"] for r in all_runs)
    keys = ["val_loss"] + (["val_acc"] if "val_acc" in all_runs[0]["evals"][-1] else [])
    unit = all_runs[0]["summary"]["unit"]
    head = ["preset", "params (active / total)"]
    head += [f"{k} @ step {step}" for k in keys] + [f"{k} @ {seconds:.1f} s" for k in keys] + [f"{unit}/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for preset, rs in runs.items():
        s = rs[0]["summary"]
        row = [preset, f"{s['params_active']:,} / {s['params_total']:,}"]
        row += [_mean_std([_at_step(r["evals"], step, k) for r in rs]) for k in keys]
        row += [_mean_std([_at_time(r["evals"], seconds, k) for r in rs]) for k in keys]
        row.append(_mean_std([r["summary"]["throughput"] for r in rs], ",.0f"))
        lines.append("| " + " | ".join(row) + " |")
    seeds = len(next(iter(runs.values())))
    lines.append(f"\nMean ± std over {seeds} seed(s). Equal time = the shortest run's training time "
                 f"({seconds:.1f} s, eval and checkpointing excluded), metrics interpolated between evals.")
    return "\n".join(lines)


def plot_compare(runs: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """Two panels, validation loss against steps and against training seconds; mean over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4))
    for preset, rs in runs.items():
        n = min(len(r["evals"]) for r in rs)
        steps = [e["step"] for e in rs[0]["evals"][:n]]
        loss = np.mean([[e["val_loss"] for e in r["evals"][:n]] for r in rs], axis=0)
        seconds = np.mean([[e["train_time"] for e in r["evals"][:n]] for r in rs], axis=0)
        by_step.plot(steps, loss, marker=".", label=preset)
        by_time.plot(seconds, loss, marker=".", label=preset)
    by_step.set(xlabel="step", ylabel="validation loss", title="equal steps")
    by_time.set(xlabel="training time (s)", ylabel="validation loss", title="equal time")
    for ax in (by_step, by_time):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


_COMMANDS = {"train": cmd_train, "eval": cmd_eval, "generate": cmd_generate, "compare": cmd_compare}
