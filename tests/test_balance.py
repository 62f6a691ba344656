"""Load balancing at both routing levels, through the layer: aux losses, correction biases, capacity.

Unit facts pinned here: uniform routing gives Switch loss 1; zero logits give z-loss (ln E)^2 (and
(ln G)^2 for the learned group router); correction biases change selection, never weights, move
toward balance when updated and never change in forward; aux-loss gradients reach the router and
nothing else; padding is invisible to every statistic; group and expert capacities hold.

Shapes: T tokens, D model dim, E experts, G groups, J groups per token, K experts per token.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from conftest import assert_same_grads, make_layer, output_and_grads, random_input
from dualroute.bench import balance as balance_bench
from dualroute.balance import BalanceConfig, balance_metrics, update_correction_bias, update_correction_biases
from dualroute.dispatch import expert_capacity
from dualroute.layer import MoEAux, MoEConfig
from dualroute.reference import reference_routing
from dualroute.routing import RouterOptions, Routing

D = 6
ALL_LOSSES = BalanceConfig(switch=0.1, group_switch=0.1, z=0.01, group_z=0.01, importance=0.1, load=0.1)
LEARNED = RouterOptions(group_router="learned")
DERIVED = RouterOptions(group_router="derived", score_func="sigmoid")


def zero_router(layer):
    with torch.no_grad():
        for p in layer.router.parameters():
            p.zero_()
    return layer


def scalar(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float64)


# ------------------------------------------------------------------------ loss values


def test_uniform_routing_gives_switch_loss_one():
    # K = E: every token uses every expert (f uniform) and zero router weights make P uniform
    layer = zero_router(make_layer(num_experts=4, experts_per_token=4, balance=BalanceConfig(switch=1.0)))
    _, aux = layer(random_input(10, D))
    assert aux.tokens_per_expert_E.tolist() == [10] * 4
    torch.testing.assert_close(aux.losses["switch"], scalar(1.0))
    # both levels: two learned groups, both kept by every token
    layer = zero_router(make_layer(num_experts=8, experts_per_token=8, num_groups=2, groups_per_token=2,
                                   balance=BalanceConfig(switch=1.0, group_switch=1.0)))
    _, aux = layer(random_input(10, D))
    assert aux.tokens_per_group_G.tolist() == [10, 10]
    torch.testing.assert_close(aux.losses["switch"], scalar(1.0))
    torch.testing.assert_close(aux.losses["group_switch"], scalar(1.0))


def test_losses_wait_for_a_reader_only_without_gradients(monkeypatch):
    """With gradients on, the losses are computed in the forward and keep their gradient when read under
    no_grad; without, only when read (inference that reads none computes none), with the same values."""
    from dualroute import layer as layer_module

    calls = []
    real = layer_module.aux_losses
    monkeypatch.setattr(layer_module, "aux_losses", lambda *a: calls.append(1) or real(*a))
    layer = make_layer(num_experts=8, experts_per_token=2, num_groups=2, groups_per_token=1,
                       balance=BalanceConfig(switch=1e-2, group_switch=1e-2, z=1e-3))
    x = random_input(10, D)
    _, aux = layer(x)
    assert calls == [1]
    with torch.no_grad():
        loss = aux.loss
    assert loss.requires_grad and calls == [1]
    for routed_rows in (10, 2):  # the dispatch path, and the direct path of a few rows
        calls.clear()
        with torch.no_grad():
            _, lazy = layer(x[:routed_rows // 2])
        assert calls == []
        _, eager = layer(x[:routed_rows // 2])
        torch.testing.assert_close(lazy.loss, eager.loss.detach())
        assert lazy.losses.keys() == eager.losses.keys() == {"switch", "group_switch", "z"} and calls == [1, 1]


def test_uniform_probabilities_alone_give_one_and_collapse_gives_e():
    # E * sum_i f_i P_i = sum_i f_i = 1 when P is uniform, whatever the counts (here all ties -> 2 experts)
    layer = zero_router(make_layer(num_experts=8, experts_per_token=2, balance=BalanceConfig(switch=1.0)))
    torch.testing.assert_close(layer(random_input(10, D))[1].losses["switch"], scalar(1.0))
    with torch.no_grad():
        layer.router.gate.bias[3] = 50.0  # P(3) ~ 1 for every token
    _, aux = layer(random_input(10, D))
    assert aux.tokens_per_expert_E[3] == 10
    # f_3 = 1/2 (one of two slots), P_3 ~ 1 -> 8 * 1/2 = 4, plus the second slot's ~0 probability
    torch.testing.assert_close(aux.losses["switch"], scalar(4.0), atol=1e-12, rtol=0)


def test_zero_logits_give_z_loss_ln_e_squared():
    layer = zero_router(make_layer(num_experts=8, balance=BalanceConfig(z=1.0)))
    _, aux = layer(random_input(5, D))
    torch.testing.assert_close(aux.losses["z"], scalar(math.log(8) ** 2))
    torch.testing.assert_close(aux.loss, scalar(math.log(8) ** 2))


def test_zero_group_logits_give_group_z_loss_ln_g_squared():
    layer = zero_router(make_layer(num_experts=8, num_groups=4, groups_per_token=2, router=LEARNED,
                                   balance=BalanceConfig(z=1.0, group_z=1.0)))
    _, aux = layer(random_input(5, D))
    torch.testing.assert_close(aux.losses["group_z"], scalar(math.log(4) ** 2))
    torch.testing.assert_close(aux.losses["z"], scalar(math.log(8) ** 2))
    derived = make_layer(num_experts=8, num_groups=4, groups_per_token=2, router=DERIVED,
                         balance=BalanceConfig(group_z=1.0))
    assert derived(random_input(5, D))[1].losses["group_z"].item() == 0.0  # no group logits to penalise


# ------------------------------------------------------------------------ correction biases


@pytest.mark.parametrize("options", [LEARNED, DERIVED], ids=["learned", "derived"])
def test_correction_bias_changes_selection_not_weights(options):
    options = RouterOptions(group_router=options.group_router, score_func=options.score_func,
                            correction_bias=True, scaling_factor=2.0)
    layer = make_layer(num_experts=8, experts_per_token=2, num_groups=4, groups_per_token=2, router=options,
                       bias_scale=0.0)
    x = random_input(12, D)
    _, before = layer(x)
    with torch.no_grad():
        layer.router.expert_bias_E[7] = 10.0
        layer.router.group_bias_G[3] = 10.0  # expert 7's group
    _, after = layer(x)
    r = after.routing
    assert (r.expert_ids_TK == 7).any(-1).all() and not (before.routing.expert_ids_TK == 7).any(-1).all()
    torch.testing.assert_close(r.scores_TE, before.routing.scores_TE, atol=0, rtol=0)
    picked_TK = r.scores_TE.gather(1, r.expert_ids_TK)
    torch.testing.assert_close(r.weights_TK, 2.0 * picked_TK / picked_TK.sum(-1, keepdim=True))


def skewed_derived_layer():
    options = RouterOptions(group_router="derived", score_func="sigmoid", correction_bias=True)
    layer = make_layer(num_experts=16, experts_per_token=2, num_groups=4, groups_per_token=2, router=options,
                       bias_scale=0.0)
    with torch.no_grad():
        layer.router.gate.bias[:4] += 2.0  # group 0's experts win for almost every token
    return layer


def test_bias_updates_move_both_levels_toward_balance(one_thread):
    layer = skewed_derived_layer()
    held_out = random_input(256, D, seed=5).detach()

    def max_violations():
        with torch.no_grad():
            m = balance_metrics(layer.eval()(held_out)[1])
        layer.train()
        return m["maxvio"], m["group_maxvio"]

    expert_before, group_before = max_violations()
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        with torch.no_grad():
            _, aux = layer(torch.randn(128, D, generator=gen, dtype=torch.float64))
        assert update_correction_biases(layer, [aux], rate=0.02) == 1
    expert_after, group_after = max_violations()
    assert expert_before > 3.0 and group_before > 0.9  # the stream is skewed at both levels
    assert expert_after < 0.3 * expert_before
    assert group_after < 0.3 * group_before
    bias_G = layer.router.group_bias_G
    assert bias_G[0] < 0 and bias_G[0] == bias_G.min()  # the overloaded group was pushed down
    assert layer.router.expert_bias_E[:4].max() < 0


def test_update_is_bias_plus_rate_times_sign():
    layer = make_layer(num_experts=4, num_groups=2, router=RouterOptions(group_router="derived",
                                                                        correction_bias=True), bias_scale=0.0)
    update_correction_bias(layer.router, torch.tensor([5, 1, 1, 1]), torch.tensor([6, 2]), rate=0.1)
    assert layer.router.expert_bias_E.tolist() == [-0.1, 0.1, 0.1, 0.1]
    assert layer.router.group_bias_G.tolist() == [-0.1, 0.1]


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_forward_changes_no_buffer(train):
    options = RouterOptions(group_router="derived", correction_bias=True, noisy_gating=True, jitter_eps=0.1)
    layer = make_layer(num_experts=8, num_groups=2, groups_per_token=1, router=options, balance=ALL_LOSSES,
                       capacity_factor=1.0, eval_capacity_factor=1.0)
    layer.train(train)
    before = copy.deepcopy(layer.state_dict())
    _, aux = layer(random_input(3, 4, D))
    aux.loss.backward()
    after = layer.state_dict()
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), name


# ------------------------------------------------------------------------ gradients


@pytest.mark.parametrize("options", [LEARNED, DERIVED], ids=["learned", "derived"])
@pytest.mark.parametrize("name", ["switch", "group_switch", "z", "group_z", "importance", "load", "total"])
def test_aux_loss_gradients_reach_the_router_only(options, name):
    layer = make_layer(num_experts=8, experts_per_token=2, num_groups=4, groups_per_token=2, router=options,
                       num_shared_experts=1, shared_gate=True, expert_bias=True, balance=ALL_LOSSES)
    x = random_input(9, D)
    _, aux = layer(x)
    loss = aux.loss if name == "total" else aux.losses[name]
    if name == "group_z" and options.group_router == "derived":
        assert loss.item() == 0.0  # nothing to differentiate
        return
    loss.backward()
    router_grads = [p.grad for p in layer.router.parameters() if p.grad is not None]
    assert any(torch.count_nonzero(g) for g in router_grads), f"{name} does not reach the router"
    for pname, p in layer.named_parameters():
        if not pname.startswith("router."):
            assert p.grad is None or torch.count_nonzero(p.grad) == 0, f"{name} reaches {pname}"


# ------------------------------------------------------------------------ padding


@pytest.mark.parametrize("options", [LEARNED, DERIVED], ids=["learned", "derived"])
def test_mask_excludes_padded_tokens(options):
    layer = make_layer(num_experts=8, experts_per_token=2, num_groups=4, groups_per_token=2, router=options,
                       balance=ALL_LOSSES)
    x = random_input(3, 5, D).detach()
    mask = torch.tensor([[True] * 5, [True, True, False, False, False], [True, True, True, True, False]])
    y, aux = layer(x, mask)
    y_real, want = layer(x[mask])
    torch.testing.assert_close(y[mask], y_real, atol=1e-12, rtol=0)
    assert aux.tokens_per_expert_E.tolist() == want.tokens_per_expert_E.tolist()
    assert aux.tokens_per_group_G.tolist() == want.tokens_per_group_G.tolist()
    assert aux.losses.keys() == want.losses.keys() == ALL_LOSSES.active().keys()
    for name in want.losses:
        torch.testing.assert_close(aux.losses[name], want.losses[name], atol=1e-12, rtol=1e-12, msg=name)
    torch.testing.assert_close(aux.loss, want.loss, atol=1e-12, rtol=1e-12)


# ------------------------------------------------------------------------ bad input


BALANCE_FIELDS = list(BalanceConfig().__dataclass_fields__)


@pytest.mark.parametrize("field", BALANCE_FIELDS)
@pytest.mark.parametrize("value,shown", [(-0.5, "-0.5"), (float("nan"), "nan"), (float("inf"), "inf")])
def test_bad_loss_weight(field, value, shown):
    with pytest.raises(ValueError, match=f"{field} .*got {shown}"):
        BalanceConfig(**{field: value})


@pytest.mark.parametrize("rate,shown", [(-0.01, "-0.01"), (float("nan"), "nan"), (float("inf"), "inf")])
def test_bad_update_rate(rate, shown):
    layer = make_layer(router=RouterOptions(correction_bias=True))
    with pytest.raises(ValueError, match=f"rate .*got {shown}"):
        update_correction_bias(layer.router, torch.ones(8), None, rate)
    with pytest.raises(ValueError, match=f"got {shown}"):
        update_correction_biases(layer, [layer(random_input(2, D))[1]], rate)


def test_update_without_correction_bias_is_an_error():
    layer = make_layer()
    with pytest.raises(ValueError, match="correction_bias=True"):
        update_correction_bias(layer.router, torch.ones(8), None, 0.01)


def test_bad_mask():
    layer = make_layer(balance=ALL_LOSSES)
    x = random_input(2, 3, D)
    with pytest.raises(ValueError, match=r"mask shape \(3, 2\)"):
        layer(x, torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(TypeError, match="torch.float32"):
        layer(x, torch.ones(2, 3))


@pytest.mark.parametrize("field", ["capacity_factor", "eval_capacity_factor", "group_capacity_factor",
                                   "eval_group_capacity_factor"])
@pytest.mark.parametrize("value,shown", [(0, "0"), (-1.5, "-1.5"), (float("nan"), "nan"), (float("inf"), "inf")])
def test_bad_capacity_factor(field, value, shown):
    with pytest.raises(ValueError, match=f"{field} .*got {shown}"):
        MoEConfig(dim=4, hidden=4, **{field: value})


# ------------------------------------------------------------------------ capacity at both levels


def reference_with_capacity(layer, x_TD, capacity, group_capacity):
    """Plain loops: per group keep the GC heaviest rows, then per expert the C heaviest survivors."""
    c_TE, _ = reference_routing(layer, x_TD, capacity=False)
    T, E = c_TE.shape
    M = E // layer.cfg.num_groups
    rows = [(t, e) for t in range(T) for e in range(E) if c_TE[t, e] > 0]

    def heaviest(candidates, unit_of, limit):
        if limit is None:
            return set(candidates)
        kept = set()
        for unit in {unit_of(r) for r in candidates}:
            mine = sorted((r for r in candidates if unit_of(r) == unit), key=lambda r: -c_TE[r].item())
            kept |= set(mine[:limit])
        return kept

    kept = heaviest(rows, lambda r: r[1] // M, group_capacity)
    kept = heaviest(kept, lambda r: r[1], capacity)
    out = [torch.zeros(D, dtype=x_TD.dtype) for _ in range(T)]
    for t, e in kept:
        out[t] = out[t] + c_TE[t, e] * layer.experts.forward_one(e, x_TD[t : t + 1])[0]
    return torch.stack(out)


@pytest.mark.parametrize("factor,group_factor", [(None, 0.5), (0.5, 1.0), (0.75, 0.75)])
def test_group_and_expert_capacity(factor, group_factor, one_thread):
    T, E, G, K = 12, 8, 4, 2
    layer = make_layer(num_experts=E, experts_per_token=K, num_groups=G, groups_per_token=2, router=LEARNED,
                       capacity_factor=factor, group_capacity_factor=group_factor).train()
    with torch.no_grad():  # crowd group 0 so that its capacity binds
        layer.router.group_gate.bias[0] += 2.0
    x = random_input(T, D)
    _, aux = layer(x)
    C = None if factor is None else expert_capacity(T, K, E, factor)
    GC = expert_capacity(T, K, G, group_factor)
    kept_E = aux.tokens_per_expert_E - aux.dropped_per_expert_E
    assert int(aux.num_dropped) > 0
    assert (kept_E.view(G, -1).sum(-1) <= GC).all()
    if C is not None:  # both caps bind: either one alone keeps different rows
        assert (kept_E <= C).all()
        for one in ((C, None), (None, GC)):
            assert not torch.allclose(reference_with_capacity(layer, x, *one), layer(x)[0])
    got, got_grads = output_and_grads(layer, x, lambda x: layer(x)[0])
    want, want_grads = output_and_grads(layer, x, lambda x: reference_with_capacity(layer, x, C, GC))
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    assert_same_grads(got_grads, want_grads, torch.float64)


# ------------------------------------------------------------------------ metrics


def test_balance_metrics_hand_case():
    uniform_TE = torch.full((2, 4), 0.25)
    routing = Routing(
        expert_ids_TK=torch.tensor([[0, 1], [0, 0]]), weights_TK=torch.full((2, 2), 0.5),
        group_ids_TJ=torch.tensor([[0], [0]]), expert_logits_TE=torch.zeros(2, 4), scores_TE=uniform_TE,
        group_logits_TG=None, group_scores_TG=torch.ones(2, 2),
    )
    aux = MoEAux(routing=routing, tokens_per_expert_E=torch.tensor([3, 1, 0, 0]),
                 tokens_per_group_G=torch.tensor([3, 1]), dropped_per_expert_E=torch.tensor([1, 0, 0, 0]),
                 num_dropped=torch.tensor(1))
    got = balance_metrics(aux, prefix="l0/")
    want = {
        "l0/maxvio": 3 / 1 - 1,  # max / mean - 1, mean of (3, 1, 0, 0) = 1
        "l0/group_maxvio": 3 / 2 - 1,
        "l0/entropy": math.log(4),
        "l0/group_entropy": math.log(2),  # group probabilities (.5, .5)
        "l0/dropped_rate": 1 / 4,
    }
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-6), key


# ------------------------------------------------------------------------ the bench runs


def test_balance_bench_runs(tmp_path, capsys):
    out = tmp_path / "balance.json"
    argv = ["--steps", "2", "--seeds", "1", "--tokens", "32", "--eval-tokens", "64", "--json", str(out)]
    assert balance_bench.main(argv) == 0
    printed = capsys.readouterr().out
    assert "| learned | none |" in printed and "| derived-sigmoid | bias rate 1e-2 |" in printed
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 12 and all(r["start"].keys() == {"expert_maxvio", "group_maxvio", "task_loss"} for r in rows)
