"""Differential fuzzing: the fast layer against ``dualroute.reference`` on random configurations.

Each example draws a whole layer (both router kinds, softmax or sigmoid, renormalisation, scaling, correction
biases, router bias, every expert kind, shared experts, output width), a capacity factor per level for
training and for eval (the mode picks which apply), a dtype, an input shape (none, (T,), (B, S), empty ones
included) and memory layout (contiguous, a transposed view, a strided slice, a broadcast row), and a way to
make ties: none, a zeroed router, logits equal across tokens, a saturated sigmoid, equal group scores, or
router weights so large that softmax and sigmoid round to exact 0s and 1s. It then compares the output and
EVERY gradient (input and all parameters), the kept rows per expert, and the no-grad call (which a handful of
rows takes by ``MoELayer._route_direct``).

``test_fuzz_quick`` runs 50 examples with the quick suite; ``test_fuzz`` (slow) 1,000. Both are seeded: the same
examples on every run, so a failure reproduces; ``DUALROUTE_FUZZ_SEED=N pytest tests/test_fuzz.py`` explores others.

Shapes: B batch, S sequence, T tokens, D model dim, O output dim, E experts, G groups, M experts per group,
J groups per token, K experts per token.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, seed, settings
from hypothesis import strategies as st

from conftest import TOL, assert_same_grads, make_layer, output_and_grads
from dualroute.layer import MoELayer
from dualroute.reference import reference_forward, reference_routing
from dualroute.routing import RouterOptions

FUZZ_SEED = int(os.environ.get("DUALROUTE_FUZZ_SEED", "13"))
TIES = ["none", "zeroed", "same_tokens", "saturated", "equal_groups", "huge"]
LAYOUTS = ["contiguous", "transposed", "strided", "broadcast"]
FACTORS = [None, None, 0.25, 0.5, 1.0, 1.5]  # None (dropless) twice as likely


@dataclass(frozen=True)
class FuzzCase:
    G: int
    M: int
    J: int
    K: int
    group_router: str
    group_score: str
    score_func: str
    renormalize: bool
    scaling: float
    correction_bias: bool
    router_bias: bool
    kind: str
    activation: str
    expert_bias: bool
    out_dim: int | None
    shared: int
    shared_gate: bool
    shared_hidden: int | None
    capacity: tuple  # (capacity_factor, eval_capacity_factor, group_capacity_factor, eval_group_capacity_factor)
    training: bool
    dtype: torch.dtype
    dim: int
    hidden: int
    lead: tuple  # the input's leading shape: (), (T,) or (B, S)
    layout: str
    ties: str
    seed: int

    def layer(self) -> MoELayer:
        options = RouterOptions(group_router=self.group_router, group_score=self.group_score,
                                score_func=self.score_func, bias=self.router_bias, renormalize=self.renormalize,
                                scaling_factor=self.scaling, correction_bias=self.correction_bias)
        factors = dict(zip(["capacity_factor", "eval_capacity_factor", "group_capacity_factor",
                            "eval_group_capacity_factor"], self.capacity))
        layer = make_layer(
            dim=self.dim, hidden=self.hidden, seed=self.seed, dtype=self.dtype, router=options,
            num_experts=self.G * self.M, experts_per_token=self.K, num_groups=self.G, groups_per_token=self.J,
            expert_kind=self.kind, activation=self.activation, expert_bias=self.expert_bias, out_dim=self.out_dim,
            num_shared_experts=self.shared, shared_gate=self.shared_gate,
            shared_hidden=self.shared_hidden if self.shared else None, **factors,
        )
        return make_ties(layer.train(self.training), self.ties)

    def base_and_view(self):
        """A contiguous leaf ``base`` and ``view(base)``, the layer's input of shape ``(*lead, D)`` in this layout."""
        lead, D = self.lead, self.dim
        shape, view = {
            "contiguous": ((*lead, D), lambda b: b),
            "transposed": ((D, *lead), lambda b: b.movedim(0, -1)),
            "strided": ((*lead, 2 * D), lambda b: b[..., ::2]),
            "broadcast": ((*lead[:-1], 1, D), lambda b: b.expand(*lead, D)),  # every token of a row equal
        }[self.layout if lead else "contiguous"]
        gen = torch.Generator().manual_seed(self.seed + 2)
        return torch.randn(shape, generator=gen).to(self.dtype), view


