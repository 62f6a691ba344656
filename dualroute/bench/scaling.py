"""``dualroute bench scaling``: more experts and groups at a fixed active size, flat top-k against dual-layer.

    dualroute bench scaling [--experts 8,16,32,64] [--groups 4,8] [--seeds 0] [--jobs 2]
                            [--phases train,time,bytes] [--out runs/scaling] [key=value ...]

The models are the lm presets with more or fewer experts, all at the presets' K and expert width, so that all
have the dense twin's active parameters. For each E: ``flat-E<E>`` (lm-flat: flat top-K over E experts), and
``dual-G<G>-E<E>`` for each G (lm-dual: E experts in G groups, ``--groups-per-token`` J of them per token).
The twin, ``dense`` (lm-dense), is one model for every E and trains once per seed. ``key=value`` overrides
apply to every model (``train.steps=1000``, ``data.kind=text``).

Three phases, chosen by ``--phases``; each reuses what an earlier call left in ``--out``:

1. ``train``: every (model, seed) without a finished run in ``OUT/<model>/seed<s>`` (one that wrote
   ``summary.json``) trains, or resumes from its last checkpoint, as ``python -m dualroute train``, up to
   ``--jobs`` processes at a time. Runs that share the cores slow one another, so their seconds are not
   compared; their steps are.
2. ``time``: one AdamW training step of every model, alternating in this process (as ``bench lm``), median
   of ``--repeats``; and the router's share of it: one MoE layer's router forward + backward
   (``layer_parts``), times the model's MoE layers, over its step; and the AdamW update's share (the optimizer
   step alone, alternating, on the last step's gradients), which grows with the total parameters. Each call
   adds a run to the ones kept in ``--out``, and the report takes each model's median ratio over them (remove
   ``scaling_time.json`` to start over): one run on a shared VM moves by 5-10%.
3. ``bytes``: one MoE layer of every model under expert parallelism over ``--world`` local gloo processes (as
   ``bench ep``, random weights and tokens): the bytes a rank sends to the others per token per training
   step.

The report (``scaling.md``, ``scaling.json``, ``scaling.png`` in ``--out``) gives each model's validation
loss at equal steps (the last evaluation) and at equal time, and the steps it takes to reach the twin's final
loss as a share of the twin's (interpolated between evaluations; times the step-time ratio, the time it takes),
mean ± std over seeds. Equal time is the twin's training time: the model's loss at the twin's steps divided by
its step-time ratio (phase 2), interpolated between its evaluations. It comes from the benchmarked step time, not
from the runs' own seconds, so runs trained side by side or on a busy machine still compare. Dual-layer against
flat top-k at the same E is "better" or "worse" where the mean of the per-seed differences is more than twice
their standard deviation away from 0, else "level" (with one seed, no verdict).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import median

import torch

from .common import Contender, describe_device, device_setup, time_alternating, write_json

PHASES = ("train", "time", "bytes")
TIME_FILE, BYTES_FILE = "scaling_time.json", "scaling_bytes.json"


@dataclass(frozen=True)
class Model:
    """One model of the study: a preset and its expert layout (E = G = J = 0 for the dense twin)."""

    name: str
    preset: str
    E: int = 0
    G: int = 0
    J: int = 0

    @property
    def overrides(self) -> list[str]:
        if not self.E:
            return []
        return [f"model.moe.num_experts={self.E}", f"model.moe.num_groups={self.G}",
                f"model.moe.groups_per_token={self.J}"]


def study_models(experts: list[int], groups: list[int], groups_per_token: int) -> list[Model]:
    """The twin, then for each E flat top-k and dual-layer at each G that divides E (and is at least J)."""
    models = [Model("dense", "lm-dense")]
    for E in experts:
        models.append(Model(f"flat-E{E}", "lm-flat", E, 1, 1))
        models += [Model(f"dual-G{G}-E{E}", "lm-dual", E, G, groups_per_token)
                   for G in groups if E % G == 0 and G >= groups_per_token]
    return models


def model_configs(models: list[Model], overrides: list[str]) -> dict:
    """``{model name: RunConfig}``: the preset with the model's layout and the user's overrides (errors now,
    before anything trains)."""
    from ..train.compare import preset_configs

    return {m.name: preset_configs([m.preset], m.overrides + overrides)[m.preset] for m in models}


# ------------------------------------------------------------------------------------------- train


def _run_dir(out: Path, model: Model, seed: int) -> Path:
    return out / model.name / f"seed{seed}"


def train_command(model: Model, seed: int, run_dir: Path, overrides: list[str]) -> list[str]:
    """The ``dualroute train`` command line of one run; ``--resume`` continues it where it stopped. The twin
    takes ``model.moe.*`` overrides on the MoE config it is the twin of, as in ``dualroute compare``."""
    from ..train.compare import twin_overrides

    mine = model.overrides + (overrides if model.E else twin_overrides(overrides))
    return [sys.executable, "-m", "dualroute", "train", model.preset, *mine, f"train.seed={seed}",
            "--out", str(run_dir), "--resume", "--quiet"]


def train_missing(models: list[Model], seeds: list[int], out: Path, overrides: list[str], jobs: int) -> int:
    """Train every (model, seed) that has not finished, up to ``jobs`` processes at a time, seed by seed;
    return how many trained. A failed run is a RuntimeError naming it and its log, after the others end."""
    todo = [(m, s) for s in seeds for m in models if not (_run_dir(out, m, s) / "summary.json").is_file()]
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    running: list[tuple[subprocess.Popen, Model, int, Path]] = []
    failed: list[str] = []
    done = 0
    queue = list(todo)
    while queue or running:
        while queue and len(running) < jobs:
            model, seed = queue.pop(0)
            log = logs / f"{model.name}-seed{seed}.log"
            with open(log, "ab") as f:
                proc = subprocess.Popen(train_command(model, seed, _run_dir(out, model, seed), overrides),
                                        stdout=f, stderr=subprocess.STDOUT)
            running.append((proc, model, seed, log))
            print(f"  training {model.name} seed {seed} (log {log})", flush=True)
        time.sleep(0.2)
        for entry in [r for r in running if r[0].poll() is not None]:
            running.remove(entry)
            proc, model, seed, log = entry
            done += 1
            if proc.returncode != 0:
                failed.append(f"{model.name} seed {seed} (exit {proc.returncode}, see {log})")
            print(f"  [{done}/{len(todo)}] {model.name} seed {seed} "
                  f"{'done' if proc.returncode == 0 else 'FAILED'}", flush=True)
    if failed:
        raise RuntimeError("training failed: " + "; ".join(failed))
    return len(todo)


# -------------------------------------------------------------------------------------------- time


def time_steps(configs: dict, repeats: int, threads: int) -> dict:
    """Median seconds of one AdamW step of every model, alternating; and, per MoE model, one MoE layer's
    router forward + backward times the model's MoE layers (``router_s``)."""
    from ..layer import MoELayer
    from ..models import TransformerLM
    from .lm import layer_parts, lm_train_step

    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    contenders, moe_layers = [], {}
    first = next(iter(configs.values())).train
    for name, cfg in configs.items():
        torch.manual_seed(0)
        model = TransformerLM(cfg.model)
        moe_layers[name] = sum(isinstance(m, MoELayer) for m in model.modules())
        idx_BS = torch.randint(0, cfg.model.vocab_size, (first.batch_size, first.seq_len + 1), generator=gen)
        contenders.append(Contender(name, lm_train_step(model, idx_BS)))
    step_s = time_alternating(contenders, repeats, warmup=3)
    # the AdamW update alone, on the gradients the last step left: it grows with the total parameters, not the active
    optimizer_s = time_alternating([Contender(c.name, c.step.optimizer.step) for c in contenders], repeats)
    tokens = first.batch_size * first.seq_len
    router_s = {name: layer_parts(cfg.model.moe, tokens, repeats)["router"] * moe_layers[name]
                for name, cfg in configs.items() if cfg.model.moe is not None}
    return {"step_s": step_s, "router_s": router_s, "optimizer_s": optimizer_s, "tokens_per_step": tokens,
            "repeats": repeats, **device_setup(torch.device("cpu"), threads), "torch": torch.__version__}


