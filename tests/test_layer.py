"""The MoE layer against deliberately naive references, on outputs and on every gradient.

* fast path == ``reference_forward`` (per-token loops + dense masks) over a grid (``test_fuzz.py``
  draws random configurations, ties, layouts and capacities);
* exact special cases: one expert == DenseFFN, K = E == the seed's soft mixture;
* capacity (with a masked reference written here), edge cases, aux fields, torch.compile,
  dtypes and autocast, bad input.

Shapes: B batch, S sequence, T tokens, D model dim, O output dim, E experts, G groups,
J groups per token, K experts per token.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, fields

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import TOL, assert_same_grads, fast, make_layer, output_and_grads, random_input
from dualroute import layer as layer_mod
from dualroute.balance import BalanceConfig
from dualroute.dispatch import plan_dispatch
from dualroute.experts import ExpertConfig, Experts
from dualroute.layer import DenseFFN, MoEConfig, MoELayer
from dualroute.seed import load_seed_state_dict, seed_config
from dualroute.reference import reference_forward, reference_routing
from dualroute.routing import TIE_FREE_KEY_MIN_NUMEL, RouterConfig, RouterOptions

D = 8  # model dim; with hidden 4, float32 rows are 16-byte aligned so torch._grouped_mm can run


# ------------------------------------------------------------------------ fast path == reference


@dataclass(frozen=True)
class Case:
    G: int
    J: int
    E: int
    K: int
    group_router: str = "learned"
    score_func: str = "softmax"
    kind: str = "swiglu"
    renormalize: bool = True
    scaling: float = 1.0
    correction_bias: bool = False
    shared: int = 0  # 0, or 1 gated shared expert
    expert_bias: bool = False
    group_score: str = "top2_sum"

    def layer(self, dtype=torch.float64, seed=0, dim=D, **extra) -> MoELayer:
        options = RouterOptions(
            group_router=self.group_router, group_score=self.group_score, score_func=self.score_func,
            renormalize=self.renormalize, scaling_factor=self.scaling, correction_bias=self.correction_bias,
        )
        return make_layer(
            dim=dim, seed=seed, dtype=dtype, router=options, num_experts=self.E, experts_per_token=self.K,
            num_groups=self.G, groups_per_token=self.J, expert_kind=self.kind, expert_bias=self.expert_bias,
            num_shared_experts=self.shared, shared_gate=self.shared > 0, **extra,
        )

    def __str__(self) -> str:
        flags = [self.group_router, self.score_func, self.kind, f"x{self.scaling}"]
        flags += ["renorm"] * self.renormalize + ["cbias"] * self.correction_bias
        flags += ["shared"] * (self.shared > 0) + ["ebias"] * self.expert_bias
        return f"G{self.G}J{self.J}E{self.E}K{self.K}-" + "-".join(flags)


GRID = [
    Case(1, 1, 4, 1, kind="linear", expert_bias=True),
    Case(1, 1, 8, 2, "derived", "sigmoid", "mlp", renormalize=False, scaling=2.5, correction_bias=True, shared=1),
    Case(2, 1, 8, 2, "learned", "softmax", "swiglu", shared=1, expert_bias=True),
    Case(2, 1, 8, 2, "learned", "sigmoid", "mlp", renormalize=False, scaling=2.5, correction_bias=True),
    Case(2, 1, 8, 2, "derived", "softmax", "swiglu", renormalize=False, correction_bias=True, expert_bias=True),
    Case(4, 2, 8, 3, "learned", "softmax", "mlp", renormalize=False, scaling=2.5, correction_bias=True, shared=1),
    Case(4, 2, 8, 3, "derived", "sigmoid", "swiglu", scaling=2.5, correction_bias=True, shared=1, expert_bias=True),
    Case(4, 2, 8, 3, "derived", "softmax", "linear", group_score="max"),
    Case(4, 2, 8, 3, "derived", "sigmoid", "mlp", renormalize=False, group_score="sum", correction_bias=True),
    Case(4, 4, 8, 8, "learned", "sigmoid", "linear", scaling=2.5, shared=1, expert_bias=True),
    Case(4, 4, 8, 8, "derived", "softmax", "mlp", renormalize=False, correction_bias=True),
]


def check_against_reference(layer: MoELayer, x: torch.Tensor, dtype: torch.dtype) -> None:
    y, grads = output_and_grads(layer, x, fast(layer))
    y_ref, grads_ref = output_and_grads(layer, x, lambda x: reference_forward(layer, x))
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(y, y_ref, atol=atol, rtol=rtol)
    assert_same_grads(grads, grads_ref, dtype)
    unused = {name for name, g in grads.items() if g is None}
    assert unused <= {"router.noise.weight"}, f"the fast path left {unused} without a gradient"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("case", GRID, ids=str)
def test_matches_reference(case, dtype):
    check_against_reference(case.layer(dtype), random_input(2, 5, D, dtype=dtype), dtype)


def test_noise_is_off_in_eval():
    noisy = make_layer(dim=D, num_experts=8, router=RouterOptions(noisy_gating=True, jitter_eps=0.2))
    x = random_input(2, 5, D)
    outputs = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        outputs.append(noisy(x)[0])
    assert torch.equal(outputs[0], outputs[1])
    check_against_reference(noisy, x, torch.float64)  # the reference has no noise at all


# ------------------------------------------------------------------------------------ edge cases


EMPTY_CASES = [Case(1, 1, 4, 2), Case(1, 1, 4, 2, "derived", "sigmoid"), Case(2, 1, 4, 2),
               Case(2, 1, 4, 2, "derived", correction_bias=True, shared=1)]
ALL_LOSSES = BalanceConfig(switch=1.0, group_switch=1.0, z=1.0, group_z=1.0, importance=1.0, load=1.0)
EMPTY_MODES = {  # name -> (layer keywords, training?)
    "eval": (dict(), False),
    "train-capacity": (dict(capacity_factor=1.0, group_capacity_factor=1.0), True),
    "eval-capacity": (dict(eval_capacity_factor=1.0, eval_group_capacity_factor=1.0), False),
}


def check_empty(layer: MoELayer, shape: tuple[int, ...], grad: bool) -> None:
    x = torch.zeros(shape, dtype=torch.float64, requires_grad=grad)
    with torch.set_grad_enabled(grad):
        y, aux = layer(x)
    assert y.shape == (*shape[:-1], D)
    E, G = layer.cfg.num_experts, layer.cfg.num_groups
    assert aux.tokens_per_expert_E.shape == aux.dropped_per_expert_E.shape == (E,)
    assert aux.tokens_per_group_G.shape == (G,)
    assert aux.tokens_per_expert_E.sum() == 0 and aux.num_dropped == 0
    assert aux.losses.keys() == ALL_LOSSES.active().keys()
    assert aux.loss.shape == () and aux.loss.item() == 0.0, aux.losses  # no token: no imbalance, never NaN
    if grad:
        (y.sum() + aux.loss).backward()
        assert x.grad is not None and x.grad.shape == shape
        for name, p in layer.named_parameters():
            assert p.grad is None or p.grad.eq(0).all(), name


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("mode", EMPTY_MODES)
@pytest.mark.parametrize("shape", [(0, D), (0, 5, D), (3, 0, D)], ids=str)
@pytest.mark.parametrize("case", EMPTY_CASES, ids=str)
def test_empty_input(case, shape, mode, grad):
    extra, training = EMPTY_MODES[mode]
    check_empty(case.layer(balance=ALL_LOSSES, **extra).train(training), shape, grad)


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("shape", [(0, D), (3, 0, D)], ids=str)
def test_empty_input_expert_choice(shape, grad):
    layer = make_layer(dim=D, num_experts=4, routing_mode="expert_choice", capacity_factor=1.0, balance=ALL_LOSSES)
    for training in (True, False):
        check_empty(layer.train(training), shape, grad)


@pytest.mark.parametrize("case", [GRID[2], GRID[6]], ids=str)
def test_one_token(case):
    check_against_reference(case.layer(), random_input(1, D), torch.float64)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("kind", ["linear", "mlp", "swiglu"])
def test_all_tokens_to_one_expert(kind, dtype):
    layer = Case(1, 1, 4, 1, kind=kind, expert_bias=True).layer(dtype)
    with torch.no_grad():
        layer.router.gate.bias[2] = 1e3
    x = random_input(9, D, dtype=dtype)
    _, aux = layer(x)
    assert aux.tokens_per_expert_E.tolist() == [0, 0, 9, 0]
    _, grads = output_and_grads(layer, x, fast(layer))
    idle = torch.arange(4) != 2
    for name, _ in layer.experts.named_parameters():  # exactly zero, not merely small
        assert grads[f"experts.{name}"][idle].eq(0).all(), f"idle experts got a {name} gradient"
    check_against_reference(layer, x, dtype)


def test_batch_sequence_input_is_flattened_tokens():
    layer = GRID[5].layer(out_dim=3)
    x_BSD = random_input(2, 5, D)
    y_BSO, _ = layer(x_BSD)
    y_TO, _ = layer(x_BSD.reshape(-1, D))
    assert y_BSO.shape == (2, 5, 3)
    torch.testing.assert_close(y_BSO.reshape(-1, 3), y_TO)


def test_single_vector_input():
    layer = GRID[5].layer(out_dim=3)
    x_D = random_input(D)
    y_O, _ = layer(x_D)
    assert y_O.shape == (3,)
    torch.testing.assert_close(y_O, layer(x_D[None])[0][0])


# ------------------------------------------------------------------------------ exact special cases


@pytest.mark.parametrize("kind", ["linear", "mlp", "swiglu"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_one_expert_is_dense_ffn(kind, bias, score_func):
    layer = make_layer(dim=D, hidden=5, out_dim=4, num_experts=1, experts_per_token=1, expert_kind=kind,
                       expert_bias=bias, router=RouterOptions(score_func=score_func))
    dense = DenseFFN(D, 5, kind, bias=bias, out_dim=4).double()
    dense.inner.load_state_dict(layer.experts.state_dict())
    x = random_input(7, D)
    y, grads = output_and_grads(layer, x, fast(layer))
    y_dense, grads_dense = output_and_grads(dense, x, dense)
    atol, rtol = TOL[torch.float64]
    torch.testing.assert_close(y, y_dense, atol=atol, rtol=rtol)
    for name, grad in grads_dense.items():
        key = name.replace("inner.", "experts.") if name != "input" else name
        torch.testing.assert_close(grads[key], grad, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")
    for name in ("router.gate.weight", "router.gate.bias"):  # the single weight is constant 1
        assert grads[name].abs().max() < 1e-12


def textbook_ffn(experts: Experts, e: int, x_TD: torch.Tensor) -> torch.Tensor:
    """Expert ``e`` written out from the documented formulas, with named matrices:
    linear ``x W + b``; mlp ``act(x W1 + b1) W2 + b2``; swiglu ``(silu(x W1) * x W3) W2``
    with ``w13 = [W1 | W3]`` side by side."""
    cfg = experts.cfg
    b1 = 0 if experts.b1 is None else experts.b1[e]
    if cfg.kind == "linear":
        return x_TD @ experts.w1[e] + b1
    b2 = 0 if experts.b2 is None else experts.b2[e]
    if cfg.kind == "mlp":
        act = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}[cfg.activation]
        return act(x_TD @ experts.w1[e] + b1) @ experts.w2[e] + b2
    hidden = experts.w2.shape[1]
    W1, W3 = experts.w13[e, :, :hidden], experts.w13[e, :, hidden:]
    b1_gate, b1_up = (0, 0) if experts.b1 is None else (b1[:hidden], b1[hidden:])
    return (F.silu(x_TD @ W1 + b1_gate) * (x_TD @ W3 + b1_up)) @ experts.w2[e] + b2


KINDS = [("linear", "gelu"), ("mlp", "gelu"), ("mlp", "relu"), ("mlp", "silu"), ("swiglu", "gelu")]


@pytest.mark.parametrize("kind,activation", KINDS)
@pytest.mark.parametrize("bias", [False, True])
def test_expert_kinds_are_the_textbook_formulas(kind, activation, bias):
    layer = make_layer(dim=D, hidden=5, out_dim=4, num_experts=3, expert_kind=kind, activation=activation,
                       expert_bias=bias)
    x_TD = random_input(7, D).detach()
    want = [textbook_ffn(layer.experts, e, x_TD) for e in range(3)]
    for e in range(3):
        torch.testing.assert_close(layer.experts.forward_one(e, x_TD), want[e])
    counts_E = torch.tensor([2, 0, 5])  # the grouped path: rows 0-1 to expert 0, rows 2-6 to expert 2
    grouped = layer.experts(x_TD, counts_E)
    torch.testing.assert_close(grouped, torch.cat([want[0][:2], want[2][2:]]))


@pytest.mark.parametrize("gated", [False, True])
def test_shared_experts_are_a_gated_dense_block(gated):
    layer = make_layer(dim=D, num_experts=8, num_groups=2, num_shared_experts=2, shared_gate=gated)
    x_TD = random_input(7, D).detach()
    shared = layer.shared
    assert shared.ffn.inner.w2.shape[1] == 2 * layer.cfg.hidden  # two shared experts, side by side
    want = textbook_ffn(shared.ffn.inner, 0, x_TD)
    if gated:
        want = torch.sigmoid(x_TD @ shared.gate.weight.T) * want
    routed, _ = layer.route_and_compute(x_TD, layer.router(x_TD))
    torch.testing.assert_close(layer(x_TD)[0] - routed, want)


# ---------------------------------------------------------------------------------- the seed model


class SeedRouter(nn.Module):
    def __init__(self, input_dim, num_experts):
        super().__init__()
        self.fc = nn.Linear(input_dim, num_experts)

    def forward(self, x):
        return torch.softmax(self.fc(x), dim=-1)


class SeedExpert(nn.Module):
    def __init__(self, input_dim, output_dim):
        super().__init__()
        self.fc = nn.Linear(input_dim, output_dim)

    def forward(self, x):
        return self.fc(x)


class DualLayerRoutingModel(nn.Module):
    """The seed model. Its text reads ``probs[i] * self.experts[i](x)``, which picks batch row
    i, not expert i (a bug in the seed); this is the intended per-expert mixture."""

    def __init__(self, input_dim, output_dim, num_experts):
        super().__init__()
        self.router = SeedRouter(input_dim, num_experts)
        self.experts = nn.ModuleList(SeedExpert(input_dim, output_dim) for _ in range(num_experts))

    def forward(self, x):
        probs = self.router(x)
        return sum(probs[:, i : i + 1] * expert(x) for i, expert in enumerate(self.experts))


def test_k_equals_e_reproduces_the_seed_model():
    torch.manual_seed(0)
    seed = DualLayerRoutingModel(input_dim=5, output_dim=3, num_experts=4).double()
    layer = MoELayer(seed_config(5, 3, 4)).double().eval()
    load_seed_state_dict(layer, seed.state_dict())
    x = random_input(8, 5)
    y, grads = output_and_grads(layer, x, fast(layer))
    y_seed, grads_seed = output_and_grads(seed, x, seed)
    atol, rtol = TOL[torch.float64]
    torch.testing.assert_close(y, y_seed, atol=atol, rtol=rtol)
    # Map the seed's gradients into the layer's layout, as load_seed_state_dict does for values.
    mapped = {
        "input": grads_seed["input"],
        "router.gate.weight": grads_seed["router.fc.weight"],
        "router.gate.bias": grads_seed["router.fc.bias"],
        "experts.w1": torch.stack([grads_seed[f"experts.{i}.fc.weight"].T for i in range(4)]),
        "experts.b1": torch.stack([grads_seed[f"experts.{i}.fc.bias"] for i in range(4)]),
    }
    assert_same_grads(grads, mapped, torch.float64)


def test_load_seed_state_dict_rejects_other_keys():
    layer = MoELayer(seed_config(5, 3, 4))
    state = DualLayerRoutingModel(5, 3, 4).state_dict()
    del state["experts.3.fc.bias"]
    with pytest.raises(ValueError, match="experts.3.fc.bias"):
        load_seed_state_dict(layer, state)


def test_load_seed_state_dict_rejects_wrong_shapes():
    layer = MoELayer(seed_config(5, 3, 4))
    state = DualLayerRoutingModel(5, 2, 4).state_dict()  # output_dim 2, layer built for 3
    with pytest.raises(ValueError, match=r"experts.0.fc.weight.*expected shape \(5, 3\)"):
        load_seed_state_dict(layer, state)


# ------------------------------------------------------------------------------------------ capacity


def capacity_mask(c_TE: torch.Tensor, capacity: int) -> torch.Tensor:
    """1 where expert e keeps token t: its ``capacity`` heaviest tokens (earlier token on ties)."""
    keep_TE = torch.zeros_like(c_TE)
    for e in range(c_TE.shape[1]):
        tokens = c_TE[:, e].nonzero().flatten().tolist()
        keep_TE[sorted(tokens, key=lambda t: -float(c_TE[t, e]))[:capacity], e] = 1
    return keep_TE


def reference_with_capacity(layer: MoELayer, x: torch.Tensor, capacity: int) -> torch.Tensor:
    """``reference_forward`` with the dropped (token, slot) pairs zeroed in the dense combine matrix."""
    x_TD = x.reshape(-1, layer.cfg.dim)
    c_TE, _ = reference_routing(layer, x_TD, capacity=False)
    c_TE = c_TE * capacity_mask(c_TE.detach(), capacity)
    y_TO = sum(c_TE[:, e : e + 1] * layer.experts.forward_one(e, x_TD) for e in range(layer.cfg.num_experts))
    if layer.shared is not None:
        y_TO = y_TO + layer.shared(x_TD)
    return y_TO.reshape(*x.shape[:-1], -1)


def capacity_of(layer: MoELayer, num_tokens: int, factor: float) -> int:
    return math.ceil(factor * num_tokens * layer.cfg.experts_per_token / layer.cfg.num_experts)


@pytest.mark.parametrize("factor", [0.5, 1.0, 1.25])
@pytest.mark.parametrize("case", [GRID[2], GRID[5], GRID[8]], ids=str)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_capacity_matches_masked_reference(case, factor, mode):
    if mode == "train":
        layer = case.layer(capacity_factor=factor).train()
    else:
        layer = case.layer(eval_capacity_factor=factor).eval()
    x = random_input(12, D)
    capacity = capacity_of(layer, 12, factor)
    _, aux = layer(x)
    kept_E = aux.tokens_per_expert_E - aux.dropped_per_expert_E
    assert (kept_E <= capacity).all()
    assert aux.num_dropped == aux.dropped_per_expert_E.sum()
    y, grads = output_and_grads(layer, x, fast(layer))
    y_ref, grads_ref = output_and_grads(layer, x, lambda x: reference_with_capacity(layer, x, capacity))
    torch.testing.assert_close(y, y_ref, atol=1e-10, rtol=1e-10)
    assert_same_grads(grads, grads_ref, torch.float64)
    torch.testing.assert_close(reference_forward(layer, x), y_ref, atol=1e-10, rtol=1e-10)  # it models capacity


def hand_capacity_layer(**cfg) -> MoELayer:
    """E = 2, K = 1, linear experts. Logits (x0, 0): p(expert 0) = sigmoid(x0)."""
    layer = make_layer(dim=2, num_experts=2, experts_per_token=1, expert_kind="linear",
                       router=RouterOptions(renormalize=False), **cfg)
    with torch.no_grad():
        layer.router.gate.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
        layer.router.gate.bias.zero_()
    return layer


# Tokens 0, 1, 2 pick expert 0 with weights .95, .88, .73; token 3 picks expert 1.
# capacity = ceil(1.0 * 4 * 1 / 2) = 2: expert 0 drops its lightest row, token 2.
HAND_X = torch.tensor([[3.0, 1.0], [2.0, -1.0], [1.0, 0.5], [-1.0, 2.0]], dtype=torch.float64)


def test_capacity_hand_case():
    layer = hand_capacity_layer(capacity_factor=1.0).train()
    y, aux = layer(HAND_X)
    assert aux.tokens_per_expert_E.tolist() == [3, 1]
    assert aux.dropped_per_expert_E.tolist() == [1, 0]
    assert aux.num_dropped.item() == 1
    assert y[2].eq(0).all()  # a dropped token with K = 1 and no shared expert outputs exactly 0
    y_dropless, _ = layer.eval()(HAND_X)
    torch.testing.assert_close(y[[0, 1, 3]], y_dropless[[0, 1, 3]])


@pytest.mark.parametrize(
    "cfg,dropped_in_train,dropped_in_eval",
    [
        (dict(capacity_factor=1.0), 1, 0),
        (dict(eval_capacity_factor=1.0), 0, 1),
        (dict(capacity_factor=1.0, eval_capacity_factor=2.0), 1, 0),
        (dict(), 0, 0),
    ],
)
def test_capacity_factor_by_mode(cfg, dropped_in_train, dropped_in_eval):
    layer = hand_capacity_layer(**cfg)
    assert layer.train()(HAND_X)[1].num_dropped.item() == dropped_in_train
    assert layer.eval()(HAND_X)[1].num_dropped.item() == dropped_in_eval


def test_dropless_drops_nothing_even_when_all_tokens_pick_one_expert():
    layer = Case(1, 1, 4, 1).layer()
    with torch.no_grad():
        layer.router.gate.bias[0] = 1e3
    for mode in (layer.train, layer.eval):
        _, aux = mode()(random_input(16, D))
        assert aux.tokens_per_expert_E.tolist() == [16, 0, 0, 0]
        assert aux.num_dropped.item() == 0 and aux.dropped_per_expert_E.eq(0).all()


# -------------------------------------------------------------------------------------------- ties
# Equal scores: the lowest group and expert index win (routing.top_indices). Equal weights competing for a
# capacity: the earlier token, then the earlier slot, is kept. The reference follows the same rules.


def make_ties(layer: MoELayer, how: str) -> MoELayer:
    """Zeroed router: every score equal. Saturated: distinct logits far up the sigmoid, every score 1.0.
    Equal groups: each group's experts have the same scores, so the group scores tie and the experts do not."""
    router = layer.router
    M = layer.cfg.num_experts // layer.cfg.num_groups
    big = 20.0 if router.gate.weight.dtype == torch.float32 else 40.0
    with torch.no_grad():
        for p in router.parameters():
            p.zero_()
        for buf in (router.expert_bias_E, router.group_bias_G):
            if buf is not None:
                buf.zero_()
        if how == "saturated":
            router.gate.bias.copy_(big + torch.arange(layer.cfg.num_experts).flip(0))
        elif how == "equal_groups":
            router.gate.bias.copy_(torch.linspace(-1.0, 1.0, M).repeat(layer.cfg.num_groups))
    return layer


