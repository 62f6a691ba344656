import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dualroute.losses import (
    BalanceStats,
    check_loss_weight,
    dropped_rate,
    importance_loss,
    load_histogram,
    load_loss,
    max_violation,
    router_entropy,
    router_z_loss,
    switch_balance_loss,
)


def random_routing(T, E, K, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits_TE = torch.randn(T, E, generator=g, dtype=dtype)
    probs_TE = logits_TE.softmax(-1)
    selected_TK = probs_TE.topk(K, dim=-1).indices
    return logits_TE, probs_TE, selected_TK


def uniform_selection(T, E, K):
    """Token t picks units (t*K + k) % E: every unit gets T*K/E slots when E divides T*K."""
    return (torch.arange(T)[:, None] * K + torch.arange(K)) % E


def numpy_switch(probs_TE, selected_TK, E):
    probs = probs_TE.detach().double().numpy()
    sel = selected_TK.numpy()
    counts = np.zeros(E)
    for t in range(sel.shape[0]):
        for k in range(sel.shape[1]):
            if sel[t, k] >= 0:
                counts[sel[t, k]] += 1
    if counts.sum() == 0 or probs.shape[0] == 0:
        return 0.0
    return E * float(np.sum(counts / counts.sum() * probs.mean(0)))


# ----------------------------------------------------------------------------------------- switch loss


@pytest.mark.parametrize("E,K", [(2, 1), (4, 1), (4, 2), (8, 2), (8, 3), (16, 4)])
def test_switch_uniform_routing_is_one(E, K):
    T = 2 * E
    probs_TE = torch.full((T, E), 1.0 / E)
    loss = switch_balance_loss(probs_TE, uniform_selection(T, E, K), E)
    assert loss.shape == ()
    assert loss.item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("E,K", [(4, 1), (8, 1), (8, 2)])
def test_switch_collapsed_routing_is_E(E, K):
    T = 10
    probs_TE = torch.zeros(T, E)
    probs_TE[:, 0] = 1.0
    # K > 1 with all slots on unit 0 (e.g. a degenerate router); f_0 = 1.
    selected_TK = torch.zeros(T, K, dtype=torch.long)
    assert switch_balance_loss(probs_TE, selected_TK, E).item() == pytest.approx(E)


def test_switch_counts_every_slot():
    # Slot 0 always on unit 0, slot 1 spread evenly over 1..3: f = (1/2, 1/6, 1/6, 1/6).
    E, T = 4, 6
    selected_TK = torch.stack([torch.zeros(T, dtype=torch.long), torch.arange(T) % 3 + 1], dim=1)
    probs_TE = torch.tensor([[0.4, 0.2, 0.2, 0.2]]).expand(T, E)
    expected = E * (0.5 * 0.4 + 3 * (1 / 6) * 0.2)
    assert switch_balance_loss(probs_TE, selected_TK, E).item() == pytest.approx(expected)


def test_switch_matches_numpy_random():
    _, probs_TE, selected_TK = random_routing(37, 6, 2, seed=3)
    loss = switch_balance_loss(probs_TE, selected_TK, 6)
    assert loss.item() == pytest.approx(numpy_switch(probs_TE, selected_TK, 6), rel=1e-5)


def test_switch_ignores_minus_one():
    _, probs_TE, selected_TK = random_routing(12, 4, 2, seed=1)
    dropped_TK = selected_TK.clone()
    dropped_TK[::3, 1] = -1
    dropped_TK[5, :] = -1
    loss = switch_balance_loss(probs_TE, dropped_TK, 4)
    assert loss.item() == pytest.approx(numpy_switch(probs_TE, dropped_TK, 4), rel=1e-5)
    # All slots unused: no assignments, loss 0 rather than NaN.
    none_TK = torch.full_like(selected_TK, -1)
    assert switch_balance_loss(probs_TE, none_TK, 4).item() == 0.0


def test_switch_gradient_flows_through_probs_only():
    logits_TE, _, _ = random_routing(16, 4, 1, seed=2)
    logits_TE.requires_grad_(True)
    probs_TE = logits_TE.softmax(-1)
    selected_TK = probs_TE.detach().topk(1, dim=-1).indices
    switch_balance_loss(probs_TE, selected_TK, 4).backward()
    assert torch.isfinite(logits_TE.grad).all()
    assert logits_TE.grad.abs().sum() > 0


def test_switch_rejects_bad_inputs():
    probs_TE = torch.full((4, 3), 1 / 3)
    with pytest.raises(ValueError, match="num_experts=4"):
        switch_balance_loss(probs_TE, torch.zeros(4, 1, dtype=torch.long), 4)
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        switch_balance_loss(probs_TE, torch.tensor([[0], [1], [2], [3]]), 3)
    with pytest.raises(ValueError, match=r"\(4, K\)"):
        switch_balance_loss(probs_TE, torch.zeros(5, 1, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="integer"):
        switch_balance_loss(probs_TE, torch.zeros(4, 1), 3)


# ----------------------------------------------------------------------------------------- masks


def _padded(T_real, T_pad, E, K, seed=0):
    _, probs_TE, selected_TK = random_routing(T_real + T_pad, E, K, seed=seed)
    mask_T = torch.zeros(T_real + T_pad, dtype=torch.bool)
    mask_T[torch.randperm(T_real + T_pad, generator=torch.Generator().manual_seed(seed))[:T_real]] = True
    return probs_TE, selected_TK, mask_T


def test_masks_equal_loss_on_unpadded_subset():
    E, K = 5, 2
    probs_TE, selected_TK, mask_T = _padded(11, 7, E, K, seed=4)
    logits_TE = probs_TE.log()
    weights_TK = probs_TE.gather(1, selected_TK)
    pairs = [
        (switch_balance_loss(probs_TE, selected_TK, E, mask_T),
         switch_balance_loss(probs_TE[mask_T], selected_TK[mask_T], E)),
        (importance_loss(probs_TE, mask_T), importance_loss(probs_TE[mask_T])),
        (load_loss(weights_TK, selected_TK, E, mask_T), load_loss(weights_TK[mask_T], selected_TK[mask_T], E)),
        (router_z_loss(logits_TE, mask_T), router_z_loss(logits_TE[mask_T])),
    ]
    for masked, subset in pairs:
        torch.testing.assert_close(masked, subset)
    assert router_entropy(probs_TE, mask_T) == pytest.approx(router_entropy(probs_TE[mask_T]))
    assert torch.equal(load_histogram(selected_TK, E, mask_T), load_histogram(selected_TK[mask_T], E))


def test_masked_tokens_get_zero_gradient_even_with_nan_padding():
    E, K = 4, 2
    probs_TE, selected_TK, mask_T = _padded(6, 4, E, K, seed=5)
    logits_TE = probs_TE.log()
    probs_TE = probs_TE.clone()
    probs_TE[~mask_T] = float("nan")
    logits_TE[~mask_T] = float("-inf")
    weights_TK = probs_TE.gather(1, selected_TK).requires_grad_(True)
    probs_TE.requires_grad_(True)
    logits_TE.requires_grad_(True)
    losses = [
        switch_balance_loss(probs_TE, selected_TK, E, mask_T),
        importance_loss(probs_TE, mask_T),
        load_loss(weights_TK, selected_TK, E, mask_T),
        router_z_loss(logits_TE, mask_T),
    ]
    assert all(torch.isfinite(loss) for loss in losses)
    sum(losses).backward()
    for grad in (probs_TE.grad, weights_TK.grad, logits_TE.grad):
        assert torch.isfinite(grad).all()
        assert (grad[~mask_T] == 0).all()
        assert grad[mask_T].abs().sum() > 0


def test_empty_mask_gives_zero_losses():
    E, K = 4, 2
    logits_TE, probs_TE, selected_TK = random_routing(5, E, K)
    mask_T = torch.zeros(5, dtype=torch.bool)
    weights_TK = probs_TE.gather(1, selected_TK)
    for loss in (
        switch_balance_loss(probs_TE, selected_TK, E, mask_T),
        importance_loss(probs_TE, mask_T),
        load_loss(weights_TK, selected_TK, E, mask_T),
        router_z_loss(logits_TE, mask_T),
    ):
        assert loss.item() == 0.0
    assert router_entropy(probs_TE, mask_T) == 0.0
    assert load_histogram(selected_TK, E, mask_T).sum().item() == 0


@pytest.mark.parametrize(
    "mask_T,match",
    [
        (torch.ones(5, dtype=torch.long), "torch.bool"),
        (torch.ones(5), "torch.bool"),
        (torch.ones(4, dtype=torch.bool), r"\(5,\).*\(4,\)"),
        (torch.ones(5, 1, dtype=torch.bool), r"\(5, 1\)"),
    ],
)
def test_bad_mask_raises(mask_T, match):
    E = 3
    logits_TE, probs_TE, selected_TK = random_routing(5, E, 1)
    weights_TK = probs_TE.gather(1, selected_TK)
    calls = [
        lambda: switch_balance_loss(probs_TE, selected_TK, E, mask_T),
        lambda: importance_loss(probs_TE, mask_T),
        lambda: load_loss(weights_TK, selected_TK, E, mask_T),
        lambda: router_z_loss(logits_TE, mask_T),
        lambda: router_entropy(probs_TE, mask_T),
        lambda: load_histogram(selected_TK, E, mask_T),
        lambda: BalanceStats(E).update(probs_TE, selected_TK, mask_T),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=match):
            call()


# ----------------------------------------------------------------------------------------- other losses


@pytest.mark.parametrize("E", [2, 8, 64])
def test_z_loss_zero_logits(E):
    loss = router_z_loss(torch.zeros(7, E))
    assert loss.item() == pytest.approx(math.log(E) ** 2, rel=1e-6)


def test_z_loss_matches_direct_and_has_gradient():
    logits_TE = torch.randn(9, 6, generator=torch.Generator().manual_seed(0), requires_grad=True)
    loss = router_z_loss(logits_TE)
    torch.testing.assert_close(loss, (logits_TE.logsumexp(-1) ** 2).mean())
    loss.backward()
    assert torch.isfinite(logits_TE.grad).all() and (logits_TE.grad != 0).all()


def test_importance_loss_values():
    assert importance_loss(torch.full((6, 4), 0.25)).item() == pytest.approx(0.0, abs=1e-9)
    collapsed_TE = torch.zeros(6, 4)
    collapsed_TE[:, 0] = 1
    # importance = (6, 0, 0, 0): mean 1.5, var 6.75 -> cv^2 = 3 = E - 1.
    assert importance_loss(collapsed_TE).item() == pytest.approx(3.0)
    probs_TE = torch.rand(10, 5, generator=torch.Generator().manual_seed(1)).softmax(-1).requires_grad_(True)
    loss = importance_loss(probs_TE)
    imp = probs_TE.detach().double().sum(0).numpy()
    assert loss.item() == pytest.approx(imp.var() / imp.mean() ** 2, rel=1e-5)
    loss.backward()
    assert torch.isfinite(probs_TE.grad).all() and probs_TE.grad.abs().sum() > 0


def test_load_loss_scatters_kept_gates_only():
    E = 4
    selected_TK = torch.tensor([[0, 1], [0, 2], [0, -1]])
    weights_TK = torch.tensor([[0.6, 0.4], [0.5, 0.5], [1.0, 7.0]], requires_grad=True)
    load = np.array([2.1, 0.4, 0.5, 0.0])  # the 7.0 sits in a -1 slot and is ignored
    loss = load_loss(weights_TK, selected_TK, E)
    assert loss.item() == pytest.approx(load.var() / load.mean() ** 2, rel=1e-5)
    loss.backward()
    assert weights_TK.grad[2, 1] == 0
    assert (weights_TK.grad[selected_TK >= 0] != 0).all()
    with pytest.raises(ValueError, match="weights_TK shape"):
        load_loss(weights_TK[:, :1], selected_TK, E)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_give_float32(dtype):
    E, K = 8, 2
    logits_TE, probs_TE, selected_TK = random_routing(32, E, K, dtype=dtype)
    weights_TK = probs_TE.gather(1, selected_TK)
    ref = switch_balance_loss(probs_TE.float(), selected_TK, E)
    losses = [
        switch_balance_loss(probs_TE, selected_TK, E),
        importance_loss(probs_TE),
        load_loss(weights_TK, selected_TK, E),
        router_z_loss(logits_TE),
    ]
    for loss in losses:
        assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(losses[0], ref)
    assert router_z_loss(torch.zeros(4, E, dtype=dtype)).item() == pytest.approx(math.log(E) ** 2, rel=1e-6)


# ----------------------------------------------------------------------------------------- BalanceStats


def test_balance_stats_equals_concatenated_batch():
    E, K = 6, 2
    logits = [random_routing(T, E, K, seed=s)[0].requires_grad_(True) for s, T in enumerate((5, 9, 3))]
    probs = [x.softmax(-1) for x in logits]
    selected = [p.detach().topk(K, dim=-1).indices for p in probs]
    masks = [torch.ones(5, dtype=torch.bool), torch.arange(9) % 3 != 0, None]
    selected[1][2, 1] = -1

    stats = BalanceStats(E)
    for p, s, m in zip(probs, selected, masks):
        stats.update(p, s, m)
    loss = stats.switch_loss()

    full_mask = torch.cat([torch.ones(len(p), dtype=torch.bool) if m is None else m for p, m in zip(probs, masks)])
    ref = switch_balance_loss(torch.cat(probs), torch.cat(selected), E, full_mask)
    torch.testing.assert_close(loss, ref)

    loss.backward()
    for x in logits:
        assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert (logits[1].grad[~masks[1]] == 0).all()
    assert stats.counts_E.grad_fn is None and not stats.counts_E.requires_grad

    stats.reset()
    assert stats.switch_loss().item() == 0.0
    stats.update(torch.full((4, E), 1 / E), uniform_selection(4, E, 3))
    assert stats.switch_loss().item() == pytest.approx(1.0)


# ----------------------------------------------------------------------------------------- metrics


def test_load_histogram():
    selected_TK = torch.tensor([[0, 2], [2, -1], [3, 0]])
    counts_E = load_histogram(selected_TK, 5)
    assert counts_E.dtype == torch.int64
    assert counts_E.tolist() == [2, 0, 2, 1, 0]
    mask_T = torch.tensor([True, False, True])
    assert load_histogram(selected_TK, 5, mask_T).tolist() == [2, 0, 1, 1, 0]


@pytest.mark.parametrize(
    "counts,expected",
    [([4, 4, 4, 4], 0.0), ([8, 0, 0, 0], 3.0), ([6, 2, 2, 2], 1.0), ([3, 1], 0.5), ([0, 0, 0], 0.0), ([5], 0.0)],
)
def test_max_violation(counts, expected):
    assert max_violation(torch.tensor(counts)) == pytest.approx(expected)


def test_max_violation_rejects_bad_counts():
    with pytest.raises(ValueError, match=r"\(2, 2\)"):
        max_violation(torch.ones(2, 2))
    with pytest.raises(ValueError, match="-1"):
        max_violation(torch.tensor([3, -1]))


@pytest.mark.parametrize("E", [2, 7, 32])
def test_router_entropy(E):
    assert router_entropy(torch.full((5, E), 1.0 / E)) == pytest.approx(math.log(E), rel=1e-6)
    assert router_entropy(torch.eye(E)) == 0.0
    half_TE = torch.zeros(3, E)
    half_TE[:, :2] = 0.5
    assert router_entropy(half_TE) == pytest.approx(math.log(2))


def test_dropped_rate():
    assert dropped_rate(3, 12) == 0.25
    assert dropped_rate(torch.tensor(0), torch.tensor(8)) == 0.0
    assert dropped_rate(0, 0) == 0.0
    with pytest.raises(ValueError, match="num_dropped=5"):
        dropped_rate(5, 4)


@pytest.mark.parametrize("value", [-1, -0.5, float("nan"), float("inf"), float("-inf")])
def test_check_loss_weight_rejects(value):
    with pytest.raises(ValueError, match="aux_weight"):
        check_loss_weight("aux_weight", value)


def test_check_loss_weight_accepts():
    assert check_loss_weight("z", 0) == 0.0
    assert check_loss_weight("z", torch.tensor(1e-3)) == pytest.approx(1e-3)


# ----------------------------------------------------------------------------------------- properties


routing_cases = st.tuples(
    st.integers(1, 12),  # T
    st.integers(1, 8),  # E
    st.integers(1, 3),  # K
    st.integers(0, 2**31 - 1),  # seed
)


@settings(max_examples=40, deadline=None)
@given(routing_cases)
def test_switch_matches_numpy_and_is_permutation_invariant(case):
    T, E, K, seed = case
    g = torch.Generator().manual_seed(seed)
    probs_TE = torch.rand(T, E, generator=g, dtype=torch.float64).softmax(-1)
    selected_TK = torch.randint(-1, E, (T, K), generator=g)
    loss = switch_balance_loss(probs_TE, selected_TK, E)
    assert loss.item() == pytest.approx(numpy_switch(probs_TE, selected_TK, E), rel=1e-9, abs=1e-12)

    perm_E = torch.randperm(E, generator=g)
    inverse_E = torch.argsort(perm_E)  # unit perm[j] is renamed j
    renamed_TK = torch.where(selected_TK >= 0, inverse_E[selected_TK.clamp(min=0)], -1)
    permuted = switch_balance_loss(probs_TE[:, perm_E], renamed_TK, E)
    assert permuted.item() == pytest.approx(loss.item(), rel=1e-9, abs=1e-12)
    assert load_histogram(renamed_TK, E).tolist() == load_histogram(selected_TK, E)[perm_E].tolist()


@settings(max_examples=40, deadline=None)
@given(routing_cases)
def test_cv_losses_are_permutation_invariant_and_nonnegative(case):
    T, E, K, seed = case
    g = torch.Generator().manual_seed(seed)
    probs_TE = torch.rand(T, E, generator=g, dtype=torch.float64).softmax(-1)
    perm_E = torch.randperm(E, generator=g)
    a, b = importance_loss(probs_TE), importance_loss(probs_TE[:, perm_E])
    assert a.item() >= 0
    assert a.item() == pytest.approx(b.item(), rel=1e-9, abs=1e-12)
    imp = probs_TE.sum(0).numpy()
    assert a.item() == pytest.approx(imp.var() / (imp.mean() ** 2 + 1e-10), rel=1e-9, abs=1e-12)
