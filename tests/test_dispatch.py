"""Dispatch plan, the dispatch/combine autograd pair, and the grouped matmul.

Shapes: T tokens, K experts per token, N = T*K routed rows, D model dim, F output dim, E experts.
"""

import pytest
import torch

from conftest import TOL, assert_same_grads, fast, make_layer, output_and_grads, random_input
from dualroute.dispatch import combine, dispatch, expert_capacity, plan_dispatch
from dualroute import experts
from dualroute.experts import ExpertConfig, Experts, grouped_mm, segment_mm
from dualroute.reference import reference_forward


def random_ids(T: int, K: int, E: int, seed: int = 0, used: int | None = None) -> torch.Tensor:
    """K distinct experts per token, drawn from the first ``used`` experts (the rest get nothing)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(T, used or E, generator=gen).topk(K, dim=-1).indices


def random_weights(T: int, K: int, seed: int = 1, dtype=torch.float64) -> torch.Tensor:
    return torch.rand(T, K, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ------------------------------------------------------------------------------------- plan


@pytest.mark.parametrize("T,K,E,used", [(7, 1, 4, 4), (9, 2, 8, 5), (5, 3, 3, 3), (1, 2, 6, 2), (0, 2, 4, 4)])
def test_plan_sorts_rows_by_expert(T, K, E, used):
    ids_TK = random_ids(T, K, E, used=used)
    plan = plan_dispatch(ids_TK, random_weights(T, K), E)
    ids_N = ids_TK.reshape(-1)
    N = T * K
    # Rows grouped by expert; inside an expert, flat (token, slot) order is kept (a stable sort).
    sorted_ids_N = ids_N[plan.order_N]
    assert torch.equal(sorted_ids_N, ids_N.sort(stable=True).values)
    for e in range(E):
        rows = plan.order_N[sorted_ids_N == e]
        assert torch.equal(rows, rows.sort().values)
    assert torch.equal(plan.order_N[plan.inverse_N], torch.arange(N))
    assert torch.equal(plan.inverse_N[plan.order_N], torch.arange(N))
    assert torch.equal(plan.counts_E, torch.bincount(ids_N, minlength=E))
    assert plan.dropped_E.eq(0).all()
    assert torch.equal(plan.token_N, plan.order_N // K)
    assert (plan.num_tokens, plan.top_k, plan.num_rows) == (T, K, N)


def test_expert_capacity():
    # (T, K, E, factor): ceil(factor * T * K / E)
    assert expert_capacity(8, 2, 4, 1.0) == 4
    assert expert_capacity(8, 2, 4, 1.25) == 5
    assert expert_capacity(5, 1, 2, 1.0) == 3  # ceil(2.5)
    assert expert_capacity(0, 2, 4, 2.0) == 0


def test_capacity_hand_case():
    # Expert 0 is asked for by tokens 0..3 with weights .2 .9 .5 .7; capacity 2 keeps tokens 1 and 3.
    ids_TK = torch.tensor([[0], [0], [0], [0], [1]])
    weights_TK = torch.tensor([[0.2], [0.9], [0.5], [0.7], [0.1]])
    plan = plan_dispatch(ids_TK, weights_TK, num_experts=3, capacity=2)
    assert plan.counts_E.tolist() == [2, 1, 0]
    assert plan.dropped_E.tolist() == [2, 0, 0]
    assert set(plan.order_N[:2].tolist()) == {1, 3}  # expert 0's kept rows, then expert 1's
    assert plan.order_N[2].item() == 4
    assert set(plan.order_N[3:].tolist()) == {0, 2}  # dropped rows last


@pytest.mark.parametrize("capacity", [0, 1, 2, 3, 100])
def test_capacity_keeps_heaviest_rows(capacity):
    T, K, E = 12, 2, 4
    ids_TK, weights_TK = random_ids(T, K, E, used=3), random_weights(T, K)
    plan = plan_dispatch(ids_TK, weights_TK, E, capacity)
    ids_N, weights_N = ids_TK.reshape(-1), weights_TK.reshape(-1)
    total_E = torch.bincount(ids_N, minlength=E)
    assert (plan.counts_E <= capacity).all()
    assert torch.equal(plan.counts_E + plan.dropped_E, total_E)
    assert torch.equal(plan.order_N[plan.inverse_N], torch.arange(T * K))
    kept = plan.order_N[: int(plan.counts_E.sum())]
    assert torch.equal(ids_N[kept], ids_N[kept].sort(stable=True).values)  # kept rows still expert-sorted
    for e in range(E):
        heaviest = weights_N[ids_N == e].sort(descending=True).values[:capacity]
        torch.testing.assert_close(weights_N[kept][ids_N[kept] == e].sort(descending=True).values, heaviest)


# ---------------------------------------------------------------------- dispatch / combine gradients


def plan_for(T=4, K=2, E=3, capacity=None):
    weights_TK = random_weights(T, K).requires_grad_(True)
    return plan_dispatch(random_ids(T, K, E), weights_TK, E, capacity), weights_TK


def test_dispatch_gathers_token_rows():
    plan, _ = plan_for()
    x_TD = torch.randn(4, 3, dtype=torch.float64)
    assert torch.equal(dispatch(x_TD, plan), x_TD[plan.order_N // 2])


def test_dispatch_gradcheck():
    plan, _ = plan_for()
    x_TD = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: dispatch(x, plan), (x_TD,))


@pytest.mark.parametrize("capacity", [None, 2])
def test_combine_gradcheck(capacity):
    plan, weights_TK = plan_for(T=5, capacity=capacity)
    kept = plan.num_rows - int(plan.dropped_E.sum())
    y_ND = torch.randn(kept, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda y, w: combine(y, w, plan), (y_ND, weights_TK))


@pytest.mark.parametrize("K", [1, 2])
def test_combine_of_dispatch_is_weighted_sum(K):
    plan, weights_TK = plan_for(T=6, K=K, E=4)
    x_TD = torch.randn(6, 3, dtype=torch.float64)
    out_TD = combine(dispatch(x_TD, plan), weights_TK, plan)
    torch.testing.assert_close(out_TD, weights_TK.sum(-1, keepdim=True) * x_TD)


@pytest.mark.parametrize("K", [1, 2])
def test_no_tokens(K):
    plan = plan_dispatch(torch.zeros(0, K, dtype=torch.long), torch.zeros(0, K), num_experts=4)
    x_TD = torch.zeros(0, 3, requires_grad=True)
    x_ND = dispatch(x_TD, plan)
    assert x_ND.shape == (0, 3)
    out_TD = combine(x_ND, torch.zeros(0, K), plan)
    assert out_TD.shape == (0, 3)
    out_TD.sum().backward()
    assert x_TD.grad.shape == (0, 3)


def test_combine_treats_dropped_rows_as_zero():
    ids_TK = torch.tensor([[0], [0], [0]])
    weights_TK = torch.tensor([[0.5], [0.9], [0.1]], dtype=torch.float64)
    plan = plan_dispatch(ids_TK, weights_TK, num_experts=2, capacity=2)  # drops token 2
    value_by_row = torch.tensor([[1.0], [2.0], [3.0]], dtype=torch.float64)
    y_ND = value_by_row[plan.order_N[:2]]  # the expert outputs of the kept rows, in plan order
    assert combine(y_ND, weights_TK, plan).tolist() == [[0.5 * 1.0], [0.9 * 2.0], [0.0]]


# --------------------------------------------------------------------------------- grouped matmul


def loop_mm(x_ND, w_EDF, counts_E, b_EF=None):
    """The naive definition: each row times its own expert's matrix."""
    expert_N = torch.repeat_interleave(torch.arange(len(counts_E)), counts_E)
    rows = [x_ND[n] @ w_EDF[e] + (0 if b_EF is None else b_EF[e]) for n, e in enumerate(expert_N.tolist())]
    return torch.stack(rows) if rows else x_ND.new_zeros(0, w_EDF.shape[-1])