def read_timings(path: Path) -> list[dict]:
    """The time phase's runs kept in ``path`` (none when it does not exist)."""
    if not path.is_file():
        return []
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not the time phase's JSON ({e}); remove it and run --phases time again") from None
    runs = saved.get("runs", [saved]) if isinstance(saved, dict) else None  # an older file: one run, not a list
    if not isinstance(runs, list) or not all(isinstance(r, dict) and "step_s" in r for r in runs):
        raise ValueError(f"{path} does not hold the time phase's runs; remove it and run --phases time again")
    return runs


def merge_timings(runs: list[dict]) -> dict | None:
    """Per model, the median over the time phase's runs of its step time over the twin's, of its router share
    and of its AdamW share (over the runs that timed it). Ratios are taken within a run, then the median across
    runs, so a run the VM made slower as a whole still gives its ratios."""
    if not runs:
        return None
    def share(key: str, of: list[dict]) -> dict[str, float]:  # median of (key's seconds / the step's), per model
        return {n: median([r[key][n] / r["step_s"][n] for r in of]) for n in of[0][key]} if of else {}

    with_optimizer = [r for r in runs if "optimizer_s" in r]  # runs from before it was timed have none
    return {"step_ratio": {n: median([r["step_s"][n] / r["step_s"]["dense"] for r in runs]) for n in runs[0]["step_s"]},
            "router_share": share("router_s", runs), "optimizer_share": share("optimizer_s", with_optimizer),
            "optimizer_runs": len(with_optimizer), "runs": len(runs),
            **{k: runs[-1][k] for k in ("repeats", "tokens_per_step", "threads")}}


