"""Checkpoints that never destroy the last good one, never run code and never load corrupt.

A checkpoint is a directory holding four files, none of them a pickle:

    model.safetensors   model weights
    state.safetensors   the tensors of the optimizer / scheduler / RNG states
    state.json          the rest of those states (numbers, strings, nesting), pointing into state.safetensors
    meta.json           format version, the SHA-256 and size of each other file, tied-weight aliases and
                        ``extra`` (step, config dict, metrics, ...)

Loading verifies each file it reads against its recorded SHA-256 and refuses a mismatch with an error
naming the file (``CorruptCheckpointError``). ``load_checkpoint(..., state=False)`` reads only the weights
(what eval, generate and inspect need), so a checkpoint whose state files are missing or damaged still
serves them. ``load_newest_intact`` walks a run directory from the newest step down and reports each
checkpoint it had to skip.

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
import hashlib
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
VERSION = 2  # 1 kept the training state in a pickle (state.pt): its weights still load, its state never
MODEL_FILE = "model.safetensors"
STATE_TENSORS_FILE = "state.safetensors"
STATE_JSON_FILE = "state.json"
META_FILE = "meta.json"
STATE_FILES = (STATE_TENSORS_FILE, STATE_JSON_FILE)
_STEP_DIR = re.compile(r"^ckpt-(\d+)$")


class CorruptCheckpointError(ValueError):
    """A checkpoint file that is unreadable or differs from what its manifest recorded when it was written."""


@dataclasses.dataclass
class Checkpoint:
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any] | None  # None also when loaded with state=False
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


# ------------------------------------------------------------------------------------ state as JSON
# The optimizer / scheduler / RNG states are nested dicts, lists and tuples of numbers, strings,
# tensors and numpy arrays. Tensors and arrays go to safetensors; the nesting and everything else to
# JSON, with a few tagged objects for what JSON lacks (tuples, non-string dict keys, arrays).

_TENSOR, _ARRAY, _TUPLE, _ITEMS = "__tensor__", "__ndarray__", "__tuple__", "__items__"
_TAGS = (_TENSOR, _ARRAY, _TUPLE, _ITEMS)


def _encode_state(obj: Any, tensors: dict[str, torch.Tensor], where: str = "state") -> Any:
    """``obj`` as JSON-ready data; its tensors and arrays are moved into ``tensors`` and referenced by key."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)
        return {_TENSOR: key}
    if isinstance(obj, np.ndarray):
        key = f"t{len(tensors)}"
        tensors[key] = torch.from_numpy(np.ascontiguousarray(obj).copy())
        return {_ARRAY: key}
    if isinstance(obj, np.generic):  # a numpy scalar: its Python value
        return obj.item()
    if isinstance(obj, tuple):
        return {_TUPLE: [_encode_state(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode_state(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and k not in _TAGS for k in obj):
            return {k: _encode_state(v, tensors, f"{where}[{k!r}]") for k, v in obj.items()}
        return {_ITEMS: [[_encode_state(k, tensors, where), _encode_state(v, tensors, f"{where}[{k!r}]")]
                         for k, v in obj.items()]}
    raise TypeError(f"{where} is a {type(obj).__name__}; a checkpoint stores only tensors, numpy arrays, "
                    "numbers, strings, None and lists / tuples / dicts of them")


def _decode_state(obj: Any, tensors: dict[str, torch.Tensor], device: str) -> Any:
    """The inverse of ``_encode_state``; tensors go to ``device``, arrays stay numpy."""
    if isinstance(obj, list):
        return [_decode_state(v, tensors, device) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if len(obj) == 1 and next(iter(obj)) in _TAGS:
        tag, value = next(iter(obj.items()))
        if tag in (_TENSOR, _ARRAY):
            if not isinstance(value, str) or value not in tensors:
                raise ValueError(f"state refers to tensor {value!r}, which {STATE_TENSORS_FILE} lacks")
            return tensors[value].to(device) if tag == _TENSOR else tensors[value].numpy()
        if tag == _TUPLE:
            return tuple(_decode_state(v, tensors, device) for v in value)
        return {_decode_state(k, tensors, device): _decode_state(v, tensors, device) for k, v in value}
    return {k: _decode_state(v, tensors, device) for k, v in obj.items()}


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


def _fsync_dir(path: Path) -> None:
    if os.name != "posix":  # directories cannot be opened for fsync elsewhere
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> dict[str, Any]:
    """Write ``data`` durably; return its manifest entry (SHA-256 and size)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def _write_all(tmp: Path, model_state: dict, state: dict, meta: dict) -> None:
    tmp.mkdir()
    tensors, meta["tied"] = _dedup_tensors(model_state)
    state_tensors: dict[str, torch.Tensor] = {}
    state_json = json.dumps(_encode_state(state, state_tensors), sort_keys=True)
    meta["files"] = {
        MODEL_FILE: _write_file(tmp / MODEL_FILE, safetensors.torch.save(tensors, metadata={"format": FORMAT})),
        STATE_TENSORS_FILE: _write_file(tmp / STATE_TENSORS_FILE, safetensors.torch.save(state_tensors)),
        STATE_JSON_FILE: _write_file(tmp / STATE_JSON_FILE, state_json.encode("utf-8")),
    }
    meta[_META_DIGEST] = _meta_digest(meta)
    _write_file(tmp / META_FILE, json.dumps(meta, indent=1, sort_keys=True).encode("utf-8"))
    _fsync_dir(tmp)


_META_DIGEST = "meta_sha256"  # meta.json checks itself: the SHA-256 of its other fields, canonically dumped


def _meta_digest(meta: dict[str, Any]) -> str:
    rest = {k: v for k, v in meta.items() if k != _META_DIGEST}
    return hashlib.sha256(json.dumps(rest, sort_keys=True).encode("utf-8")).hexdigest()


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
        meta = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptCheckpointError(f"corrupt checkpoint metadata {path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CorruptCheckpointError(f"{path} is not dualroute checkpoint metadata (expected format {FORMAT!r})")
    if meta.get("version") not in (1, VERSION):
        raise ValueError(f"{path}: unsupported checkpoint version {meta.get('version')!r}, expected {VERSION}")
    if not isinstance(meta.get("extra"), dict):
        raise CorruptCheckpointError(f"{path} lacks the checkpoint's extra record")
    if meta["version"] == VERSION:
        if not isinstance(meta.get("files"), dict):
            raise CorruptCheckpointError(f"{path} lacks the manifest of the checkpoint's files")
        if meta.get(_META_DIGEST) != _meta_digest(meta):
            raise CorruptCheckpointError(f"{path} is corrupt: its content does not match its own SHA-256")
    return meta


def _read_verified(path: Path, meta: dict[str, Any]) -> bytes:
    """The bytes of checkpoint file ``path``, checked against the SHA-256 that meta.json recorded for it."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path.parent} is incomplete: {path.name} is missing")
    data = path.read_bytes()
    if meta["version"] == 1:  # written before the manifest existed: nothing to check against
        return data
    entry = meta["files"].get(path.name)
    if not isinstance(entry, dict) or "sha256" not in entry:
        raise CorruptCheckpointError(f"{path.name} of checkpoint {path.parent} is not in its manifest")
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry["sha256"]:
        raise CorruptCheckpointError(
            f"{path} is corrupt: {len(data)} bytes with SHA-256 {digest[:12]}..., but {entry.get('bytes')} bytes "
            f"with SHA-256 {entry['sha256'][:12]}... were written")
    return data


def _read_model(path: Path, meta: dict[str, Any], device: str) -> dict[str, torch.Tensor]:
    data = _read_verified(path, meta)
    try:
        tensors = safetensors.torch.load(data)
    except (SafetensorError, ValueError) as e:
        raise CorruptCheckpointError(f"corrupt checkpoint weights {path}: {e}") from None
    tensors = {name: t.to(device) for name, t in tensors.items()}
    for alias, name in meta.get("tied", {}).items():
        if name not in tensors:
            raise CorruptCheckpointError(f"{path}: tied weight {alias!r} refers to missing tensor {name!r}")
        tensors[alias] = tensors[name]
    return tensors


def _read_state(path: Path, meta: dict[str, Any], device: str) -> dict[str, Any]:
    if meta["version"] == 1:
        raise ValueError(f"checkpoint {path} was written by an older dualroute whose training state is a pickle "
                         "(state.pt), which is never loaded: it could run code. Its weights still load (eval, "
                         "generate, inspect); training cannot resume from it")
    data = _read_verified(path / STATE_TENSORS_FILE, meta)
    text = _read_verified(path / STATE_JSON_FILE, meta)
    try:
        tensors = safetensors.torch.load(data)
        state = _decode_state(json.loads(text), tensors, device)
    except (SafetensorError, ValueError, UnicodeDecodeError) as e:
        raise CorruptCheckpointError(f"corrupt checkpoint state in {path}: {e}") from None
    if not isinstance(state, dict) or not {"optimizer", "scheduler", "rng"} <= set(state):
        raise CorruptCheckpointError(f"{path / STATE_JSON_FILE} does not hold optimizer/scheduler/rng state")
    return state


def load_checkpoint(directory: str | os.PathLike, map_location: str | torch.device = "cpu", *,
                    state: bool = True) -> Checkpoint:
    """Load a checkpoint written by ``save_checkpoint``; tensors go to ``map_location``.

    Every file read is checked against the SHA-256 recorded when it was written: a mismatch raises
    ``CorruptCheckpointError`` naming the file, a missing file ``FileNotFoundError``. With ``state=False``
    only the weights and metadata are read (the optimizer, scheduler and RNG states come back as None),
    and the state files need not be there. Nothing is unpickled.
    """
    path = _resolve(Path(directory))
    if not (path / META_FILE).is_file():
        raise FileNotFoundError(f"checkpoint {path} is incomplete: {META_FILE} is missing")
    meta = _read_meta(path / META_FILE)
    device = str(torch.device(map_location))
    model_state = _read_model(path / MODEL_FILE, meta, device)
    training = _read_state(path, meta, device) if state else {"optimizer": None, "scheduler": None, "rng": None}
    return Checkpoint(
        model_state=model_state,
        optimizer_state=training["optimizer"],
        scheduler_state=training["scheduler"],
        extra=meta["extra"],
        rng_state=training["rng"],
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


def load_newest_intact(run_dir: str | os.PathLike, map_location: str | torch.device = "cpu", *,
                       state: bool = True) -> tuple[Checkpoint | None, list[tuple[Path, str]]]:
    """The newest checkpoint of ``run_dir`` that loads and verifies, and the newer ones skipped, with why.

    ``(None, skipped)`` when none is intact (``skipped`` is empty when the directory holds none at all).
    ``state`` as for ``load_checkpoint``: with False, a checkpoint that lacks only its training state
    is intact enough.
    """
    skipped: list[tuple[Path, str]] = []
    for _, path in sorted(_steps(Path(run_dir)).items(), reverse=True):
        try:
            return load_checkpoint(path, map_location, state=state), skipped
        except (ValueError, OSError) as e:
            skipped.append((path, str(e)))
    return None, skipped


def load_weights(directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> Checkpoint:
    """``load_checkpoint(directory, state=False)``, for commands that only need the weights (eval,
    generate, inspect). If it is damaged, the error names the newest intact checkpoint beside it."""
    try:
        return load_checkpoint(directory, map_location, state=False)
    except (ValueError, OSError) as e:
        intact = None
        if Path(directory).exists():
            intact, _ = load_newest_intact(Path(directory).parent, map_location, state=False)
        if intact is None or intact.path == Path(directory):
            raise
        raise type(e)(f"{e}; the newest intact checkpoint of the run is {intact.path}: pass that path") from None


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
