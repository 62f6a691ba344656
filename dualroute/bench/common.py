"""What every ``dualroute bench`` command shares: the ``--device`` / ``--dtype`` / count arguments, the
header and JSON setup fields, and round-robin timing of contenders in one process.

Every comparison alternates its contenders round by round, so that a noisy neighbour slows all of
them, and reports medians (never absolute pass/fail). On CUDA the clock is read only after
``torch.cuda.synchronize()``, so a step's time is its kernels' time, not its launch time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..memory import freed_memory_kept

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
    """``{name: RunConfig}`` for the comma-separated language-model presets, each with the overrides applied
    as ``dualroute compare`` applies them (a dense twin takes ``model.moe.*`` on the MoE config it is the twin
    of); an image preset is a usage error."""
    from ..models import LMConfig
    from ..train.compare import preset_configs as configured

    names = [n for n in presets.split(",") if n]
    if not names:
        p.error("--presets names no preset")
    configs = configured(names, overrides)
    for name, cfg in configs.items():
        if not isinstance(cfg.model, LMConfig):
            p.error(f"--presets: {name!r} is an image classifier; this benchmark times language models")
    return configs


def synchronizer(device: torch.device) -> Callable[[], None] | None:
    """What waits for the device's queued work before the clock is read: None on the CPU (nothing is queued)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return None


def cache_flusher(device: torch.device, mib: int) -> Callable[[], None] | None:
    """What overwrites ``mib`` MiB of memory on ``device`` before a timed call, so that every contender starts
    with cold caches (None for 0). Without it a contender whose weights fit in the last-level cache is timed
    on whatever the one timed before it left there: in a round-robin, its place in the order, not its code.
    A model's layers evict one another's weights between two uses, so cold is also the realistic state. The
    same practice as ``triton.testing.do_bench``, which zeroes a 256 MB buffer before each run on a GPU."""
    if mib <= 0:
        return None
    buffer = torch.empty(mib * 2**20 // 4, dtype=torch.float32, device=device)
    return buffer.zero_


# Environment variables that change how the process allocates memory or runs threads, and with that the
# timings (glibc malloc's MALLOC_*_, PyTorch's huge-page switch, OpenMP / MKL threading, a preloaded allocator).
TUNING_ENV = ("MALLOC_", "THP_MEM_ALLOC_ENABLE", "OMP_", "KMP_", "MKL_", "LD_PRELOAD")


def tuning_env() -> dict[str, str]:
    """The ``TUNING_ENV`` variables set in this process."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith(TUNING_ENV)}


def device_setup(device: torch.device, threads: int) -> dict:
    """The device fields of a benchmark's JSON ``setup``; ``threads`` counts only on the CPU. ``malloc``: the
    thresholds ``dualroute.memory.keep_freed_memory`` set (empty when malloc was left as it is)."""
    if device.type == "cuda":
        return {"device": str(device), "device_name": torch.cuda.get_device_name(device), "threads": None,
                "cuda": torch.version.cuda, "float32_matmul_precision": torch.get_float32_matmul_precision(),
                "env": tuning_env(), "malloc": freed_memory_kept()}
    return {"device": "cpu", "device_name": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "threads": threads, "env": tuning_env(), "malloc": freed_memory_kept()}


def describe_device(device: torch.device, threads: int) -> str:
    """``cpu, 2 threads`` or ``cuda:0 (NVIDIA H200)``, for a header line, then whether malloc keeps freed
    memory and any ``TUNING_ENV`` setting."""
    where = f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else f"cpu, {threads} threads"
    notes = ["malloc keeps freed memory"] if freed_memory_kept() else []
    notes += [f"{k}={v}" for k, v in tuning_env().items()]
    return ", ".join([where, *notes])


def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` to ``dtype`` on ``device``; no context at all for None or float32."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)



@dataclass
class Contender:
    name: str
    step: Callable[[], None]


def output(result):
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
            y = output(module(x_TD))
        y.backward(grad_TD)

    return step


def page_faults(contenders: list[Contender], steps: int = 3, warmup: int = 2) -> dict[str, float]:
    """Minor page faults per call of each contender (``getrusage``), after ``warmup`` calls; empty where the
    platform has no ``resource`` module. Faults are counted, not timed, so a busy machine does not change them:
    each is a page the kernel maps and zeroes because the allocator handed out memory it had returned."""
    try:
        import resource
    except ImportError:
        return {}
    faults = {}
    for c in contenders:
        for _ in range(warmup):
            c.step()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(steps):
            c.step()
        faults[c.name] = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / steps
    return faults


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


def write_json(path: str, result: dict) -> None:
    """Write a benchmark's result as indented JSON and say so."""
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {path}")