def loop_bias(b_EF, counts_E):
    return torch.repeat_interleave(b_EF, counts_E, dim=0)


COUNTS = [[3, 0, 5, 0, 1], [0, 0, 4, 0, 0], [1, 1, 1, 1, 1], [0, 2, 0, 0, 7]]


# float32 with 16-byte aligned rows takes torch._grouped_mm (where the probe accepts it);
# odd sizes and float64 take the segment loop.
SIZES = [(torch.float32, 8, 12), (torch.float32, 6, 7), (torch.float64, 6, 7)]


@pytest.mark.parametrize("dtype,D,F", SIZES, ids=str)
@pytest.mark.parametrize("counts", COUNTS, ids=str)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("out_major", [False, True], ids=["in_major", "out_major"])
def test_grouped_mm_matches_segment_and_loop(dtype, D, F, counts, bias, out_major):
    counts_E = torch.tensor(counts)
    N, E = sum(counts), len(counts)
    x_ND = torch.randn(N, D, dtype=dtype, requires_grad=True)
    w = torch.randn(E, F, D, dtype=dtype).transpose(1, 2) if out_major else torch.randn(E, D, F, dtype=dtype)
    w_EDF = w.requires_grad_(True)
    b_EF = torch.randn(E, F, dtype=dtype, requires_grad=True) if bias else None
    inputs = [t for t in (x_ND, w_EDF, b_EF) if t is not None]
    cotangent = torch.randn(N, F, dtype=dtype)
    runs = {
        "grouped": lambda: grouped_mm(x_ND, w_EDF, counts_E, b_EF),
        "segment": lambda: segment_mm(x_ND, w_EDF, counts_E) + (0 if b_EF is None else loop_bias(b_EF, counts_E)),
        "loop": lambda: loop_mm(x_ND, w_EDF, counts_E, b_EF),
    }
    results = {}
    for name, run in runs.items():
        y = run()
        results[name] = (y, torch.autograd.grad(y, inputs, cotangent))
    want_y, want_grads = results["loop"]
    for name in ("grouped", "segment"):
        y, grads = results[name]
        torch.testing.assert_close(y, want_y, atol=1e-5, rtol=1e-5)
        for got, want in zip(grads, want_grads):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        empty = counts_E == 0  # experts without rows get exactly zero gradient
        assert grads[1][empty].eq(0).all()
        if name == "segment":  # the weight gradient comes out in the weight's layout: no copy on accumulation
            assert grads[1].stride() == w_EDF.stride()
        if bias:
            assert grads[2][empty].eq(0).all()