TIE_CASES = [
    Case(1, 1, 8, 2),
    Case(2, 1, 8, 3, "learned", "sigmoid", renormalize=False, shared=1),
    Case(4, 2, 8, 3, "derived", "softmax", "mlp"),
    Case(4, 2, 8, 3, "derived", "sigmoid", "linear", renormalize=False, scaling=2.5),
    Case(4, 3, 8, 5, "learned", "softmax", "mlp", expert_bias=True),
]
TIE_CAPACITY = {"dropless": {}, "expert": dict(capacity_factor=0.5), "group": dict(group_capacity_factor=0.75),
                "both": dict(capacity_factor=0.75, group_capacity_factor=0.5)}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("capacity", TIE_CAPACITY)
@pytest.mark.parametrize("case,how", [(case, how) for case in TIE_CASES for how in ("zeroed", "saturated", "equal_groups")
                                      if how != "saturated" or case.score_func == "sigmoid"], ids=str)
def test_ties_match_reference(case, how, capacity, dtype):
    layer = make_ties(case.layer(dtype, **TIE_CAPACITY[capacity]).train(), how)
    x = random_input(3, 4, D, dtype=dtype)
    check_against_reference(layer, x, dtype)
    _, aux = layer(x)
    c_TE, _ = reference_routing(layer, x.reshape(-1, D))
    assert torch.equal(aux.tokens_per_expert_E - aux.dropped_per_expert_E, c_TE.ne(0).sum(0))


