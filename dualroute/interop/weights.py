"""Tensor names and layouts: Hugging Face checkpoints <-> the state dict of ``MoECausalLM``.

Shapes: E experts, D model dim, F expert hidden dim.

transformers keeps a ``Linear`` weight as ``(out, in)``; dualroute's stacked experts compute ``x @ w``,
so ``w13`` is ``(E, D, 2F)`` (gate half first, then up) and ``w2`` is ``(E, F, D)``. Routed experts
are read in either layout a checkpoint may use: one tensor per expert and projection
(``experts.{e}.w1`` / ``w3`` / ``w2`` for Mixtral, ``gate_proj`` / ``up_proj`` / ``down_proj``
otherwise; what ``save_pretrained`` writes) or transformers 5's fused ``experts.gate_up_proj``
``(E, 2F, D)`` and ``experts.down_proj`` ``(E, D, F)``. They are written per expert, as
``save_pretrained`` does.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from safetensors import SafetensorError, safe_open

from ..layer import MoEConfig
from .arch import ArchConfig, DecoderBlock

INDEX_FILE = "model.safetensors.index.json"
WEIGHTS_FILE = "model.safetensors"


@dataclass(frozen=True)
class Family:
    moe_prefixes: tuple[str, ...]  # module name of the MoE block in a decoder layer (the first is written)
    experts_key: str  # config.json key of E
    hidden_key: str  # config.json key of F
    shared: str | None = None  # module name of the shared expert(s)
    shared_gate: str | None = None


FAMILIES = {
    "mixtral": Family(("block_sparse_moe", "mlp"), "num_local_experts", "intermediate_size"),
    "qwen2_moe": Family(("mlp",), "num_experts", "moe_intermediate_size", "shared_expert", "shared_expert_gate"),
    "deepseek_v3": Family(("mlp",), "n_routed_experts", "moe_intermediate_size", "shared_experts"),
    "olmoe": Family(("mlp",), "num_experts", "intermediate_size"),
}
_PER_EXPERT = (("w1", "w3", "w2"), ("gate_proj", "up_proj", "down_proj"))  # (gate, up, down) names
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


class TensorSource(Protocol):
    label: str

    def names(self) -> set[str]: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def get(self, name: str) -> torch.Tensor: ...
    def where(self, name: str) -> str: ...


class SafetensorsFolder:
    """The tensors of ``model.safetensors``, or of the shards listed in ``model.safetensors.index.json``.

    Block-quantised FP8 weights (DeepSeek-V3's release: ``W.weight`` in float8 with ``W.weight_scale_inv``
    holding one scale per ``block`` tile) are returned dequantised, in bfloat16.
    """

    def __init__(self, folder: str | Path, block: tuple[int, int] = (128, 128)) -> None:
        self.folder = Path(folder)
        self.label = str(self.folder)
        self.block = block
        self._files: dict[str, Path] = {}
        self._open: dict[Path, object] = {}
        for path in self._weight_files():
            try:
                handle = safe_open(str(path), framework="pt")
            except (SafetensorError, OSError) as e:
                raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
            self._open[path] = handle
            for name in handle.keys():
                self._files.setdefault(name, path)

    def _weight_files(self) -> list[Path]:
        index = self.folder / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{index}: not a safetensors index (needs a 'weight_map' object): {e}") from None
            files = sorted({self.folder / f for f in weight_map.values()})
            for f in files:
                if not f.is_file():
                    raise FileNotFoundError(f"{f} not found: {index} lists it as a weight shard")
            return files
        if (self.folder / WEIGHTS_FILE).is_file():
            return [self.folder / WEIGHTS_FILE]
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no weights in {self.folder}: expected {WEIGHTS_FILE} or {INDEX_FILE} "
                                    "(only safetensors checkpoints are read)")
        return files

    def names(self) -> set[str]:
        return {n for n in self._files if not (n.endswith("_scale_inv") and n[: -len("_scale_inv")] in self._files)}

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._open[self._files[name]].get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        tensor = self._open[self._files[name]].get_tensor(name)
        scale_name = name + "_scale_inv"
        if scale_name not in self._files:
            return tensor
        scale = self._open[self._files[scale_name]].get_tensor(scale_name).float()
        rows, cols = tensor.shape
        scale = scale.repeat_interleave(self.block[0], 0)[:rows].repeat_interleave(self.block[1], 1)[:, :cols]
        return (tensor.float() * scale).to(torch.bfloat16)

    def where(self, name: str) -> str:
        return str(self._files[name])


class DictSource:
    """Tensors held in memory (a module's state dict), for the drop-in swap."""

    def __init__(self, tensors: dict[str, torch.Tensor], label: str) -> None:
        self.tensors, self.label = tensors, label

    def names(self) -> set[str]:
        return set(self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape)

    def get(self, name: str) -> torch.Tensor:
        return self.tensors[name].detach()

    def where(self, name: str) -> str:
        return self.label


class _Taker:
    """Reads tensors with their shape checked against the config, and remembers which were used."""

    def __init__(self, source: TensorSource, config_file: str = "config.json") -> None:
        self.source, self.config_file, self.used = source, config_file, set()
        self._names = source.names()

    def has(self, name: str) -> bool:
        return name in self._names

    def take(self, name: str, shape: tuple[int, ...], dims: str) -> torch.Tensor:
        expected = f"expected shape {shape} = {dims} from {self.config_file}"
        if name not in self._names:
            raise ValueError(f"{self.source.label}: tensor {name!r} is missing ({expected})")
        got = self.source.shape(name)
        if got != tuple(shape):
            raise ValueError(f"{self.source.where(name)}: tensor {name!r} has shape {got}, {expected}")
        self.used.add(name)
        return self.source.get(name)

    def check_all_used(self, ignore: re.Pattern | None = None) -> None:
        unused = sorted(n for n in self._names - self.used if not _IGNORED.search(n)
                        and not (ignore is not None and ignore.search(n)))
        if unused:
            shown = ", ".join(repr(n) for n in unused[:4]) + (", ..." if len(unused) > 4 else "")
            raise ValueError(f"{self.source.label}: {len(unused)} tensor(s) that the model described by "
                             f"{self.config_file} does not have: {shown} (does config.json match the weights?)")


# --------------------------------------------------------------------------------------------- reading


def hf_to_state(arch: ArchConfig, source: TensorSource, config_file: str = "config.json") -> dict[str, torch.Tensor]:
    """The ``MoECausalLM`` state dict of a checkpoint, in the dtype stored (routers in float32)."""
    t = _Taker(source, config_file)
    D, V = arch.dim, arch.vocab_size
    state = {"embed.weight": t.take("model.embed_tokens.weight", (V, D), "(vocab_size, hidden_size)"),
             "norm.weight": t.take("model.norm.weight", (D,), "(hidden_size,)")}
    if not arch.tie_embeddings:
        state["head.weight"] = t.take("lm_head.weight", (V, D), "(vocab_size, hidden_size)")
    attention = attention_shapes(arch)
    for i in range(arch.n_layers):
        hf, ours = f"model.layers.{i}.", f"layers.{i}."
        state[ours + "attn_norm.weight"] = t.take(hf + "input_layernorm.weight", (D,), "(hidden_size,)")
        state[ours + "ffn_norm.weight"] = t.take(hf + "post_attention_layernorm.weight", (D,), "(hidden_size,)")
        for name, shape in attention.items():
            state[ours + "attn." + name] = t.take(hf + "self_attn." + name, shape, _attention_dims(arch, name))
        if arch.moe_layers[i]:
            prefix = _moe_prefix(t, hf, FAMILIES[arch.model_type])
            for name, value in read_moe(t, prefix, arch.moe, arch.model_type).items():
                state[ours + "ffn." + name] = value
        else:
            w13, w2 = _read_swiglu(t, hf + "mlp.", arch.dim, arch.dense_hidden, "intermediate_size")
            state[ours + "ffn.inner.w13"], state[ours + "ffn.inner.w2"] = w13[None], w2[None]
    t.check_all_used(_extra_layers(arch))
    return state


def attention_shapes(arch: ArchConfig) -> dict[str, tuple[int, ...]]:
    """Attention tensor names (the same in both formats) and their shapes."""
    with torch.device("meta"):
        attn = DecoderBlock(dataclasses.replace(arch, moe_layers=(False,) * arch.n_layers), 0).attn
    return {name: tuple(p.shape) for name, p in attn.state_dict().items()}


def _attention_dims(arch: ArchConfig, name: str) -> str:
    """The config.json terms of an attention tensor's shape, e.g. ``(num_key_value_heads * head_dim, hidden_size)``."""
    heads = "num_attention_heads"
    if arch.mla is None:
        q, kv = f"{heads} * head_dim", "num_key_value_heads * head_dim"
        dims = {"q_proj": (q, "hidden_size"), "k_proj": (kv, "hidden_size"), "v_proj": (kv, "hidden_size"),
                "o_proj": ("hidden_size", q), "q_norm": (q,), "k_norm": (kv,)}
    else:
        q = f"{heads} * (qk_nope_head_dim + qk_rope_head_dim)"
        dims = {"q_proj": (q, "hidden_size"), "q_a_proj": ("q_lora_rank", "hidden_size"),
                "q_a_layernorm": ("q_lora_rank",), "q_b_proj": (q, "q_lora_rank"),
                "kv_a_proj_with_mqa": ("kv_lora_rank + qk_rope_head_dim", "hidden_size"),
                "kv_a_layernorm": ("kv_lora_rank",),
                "kv_b_proj": (f"{heads} * (qk_nope_head_dim + v_head_dim)", "kv_lora_rank"),
                "o_proj": ("hidden_size", f"{heads} * v_head_dim")}
    module, _, kind = name.rpartition(".")
    shape = dims[module] if kind == "weight" else dims[module][:1]
    return "(" + ", ".join(shape) + ("," if len(shape) == 1 else "") + ")"


def _extra_layers(arch: ArchConfig) -> re.Pattern | None:
    # DeepSeek-V3 checkpoints carry multi-token-prediction layers after the last decoder layer;
    # transformers does not load them either.
    if arch.model_type != "deepseek_v3":
        return None
    extra = int(arch.hf_config.get("num_nextn_predict_layers") or 0)
    if extra == 0:
        return None
    layers = "|".join(str(arch.n_layers + k) for k in range(extra))
    return re.compile(rf"^model\.layers\.({layers})\.")


def _moe_prefix(t: _Taker, layer: str, family: Family) -> str:
    for name in family.moe_prefixes:
        if t.has(f"{layer}{name}.gate.weight"):
            return f"{layer}{name}."
    return f"{layer}{family.moe_prefixes[0]}."  # take() names the missing router tensor


def read_moe(t: _Taker, prefix: str, cfg: MoEConfig, model_type: str) -> dict[str, torch.Tensor]:
    """The ``MoELayer`` state dict of one MoE block whose tensors start with ``prefix``."""
    family = FAMILIES[model_type]
    E, D, Fh = cfg.num_experts, cfg.dim, cfg.hidden
    E_, F_ = family.experts_key, family.hidden_key
    state = {"router.gate.weight": t.take(prefix + "gate.weight", (E, D), f"({E_}, hidden_size)").float()}
    if cfg.router.correction_bias:
        state["router.expert_bias_E"] = t.take(prefix + "gate.e_score_correction_bias", (E,), f"({E_},)").float()
        state["router.group_bias_G"] = torch.zeros(cfg.num_groups)
    if t.has(prefix + "experts.gate_up_proj"):
        gate_up = t.take(prefix + "experts.gate_up_proj", (E, 2 * Fh, D), f"({E_}, 2 * {F_}, hidden_size)")
        down = t.take(prefix + "experts.down_proj", (E, D, Fh), f"({E_}, hidden_size, {F_})")
        state["experts.w13"] = gate_up.transpose(1, 2)
        state["experts.w2"] = down.transpose(1, 2)
    else:
        names = next((n for n in _PER_EXPERT if t.has(f"{prefix}experts.0.{n[0]}.weight")), _PER_EXPERT[-1])
        pairs = [_read_swiglu(t, f"{prefix}experts.{e}.", D, Fh, F_, names) for e in range(E)]
        state["experts.w13"] = torch.stack([w13 for w13, _ in pairs])
        state["experts.w2"] = torch.stack([w2 for _, w2 in pairs])
    if cfg.num_shared_experts:
        width = cfg.shared_hidden or cfg.num_shared_experts * Fh
        key = "shared_expert_intermediate_size" if family.shared_gate else f"n_shared_experts * {F_}"
        w13, w2 = _read_swiglu(t, f"{prefix}{family.shared}.", D, width, key)
        state["shared.ffn.inner.w13"], state["shared.ffn.inner.w2"] = w13[None], w2[None]
    if cfg.shared_gate:
        state["shared.gate.weight"] = t.take(f"{prefix}{family.shared_gate}.weight", (1, D), "(1, hidden_size)")
    return state


def _read_swiglu(t: _Taker, prefix: str, D: int, Fh: int, width_key: str,
                 names: tuple[str, str, str] = _PER_EXPERT[1]) -> tuple[torch.Tensor, torch.Tensor]:
    """One SwiGLU MLP as ``(w13 (D, 2F), w2 (F, D))`` from its three ``(out, in)`` Linear weights."""
    gate = t.take(f"{prefix}{names[0]}.weight", (Fh, D), f"({width_key}, hidden_size)")
    up = t.take(f"{prefix}{names[1]}.weight", (Fh, D), f"({width_key}, hidden_size)")
    down = t.take(f"{prefix}{names[2]}.weight", (D, Fh), f"(hidden_size, {width_key})")
    return torch.cat([gate.t(), up.t()], dim=1), down.t().contiguous()


# --------------------------------------------------------------------------------------------- writing


def state_to_hf(arch: ArchConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Checkpoint tensors (names, layouts) of a ``MoECausalLM`` state dict, as ``save_pretrained`` writes them."""
    out = {"model.embed_tokens.weight": state["embed.weight"], "model.norm.weight": state["norm.weight"]}
    if not arch.tie_embeddings:
        out["lm_head.weight"] = state["head.weight"]
    family, attention = FAMILIES[arch.model_type], attention_shapes(arch)
    for i in range(arch.n_layers):
        hf, ours = f"model.layers.{i}.", f"layers.{i}."
        out[hf + "input_layernorm.weight"] = state[ours + "attn_norm.weight"]
        out[hf + "post_attention_layernorm.weight"] = state[ours + "ffn_norm.weight"]
        for name in attention:
            out[hf + "self_attn." + name] = state[ours + "attn." + name]
        ffn = {k[len(ours) + 4:]: v for k, v in state.items() if k.startswith(ours + "ffn.")}
        if arch.moe_layers[i]:
            out.update(write_moe(ffn, f"{hf}{family.moe_prefixes[0]}.", arch.moe, arch.model_type))
        else:
            out.update(_write_swiglu(ffn["inner.w13"][0], ffn["inner.w2"][0], hf + "mlp."))
    return {name: tensor.detach().contiguous() for name, tensor in out.items()}


def write_moe(state: dict[str, torch.Tensor], prefix: str, cfg: MoEConfig, model_type: str) -> dict[str, torch.Tensor]:
    family = FAMILIES[model_type]
    out = {prefix + "gate.weight": state["router.gate.weight"]}
    if cfg.router.correction_bias:
        if torch.count_nonzero(state["router.group_bias_G"]):
            raise ValueError(f"{prefix}: a non-zero group correction bias has no place in a {model_type} checkpoint")
        out[prefix + "gate.e_score_correction_bias"] = state["router.expert_bias_E"]
    names = _PER_EXPERT[0] if model_type == "mixtral" else _PER_EXPERT[1]
    for e in range(cfg.num_experts):
        out.update(_write_swiglu(state["experts.w13"][e], state["experts.w2"][e], f"{prefix}experts.{e}.", names))
    if cfg.num_shared_experts:
        out.update(_write_swiglu(state["shared.ffn.inner.w13"][0], state["shared.ffn.inner.w2"][0],
                                 f"{prefix}{family.shared}."))
    if cfg.shared_gate:
        out[f"{prefix}{family.shared_gate}.weight"] = state["shared.gate.weight"]
    return out


def _write_swiglu(w13: torch.Tensor, w2: torch.Tensor, prefix: str,
                  names: tuple[str, str, str] = _PER_EXPERT[1]) -> dict[str, torch.Tensor]:
    gate, up = w13.chunk(2, dim=-1)
    return {f"{prefix}{names[0]}.weight": gate.t().contiguous(), f"{prefix}{names[1]}.weight": up.t().contiguous(),
            f"{prefix}{names[2]}.weight": w2.t().contiguous()}
