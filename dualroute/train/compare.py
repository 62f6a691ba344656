"""``dualroute compare``: train presets x seeds on one config, then set each model against the dense twin.

Three views, each mean ± std over seeds (a model's seed ``s`` is paired with the dense twin's seed ``s``):

- at equal steps: the metrics at the last eval every run reached;
- time to target: the steps and the training seconds a model takes to first reach the dense twin's final
  validation loss, linearly interpolated between its evaluations, as ratios to the dense twin's own;
- at the dense twin's budget: a model's metrics at the dense twin's total training seconds, interpolated;
  a run that ends before that budget says so rather than extrapolate.

Training seconds are ``train_time`` of ``metrics.jsonl``: time in training steps, without evaluation and
checkpointing. The interpolation is only as fine as the evaluations (``train.eval_every``).

A run record is ``{"preset", "seed", "summary": Summary.to_dict(), "evals": [eval records of metrics.jsonl]}``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dualroute.train.configio import apply_config_mapping, read_config_file
from dualroute.train.presets import RunConfig, get_preset, override

Run = dict[str, Any]
Runs = dict[str, list[Run]]  # preset -> its runs, in seed order


# ------------------------------------------------------------------------------------------ configs


def is_dense_twin(cfg: RunConfig) -> bool:
    return cfg.model.moe is None


def twin_overrides(overrides: list[str]) -> list[str]:
    """The overrides as a dense twin takes them: ``model.moe.*`` applies to ``model.dense_twin_of``."""
    return [re.sub(r"^(--)?model\.moe\.", r"\1model.dense_twin_of.", o) for o in overrides]


def _preset_mapping(cfg: RunConfig, mapping: dict[str, Any]) -> dict[str, Any]:
    """A TOML mapping for one preset: ``model.dim`` also sets the MoE config's dim (as ``override`` does for
    ``model.dim=N``), and a dense twin takes the ``model.moe`` table on ``model.dense_twin_of``."""
    model = mapping.get("model")
    if not isinstance(model, dict):
        return mapping
    model = dict(model)
    if "dim" in model and (cfg.model.moe is not None or getattr(cfg.model, "dense_twin_of", None) is not None):
        model["moe"] = {"dim": model["dim"], **model.get("moe", {})}
    if cfg.model.moe is None and "moe" in model:
        model["dense_twin_of"] = {**model.pop("moe"), **model.get("dense_twin_of", {})}
    return {**mapping, "model": model}


def preset_configs(presets: list[str], overrides: list[str], config_file: str | None = None) -> dict[str, RunConfig]:
    """Each preset with the TOML file, then the ``key=value`` overrides, applied (as ``dualroute train`` does).

    A dense twin takes ``model.moe.*`` settings on the MoE config it is the twin of (``model.dense_twin_of``),
    so it stays as wide as the MoE models' active experts; ``model.dim`` resizes every preset, MoE included.
    """
    mapping = read_config_file(config_file) if config_file else None
    configs = {}
    for name in presets:
        cfg = get_preset(name)
        if mapping is not None:
            cfg = apply_config_mapping(cfg, _preset_mapping(cfg, mapping), str(config_file))
        configs[name] = override(cfg, twin_overrides(overrides) if is_dense_twin(cfg) else overrides)
    return configs


def find_baseline(configs: dict[str, RunConfig], baseline: str | None = None) -> str:
    """The dense twin among the presets: ``baseline`` if given, else the one preset with a dense model."""
    if baseline is not None:
        if baseline not in configs:
            raise ValueError(f"--baseline {baseline} is not among the compared presets ({', '.join(configs)})")
        return baseline
    dense = [name for name, cfg in configs.items() if is_dense_twin(cfg)]
    if len(dense) == 1:
        return dense[0]
    found = f"several dense presets ({', '.join(dense)})" if dense else "no dense preset"
    raise ValueError(f"compare needs a dense twin to measure against; found {found} among "
                     f"{', '.join(configs)}: add one (e.g. lm-dense, digits-dense) or name it with --baseline PRESET")


# --------------------------------------------------------------------------------------- arithmetic


def value_at(evals: list[dict], x: float, x_key: str, key: str = "val_loss") -> float | None:
    """``key`` at ``x`` (a step or training seconds), linear between evals; None past the last eval."""
    xs = [r[x_key] for r in evals]
    if x > xs[-1]:
        return None
    if x <= xs[0]:
        return evals[0][key]
    i = next(i for i, v in enumerate(xs) if v >= x)
    frac = (x - xs[i - 1]) / (xs[i] - xs[i - 1])
    return evals[i - 1][key] + frac * (evals[i][key] - evals[i - 1][key])


@dataclass(frozen=True)
class Crossing:
    step: float
    seconds: float


def crossing(evals: list[dict], target: float) -> Crossing | None:
    """Where ``val_loss`` first reaches ``target``: step and training seconds, linear between the two evals
    around it (at an eval that hits it exactly, that eval); None if it never does."""
    for i, r in enumerate(evals):
        if r["val_loss"] <= target:
            if i == 0:
                return Crossing(r["step"], r["train_time"])
            prev = evals[i - 1]
            frac = (prev["val_loss"] - target) / (prev["val_loss"] - r["val_loss"])
            return Crossing(prev["step"] + frac * (r["step"] - prev["step"]),
                            prev["train_time"] + frac * (r["train_time"] - prev["train_time"]))
    return None


def _paired(runs: Runs, baseline: str) -> dict[str, list[tuple[Run, Run]]]:
    """Each preset's runs with the baseline's run of the same seed."""
    by_seed = {r["seed"]: r for r in runs[baseline]}
    missing = {r["seed"] for rs in runs.values() for r in rs} - set(by_seed)
    if missing:
        raise ValueError(f"the baseline {baseline} has no run for seed(s) {sorted(missing)}")
    return {p: [(r, by_seed[r["seed"]]) for r in rs] for p, rs in runs.items()}


def time_to_target(runs: Runs, baseline: str) -> dict[str, dict[str, list[float | None]]]:
    """Per preset and seed: ``steps``, ``seconds`` to the baseline's final val_loss and their ratios to the
    baseline's own (``step_ratio``, ``time_ratio``); None where a run does not reach it."""
    out = {}
    for preset, pairs in _paired(runs, baseline).items():
        rows: dict[str, list[float | None]] = {"steps": [], "seconds": [], "step_ratio": [], "time_ratio": []}
        for run, base in pairs:
            target = base["evals"][-1]["val_loss"]
            hit, ref = crossing(run["evals"], target), crossing(base["evals"], target)  # ref: at its end, or before
            reached = hit is not None
            rows["steps"].append(hit.step if reached else None)
            rows["seconds"].append(hit.seconds if reached else None)
            rows["step_ratio"].append(_ratio(hit.step, ref.step) if reached else None)
            rows["time_ratio"].append(_ratio(hit.seconds, ref.seconds) if reached else None)
        out[preset] = rows
    return out


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else math.inf