@pytest.mark.parametrize("case", [TIE_CASES[2], TIE_CASES[4]], ids=str)
def test_ties_match_reference_at_many_tokens(case):
    # 1024 tokens x 8 experts: float32 expert selection runs top_indices' tie-free int64 key, not the sort.
    layer = make_ties(case.layer(torch.float32, capacity_factor=0.5, group_capacity_factor=0.75).train(), "zeroed")
    x = random_input(1024, D, dtype=torch.float32)
    assert x.shape[0] * case.E >= TIE_FREE_KEY_MIN_NUMEL
    y, aux = layer(x)
    c_TE, _ = reference_routing(layer, x)
    assert torch.equal(aux.tokens_per_expert_E - aux.dropped_per_expert_E, c_TE.ne(0).sum(0))
    atol, rtol = TOL[torch.float32]
    torch.testing.assert_close(y, reference_forward(layer, x), atol=atol, rtol=rtol)


def test_ties_drop_the_later_token_then_the_later_slot():
    # Zeroed router, G = 2 groups of 2, J = 1, K = 2: every token takes group 0 and experts 0 then 1, all
    # weights 0.5. A group capacity of ceil(1.0 * 3 * 2 / 2) = 3 keeps token 0's two rows and token 1's first.
    layer = make_ties(make_layer(dim=D, num_experts=4, num_groups=2, experts_per_token=2,
                                 group_capacity_factor=1.0).train(), "zeroed")
    y, aux = layer(random_input(3, D))
    assert aux.routing.expert_ids_TK.tolist() == [[0, 1]] * 3
    assert aux.dropped_per_expert_E.tolist() == [1, 2, 0, 0]
    assert y[2].eq(0).all() and not y[1].eq(0).all()
    # An expert capacity of ceil(1.0 * 6 * 2 / 4) = 3: experts 0 and 1 keep tokens 0-2 and drop 3-5.
    layer = make_ties(make_layer(dim=D, num_experts=4, experts_per_token=2, capacity_factor=1.0).train(), "zeroed")
    y, aux = layer(random_input(6, D))
    assert aux.dropped_per_expert_E.tolist() == [3, 3, 0, 0]
    assert y[3:].eq(0).all() and y[:3].ne(0).any(-1).all()


