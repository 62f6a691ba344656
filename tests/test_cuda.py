"""GPU checks: the fast paths on CUDA against the plain references, in float32 and bfloat16.

* ``MoELayer`` (flat, dual learned, group-limited derived, expert choice; empty experts; rows that
  are and are not 16-byte aligned) on CUDA == the reference computed on the CPU in float64 from the
  very same weights, on the output and on the gradient of the input and of every parameter;
* ``grouped_mm`` on CUDA == ``segment_mm`` == a float64 loop, and the fused kernel really runs for
  bfloat16 on compute capability >= 9.0 (Hopper);
* the language model on CUDA == the same model on the CPU; AdamW lowers its loss; cached greedy
  generation == recomputation; the trainer runs on CUDA (float32 and bfloat16), checkpoints and
  resumes; a transformers Mixtral on CUDA == dualroute's load of it on CUDA.

Skipped without CUDA. ``DUALROUTE_TEST_DEVICE=cpu`` runs them on the CPU instead, to check the tests
themselves on a machine without a GPU (the CUDA-only checks still skip).

Shapes: T tokens, D model dim, E experts, K experts per token, N routed rows, F output dim.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

from conftest import make_layer
from dualroute import experts
from dualroute.experts import grouped_mm, segment_mm
from dualroute.expert_choice import expert_choice_capacity
from dualroute.layer import MoELayer
from dualroute.reference import reference_forward
from dualroute.routing import RouterOptions

DEVICE = torch.device(os.environ.get("DUALROUTE_TEST_DEVICE", "cuda"))
ON_CUDA = DEVICE.type == "cuda"

pytestmark = [
    pytest.mark.skipif(ON_CUDA and not torch.cuda.is_available(),
                       reason=f"needs a CUDA device (torch {torch.__version__} sees none); "
                              "DUALROUTE_TEST_DEVICE=cpu runs these on the CPU"),
    pytest.mark.usefixtures("one_thread"),  # the host side of tiny models gains nothing from more threads
]

# atol = REL_TOL * the largest magnitude of the reference tensor, at least 1 (inputs and weights are O(1), and
# some gradients are zero up to cancellation, e.g. a group gate's when every kept expert shares one group),
# rtol = REL_TOL. The reference is float64: a float32 fast path differs by rounding, a bfloat16 one by the
# bfloat16 rounding of every product.
REL_TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


def assert_close_to_reference(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    tol = REL_TOL[dtype]
    scale = want.abs().max().item() if want.numel() else 0.0
    torch.testing.assert_close(got.detach().cpu().double(), want.detach().double(), atol=tol * max(scale, 1.0),
                               rtol=tol, msg=lambda m: f"{what}: {m}")


def output_and_grads(module: torch.nn.Module, x: torch.Tensor, cotangent: torch.Tensor,
                     fn) -> tuple[torch.Tensor, dict]:
    """``fn(x)`` and the gradients of ``<fn(x), cotangent>`` w.r.t. ``x`` and every parameter (None if unused).

    Like conftest's helper, with the cotangent passed in, so both devices and dtypes backprop the same numbers."""
    x = x.detach().clone().requires_grad_(True)
    y = fn(x)
    params = dict(module.named_parameters())
    grads = torch.autograd.grad(y, [x, *params.values()], cotangent.to(y.device, y.dtype), allow_unused=True)
    return y.detach(), dict(zip(["input", *params], grads))


def check_layer_on_device(layer: MoELayer, T: int, dtype: torch.dtype, reference=reference_forward) -> None:
    """``layer`` (CPU, any dtype) moved to DEVICE in ``dtype`` == ``reference`` run on the CPU in float64 on the
    same (``dtype``-rounded) weights and input, on the output and on every gradient."""
    fast = copy.deepcopy(layer).to(DEVICE, dtype)
    slow = copy.deepcopy(fast).to("cpu", torch.float64)  # the rounded weights, exactly
    gen = torch.Generator().manual_seed(T)
    x = torch.randn(T, layer.cfg.dim, generator=gen).to(dtype)
    cotangent = torch.randn(T, layer.experts.cfg.output_dim, generator=gen).to(dtype)
    y, grads = output_and_grads(fast, x.to(DEVICE), cotangent, lambda x: fast(x)[0])
    y_ref, grads_ref = output_and_grads(slow, x.double(), cotangent, lambda x: reference(slow, x))
    assert y.device.type == DEVICE.type and y.dtype == dtype
    assert_close_to_reference(y, y_ref, dtype, "output")
    assert grads.keys() == grads_ref.keys()
    for name, want in grads_ref.items():
        got = grads[name]
        if got is None or want is None:
            other = want if got is None else got
            assert other is None or torch.count_nonzero(other) == 0, f"grad of {name}: unused on one side only"
            continue
        assert got.device.type == DEVICE.type, name
        assert_close_to_reference(got, want, dtype, f"grad of {name}")


