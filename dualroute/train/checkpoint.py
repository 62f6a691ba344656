"""Checkpoints that never destroy the last good one.

A checkpoint is a directory holding three files:

    model.safetensors   model weights (safetensors: no pickle, safe to load from anywhere)
    state.pt            optimizer / scheduler / RNG states (torch.save; pickle: load only files you wrote)
    meta.json           format version, tied-weight aliases and ``extra`` (step, config dict, metrics, ...)

Saving writes everything into a sibling ``.tmp-<name>-<pid>`` directory, fsyncs it, then swaps it in:
the old checkpoint (if any) is renamed to ``.bak-<name>``, the temp directory is renamed to ``<name>``,
and the backup is removed. Renames are atomic, so a crash leaves either the old or the new complete
checkpoint at ``<name>``, or (between the two renames) only ``.bak-<name>``, which ``load_checkpoint``
finds and loads with a warning. On an exception the temp directory is removed and the backup restored.

Run-directory layout: ``run_dir/ckpt-<step:08d>``, one directory per saved step (see ``checkpoint_dir``,
``latest_checkpoint`` and ``prune_checkpoints``). Saving twice to the same step replaces it atomically.

Tied weights: safetensors refuses tensors that share memory, so entries of ``model_state`` that are
the very same view of the same storage (e.g. a tied embedding and output head) are saved once, and the
other names are recorded in meta.json and restored on load as the same tensor. All other tensors are
saved as contiguous CPU clones (this costs one extra copy of the weights in host memory while saving).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from safetensors import SafetensorError

FORMAT = "dualroute-checkpoint"
VERSION = 1
MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"
META_FILE = "meta.json"
_STEP_DIR = re.compile(r"^ckpt-(\d+)$")


@dataclasses.dataclass
class Checkpoint:
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any] | None
    scheduler_state: dict[str, Any] | None
    extra: dict[str, Any]
    rng_state: dict[str, Any] | None
    path: Path


# ------------------------------------------------------------------------------------------------- RNG


def capture_rng() -> dict[str, Any]:
    """States of python ``random``, numpy's global RNG, torch CPU and (if available) all CUDA RNGs."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def restore_rng(rng_state: dict[str, Any]) -> None:
    """Restore the states captured by ``capture_rng`` (CUDA only for the devices present now)."""
    missing = {"python", "numpy", "torch"} - set(rng_state)
    if missing:
        raise ValueError(f"rng_state lacks {sorted(missing)}; keys present: {sorted(rng_state)}")
    random.setstate(rng_state["python"])
    np.random.set_state(rng_state["numpy"])
    torch.set_rng_state(rng_state["torch"].cpu())
    cuda = rng_state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        for index, state in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state.cpu(), index)


# ------------------------------------------------------------------------------------------------ save


def _dedup_tensors(model_state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Contiguous CPU clones of the tensors, each identical view saved once; returns (tensors, aliases)."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, t in model_state.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"model_state[{name!r}] is a {type(t).__name__}, not a tensor")
        view = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), t.shape, t.stride(), t.dtype)
        if t.numel() > 0 and view in seen:
            aliases[name] = seen[view]
            continue
        seen[view] = name
        tensors[name] = t.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)
    return tensors, aliases


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    if os.name != "posix":  # directories cannot be opened for fsync elsewhere
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(tmp: Path, model_state: dict, state: dict, meta: dict) -> None:
    tmp.mkdir()
    tensors, meta["tied"] = _dedup_tensors(model_state)
    safetensors.torch.save_file(tensors, str(tmp / MODEL_FILE), metadata={"format": FORMAT})
    torch.save(state, tmp / STATE_FILE)
    (tmp / META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True))
    for name in (MODEL_FILE, STATE_FILE, META_FILE):
        _fsync_file(tmp / name)
    _fsync_dir(tmp)


def _backup_path(target: Path) -> Path:
    return target.parent / f".bak-{target.name}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but not ours, or the platform cannot tell: leave it alone
        return True
    return True


