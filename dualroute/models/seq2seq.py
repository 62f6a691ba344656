"""An encoder-decoder Transformer (translation, grapheme-to-phoneme) whose FFNs are dual-routed MoE layers.

Shapes: B batch, S source positions, T target positions, D model dim, V target vocabulary,
H heads, d head dim, L cached / attended key positions, k beams.

Pre-norm blocks with RMSNorm, rotary positions in both self-attentions, cross-attention over the encoder
output through ``scaled_dot_product_attention``. Padding (``pad_id``) is masked out of the encoder's
attention, the cross-attention and, through the MoE layer's ``mask``, the routing statistics and balance
losses. Decoding keeps a ``KVCache`` of the decoder's self-attention and the encoder's keys and values
per layer, computed once (``DecoderState``); ``greedy`` and ``beam_search`` are batched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..layer import MoEAux, MoEConfig, MoELayer
from ..routing import deferred_finite_checks
from .blocks import KVCache, Rope, SelfAttention, rope_tables
from .common import (ModelOutput, build_ffn, check_dropout, check_moe, check_positive_float, check_positive_ints)

_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


@dataclass(frozen=True)
class Seq2SeqConfig:
    src_vocab_size: int = 1000
    tgt_vocab_size: int = 1000
    dim: int = 256
    n_encoder_layers: int = 3
    n_decoder_layers: int = 3
    n_heads: int = 4
    max_seq_len: int = 256  # longest source, and longest target with its bos
    ffn_hidden: int = 512  # width of the dense (swiglu) FFN of non-MoE layers
    moe: MoEConfig | None = None  # None: every FFN dense
    moe_in: Literal["both", "encoder", "decoder"] = "both"  # which stack's FFNs are MoE layers
    moe_every: int = 1  # layer i of a MoE stack is MoE when i % moe_every == 0
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    dropout: float = 0.0
    shared_embeddings: bool = False  # one table for source and target (needs equal vocabularies)
    tie_output: bool = True  # the output head is the target embedding
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    dense_twin_of: MoEConfig | None = None  # set by dense_twin(): MoE slots become dense FFNs as wide as K experts

    def __post_init__(self) -> None:
        check_positive_ints(self, ("src_vocab_size", "tgt_vocab_size", "dim", "n_encoder_layers",
                                   "n_decoder_layers", "n_heads", "max_seq_len", "ffn_hidden", "moe_every"))
        if self.dim % self.n_heads != 0 or (self.dim // self.n_heads) % 2 != 0:
            raise ValueError(f"dim / n_heads = {self.dim} / {self.n_heads} must be an even integer (rotary "
                             "embeddings)")
        if self.moe_in not in ("both", "encoder", "decoder"):
            raise ValueError(f"moe_in must be 'both', 'encoder' or 'decoder', got {self.moe_in!r}")
        if self.shared_embeddings and self.src_vocab_size != self.tgt_vocab_size:
            raise ValueError(f"shared_embeddings needs src_vocab_size == tgt_vocab_size, got "
                             f"{self.src_vocab_size} and {self.tgt_vocab_size}")
        specials = {"pad_id": self.pad_id, "bos_id": self.bos_id, "eos_id": self.eos_id}
        for name, value in specials.items():
            if isinstance(value, bool) or not isinstance(value, int) \
                    or not 0 <= value < min(self.src_vocab_size, self.tgt_vocab_size):
                raise ValueError(f"{name} must be an id below both vocabulary sizes, got {value!r}")
        if len(set(specials.values())) != 3:
            raise ValueError(f"pad_id, bos_id and eos_id must differ, got {specials}")
        check_positive_float("rope_theta", self.rope_theta)
        check_positive_float("norm_eps", self.norm_eps)
        check_dropout(self.dropout)
        check_moe(self)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def is_moe_slot(self, stack: Literal["encoder", "decoder"], i: int) -> bool:
        return self.moe_in in ("both", stack) and i % self.moe_every == 0


class CrossAttention(nn.Module):
    """Decoder queries over the encoder output; ``memory`` computes its keys and values once."""

    def __init__(self, dim: int, n_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.n_heads, self.head_dim, self.dropout = n_heads, dim // n_heads, dropout
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def memory(self, mem_BLD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, L, _ = mem_BLD.shape
        kv_2BHLd = self.kv(mem_BLD).view(B, L, 2, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return kv_2BHLd[0], kv_2BHLd[1]

    def forward(self, x_BTD: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor],
                key_mask_BL: torch.Tensor) -> torch.Tensor:
        B, T, D = x_BTD.shape
        q_BHTd = self.q(x_BTD).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        y_BHTd = F.scaled_dot_product_attention(q_BHTd, kv[0], kv[1], attn_mask=key_mask_BL[:, None, None, :],
                                                dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y_BHTd.transpose(1, 2).reshape(B, T, D))


def _ffn(ffn: nn.Module, x_BSD: torch.Tensor, mask_BS: torch.Tensor) -> tuple[torch.Tensor, MoEAux | None]:
    """The FFN of a block; an MoE layer sees the padding mask, so pads stay out of its statistics."""
    if isinstance(ffn, MoELayer):
        return ffn(x_BSD, mask_BS)
    return ffn(x_BSD), None


class EncoderBlock(nn.Module):
    def __init__(self, cfg: Seq2SeqConfig, ffn: nn.Module, layer_idx: int) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = SelfAttention(cfg.dim, cfg.n_heads, causal=False, dropout=cfg.dropout, layer_idx=layer_idx)
        self.ffn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.ffn = ffn
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x_BSD: torch.Tensor, rope: Rope, mask_BS: torch.Tensor) -> tuple[torch.Tensor, MoEAux | None]:
        x_BSD = x_BSD + self.drop(self.attn(self.attn_norm(x_BSD), rope, key_mask_BL=mask_BS))
        h_BSD, aux = _ffn(self.ffn, self.ffn_norm(x_BSD), mask_BS)
        return x_BSD + self.drop(h_BSD), aux


class DecoderBlock(nn.Module):
    def __init__(self, cfg: Seq2SeqConfig, ffn: nn.Module, layer_idx: int) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = SelfAttention(cfg.dim, cfg.n_heads, causal=True, dropout=cfg.dropout, layer_idx=layer_idx)
        self.cross_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.cross = CrossAttention(cfg.dim, cfg.n_heads, cfg.dropout)
        self.ffn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.ffn = ffn
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x_BTD: torch.Tensor, rope: Rope, mask_BT: torch.Tensor,
                cross_kv: tuple[torch.Tensor, torch.Tensor], src_mask_BS: torch.Tensor,
                cache: KVCache | None) -> tuple[torch.Tensor, MoEAux | None]:
        x_BTD = x_BTD + self.drop(self.attn(self.attn_norm(x_BTD), rope, cache))
        x_BTD = x_BTD + self.drop(self.cross(self.cross_norm(x_BTD), cross_kv, src_mask_BS))
        h_BTD, aux = _ffn(self.ffn, self.ffn_norm(x_BTD), mask_BT)
        return x_BTD + self.drop(h_BTD), aux


@dataclass
class Encoded:
    """The encoder's output for a batch of sources."""

    memory_BSD: torch.Tensor
    mask_BS: torch.Tensor  # True = a real source token
    aux: list[MoEAux]