def routed_layer(E: int = 8, K: int = 2, G: int = 1, J: int = 1, dim: int = 8, hidden: int = 16, seed: int = 0,
                 **cfg) -> MoELayer:
    return make_layer(dim=dim, hidden=hidden, seed=seed, dtype=torch.float32, num_experts=E, experts_per_token=K,
                      num_groups=G, groups_per_token=J, **cfg)


LAYERS = {
    "flat-E8K2-swiglu": lambda **kw: routed_layer(8, 2, **kw),
    "dual-learned-G4J2-E8K3-mlp-shared": lambda **kw: routed_layer(
        8, 3, 4, 2, expert_kind="mlp", num_shared_experts=1, shared_gate=True, **kw),
    "derived-G4J2-E8K3-sigmoid-cbias": lambda **kw: routed_layer(
        8, 3, 4, 2, router=RouterOptions(group_router="derived", score_func="sigmoid", correction_bias=True,
                                         scaling_factor=2.5), **kw),
    "dual-learned-G2J1-E8K2-linear-ebias": lambda **kw: routed_layer(
        8, 2, 2, 1, expert_kind="linear", expert_bias=True, **kw),
}
# (T, D, hidden): T = 13 is no multiple of 8; D = 8, hidden = 16 give 16-byte aligned rows in float32 and
# bfloat16 (torch._grouped_mm can run); D = 6, hidden = 5 do not (the segment loop runs).
SIZES = {"aligned": (13, 8, 16), "unaligned": (13, 6, 5), "one-token": (1, 8, 16)}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("size", SIZES.values(), ids=SIZES.keys())
@pytest.mark.parametrize("build", LAYERS.values(), ids=LAYERS.keys())
def test_layer_matches_reference(build, size, dtype):
    T, D, hidden = size
    check_layer_on_device(build(dim=D, hidden=hidden), T, dtype)


@pytest.mark.parametrize("T,n,k", [(7, 8, 2), (2048, 8, 2), (300, 64, 8)])  # the sort and the int64-key paths
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_top_indices_ties_on_the_device(T, n, k, dtype):
    """Among equal scores the lowest index wins on the device too (torch.topk promises no tie order)."""
    from dualroute.routing import top_indices
    values = torch.tensor([float("-inf"), -1.0, -0.0, 0.0, 0.5, 1.0], dtype=dtype)
    scores = values[torch.randint(len(values), (T, n), generator=torch.Generator().manual_seed(T))]
    want = [sorted(range(n), key=lambda i: -row[i])[:k] for row in scores.tolist()]
    assert top_indices(scores.to(DEVICE), k).cpu().tolist() == want


@pytest.mark.parametrize("build", [LAYERS["dual-learned-G4J2-E8K3-mlp-shared"], LAYERS["derived-G4J2-E8K3-sigmoid-cbias"]],
                         ids=["learned", "derived"])