# ------------------------------------------------------------------------------------------- bytes


def _bytes_rank(rank: int, world: int, jobs: list[tuple[str, object]], tokens: int, out: str) -> None:
    """Each job's MoE layer (the model's own config) with its experts over the ``world`` ranks: one warm-up,
    then two training steps on this rank's random tokens; rank 0 writes the ranks' mean traffic per token."""
    import torch.distributed as dist

    from ..layer import MoELayer
    from ..parallel.expert_parallel import apply_expert_parallel, traffic

    steps, mine = 2, []
    for _, moe_cfg in jobs:
        torch.manual_seed(0)  # the same layer on every rank
        layer = MoELayer(moe_cfg)
        apply_expert_parallel(layer)
        x_TD = torch.randn(tokens, moe_cfg.dim, generator=torch.Generator().manual_seed(rank))
        for step in range(1 + steps):
            if step == 1:
                traffic(layer, reset=True)
            y_TD, aux = layer(x_TD)
            (y_TD.square().mean() + aux.loss).backward()
        sent = traffic(layer)
        mine.append((sent.bytes_sent / (steps * tokens), sent.pairs_remote / sent.tokens,
                     layer.ep.placement.max_ranks_per_token))
    everyone: list = [None] * world
    dist.all_gather_object(everyone, mine)
    if rank == 0:
        rows = [{"bytes_per_token": sum(r[i][0] for r in everyone) / world,
                 "pairs_per_token": sum(r[i][1] for r in everyone) / world,
                 "ranks_per_token_bound": everyone[0][i][2]} for i in range(len(jobs))]
        Path(out).write_text(json.dumps(rows))


def check_world(configs: dict, world: int) -> None:
    """A ValueError naming the first model whose experts ``world`` processes cannot share evenly."""
    for name, cfg in configs.items():
        if cfg.model.moe is not None and cfg.model.moe.num_experts % world:
            raise ValueError(f"--world {world} does not divide {name}'s {cfg.model.moe.num_experts} experts")


def expert_parallel_bytes(configs: dict, world: int, tokens: int, timeout: float = 300.0) -> dict:
    """Per MoE model: the bytes a rank sends to the others per token per training step of one of its MoE
    layers, and the remote (token, rank) pairs per token, with the experts over ``world`` gloo processes."""
    from ..parallel.launch import run_workers

    jobs = [(name, cfg.model.moe) for name, cfg in configs.items() if cfg.model.moe is not None]
    check_world(configs, world)
    with tempfile.TemporaryDirectory(prefix="dualroute-bench-scaling-") as tmp:
        path = os.path.join(tmp, "rows.json")
        run_workers(_bytes_rank, world, jobs, tokens, path, timeout_s=timeout)
        rows = json.loads(Path(path).read_text())
    return {"world": world, "tokens_per_rank": tokens, "models": {name: row for (name, _), row in zip(jobs, rows)}}


