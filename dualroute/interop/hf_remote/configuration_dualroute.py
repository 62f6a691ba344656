"""The transformers config of a dualroute language model (written by ``dualroute convert RUN OUT --to hf``).

Loaded by transformers with ``trust_remote_code=True`` beside ``modeling_dualroute.py``. The model is
dualroute's own ``TransformerLM``, so the ``dualroute`` package must be installed (``pip install dualroute``).

``lm_config`` holds the model's ``dualroute.models.LMConfig`` as a dict and is the only source of the
sizes: ``vocab_size``, ``hidden_size``, ``num_hidden_layers``, ... are derived from it, for the tools that
read those standard names. ``dualroute_run`` records where the weights came from (the run config, its
tokenizer and step), so ``dualroute convert OUT CKPT --to dualroute`` can give the training checkpoint back.
"""

from transformers import PretrainedConfig

# Standard config names derived from lm_config; a value given for one of them is replaced.
_DERIVED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "head_dim", "intermediate_size", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings")


class DualrouteConfig(PretrainedConfig):
    model_type = "dualroute"

    def __init__(self, lm_config: dict | None = None, dualroute_run: dict | None = None, use_cache: bool = True,
                 **kwargs):
        self.lm_config = dict(lm_config or {})
        self.dualroute_run = dualroute_run
        self.use_cache = use_cache
        for name in _DERIVED:
            kwargs.pop(name, None)
        lm = self.lm_config
        self.vocab_size = lm.get("vocab_size", 256)
        self.hidden_size = lm.get("dim", 128)
        self.num_hidden_layers = lm.get("n_layers", 4)
        self.num_attention_heads = self.num_key_value_heads = lm.get("n_heads", 4)
        self.head_dim = self.hidden_size // self.num_attention_heads
        self.intermediate_size = lm.get("ffn_hidden", 256)
        self.max_position_embeddings = lm.get("max_seq_len", 256)
        self.rms_norm_eps = lm.get("norm_eps", 1e-5)
        super().__init__(tie_word_embeddings=lm.get("tie_embeddings", True), **kwargs)
