"""config.json of a Hugging Face MoE checkpoint -> ``ArchConfig`` (the MoE block as a dualroute ``MoEConfig``).

Read with the json module alone: loading needs no transformers. Missing optional keys take the
default of the transformers config class of that family; both the transformers 5 layout
(``rope_parameters``) and the 4.x one (``rope_theta`` + ``rope_scaling``) are read.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from ..balance import BalanceConfig
from ..layer import MoEConfig
from ..routing import RouterOptions
from .arch import ArchConfig
from .attention import MLAConfig, RopeConfig

SUPPORTED_MODEL_TYPES = ("mixtral", "qwen2_moe", "deepseek_v3", "olmoe")
CONFIG_FILE = "config.json"
_REQUIRED = object()


def read_config(folder: str | os.PathLike) -> dict[str, Any]:
    """The parsed config.json of ``folder``; FileNotFoundError / ValueError name the file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a directory (expected a Hugging Face checkpoint folder)")
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a Hugging Face checkpoint folder needs config.json")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(config).__name__}")
    return config


def arch_from_hf(config: dict[str, Any], balance: BalanceConfig | None = None,
                 source: str = CONFIG_FILE) -> ArchConfig:
    """The ``ArchConfig`` of a Mixtral / Qwen2-MoE / DeepSeek-V3 / OLMoE config dict."""
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{source}: unsupported model_type {model_type!r}; supported: "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    c = _Reader(config, source)
    if c.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{source}: hidden_act {config['hidden_act']!r} is not supported "
                         "(only 'silu': SwiGLU experts)")
    build = {"mixtral": _mixtral, "qwen2_moe": _qwen2_moe, "deepseek_v3": _deepseek_v3, "olmoe": _olmoe}
    try:
        return build[model_type](c, balance or BalanceConfig())
    except (TypeError, ValueError) as e:
        if str(e).startswith(source):
            raise
        raise ValueError(f"{source}: {e}") from None


class _Reader:
    def __init__(self, config: dict[str, Any], source: str) -> None:
        self.config, self.source = config, source

    def get(self, key: str, default: Any = _REQUIRED) -> Any:
        value = self.config.get(key)
        if value is None:
            if default is _REQUIRED:
                raise ValueError(f"{self.source}: missing {key!r}")
            return default
        return value

    def int(self, key: str, default: Any = _REQUIRED) -> int:
        value = self.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{self.source}: {key} must be a non-negative int, got {value!r}")
        return value


