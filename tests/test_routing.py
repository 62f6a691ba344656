"""Router: flat top-k as the G = 1 special case, the two group-router kinds on hand-set
numbers, correction bias, renormalisation/scaling, sigmoid scores, and training-only noise.

Shapes: T tokens, D model dim, G groups, M experts per group, E = G*M, J groups kept, K experts kept.
"""

import contextlib
import math

import pytest
import torch

from dualroute import routing as routing_mod
from dualroute.routing import TIE_FREE_KEY_MIN_NUMEL, Router, RouterConfig, RouterOptions, top_indices


def make_router(D=2, E=4, K=2, G=1, J=1, seed=0, dtype=torch.float64, **options) -> Router:
    torch.manual_seed(seed)
    router = Router(RouterConfig(D, E, K, G, J, RouterOptions(**options)))
    return router.to(dtype).eval()


def set_linear(linear: torch.nn.Linear, weight, bias=None) -> None:
    with torch.no_grad():
        linear.weight.copy_(torch.as_tensor(weight, dtype=linear.weight.dtype))
        if linear.bias is not None:
            linear.bias.copy_(torch.zeros_like(linear.bias) if bias is None else torch.as_tensor(bias))


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def as_sets(ids_TK: torch.Tensor) -> list[set]:
    return [set(row.tolist()) for row in ids_TK]


def weight_by_expert(routing) -> list[dict]:
    """Per token, {expert: weight}: independent of the order topk lists the K slots in."""
    return [dict(zip(ids.tolist(), w.tolist())) for ids, w in zip(routing.expert_ids_TK, routing.weights_TK)]


# ------------------------------------------------------------------------------------- G = 1 is flat top-k


def flat_topk(x_TD, gate: torch.nn.Linear, K: int, renormalize: bool):
    """Independent flat top-k softmax routing, the textbook few lines."""
    probs_TE = torch.softmax(x_TD @ gate.weight.T + gate.bias, dim=-1)
    weights_TK, ids_TK = probs_TE.topk(K, dim=-1)
    if renormalize:
        weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True)
    return ids_TK, weights_TK


@pytest.mark.parametrize("group_router", ["learned", "derived"])
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("E,K", [(4, 1), (8, 2), (8, 8)])
def test_one_group_is_flat_topk(group_router, renormalize, E, K):
    router = make_router(D=5, E=E, K=K, group_router=group_router, renormalize=renormalize)
    x_TD = torch.randn(16, 5, dtype=torch.float64)
    routing = router(x_TD)
    ids_TK, weights_TK = flat_topk(x_TD, router.gate, K, renormalize)
    assert torch.equal(routing.expert_ids_TK, ids_TK)
    torch.testing.assert_close(routing.weights_TK, weights_TK, atol=1e-12, rtol=1e-12)
    assert routing.group_ids_TJ.eq(0).all()


# ------------------------------------------------------------------------- learned two-level, by hand

# Two tokens, x_A = (1, 0) and x_B = (0, 1), so column c of each gate weight is token c's logits.
#   token A: p(g) = softmax(ln 3, ln 2) = (.6, .4);  p(i|g) = (.5, .5 | .9, .1)
#            -> p(g) p(i|g) = (.3, .3, .36, .04): expert 2 beats both experts of group 0
#   token B: p(g) = softmax(0, ln 3) = (.25, .75);   p(i|g) = (.75, .25 | .2, .8)
#            -> (.1875, .0625, .15, .6)
HAND_GROUP_LOGITS = [[math.log(3), 0.0], [math.log(2), math.log(3)]]  # (G, D)
HAND_EXPERT_LOGITS = [[0.0, math.log(3)], [0.0, 0.0], [math.log(9), 0.0], [0.0, math.log(4)]]  # (E, D)
HAND_SCORES = [[0.3, 0.3, 0.36, 0.04], [0.1875, 0.0625, 0.15, 0.6]]


