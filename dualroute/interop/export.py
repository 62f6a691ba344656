"""Language models trained by ``dualroute train`` as folders that transformers loads.

``export_run(run, out)`` reads a run directory (its newest checkpoint) or one checkpoint and writes:

* a **native** checkpoint (Mixtral or Qwen2-MoE) when the model is exactly one (``native.py`` says
  when: no preset is), which stock transformers loads with no custom code;
* otherwise the Hub's **custom-code** format: config.json (``model_type`` "dualroute", ``auto_map``),
  ``configuration_dualroute.py`` and ``modeling_dualroute.py`` (copied from ``hf_remote/``; they import
  dualroute), model.safetensors in dualroute's own layout, and a README.md saying how to load it.

Both get the run's tokenizer as tokenizer.json (``hf_tokenizer``) and as dualroute's own
``dualroute_tokenizer.json``. ``import_custom_export`` turns a custom-code folder back into a training
checkpoint with the same tensors, config and tokenizer.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..models.lm import LMConfig, TransformerLM
from ..train.checkpoint import META_FILE, latest_checkpoint, load_weights, save_checkpoint
from ..train.configio import config_to_dict
from ..train.presets import run_config_from_dict, run_config_to_dict
from .hf import _write_tensors, build_model, save_hf
from .hf_config import CONFIG_FILE, arch_from_hf
from .hf_tokenizer import TOKENIZER_CONFIG_FILE, TOKENIZER_FILE, write_hf_tokenizer
from .native import FAMILIES, TITLES, hf_config, lm_to_arch_state, mismatches
from .weights import SafetensorsFolder

CUSTOM_MODEL_TYPE = "dualroute"
REMOTE_FILES = ("configuration_dualroute.py", "modeling_dualroute.py")
DUALROUTE_TOKENIZER_FILE = "dualroute_tokenizer.json"  # dualroute.data.load_tokenizer reads it
README_FILE = "README.md"
_WRITTEN = (*REMOTE_FILES, DUALROUTE_TOKENIZER_FILE, TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, README_FILE)
_DEFAULT_SHARD = 5 * 2**30


@dataclass(frozen=True)
class TrainedRun:
    """One checkpoint of a ``dualroute train`` language model."""

    path: Path  # the checkpoint directory
    config: Any  # RunConfig
    state: dict[str, torch.Tensor]  # TransformerLM state dict
    tokenizer: dict[str, Any] | None  # the dualroute tokenizer record, None for token-file runs
    step: int | None

    @property
    def model(self) -> LMConfig:
        return self.config.model


@dataclass(frozen=True)
class Export:
    folder: Path
    family: str  # "mixtral", "qwen2_moe", or "dualroute" (custom code)
    why_not_native: dict[str, list[str]]  # per native family, what the model lacks; {} for a native export
    files: tuple[str, ...]

    def describe(self) -> str:
        """The one line ``dualroute convert`` prints."""
        if not self.why_not_native:
            return f"wrote {self.folder}: native transformers {self.family} checkpoint (no custom code needed)"
        return (f"wrote {self.folder}: custom-code checkpoint (model_type {CUSTOM_MODEL_TYPE!r}, needs "
                f"trust_remote_code=True and dualroute installed); no native family fits: {self.reasons()}")

    def reasons(self) -> str:
        """Why no family fits: the reasons they share, then each family's own."""
        lists = list(self.why_not_native.values())
        if not lists:
            return ""
        common = [w for w in lists[0] if all(w in other for other in lists)]
        parts = ["; ".join(common)] if common else []
        for family, why in self.why_not_native.items():
            own = [w for w in why if w not in common]
            if own:
                parts.append(f"not {TITLES[family]}: " + ", ".join(own))
        return "; ".join(parts)


# ------------------------------------------------------------------------------------------- reading


def is_training_run(path: str | os.PathLike) -> bool:
    """A run directory of ``dualroute train`` (with or without checkpoints) or one of its checkpoints."""
    path = Path(path)
    if not path.is_dir():
        return False
    if latest_checkpoint(path) is not None:
        return True
    if (path / META_FILE).is_file():
        return "config" in (_read_json(path / META_FILE).get("extra") or {})
    if not (path / CONFIG_FILE).is_file():
        return False
    config = _read_json(path / CONFIG_FILE)  # a run's config.json, or a Hugging Face one (with model_type)
    return {"model", "data"} <= set(config) and "model_type" not in config