@dataclass
class DecoderState:
    """What decoding one token at a time keeps: the self-attention cache and each layer's encoder keys /
    values (computed once from the encoder output)."""

    cache: KVCache
    cross_kv: list[tuple[torch.Tensor, torch.Tensor]]
    src_mask_BS: torch.Tensor


class Seq2SeqTransformer(nn.Module):
    def __init__(self, cfg: Seq2SeqConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.context_len = cfg.max_seq_len
        self.src_emb = nn.Embedding(cfg.src_vocab_size, cfg.dim)
        self.tgt_emb = self.src_emb if cfg.shared_embeddings else nn.Embedding(cfg.tgt_vocab_size, cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)

        def ffn(stack: Literal["encoder", "decoder"], i: int) -> nn.Module:
            return build_ffn(cfg.dim, cfg.ffn_hidden, cfg.is_moe_slot(stack, i), cfg.moe, cfg.dense_twin_of)

        self.encoder = nn.ModuleList(EncoderBlock(cfg, ffn("encoder", i), i) for i in range(cfg.n_encoder_layers))
        self.decoder = nn.ModuleList(DecoderBlock(cfg, ffn("decoder", i), i) for i in range(cfg.n_decoder_layers))
        self.enc_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.dec_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.tgt_vocab_size, bias=False)
        for emb in {id(self.src_emb): self.src_emb, id(self.tgt_emb): self.tgt_emb}.values():
            nn.init.normal_(emb.weight, std=0.02)
        if cfg.tie_output:
            self.head.weight = self.tgt_emb.weight
        cos_Sh, sin_Sh = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos_Sh", cos_Sh, persistent=False)
        self.register_buffer("rope_sin_Sh", sin_Sh, persistent=False)

    def forward(self, src_BS: torch.Tensor, tgt_in_BT: torch.Tensor) -> ModelOutput:
        """Logits ``(B, T, V)`` (float32) for every target position (teacher forcing); ``aux``: the encoder's
        MoE layers, then the decoder's."""
        enc = self.encode(src_BS)
        logits_BTV, dec_aux = self.decode(tgt_in_BT, enc)
        return ModelOutput(logits_BTV, enc.aux + dec_aux)

    def encode(self, src_BS: torch.Tensor) -> Encoded:
        S = self._check_ids(src_BS, "source", self.cfg.src_vocab_size)
        mask_BS = src_BS != self.cfg.pad_id
        mask_BS = mask_BS | ~mask_BS.any(dim=1, keepdim=True)  # an empty source attends to its pads, not to nothing
        rope = (self.rope_cos_Sh[:S], self.rope_sin_Sh[:S])
        x_BSD, aux = self.drop(self.src_emb(src_BS)), []
        with deferred_finite_checks():
            for block in self.encoder:
                x_BSD, block_aux = block(x_BSD, rope, mask_BS)
                aux += [] if block_aux is None else [block_aux]
        return Encoded(self.enc_norm(x_BSD), mask_BS, aux)

    def start_decoding(self, enc: Encoded) -> DecoderState:
        """A fresh decoder state for ``enc``'s batch: empty self-attention cache, encoder keys / values."""
        cfg, weight = self.cfg, self.tgt_emb.weight
        B = enc.memory_BSD.shape[0]
        cache = KVCache(cfg.n_decoder_layers, B, cfg.n_heads, cfg.head_dim, cfg.max_seq_len, weight.device,
                        enc.memory_BSD.dtype)
        return DecoderState(cache, [b.cross.memory(enc.memory_BSD) for b in self.decoder], enc.mask_BS)

    def decode(self, tgt_BT: torch.Tensor, enc: Encoded, state: DecoderState | None = None
               ) -> tuple[torch.Tensor, list[MoEAux]]:
        """Logits for ``tgt_BT``; with ``state``, ``tgt_BT`` continues the tokens it has seen."""
        start = 0 if state is None else state.cache.pos
        T = self._check_ids(tgt_BT, "target", self.cfg.tgt_vocab_size, start)
        if tgt_BT.shape[0] != enc.memory_BSD.shape[0]:
            raise ValueError(f"target batch {tgt_BT.shape[0]} != source batch {enc.memory_BSD.shape[0]}")
        rope = (self.rope_cos_Sh[start : start + T], self.rope_sin_Sh[start : start + T])
        mask_BT = tgt_BT != self.cfg.pad_id
        cross = state.cross_kv if state is not None else [b.cross.memory(enc.memory_BSD) for b in self.decoder]
        x_BTD, aux = self.drop(self.tgt_emb(tgt_BT)), []
        with deferred_finite_checks():
            for block, kv in zip(self.decoder, cross):
                x_BTD, block_aux = block(x_BTD, rope, mask_BT, kv, enc.mask_BS, None if state is None else state.cache)
                aux += [] if block_aux is None else [block_aux]
        if state is not None:
            state.cache.pos += T
        return self.head(self.dec_norm(x_BTD)).float(), aux

    def _check_ids(self, ids: torch.Tensor, what: str, vocab: int, start: int = 0) -> int:
        if not isinstance(ids, torch.Tensor) or ids.dtype not in _INT_DTYPES:
            got = ids.dtype if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise TypeError(f"{what} ids must be an integer tensor, got {got}")
        if ids.dim() != 2 or ids.shape[1] == 0:
            raise ValueError(f"{what} ids must have shape (B, length) with length >= 1, got {tuple(ids.shape)}")
        lo, hi = torch.stack(torch.aminmax(ids)).tolist()
        if lo < 0 or hi >= vocab:
            raise ValueError(f"{what} ids must be in [0, {vocab}), got min {lo}, max {hi}")
        if start + ids.shape[1] > self.cfg.max_seq_len:
            raise ValueError(f"{what} length {start + ids.shape[1]} exceeds max_seq_len ({self.cfg.max_seq_len})")
        return ids.shape[1]

    # -------------------------------------------------------------------------------------- decoding

    def max_lengths(self, src_BS: torch.Tensor, max_len_a: float, max_len_b: int) -> torch.Tensor:
        """Per source, the most tokens to generate (eos included): ``a * source length + b``, within the
        model's positions."""
        src_len_B = (src_BS != self.cfg.pad_id).sum(dim=1)
        limit_B = (max_len_a * src_len_B.double() + max_len_b).floor().long()
        return limit_B.clamp(1, self.cfg.max_seq_len)

    @torch.no_grad()
    def greedy(self, src_BS: torch.Tensor, max_len_a: float = 1.5, max_len_b: int = 10) -> list[list[int]]:
        """The likeliest next token at every step, for every source at once; returns the ids without bos / eos."""
        return self.beam_search(src_BS, beam_size=1, max_len_a=max_len_a, max_len_b=max_len_b, _greedy=True)

    @torch.no_grad()
    def beam_search(self, src_BS: torch.Tensor, beam_size: int = 4, length_penalty: float = 1.0,
                    max_len_a: float = 1.5, max_len_b: int = 10, _greedy: bool = False) -> list[list[int]]:
        """Batched beam search; returns, per source, the best hypothesis' ids without bos / eos.

        A hypothesis ends at eos; its score is its summed log-probability divided by ``length ** length_penalty``
        (length counts the eos; fairseq's ``lenpen``). Each step keeps ``beam_size`` unfinished hypotheses
        per source; a source is done once it holds ``beam_size`` finished ones. A source of length n may
        generate ``max_len_a * n + max_len_b`` tokens (within ``max_seq_len``); eos is forced at that length.
        """
        cfg = self.cfg
        if isinstance(beam_size, bool) or not isinstance(beam_size, int) or beam_size < 1:
            raise ValueError(f"beam_size must be an int >= 1, got {beam_size!r}")
        B, k = src_BS.shape[0], beam_size
        enc = self.encode(src_BS)
        if k > 1:
            enc = Encoded(enc.memory_BSD.repeat_interleave(k, 0), enc.mask_BS.repeat_interleave(k, 0), [])
        state = self.start_decoding(enc)
        limit_N = self.max_lengths(src_BS, max_len_a, max_len_b).repeat_interleave(k)  # N = B * k rows
        device = src_BS.device
        tokens_NT = torch.full((B * k, 1), cfg.bos_id, dtype=torch.long, device=device)
        scores_Bk = torch.zeros(B, k, device=device)
        scores_Bk[:, 1:] = float("-inf")  # every beam starts the same: take the first step from one
        finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
        done_B = torch.zeros(B, dtype=torch.bool)
        for step in range(int(limit_N.max())):
            logits_NV = self.decode(tokens_NT[:, -1:], enc, state)[0][:, -1]
            logp_NV = F.log_softmax(logits_NV.float(), dim=-1)
            logp_NV[:, cfg.pad_id] = logp_NV[:, cfg.bos_id] = float("-inf")
            forced_NV = torch.full_like(logp_NV, float("-inf"))  # at its length limit a hypothesis must end
            forced_NV[:, cfg.eos_id] = logp_NV[:, cfg.eos_id]
            logp_NV = torch.where((limit_N <= step + 1)[:, None], forced_NV, logp_NV)
            V = logp_NV.shape[1]
            if _greedy:  # beam 1, kept separate so the beam search can be tested against it
                next_N = logp_NV.argmax(dim=-1)
                top_s_B2k = (scores_Bk + logp_NV.gather(1, next_N[:, None])).view(B, 1)
                top_i_B2k = next_N.view(B, 1)
            else:
                cand_BkV = scores_Bk[:, :, None] + logp_NV.view(B, k, V)
                top_s_B2k, top_i_B2k = cand_BkV.view(B, k * V).topk(min(2 * k, k * V), dim=1)
            beam_B2k, tok_B2k = top_i_B2k // V, top_i_B2k % V
            eos_B2k = tok_B2k == cfg.eos_id
            self._finish(finished, done_B, top_s_B2k, beam_B2k, eos_B2k, tokens_NT, k, step, length_penalty)
            if bool(done_B.all()):
                break
            alive_s_Bk, alive_r_Bk = top_s_B2k.masked_fill(eos_B2k, float("-inf")).topk(k, dim=1)
            rows_N = (torch.arange(B, device=device)[:, None] * k + beam_B2k.gather(1, alive_r_Bk)).view(-1)
            next_N = tok_B2k.gather(1, alive_r_Bk).view(-1)
            next_N = torch.where(done_B.to(device).repeat_interleave(k), cfg.pad_id, next_N)
            tokens_NT = torch.cat([tokens_NT[rows_N], next_N[:, None]], dim=1)
            state.cache.reorder(rows_N)  # beams move only within their source: the encoder state is unchanged
            scores_Bk = alive_s_Bk
        return [max(f, key=lambda h: h[0])[1] if f else [] for f in finished]

    def _finish(self, finished: list[list[tuple[float, list[int]]]], done_B: torch.Tensor, top_s_B2k: torch.Tensor,
                beam_B2k: torch.Tensor, eos_B2k: torch.Tensor, tokens_NT: torch.Tensor, k: int, step: int,
                length_penalty: float) -> None:
        """Record the hypotheses ending with eos among each source's k best candidates."""
        ranks = eos_B2k[:, :k].nonzero().tolist()
        if not ranks:
            return
        scores, beams = top_s_B2k.tolist(), beam_B2k.tolist()
        for b, r in ranks:
            if done_B[b] or scores[b][r] == float("-inf"):
                continue
            ids = tokens_NT[b * k + beams[b][r], 1:].tolist()
            finished[b].append((scores[b][r] / (step + 1) ** length_penalty, ids))
            if len(finished[b]) >= k:
                done_B[b] = True
