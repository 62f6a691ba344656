"""The training loop: AdamW + warmup/cosine, gradient accumulation and clipping, periodic eval,
JSON-lines metrics, atomic checkpoints and exact resume.

A run directory (``train.out_dir``) holds ``config.json``, ``metrics.jsonl``, ``ckpt-<step>/`` and, at
the end, ``summary.json``. A checkpoint holds everything the next step depends on (weights, optimizer,
schedule, the global RNGs and the batch sampler's generator), so an interrupted run resumed from it
takes the very steps the uninterrupted run would have taken.

``train(cfg, expert_parallel=W)`` under ``torchrun --nproc-per-node W`` runs the same steps with the
experts sharded over W ranks (``data_parallel=D`` as well: W = E x D ranks): the trainer calls its
``ranks`` (``distributed.py``) at the few points where that differs; on one process those calls do nothing.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from dualroute.balance import update_correction_biases
from dualroute.data import Tokenizer
from dualroute.layer import MoEAux
from dualroute.losses import max_violation, router_entropy
from dualroute.models import flops_per_token, param_counts
from dualroute.train.checkpoint import (
    Checkpoint,
    capture_rng,
    checkpoint_dir,
    latest_checkpoint,
    load_newest_intact,
    load_weights,
    prune_checkpoints,
    restore_rng,
    save_checkpoint,
)
from dualroute.train.configio import config_to_dict
from dualroute.train.distributed import SingleProcess, launch
from dualroute.train.metrics_log import JsonlLogger, read_jsonl
from dualroute.train.optim import build_optimizer
from dualroute.train.presets import RunConfig, run_config_from_dict, run_config_to_dict
from dualroute.train.schedule import warmup_cosine_scheduler
from dualroute.train.tasks import EvalResult, make_task, to_device

SAMPLE_PROMPT = "The "
SAMPLE_TOKENS = 120
log = logging.getLogger("dualroute")  # notices about the run directory (stderr unless the user configures logging)


@dataclass
class Summary:
    """What a finished run reports; written to ``summary.json``."""

    out_dir: str
    steps: int
    metrics: dict[str, float]  # final validation metrics
    baseline_loss: float  # unigram (text) or uniform-guess (images) validation loss
    params_total: int
    params_active: int
    flops_per_token: int  # forward FLOPs per token (training is about 3x)
    experts: list[dict[str, Any]]  # per MoE layer, at the final eval: share per expert, maxvio, entropy
    unit: str  # "tokens" or "images"
    throughput: float  # training units per second
    train_time_s: float  # time in training steps (excludes eval and checkpointing)
    wall_time_s: float  # this process's wall time for the run
    sample: str | None = None  # language models: a generated continuation of SAMPLE_PROMPT

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class StepStats:
    loss: float
    aux_loss: float
    grad_norm: float
    lr: float
    units: int
    seconds: float
    aux: list[MoEAux]  # every micro-batch's MoE layers, concatenated
    num_layers: int  # MoE layers per forward

    def layer_load(self, i: int, field: str = "tokens_per_expert_E") -> torch.Tensor:
        """MoE layer ``i``'s load over the whole step (summed over the micro-batches)."""
        return sum(getattr(a, field) for a in self.aux[i :: self.num_layers]).cpu()


# ----------------------------------------------------------------------------------------- pieces


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device=cuda but CUDA is not available; use train.device=cpu or auto")
    return torch.device(name)


def precision_autocast(device: torch.device, precision: str) -> torch.autocast:
    """``train.precision``'s autocast for forward passes (a no-op context for float32)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bfloat16")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def aux_loss(aux: list) -> torch.Tensor | None:
    """Sum of the MoE layers' own weighted losses (``MoEAux.loss``), or None when they carry none."""
    losses = [a.loss for a in aux if getattr(a, "loss", None) is not None]
    return torch.stack(losses).sum() if losses else None


def balance_step(model: nn.Module, aux: list[MoEAux], rate: float) -> None:
    """After an optimizer step: move the routers' correction biases toward balance (aux-loss-free balancing)."""
    if rate > 0 and aux:
        update_correction_biases(model, aux, rate)