# ------------------------------------------------------------------------------------------ report


def equal_time_loss(evals: list[dict], twin_steps: float, step_ratio: float) -> float | None:
    """Validation loss at the step a model reaches in the twin's training time: the twin's steps over the
    model's step-time ratio, linear between evaluations; None when the run ends before it."""
    from ..train.compare import value_at

    if not step_ratio > 0:
        raise ValueError(f"step-time ratio must be > 0, got {step_ratio}")
    return value_at(evals, twin_steps / step_ratio, "step")


def steps_to_target(evals: list[dict], twin_evals: list[dict]) -> float | None:
    """The steps a model takes to reach the twin's final validation loss, over the twin's steps (linear between
    evaluations, as ``dualroute compare``); None when it never does."""
    from ..train.compare import crossing

    hit = crossing(evals, twin_evals[-1]["val_loss"])
    return hit.step / twin_evals[-1]["step"] if hit else None


def verdict(differences: list[float]) -> str:
    """Dual-layer minus flat, per seed: "better" (lower loss) or "worse" when the mean is more than twice the
    standard deviation of the differences away from 0, else "level"; no verdict from one seed."""
    from ..train.compare import mean_std

    if len(differences) < 2:
        return "(one seed)"
    mean, std = mean_std(differences)
    if abs(mean) > 2 * std:
        return "better" if mean < 0 else "worse"
    return "level"


def _fmt(values: list[float | None], fmt: str = ".4f", missing: str = "run too short") -> str:
    """Mean ± std of the values present; ``missing`` says why the others are not (or stands for all of them)."""
    from ..train.compare import mean_std

    present = [v for v in values if v is not None]
    if not present:
        return missing
    mean, std = mean_std(present)
    text = f"{mean:{fmt}} ± {std:{fmt.lstrip('+')}}" if len(present) > 1 else f"{mean:{fmt}}"
    return text if len(present) == len(values) else f"{text} ({len(values) - len(present)} {missing})"


def summarize(models: list[Model], runs: dict, timing: dict | None, traffic: dict | None) -> dict:
    """Per model: the per-seed losses at equal steps and at equal time, its step-time ratio and router share,
    bytes per token, and (dual-layer models) the per-seed difference to flat top-k at the same E."""
    twin = {r["seed"]: r for r in runs["dense"]}
    rows = {}
    for m in models:
        rs = runs[m.name]
        ratio = timing["step_ratio"][m.name] if timing else None
        row = {"E": m.E, "G": m.G, "J": m.J, "seeds": [r["seed"] for r in rs],
               "steps": [r["evals"][-1]["step"] for r in rs],
               "loss_equal_steps": [r["evals"][-1]["val_loss"] for r in rs],
               "step_ratio": ratio,
               "loss_equal_time": ([equal_time_loss(r["evals"], twin[r["seed"]]["evals"][-1]["step"], ratio)
                                    for r in rs] if ratio else None),
               "steps_to_target": [steps_to_target(r["evals"], twin[r["seed"]]["evals"]) for r in rs],
               "router_share": timing["router_share"].get(m.name) if timing else None,
               "optimizer_share": timing["optimizer_share"].get(m.name) if timing else None,
               "bytes_per_token": (traffic["models"][m.name]["bytes_per_token"]
                                   if traffic and m.name in traffic["models"] else None),
               "params_total": rs[0]["summary"]["params_total"], "params_active": rs[0]["summary"]["params_active"]}
        # its steps to the twin's loss (x the twin's) times its step ratio: its time to it, from benchmarked steps
        row["time_to_target"] = ([None if s is None else s * ratio for s in row["steps_to_target"]]
                                 if ratio else None)
        if m.G > 1:
            flat = {r["seed"]: r for r in runs[f"flat-E{m.E}"]}
            row["minus_flat"] = [r["evals"][-1]["val_loss"] - flat[r["seed"]]["evals"][-1]["val_loss"] for r in rs]
            row["verdict"] = verdict(row["minus_flat"])
        rows[m.name] = row
    return rows