def hand_learned_router(J: int, K: int) -> Router:
    router = make_router(D=2, E=4, K=K, G=2, J=J, renormalize=False)
    set_linear(router.gate, HAND_EXPERT_LOGITS)
    set_linear(router.group_gate, HAND_GROUP_LOGITS)
    return router


def test_learned_weights_are_group_prob_times_expert_prob():
    routing = hand_learned_router(J=2, K=4)(torch.eye(2, dtype=torch.float64))
    torch.testing.assert_close(routing.scores_TE, torch.tensor(HAND_SCORES, dtype=torch.float64))
    torch.testing.assert_close(routing.group_scores_TG, torch.tensor([[0.6, 0.4], [0.25, 0.75]], dtype=torch.float64))
    for t, chosen in enumerate(weight_by_expert(routing)):
        assert chosen == pytest.approx({e: HAND_SCORES[t][e] for e in range(4)})


def test_learned_picks_experts_only_from_the_kept_groups():
    routing = hand_learned_router(J=1, K=2)(torch.eye(2, dtype=torch.float64))
    assert routing.group_ids_TJ.tolist() == [[0], [1]]
    # Token A: expert 2 (.36) outweighs experts 0 and 1 (.3) but its group was not kept.
    assert weight_by_expert(routing) == [pytest.approx({0: 0.3, 1: 0.3}), pytest.approx({3: 0.6, 2: 0.15})]


def test_learned_two_groups_take_the_best_k_of_their_experts():
    routing = hand_learned_router(J=2, K=3)(torch.eye(2, dtype=torch.float64))
    assert weight_by_expert(routing) == [
        pytest.approx({2: 0.36, 0: 0.3, 1: 0.3}),
        pytest.approx({3: 0.6, 0: 0.1875, 2: 0.15}),
    ]