def expert_report(counts: list[torch.Tensor], entropy: list[float]) -> list[dict[str, Any]]:
    """Per MoE layer: each expert's share of the routed rows, MaxVio and mean routing entropy."""
    report = []
    for i, (counts_E, ent) in enumerate(zip(counts, entropy)):
        total = max(1, int(counts_E.sum()))
        report.append({"layer": i, "share": [round(int(c) / total, 4) for c in counts_E],
                       "maxvio": max_violation(counts_E), "entropy": ent})
    return report


def _encode_state(state: torch.Tensor) -> str:
    return base64.b64encode(state.numpy().tobytes()).decode("ascii")


def _decode_state(text: str) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(base64.b64decode(text), dtype=np.uint8).copy())


def config_differences(saved: Any, now: Any, where: str) -> list[str]:
    """``"where.key: A in the checkpoint, B now"`` for each leaf that differs between two config dicts."""
    if isinstance(saved, dict) and isinstance(now, dict):
        return [line for key in sorted(set(saved) | set(now), key=str)
                for line in config_differences(saved.get(key), now.get(key), f"{where}.{key}")]
    return [] if saved == now else [f"{where}: {saved!r} in the checkpoint, {now!r} now"]


def read_saved_config(path: str | os.PathLike) -> RunConfig:
    """A run's ``config.json``; errors name the file."""
    path = Path(path)
    try:
        return run_config_from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); it should be the run config dualroute wrote") from None
    except (ValueError, TypeError) as e:
        raise type(e)(f"{path}: {e}") from None


