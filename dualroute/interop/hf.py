"""Load and save Hugging Face MoE checkpoints (config.json + safetensors) as dualroute models, without transformers.

``load_hf`` reads a folder as ``save_pretrained`` writes it (one ``model.safetensors`` or shards with
``model.safetensors.index.json``); ``save_hf`` writes one back that ``from_pretrained`` loads.
``save_dualroute`` / ``load_dualroute`` keep the same model as a dualroute checkpoint (``train/checkpoint.py``
format, the source config.json in its metadata).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import safetensors.torch
import torch

from ..balance import BalanceConfig
from ..train.checkpoint import META_FILE, load_weights, save_checkpoint
from .arch import ArchConfig, MoECausalLM
from .hf_config import CONFIG_FILE, arch_from_hf, read_config
from .weights import INDEX_FILE, WEIGHTS_FILE, SafetensorsFolder, hf_to_state, state_to_hf

INTEROP_KEY = "interop_hf"  # where a dualroute checkpoint keeps the source config.json
EXTRA_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
               "tokenizer.model", "vocab.json", "merges.txt")
_DEFAULT_SHARD = 5 * 2**30


def load_hf(folder: str | os.PathLike, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
            balance: BalanceConfig | None = None) -> MoECausalLM:
    """An eval-mode ``MoECausalLM`` with the weights of a Mixtral / Qwen2-MoE / DeepSeek-V3 / OLMoE folder.

    ``dtype`` defaults to the stored one; routers stay in float32. ``balance`` sets the aux-loss weights of
    every MoE layer (none by default). Bad input raises FileNotFoundError or ValueError naming the file,
    the tensor and the expected shape.
    """
    config = read_config(folder)
    arch = arch_from_hf(config, balance, source=str(Path(folder) / CONFIG_FILE))
    block = (config.get("quantization_config") or {}).get("weight_block_size") or (128, 128)
    state = hf_to_state(arch, SafetensorsFolder(folder, tuple(block)), str(Path(folder) / CONFIG_FILE))
    return build_model(arch, state, dtype, device)


def build_model(arch: ArchConfig, state: dict[str, torch.Tensor], dtype: torch.dtype | None = None,
                device: str | torch.device = "cpu") -> MoECausalLM:
    """``MoECausalLM(arch)`` holding ``state`` (no random initialisation: built on the meta device)."""
    dtype = dtype or state["embed.weight"].dtype
    if arch.tie_embeddings:
        state = {**state, "head.weight": state["embed.weight"]}
    with torch.device("meta"):
        model = MoECausalLM(arch)
    model.load_state_dict({k: v.to(device=device, dtype=torch.float32 if ".router." in k else dtype)
                           for k, v in state.items()}, strict=True, assign=True)
    if arch.tie_embeddings:
        model.head.weight = model.embed.weight
    return model.eval()


def save_hf(model: MoECausalLM, folder: str | os.PathLike, *, max_shard_bytes: int = _DEFAULT_SHARD) -> Path:
    """Write ``config.json`` + safetensors (sharded past ``max_shard_bytes``) for ``from_pretrained``."""
    arch = _arch_of(model)
    dtype = model.embed.weight.dtype
    fp32 = ("mlp.gate.weight", "mlp.gate.e_score_correction_bias") if arch.model_type == "deepseek_v3" else ()
    tensors = {name: t.to("cpu", torch.float32 if name.endswith(fp32) else dtype)  # as transformers keeps them
               for name, t in state_to_hf(arch, model.state_dict()).items()}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _write_tensors(tensors, folder, max_shard_bytes)
    config = dict(arch.hf_config)
    config.pop("quantization_config", None)  # FP8 weights were dequantised on load
    config["torch_dtype" if "torch_dtype" in config else "dtype"] = str(dtype).removeprefix("torch.")
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return folder


def _arch_of(model: MoECausalLM) -> ArchConfig:
    if not isinstance(model, MoECausalLM):
        raise TypeError(f"expected a MoECausalLM (from load_hf / load_dualroute), got {type(model).__name__}")
    if not model.cfg.hf_config:
        raise ValueError("the model's ArchConfig has no hf_config (the source config.json) to write back")
    return model.cfg


def _write_tensors(tensors: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int) -> None:
    for old in [folder / WEIGHTS_FILE, folder / INDEX_FILE, *folder.glob("model-*-of-*.safetensors")]:
        old.unlink(missing_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    if len(shards) == 1:
        safetensors.torch.save_file(shards[0], str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
        return
    weight_map = {}
    for k, shard in enumerate(shards, 1):
        file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        safetensors.torch.save_file(shard, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def save_dualroute(model: MoECausalLM, folder: str | os.PathLike) -> Path:
    """A dualroute checkpoint of the model (weights in dualroute layout, the source config.json in meta.json)."""
    arch = _arch_of(model)
    return save_checkpoint(folder, model_state=model.state_dict(), extra={INTEROP_KEY: arch.hf_config}, rng=False)


def load_dualroute(folder: str | os.PathLike, *, dtype: torch.dtype | None = None,
                   device: str | torch.device = "cpu") -> MoECausalLM:
    ckpt = load_weights(folder)
    if INTEROP_KEY not in ckpt.extra:
        raise ValueError(f"{folder} is a dualroute checkpoint without a Hugging Face config (written by "
                         "save_dualroute / `dualroute convert --to dualroute`?)")
    arch = arch_from_hf(ckpt.extra[INTEROP_KEY], source=f"{folder}/{META_FILE}")
    return build_model(arch, ckpt.model_state, dtype, device)


def load_model(folder: str | os.PathLike, *, dtype: torch.dtype | None = None,
               device: str | torch.device = "cpu") -> MoECausalLM:
    """A dualroute checkpoint (has meta.json) or a Hugging Face folder (has config.json)."""
    if (Path(folder) / META_FILE).is_file():
        return load_dualroute(folder, dtype=dtype, device=device)
    return load_hf(folder, dtype=dtype, device=device)


def copy_extra_files(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copy tokenizer and generation-config files that sit beside the weights; returns their names."""
    copied = []
    for name in EXTRA_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied
