"""Keep freed CPU memory in the process's heap, so that tensors allocated afresh every step reuse pages that
are already mapped.

glibc's ``malloc`` (the allocator PyTorch's CPU tensors come from on Linux) serves a block above its mmap
threshold (128 KiB, raised as the program runs to at most 32 MiB) with a fresh ``mmap`` and unmaps it on
``free``. Every such tensor is then page-faulted and zeroed by the kernel each time it is allocated again. A
training step allocates its large activations and all its weight gradients afresh, so the cost grows with the
parameters, not with the active compute: ``dualroute bench layer`` counts 65K-109K minor page faults (256-427
MiB of 4 KiB pages) per training step of an E=64 MoE layer at T=4096, D=512, F=1024 without the thresholds
below, none with them, and the layer's step falls from 1.31-1.41x to 1.13-1.18x the dense FFN's
(docs/benchmarks.md).

``keep_freed_memory()`` raises the mmap threshold to 1 GiB and the trim threshold to 2 GiB with
``mallopt``: freed blocks stay in the heap for the next step, as jemalloc or tcmalloc would keep them. The cost
is that the process keeps its peak heap instead of returning it to the system between steps. The ``dualroute``
command calls it at start; ``DUALROUTE_KEEP_FREED_MEMORY=0`` leaves malloc as it is. Elsewhere than on Linux
with glibc it does nothing and returns False.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's <malloc.h>
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 30  # blocks up to 1 GiB come from the heap
TRIM_THRESHOLD = 2**31 - 1  # free memory at the top of the heap kept up to 2 GiB (mallopt takes a C int)
ENV = "DUALROUTE_KEEP_FREED_MEMORY"

_applied: dict[str, int] = {}


def _libc():
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return mallopt


def _check(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if not 0 < value <= 2**31 - 1:
        raise ValueError(f"{name} must be in [1, 2**31 - 1] bytes (mallopt takes a C int), got {value}")
    return value


def keep_freed_memory(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Have glibc's malloc serve blocks up to ``mmap_threshold`` bytes from its heap and keep up to
    ``trim_threshold`` bytes of freed memory there; True where applied (Linux with glibc), else False.

    Applies to the whole process, from the next allocation on; calling it again with the same values is
    harmless."""
    mmap_threshold = _check("mmap_threshold", mmap_threshold)
    trim_threshold = _check("trim_threshold", trim_threshold)
    mallopt = _libc()
    if mallopt is None:
        return False
    # The trim threshold first: once blocks come from the heap, freeing one must not hand it back at once.
    if not (mallopt(M_TRIM_THRESHOLD, trim_threshold) and mallopt(M_MMAP_THRESHOLD, mmap_threshold)):
        return False
    _applied.update(mmap_threshold=mmap_threshold, trim_threshold=trim_threshold)
    return True


def keep_freed_memory_from_env(environ: dict[str, str] | None = None) -> bool:
    """``keep_freed_memory()`` unless ``DUALROUTE_KEEP_FREED_MEMORY`` is ``0`` (the ``dualroute`` command's
    default); any other value than ``0`` or ``1`` is a ValueError naming it."""
    value = (os.environ if environ is None else environ).get(ENV, "1").strip()
    if value not in ("0", "1"):
        raise ValueError(f"{ENV} must be 0 or 1, got {value!r}")
    return keep_freed_memory() if value == "1" else False


def freed_memory_kept() -> dict[str, int]:
    """The thresholds ``keep_freed_memory`` set in this process (empty if it did not), for benchmark headers."""
    return dict(_applied)
