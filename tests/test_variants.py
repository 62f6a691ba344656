"""Named router variants against hand-computed cases, and expert-choice routing against a plain loop.

Hand cases set the router weights so the logits are chosen numbers: with ``x = I`` (T tokens,
D = T) and ``gate.weight = logits_TE.T``, token t's logits are row t of ``logits_TE``. Softmax
cases use logits ``ln p`` (so the probabilities are p); sigmoid cases use ``ln(p / (1 - p))``.

Shapes: T tokens, D model dim, E experts, K experts per token, C tokens per expert.
"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import assert_same_grads, fast, make_layer, output_and_grads, random_input
from dualroute.balance import BalanceConfig
from dualroute.expert_choice import expert_choice_capacity
from dualroute.layer import MoEConfig, MoELayer
from dualroute.routing import RouterOptions
from dualroute.variants import VARIANTS, router_variant, variant_fields

ATOL = 1e-12  # float64 routing: hand numbers hold to rounding


def hand_layer(name: str, logits_TE: torch.Tensor, gate_bias_E: torch.Tensor | None = None, **fields) -> MoELayer:
    """A float64 eval layer of variant ``name`` whose router gives ``logits_TE`` for ``x = eye(T)``."""
    T, E = logits_TE.shape
    layer = MoELayer(router_variant(name, dim=T, hidden=3, num_experts=E, **fields)).double().eval()
    bias_E = torch.zeros(E, dtype=torch.float64) if gate_bias_E is None else gate_bias_E
    with torch.no_grad():
        layer.router.gate.weight.copy_((logits_TE - bias_E).T)
        if layer.router.gate.bias is not None:
            layer.router.gate.bias.copy_(bias_E)
    return layer


def log(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64).log()


def logit(values) -> torch.Tensor:
    p = torch.tensor(values, dtype=torch.float64)
    return (p / (1 - p)).log()


def route(layer: MoELayer):
    T = layer.cfg.dim
    y, aux = layer(torch.eye(T, dtype=torch.float64))
    return y, aux


def assert_routed(aux, ids, weights) -> None:
    assert aux.routing.expert_ids_TK.tolist() == ids
    torch.testing.assert_close(aux.routing.weights_TK, torch.tensor(weights, dtype=torch.float64),
                               atol=ATOL, rtol=0)


# Two tokens over four experts: probabilities (.1, .2, .3, .4) and (.4, .1, .2, .3).
SOFTMAX_LOGITS = log([[1, 2, 3, 4], [4, 1, 2, 3]])


def test_seed_is_the_dense_soft_mixture_with_router_bias():
    bias = log([1, 1, 2, 1])  # part of the logits comes from the bias: it must be used
    layer = hand_layer("seed", SOFTMAX_LOGITS, gate_bias_E=bias)
    y, aux = route(layer)
    assert layer.cfg.experts_per_token == 4 and layer.router.gate.bias is not None
    assert_routed(aux, [[3, 2, 1, 0], [0, 3, 2, 1]], [[0.4, 0.3, 0.2, 0.1], [0.4, 0.3, 0.2, 0.1]])
    x = torch.eye(2, dtype=torch.float64)
    p = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.4, 0.1, 0.2, 0.3]], dtype=torch.float64)
    want = sum(p[:, e : e + 1] * layer.experts.forward_one(e, x) for e in range(4))
    torch.testing.assert_close(y, want, atol=ATOL, rtol=0)


def test_mixtral_renormalises_the_top_k():
    layer = hand_layer("mixtral", SOFTMAX_LOGITS)
    _, aux = route(layer)
    assert layer.router.gate.bias is None
    # token 0 keeps .4 and .3 -> 4/7, 3/7; token 1 keeps .4 (expert 0) and .3 (expert 3)
    assert_routed(aux, [[3, 2], [0, 3]], [[4 / 7, 3 / 7], [4 / 7, 3 / 7]])
    # softmax-then-renormalise == softmax over the kept logits
    kept = SOFTMAX_LOGITS.gather(1, aux.routing.expert_ids_TK)
    torch.testing.assert_close(aux.routing.weights_TK, kept.softmax(-1), atol=ATOL, rtol=0)


def test_mixtral_takes_k():
    _, aux = route(hand_layer("mixtral", SOFTMAX_LOGITS, experts_per_token=3))
    assert_routed(aux, [[3, 2, 1], [0, 3, 2]], [[4 / 9, 3 / 9, 2 / 9], [4 / 9, 3 / 9, 2 / 9]])


def test_switch_is_top1_without_renormalisation():
    layer = hand_layer("switch", SOFTMAX_LOGITS)
    _, aux = route(layer)
    assert layer.router.gate.bias is None
    assert_routed(aux, [[3], [0]], [[0.4], [0.4]])


# Six experts in three groups of two; sigmoid scores chosen by hand.
# token 0: group sums (top-2 of 2) 1.0, 1.1, 1.05 -> groups 1, 2 -> best 3 of {.6, .5, .25, .8}
# token 1: group sums 1.1, 0.3, 1.0 -> groups 0, 2 -> best 3 of {.6, .5, .9, .1}
DEEPSEEK_SCORES = [[0.9, 0.1, 0.6, 0.5, 0.25, 0.8], [0.6, 0.5, 0.1, 0.2, 0.9, 0.1]]
DEEPSEEK_SIZES = dict(num_groups=3, groups_per_token=2, experts_per_token=3, scaling_factor=2.5)


def test_deepseek_v3_group_limited_sigmoid_routing():
    layer = hand_layer("deepseek_v3", logit(DEEPSEEK_SCORES), **DEEPSEEK_SIZES)
    _, aux = route(layer)
    assert layer.router.gate.bias is None and layer.router.expert_bias_E is not None
    # expert 0 has the best score of token 0 but its group is not kept
    assert aux.routing.group_ids_TJ.tolist() == [[1, 2], [0, 2]]
    assert_routed(aux, [[5, 2, 3], [4, 0, 1]],
                  [[2.5 * 0.8 / 1.9, 2.5 * 0.6 / 1.9, 2.5 * 0.5 / 1.9],
                   [2.5 * 0.9 / 2.0, 2.5 * 0.6 / 2.0, 2.5 * 0.5 / 2.0]])


def test_deepseek_v3_correction_bias_flips_choice_not_weights():
    layer = hand_layer("deepseek_v3", logit(DEEPSEEK_SCORES), **DEEPSEEK_SIZES)
    with torch.no_grad():
        layer.router.expert_bias_E[4] = 0.3  # expert 4 now ranks at .55 > .5 (expert 3) for token 0
    _, aux = route(layer)
    # token 0 swaps expert 3 for expert 4, weighed by its unbiased .25; token 1 already had expert 4
    assert_routed(aux, [[5, 2, 4], [4, 0, 1]],
                  [[2.5 * 0.8 / 1.65, 2.5 * 0.6 / 1.65, 2.5 * 0.25 / 1.65],
                   [2.5 * 0.9 / 2.0, 2.5 * 0.6 / 2.0, 2.5 * 0.5 / 2.0]])


# Four tokens, four experts, C = ceil(1 * 4 * 1 / 4) = 1: each expert takes its single best token.
# Columns (experts): 0 -> token 0 (.4), 1 -> token 0 (.4), 2 -> token 2 (.5), 3 -> token 1 (.3).
EC_PROBS = [[0.4, 0.4, 0.1, 0.1], [0.3, 0.2, 0.2, 0.3], [0.1, 0.3, 0.5, 0.1], [0.25, 0.25, 0.25, 0.25]]


def test_expert_choice_hand_case():
    layer = hand_layer("expert_choice", log(EC_PROBS), experts_per_token=1)
    y, aux = route(layer)
    assert_routed(aux, [[0, 1, -1, -1], [-1, -1, -1, 3], [-1, -1, 2, -1], [-1, -1, -1, -1]],
                  [[0.4, 0.4, 0, 0], [0, 0, 0, 0.3], [0, 0, 0.5, 0], [0, 0, 0, 0]])
    assert aux.tokens_per_expert_E.tolist() == [1, 1, 1, 1]
    assert int(aux.num_dropped) == 1 and aux.tokens_per_group_G.tolist() == [3]  # token 3: no expert
    x = torch.eye(4, dtype=torch.float64)
    f = [layer.experts.forward_one(e, x) for e in range(4)]
    want = torch.stack([0.4 * f[0][0] + 0.4 * f[1][0], 0.3 * f[3][1], 0.5 * f[2][2], torch.zeros(4)])
    torch.testing.assert_close(y, want, atol=ATOL, rtol=0)


# ------------------------------------------------------------------------ the variant registry


def test_every_variant_builds_and_trains():
    sizes = dict(dim=6, hidden=5, num_experts=8)
    extra = {"deepseek_v3": dict(num_groups=4, groups_per_token=2, experts_per_token=2)}
    for name in VARIANTS:
        layer = MoELayer(router_variant(name, **sizes, **extra.get(name, {})))
        y, aux = layer(torch.randn(2, 5, 6))
        (y.square().mean() + aux.loss).backward()
        assert layer.router.gate.weight.grad is not None, name


def test_unknown_variant_lists_names():
    with pytest.raises(ValueError, match="'gshard'.*deepseek_v3.*expert_choice.*mixtral.*seed.*switch"):
        router_variant("gshard", dim=4, hidden=4)


def test_a_field_the_variant_fixes_is_rejected():
    with pytest.raises(ValueError, match=r"'switch' sets \['experts_per_token'\]"):
        router_variant("switch", dim=4, hidden=4, experts_per_token=2)
    with pytest.raises(ValueError, match=r"\['router'\]"):
        router_variant("mixtral", dim=4, hidden=4, router=RouterOptions())


def test_variant_keeps_the_callers_other_fields():
    fields = variant_fields("deepseek_v3", dim=4, hidden=8, num_experts=16, num_groups=4, groups_per_token=2,
                            experts_per_token=4, scaling_factor=1.5, capacity_factor=1.25)
    assert fields["router"].scaling_factor == 1.5 and "scaling_factor" not in fields
    assert fields["capacity_factor"] == 1.25 and fields["num_groups"] == 4


# ------------------------------------------------------------------------ expert choice == plain loop


def reference_expert_choice(layer: MoELayer, x_TD: torch.Tensor, capacity: int) -> torch.Tensor:
    """For each expert, sort the tokens by score and take the first C; sum ``score * f_e(x_t)``."""
    router, opt = layer.router, layer.cfg.router
    logits_TE = x_TD @ router.gate.weight.T + router.gate.bias
    scores_TE = logits_TE.softmax(-1) if opt.score_func == "softmax" else logits_TE.sigmoid()
    T, E = scores_TE.shape
    out = [torch.zeros(layer.experts.cfg.output_dim, dtype=x_TD.dtype) for _ in range(T)]
    for e in range(E):
        best = sorted(range(T), key=lambda t: -scores_TE[t, e].item())[:capacity]
        for t in best:
            out[t] = out[t] + opt.scaling_factor * scores_TE[t, e] * layer.experts.forward_one(e, x_TD[t : t + 1])[0]
    y_TD = torch.stack(out)
    if layer.shared is not None:
        y_TD = y_TD + layer.shared(x_TD)
    return y_TD


EC_CASES = [  # (E, K, capacity_factor, kind, score_func, scaling, shared)
    (4, 1, None, "swiglu", "softmax", 1.0, 0),
    (4, 2, 0.5, "mlp", "softmax", 1.0, 0),
    (8, 2, 2.0, "linear", "sigmoid", 2.0, 1),
    (3, 3, 1.5, "swiglu", "softmax", 1.0, 0),  # C = ceil(1.5 * 7 * 3 / 3) = 11 > T: every expert takes all
]


@pytest.mark.parametrize("E,K,factor,kind,score_func,scaling,shared", EC_CASES)
def test_expert_choice_matches_loop_reference(E, K, factor, kind, score_func, scaling, shared):
    layer = make_layer(num_experts=E, experts_per_token=K, capacity_factor=factor, routing_mode="expert_choice",
                       expert_kind=kind, expert_bias=True, num_shared_experts=shared, shared_gate=shared > 0,
                       router=RouterOptions(score_func=score_func, scaling_factor=scaling))
    x = random_input(7, 6)
    capacity = expert_choice_capacity(7, K, E, factor)
    got, got_grads = output_and_grads(layer, x, fast(layer))
    want, want_grads = output_and_grads(layer, x, lambda x: reference_expert_choice(layer, x, capacity))
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    assert_same_grads(got_grads, want_grads, torch.float64)


def test_expert_choice_aux():
    layer = make_layer(num_experts=8, experts_per_token=2, routing_mode="expert_choice",
                       balance=BalanceConfig(switch=0.1, z=0.01, importance=0.1, load=0.1))
    with torch.no_grad():
        layer.router.gate.weight.zero_()
        layer.router.gate.bias.zero_()
    _, aux = layer(random_input(3, 4, 6))
    C = math.ceil(12 * 2 / 8)
    assert aux.tokens_per_expert_E.tolist() == [C] * 8
    assert aux.routing.expert_ids_TK.shape == (12, 8) and aux.routing.weights_TK.shape == (12, 8)
    torch.testing.assert_close(aux.losses["z"], torch.tensor(math.log(8) ** 2, dtype=torch.float64))
    torch.testing.assert_close(aux.losses["switch"], torch.tensor(1.0, dtype=torch.float64))  # uniform probs
    aux.loss.backward()
    assert layer.router.gate.weight.grad is not None


@pytest.mark.parametrize("T", [7, 3000])  # 3000 * 4 scores: the tie-free-key path of top_indices too
def test_expert_choice_ties_take_the_earliest_tokens(T):
    # A zeroed router scores every token alike: each expert takes tokens 0 .. C-1, as the loop reference does.
    layer = make_layer(num_experts=4, experts_per_token=1, routing_mode="expert_choice", dtype=torch.float32)
    with torch.no_grad():
        layer.router.gate.weight.zero_()
    C = expert_choice_capacity(T, 1, 4, None)
    _, aux = layer(random_input(T, 6, dtype=torch.float32))
    taken_TE = aux.routing.expert_ids_TK >= 0
    assert taken_TE[:C].all() and not taken_TE[C:].any()


def test_expert_choice_train_and_eval_capacity():
    layer = make_layer(num_experts=4, experts_per_token=1, routing_mode="expert_choice", capacity_factor=2.0,
                       eval_capacity_factor=1.0)
    x = random_input(8, 6).detach()
    assert layer(x)[1].tokens_per_expert_E.tolist() == [2] * 4  # eval: ceil(1 * 8 / 4)
    assert layer.train()(x)[1].tokens_per_expert_E.tolist() == [4] * 4  # train: ceil(2 * 8 / 4)


def test_expert_choice_is_not_causal_token_choice_is(one_thread):
    x = random_input(8, 6).detach()
    later = x.clone()
    later[-1] = 20 * x[0]  # a future token that every expert scoring like token 0 now prefers
    for mode, causal in (("token_choice", True), ("expert_choice", False)):
        layer = make_layer(num_experts=4, experts_per_token=1, routing_mode=mode)
        earlier_same = torch.equal(layer(x)[0][:-1], layer(later)[0][:-1])
        assert earlier_same == causal, mode


def test_expert_choice_never_takes_padding_while_real_tokens_remain():
    layer = make_layer(num_experts=4, experts_per_token=1, routing_mode="expert_choice")
    x = random_input(2, 5, 6).detach()
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    y, aux = layer(x, mask)
    assert (aux.routing.expert_ids_TK.view(2, 5, 4)[~mask] == -1).all()
    assert aux.tokens_per_expert_E.tolist() == [3] * 4  # C = ceil(10 / 4)
    padded = x.clone()
    padded[~mask] = 50.0  # changing the padding changes nothing for real tokens
    torch.testing.assert_close(layer(padded, mask)[0][mask], y[mask], atol=0, rtol=0)


def test_expert_choice_with_more_slots_than_real_tokens_gives_padding_zero_weight():
    layer = make_layer(num_experts=2, experts_per_token=2, routing_mode="expert_choice")  # C = T
    x = random_input(4, 6).detach()
    mask = torch.tensor([True, True, True, False])
    y, aux = layer(x, mask)
    assert aux.tokens_per_expert_E.tolist() == [3, 3]
    assert aux.routing.weights_TK[3].tolist() == [0.0, 0.0] and aux.routing.expert_ids_TK[3].tolist() == [-1, -1]
    y_real, _ = layer(x[:3])
    torch.testing.assert_close(y[:3], y_real, atol=1e-12, rtol=0)


@pytest.mark.parametrize("kwargs,words", [
    (dict(num_experts=8, num_groups=2, routing_mode="expert_choice"), "num_groups=2"),
    (dict(routing_mode="token-choice"), "'token-choice'"),
])
def test_bad_routing_mode_config(kwargs, words):
    with pytest.raises(ValueError, match=words):
        MoEConfig(dim=4, hidden=4, **kwargs)