def _remove_stale_temps(target: Path) -> None:
    """Remove temp dirs of earlier saves to ``target`` whose process is gone (killed mid-save)."""
    for tmp in target.parent.glob(f".tmp-{target.name}-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and (int(pid) == os.getpid() or not _pid_alive(int(pid))):
            shutil.rmtree(tmp, ignore_errors=True)


def _swap_in(tmp: Path, target: Path) -> None:
    backup = _backup_path(target)
    if target.exists():
        if backup.exists():  # stale: a complete checkpoint is at target
            shutil.rmtree(backup)
        os.replace(target, backup)
    os.replace(tmp, target)
    _fsync_dir(target.parent)
    shutil.rmtree(backup, ignore_errors=True)


def save_checkpoint(
    directory: str | os.PathLike,
    *,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any] | None = None,
    scheduler_state: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    rng: bool = True,
) -> Path:
    """Atomically write a checkpoint directory at ``directory`` (replacing any previous one); return it.

    ``extra`` must be JSON-serialisable (step, config dict, metrics, ...). With ``rng=True`` the
    python / numpy / torch (CPU and CUDA) RNG states are saved for ``restore_rng``.
    """
    target = Path(directory)
    extra = {} if extra is None else extra
    try:
        json.dumps(extra)
    except (TypeError, ValueError) as e:
        raise TypeError(f"checkpoint extra must be JSON-serialisable: {e}") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(target)
    tmp = target.parent / f".tmp-{target.name}-{os.getpid()}"
    state = {"optimizer": optimizer_state, "scheduler": scheduler_state, "rng": capture_rng() if rng else None}
    meta = {"format": FORMAT, "version": VERSION, "extra": extra}
    backup = _backup_path(target)
    try:
        _write_all(tmp, model_state, state, meta)
        _swap_in(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if backup.exists() and not target.exists():
            os.replace(backup, target)
        raise
    return target


# ------------------------------------------------------------------------------------------------ load


def _resolve(directory: Path) -> Path:
    if directory.is_dir():
        return directory
    if directory.exists():
        raise NotADirectoryError(f"checkpoint {directory} is not a directory")
    backup = _backup_path(directory)
    if backup.is_dir():
        warnings.warn(
            f"checkpoint {directory} is missing; loading {backup}, the previous checkpoint left by an "
            "interrupted save",
            stacklevel=3,
        )
        return backup
    raise FileNotFoundError(f"no checkpoint directory at {directory}")


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"corrupt checkpoint metadata {path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not dualroute checkpoint metadata (expected format {FORMAT!r})")
    if meta.get("version") != VERSION:
        raise ValueError(f"{path}: unsupported checkpoint version {meta.get('version')!r}, expected {VERSION}")
    return meta


def _read_model(path: Path, tied: dict[str, str], device: str) -> dict[str, torch.Tensor]:
    try:
        tensors = safetensors.torch.load_file(str(path), device=device)
    except SafetensorError as e:
        raise ValueError(f"corrupt checkpoint weights {path}: {e}") from None
    for alias, name in tied.items():
        if name not in tensors:
            raise ValueError(f"{path}: tied weight {alias!r} refers to missing tensor {name!r}")
        tensors[alias] = tensors[name]
    return tensors


def _read_state(path: Path, map_location: str | torch.device) -> dict[str, Any]:
    # weights_only=False unpickles arbitrary objects: state.pt must be a file this library wrote.
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # unpickling can fail in many ways
        raise ValueError(f"corrupt checkpoint state {path}: {type(e).__name__}: {e}") from e
    if not isinstance(state, dict) or not {"optimizer", "scheduler", "rng"} <= set(state):
        raise ValueError(f"{path} does not hold optimizer/scheduler/rng state")
    return state


def load_checkpoint(directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Load a checkpoint written by ``save_checkpoint``; tensors go to ``map_location``.

    Trusted files only: ``state.pt`` is unpickled (``weights_only=False``).
    """
    path = _resolve(Path(directory))
    for name in (MODEL_FILE, STATE_FILE, META_FILE):
        if not (path / name).is_file():
            raise FileNotFoundError(f"checkpoint {path} is incomplete: {name} is missing")
    meta = _read_meta(path / META_FILE)
    model_state = _read_model(path / MODEL_FILE, meta.get("tied", {}), str(torch.device(map_location)))
    state = _read_state(path / STATE_FILE, map_location)
    return Checkpoint(
        model_state=model_state,
        optimizer_state=state["optimizer"],
        scheduler_state=state["scheduler"],
        extra=meta["extra"],
        rng_state=state["rng"],
        path=path,
    )


# ------------------------------------------------------------------------------------------ run dirs


def checkpoint_dir(run_dir: str | os.PathLike, step: int) -> Path:
    """``run_dir/ckpt-<step:08d>``: where the checkpoint of ``step`` lives."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return Path(run_dir) / f"ckpt-{step:08d}"


def _steps(run_dir: Path) -> dict[int, Path]:
    """Saved steps -> checkpoint path, including ones recoverable only from a ``.bak-`` directory."""
    steps = {}
    for child in run_dir.iterdir() if run_dir.is_dir() else ():
        name = child.name.removeprefix(".bak-")
        match = _STEP_DIR.match(name)
        if match and child.is_dir() and (child / META_FILE).is_file():
            steps[int(match.group(1))] = run_dir / name
    return steps


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint of the highest saved step in ``run_dir``, or None if there is none."""
    steps = _steps(Path(run_dir))
    return steps[max(steps)] if steps else None


def prune_checkpoints(run_dir: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest step checkpoints; return the deleted paths."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    steps = _steps(Path(run_dir))
    doomed = [steps[s] for s in sorted(steps)[:-keep]]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
        shutil.rmtree(_backup_path(path), ignore_errors=True)
    return doomed