def make_ties(layer: MoELayer, how: str) -> MoELayer:
    router, cfg = layer.router, layer.cfg
    G, M = cfg.num_groups, cfg.num_experts // cfg.num_groups
    big = 30.0 if router.gate.weight.dtype == torch.float32 else 60.0  # past the sigmoid's last rounding to 1
    gen = torch.Generator().manual_seed(cfg.num_experts)
    with torch.no_grad():
        if how == "huge" and router.gate.weight.dtype == torch.float64:
            for p in router.parameters():  # softmax and sigmoid round to exact 0s and 1s, ties among them
                p.mul_(1e3)
            return layer
        if how == "none":
            return layer
        router.gate.weight.zero_()
        if router.group_gate is not None:
            router.group_gate.weight.zero_()
            if router.group_gate.bias is not None and how != "same_tokens":
                router.group_gate.bias.zero_()
        for buf in (router.expert_bias_E, router.group_bias_G):
            if buf is not None and how != "same_tokens":
                buf.zero_()
        bias = router.gate.bias
        levels = torch.tensor([-big, 0.0, big])  # sigmoid scores of exactly 0, 0.5 and 1
        if bias is None:
            return layer
        if how == "same_tokens":  # logits vary by expert, not by token: rows of equal weight compete for capacity
            if router.opt.score_func == "sigmoid":  # a CPU sigmoid rounds by position: only exact values tie
                bias.copy_(levels[torch.randint(3, (cfg.num_experts,), generator=gen)])
        elif how == "zeroed":
            bias.zero_()
        elif how == "saturated":  # distinct logits, scores of exactly 1.0 and 0.0
            sign = torch.where(torch.rand(cfg.num_experts, generator=gen) < 0.7, 1.0, -1.0)
            bias.copy_(sign * (big + torch.arange(cfg.num_experts)))
        elif how == "huge":  # float32: the same without depending on x (a float32 rounding of a logit of
            # 1e3 * x would weigh 1e3 times in the input's gradient, past the float32 tolerance)
            bias.copy_(1e3 * torch.randn(cfg.num_experts, generator=gen))
        elif how == "equal_groups":  # every group the same scores: the group scores tie, experts inside may not
            if router.opt.score_func == "softmax":
                levels = torch.randn(3, generator=gen)
            bias.copy_(levels[torch.randint(3, (M,), generator=gen)].repeat(G))
            if router.expert_bias_E is not None:
                router.expert_bias_E.copy_(torch.randn(M, generator=gen).repeat(G))
    return layer


@st.composite
def fuzz_cases(draw) -> FuzzCase:
    G = draw(st.sampled_from([1, 2, 3, 4]))
    M = draw(st.integers(1, 3))
    J = draw(st.integers(1, G))
    K = draw(st.integers(1, J * M))
    group_router = draw(st.sampled_from(["learned", "derived"]))
    scores = ["top2_sum", "max", "sum"] if M >= 2 or G == 1 else ["max", "sum"]
    score_func = draw(st.sampled_from(["softmax", "sigmoid"]))
    kind = draw(st.sampled_from(["linear", "mlp", "swiglu"]))
    shape = draw(st.sampled_from(["vector", "tokens", "tokens", "batch"]))
    lead = {
        "vector": (),
        "tokens": (draw(st.sampled_from([0, 1, 1, 2, 3, 5, 8, 13])),),
        "batch": (draw(st.integers(0, 3)), draw(st.integers(0, 4))),
    }[shape]
    ties = draw(st.sampled_from(TIES))
    if ties == "saturated" and score_func != "sigmoid":
        ties = "zeroed"
    layout = draw(st.sampled_from(LAYOUTS))
    capacity = tuple(draw(st.sampled_from(FACTORS)) for _ in range(4))
    if layout == "broadcast":  # equal tokens need not get equal logits from a CPU matmul (nor a sigmoid): their
        capacity = (None,) * 4  # rows' capacity order would follow rounding, not the tie rule
    return FuzzCase(
        G=G, M=M, J=J, K=K, group_router=group_router, group_score=draw(st.sampled_from(scores)),
        score_func=score_func, renormalize=draw(st.booleans()), scaling=draw(st.sampled_from([1.0, 2.5])),
        correction_bias=draw(st.booleans()), router_bias=draw(st.booleans()), kind=kind,
        activation=draw(st.sampled_from(["gelu", "relu", "silu"])) if kind == "mlp" else "gelu",
        expert_bias=draw(st.booleans()), out_dim=draw(st.sampled_from([None, 3])),
        shared=draw(st.integers(0, 2)), shared_gate=draw(st.booleans()),
        shared_hidden=draw(st.sampled_from([None, 3])),
        capacity=capacity, training=draw(st.booleans()),
        dtype=draw(st.sampled_from([torch.float32, torch.float64])),
        dim=draw(st.sampled_from([8, 6])), hidden=draw(st.sampled_from([4, 5])),
        lead=lead, layout=layout, ties=ties, seed=draw(st.integers(0, 2**16)),
    )


def check_case(case: FuzzCase) -> None:
    layer = case.layer()
    base, view = case.base_and_view()
    y, grads = output_and_grads(layer, base, lambda b: layer(view(b))[0])
    y_ref, grads_ref = output_and_grads(layer, base, lambda b: reference_forward(layer, view(b)))
    out_dim = case.out_dim or case.dim
    assert y.shape == y_ref.shape == (*case.lead, out_dim)
    atol, rtol = TOL[case.dtype]
    torch.testing.assert_close(y, y_ref, atol=atol, rtol=rtol)
    assert_same_grads(grads, grads_ref, case.dtype)

    x = view(base)
    with torch.no_grad():  # a handful of rows runs each row's expert directly: the same output
        y_direct, aux = layer(x)
    torch.testing.assert_close(y_direct, y_ref, atol=atol, rtol=rtol)
    c_TE, _ = reference_routing(layer, x.reshape(-1, case.dim))
    if aux.routing.weights_TK.ne(0).all():  # a kept row of weight 0 would not show in c_TE
        assert torch.equal(aux.tokens_per_expert_E - aux.dropped_per_expert_E, c_TE.ne(0).sum(0))
    assert aux.num_dropped == aux.dropped_per_expert_E.sum()
    assert aux.loss.isfinite()


@pytest.mark.slow
@seed(FUZZ_SEED)
@settings(max_examples=1000, deadline=None)
@given(case=fuzz_cases())
def test_fuzz(case, one_thread):
    check_case(case)


@seed(FUZZ_SEED)
@settings(max_examples=50, deadline=None)
@given(case=fuzz_cases())
def test_fuzz_quick(case, one_thread):
    check_case(case)
