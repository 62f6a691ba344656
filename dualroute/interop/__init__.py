"""Checkpoints of other libraries: Hugging Face Mixtral, Qwen2-MoE, DeepSeek-V3 and OLMoE.

* ``load_hf(folder)`` -> ``MoECausalLM``: config.json + safetensors read directly (no transformers),
  every MoE block a dualroute ``MoELayer``, logits equal to transformers' to float rounding.
* ``save_hf(model, folder)``: back to config.json + safetensors for ``from_pretrained``.
* ``save_dualroute`` / ``load_dualroute``: the same model as a dualroute checkpoint.
* ``swap_moe_blocks(hf_model)``: drop-in, inside a loaded transformers model (needs transformers:
  ``pip install "dualroute[hf]"``).
* ``export_run(run, folder)``: a language model trained by ``dualroute train`` for transformers, as a native
  Mixtral / Qwen2-MoE checkpoint when it is exactly one (``native.py``), else in the Hub's custom-code format
  (``hf_remote/``); ``import_custom_export`` brings the latter back to a training checkpoint.

Importing this package does not import transformers.
"""

from .arch import ArchConfig, MoECausalLM
from .export import export_run, import_custom_export
from .hf import build_model, load_dualroute, load_hf, load_model, save_dualroute, save_hf
from .hf_config import SUPPORTED_MODEL_TYPES, arch_from_hf, read_config
from .swap import HFMoEAdapter, swap_moe_blocks

__all__ = [
    "ArchConfig",
    "HFMoEAdapter",
    "MoECausalLM",
    "SUPPORTED_MODEL_TYPES",
    "arch_from_hf",
    "build_model",
    "export_run",
    "import_custom_export",
    "load_dualroute",
    "load_hf",
    "load_model",
    "read_config",
    "save_dualroute",
    "save_hf",
    "swap_moe_blocks",
]