def read_run(path: str | os.PathLike) -> TrainedRun:
    """The newest checkpoint of a run directory, or the checkpoint ``path``; only language models."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no run directory or checkpoint at {path}")
    ckpt_dir = latest_checkpoint(path) or path
    if not (ckpt_dir / META_FILE).is_file():
        raise FileNotFoundError(f"{path} holds no checkpoint (no ckpt-<step>/ directory and no {META_FILE}): "
                                "has the run saved one yet?")
    ckpt = load_weights(ckpt_dir)
    if "config" not in ckpt.extra:
        raise ValueError(f"checkpoint {ckpt_dir} holds no run config (not written by dualroute train)")
    cfg = run_config_from_dict(ckpt.extra["config"])
    if not isinstance(cfg.model, LMConfig):
        raise ValueError(f"{ckpt_dir}: model is an {type(cfg.model).__name__} (data.kind={cfg.data.kind!r}); only "
                         "language models (LMConfig) export to transformers")
    return TrainedRun(ckpt_dir, cfg, ckpt.model_state, ckpt.extra.get("tokenizer"), ckpt.extra.get("step"))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


# ------------------------------------------------------------------------------------------- writing


def export_run(run: str | os.PathLike, out: str | os.PathLike, *, dtype: torch.dtype | None = None,
               max_shard_bytes: int = _DEFAULT_SHARD) -> Export:
    """Write the run's newest checkpoint (or the checkpoint ``run``) to ``out`` for transformers."""
    trained = read_run(run)
    folder = Path(out)
    if folder.resolve() == trained.path.resolve() or folder.resolve() == Path(run).resolve():
        raise ValueError(f"destination {out} is the run folder; choose another one")
    folder.mkdir(parents=True, exist_ok=True)
    for name in _WRITTEN:  # what an earlier export may have left (the weights are replaced as they are written)
        (folder / name).unlink(missing_ok=True)
    why = mismatches(trained.model, trained.state)
    family = next((f for f in FAMILIES if not why[f]), None)
    if family is not None:
        _write_native(trained, family, folder, dtype, max_shard_bytes)
    else:
        _write_custom(trained, folder, dtype, max_shard_bytes)
    export = Export(folder, family or CUSTOM_MODEL_TYPE, {} if family else why, ())
    files = _write_tokenizers(trained, folder) + _write_readme(trained, folder, export)
    return dataclasses.replace(export, files=tuple(files))


def _write_native(trained: TrainedRun, family: str, folder: Path, dtype: torch.dtype | None,
                  max_shard_bytes: int) -> None:
    config = hf_config(trained.model, family)
    arch = arch_from_hf(config, source=f"the {TITLES[family]} config of {trained.path}")
    model = build_model(arch, lm_to_arch_state(trained.model, trained.state), dtype)
    save_hf(model, folder, max_shard_bytes=max_shard_bytes)


def _write_custom(trained: TrainedRun, folder: Path, dtype: torch.dtype | None, max_shard_bytes: int) -> None:
    cfg = trained.model
    state = {f"model.{k}": v if dtype is None or not v.is_floating_point() else v.to(dtype)
             for k, v in trained.state.items() if not (cfg.tie_embeddings and k == "head.weight")}
    _write_tensors({k: v.detach().contiguous() for k, v in state.items()}, folder, max_shard_bytes)
    stored = next(iter(state.values())).dtype
    config = {
        "model_type": CUSTOM_MODEL_TYPE, "architectures": ["DualrouteForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_dualroute.DualrouteConfig",
                     "AutoModelForCausalLM": "modeling_dualroute.DualrouteForCausalLM"},
        "lm_config": config_to_dict(cfg),
        "dualroute_run": {"config": run_config_to_dict(trained.config), "step": trained.step},
        "dtype": str(stored).removeprefix("torch."), "use_cache": True,
        "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
    }
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    for name in REMOTE_FILES:
        shutil.copyfile(Path(__file__).parent / "hf_remote" / name, folder / name)


def _write_tokenizers(trained: TrainedRun, folder: Path) -> list[str]:
    if trained.tokenizer is None:
        return []
    (folder / DUALROUTE_TOKENIZER_FILE).write_text(json.dumps(trained.tokenizer, ensure_ascii=False), encoding="utf-8")
    try:
        return [DUALROUTE_TOKENIZER_FILE, *write_hf_tokenizer(trained.tokenizer, folder, trained.model.max_seq_len)]
    except ImportError:  # byte and char need the tokenizers package; dualroute_tokenizer.json still encodes
        return [DUALROUTE_TOKENIZER_FILE]