@pytest.mark.parametrize("group_router", ["learned", "derived"])
@pytest.mark.parametrize("G,J,E,K", [(2, 1, 8, 2), (4, 2, 8, 3), (4, 3, 12, 5)])
def test_experts_come_from_chosen_groups(group_router, G, J, E, K):
    router = make_router(D=6, E=E, K=K, G=G, J=J, group_router=group_router, correction_bias=True)
    routing = router(torch.randn(32, 6, dtype=torch.float64))
    M = E // G
    for groups, experts in zip(routing.group_ids_TJ.tolist(), routing.expert_ids_TK.tolist()):
        assert len(set(groups)) == J and len(set(experts)) == K
        assert {e // M for e in experts} <= set(groups)


# -------------------------------------------------------------------- derived group score, by hand

# Sigmoid scores, G = 2 groups of M = 3:   group 0 = (.9, .1, .05),   group 1 = (.6, .55, .5)
#   DeepSeek-V3 (sum of top 2): (1.0, 1.15) -> group 1;   DeepSeek-V2 (max): (.9, .6) -> group 0
HAND_SIGMOID = [0.9, 0.1, 0.05, 0.6, 0.55, 0.5]


def hand_derived_router(group_score: str, correction_bias: bool = False) -> Router:
    router = make_router(
        D=2, E=6, K=2, G=2, J=1, group_router="derived", group_score=group_score, score_func="sigmoid",
        renormalize=False, correction_bias=correction_bias,
    )
    set_linear(router.gate, torch.zeros(6, 2), [logit(p) for p in HAND_SIGMOID])
    return router


X_ONE = torch.zeros(1, 2, dtype=torch.float64)


@pytest.mark.parametrize(
    "group_score,group_scores,chosen",
    [
        ("top2_sum", [1.0, 1.15], {3: 0.6, 4: 0.55}),  # DeepSeek-V3
        ("max", [0.9, 0.6], {0: 0.9, 1: 0.1}),  # DeepSeek-V2
    ],
)
def test_derived_group_score(group_score, group_scores, chosen):
    routing = hand_derived_router(group_score)(X_ONE)
    torch.testing.assert_close(routing.group_scores_TG, torch.tensor([group_scores], dtype=torch.float64))
    assert weight_by_expert(routing) == [pytest.approx(chosen)]


@pytest.mark.parametrize(
    "bias_on,group_scores,chosen",
    [
        # +1 on expert 5: still group 1, but expert 5 (score .5) displaces expert 4 (.55).
        (5, [1.0, 2.1], {3: 0.6, 5: 0.5}),
        # +1 on expert 2: group 0's biased top-2 sum (1.95) now wins the group choice too.
        (2, [1.95, 1.15], {2: 0.05, 0: 0.9}),
    ],
)
def test_correction_bias_changes_selection_not_weights(bias_on, group_scores, chosen):
    router = hand_derived_router("top2_sum", correction_bias=True)
    router.expert_bias_E[bias_on] = 1.0
    routing = router(X_ONE)
    # The V3 group score is computed from the *selection* scores, bias included ...
    torch.testing.assert_close(routing.group_scores_TG, torch.tensor([group_scores], dtype=torch.float64))
    # ... but each chosen expert weighs its unbiased sigmoid score.
    assert weight_by_expert(routing) == [pytest.approx(chosen)]


@pytest.mark.parametrize("group_router", ["learned", "derived"])
def test_huge_correction_bias_forces_selection_weights_stay_unbiased(group_router):
    router = make_router(D=6, E=8, K=2, G=2, J=1, group_router=group_router, renormalize=False,
                         correction_bias=True)
    router.expert_bias_E[5] = 100.0
    router.group_bias_G[1] = 100.0
    routing = router(torch.randn(20, 6, dtype=torch.float64))
    assert (routing.expert_ids_TK == 5).any(-1).all()
    assert routing.group_ids_TJ.eq(1).all()
    torch.testing.assert_close(routing.weights_TK, routing.scores_TE.gather(1, routing.expert_ids_TK))


# ------------------------------------------------------------------------------- ties: lowest index wins
# torch.topk promises no order among equal values. The router picks the lowest index among equal scores,
# at both levels, on every device; the reference (a stable Python sort) does the same.


def python_top(row: list[float], k: int) -> list[int]:
    return sorted(range(len(row)), key=lambda i: -row[i])[:k]  # sorted is stable: equal -> lower index first


TIE_VALUES = [float("-inf"), -2.0, -0.0, 0.0, 0.25, 1.0, 1.0 - 2**-24]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("T,n,k", [(1, 8, 2), (5, 3, 3), (2048, 8, 2), (300, 64, 8), (64, 1, 1)])
def test_top_indices_lowest_index_wins(T, n, k, dtype):
    # Both implementations are exercised: the int64-key topk (float32, >= TIE_FREE_KEY_MIN_NUMEL scores)
    # and the stable sort (the rest); -0.0 and 0.0 are equal scores.
    gen = torch.Generator().manual_seed(T * n + k)
    values = torch.tensor(TIE_VALUES, dtype=dtype)
    scores = values[torch.randint(len(TIE_VALUES), (n, T), generator=gen)].t()  # a transposed view
    ids = top_indices(scores, k)
    assert ids.shape == (T, k) and ids.dtype == torch.int64
    assert ids.tolist() == [python_top(row, k) for row in scores.tolist()]


def test_top_indices_takes_both_paths():
    assert 2048 * 8 >= TIE_FREE_KEY_MIN_NUMEL > 5 * 3  # the parametrisation above covers the two


def tie_router(G, J, K, dtype, **options) -> Router:
    router = make_router(D=3, E=8, K=K, G=G, J=J, dtype=dtype, **options)
    with torch.no_grad():
        for p in router.parameters():
            p.zero_()
    return router


TIE_SHAPES = [(1, 1, 2), (2, 1, 3), (4, 2, 3), (4, 3, 5), (4, 4, 8)]  # (G, J, K) over E = 8


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("group_router", ["learned", "derived"])
@pytest.mark.parametrize("G,J,K", TIE_SHAPES)
@pytest.mark.parametrize("T", [3, 2048])
def test_zeroed_router_takes_the_lowest_groups_and_experts(G, J, K, group_router, score_func, dtype, T):
    router = tie_router(G, J, K, dtype, group_router=group_router, score_func=score_func)
    routing = router(torch.randn(T, 3, dtype=dtype))
    assert routing.group_ids_TJ.tolist() == [list(range(J))] * T
    assert routing.expert_ids_TK.tolist() == [list(range(K))] * T


@pytest.mark.parametrize("dtype,big", [(torch.float32, 20.0), (torch.float64, 40.0)], ids=["float32", "float64"])
@pytest.mark.parametrize("group_router", ["learned", "derived"])
@pytest.mark.parametrize("G,J,K", TIE_SHAPES)
def test_saturated_sigmoid_takes_the_lowest_experts(G, J, K, group_router, dtype, big):
    # Distinct logits above ~17 (float32) or ~37 (float64) all give a sigmoid of exactly 1.0.
    router = tie_router(G, J, K, dtype, group_router=group_router, score_func="sigmoid")
    with torch.no_grad():
        router.gate.bias.copy_(big + torch.arange(8.0).flip(0))  # the highest logit on the highest index
    routing = router(torch.randn(5, 3, dtype=dtype))
    assert routing.expert_logits_TE.unique().numel() == 8
    assert routing.scores_TE.eq(routing.scores_TE[0, 0]).all()  # sigmoid 1.0 (learned: times p(g) = 1 / G)
    assert routing.group_ids_TJ.tolist() == [list(range(J))] * 5
    assert routing.expert_ids_TK.tolist() == [list(range(K))] * 5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("group_router", ["learned", "derived"])
def test_equal_group_scores_take_the_lowest_groups(group_router, dtype):
    # Every group has the same experts' scores (0.1, 0.4): the group scores tie, experts inside do not.
    router = tie_router(4, 2, 3, dtype, group_router=group_router, score_func="sigmoid", renormalize=False)
    with torch.no_grad():
        router.gate.bias.copy_(torch.tensor([logit(0.1), logit(0.4)] * 4))
    routing = router(torch.randn(5, 3, dtype=dtype))
    assert routing.group_ids_TJ.tolist() == [[0, 1]] * 5
    assert routing.expert_ids_TK.tolist() == [[1, 3, 0]] * 5  # 0.4, 0.4, then the lower of the 0.1s


# ------------------------------------------------------------------------------------ finite check
# The router refuses NaN/Inf logits; finite logits, however large, pass. At once on the CPU; inside
# deferred_finite_checks on a GPU one host read at the end (IMMEDIATE_CHECK_DEVICE_TYPES emptied runs it here).


@pytest.fixture(params=["immediate", "deferred"])
def finite_check(request, monkeypatch):
    if request.param == "immediate":
        return contextlib.nullcontext
    monkeypatch.setattr(routing_mod, "IMMEDIATE_CHECK_DEVICE_TYPES", ())
    return routing_mod.deferred_finite_checks


@pytest.mark.parametrize("dtype,huge", [(torch.float32, 1e36), (torch.float32, 3e38), (torch.float64, 1e306)],
                         ids=["float32-1e36", "float32-3e38", "float64-1e306"])
@pytest.mark.parametrize("G,J", [(1, 1), (4, 2)])
def test_huge_finite_logits_pass_the_finite_check(G, J, dtype, huge, finite_check):
    # 64 tokens x 8 logits of 1e36 sum to 5e38, past float32's largest finite 3.4e38.
    router = make_router(D=3, E=8, K=2, G=G, J=J, dtype=dtype)
    with torch.no_grad():
        for linear in (router.gate, router.group_gate):
            if linear is not None:
                linear.weight.zero_()
                linear.bias.fill_(huge)
    with finite_check():
        routing = router(torch.randn(64, 3, dtype=dtype))
    assert routing.expert_logits_TE.isfinite().all() and routing.weights_TK.isfinite().all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", ["expert", "group"])
def test_one_non_finite_logit_fails_the_finite_check(where, bad, finite_check):
    gen = torch.Generator().manual_seed(0)
    for shape in [(5, 8), (3, 72)]:  # every position, so a vectorised reduction's tail is covered too
        logits = {"expert": torch.randn(shape, generator=gen), "group": torch.randn(shape[0], 4, generator=gen)}
        flat = logits[where].view(-1)
        for i in range(flat.numel()):
            saved, flat[i] = flat[i].item(), bad
            with pytest.raises(ValueError, match="NaN or Inf"), finite_check():
                routing_mod._check_finite(logits["expert"], logits["group"])
            flat[i] = saved
        with finite_check():
            routing_mod._check_finite(logits["expert"], logits["group"])  # all finite again: passes


# ---------------------------------------------------------------------------------------- options

ROUTER_SHAPES = [
    dict(E=8, K=2, G=1, J=1, group_router="learned"),
    dict(E=8, K=3, G=4, J=2, group_router="learned"),
    dict(E=8, K=3, G=4, J=2, group_router="derived"),
]


@pytest.mark.parametrize("shape", ROUTER_SHAPES)
@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("scaling_factor", [1.0, 2.5])
def test_renormalized_weights_sum_to_scaling_factor(shape, score_func, scaling_factor):
    router = make_router(D=6, score_func=score_func, scaling_factor=scaling_factor, **shape)
    routing = router(torch.randn(16, 6, dtype=torch.float64))
    torch.testing.assert_close(routing.weights_TK.sum(-1), torch.full((16,), scaling_factor, dtype=torch.float64))


@pytest.mark.parametrize("shape", ROUTER_SHAPES)
@pytest.mark.parametrize("renormalize", [True, False])
def test_scaling_factor_scales_weights_only(shape, renormalize):
    x_TD = torch.randn(16, 6, dtype=torch.float64)
    plain = make_router(D=6, renormalize=renormalize, **shape)(x_TD)
    scaled = make_router(D=6, renormalize=renormalize, scaling_factor=2.5, **shape)(x_TD)
    assert torch.equal(plain.expert_ids_TK, scaled.expert_ids_TK)
    torch.testing.assert_close(scaled.weights_TK, 2.5 * plain.weights_TK)


def test_unnormalized_weights_are_the_scores():
    router = make_router(D=6, E=8, K=3, G=4, J=2, group_router="derived", renormalize=False)
    routing = router(torch.randn(16, 6, dtype=torch.float64))
    torch.testing.assert_close(routing.weights_TK, routing.scores_TE.gather(1, routing.expert_ids_TK))


@pytest.mark.parametrize("group_router", ["learned", "derived"])
def test_sigmoid_scores(group_router):
    router = make_router(D=6, E=8, K=3, group_router=group_router, score_func="sigmoid", renormalize=False)
    x_TD = torch.randn(16, 6, dtype=torch.float64)
    routing = router(x_TD)
    logits_TE = router.gate(x_TD)
    torch.testing.assert_close(routing.scores_TE, logits_TE.sigmoid())
    top_logits_TK, top_ids_TK = logits_TE.topk(3, dim=-1)  # sigmoid is monotonic
    assert as_sets(routing.expert_ids_TK) == as_sets(top_ids_TK)
    torch.testing.assert_close(routing.weights_TK.sort(-1).values, top_logits_TK.sigmoid().sort(-1).values)


NOISY = [dict(noisy_gating=True), dict(jitter_eps=0.3), dict(noisy_gating=True, jitter_eps=0.3)]


def routed(router: Router, x_TD: torch.Tensor, seed: int):
    torch.manual_seed(seed)
    routing = router(x_TD)
    return routing.expert_logits_TE, routing.weights_TK


@pytest.mark.parametrize("noise", NOISY)
def test_noise_is_off_in_eval(noise):
    x_TD = torch.randn(16, 6, dtype=torch.float64)
    noisy = make_router(D=6, E=8, K=2, **noise)
    clean = make_router(D=6, E=8, K=2)
    clean.gate.load_state_dict(noisy.gate.state_dict())
    first, second = routed(noisy, x_TD, seed=1), routed(noisy, x_TD, seed=2)
    for a, b, c in zip(first, second, routed(clean, x_TD, seed=3)):
        assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("noise", NOISY)
def test_noise_acts_in_training(noise):
    x_TD = torch.randn(16, 6, dtype=torch.float64)
    router = make_router(D=6, E=8, K=2, **noise).train()
    logits_1, _ = routed(router, x_TD, seed=1)
    logits_1_again, _ = routed(router, x_TD, seed=1)
    logits_2, _ = routed(router, x_TD, seed=2)
    assert torch.equal(logits_1, logits_1_again)
    assert not torch.allclose(logits_1, logits_2)


def test_noisy_gating_noise_scale_is_learned():
    router = make_router(D=6, E=8, K=2, noisy_gating=True).train()
    _, weights_TK = routed(router, torch.randn(16, 6, dtype=torch.float64), seed=0)
    weights_TK.pow(2).sum().backward()
    assert router.noise.weight.grad is not None and router.noise.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------ dtypes


@pytest.mark.parametrize("dtype,want", [(torch.float64, torch.float64), (torch.float32, torch.float32),
                                        (torch.bfloat16, torch.float32)])
def test_routing_dtype(dtype, want):
    router = make_router(D=6, E=8, K=3, G=4, J=2, dtype=dtype)
    routing = router(torch.randn(5, 6, dtype=dtype))
    for tensor in (routing.expert_logits_TE, routing.scores_TE, routing.weights_TK, routing.group_logits_TG):
        assert tensor.dtype == want
    assert routing.expert_ids_TK.dtype == routing.group_ids_TJ.dtype == torch.int64


def test_routing_logits_stay_float32_under_autocast():
    router = make_router(D=6, E=8, K=3, G=4, J=2, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        routing = router(torch.randn(5, 6))
    assert routing.expert_logits_TE.dtype == routing.group_logits_TG.dtype == routing.weights_TK.dtype == torch.float32


# ------------------------------------------------------------------------------------ bad configs

BAD_ROUTER_CONFIGS = [
    (dict(num_experts=6, num_groups=4), ["num_experts (6)", "num_groups (4)"]),
    (dict(num_experts=8, num_groups=2, groups_per_token=3), ["groups_per_token (3)", "(2)"]),
    (dict(num_experts=8, num_groups=4, groups_per_token=1, experts_per_token=3), ["experts_per_token (3)", "= 2"]),
    (dict(experts_per_token=0), ["experts_per_token", "got 0"]),
    (dict(dim=0), ["dim", "got 0"]),
    (dict(num_experts=-1), ["num_experts", "got -1"]),
]


@pytest.mark.parametrize("kwargs,words", BAD_ROUTER_CONFIGS)
def test_bad_router_config(kwargs, words):
    with pytest.raises(ValueError) as info:
        RouterConfig(**{"dim": 4, "num_experts": 8, **kwargs})
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize(
    "kwargs,word",
    [
        (dict(score_func="tanh"), "'tanh'"),
        (dict(group_router="mystery"), "'mystery'"),
        (dict(group_score="median"), "'median'"),
        (dict(scaling_factor=0.0), "0.0"),
        (dict(jitter_eps=1.5), "1.5"),
    ],
)
def test_bad_router_options(kwargs, word):
    with pytest.raises(ValueError, match=word):
        RouterOptions(**kwargs)