def at_budget(runs: Runs, baseline: str, key: str = "val_loss") -> dict[str, list[float | None]]:
    """Per preset and seed: ``key`` at the baseline's total training seconds (None: the run is shorter)."""
    return {p: [value_at(run["evals"], base["evals"][-1]["train_time"], "train_time", key) for run, base in pairs]
            for p, pairs in _paired(runs, baseline).items()}


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    n = len(values)
    mean = sum(values) / n
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0


# ------------------------------------------------------------------------------------------- tables


def _cell(values: list[float | None], fmt: str, missing: str) -> str:
    """``mean ± std`` of the values present (one of several: just it); the count of missing ones (``missing``
    if all are)."""
    present = [v for v in values if v is not None]
    if not present:
        return missing
    mean, std = mean_std(present)
    text = f"{mean:{fmt}} ± {std:{fmt}}" if len(present) > 1 or len(values) == 1 else f"{mean:{fmt}}"
    return text if len(present) == len(values) else f"{text} ({len(values) - len(present)}/{len(values)} {missing})"


def _at_step(evals: list[dict], step: int, key: str) -> float:
    """``key`` at the last eval at or before ``step``."""
    return [r for r in evals if r["step"] <= step][-1][key]


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def compare_table(runs: Runs, baseline: str) -> str:
    """Markdown: equal steps, then time to the baseline's final loss and the metrics at its time budget."""
    all_runs = [r for rs in runs.values() for r in rs]
    step = min(r["evals"][-1]["step"] for r in all_runs)
    keys = ["val_loss"] + (["val_acc"] if "val_acc" in all_runs[0]["evals"][-1] else [])
    unit = all_runs[0]["summary"]["unit"]
    head = ["preset", "params (active / total)", *(f"{k} @ step {step}" for k in keys), f"{unit}/s"]
    lines = [_row(head), "|" + "---|" * len(head)]
    for preset, rs in runs.items():
        s = rs[0]["summary"]
        cells = [preset, f"{s['params_active']:,} / {s['params_total']:,}"]
        cells += [_cell([_at_step(r["evals"], step, k) for r in rs], ".4f", "") for k in keys]
        lines.append(_row(cells + [_cell([r["summary"]["throughput"] for r in rs], ",.0f", "")]))

    reach, budget = time_to_target(runs, baseline), {k: at_budget(runs, baseline, k) for k in keys}
    head = ["preset", "steps to target", f"× {baseline}", "seconds to target", f"× {baseline}",
            *(f"{k} @ {baseline}'s time" for k in keys)]
    lines += ["", _row(head), "|" + "---|" * len(head)]
    for preset in runs:
        r = reach[preset]
        cells = [preset, _cell(r["steps"], ",.0f", "not reached"), _cell(r["step_ratio"], ".2f", "not reached"),
                 _cell(r["seconds"], ".1f", "not reached"), _cell(r["time_ratio"], ".2f", "not reached")]
        cells += [_cell(budget[k][preset], ".4f", "shorter than the budget") for k in keys]
        lines.append(_row(cells))
    lines.append("\n" + _footnote(runs, baseline))
    return "\n".join(lines)