def test_zeroed_router_ties_and_capacity_on_the_device(build):
    """Every score equal: groups 0..J-1 and experts 0..K-1 for each token, the later tokens dropped over capacity,
    and the output and gradients of the reference (which follows the same rules)."""
    layer = build(capacity_factor=0.5, group_capacity_factor=0.75).train()
    with torch.no_grad():
        for p in layer.router.parameters():
            p.zero_()
        for buf in layer.router.buffers():
            buf.zero_()
    T, (J, K) = 1024, (layer.cfg.groups_per_token, layer.cfg.experts_per_token)
    on_device = copy.deepcopy(layer).to(DEVICE)
    _, aux = on_device(torch.randn(T, layer.cfg.dim, device=DEVICE))
    assert aux.routing.group_ids_TJ.cpu().tolist() == [list(range(J))] * T
    assert aux.routing.expert_ids_TK.cpu().tolist() == [list(range(K))] * T
    _, aux_cpu = layer(torch.randn(T, layer.cfg.dim))
    assert torch.equal(aux.dropped_per_expert_E.cpu(), aux_cpu.dropped_per_expert_E)
    check_layer_on_device(layer, 40, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_layer_with_empty_experts(dtype):
    """Experts 1 and 6 can never win (router bias -1000): no rows, exactly zero gradient, the rest as the reference."""
    layer = routed_layer(8, 2, expert_bias=True)
    with torch.no_grad():
        layer.router.gate.bias[[1, 6]] = -1e3
    _, aux = copy.deepcopy(layer).to(DEVICE, dtype)(torch.randn(13, 8).to(DEVICE, dtype))
    assert aux.tokens_per_expert_E[[1, 6]].tolist() == [0, 0] and int(aux.tokens_per_expert_E.sum()) == 26
    check_layer_on_device(layer, 13, dtype)
    on_device = copy.deepcopy(layer).to(DEVICE, dtype)
    on_device(torch.randn(13, 8).to(DEVICE, dtype))[0].float().pow(2).sum().backward()
    for name, p in on_device.experts.named_parameters():
        assert p.grad[[1, 6]].eq(0).all(), f"an empty expert got a {name} gradient"


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("E,K,factor", [(4, 2, None), (8, 2, 0.5)])
def test_expert_choice_matches_reference(E, K, factor, dtype):
    from test_variants import reference_expert_choice

    T = 13
    layer = routed_layer(E, K, capacity_factor=factor, routing_mode="expert_choice", expert_bias=True)
    capacity = expert_choice_capacity(T, K, E, factor)
    check_layer_on_device(layer, T, dtype, lambda m, x: reference_expert_choice(m, x, capacity))


def test_layer_under_autocast_matches_float32():
    """Float32 weights under bfloat16 autocast (mixed-precision training) == the float32 layer, loosely."""
    layer = routed_layer(8, 2, 4, 2, num_shared_experts=1).to(DEVICE)
    x = torch.randn(13, 8).to(DEVICE)
    want, _ = layer(x)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        got, aux = layer(x)
    assert got.dtype == torch.bfloat16 and aux.routing.weights_TK.dtype == torch.float32
    assert_close_to_reference(got.float(), want.double().cpu(), torch.bfloat16, "autocast output")
    got.float().pow(2).sum().backward()
    assert all(p.grad.dtype == torch.float32 and p.grad.isfinite().all() for p in layer.parameters())


# --------------------------------------------------------------------------------- grouped matmul


def loop_mm(x_ND: torch.Tensor, w_EDF: torch.Tensor, counts_E: list[int]) -> torch.Tensor:
    """Each row times its own expert's matrix, in float64 on the CPU."""
    expert_N = torch.repeat_interleave(torch.arange(len(counts_E)), torch.tensor(counts_E))
    return torch.stack([x_ND[n].double().cpu() @ w_EDF[e].double().cpu() for n, e in enumerate(expert_N.tolist())])


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("out_major", [True, False], ids=["out-major", "in-major"])
@pytest.mark.parametrize("counts", [[3, 0, 5, 0, 8], [16, 0, 0, 0, 1], [1, 1, 1, 1, 9]], ids=str)
def test_grouped_mm_matches_segment_mm(counts, out_major, dtype):
    E, N, D, F = len(counts), sum(counts), 16, 24
    gen = torch.Generator().manual_seed(N)
    x_ND = torch.randn(N, D, generator=gen).to(DEVICE, dtype).requires_grad_(True)
    w = torch.randn(E, F, D, generator=gen).transpose(1, 2) if out_major else torch.randn(E, D, F, generator=gen)
    w_EDF = w.to(DEVICE, dtype).requires_grad_(True)  # .to keeps the (E, out, in) memory layout of experts
    assert w_EDF.is_contiguous() != out_major
    counts_E = torch.tensor(counts, device=DEVICE)
    cotangent = torch.randn(N, F, generator=gen).to(DEVICE, dtype)
    results = {}
    for name, run in (("grouped", grouped_mm), ("segment", segment_mm)):
        y = run(x_ND, w_EDF, counts_E)
        results[name] = (y, *torch.autograd.grad(y, [x_ND, w_EDF], cotangent))
    want_y = loop_mm(x_ND, w_EDF, counts)
    for name, (y, grad_x, grad_w) in results.items():
        assert y.dtype == dtype and y.device.type == DEVICE.type
        assert_close_to_reference(y, want_y, dtype, f"{name} output")
        torch.testing.assert_close(y, results["segment"][0], atol=REL_TOL[dtype] * want_y.abs().max().item(),
                                   rtol=REL_TOL[dtype])
        assert_close_to_reference(grad_x, results["segment"][1].double().cpu(), dtype, f"{name} input grad")
        assert_close_to_reference(grad_w, results["segment"][2].double().cpu(), dtype, f"{name} weight grad")
        assert grad_w[torch.tensor(counts) == 0].eq(0).all(), f"{name}: an expert without rows got a gradient"


@pytest.mark.skipif(not ON_CUDA or not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                    reason="the fused grouped GEMM is required on CUDA compute capability >= 9.0 only")
def test_fused_grouped_mm_runs_for_bfloat16_on_hopper(monkeypatch):
    """On sm90+ bfloat16 torch._grouped_mm must be usable, and an aligned layer must not fall back to the loop."""
    assert experts._grouped_mm_works(DEVICE, torch.bfloat16), "torch._grouped_mm probe failed for bfloat16"

    def no_loop(*args):
        raise AssertionError("fell back to the segment loop")

    layer = routed_layer(8, 2).to(DEVICE, torch.bfloat16)
    x = torch.randn(64, 8).to(DEVICE, torch.bfloat16).requires_grad_(True)
    monkeypatch.setattr(experts, "segment_mm", no_loop)
    layer(x)[0].float().pow(2).sum().backward()
    assert x.grad.isfinite().all() and layer.experts.w13.grad.isfinite().all()


@pytest.mark.skipif(not ON_CUDA, reason="the padded expert path is chosen on CUDA only")
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_padded_experts_on_cuda(monkeypatch, dtype):
    """float32 (no fused grouped kernel) runs the experts as one padded bmm per matmul; bfloat16 on sm90+
    keeps torch._grouped_mm. Either way: the loop's output and gradients."""
    calls = []
    real = experts._BatchedMM.apply
    monkeypatch.setattr(experts._BatchedMM, "apply", lambda *a: calls.append(1) or real(*a))
    ex = experts.Experts(experts.ExpertConfig(dim=16, hidden=24, num_experts=4, bias=True)).to(DEVICE, dtype)
    counts = [5, 6, 6, 5]
    gen = torch.Generator().manual_seed(0)
    x_ND = torch.randn(sum(counts), 16, generator=gen).to(DEVICE, dtype).requires_grad_(True)
    counts_E = torch.tensor(counts, device=DEVICE)
    cotangent = torch.randn(sum(counts), 16, generator=gen).to(DEVICE, dtype)
    params = [x_ND, *ex.parameters()]
    y = ex(x_ND, counts_E)
    got = torch.autograd.grad(y, params, cotangent)
    fused = experts.has_fused_grouped_mm(DEVICE, dtype)
    assert len(calls) == (0 if fused else 2)
    pieces, start = [], 0
    for e, n in enumerate(counts):
        pieces.append(ex.forward_one(e, x_ND[start : start + n]))
        start += n
    want_y = torch.cat(pieces)
    want = torch.autograd.grad(want_y, params, cotangent)
    assert_close_to_reference(y, want_y.double().cpu(), dtype, "output")
    for name, g, w in zip(["x", *dict(ex.named_parameters())], got, want):
        assert_close_to_reference(g, w.double().cpu(), dtype, f"grad {name}")


# ------------------------------------------------------------------------------------ language model


def test_lm_logits_match_the_cpu():
    from test_models import tiny_lm

    model = tiny_lm().eval()
    idx = torch.randint(0, 32, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model(idx).logits
        got = copy.deepcopy(model).to(DEVICE)(idx.to(DEVICE)).logits
    assert got.device.type == DEVICE.type
    torch.testing.assert_close(got.cpu(), want, atol=1e-4, rtol=0)


def test_lm_adamw_steps_lower_the_loss():
    from test_models import tiny_lm

    model = tiny_lm(n_layers=2, dense_first=0, moe_every=1).to(DEVICE)
    tokens = torch.randint(0, 32, (4, 17), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        out = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss = loss + sum(a.loss for a in out.aux)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert min(losses[-5:]) < 0.8 * losses[0], losses


def test_lm_bfloat16_autocast_forward_is_close_to_float32():
    from test_models import tiny_lm

    model = tiny_lm().to(DEVICE).eval()
    idx = torch.randint(0, 32, (2, 12), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    with torch.no_grad():
        want = model(idx).logits
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            got = model(idx).logits.float()
    assert got.isfinite().all()
    assert (got - want).abs().mean() < 0.05 * want.abs().mean()


def test_lm_cached_greedy_generation_equals_recomputation():
    from test_models import tiny_lm

    model = tiny_lm().to(DEVICE).eval()
    prompt = torch.randint(0, 32, (2, 5), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    cached = model.generate(prompt, 8, temperature=0)
    plain = model.generate(prompt, 8, temperature=0, use_cache=False)
    assert cached.device.type == DEVICE.type and cached.shape == (2, 13)
    assert torch.equal(cached, plain)
    with torch.no_grad():
        logits = model(cached[:, :-1]).logits
    assert torch.equal(cached[:, 5:], logits[:, 4:].argmax(-1))



@pytest.mark.skipif(not ON_CUDA, reason="CUDA-only: on the CPU the routers check at once, a host read there costs nothing")
def test_routers_inside_a_model_do_not_synchronise_and_a_nan_still_raises():
    """Inside ``deferred_finite_checks`` a router's NaN check stays on the device (no host read per layer); the
    one read at the end of the context still raises for a NaN router."""
    from dualroute.routing import deferred_finite_checks

    layer = routed_layer(8, 2).to(DEVICE)
    x = torch.randn(16, 8, device=DEVICE)
    torch.cuda.synchronize()
    with deferred_finite_checks():
        torch.cuda.set_sync_debug_mode("error")
        try:
            layer.router(x)
            layer.router(x)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.set_sync_debug_mode("error")
    try:  # outside the context the check reads the sum back at once
        with pytest.raises(RuntimeError, match="synchroniz"):
            layer.router(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    bad = routed_layer(8, 2, seed=1).to(DEVICE)
    with torch.no_grad():
        bad.router.gate.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="MoE layer run 2nd"):
        with deferred_finite_checks():
            layer.router(x)
            bad.router(x)


# ------------------------------------------------------------------------------------------ trainer


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_trainer_runs_checkpoints_and_resumes(tmp_path, monkeypatch, precision):
    """4 straight steps == 2 steps, a crash, and a resume for 2 more, on DEVICE (to rounding: CUDA's
    scatter-adds are not bit-reproducible, and bfloat16 forward passes round those differences coarsely)."""
    from test_trainer import crash_before_step_3, tiny_lm as tiny_run, train_losses

    from dualroute.train import checkpoint as ckpt
    from dualroute.train.trainer import train

    extra = ("train.steps=4", "train.save_every=2", "train.eval_every=3", "model.dropout=0.1",
             f"train.device={DEVICE.type}", f"train.precision={precision}")
    rtol, atol = (1e-4, 1e-5) if precision == "float32" else (2e-2, 1e-3)
    summary = train(tiny_run(tmp_path / "straight", *extra), progress=False)
    assert summary.steps == 4 and torch.isfinite(torch.tensor(summary.metrics["val_loss"]))

    def on_device(trainer):
        assert next(trainer.model.parameters()).device.type == DEVICE.type

    crash_before_step_3(tmp_path / "resumed", extra, monkeypatch, on_step=on_device)
    assert ckpt.latest_checkpoint(tmp_path / "resumed") == tmp_path / "resumed" / "ckpt-00000002"
    assert train(tiny_run(tmp_path / "resumed", *extra), resume=True, progress=False).steps == 4

    straight, resumed = train_losses(tmp_path / "straight"), train_losses(tmp_path / "resumed")
    assert sorted(resumed) == [1, 2, 3, 4]
    for s, loss in straight.items():
        assert resumed[s] == pytest.approx(loss, rel=rtol, abs=atol), s
    a = ckpt.load_checkpoint(tmp_path / "straight" / "ckpt-00000004").model_state
    b = ckpt.load_checkpoint(tmp_path / "resumed" / "ckpt-00000004").model_state
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


# -------------------------------------------------------------------------------------- HF interop


def test_hf_mixtral_logits_match_transformers_on_device(tmp_path):
    transformers = pytest.importorskip(
        "transformers", reason='HF interop tests need transformers: pip install "dualroute[hf]"')
    from test_hf import hf_config, randomise, tokens

    from dualroute.interop import load_hf, swap_moe_blocks

    torch.manual_seed(0)
    hf = randomise(transformers.AutoModelForCausalLM.from_config(hf_config("mixtral")))
    hf.save_pretrained(tmp_path)
    if hasattr(hf, "set_experts_implementation"):  # transformers 5: the plain loop over experts as the reference
        hf.set_experts_implementation("eager")
    hf = hf.to(DEVICE)
    ours = load_hf(tmp_path, device=DEVICE)
    assert next(ours.parameters()).device.type == DEVICE.type
    idx = tokens().to(DEVICE)
    with torch.no_grad():
        want = hf(idx).logits.float()
        got = ours(idx).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert swap_moe_blocks(hf)  # the drop-in swap on a CUDA model: same logits
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits.float(), want, atol=1e-4, rtol=0)
