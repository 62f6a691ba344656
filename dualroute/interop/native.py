"""Which transformers family a dualroute language model is exactly, and its config.json and tensors there.

The LM (``models/lm.py``) is a pre-norm decoder: RMSNorm, multi-head attention without biases and with
rotate-half rotary embeddings, SwiGLU FFNs without biases, each dense or a routed MoE. Of the families
that ``interop`` reads:

* **Mixtral**: every FFN an MoE of SwiGLU experts, routed by ``softmax(W x)`` over all experts (no
  router bias), top-k, renormalised over the k kept; no shared experts, no dense layers.
* **Qwen2-MoE**: the same router, renormalised or not (``norm_topk_prob``), plus one sigmoid-gated
  shared SwiGLU expert in every MoE layer; dense SwiGLU layers anywhere (``mlp_only_layers``). Its q/k/v
  biases are optional from transformers 4.51 (``qkv_bias``); older versions always build them and would
  leave them randomly initialised.
* OLMoE normalises q and k, DeepSeek-V3 has latent attention: the LM is never either.

No preset is one of them: the lm-flat and lm-flat-small routers have a bias and correction biases (which
balancing moves), lm-dual and lm-dual-small route in two levels, lm-dense and lm-dense-small have no MoE
layer. lm-flat-small with ``model.moe.router.bias=false model.moe.router.correction_bias=false`` is Mixtral;
adding ``model.moe.num_shared_experts=1 model.moe.shared_gate=true`` makes it Qwen2-MoE (and then
``router.renormalize`` and dense layers are free). lm-flat already has an ungated shared expert and
unrenormalised weights, so with those two router settings and ``model.moe.shared_gate=true`` it is Qwen2-MoE.
"""

from __future__ import annotations

from typing import Any

import torch

from ..models.lm import LMConfig

FAMILIES = ("mixtral", "qwen2_moe")
TITLES = {"mixtral": "Mixtral", "qwen2_moe": "Qwen2-MoE"}


def mismatches(cfg: LMConfig, state: dict[str, torch.Tensor] | None = None) -> dict[str, list[str]]:
    """Per family, what keeps ``cfg`` (and the correction biases in ``state``) from computing exactly it."""
    common = _common_mismatches(cfg, state)
    if cfg.moe is None:
        return {family: common for family in FAMILIES}
    moe = cfg.moe
    mixtral = [reason for ok, reason in [
        (moe.num_shared_experts == 0, f"shared experts (model.moe.num_shared_experts={moe.num_shared_experts})"),
        (cfg.dense_first == 0 and cfg.moe_every == 1,
         f"dense layers (model.dense_first={cfg.dense_first}, model.moe_every={cfg.moe_every})"),
        (moe.router.renormalize, "routing weights are not renormalised (model.moe.router.renormalize=false)"),
    ] if not ok]
    qwen = [] if moe.num_shared_experts >= 1 and moe.shared_gate else [
        "no sigmoid-gated shared expert (model.moe.num_shared_experts>=1 with model.moe.shared_gate=true)"]
    return {"mixtral": common + mixtral, "qwen2_moe": common + qwen}


def native_family(cfg: LMConfig, state: dict[str, torch.Tensor] | None = None) -> str | None:
    """The first family of ``FAMILIES`` that ``cfg`` is exactly, or None."""
    return next((family for family, why in mismatches(cfg, state).items() if not why), None)