def test_grouped_mm_fused_path_needs_no_loop(monkeypatch):
    if not experts._grouped_mm_works(torch.device("cpu"), torch.float32):
        pytest.skip("torch._grouped_mm is not usable for float32 on this CPU")

    def no_loop(*args):
        raise AssertionError("fell back to the segment loop")

    monkeypatch.setattr(experts, "segment_mm", no_loop)
    counts_E = torch.tensor([3, 0, 5])
    x_ND, w_EDF = torch.randn(8, 8), torch.randn(3, 8, 12)
    torch.testing.assert_close(grouped_mm(x_ND, w_EDF, counts_E), loop_mm(x_ND, w_EDF, counts_E))


def test_grouped_mm_probe_is_not_fooled_by_autocast(monkeypatch):
    """The fused-kernel probe runs once per (device, dtype) and its verdict is cached for the
    process. If it ran under autocast, the loop it compares against would come out in bfloat16,
    the comparison would fail, and the fast kernel would stay off for float32 from then on."""
    monkeypatch.setattr(experts, "_PROBED", {})
    verdict = experts._grouped_mm_works(torch.device("cpu"), torch.float32)
    monkeypatch.setattr(experts, "_PROBED", {})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        grouped_mm(torch.randn(4, 8), torch.randn(2, 8, 8), torch.tensor([1, 3]))
    assert experts._grouped_mm_works(torch.device("cpu"), torch.float32) == verdict