def _footnote(runs: Runs, baseline: str) -> str:
    finals = [r["evals"][-1] for r in runs[baseline]]
    loss, loss_std = mean_std([e["val_loss"] for e in finals])
    secs, secs_std = mean_std([e["train_time"] for e in finals])
    every = sorted({b["step"] - a["step"] for rs in runs.values() for r in rs for a, b in zip(r["evals"], r["evals"][1:])})
    spacing = f"{every[0]}" if len(every) == 1 else f"{every[0]}-{every[-1]}"
    return (f"Mean ± std over {len(runs[baseline])} seed(s); each seed is measured against {baseline}'s run of the "
            f"same seed. Target = {baseline}'s final val_loss ({loss:.4f} ± {loss_std:.4f}); the time budget = its "
            f"training time ({secs:.1f} ± {secs_std:.1f} s, eval and checkpointing excluded). Steps and seconds to "
            f"target are where val_loss first reaches it, interpolated linearly between evals (every {spacing} "
            f"steps here); where some seeds miss, the mean is over the others.")


# ------------------------------------------------------------------------------------------- figure


def _band(rs: list[Run], x_key: str):
    """Grid (every seed's eval points up to the shortest run's end), mean and std of val_loss over seeds."""
    import numpy as np

    end = min(r["evals"][-1][x_key] for r in rs)
    grid = np.unique([e[x_key] for r in rs for e in r["evals"] if e[x_key] <= end])
    loss = np.array([np.interp(grid, [e[x_key] for e in r["evals"]], [e["val_loss"] for e in r["evals"]])
                     for r in rs])
    return grid, loss.mean(0), loss.std(0, ddof=1) if len(rs) > 1 else np.zeros_like(grid)