def _common_mismatches(cfg: LMConfig, state: dict[str, torch.Tensor] | None) -> list[str]:
    moe = cfg.moe
    if moe is None:
        return ["the model is dense (no MoE layers)"]
    r = moe.router
    why = [reason for ok, reason in [
        (moe.num_groups == 1, f"two-level routing (model.moe.num_groups={moe.num_groups})"),
        (moe.expert_kind == "swiglu" and not moe.expert_bias and moe.out_dim is None,
         f"experts are not bias-free SwiGLU (model.moe.expert_kind={moe.expert_kind!r}, "
         f"expert_bias={moe.expert_bias})"),
        (moe.routing_mode == "token_choice", f"model.moe.routing_mode={moe.routing_mode!r}"),
        (r.score_func == "softmax", f"model.moe.router.score_func={r.score_func!r}"),
        (not r.bias, "the router has a bias (model.moe.router.bias=true)"),
        (r.scaling_factor == 1.0, f"model.moe.router.scaling_factor={r.scaling_factor}"),
        (not r.noisy_gating, "noisy gating (model.moe.router.noisy_gating=true)"),
        (all(getattr(moe, f) is None for f in ("capacity_factor", "eval_capacity_factor", "group_capacity_factor",
                                                "eval_group_capacity_factor")), "a capacity factor drops tokens"),
        (cfg.dropout == 0, f"model.dropout={cfg.dropout} also drops embeddings and residuals"),
    ] if not ok]
    if r.correction_bias and state is not None:
        biased = [k for k, v in state.items() if k.endswith(("router.expert_bias_E", "router.group_bias_G"))
                  and torch.count_nonzero(v)]
        if biased:
            why.append(f"correction biases are non-zero ({biased[0]}, ...: aux-loss-free balancing moved them)")
    return why


def hf_config(cfg: LMConfig, family: str) -> dict[str, Any]:
    """The config.json of ``cfg`` as ``family`` (check ``mismatches`` first)."""
    moe = cfg.moe
    config = {
        "model_type": family, "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_heads,
        "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings, "attention_dropout": 0.0, "num_experts_per_tok":
        moe.experts_per_token, "router_aux_loss_coef": moe.balance.switch, "output_router_logits": False,
        "use_cache": True,
        # both layouts: transformers 5 reads rope_parameters, 4.x rope_theta
        "rope_theta": cfg.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        # the LM has no special tokens (Mixtral's defaults are 1 and 2)
        "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
    }
    if family == "mixtral":
        return {**config, "architectures": ["MixtralForCausalLM"], "head_dim": cfg.head_dim,
                "intermediate_size": moe.hidden, "num_local_experts": moe.num_experts, "sliding_window": None,
                "router_jitter_noise": moe.router.jitter_eps}
    return {**config, "architectures": ["Qwen2MoeForCausalLM"], "intermediate_size": cfg.ffn_hidden,
            "moe_intermediate_size": moe.hidden, "num_experts": moe.num_experts,
            "shared_expert_intermediate_size": moe.shared_hidden or moe.num_shared_experts * moe.hidden,
            "norm_topk_prob": moe.router.renormalize, "decoder_sparse_step": 1,
            "mlp_only_layers": [i for i in range(cfg.n_layers) if not cfg.is_moe_slot(i)], "qkv_bias": False,
            "use_sliding_window": False, "sliding_window": None, "max_window_layers": cfg.n_layers,
            "layer_types": ["full_attention"] * cfg.n_layers}


def lm_to_arch_state(cfg: LMConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``TransformerLM`` tensor names -> ``interop.MoECausalLM`` ones (the fused q/k/v projection split in three).

    Both models build their FFNs from dualroute's ``MoELayer`` and ``DenseFFN``, whose tensors keep their
    names; zero correction biases, which no family stores, are left out.
    """
    out = {"embed.weight": state["tok_emb.weight"], "norm.weight": state["norm.weight"]}
    if not cfg.tie_embeddings:
        out["head.weight"] = state["head.weight"]
    for i in range(cfg.n_layers):
        ours, theirs = f"blocks.{i}.", f"layers.{i}."
        q, k, v = state[ours + "attn.qkv.weight"].chunk(3, dim=0)  # view(B, S, 3, H, d): q rows, then k, then v
        out.update({theirs + "attn.q_proj.weight": q, theirs + "attn.k_proj.weight": k,
                    theirs + "attn.v_proj.weight": v, theirs + "attn.o_proj.weight": state[ours + "attn.proj.weight"]})
        for name in ("attn_norm.weight", "ffn_norm.weight"):
            out[theirs + name] = state[ours + name]
        for name, tensor in state.items():
            if name.startswith(ours + "ffn.") and not name.endswith(("router.expert_bias_E", "router.group_bias_G")):
                out[theirs + name[len(ours):]] = tensor
    return out