def report_table(rows: dict, timing: dict | None, traffic: dict | None) -> str:
    bytes_head = f"sent B/token (EP over {traffic['world']})" if traffic else "sent B/token (EP)"
    lines = ["| model | E | G | J | total params | val loss, equal steps | val loss, equal time | step time / dense "
             "| steps to dense's loss (× dense) | time to it (× dense) "
             f"| router share | AdamW share | {bytes_head} | dual - flat (equal steps) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        dash = "-"
        vs_flat = f"{_fmt(r['minus_flat'], '+.4f')}: {r['verdict']}" if "minus_flat" in r else dash
        lines.append("| " + " | ".join([
            name, str(r["E"] or dash), str(r["G"] or dash), str(r["J"] or dash), f"{r['params_total']:,}",
            _fmt(r["loss_equal_steps"]), _fmt(r["loss_equal_time"]) if r["loss_equal_time"] else dash,
            f"{r['step_ratio']:.3f}" if r["step_ratio"] else dash,
            _fmt(r["steps_to_target"], ".2f", "not reached"),
            _fmt(r["time_to_target"], ".2f", "not reached") if r["time_to_target"] else dash,
            f"{100 * r['router_share']:.1f}%" if r["router_share"] is not None else dash,
            f"{100 * r['optimizer_share']:.1f}%" if r["optimizer_share"] is not None else dash,
            f"{r['bytes_per_token']:,.0f}" if r["bytes_per_token"] is not None else dash, vs_flat]) + " |")
    seeds = next(iter(rows.values()))["seeds"]
    notes = [f"Mean ± std over seeds {', '.join(map(str, seeds))}; active parameters "
             f"{next(iter(rows.values()))['params_active']:,} (dense) for every model up to its router."]
    if timing:
        notes.append(f"Step time: median of {timing['repeats']} AdamW steps of {timing['tokens_per_step']} tokens, "
                     f"models alternating, {timing['threads']} threads; the ratios are the median of "
                     f"{timing['runs']} such run{'s' if timing['runs'] > 1 else ''} of the time phase; "
                     + (f"the AdamW share over the {timing['optimizer_runs']} that timed it; "
                        if 0 < timing.get("optimizer_runs", 0) < timing["runs"] else "")
                     + "equal time = the twin's steps over the "
                     "model's step-time ratio.")
    if traffic:
        notes.append(f"Bytes: one MoE layer's experts over {traffic['world']} gloo processes, "
                     f"{traffic['tokens_per_rank']} random tokens per rank, forward + backward.")
    return "\n".join(lines) + "\n\n" + " ".join(notes)


def plot(rows: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..train.compare import mean_std

    keys = [("loss_equal_steps", "equal steps"), ("loss_equal_time", "equal time (benchmarked step time)")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, (key, title) in zip(axes, keys):
        series: dict[str, list[tuple[int, float, float]]] = {}
        for name, r in rows.items():
            values = [v for v in (r[key] or []) if v is not None]
            if not values:
                continue
            mean, std = mean_std(values)
            if not r["E"]:
                ax.axhline(mean, color="black", lw=1, label="dense twin")
                ax.axhspan(mean - std, mean + std, color="black", alpha=0.1)
                continue
            label = "flat top-k" if r["G"] == 1 else f"dual-layer G={r['G']}, J={r['J']}"
            series.setdefault(label, []).append((r["E"], mean, std))
        for label, points in series.items():
            points.sort()
            xs, ms, ss = zip(*points)
            ax.errorbar(xs, ms, yerr=ss, marker="o", capsize=3, label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("experts E")
        ax.set_title(f"validation loss at {title}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation loss (nats)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -------------------------------------------------------------------------------------------- main


def _ints(p: argparse.ArgumentParser, flag: str, text: str, minimum: int) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        p.error(f"{flag} takes comma-separated integers, got {text!r}")
    if not values or min(values) < minimum:
        p.error(f"{flag} takes integers >= {minimum}, got {text!r}")
    return values


def main(argv: list[str]) -> int:
    from ..train.compare import gather_runs

    p = argparse.ArgumentParser(prog="dualroute bench scaling", description=__doc__.split("\n\n")[0])
    p.add_argument("--experts", default="8,16,32,64", help="the E of the study")
    p.add_argument("--groups", default="4,8", help="the G of the dual-layer models")
    p.add_argument("--groups-per-token", type=int, default=2, help="J")
    p.add_argument("--seeds", default="0")
    p.add_argument("--jobs", type=int, default=1, help="training processes at a time (each gets cores / jobs "
                   "threads unless train.threads is given)")
    p.add_argument("--phases", default=",".join(PHASES), help="which of train,time,bytes to run now")
    p.add_argument("--repeats", type=int, default=9, help="time: timed steps per model")
    p.add_argument("--threads", type=int, default=2, help="time: CPU threads")
    p.add_argument("--world", type=int, default=4, help="bytes: expert-parallel processes")
    p.add_argument("--ep-tokens", type=int, default=2048, help="bytes: tokens per rank")
    p.add_argument("--out", default="runs/scaling")
    p.add_argument("overrides", nargs="*", help="config overrides for every model, e.g. train.steps=1000")
    args = p.parse_args(argv)
    for name in ("groups_per_token", "jobs", "repeats", "threads", "world", "ep_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    experts, groups = _ints(p, "--experts", args.experts, 1), _ints(p, "--groups", args.groups, 1)
    seeds = _ints(p, "--seeds", args.seeds, 0)
    phases = [ph.strip() for ph in args.phases.split(",") if ph.strip()]
    if set(phases) - set(PHASES):
        p.error(f"--phases takes some of {','.join(PHASES)}, got {args.phases!r}")
    out = Path(args.out)
    models = study_models(experts, groups, args.groups_per_token)
    overrides = list(args.overrides)
    if args.jobs > 1 and not any(o.lstrip("-").startswith("train.threads") for o in overrides):
        overrides.append(f"train.threads={max(1, (os.cpu_count() or 1) // args.jobs)}")  # no oversubscription
    configs = model_configs(models, overrides)
    if "bytes" in phases:
        check_world(configs, args.world)  # before hours of training, not after
    out.mkdir(parents=True, exist_ok=True)
    skipped = [f"G={G} at E={E}" for E in experts for G in groups if E % G or G < args.groups_per_token]
    print(f"dualroute bench scaling: seeds {','.join(map(str, seeds))}, {len(models)} models: "
          + ", ".join(m.name for m in models)
          + (f" (skipped, G must divide E and be >= J: {', '.join(skipped)})" if skipped else ""), flush=True)
    if "train" in phases:
        train_missing(models, seeds, out, overrides, args.jobs)
    if "time" in phases:
        print(f"timing steps: {describe_device(torch.device('cpu'), args.threads)}", flush=True)
        kept = read_timings(out / TIME_FILE)  # each call adds a run; the report takes the median of them
        write_json(str(out / TIME_FILE), {"runs": kept + [time_steps(configs, args.repeats, args.threads)]})
    if "bytes" in phases:
        print(f"bytes under expert parallelism over {args.world} processes", flush=True)
        write_json(str(out / BYTES_FILE), expert_parallel_bytes(configs, args.world, args.ep_tokens))
    runs = gather_runs(out, [m.name for m in models], seeds)
    timings = read_timings(out / TIME_FILE)
    traffic = json.loads((out / BYTES_FILE).read_text()) if (out / BYTES_FILE).is_file() else None
    stale = [m.name for m in models if any(m.name not in t["step_s"] for t in timings)
             or (traffic and m.E and m.name not in traffic["models"])]
    if stale:
        p.error(f"{out} has no step time or bytes of {', '.join(stale)}: remove {TIME_FILE} (every time run must "
                f"hold every model) and run --phases time,bytes again")
    timing = merge_timings(timings)
    rows = summarize(models, runs, timing, traffic)
    table = report_table(rows, timing, traffic)
    (out / "scaling.md").write_text(table + "\n")
    write_json(str(out / "scaling.json"), {"models": [asdict(m) for m in models], "overrides": overrides,
                                           "rows": rows, "time": timing, "time_runs": timings,
                                           "bytes": traffic})
    plot(rows, out / "scaling.png")
    print(table)
    return 0