def _truncate_log(path: Path, step: int) -> None:
    """Drop records logged after ``step`` (by a run that died before its next checkpoint); all at step 0."""
    if not path.is_file():
        return
    if step == 0:
        path.unlink()
        return
    kept = [r for r in read_jsonl(path) if r.get("step", 0) <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------- trainer


class Trainer:
    """One run: ``Trainer(cfg).fit()`` trains up to ``cfg.train.steps``, from scratch or after ``load(checkpoint)``.

    ``ranks`` (from ``distributed.launch``) spreads the run over several processes; the default is one.
    """

    def __init__(self, cfg: RunConfig, *, saved: dict[str, Any] | Tokenizer | None = None,
                 progress: bool | None = None,
                 ranks: SingleProcess | None = None) -> None:
        t = cfg.train
        self.ranks = ranks or SingleProcess()
        self.device = resolve_device(t.device)
        if t.threads is not None:
            torch.set_num_threads(t.threads)
        seed_everything(t.seed)  # on every rank: the same initial model
        self.task = make_task(cfg, saved)  # saved: what a checkpoint holds for the task (its tokenizer)
        self.cfg = self.task.run_config
        self.ranks.check(self.cfg)  # several ranks: the same config everywhere, a batch that splits evenly
        model = self.task.build_model().to(self.device)
        self.params = param_counts(model)  # (total, active) of the whole model, before any sharding
        self.flops = flops_per_token(model, self.task.flops_seq_len)
        self.model = self.ranks.shard(model)  # expert parallel: keep this rank's experts
        self.ranks.seed_own_rng()  # several ranks: dropout / router noise differ between them
        self.optimizer = build_optimizer(self.model, t.lr, t.weight_decay, t.betas)
        self.scheduler = warmup_cosine_scheduler(self.optimizer, warmup_steps=min(t.warmup_steps, t.steps),
                                                 total_steps=t.steps, min_ratio=t.min_lr_ratio)
        self.data_rng = torch.Generator().manual_seed(t.seed)
        self.out_dir = Path(t.out_dir)
        self.step = 0
        self.train_time = 0.0
        self.progress = progress if self.ranks.is_main else False
        self.last_eval: EvalResult | None = None
        self.summary: Summary | None = None  # set when fit ends
        self.bar_options: dict[str, Any] = {"desc": self.out_dir.name}  # of the tqdm progress bar
        self.session_units, self.session_time = 0, 0.0  # trained by this process (for the throughput)

    # -------------------------------------------------------------------------------- state

    def state_extra(self) -> dict[str, Any]:
        return {"step": self.step, "train_time": self.train_time, "config": run_config_to_dict(self.cfg),
                "data_rng": _encode_state(self.data_rng.get_state()), **self.task.state_extra(),
                "metrics": None if self.last_eval is None else self.last_eval.metrics}

    def save(self) -> Path:
        model_state, optimizer_state = self.ranks.full_state(self.model, self.optimizer)  # experts gathered
        path = checkpoint_dir(self.out_dir, self.step)
        if self.ranks.is_main:
            save_checkpoint(path, model_state=model_state, optimizer_state=optimizer_state,
                            scheduler_state=self.scheduler.state_dict(), extra=self.state_extra())
            prune_checkpoints(self.out_dir, self.cfg.train.keep_checkpoints)
        self.ranks.barrier()  # the other ranks wait until rank 0 has written it
        return path

    def load(self, ckpt: Checkpoint) -> None:
        """Continue from ``ckpt``; its model config must equal this run's."""
        changed = config_differences(ckpt.extra["config"]["model"], config_to_dict(self.cfg.model), "model")
        if changed:
            raise ValueError(f"checkpoint {ckpt.path} was trained with a different model config ({'; '.join(changed)}); "
                             "resume with the run's own config (its config.json)")
        self.ranks.load_full_state(self.model, self.optimizer, ckpt.model_state, ckpt.optimizer_state)
        self.scheduler.load_state_dict(ckpt.scheduler_state)
        self.data_rng.set_state(_decode_state(ckpt.extra["data_rng"]))
        restore_rng(ckpt.rng_state)
        self.ranks.seed_own_rng()
        self.step = ckpt.extra["step"]
        self.train_time = ckpt.extra["train_time"]

    # -------------------------------------------------------------------------------- steps

    def train_step(self) -> StepStats:
        """One optimizer step over ``grad_accum`` micro-batches."""
        t = self.cfg.train
        tic = time.perf_counter()
        loss, extra, units, aux, num_layers = self._accumulate_gradients()
        loss, extra = self.ranks.mean(loss, extra)  # over ranks: the global batch's
        aux = self.ranks.total_loads(aux)
        if not math.isfinite(loss):  # stop before the update: the last checkpoint stays the last good state
            raise FloatingPointError(f"training loss is {loss} at step {self.step + 1}; lower train.lr?")
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        grad_norm = self.ranks.reduce_and_clip_grads(self.model, params, t.grad_clip if t.grad_clip > 0 else math.inf)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        balance_step(self.model, aux, t.balance_bias_rate)
        self.step += 1
        seconds = time.perf_counter() - tic
        self.train_time += seconds
        return StepStats(loss, extra, grad_norm, lr, units, seconds, aux, num_layers)

    def _accumulate_gradients(self) -> tuple[float, float, int, list[MoEAux], int]:
        """Forward and backward every micro-batch; returns mean loss, mean aux loss, units, all aux, MoE layers."""
        n = self.cfg.train.grad_accum
        self.model.train()
        loss_sum = aux_sum = torch.zeros((), device=self.device)
        units, aux = 0, []
        for i in range(n):
            batch = self.task.train_batch(self.data_rng)  # the global batch: the same on every rank
            units += self.task.units(batch)
            x, y = self.ranks.my_rows(batch)  # this rank's share
            x, y = to_device(x, self.device), y.to(self.device)
            # several ranks: through DDP, whose gradients are reduced in the last micro-batch's backward only
            with self.autocast(), self.ranks.micro_batch(self.model, sync=i == n - 1) as model:
                out = self.task.forward(model, x)
                loss = self.task.loss(out, (x, y))
                extra = aux_loss(out.aux)
            ((loss if extra is None else loss + extra) / n).backward()
            loss_sum = loss_sum + loss.detach()
            aux_sum = aux_sum if extra is None else aux_sum + extra.detach()
            aux += out.aux
        return (loss_sum / n).item(), (aux_sum / n).item(), units, aux, len(out.aux)

    def evaluate(self) -> EvalResult:
        with self.autocast():
            self.last_eval = self.task.evaluate(self.model, self.device)
        return self.last_eval

    def autocast(self) -> torch.autocast:
        return precision_autocast(self.device, self.cfg.train.precision)

    # -------------------------------------------------------------------------------- run

    def fit(self) -> Summary:
        """Train up to ``train.steps``, evaluating, logging and saving on the config's schedule."""
        for _ in self.fit_steps():
            pass
        return self.summary

    def fit_steps(self) -> Iterator[int]:
        """``fit``, one optimizer step at a time: yields the step reached after each (with its logging,
        evaluation and checkpoint done) and sets ``self.summary`` when the run ends. ``train_lockstep``
        interleaves several runs' steps this way."""
        t = self.cfg.train
        start = time.perf_counter()
        metrics_path = self.out_dir / "metrics.jsonl"
        if self.ranks.is_main:  # rank 0 alone writes the run directory
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.json").write_text(json.dumps(run_config_to_dict(self.cfg), indent=1))
            _truncate_log(metrics_path, self.step)
        disable = None if self.progress is None else not self.progress  # None: only on a terminal
        with self.ranks.metrics_log(metrics_path) as log, \
                tqdm(total=t.steps, initial=self.step, disable=disable, **self.bar_options) as bar:
            if self.step == 0:
                self._eval_and_log(log, start)
            window_units, window_time = 0, 0.0
            while self.step < t.steps:
                stats = self.train_step()
                window_units, window_time = window_units + stats.units, window_time + stats.seconds
                self.session_units += stats.units
                self.session_time += stats.seconds
                bar.update(1)
                if self.step % t.log_every == 0 or self.step == t.steps:
                    self._log_step(log, bar, stats, window_units / max(window_time, 1e-9))
                    window_units, window_time = 0, 0.0
                if (t.eval_every and self.step % t.eval_every == 0) or self.step == t.steps:
                    self._eval_and_log(log, start)
                if (t.save_every and self.step % t.save_every == 0) or self.step == t.steps:
                    self.save()
                yield self.step
        if self.last_eval is None:  # resumed a finished run
            self.evaluate()
        self.summary = self._summary(time.perf_counter() - start)
        if self.ranks.is_main:
            (self.out_dir / "summary.json").write_text(json.dumps(self.summary.to_dict(), indent=1))

    def _log_step(self, log: JsonlLogger, bar: tqdm, stats: StepStats, rate: float) -> None:
        layers = range(stats.num_layers)
        maxvio = [max_violation(stats.layer_load(i)) for i in layers]
        record = {"step": self.step, "loss": stats.loss, "lr": stats.lr, "grad_norm": stats.grad_norm,
                  f"{self.task.unit}_per_s": rate, "train_time": self.train_time}
        if maxvio:  # per MoE layer; entropy of the last micro-batch (mean over ranks)
            entropy = [router_entropy(a.routing.probs_TE.detach(), a.mask_T) for a in stats.aux[-len(layers):]]
            record.update(aux_loss=stats.aux_loss, maxvio=maxvio,
                          group_maxvio=[max_violation(stats.layer_load(i, "tokens_per_group_G")) for i in layers],
                          entropy=list(self.ranks.mean(*entropy)),
                          dropped=[int(stats.layer_load(i, "num_dropped")) for i in layers])
        log.log(record)
        postfix = {"loss": f"{stats.loss:.3f}", f"{self.task.unit[:3]}/s": f"{rate:,.0f}"}
        if maxvio:
            postfix["maxvio"] = f"{max(maxvio):.2f}"
        bar.set_postfix(postfix, refresh=False)

    def _eval_and_log(self, log: JsonlLogger, start: float) -> None:
        result = self.evaluate()
        record = {"step": self.step, **result.metrics, "train_time": self.train_time,
                  "elapsed": time.perf_counter() - start}
        if result.expert_counts:
            record["val_maxvio"] = [max_violation(c) for c in result.expert_counts]
            record["val_entropy"] = result.router_entropy
        log.log(record)

    def _summary(self, wall: float) -> Summary:
        total, active = self.params
        sample = None
        if self.task.can_sample:
            with self.autocast():
                sample = self.task.sample(self.model, SAMPLE_PROMPT, SAMPLE_TOKENS, seed=self.cfg.train.seed)
        result = self.last_eval
        return Summary(
            out_dir=str(self.out_dir), steps=self.step, metrics=result.metrics,
            baseline_loss=self.task.baseline_loss, params_total=total, params_active=active,
            flops_per_token=self.flops,
            experts=expert_report(result.expert_counts, result.router_entropy), unit=self.task.unit,
            throughput=self.session_units / max(self.session_time, 1e-9), train_time_s=self.train_time,
            wall_time_s=wall, sample=sample,
        )


def train(cfg: RunConfig, *, resume: bool = False, progress: bool | None = None,
          expert_parallel: int | None = None, data_parallel: int | None = None) -> Summary:
    """Train ``cfg``; with ``resume``, continue from the newest checkpoint in ``train.out_dir`` if there is one.

    ``expert_parallel=W``: shard the experts over the W launched processes (torchrun, or a process
    group the caller started); W must equal the world size. ``expert_parallel=E, data_parallel=D``:
    W = E x D ranks, D replicas of the experts sharded over E ranks each (docs/distributed.md). Rank 0
    reads the checkpoint and sends it to the others, so only rank 0 needs the run directory. Returns
    the summary on every rank.
    """
    out_dir = Path(cfg.train.out_dir)
    new_dir = not out_dir.exists()
    with launch(expert_parallel, cfg, resolve_device(cfg.train.device), data_parallel) as ranks:
        ckpt = ranks.from_main(lambda: _checkpoint_to_resume(out_dir, resume))
        trainer = None
        try:
            trainer = Trainer(cfg, saved=None if ckpt is None else ckpt.extra, progress=progress, ranks=ranks)
            if ckpt is not None:
                trainer.load(ckpt)
            return trainer.fit()
        except Exception:
            started = trainer is not None and (trainer.step > 0 or ckpt is not None)
            if new_dir and not started and ranks.is_main:  # a start that failed leaves no half-made run
                shutil.rmtree(out_dir, ignore_errors=True)
            raise


def train_lockstep(cfgs: list[RunConfig], *, turn_steps: int = 1, progress: bool | None = None) -> list[Summary]:
    """Train several new single-process runs in one process, ``turn_steps`` optimizer steps of each in turn.

    Each run is what ``train(cfg)`` alone would make, to the bit: the runs take turns with the global RNGs
    (python, numpy, torch), each its own, and every step is timed on its own. What it changes is when the
    steps run: a machine that speeds up or slows down over the minutes a comparison takes (a shared VM, a
    CPU's clock under heat) then touches every run alike, so their training seconds compare fairly, where
    runs one after the other see different spells. A run that ends sooner stops taking turns.

    Turns of a single step start every step with caches the other models filled; turns of tens of steps (a
    few seconds each, far shorter than the drift) keep them warm within a turn. On the lm presets (a 2-core
    VM, 300 steps, docs/results.md) the two gave the same step times to within the machine's drift.
    """
    if isinstance(turn_steps, bool) or not isinstance(turn_steps, int) or turn_steps < 1:
        raise ValueError(f"turn_steps must be an integer >= 1, got {turn_steps!r}")
    for cfg in cfgs:
        _checkpoint_to_resume(Path(cfg.train.out_dir), resume=False)  # refuse a directory holding a run
    dirs = [Path(c.train.out_dir) for c in cfgs]
    if len(set(dirs)) != len(dirs):
        raise ValueError(f"lockstep runs need one output directory each, got {[str(d) for d in dirs]}")
    threads = {c.train.threads for c in cfgs}
    if len(threads) > 1:  # torch's thread count is one per process: the last run built would set it for all
        raise ValueError(f"lockstep runs share one process and so one thread count; got train.threads "
                         f"{sorted(threads, key=str)}")
    new_dirs = [d for d in dirs if not d.exists()]
    trainers, rngs = [], []
    try:
        for i, cfg in enumerate(cfgs):  # each seeds the global RNGs and builds its model, as train() would
            trainers.append(Trainer(cfg, progress=progress))
            trainers[-1].bar_options = {"position": i, "desc": f"{dirs[i].parent.name}/{dirs[i].name}"}
            rngs.append(capture_rng())
        active = [(i, t.fit_steps()) for i, t in enumerate(trainers)]
        while active:
            still = []
            for i, steps in active:
                restore_rng(rngs[i])
                if all(next(steps, None) is not None for _ in range(turn_steps)):
                    still.append((i, steps))
                rngs[i] = capture_rng()
            active = still
    except Exception:
        if not any(t.step for t in trainers):  # nothing trained: leave no half-made runs
            for d in new_dirs:
                shutil.rmtree(d, ignore_errors=True)
        raise
    return [t.summary for t in trainers]


def _checkpoint_to_resume(out_dir: Path, resume: bool) -> Checkpoint | None:
    """The newest intact checkpoint of ``out_dir`` for ``--resume`` (None: start afresh), saying what it skips."""
    newest = latest_checkpoint(out_dir)
    if newest is None:
        if resume:
            log.warning(f"--resume: {out_dir} holds no checkpoint; starting a new run there")
        return None
    if not resume:
        raise ValueError(f"{out_dir} already holds checkpoints (latest {newest.name}); continue that "
                         "run with --resume (resume=True) or choose another output directory")
    ckpt, skipped = load_newest_intact(out_dir)
    for path, why in skipped:
        log.warning(f"--resume: skipping {path.name}: {why}")
    if ckpt is None:
        raise ValueError(f"--resume: no checkpoint in {out_dir} is intact ({len(skipped)} skipped, see above)")
    if skipped:
        log.warning(f"--resume: continuing from {ckpt.path.name}, the newest intact checkpoint")
    return ckpt


def load_run(path: str | os.PathLike, overrides: Callable[[RunConfig], RunConfig] | None = None,
             device: str = "cpu"):
    """Rebuild ``(task, model, checkpoint)`` from a checkpoint directory or a run directory (its newest one).

    ``overrides`` may change the saved config (e.g. the data path) before the task is built.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint or run directory at {path}")
    if latest_checkpoint(path) is not None:
        path = latest_checkpoint(path)
    ckpt = load_weights(path, map_location="cpu")
    if "config" not in ckpt.extra:
        raise ValueError(f"checkpoint {path} holds no run config (not written by the dualroute trainer)")
    cfg = run_config_from_dict(ckpt.extra["config"])
    if overrides is not None:
        cfg = overrides(cfg)
    task = make_task(cfg, ckpt.extra)
    model = task.build_model()
    model.load_state_dict(ckpt.model_state)
    return task, model.to(resolve_device(device)).eval(), ckpt


# ----------------------------------------------------------------------------------------- printing


def format_summary(s: Summary) -> str:
    lines = [f"run {s.out_dir}: {s.steps} steps in {s.train_time_s:.1f} s training ({s.wall_time_s:.1f} s wall), "
             f"{s.throughput:,.0f} {s.unit}/s"]
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in s.metrics.items())
    lines.append(f"  validation: {metrics} (baseline loss {s.baseline_loss:.4f})")
    lines.append(f"  parameters: {s.params_total:,} total, {s.params_active:,} active; "
                 f"{s.flops_per_token / 1e6:.2f} MFLOPs per token (forward)")
    for layer in s.experts:
        share = " ".join(f"{100 * x:.0f}" for x in layer["share"])
        lines.append(f"  moe layer {layer['layer']}: expert share % [{share}]  maxvio {layer['maxvio']:.2f}  "
                     f"entropy {layer['entropy']:.2f}")
    if s.sample is not None:
        lines.append("  sample: " + s.sample.replace("\n", "\n          "))
    return "\n".join(lines)