@pytest.mark.parametrize("kind", ["linear", "mlp", "swiglu"])
def test_expert_weights_are_stored_out_major(kind):
    ex = Experts(ExpertConfig(dim=8, hidden=16, num_experts=4, kind=kind))
    w = ex.first_weight()
    width = 32 if kind == "swiglu" else (8 if kind == "linear" else 16)
    assert w.shape == (4, 8, width) and w.stride() == (8 * width, 1, 8)  # shape (E, in, out), memory (E, out, in)
    dense = Experts(ExpertConfig(dim=8, hidden=16, num_experts=1, kind=kind)).first_weight()
    assert dense.shape == (1, 8, width) and dense.is_contiguous()  # a dense FFN keeps the plain layout
    copy = Experts(ExpertConfig(dim=8, hidden=16, num_experts=4, kind=kind))
    copy.load_state_dict(ex.state_dict())  # a plain load copies into the parameter: the layout stays
    assert copy.first_weight().stride() == w.stride() and torch.equal(copy.first_weight(), w)
    plain = {k: v.contiguous() for k, v in ex.state_dict().items()}  # (E, in, out) in memory, as a file holds it
    with torch.device("meta"):
        assigned = Experts(ExpertConfig(dim=8, hidden=16, num_experts=4, kind=kind))
    assigned.load_state_dict(plain, assign=True)  # takes the tensors themselves: the layout is put back
    for name, p in assigned.named_parameters():
        assert torch.equal(p, ex.get_parameter(name)) and p.stride() == ex.get_parameter(name).stride()
        assert p.requires_grad


def test_grouped_mm_no_rows():
    w_EDF = torch.randn(3, 4, 5, requires_grad=True)
    y = grouped_mm(torch.zeros(0, 4), w_EDF, torch.zeros(3, dtype=torch.long))
    assert y.shape == (0, 5)


def test_grouped_mm_dtype_mismatch():
    with pytest.raises(TypeError, match="float64"):
        grouped_mm(torch.zeros(2, 4, dtype=torch.float64), torch.zeros(1, 4, 5), torch.tensor([2]))


# ------------------------------------------------------------------------- padded batched path