def _common(c: _Reader) -> dict[str, Any]:
    dim, n_heads, n_layers = c.int("hidden_size"), c.int("num_attention_heads"), c.int("num_hidden_layers")
    return dict(
        model_type=c.get("model_type"),
        vocab_size=c.int("vocab_size"),
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=c.int("num_key_value_heads", n_heads),
        head_dim=c.int("head_dim", dim // n_heads),
        norm_eps=float(c.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(c.get("tie_word_embeddings", False)),
        hf_config=dict(c.config),
    )


def _rope(c: _Reader, default_theta: float, interleaved: bool = False) -> RopeConfig:
    params = c.config.get("rope_parameters") or c.config.get("rope_scaling") or {}
    if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
        raise ValueError(f"{c.source}: per-layer-type rope parameters are not supported")
    kind = params.get("rope_type", params.get("type", "default"))
    theta = float(params.get("rope_theta") or c.config.get("rope_theta") or default_theta)
    if kind not in ("default", "linear", "yarn"):
        raise ValueError(f"{c.source}: unsupported rope type {kind!r}; supported: default, linear, yarn")
    if kind == "default":
        return RopeConfig(theta=theta, interleaved=interleaved)
    original = int(params.get("original_max_position_embeddings") or c.config.get("original_max_position_embeddings")
                   or c.int("max_position_embeddings"))
    factor = params.get("factor")
    factor = float(c.int("max_position_embeddings") / original if factor is None else factor)
    if kind == "linear":
        return RopeConfig(theta=theta, kind=kind, factor=factor, interleaved=interleaved)
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)
    return RopeConfig(theta=theta, kind=kind, factor=factor, original_max_positions=original,
                      beta_fast=float(params.get("beta_fast") or 32), beta_slow=float(params.get("beta_slow") or 1),
                      attention_factor=float(attention_factor), truncate=bool(params.get("truncate", True)),
                      interleaved=interleaved)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _router(**kw: Any) -> RouterOptions:
    return RouterOptions(bias=False, **kw)


def _mixtral(c: _Reader, balance: BalanceConfig) -> ArchConfig:
    base = _common(c)
    moe = MoEConfig(dim=base["dim"], hidden=c.int("intermediate_size"), num_experts=c.int("num_local_experts"),
                    experts_per_token=c.int("num_experts_per_tok"), balance=balance,
                    router=_router(renormalize=True, jitter_eps=float(c.get("router_jitter_noise", 0.0))))
    window = c.get("sliding_window", None)
    return ArchConfig(**base, dense_hidden=moe.hidden, moe=moe, moe_layers=(True,) * base["n_layers"],
                      rope=_rope(c, 1e6), windows=(window,) * base["n_layers"] if window else ())


def _qwen2_moe(c: _Reader, balance: BalanceConfig) -> ArchConfig:
    base = _common(c)
    n, E = base["n_layers"], c.int("num_experts", 60)
    only_dense, step = set(c.get("mlp_only_layers", [])), c.int("decoder_sparse_step", 1)
    moe_layers = tuple(i not in only_dense and E > 0 and (i + 1) % step == 0 for i in range(n))
    shared = c.int("shared_expert_intermediate_size", 5632)
    if shared < 1:
        raise ValueError(f"{c.source}: shared_expert_intermediate_size must be > 0, got {shared}")
    # One shared expert of its own width (not necessarily a multiple of the routed width), sigmoid-gated.
    moe = MoEConfig(dim=base["dim"], hidden=c.int("moe_intermediate_size", 1408), num_experts=max(E, 1),
                    experts_per_token=c.int("num_experts_per_tok", 4), num_shared_experts=1, shared_hidden=shared,
                    shared_gate=True, balance=balance,
                    router=_router(renormalize=bool(c.get("norm_topk_prob", False))))
    return ArchConfig(**base, dense_hidden=c.int("intermediate_size"), moe=moe, moe_layers=moe_layers,
                      rope=_rope(c, 10000.0), qkv_bias=bool(c.get("qkv_bias", True)), windows=_qwen_windows(c, n))


def _qwen_windows(c: _Reader, n: int) -> tuple[int | None, ...]:
    window = c.get("sliding_window", 4096) if c.get("use_sliding_window", False) else 0
    types = c.get("layer_types", None)
    if types is None:  # transformers' rule when config.json predates layer_types
        types = ["sliding_attention" if (i + 1) % 2 and i < c.int("max_window_layers", 28)
                 and c.get("use_sliding_window", False) else "full_attention" for i in range(n)]
    if len(types) != n:
        raise ValueError(f"{c.source}: layer_types has {len(types)} entries for num_hidden_layers={n}")
    windows = tuple(window if t == "sliding_attention" and window else None for t in types)
    return windows if any(w is not None for w in windows) else ()


def _deepseek_v3(c: _Reader, balance: BalanceConfig) -> ArchConfig:
    base = _common(c)
    if base["n_kv_heads"] != base["n_heads"]:
        raise ValueError(f"{c.source}: MLA needs num_key_value_heads == num_attention_heads, got "
                         f"{base['n_kv_heads']} and {base['n_heads']}")
    shared = c.int("n_shared_experts", 1)
    if shared < 1:
        raise ValueError(f"{c.source}: n_shared_experts must be >= 1, got {shared}")
    E, G, J = c.int("n_routed_experts"), c.int("n_group", 1) or 1, c.int("topk_group", 1) or 1
    moe = MoEConfig(
        dim=base["dim"], hidden=c.int("moe_intermediate_size"), num_experts=E,
        experts_per_token=c.int("num_experts_per_tok"), num_groups=G, groups_per_token=J,
        num_shared_experts=shared, balance=balance,
        router=_router(group_router="derived", group_score="top2_sum", score_func="sigmoid",
                       renormalize=bool(c.get("norm_topk_prob", True)),
                       scaling_factor=float(c.get("routed_scaling_factor", 1.0)), correction_bias=True))
    mla = MLAConfig(q_lora_rank=c.get("q_lora_rank", None), kv_lora_rank=c.int("kv_lora_rank"),
                    qk_nope_head_dim=c.int("qk_nope_head_dim"), qk_rope_head_dim=c.int("qk_rope_head_dim"),
                    v_head_dim=c.int("v_head_dim"), bias=bool(c.get("attention_bias", False)))
    rope = _rope(c, 10000.0, interleaved=bool(c.get("rope_interleave", True)))
    scale = mla.qk_head_dim ** -0.5
    params = c.config.get("rope_parameters") or c.config.get("rope_scaling") or {}
    if rope.kind != "default" and params.get("mscale_all_dim"):
        scale *= yarn_mscale(rope.factor, params["mscale_all_dim"]) ** 2
    first_dense = c.int("first_k_dense_replace", 0)
    base["head_dim"] = mla.qk_head_dim
    return ArchConfig(**base, dense_hidden=c.int("intermediate_size"), moe=moe,
                      moe_layers=tuple(i >= first_dense for i in range(base["n_layers"])), rope=rope,
                      mla=mla, softmax_scale=scale)


def _olmoe(c: _Reader, balance: BalanceConfig) -> ArchConfig:
    base = _common(c)
    base["head_dim"] = base["dim"] // base["n_heads"]  # OLMoE's q/k norms assume it
    moe = MoEConfig(dim=base["dim"], hidden=c.int("intermediate_size"), num_experts=c.int("num_experts"),
                    experts_per_token=c.int("num_experts_per_tok"), balance=balance,
                    router=_router(renormalize=bool(c.get("norm_topk_prob", False))))
    bias = bool(c.get("attention_bias", False))
    clip = c.get("clip_qkv", None)
    return ArchConfig(**base, dense_hidden=moe.hidden, moe=moe, moe_layers=(True,) * base["n_layers"],
                      rope=_rope(c, 10000.0), qkv_bias=bias, out_bias=bias, qk_norm=True,
                      clip_qkv=None if clip is None else float(clip))