def plot_compare(runs: Runs, path: Path, baseline: str) -> None:
    """Validation loss against steps (left) and training seconds (right), mean ± std over seeds: the whole
    runs on a log x axis (top), and from half the shortest run onwards with the y axis fitted to it (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    target = mean_std([r["evals"][-1]["val_loss"] for r in runs[baseline]])[0]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    for col, (x_key, label) in enumerate([("step", "step"), ("train_time", "training time (s, no eval)")]):
        whole, tail = axes[0, col], axes[1, col]
        bands = {p: _band(rs, x_key) for p, rs in runs.items()}
        tail_from = min(grid[-1] for grid, _, _ in bands.values()) / 2  # the shortest run's last half, onwards
        lo, hi = math.inf, -math.inf
        for preset, (grid, mean, std) in bands.items():
            pos = grid > 0
            line, = whole.plot(grid[pos], mean[pos], label=preset)
            whole.fill_between(grid[pos], (mean - std)[pos], (mean + std)[pos], color=line.get_color(), alpha=0.2)
            late = grid >= tail_from
            tail.plot(grid[late], mean[late], marker="." if x_key == "step" else None, color=line.get_color(),
                      label=preset)  # steps: every seed evaluates at the marked steps
            tail.fill_between(grid[late], (mean - std)[late], (mean + std)[late], color=line.get_color(), alpha=0.2)
            if late.any():
                lo, hi = min(lo, float(np.min((mean - std)[late]))), max(hi, float(np.max((mean + std)[late])))
        tail.axhline(target, color="gray", linestyle="--", linewidth=1, label=f"target ({baseline} final)")
        if math.isfinite(lo):
            pad = 0.08 * max(hi - lo, 1e-6)
            tail.set_ylim(min(lo, target) - pad, max(hi, target) + pad)
        whole.set(xscale="log", xlabel=f"{label}, log scale", ylabel="validation loss", title="whole run")
        tail.set(xlabel=label, ylabel="validation loss", title="from half the shortest run, y fitted")
        for ax in (whole, tail):
            ax.grid(alpha=0.3)
            ax.legend()
    fig.suptitle(f"mean ± std over {len(runs[baseline])} seed(s)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- runs


def _record(cfg: RunConfig, seed: int, preset: str, summary: dict[str, Any]) -> Run:
    from dualroute.train.metrics_log import read_jsonl

    evals = [r for r in read_jsonl(Path(cfg.train.out_dir) / "metrics.jsonl") if "val_loss" in r]
    return {"preset": preset, "seed": seed, "lr": cfg.train.lr, "summary": summary, "evals": evals}


def gather_runs(out: Path, presets: list[str], seeds: list[int]) -> Runs:
    """The finished runs under ``out/<preset>/seed<s>``, where ``run_compare`` puts them: for runs trained
    separately (``dualroute train <preset> train.seed=<s> --out out/<preset>/seed<s>``, e.g. in parallel
    processes or on other machines), or by a compare stopped before it wrote compare.json. A run is finished
    when it has written ``summary.json``; one that is missing, or trained with another seed, is an error
    naming its directory."""
    from dualroute.train.trainer import read_saved_config

    runs: Runs = {}
    missing = []
    for preset in presets:
        for seed in seeds:
            where = out / preset / f"seed{seed}"
            if not (where / "summary.json").is_file():
                missing.append(str(where))
                continue
            cfg = read_saved_config(where / "config.json")
            if cfg.train.seed != seed:
                raise ValueError(f"{where} was trained with train.seed={cfg.train.seed}, not {seed}")
            cfg = override(cfg, [f"train.out_dir={where}"])  # the run may have moved since it was trained
            summary = json.loads((where / "summary.json").read_text(encoding="utf-8"))
            runs.setdefault(preset, []).append(_record(cfg, seed, preset, summary))
    if missing:
        raise FileNotFoundError(f"no finished run (summary.json) in {', '.join(missing)}")
    return runs


def _run_one(cfg: RunConfig, seed: int, preset: str, progress: bool) -> Run:
    from dualroute.train.trainer import train

    return _record(cfg, seed, preset, train(cfg, progress=None if progress else False).to_dict())


def _run_lockstep(jobs: list[tuple[RunConfig, int, str]], turn_steps: int, progress: bool) -> list[Run]:
    from dualroute.train.trainer import train_lockstep

    summaries = train_lockstep([cfg for cfg, _, _ in jobs], turn_steps=turn_steps,
                               progress=None if progress else False)
    return [_record(cfg, seed, preset, s.to_dict()) for (cfg, seed, preset), s in zip(jobs, summaries)]


def run_compare(configs: dict[str, RunConfig], seeds: list[int], out: Path, *, baseline: str,
                steps: int | None = None, progress: bool = True, lrs: list[float] | None = None,
                lockstep: int | None = None) -> str:
    """Train every config with every seed under ``out/<preset>/seed<s>``; write compare.md / .json / .png
    there and return the table.

    With ``lrs``, every preset first trains the first seed at each learning rate (``out/<preset>/lr<lr>``)
    and keeps the one with the lowest final val_loss for all seeds: each model at its own best rate.

    Runs go in rounds: one seed (or, in the sweep, one rate) of every preset. Without ``lockstep`` a round's
    runs train one after the other; with ``lockstep=N``, together in one process, N steps of each in turn
    (``train_lockstep``), so that a machine whose speed drifts over the minutes slows them all alike.
    """
    def job(preset: str, seed: int, lr: float | None) -> tuple[RunConfig, int, str]:
        where = out / preset / (f"lr{lr:g}" if lr is not None else "") / f"seed{seed}"
        extra = [f"train.seed={seed}", f"train.out_dir={where}"] + ([f"train.lr={lr!r}"] if lr is not None else [])
        extra += [f"train.steps={steps}"] if steps is not None else []
        return override(configs[preset], extra), seed, preset

    def round_of(jobs: list[tuple[RunConfig, int, str]]) -> list[Run]:
        if lockstep is not None:
            return _run_lockstep(jobs, lockstep, progress)
        return [_run_one(cfg, seed, preset, progress) for cfg, seed, preset in jobs]

    runs: Runs = {p: [] for p in configs}
    chosen: dict[str, float | None] = dict.fromkeys(configs)
    if lrs:
        sweep = {p: {} for p in configs}
        for lr in lrs:  # rate-major: a slow spell on a shared machine hits every preset
            for run in round_of([job(preset, seeds[0], lr) for preset in configs]):
                sweep[run["preset"]][lr] = run
        for preset, by_lr in sweep.items():
            chosen[preset] = min(by_lr, key=lambda lr: by_lr[lr]["evals"][-1]["val_loss"])
            runs[preset].append(by_lr[chosen[preset]])
        out.mkdir(parents=True, exist_ok=True)
        (out / LR_SWEEP_FILE).write_text(json.dumps(
            {p: {f"{lr!r}": by_lr[lr]["evals"][-1]["val_loss"] for lr in lrs} for p, by_lr in sweep.items()},
            indent=1))
    # Seed-major order: a slow spell on a shared machine then hits every preset, not just one.
    for seed in seeds[1:] if lrs else seeds:
        for run in round_of([job(preset, seed, chosen[preset]) for preset in configs]):
            runs[run["preset"]].append(run)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(runs, indent=1))
    return write_report(runs, out, baseline)


LR_SWEEP_FILE = "lr_sweep.json"  # preset -> {learning rate: final val_loss of the first seed}


def lr_sweep_table(sweep: dict[str, dict[str, float]]) -> str:
    """Markdown: each preset's final val_loss (first seed) at each learning rate, the kept one in bold."""
    lrs = list(next(iter(sweep.values())))
    lines = [_row(["preset", *(f"lr {float(lr):g}" for lr in lrs)]), "|" + "---|" * (len(lrs) + 1)]
    for preset, by_lr in sweep.items():
        best = min(by_lr, key=by_lr.get)
        lines.append(_row([preset, *(f"**{v:.4f}**" if lr == best else f"{v:.4f}" for lr, v in by_lr.items())]))
    return "\n".join(lines) + "\n\nFinal val_loss of the first seed at each learning rate; bold: the rate kept."


def read_runs(out: Path) -> Runs:
    """The runs a compare wrote to ``out/compare.json``."""
    path = out / "compare.json"
    if not path.is_file():
        raise FileNotFoundError(f"no {path}: --report-only rewrites the report of a finished compare")
    return json.loads(path.read_text())


def write_report(runs: Runs, out: Path, baseline: str) -> str:
    """Write compare.md and compare.png to ``out``; return the table."""
    table = compare_table(runs, baseline)
    if (out / LR_SWEEP_FILE).is_file():
        table += "\n\n" + lr_sweep_table(json.loads((out / LR_SWEEP_FILE).read_text()))
    (out / "compare.md").write_text(table + "\n")
    plot_compare(runs, out / "compare.png", baseline)
    return table