def _write_readme(trained: TrainedRun, folder: Path, export: Export) -> list[str]:
    cfg, kind = trained.model, (trained.tokenizer or {}).get("kind")
    native, moe = export.family in FAMILIES, cfg.moe
    shape = "dense" if moe is None else (f"MoE: {moe.num_experts} experts, {moe.experts_per_token} per token"
                                         + (f", in {moe.num_groups} groups ({moe.groups_per_token} per token)"
                                            if moe.num_groups > 1 else ""))
    lines = [f"# dualroute language model ({TITLES[export.family] if native else 'custom code'})", "",
             f"Exported by `dualroute convert` from `{trained.path}` (step {trained.step}): "
             f"{cfg.n_layers} layers, dim {cfg.dim}, {cfg.n_heads} heads, vocabulary {cfg.vocab_size}, "
             f"context {cfg.max_seq_len} tokens; {shape}.", "", "```python",
             "from transformers import AutoModelForCausalLM, AutoTokenizer"]
    remote = "" if native else ", trust_remote_code=True"
    lines += [f'model = AutoModelForCausalLM.from_pretrained("PATH"{remote})',
              f'tokenizer = AutoTokenizer.from_pretrained("PATH"{remote})' if kind else
              "# no tokenizer: the run read token ids", "```", ""]
    if native:
        lines += [f"A stock transformers {TITLES[export.family]} checkpoint: no custom code."
                  + (" It needs transformers >= 4.51 (which reads `qkv_bias: false`)."
                     if export.family == "qwen2_moe" else ""), ""]
    else:
        lines += ["`configuration_dualroute.py` and `modeling_dualroute.py` build dualroute's own `TransformerLM`: "
                  "they import the `dualroute` package, so `pip install dualroute` first. "
                  f"No stock transformers family fits: {export.reasons()}.", "",
                  "Batches must be unpadded (rows of one length); `generate` uses transformers' KV cache. "
                  "`dualroute convert PATH CKPT --to dualroute` gives back the training checkpoint.", ""]
    if kind:
        lines += [f"Tokenizer: dualroute's {kind} tokenizer, as `tokenizer.json` (no special tokens) and as "
                  f"`{DUALROUTE_TOKENIZER_FILE}` (`dualroute.data.load_tokenizer`)."
                  + (" Token ids are the UTF-8 bytes of the text." if kind == "byte" else ""), ""]
    (folder / README_FILE).write_text("\n".join(lines))
    return [README_FILE]


# ------------------------------------------------------------------------------------------ importing


def is_custom_export(path: str | os.PathLike) -> bool:
    config = Path(path) / CONFIG_FILE
    return config.is_file() and _read_json(config).get("model_type") == CUSTOM_MODEL_TYPE


def import_custom_export(folder: str | os.PathLike, out: str | os.PathLike) -> Path:
    """A custom-code export back to a training checkpoint (``load_run`` / ``dualroute generate`` read it)."""
    folder = Path(folder)
    config = _read_json(folder / CONFIG_FILE)
    run = config.get("dualroute_run")
    if not isinstance(run, dict) or not isinstance(run.get("config"), dict):
        raise ValueError(f"{folder / CONFIG_FILE} has no dualroute_run.config (was it written by dualroute convert?)")
    cfg = run_config_from_dict(run["config"])
    source = SafetensorsFolder(folder)
    state = {name.removeprefix("model."): source.get(name) for name in sorted(source.names())}
    if cfg.model.tie_embeddings:
        state["head.weight"] = state.get("tok_emb.weight")
    with torch.device("meta"):
        model = TransformerLM(cfg.model)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise ValueError(f"{folder}: the weights do not fit lm_config: {e}") from None
    tokenizer_path = folder / DUALROUTE_TOKENIZER_FILE
    tokenizer = _read_json(tokenizer_path) if tokenizer_path.is_file() else None
    extra = {"config": run["config"], "tokenizer": tokenizer, "step": run.get("step"),
             "imported_from": str(folder)}
    return save_checkpoint(out, model_state=state, extra=extra, rng=False)


__all__ = ["Export", "TrainedRun", "export_run", "import_custom_export", "is_custom_export", "is_training_run",
           "read_run"]
