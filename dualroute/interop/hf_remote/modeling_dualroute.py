"""A dualroute language model as a transformers model (written by ``dualroute convert RUN OUT --to hf``).

Load the folder with ``AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)``. This file holds
no model code of its own: it imports the ``dualroute`` package (``pip install dualroute``), builds
``dualroute.models.TransformerLM`` from ``config.lm_config`` (dual-layer routed MoE feed-forward layers, or
dense ones) and adapts its interface to transformers':

* ``forward(input_ids, attention_mask, cache, labels, ...)`` returns ``CausalLMOutputWithPast`` with float32
  logits, the loss when ``labels`` are given (next-token cross-entropy plus the MoE layers' own weighted aux
  losses, as ``dualroute train`` optimises), and the cache.
* The KV cache is transformers' own (a ``DynamicCache`` in ``generate``); dualroute's attention reads and
  writes it through ``_CacheBridge``, so ``generate`` (greedy, sampling, beam search) works as for any decoder.
* The model has no padding mask: every row of a batch must be one unpadded sequence of the same length.
  A zero in ``attention_mask``, or position ids other than ``0, 1, 2, ...``, raise a ValueError.

Shapes: B batch, S new positions, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from dualroute.experts import Experts
from dualroute.models.blocks import rope_tables
from dualroute.models.lm import LMConfig, TransformerLM
from dualroute.train.configio import config_from_dict

from .configuration_dualroute import DualrouteConfig

# transformers 5 names the cache ``cache``; 4.x named it ``past_key_values``.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class _CacheBridge:
    """dualroute's KV-cache interface (``pos``, ``batch_size``, ``update(layer, k, v)``) over a transformers cache."""

    def __init__(self, cache, batch_size: int) -> None:
        self.cache, self.batch_size = cache, batch_size
        self.pos = cache.get_seq_length()  # positions already cached

    def update(self, layer: int, k_BHSd: torch.Tensor, v_BHSd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.update(k_BHSd, v_BHSd, layer)


class DualroutePreTrainedModel(PreTrainedModel):
    config_class = DualrouteConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]
    _supports_cache_class = True  # transformers 4.x: generate passes a Cache object, not tuples

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        loaded = super().from_pretrained(*args, **kwargs)  # the model, or (model, loading info)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        # transformers assigns each tensor as stored (contiguous); dualroute keeps routed experts' weights
        # out-major, the layout its matmuls are tuned for. Experts' own load_state_dict hook restores it.
        for module in model.modules():
            if isinstance(module, Experts):
                module.load_state_dict(module.state_dict())
        return loaded

    def _init_weights(self, module: torch.nn.Module) -> None:
        # Only the rotary tables, which are computed, not stored: weights come from model.safetensors (or,
        # for a model built from a config, keep TransformerLM's own initialisation).
        if isinstance(module, TransformerLM):
            cos_Sh, sin_Sh = rope_tables(module.cfg.head_dim, module.cfg.max_seq_len, module.cfg.rope_theta)
            with torch.no_grad():
                module.rope_cos_Sh.copy_(cos_Sh)
                module.rope_sin_Sh.copy_(sin_Sh)


class DualrouteForCausalLM(DualroutePreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"model.head.weight": "model.tok_emb.weight"}  # used only when tie_word_embeddings

    def __init__(self, config: DualrouteConfig) -> None:
        super().__init__(config)
        self.model = TransformerLM(config_from_dict(LMConfig, config.lm_config))
        self.post_init()

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.model.tok_emb

    def set_input_embeddings(self, value: torch.nn.Embedding) -> None:
        self.model.tok_emb = value

    def get_output_embeddings(self) -> torch.nn.Linear:
        return self.model.head

    def set_output_embeddings(self, value: torch.nn.Linear) -> None:
        self.model.head = value

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache=None, inputs_embeds: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, use_cache: bool | None = None, logits_to_keep: int = 0,
                past_key_values=None, **kwargs) -> CausalLMOutputWithPast:
        if input_ids is None or inputs_embeds is not None:
            raise ValueError("a dualroute model takes input_ids (it has no inputs_embeds input)")
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache()
        B, S = input_ids.shape
        past = 0 if cache is None else cache.get_seq_length()
        _check_unpadded(attention_mask, position_ids, past, S)
        out = self.model(input_ids, None if cache is None else _CacheBridge(cache, B))
        logits_BSV = out.logits
        loss = None
        if labels is not None:
            V = logits_BSV.shape[-1]
            loss = F.cross_entropy(logits_BSV[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1).to(logits_BSV.device),
                                   ignore_index=-100)
            for aux in out.aux:
                loss = loss + aux.loss
        if logits_to_keep:
            logits_BSV = logits_BSV[:, -logits_to_keep:]
        return CausalLMOutputWithPast(loss=loss, logits=logits_BSV, **{_CACHE_FIELD: cache if use_cache else None})


def _check_unpadded(attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None, past: int, S: int) -> None:
    """The model places token i of every row at position ``past + i``: refuse inputs that say otherwise."""
    if attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask.bool().all()):
        raise ValueError("a dualroute model does not take padded batches (attention_mask has zeros): "
                         "pass rows of one length, or one sequence at a time")
    if position_ids is not None:
        expected = torch.arange(past, past + S, device=position_ids.device)
        if position_ids.shape[-1] != S or not bool((position_ids == expected).all()):
            raise ValueError(f"a dualroute model places its {S} new tokens at positions {past}..{past + S - 1}; "
                             "other position_ids are not supported")