# ------------------------------------------------------------------------------------------- aux


@pytest.mark.parametrize("case", [GRID[0], GRID[2], GRID[5], GRID[6], GRID[9]], ids=str)
def test_aux_fields(case):
    layer = case.layer()
    T = 13
    _, aux = layer(random_input(T, D))
    routing, M = aux.routing, case.E // case.G
    assert aux.tokens_per_expert_E.shape == (case.E,) and aux.tokens_per_group_G.shape == (case.G,)
    assert aux.tokens_per_expert_E.sum() == T * case.K
    assert aux.tokens_per_group_G.sum() == T * case.J
    assert torch.equal(aux.tokens_per_expert_E, torch.bincount(routing.expert_ids_TK.flatten(), minlength=case.E))
    assert torch.equal(aux.tokens_per_group_G, torch.bincount(routing.group_ids_TJ.flatten(), minlength=case.G))
    in_chosen_group_TK = (routing.expert_ids_TK.unsqueeze(-1) // M == routing.group_ids_TJ.unsqueeze(1)).any(-1)
    assert in_chosen_group_TK.all()
    assert aux.num_dropped.shape == () and aux.num_dropped.dtype == torch.int64


# ------------------------------------------------------------------------------------ torch.compile


def check_compiled(backend: str) -> None:
    layer = GRID[6].layer(torch.float32)
    x = random_input(4, 5, D, dtype=torch.float32)
    y, grads = output_and_grads(layer, x, fast(layer))
    compiled = torch.compile(layer, backend=backend)
    y_c, grads_c = output_and_grads(layer, x, lambda x: compiled(x)[0])
    torch.testing.assert_close(y_c, y, atol=1e-5, rtol=1e-5)
    assert_same_grads(grads_c, grads, torch.float32)


def test_compile_aot_eager():
    # aot_eager traces forward and backward through AOTAutograd like inductor does, without
    # the C++ codegen that takes ~50 s on a 2-core CPU; the inductor run is marked slow below.
    check_compiled("aot_eager")


@pytest.mark.slow
def test_compile_inductor():
    check_compiled("inductor")


# ---------------------------------------------------------------------------------- dtype / autocast


@pytest.mark.parametrize("kind", ["linear", "mlp", "swiglu"])
def test_bfloat16_layer(kind):
    case = Case(2, 1, 8, 2, kind=kind, shared=1)
    layer16 = case.layer(torch.bfloat16)
    layer32 = case.layer(torch.float32)
    layer32.load_state_dict(layer16.state_dict())  # same (bf16-representable) weights
    x16 = random_input(2, 5, D, dtype=torch.bfloat16)
    y16, aux = layer16(x16)
    assert y16.dtype == torch.bfloat16
    assert aux.routing.expert_logits_TE.dtype == aux.routing.weights_TK.dtype == torch.float32
    y32, aux32 = layer32(x16.float())
    assert torch.equal(aux.routing.expert_ids_TK, aux32.routing.expert_ids_TK)
    torch.testing.assert_close(y16.float(), y32, atol=5e-2, rtol=5e-2)
    y16.float().pow(2).sum().backward()
    assert all(p.grad.dtype == torch.bfloat16 and p.grad.isfinite().all() for p in layer16.parameters())


# (8, 4): 16-byte aligned rows, torch._grouped_mm can run; (6, 5): unaligned, the segment loop
# runs. Both must work under autocast (the loop's matmuls autocast, the fused kernel has no rule).
@pytest.mark.parametrize("dim,hidden", [(8, 4), (6, 5)], ids=["aligned", "unaligned"])
@pytest.mark.parametrize("kind", ["linear", "mlp", "swiglu"])
@pytest.mark.parametrize("bias", [False, True])
def test_autocast_bfloat16(kind, bias, dim, hidden):
    layer = Case(2, 1, 8, 2, kind=kind, shared=1, expert_bias=bias).layer(torch.float32, dim=dim, hidden=hidden)
    x = random_input(2, 5, dim, dtype=torch.float32)
    y32, _ = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, aux = layer(x)
    assert aux.routing.expert_logits_TE.dtype == aux.routing.group_logits_TG.dtype == torch.float32
    torch.testing.assert_close(y.float(), y32, atol=5e-2, rtol=5e-2)
    y.float().pow(2).sum().backward()
    assert all(p.grad.dtype == torch.float32 for p in layer.parameters())


@pytest.mark.parametrize("kind", ["linear", "mlp", "swiglu"])
@pytest.mark.parametrize("bias", [False, True])
def test_autocast_output_dtype_is_the_autocast_dtype(kind, bias):
    # Like nn.Linear under autocast (bias or not): routed and shared experts both give bfloat16.
    layer = Case(2, 1, 8, 2, kind=kind, shared=1, expert_bias=bias).layer(torch.float32)
    x = random_input(3, D, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        routed, _ = layer.route_and_compute(x, layer.router(x))
        shared = layer.shared(x)
        y, _ = layer(x)
    assert (routed.dtype, shared.dtype, y.dtype) == (torch.bfloat16,) * 3


# ---------------------------------------------------------------------------------------- bad input

BAD_CONFIGS = [
    (lambda: MoEConfig(dim=4, hidden=4, num_experts=6, num_groups=4), ["num_experts (6)", "num_groups (4)"]),
    (lambda: MoEConfig(dim=4, hidden=4, num_experts=8, num_groups=2, groups_per_token=3), ["groups_per_token (3)"]),
    (lambda: MoEConfig(dim=4, hidden=4, num_experts=8, num_groups=4, experts_per_token=3), ["experts_per_token (3)"]),
    (lambda: MoEConfig(dim=4, hidden=4, experts_per_token=0), ["experts_per_token", "got 0"]),
    (lambda: MoEConfig(dim=0, hidden=4), ["dim", "got 0"]),
    (lambda: MoEConfig(dim=-2, hidden=4), ["dim", "got -2"]),
    (lambda: MoEConfig(dim=4, hidden=0), ["hidden", "got 0"]),
    (lambda: MoEConfig(dim=4, hidden=4, num_experts=0), ["num_experts", "got 0"]),
    (lambda: MoEConfig(dim=4, hidden=4, router=RouterOptions(score_func="tanh")), ["'tanh'"]),
    (lambda: MoEConfig(dim=4, hidden=4, router=RouterOptions(group_router="mystery")), ["'mystery'"]),
    (lambda: MoEConfig(dim=4, hidden=4, expert_kind="conv1d"), ["'conv1d'"]),  # 'conv': conv_experts.py
    (lambda: MoEConfig(dim=4, hidden=4, capacity_factor=0), ["capacity_factor", "got 0"]),
    (lambda: MoEConfig(dim=4, hidden=4, capacity_factor=-1), ["capacity_factor", "got -1"]),
    (lambda: MoEConfig(dim=4, hidden=4, eval_capacity_factor=0.0), ["eval_capacity_factor", "got 0.0"]),
]


@pytest.mark.parametrize("build,words", BAD_CONFIGS)
def test_bad_config(build, words):
    with pytest.raises(ValueError) as info:
        build()
    for word in words:
        assert word in str(info.value)


def test_top1_with_renormalised_weights_warns_that_the_router_cannot_learn():
    # K=1 renormalised: the one weight is p / p = 1, so no gradient of the loss reaches the router.
    with pytest.warns(UserWarning, match="renormalize=False"):
        cfg = MoEConfig(dim=4, hidden=4, num_experts=4, experts_per_token=1)
    layer = MoELayer(cfg)
    x = random_input(5, 4, dtype=torch.float32)
    layer(x)[0].sum().backward()
    assert all(p.grad is None or not p.grad.any() for p in layer.router.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MoEConfig(dim=4, hidden=4, num_experts=4, experts_per_token=1, router=RouterOptions(renormalize=False))
        MoEConfig(dim=4, hidden=4, num_experts=1, experts_per_token=1)  # one expert: weight 1 is right
        MoEConfig(dim=4, hidden=4, num_experts=4, experts_per_token=1, routing_mode="expert_choice")
    switch = MoELayer(MoEConfig(dim=4, hidden=4, num_experts=4, experts_per_token=1,
                                router=RouterOptions(renormalize=False)))
    switch(x)[0].sum().backward()
    assert switch.router.gate.weight.grad.abs().sum() > 0


# Python's bool is an int, so True passed every "positive int" and "number > 0" check (hidden=True built a layer
# of width 1). Each int field refuses a bool, each float field a bool (an int is a fine float), each flag a non-bool.
CONFIG_CLASSES = {  # class -> the smallest valid keyword set
    MoEConfig: dict(dim=4, hidden=4), RouterConfig: dict(dim=4, num_experts=4), RouterOptions: {},
    BalanceConfig: {}, ExpertConfig: dict(dim=4, hidden=4, num_experts=2),
}
INT_FIELDS = {
    MoEConfig: ["dim", "hidden", "num_experts", "experts_per_token", "num_groups", "groups_per_token", "out_dim",
                "num_shared_experts", "shared_hidden"],
    RouterConfig: ["dim", "num_experts", "experts_per_token", "num_groups", "groups_per_token"],
    ExpertConfig: ["dim", "hidden", "num_experts", "out_dim"],
}
FLOAT_FIELDS = {
    MoEConfig: ["capacity_factor", "eval_capacity_factor", "group_capacity_factor", "eval_group_capacity_factor"],
    RouterOptions: ["scaling_factor", "jitter_eps"],
    BalanceConfig: ["switch", "group_switch", "z", "group_z", "importance", "load"],
}
BOOL_FIELDS = {
    MoEConfig: ["expert_bias", "shared_gate"],
    RouterOptions: ["bias", "renormalize", "correction_bias", "noisy_gating", "check_finite"],
    ExpertConfig: ["bias"],
}


def typed_fields(table: dict) -> list:
    return [pytest.param(cls, name, id=f"{cls.__name__}.{name}") for cls, names in table.items() for name in names]


def refuses(cls: type, name: str, value: object) -> None:
    with pytest.raises(TypeError) as info:
        cls(**{**CONFIG_CLASSES[cls], name: value})
    assert name in str(info.value) and repr(value) in str(info.value), str(info.value)


@pytest.mark.parametrize("cls,name", typed_fields(INT_FIELDS))
def test_int_fields_refuse_bools_and_floats(cls, name):
    for value in (True, False, 2.0, "2"):
        refuses(cls, name, value)


@pytest.mark.parametrize("cls,name", typed_fields(FLOAT_FIELDS))
def test_float_fields_refuse_bools_and_take_ints(cls, name):
    for value in (True, False, "0.5"):
        refuses(cls, name, value)
    assert getattr(cls(**{**CONFIG_CLASSES[cls], name: 1 if name != "jitter_eps" else 0}), name) in (0, 1)


@pytest.mark.parametrize("cls,name", typed_fields(BOOL_FIELDS))
def test_bool_fields_take_only_bools(cls, name):
    for value in ("yes", 1, 0, None):
        refuses(cls, name, value)
    for value in (True, False):
        assert getattr(cls(**{**CONFIG_CLASSES[cls], name: value}), name) is value


def test_typed_field_lists_are_complete():
    # A new int/float/bool field of a core config must join the lists above (and so be checked).
    for cls in CONFIG_CLASSES:
        for table, kind in ((INT_FIELDS, "int"), (FLOAT_FIELDS, "float"), (BOOL_FIELDS, "bool")):
            want = {f.name for f in fields(cls) if f.type.replace(" | None", "") == kind}
            assert set(table.get(cls, [])) == want, (cls.__name__, kind)


def test_wrong_last_dimension():
    with pytest.raises(ValueError, match=rf"\(\.\.\., {D}\), got \(3, 5\)"):
        GRID[0].layer()(torch.randn(3, 5, dtype=torch.float64))


def test_zero_dim_input():
    with pytest.raises(ValueError, match=r"got \(\)"):
        GRID[0].layer()(torch.tensor(1.0, dtype=torch.float64))


def test_integer_input():
    with pytest.raises(TypeError, match="torch.int64"):
        GRID[0].layer()(torch.ones(3, D, dtype=torch.int64))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("case", [GRID[0], GRID[2]], ids=str)
def test_non_finite_input(case, bad):
    x = random_input(3, D).detach()
    x[1, 2] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        case.layer()(x)


def test_shared_hidden_sets_the_shared_width():
    # Qwen2-MoE: one shared expert whose width is not a multiple of the routed experts' F.
    layer = make_layer(dim=D, hidden=5, num_experts=4, num_shared_experts=1, shared_hidden=7, shared_gate=True)
    assert layer.shared.ffn.inner.w2.shape[1] == 7
    x_TD = random_input(6, D).detach()
    want = torch.sigmoid(x_TD @ layer.shared.gate.weight.T) * textbook_ffn(layer.shared.ffn.inner, 0, x_TD)
    routed, _ = layer.route_and_compute(x_TD, layer.router(x_TD))
    torch.testing.assert_close(layer(x_TD)[0] - routed, want)
    with pytest.raises(ValueError, match="shared_hidden must be None or a positive int, got 0"):
        MoEConfig(dim=D, hidden=5, shared_hidden=0)


# ------------------------------------------------------------------------------------------ direct rows
# A handful of routed rows with nothing needing a gradient (decoding) skips the sort-based dispatch and
# runs each row's expert directly (MoELayer._route_direct); it must give what the dispatch gives.


@pytest.mark.parametrize("T", [1, 2])
@pytest.mark.parametrize("case", GRID, ids=str)
def test_direct_rows_equal_the_dispatch(case, T, monkeypatch):
    if T * case.K > layer_mod.DIRECT_MAX_ROWS:
        pytest.skip("more rows than the direct path takes")
    layer = case.layer().eval()
    x = random_input(T, D).detach()
    mask = torch.tensor([True, False][:T]) if T > 1 else None
    with torch.no_grad():
        calls = []
        monkeypatch.setattr(layer_mod, "plan_dispatch", lambda *a, **k: calls.append(a) or plan_dispatch(*a, **k))
        direct, direct_aux = layer(x, mask)
        assert calls == []  # the dispatch did not run
        monkeypatch.setattr(layer_mod, "DIRECT_MAX_ROWS", 0)
        want, want_aux = layer(x, mask)
        assert len(calls) == 1
    torch.testing.assert_close(direct, want, atol=1e-12, rtol=1e-12)
    for name in ("tokens_per_expert_E", "tokens_per_group_G", "dropped_per_expert_E", "num_dropped", "loss"):
        torch.testing.assert_close(getattr(direct_aux, name), getattr(want_aux, name), msg=name)
    assert direct_aux.losses.keys() == want_aux.losses.keys()


def test_direct_rows_only_without_gradients_and_on_few_rows(monkeypatch):
    layer = GRID[2].layer()
    calls = []
    monkeypatch.setattr(layer_mod, "plan_dispatch", lambda *a, **k: calls.append(a) or plan_dispatch(*a, **k))
    layer(random_input(1, D))  # training: parameters need gradients
    assert len(calls) == 1
    with torch.no_grad():
        layer(random_input(layer_mod.DIRECT_MAX_ROWS, D))  # T * K = 2 * DIRECT_MAX_ROWS rows
    assert len(calls) == 2
    with torch.no_grad():
        layer(random_input(1, D))
    assert len(calls) == 2


def test_direct_rows_check_dtypes_and_follow_autocast(monkeypatch):
    layer = GRID[2].layer().eval()  # float64 weights
    with torch.no_grad(), pytest.raises(TypeError, match="does not match expert weights"):
        layer(torch.randn(1, D))  # a float32 token: the same clear error as the dispatch gives
    layer = GRID[2].layer(torch.float32).eval()
    x = random_input(1, D, dtype=torch.float32).detach()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        direct = layer(x)[0]
        monkeypatch.setattr(layer_mod, "DIRECT_MAX_ROWS", 0)
        want = layer(x)[0]
    assert direct.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(direct.float(), want.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("mode", ["token_choice", "expert_choice"])
def test_aux_carries_the_padding_mask_so_logged_entropy_skips_padding(mode):
    from dualroute.losses import router_entropy
    extra = {"capacity_factor": 2.0} if mode == "expert_choice" else {}
    layer = make_layer(num_experts=4, experts_per_token=2, routing_mode=mode, **extra)
    x_BSD = random_input(2, 5, 6)
    mask_BS = torch.tensor([[True, True, True, False, False], [True, False, False, False, False]])
    _, aux = layer(x_BSD, mask_BS)
    assert torch.equal(aux.mask_T, mask_BS.reshape(-1))
    _, real = layer(x_BSD[mask_BS])  # the real tokens alone
    assert real.mask_T is None
    assert router_entropy(aux.routing.probs_TE, aux.mask_T) == pytest.approx(router_entropy(real.routing.probs_TE))
    assert router_entropy(aux.routing.probs_TE) != pytest.approx(router_entropy(real.routing.probs_TE))
