"""Starting ranks: a process group that always has a timeout, and local worker processes.

A collective whose peer has died fails (gloo: "connection closed"; any backend: the timeout)
instead of hanging, because every process group made here has a finite ``timeout``. Under
``torchrun`` call ``init_distributed()`` (it reads the env:// variables); for tests and the
benchmark, ``run_workers`` spawns W local processes with a file-store rendezvous.
"""

from __future__ import annotations

import os
import tempfile
import time
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

DEFAULT_TIMEOUT_S = 120.0


def init_distributed(backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                     init_method: str | None = None, rank: int | None = None,
                     world_size: int | None = None) -> tuple[int, int]:
    """``init_process_group`` with a finite timeout; returns ``(rank, world_size)``.

    Without arguments it reads torchrun's environment (``env://``); the backend defaults to nccl
    when CUDA is available, else gloo.
    """
    if not isinstance(timeout_s, (int, float)) or not 0 < timeout_s < float("inf"):
        raise ValueError(f"timeout_s must be finite and > 0, got {timeout_s!r}")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    given = {"rank": rank, "world_size": world_size}  # torch wants them absent (not None) under env://
    dist.init_process_group(backend, init_method=init_method, timeout=timedelta(seconds=timeout_s),
                            **{k: v for k, v in given.items() if v is not None})
    return dist.get_rank(), dist.get_world_size()


def run_workers(fn: Callable[..., None], world_size: int, *args, timeout_s: float = 30.0,
                join_timeout_s: float | None = None, threads: int = 1, start_method: str | None = None) -> None:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` gloo processes on this host.

    Collectives time out after ``timeout_s``; the whole run is stopped after ``join_timeout_s``
    (default ``3 * timeout_s + 60``) so a wedged rank cannot hang the caller. A worker's exception
    is re-raised here (``torch.multiprocessing.ProcessRaisedException``). ``start_method``
    defaults to ``fork`` where it is safe (POSIX, CUDA not initialised): a forked worker starts in
    milliseconds, a spawned one re-imports torch (seconds each); with ``spawn``, ``fn`` and
    ``args`` must be picklable (``fn`` at module level).
    """
    join_timeout_s = 3 * timeout_s + 60 if join_timeout_s is None else join_timeout_s
    start_method = start_method or _default_start_method()
    with tempfile.TemporaryDirectory(prefix="dualroute-ep-") as tmp:
        store = f"file://{os.path.join(tmp, 'store')}"
        context = mp.start_processes(_worker, args=(fn, world_size, store, timeout_s, threads, args),
                                     nprocs=world_size, join=False, start_method=start_method)
        deadline = time.monotonic() + join_timeout_s
        try:
            while not context.join(timeout=0.5):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{world_size} workers still running after {join_timeout_s:.0f} s")
        finally:
            for process in context.processes:  # only the processes started above
                if process.is_alive():
                    process.terminate()
                    process.join(5)


def _default_start_method() -> str:
    fork_ok = "fork" in mp.get_all_start_methods() and not torch.cuda.is_initialized()
    return "fork" if fork_ok else "spawn"


def _worker(rank: int, fn, world_size: int, store: str, timeout_s: float, threads: int, args: tuple) -> None:
    torch.set_num_threads(threads)
    init_distributed("gloo", timeout_s, init_method=store, rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()
