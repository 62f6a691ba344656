"""The encoder-decoder: shapes and MoE placement, padding kept out of routing statistics and outputs, the
attentions against a plain softmax reference (outputs and gradients), cached decoding == full
recomputation, beam search (beam 1 == greedy, batched == one at a time), overfitting a few pairs, bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dualroute.layer import MoEConfig
from dualroute.models import KVCache, dense_twin, param_counts
from dualroute.models.blocks import SelfAttention
from dualroute.models.seq2seq import CrossAttention, Seq2SeqConfig, Seq2SeqTransformer

pytestmark = pytest.mark.usefixtures("one_thread")

PAD, BOS, EOS = 0, 1, 2


def moe_cfg(dim: int = 32, **kw) -> MoEConfig:
    base = dict(dim=dim, hidden=16, num_experts=4, experts_per_token=2, num_groups=2, groups_per_token=1)
    return MoEConfig(**{**base, **kw})


def tiny(seed: int = 0, **kw) -> Seq2SeqTransformer:
    base = dict(src_vocab_size=20, tgt_vocab_size=24, dim=32, n_encoder_layers=2, n_decoder_layers=2, n_heads=4,
                max_seq_len=32, ffn_hidden=48, moe=moe_cfg())
    torch.manual_seed(seed)
    return Seq2SeqTransformer(Seq2SeqConfig(**{**base, **kw}))


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    src_BS = torch.randint(4, 20, (3, 7), generator=g)
    src_BS[0, 4:] = PAD
    src_BS[2, 6:] = PAD
    tgt_BT = torch.randint(4, 24, (3, 6), generator=g)
    tgt_BT[:, 0] = BOS
    tgt_BT[1, 3:] = PAD
    return src_BS, tgt_BT


# ------------------------------------------------------------------------------------------ shapes


@pytest.mark.parametrize("moe_in,n_aux", [("both", 4), ("encoder", 2), ("decoder", 2)])
def test_shapes_and_moe_placement(moe_in, n_aux):
    model = tiny(moe_in=moe_in, moe_every=1)
    src_BS, tgt_BT = batch()
    out = model(src_BS, tgt_BT)
    assert out.logits.shape == (3, 6, 24) and out.logits.dtype == torch.float32
    assert len(out.aux) == n_aux


def test_dense_twin_has_the_active_size_and_no_aux():
    moe, dense = tiny(), Seq2SeqTransformer(dense_twin(tiny().cfg))
    src_BS, tgt_BT = batch()
    assert dense(src_BS, tgt_BT).aux == []
    _, active = param_counts(moe)
    total_dense, _ = param_counts(dense)
    routers = [m.router for m in moe.modules() if hasattr(m, "router")]
    assert len(routers) == 4
    assert active - total_dense == sum(p.numel() for r in routers for p in r.parameters())


def test_shared_embeddings_and_tied_head():
    model = tiny(src_vocab_size=24, shared_embeddings=True)
    assert model.src_emb is model.tgt_emb and model.head.weight is model.tgt_emb.weight
    assert tiny(tie_output=False).head.weight is not tiny(tie_output=False).tgt_emb.weight


# ------------------------------------------------------------------------------------------ padding


def test_padding_is_never_routed_into_statistics():
    model = tiny().eval()
    src_BS, tgt_BT = batch()
    out = model(src_BS, tgt_BT)
    K = 2
    enc_aux, dec_aux = out.aux[:2], out.aux[2:]
    for aux in enc_aux:
        assert int(aux.tokens_per_expert_E.sum()) == K * int((src_BS != PAD).sum())
        assert int(aux.tokens_per_group_G.sum()) == int((src_BS != PAD).sum())  # J = 1
    for aux in dec_aux:
        assert int(aux.tokens_per_expert_E.sum()) == K * int((tgt_BT != PAD).sum())


def test_extra_padding_changes_neither_outputs_nor_balance_losses():
    model = tiny(moe=moe_cfg(balance=dict_balance())).eval()
    src_BS, tgt_BT = batch()
    row_src, row_tgt = src_BS[:1, :4], tgt_BT[:1]  # row 0 has 4 real source tokens
    padded_src = F.pad(row_src, (0, 9), value=PAD)
    short, long = model(row_src, row_tgt), model(padded_src, row_tgt)
    torch.testing.assert_close(short.logits, long.logits, atol=1e-5, rtol=1e-5)
    for a, b in zip(short.aux, long.aux):
        torch.testing.assert_close(a.loss, b.loss, atol=1e-6, rtol=1e-5)
        assert torch.equal(a.tokens_per_expert_E, b.tokens_per_expert_E)
    assert float(short.aux[0].loss.detach()) > 0  # the balance loss is on, so the comparison means something


def dict_balance():
    from dualroute.balance import BalanceConfig

    return BalanceConfig(switch=0.01, group_switch=0.01)


# ------------------------------------------------------------------------------- attention reference


def naive_attention(q_BHTd, k_BHLd, v_BHLd, allowed_BTL):
    scores = q_BHTd @ k_BHLd.transpose(-1, -2) / math.sqrt(q_BHTd.shape[-1])
    scores = scores.masked_fill(~allowed_BTL[:, None], float("-inf"))
    return scores.softmax(-1) @ v_BHLd


def test_cross_attention_matches_a_plain_softmax_on_outputs_and_gradients():
    torch.manual_seed(0)
    attn = CrossAttention(16, 2).double()
    x_BTD = torch.randn(2, 3, 16, dtype=torch.float64, requires_grad=True)
    mem_BLD = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    key_mask_BL = torch.tensor([[True] * 5, [True, True, False, False, False]])
    y = attn(x_BTD, attn.memory(mem_BLD), key_mask_BL)
    k, v = attn.kv(mem_BLD).view(2, 5, 2, 2, 8).permute(2, 0, 3, 1, 4)
    q = attn.q(x_BTD).view(2, 3, 2, 8).transpose(1, 2)
    ref = attn.proj(naive_attention(q, k, v, key_mask_BL[:, None, :].expand(2, 3, 5)).transpose(1, 2).reshape(2, 3, 16))
    torch.testing.assert_close(y, ref)
    w = torch.randn_like(y)
    grads = torch.autograd.grad((y * w).sum(), [x_BTD, mem_BLD, *attn.parameters()])
    ref_grads = torch.autograd.grad((ref * w).sum(), [x_BTD, mem_BLD, *attn.parameters()])
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("causal", [False, True])
def test_key_masked_self_attention_matches_a_plain_softmax(causal):
    torch.manual_seed(0)
    attn = SelfAttention(16, 2, causal=causal).double()
    x_BSD = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    key_mask_BL = torch.tensor([[True] * 5, [True, True, True, False, False]])
    y = attn(x_BSD, key_mask_BL=key_mask_BL)
    q, k, v = attn.qkv(x_BSD).view(2, 5, 3, 2, 8).permute(2, 0, 3, 1, 4)
    allowed_BSL = key_mask_BL[:, None, :].expand(2, 5, 5)
    if causal:
        allowed_BSL = allowed_BSL & torch.ones(5, 5, dtype=torch.bool).tril()
    ref = attn.proj(naive_attention(q, k, v, allowed_BSL).transpose(1, 2).reshape(2, 5, 16))
    torch.testing.assert_close(y, ref)
    gx, gr = torch.autograd.grad(y.sum(), x_BSD)[0], torch.autograd.grad(ref.sum(), x_BSD)[0]
    torch.testing.assert_close(gx, gr)


# ------------------------------------------------------------------------------------------ decoding


def test_cached_decoding_equals_full_recomputation():
    model = tiny().eval()
    src_BS, tgt_BT = batch()
    full = model(src_BS, tgt_BT).logits
    enc = model.encode(src_BS)
    state = model.start_decoding(enc)
    first = model.decode(tgt_BT[:, :2], enc, state)[0]  # a two-token prefill, then one token a step
    rest = [model.decode(tgt_BT[:, t : t + 1], enc, state)[0] for t in range(2, 6)]
    torch.testing.assert_close(torch.cat([first, *rest], dim=1), full, atol=1e-5, rtol=1e-5)
    assert state.cache.pos == 6


def test_kv_cache_reorder_follows_rows():
    cache = KVCache(1, 3, 1, 2, 4)
    k = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 1, 1, 2)
    cache.update(0, k, k)
    cache.reorder(torch.tensor([2, 2, 0]))
    assert cache.k_BHLd[0][:, 0, 0, 0].tolist() == [2.0, 2.0, 0.0] and cache.batch_size == 3


def test_beam_one_equals_greedy_and_batched_beams_equal_single():
    model = tiny(seed=3).eval()
    src_BS, _ = batch()
    greedy = model.greedy(src_BS, max_len_a=1.0, max_len_b=5)
    assert model.beam_search(src_BS, beam_size=1, max_len_a=1.0, max_len_b=5) == greedy
    beams = model.beam_search(src_BS, beam_size=3, length_penalty=0.6, max_len_a=1.0, max_len_b=5)
    for b in range(3):
        row = src_BS[b : b + 1]
        row = row[:, : int((row != PAD).sum())]
        assert model.beam_search(row, beam_size=3, length_penalty=0.6, max_len_a=1.0, max_len_b=5) == [beams[b]]
        n = int((src_BS[b] != PAD).sum())
        assert len(greedy[b]) <= n + 5 - 1 and len(beams[b]) <= n + 5 - 1  # the limit counts the eos
        assert all(t not in (PAD, BOS, EOS) for t in beams[b] + greedy[b])


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_a_wide_beam_finds_the_exhaustive_best(length_penalty):
    """With 3 real target tokens and at most 3 generated (eos included) there are 13 hypotheses; a beam of
    16 keeps them all, so it must return the best of an exhaustive search (teacher-forced log-probabilities)."""
    model = tiny(seed=5, tgt_vocab_size=6).eval()
    src_BS, _ = batch(seed=7)
    hyps = [[]] + [[a] for a in range(3, 6)] + [[a, b] for a in range(3, 6) for b in range(3, 6)]

    def score(b: int, ids: list[int]) -> float:
        logp = F.log_softmax(model(src_BS[b : b + 1], torch.tensor([[BOS, *ids]])).logits[0], -1)
        total = float(logp[torch.arange(len(ids) + 1), torch.tensor([*ids, EOS])].sum())
        return total / (len(ids) + 1) ** length_penalty

    beams = model.beam_search(src_BS, beam_size=16, length_penalty=length_penalty, max_len_a=0.0, max_len_b=3)
    with torch.no_grad():
        for b in range(3):
            assert beams[b] == max(hyps, key=lambda h: score(b, h))


def test_a_tiny_model_overfits_a_few_pairs():
    """Target = the source reversed, shifted into the target vocabulary: greedy decoding reproduces it."""
    model = tiny(seed=0, moe=moe_cfg(num_experts=4, experts_per_token=2, num_groups=2, groups_per_token=1))
    g = torch.Generator().manual_seed(0)
    pairs = [torch.randint(4, 20, (n,), generator=g) for n in (3, 5, 4, 6)]
    src_BS = torch.nn.utils.rnn.pad_sequence(pairs, batch_first=True, padding_value=PAD)
    targets = [(p.flip(0) + 4).tolist() for p in pairs]
    tgt_in = torch.nn.utils.rnn.pad_sequence([torch.tensor([BOS, *t]) for t in targets], batch_first=True)
    tgt_out = torch.nn.utils.rnn.pad_sequence([torch.tensor([*t, EOS]) for t in targets], batch_first=True,
                                              padding_value=-100)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(80):
        out = model(src_BS, tgt_in)
        loss = F.cross_entropy(out.logits.reshape(-1, 24), tgt_out.reshape(-1)) + sum(a.loss for a in out.aux)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.05
    model.eval()
    assert model.greedy(src_BS) == targets


# ------------------------------------------------------------------------------------------ bad input


def test_bad_inputs_raise_clear_errors():
    model = tiny().eval()
    src_BS, tgt_BT = batch()
    with pytest.raises(TypeError, match="source ids must be an integer tensor"):
        model(src_BS.float(), tgt_BT)
    with pytest.raises(ValueError, match=r"target ids must be in \[0, 24\)"):
        model(src_BS, tgt_BT + 30)
    with pytest.raises(ValueError, match="source length 40 exceeds max_seq_len"):
        model(torch.ones(1, 40, dtype=torch.long), tgt_BT[:1])
    with pytest.raises(ValueError, match="target batch 2 != source batch 3"):
        model(src_BS, tgt_BT[:2])
    with pytest.raises(ValueError, match="beam_size"):
        model.beam_search(src_BS, beam_size=0)


@pytest.mark.parametrize("kw,match", [
    (dict(dim=30), "even integer"),
    (dict(moe_in="middle"), "moe_in"),
    (dict(shared_embeddings=True), "shared_embeddings needs"),
    (dict(eos_id=0), "must differ"),
    (dict(pad_id=50), "pad_id"),
    (dict(moe=moe_cfg(dim=16)), "moe.dim"),
])
def test_bad_configs_name_the_field(kw, match):
    base = dict(src_vocab_size=20, tgt_vocab_size=24, dim=32, n_heads=4, moe=moe_cfg())
    with pytest.raises(ValueError, match=match):
        Seq2SeqConfig(**{**base, **kw})
