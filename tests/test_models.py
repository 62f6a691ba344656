"""Models: shapes and aux per MoE block, overfitting one batch, KV cache == full recomputation,
sampling, parameter / FLOP counts of the dense twin, and the errors bad inputs raise."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dualroute import routing
from dualroute.layer import MoEAux, MoEConfig, MoELayer
from dualroute.models import (ImageConfig, KVCache, LMConfig, ModelOutput, TransformerLM, ViTClassifier,
                              dense_twin, flops_per_token, param_counts)
from dualroute.routing import deferred_finite_checks


pytestmark = pytest.mark.usefixtures("one_thread")


def moe_cfg(dim: int, **kw) -> MoEConfig:
    base = dict(dim=dim, hidden=16, num_experts=4, experts_per_token=2, num_groups=2, groups_per_token=1)
    return MoEConfig(**{**base, **kw})


def tiny_lm_cfg(**kw) -> LMConfig:
    base = dict(vocab_size=32, dim=32, n_layers=4, n_heads=2, max_seq_len=24, ffn_hidden=48,
                moe=moe_cfg(32), moe_every=2, dense_first=1)
    return LMConfig(**{**base, **kw})


def tiny_lm(seed: int = 0, **kw) -> TransformerLM:
    torch.manual_seed(seed)
    return TransformerLM(tiny_lm_cfg(**kw))


# ------------------------------------------------------------------------------------------ shapes


@pytest.mark.parametrize("moe", [None, moe_cfg(32)], ids=["dense", "moe"])
def test_lm_forward_shapes_and_aux(moe):
    model = tiny_lm(moe=moe)
    out = model(torch.randint(0, 32, (3, 10)))
    assert isinstance(out, ModelOutput)
    assert out.logits.shape == (3, 10, 32) and out.logits.dtype == torch.float32
    # dense_first=1, moe_every=2, 4 layers: MoE on layers 1 and 3
    moe_blocks = [i for i, b in enumerate(model.blocks) if isinstance(b.ffn, MoELayer)]
    assert moe_blocks == ([] if moe is None else [1, 3])
    assert len(out.aux) == len(moe_blocks)
    assert all(isinstance(a, MoEAux) for a in out.aux)
    for a in out.aux:  # dual routing: every token keeps J=1 of G=2 groups, K=2 experts
        assert a.routing.group_ids_TJ.shape == (30, 1)
        assert int(a.tokens_per_expert_E.sum()) == 30 * 2


@pytest.mark.parametrize("size,channels,patch", [(8, 1, 2), (28, 1, 7), (32, 3, 4)], ids=["digits", "mnist", "cifar"])
def test_vit_forward_shapes(size, channels, patch):
    cfg = ImageConfig(image_size=size, channels=channels, patch_size=patch, dim=32, n_layers=3, n_heads=2,
                      ffn_hidden=48, moe=moe_cfg(32), moe_every=2)
    out = ViTClassifier(cfg)(torch.randn(2, channels, size, size))
    assert out.logits.shape == (2, 10)
    assert len(out.aux) == 2  # layers 0 and 2
    assert all(isinstance(a, MoEAux) for a in out.aux)
    assert ViTClassifier(dense_twin(cfg))(torch.randn(2, channels, size, size)).aux == []


# ------------------------------------------------------------------------------------------ overfit


def _overfit(model, inputs, targets, loss_of, steps: int = 150, lr: float = 3e-3) -> tuple[float, float]:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = loss_of(model(inputs).logits, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses[0], min(losses[-10:])


def test_moe_lm_overfits_one_batch():
    model = tiny_lm(n_layers=2, dense_first=0, moe_every=1)
    tokens = torch.randint(0, 32, (4, 17), generator=torch.Generator().manual_seed(1))
    lm_loss = lambda logits, y: F.cross_entropy(logits.flatten(0, 1), y.flatten())  # noqa: E731
    first, last = _overfit(model, tokens[:, :-1], tokens[:, 1:], lm_loss)
    assert first == pytest.approx(math.log(32), rel=0.1)
    assert last < 0.1 * first, (first, last)


def test_moe_vit_overfits_one_batch():
    torch.manual_seed(0)
    cfg = ImageConfig(dim=32, n_layers=2, n_heads=2, ffn_hidden=48, moe=moe_cfg(32))
    model = ViTClassifier(cfg)
    images = torch.randn(16, 1, 8, 8)
    labels = torch.arange(16) % 10
    first, last = _overfit(model, images, labels, F.cross_entropy, steps=60)
    assert last < 0.1 * first, (first, last)


# ------------------------------------------------------------------------------------------ KV cache


def test_kv_cache_logits_match_full_recomputation():
    model = tiny_lm().eval()
    seq = torch.randint(0, 32, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(seq).logits
        cache = model.new_cache(batch_size=2)
        chunks = [(0, 5), (5, 8), (8, 9), (9, 10), (10, 12)]  # prefill, a second prefill, decodes
        for start, end in chunks:
            step = model(seq[:, start:end], cache).logits
            torch.testing.assert_close(step, full[:, start:end], atol=1e-5, rtol=0)
        assert cache.pos == 12


def test_cached_greedy_generation_equals_recomputation():
    model = tiny_lm().eval()
    prompt = torch.randint(0, 32, (2, 5), generator=torch.Generator().manual_seed(3))
    cached = model.generate(prompt, 8, temperature=0)
    plain = model.generate(prompt, 8, temperature=0, use_cache=False)
    assert cached.shape == (2, 13)
    assert torch.equal(cached[:, :5], prompt)
    assert torch.equal(cached, plain)
    # each generated token is the argmax of a full forward over its prefix
    with torch.no_grad():
        logits = model(cached[:, :-1]).logits
    assert torch.equal(cached[:, 5:], logits[:, 4:].argmax(-1))


def test_generation_past_max_seq_len():
    model = tiny_lm().eval()  # max_seq_len 24
    prompt = torch.randint(0, 32, (1, 20))
    with pytest.raises(ValueError, match="max_seq_len \\(24\\)"):
        model.generate(prompt, 10)
    assert model.generate(prompt, 10, temperature=0, use_cache=False).shape == (1, 30)  # context cropped


# ------------------------------------------------------------------------------------------ sampling


def test_sampling_is_deterministic_with_a_generator():
    model = tiny_lm().eval()
    prompt = torch.randint(0, 32, (3, 4))
    a = model.generate(prompt, 6, temperature=1.0, generator=torch.Generator().manual_seed(7))
    b = model.generate(prompt, 6, temperature=1.0, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


@pytest.mark.parametrize("kw", [dict(top_k=1), dict(top_p=1e-6), dict(top_k=5, top_p=1e-6)])
def test_top_k_one_and_tiny_top_p_are_greedy(kw):
    model = tiny_lm().eval()
    prompt = torch.randint(0, 32, (3, 4))
    greedy = model.generate(prompt, 6, temperature=0)
    sampled = model.generate(prompt, 6, temperature=1.5, generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(sampled, greedy)


def test_top_p_keeps_the_smallest_set_reaching_p():
    from dualroute.models.lm import _nucleus

    probs = torch.tensor([[0.1, 0.5, 0.3, 0.1]])
    assert _nucleus(probs.log(), 0.75).isfinite().tolist() == [[False, True, True, False]]  # 0.5 + 0.3
    assert _nucleus(probs.log(), 0.5).isfinite().tolist() == [[False, True, False, False]]
    assert _nucleus(probs.log(), 0.85).isfinite().sum() == 3


# ------------------------------------------------------------------------------------------ counting


@pytest.mark.parametrize("shared", [dict(), dict(num_shared_experts=1), dict(num_shared_experts=1, shared_hidden=24)])
def test_dense_twin_matches_active_params_up_to_router(shared):
    cfg = tiny_lm_cfg(moe=moe_cfg(32, **shared))
    moe_model, twin = TransformerLM(cfg), TransformerLM(dense_twin(cfg))
    total, active = param_counts(moe_model)
    twin_total, twin_active = param_counts(twin)
    router = sum(p.numel() for m in moe_model.modules() if isinstance(m, MoELayer) for p in m.router.parameters())
    experts = sum(p.numel() for m in moe_model.modules() if isinstance(m, MoELayer) for p in m.experts.parameters())
    assert total - active == experts // 4 * 2  # E - K = 2 of 4 experts unused
    assert twin_total == twin_active
    assert active - twin_active == router
    # FLOPs: same matmuls per token, except the router; attention identical
    assert flops_per_token(moe_model) - flops_per_token(twin) == 2 * router


def test_dense_flops_convention():
    cfg = LMConfig(vocab_size=32, dim=32, n_layers=2, n_heads=2, max_seq_len=16, ffn_hidden=48)
    model = TransformerLM(cfg)
    total, active = param_counts(model)
    assert total == active
    norms = (2 * cfg.n_layers + 1) * cfg.dim
    matmul = total - norms  # tied: the embedding table is the head's matmul weight, counted once
    assert flops_per_token(model, seq_len=16) == 2 * matmul + 2 * 2 * cfg.n_layers * 16 * cfg.dim
    untied = TransformerLM(LMConfig(**{**cfg.__dict__, "tie_embeddings": False}))
    assert param_counts(untied)[0] == total + 32 * 32
    assert flops_per_token(untied, 16) == flops_per_token(model, 16)  # lookups are not FLOPs


def test_vit_dense_twin_params():
    cfg = ImageConfig(dim=32, n_heads=2, moe=moe_cfg(32))  # learned group router
    moe_active = param_counts(ViTClassifier(cfg))[1]
    twin_active = param_counts(ViTClassifier(dense_twin(cfg)))[1]
    router = cfg.n_layers * (32 * 4 + 4 + 32 * 2 + 2)  # expert gate + group gate, with biases
    assert moe_active - twin_active == router
    assert dense_twin(ViTClassifier(ImageConfig()).cfg) == ImageConfig()  # already dense


# ------------------------------------------------------------------------------------------ errors


def test_config_errors():
    with pytest.raises(ValueError, match=r"moe.dim \(16\).*model dim \(32\)"):
        tiny_lm_cfg(moe=moe_cfg(16))
    with pytest.raises(ValueError, match=r"dim \(30\).*n_heads \(4\)"):
        LMConfig(dim=30, n_heads=4)
    with pytest.raises(ValueError, match="must be even"):
        LMConfig(dim=12, n_heads=4)
    with pytest.raises(ValueError, match="dense_first"):
        LMConfig(n_layers=2, dense_first=3)
    with pytest.raises(ValueError, match="vocab_size must be a positive int, got 0"):
        LMConfig(vocab_size=0)
    with pytest.raises(ValueError, match="dropout"):
        LMConfig(dropout=1.0)
    with pytest.raises(ValueError, match=r"image_size \(28\).*patch_size \(3\)"):
        ImageConfig(image_size=28, patch_size=3)
    with pytest.raises(TypeError):
        dense_twin(moe_cfg(32))


def test_lm_input_errors():
    model = tiny_lm()
    with pytest.raises(TypeError, match="integer"):
        model(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"\(B, S\)"):
        model(torch.zeros(6, dtype=torch.long))
    with pytest.raises(ValueError, match="max 32"):
        model(torch.tensor([[1, 32]]))
    with pytest.raises(ValueError, match="min -1"):
        model(torch.tensor([[-1, 3]]))
    with pytest.raises(ValueError, match=r"25.*max_seq_len \(24\)"):
        model(torch.zeros(1, 25, dtype=torch.long))
    cache = model.new_cache(batch_size=1)
    model(torch.zeros(1, 20, dtype=torch.long), cache)
    with pytest.raises(ValueError, match=r"20 cached \+ 5 new.*max_seq_len \(24\)"):
        model(torch.zeros(1, 5, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="batch size"):
        model(torch.zeros(2, 1, dtype=torch.long), cache)
    assert isinstance(cache, KVCache)


@pytest.mark.parametrize("kw,match", [
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(temperature=-0.5), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=0), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
])
def test_generate_argument_errors(kw, match):
    model = tiny_lm()
    args = {"max_new_tokens": 2, **kw}
    with pytest.raises(ValueError, match=match):
        model.generate(torch.zeros(1, 2, dtype=torch.long), **args)


def test_vit_input_errors():
    model = ViTClassifier(ImageConfig())
    with pytest.raises(ValueError, match=r"\(B, 1, 8, 8\).*\(2, 3, 8, 8\)"):
        model(torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"\(8, 8\)"):
        model(torch.randn(8, 8))
    with pytest.raises(TypeError, match="floating-point"):
        model(torch.zeros(2, 1, 8, 8, dtype=torch.uint8))


# ------------------------------------------------------------------------------------------ NaN checks
# On a GPU the routers' NaN/Inf checks inside a model share one host read at the end of the forward pass
# (routing.deferred_finite_checks). The CPU checks at once; emptying IMMEDIATE_CHECK_DEVICE_TYPES runs
# the deferred path here.


@pytest.fixture
def deferred_on_cpu(monkeypatch):
    monkeypatch.setattr(routing, "IMMEDIATE_CHECK_DEVICE_TYPES", ())


def _poison_router(layer: MoELayer) -> None:
    with torch.no_grad():
        layer.router.gate.weight[0, 0] = float("nan")


@pytest.mark.parametrize("deferred", [False, True], ids=["cpu_immediate", "deferred"])
def test_lm_with_a_nan_router_raises(request, deferred):
    if deferred:
        request.getfixturevalue("deferred_on_cpu")
    model = tiny_lm()  # MoE on blocks 1 and 3
    _poison_router(model.blocks[3].ffn)
    want = "MoE layer run 2nd in this forward pass contain NaN or Inf" if deferred else "router logits contain NaN"
    with pytest.raises(ValueError, match=want):
        model(torch.randint(0, 32, (2, 5)))
    assert getattr(routing._pending, "flags", None) is None  # the context cleaned up after itself


def test_deferred_router_check_waits_for_the_end_of_the_context(deferred_on_cpu):
    layer = MoELayer(moe_cfg(8))
    _poison_router(layer)
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match="MoE layer run 1st"):
        with deferred_finite_checks():
            layer(x)  # no raise here: the flag stays on the device
            reached = True
    assert reached
    with pytest.raises(ValueError, match="router logits contain NaN"):  # outside a context: at once
        layer(x)


def test_deferred_checks_nest_and_an_error_inside_wins(deferred_on_cpu):
    bad, good = MoELayer(moe_cfg(8)), MoELayer(moe_cfg(8))
    _poison_router(bad)
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match="run 2nd"):
        with deferred_finite_checks():
            good(x)
            with pytest.raises(ValueError, match="run 1st"):  # the inner context holds only its own layers
                with deferred_finite_checks():
                    bad(x)
            bad(x)
    with pytest.raises(KeyError):  # an exception from the body is not replaced by the check
        with deferred_finite_checks():
            bad(x)
            raise KeyError("body")
    assert getattr(routing._pending, "flags", None) is None


def test_vit_with_a_nan_router_raises(deferred_on_cpu):
    cfg = ImageConfig(image_size=8, channels=1, patch_size=2, dim=32, n_layers=3, n_heads=2, ffn_hidden=48,
                      moe=moe_cfg(32), moe_every=2)
    model = ViTClassifier(cfg)
    _poison_router(model.blocks[0].ffn)
    with pytest.raises(ValueError, match="MoE layer run 1st"):
        model(torch.randn(2, 1, 8, 8))