def experts_by_loop(ex: Experts, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """The plain definition: each expert's ``forward_one`` on its own contiguous rows."""
    pieces, start = [], 0
    for e, n in enumerate(counts_E.tolist()):
        pieces.append(ex.forward_one(e, x_ND[start : start + n]))
        start += n
    return torch.cat(pieces)


def plain_layout(ex: Experts) -> None:
    """Parameters as a loader that assigned plain (E, in, out) tensors leaves them: gradients must follow."""
    for name, p in list(ex.named_parameters()):
        setattr(ex, name, torch.nn.Parameter(p.detach().contiguous()))


def check_against_the_loop(ex: Experts, x_ND: torch.Tensor, counts_E: torch.Tensor, run, dtype: torch.dtype):
    """``run(x_ND)`` and its gradients (input and every parameter) equal the plain loop's, each gradient in its
    parameter's own layout (no copy when it is accumulated); returns those gradients and the loop's output."""
    params = [x_ND, *ex.parameters()]
    y_NO = run(x_ND)
    cotangent = torch.randn_like(y_NO)
    got = torch.autograd.grad(y_NO, params, cotangent)
    want_y = experts_by_loop(ex, x_ND, counts_E)
    want = torch.autograd.grad(want_y, params, cotangent)
    torch.testing.assert_close(y_NO, want_y, **TOLERANCE[dtype])
    for p, g, w in zip(params, got, want):
        torch.testing.assert_close(g, w, **TOLERANCE[dtype])
        assert g.stride() == p.stride()
    return got, want_y


PADDED_COUNTS = [[3, 0, 4, 4], [0, 0, 7, 0], [1, 0, 0, 6]]  # empty experts, uneven loads
LAYOUTS = {  # name -> the padded layout of counts
    "one block": lambda c: experts.PaddedBlocks(((0, len(c), max(c)),)),
    "one roomy block": lambda c: experts.PaddedBlocks(((0, len(c), max(c) + 2),)),
    "two blocks": lambda c: experts.PaddedBlocks.of_counts(c, 2),
    "block per expert": lambda c: experts.PaddedBlocks.of_counts(c, len(c)),
}
TOLERANCE = {torch.float64: {}, torch.float32: {"atol": 1e-5, "rtol": 1e-5}}


KINDS = [(kind, bias, torch.float64) for kind in ("linear", "mlp", "swiglu") for bias in (False, True)]
KINDS += [("swiglu", False, torch.float32), ("mlp", True, torch.float32)]


@pytest.mark.parametrize("kind,bias,dtype", KINDS, ids=str)
@pytest.mark.parametrize("counts", PADDED_COUNTS, ids=str)
@pytest.mark.parametrize("in_major", [False, True], ids=["out_major", "in_major"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_padded_experts_match_the_loop(kind, bias, dtype, counts, in_major, layout):
    torch.manual_seed(0)
    ex = Experts(ExpertConfig(dim=8, hidden=12, num_experts=4, kind=kind, bias=bias)).to(dtype)
    if in_major:
        plain_layout(ex)
    counts_E = torch.tensor(counts)
    blocks = LAYOUTS[layout](counts)
    x_ND = torch.randn(sum(counts), 8, dtype=dtype, requires_grad=True)
    got, want_y = check_against_the_loop(ex, x_ND, counts_E, lambda x: ex._forward_padded(x, counts_E, blocks), dtype)
    for e in torch.nonzero(counts_E == 0).flatten().tolist():  # an expert without rows: exactly zero
        assert all(g[e].eq(0).all() for g in got[1:])
    with torch.no_grad():  # inference skips the autograd.Functions: same numbers
        torch.testing.assert_close(ex._forward_padded(x_ND, counts_E, blocks), want_y, **TOLERANCE[dtype])


def test_padded_blocks_of_counts():
    blocks = experts.PaddedBlocks.of_counts([2, 0, 3, 1, 5], 2)
    assert blocks.blocks == ((0, 2, 2), (2, 5, 5)) and blocks.rows == 2 * 2 + 3 * 5
    assert blocks.capacity_E("cpu").tolist() == [2, 2, 5, 5, 5]
    assert experts.PaddedBlocks.of_counts([0, 0, 4], 3).blocks == ((0, 1, 0), (1, 2, 0), (2, 3, 4))
    uneven = experts.PaddedBlocks.of_counts([1, 2, 3, 4, 5, 6], 4)  # 6 experts in 4 blocks of 2, 1, 1, 2
    assert uneven.blocks == ((0, 2, 2), (2, 3, 3), (3, 4, 4), (4, 6, 6)) and uneven.rows == 23


def test_cpu_rule():
    """The CPU pads CPU_PAD_BLOCKS blocks for CPU_PAD_MIN_EXPERTS experts or more with more than one thread;
    one thread, or fewer experts, keep the loop."""
    counts = [5, 1, 7, 2, 4, 4, 0, 3] * 2
    assert experts.CPU_PAD_MIN_EXPERTS == 16 and experts.CPU_PAD_BLOCKS == 4
    assert experts.cpu_blocks(counts, threads=1) is None
    assert experts.cpu_blocks(counts[:15], threads=2) is None
    assert experts.cpu_blocks(counts, threads=2).blocks == ((0, 4, 7), (4, 8, 4), (8, 12, 7), (12, 16, 4))


def test_padded_path_choice(monkeypatch):
    """The padded path runs on CUDA without a fused grouped kernel and on the CPU by ``cpu_blocks``, never for
    one expert or no rows, and only with little padding."""
    cpu = torch.device("cpu")
    assert not experts.has_fused_grouped_mm(cpu, torch.bfloat16)
    ex = Experts(ExpertConfig(dim=8, hidden=12, num_experts=4))
    even, skewed = torch.tensor([5, 6, 6, 5]), torch.tensor([1, 1, 1, 19])
    x_ND = torch.randn(22, 8, requires_grad=True)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(experts, "CPU_PAD_MIN_EXPERTS", 2)
    assert experts.padded_blocks(x_ND, even) is None  # the CPU's default: the loop
    monkeypatch.setattr(experts, "PADDED_DEVICE_TYPES", ("cuda", "cpu"))  # opted in
    monkeypatch.setattr(experts, "CPU_PAD_MIN_EXPERTS", 16)
    assert experts.padded_blocks(x_ND, even) is None  # 4 experts: the loop
    monkeypatch.setattr(experts, "CPU_PAD_MIN_EXPERTS", 2)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert experts.padded_blocks(x_ND, even) is None  # one thread: the loop
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert experts.padded_blocks(x_ND, even).blocks == ((0, 1, 5), (1, 2, 6), (2, 3, 6), (3, 4, 5))
    assert experts.padded_blocks(x_ND, torch.tensor([1, 1, 1, 19])) is not None  # a block per expert: no padding
    monkeypatch.setattr(experts, "CPU_PAD_BLOCKS", 1)
    assert experts.padded_blocks(x_ND, even).blocks == ((0, 4, 6),)
    assert experts.padded_blocks(x_ND, skewed) is None  # 4 * 19 padded rows for 22: too much padding
    assert experts.padded_blocks(x_ND[:2], torch.tensor([1, 0, 1, 0])) is None  # decode-sized
    assert experts.padded_blocks(x_ND, torch.tensor([22])) is None  # one expert: a dense FFN
    assert experts.padded_blocks(x_ND[:0], torch.zeros(4, dtype=torch.long)) is None  # no rows
    calls = []
    real = experts._BatchedMM.apply
    monkeypatch.setattr(experts._BatchedMM, "apply", lambda *a: calls.append(1) or real(*a))
    y = ex(x_ND, even)
    assert len(calls) == 2  # both matmuls of the swiglu expert, batched
    torch.testing.assert_close(y, experts_by_loop(ex, x_ND, even), atol=1e-5, rtol=1e-5)
    calls.clear()
    torch.testing.assert_close(ex(x_ND, skewed), experts_by_loop(ex, x_ND, skewed), atol=1e-5, rtol=1e-5)
    assert not calls
    with torch.autocast("cpu", dtype=torch.bfloat16):  # computes in autocast's dtype, as F.linear would
        y = ex(x_ND, even)
        want = experts_by_loop(ex, x_ND, even)
    assert len(calls) == 2 and y.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(y, want, atol=2e-2, rtol=2e-2)
    with pytest.raises(TypeError, match="float64"):
        ex(x_ND.double(), even)
    monkeypatch.setattr(experts, "PADDED_DEVICE_TYPES", ("cuda",))
    assert experts.padded_blocks(x_ND, even) is None


@pytest.mark.parametrize("threads", [1, 2], ids=["loop", "padded"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_layer_on_either_cpu_path_matches_the_reference(monkeypatch, threads, dtype):
    """A layer of 16 experts, uneven loads and an idle expert, through the loop (one thread) and the padded
    blocks (two): the plain reference's output and every gradient."""
    layer = make_layer(dim=8, hidden=4, num_experts=16, experts_per_token=2, dtype=dtype)
    with torch.no_grad():
        layer.router.gate.weight[7] = 0.0
        layer.router.gate.bias[7] = -50.0  # expert 7 gets no rows
    x = random_input(48, 8, dtype=dtype)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    monkeypatch.setattr(experts, "PADDED_DEVICE_TYPES", ("cuda", "cpu"))  # the CPU's blocks are opt-in
    monkeypatch.setattr(experts, "PAD_MAX_WASTE", 10.0)  # this router's loads are very uneven: pad them anyway
    padded = []
    real = experts.padded_blocks
    monkeypatch.setattr(experts, "padded_blocks", lambda *a: padded.append(real(*a)) or padded[-1])
    y, grads = output_and_grads(layer, x, fast(layer))
    y_ref, grads_ref = output_and_grads(layer, x, lambda x: reference_forward(layer, x))
    assert (padded[0] is not None) == (threads > 1)
    torch.testing.assert_close(y, y_ref, atol=TOL[dtype][0], rtol=TOL[dtype][1])
    assert_same_grads(grads, grads_ref, dtype)
    assert grads["experts.w13"][7].eq(0).all() and grads["experts.w2"][7].eq(0).all()


# ------------------------------------------------------------------------- cache-sized chunks of experts


CHUNK_KINDS = [(kind, bias, torch.float64) for kind in ("mlp", "swiglu") for bias in (False, True)]
CHUNK_KINDS += [("swiglu", False, torch.float32)]


@pytest.mark.parametrize("kind,bias,dtype", CHUNK_KINDS, ids=str)
@pytest.mark.parametrize("in_major", [False, True], ids=["out_major", "in_major"])
def test_chunked_experts_match_the_loop(monkeypatch, kind, bias, dtype, in_major):
    """Chunks of consecutive experts (``cache_chunks``), empty experts inside and at the ends: the plain
    loop's output and gradients, each gradient in its parameter's own layout."""
    torch.manual_seed(0)
    ex = Experts(ExpertConfig(dim=8, hidden=12, num_experts=6, kind=kind, bias=bias)).to(dtype)
    if in_major:
        plain_layout(ex)
    counts_E = torch.tensor([0, 25, 0, 10, 15, 0])  # 50 rows: at least D = 8 per expert
    row_bytes = ex.first_weight().shape[-1] * dtype.itemsize
    monkeypatch.setattr(experts, "CPU_CHUNK_MIN_BYTES", 0)
    monkeypatch.setattr(experts, "CPU_CHUNK_BYTES", 20 * row_bytes)  # 20 rows a chunk, or one expert's more
    x_ND = torch.randn(50, 8, dtype=dtype, requires_grad=True)
    assert experts.cache_chunks(x_ND, counts_E, ex.first_weight()) == [(2, 25), (2, 10), (2, 15)]
    calls = []
    real = experts.Experts._forward_grouped
    monkeypatch.setattr(experts.Experts, "_forward_grouped", lambda *a: calls.append(1) or real(*a))
    _, want_y = check_against_the_loop(ex, x_ND, counts_E, lambda x: ex(x, counts_E), dtype)
    assert len(calls) == 3
    with torch.no_grad():
        torch.testing.assert_close(ex(x_ND, counts_E), want_y, **TOLERANCE[dtype])


def test_chunk_rule(monkeypatch):
    """One pass below CPU_CHUNK_MIN_BYTES of activations (autocast's dtype counts), with fewer than D rows per
    expert, for linear experts (no activations to keep in cache) and off the CPU; else chunks of about
    CPU_CHUNK_BYTES, each at least one expert."""
    x_ND = torch.zeros(12, 3)
    w = torch.zeros(4, 3, 16)  # 64 bytes of float32 activation a row
    counts = torch.tensor([6, 0, 1, 5])
    assert experts.CPU_CHUNK_MIN_BYTES == 48 * 2**20 and experts.CPU_CHUNK_BYTES == 8 * 2**20
    assert experts.cache_chunks(x_ND, counts, w) is None
    monkeypatch.setattr(experts, "CPU_CHUNK_MIN_BYTES", 12 * 64 - 1)
    monkeypatch.setattr(experts, "CPU_CHUNK_BYTES", 6 * 64)
    assert experts.cache_chunks(x_ND, counts, w) == [(2, 6), (2, 6)]
    with torch.autocast("cpu", dtype=torch.bfloat16):  # half the bytes: one pass
        assert experts.cache_chunks(x_ND, counts, w) is None
    monkeypatch.setattr(experts, "CPU_CHUNK_BYTES", 64)  # smaller than one expert's rows: an expert a chunk,
    assert experts.cache_chunks(x_ND, counts, w) == [(1, 6), (2, 1), (1, 5)]  # with the empty ones before it
    assert experts.cache_chunks(x_ND[:11], counts, w) is None  # fewer than D rows per expert
    linear = Experts(ExpertConfig(dim=8, hidden=12, num_experts=4, kind="linear"))
    calls = []
    monkeypatch.setattr(experts, "cache_chunks", lambda *a: calls.append(1))
    linear(torch.zeros(12, 8), counts)
    assert not calls


def test_pad_slots_place_rows_at_the_top_of_each_block():
    slot_N = experts.pad_slots(torch.tensor([2, 0, 3, 1]), capacity=3, N=6)
    assert slot_N.tolist() == [0, 1, 6, 7, 8, 9]
    slot_N = experts.pad_slots(torch.tensor([2, 0, 3, 1]), capacity=torch.tensor([2, 2, 3, 3]), N=6)
    assert slot_N.tolist() == [0, 1, 4, 5, 6, 7]
