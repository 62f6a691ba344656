"""Convolutional experts (dualroute.conv_experts) against a plain per-image loop, on outputs and every gradient.

* ``ConvMoELayer`` == ``reference_conv_forward`` (each image through each of its experts, weights from the
  reference router on the pooled features) over both router kinds, score functions, correction biases,
  expert biases, capacities at both levels, in float64 (and float32 to rounding);
* ``ConvExperts.forward`` (one block per segment) == ``forward_one`` per image, with empty experts;
* one expert picked with weight 1 == the dense ``ConvFFN``; aux fields, masks, losses, balancing;
* bad input and unsupported options are refused with the value named.

Shapes: B images, C channels, H x W maps, E experts, G groups, J groups and K experts per image.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from conftest import TOL, assert_same_grads, output_and_grads, randomise
from dualroute.balance import BalanceConfig, update_correction_biases
from dualroute.conv_experts import ConvExperts, ConvFFN, ConvMoELayer
from dualroute.experts import ExpertConfig, Experts
from dualroute.layer import DenseFFN, MoEConfig, MoELayer
from dualroute.reference import reference_conv_forward
from dualroute.routing import RouterOptions

pytestmark = pytest.mark.usefixtures("one_thread")

C, HID = 4, 3  # channels, expert hidden channels


def conv_layer(*, E=8, K=2, G=4, J=2, dtype=torch.float64, seed=0, bias_scale=0.5, router=None, **cfg
               ) -> ConvMoELayer:
    """An eval-mode conv layer with every parameter and correction-bias buffer random."""
    torch.manual_seed(seed)
    moe = MoEConfig(dim=C, hidden=HID, num_experts=E, experts_per_token=K, num_groups=G, groups_per_token=J,
                    expert_kind="conv", router=router or RouterOptions(), **cfg)
    return randomise(ConvMoELayer(moe), seed, bias_scale).to(dtype).eval()


def images(B=12, H=5, W=4, dtype=torch.float64, seed=3) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(B, C, H, W, generator=gen).to(dtype)


@dataclass(frozen=True)
class Case:
    G: int
    J: int
    E: int
    K: int
    group_router: str = "learned"
    score_func: str = "softmax"
    correction_bias: bool = False
    expert_bias: bool = False
    activation: str = "gelu"

    def layer(self, dtype=torch.float64, **extra) -> ConvMoELayer:
        opt = RouterOptions(group_router=self.group_router, score_func=self.score_func,
                            correction_bias=self.correction_bias)
        return conv_layer(E=self.E, K=self.K, G=self.G, J=self.J, dtype=dtype, router=opt,
                          expert_bias=self.expert_bias, activation=self.activation, **extra)


CASES = [
    Case(4, 2, 8, 2),  # the dual layer of the presets
    Case(1, 1, 8, 2),  # flat top-2
    Case(4, 2, 8, 3, correction_bias=True, expert_bias=True),
    Case(4, 1, 8, 2, group_router="derived", score_func="sigmoid", activation="relu"),
    Case(2, 2, 4, 4, activation="silu"),  # every expert: the soft mixture
]


def layer_fn(layer):
    return lambda x: layer(x)[0]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_layer_matches_the_per_image_reference(case):
    layer = case.layer()
    x = images()
    y, grads = output_and_grads(layer, x, layer_fn(layer))
    y_ref, grads_ref = output_and_grads(layer, x, lambda x: reference_conv_forward(layer, x))
    torch.testing.assert_close(y, y_ref, atol=TOL[torch.float64][0], rtol=TOL[torch.float64][1])
    assert_same_grads(grads, grads_ref, torch.float64)
    # every parameter is reached: the input, both router levels, every expert's convs
    names = {n for n, g in grads.items() if g is not None and torch.count_nonzero(g) > 0}
    assert {"input", "router.gate.weight", "experts.w1_EFCkk", "experts.w2_ECFkk"} <= names
    if case.G > 1 and case.group_router == "learned":
        assert "router.group_gate.weight" in names


@pytest.mark.parametrize("levels", [dict(capacity_factor=0.5), dict(group_capacity_factor=0.6),
                                    dict(capacity_factor=0.75, group_capacity_factor=0.8)], ids=str)
def test_capacities_drop_the_reference_s_images(levels):
    layer = conv_layer(**levels).train()  # training capacities; no jitter or noise is configured
    x = images(B=16)
    (y, aux), y_ref = layer(x), reference_conv_forward(layer, x)
    assert int(aux.num_dropped) > 0
    torch.testing.assert_close(y, y_ref, atol=1e-10, rtol=1e-10)
    _, grads = output_and_grads(layer, x, layer_fn(layer))
    _, grads_ref = output_and_grads(layer, x, lambda x: reference_conv_forward(layer, x))
    assert_same_grads(grads, grads_ref, torch.float64)


def test_float32_to_rounding():
    layer = CASES[2].layer(torch.float32)
    x = images(dtype=torch.float32)
    y, grads = output_and_grads(layer, x, layer_fn(layer))
    y_ref, grads_ref = output_and_grads(layer, x, lambda x: reference_conv_forward(layer, x))
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    assert_same_grads(grads, grads_ref, torch.float32)


def test_segments_equal_each_expert_on_its_images():
    experts = ConvExperts(ExpertConfig(C, HID, 4, "conv", "gelu", bias=True)).double()
    counts_E = torch.tensor([3, 0, 5, 1])
    x = images(B=9)
    y, grads = output_and_grads(experts, x, lambda x: experts(x, counts_E))
    owner = torch.repeat_interleave(torch.arange(4), counts_E)

    def loop(x):
        return torch.cat([experts.forward_one(int(e), x[n : n + 1]) for n, e in enumerate(owner)])

    y_ref, grads_ref = output_and_grads(experts, x, loop)
    torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=1e-12)
    assert_same_grads(grads, grads_ref, torch.float64)
    assert torch.count_nonzero(grads["w1_EFCkk"][1]) == 0  # expert 1 has no images: no gradient
    assert experts(x[:0], torch.zeros(4, dtype=torch.int64)).shape == (0, C, 5, 4)


def test_forward_one_is_a_conv_block():
    experts = ConvExperts(ExpertConfig(C, HID, 2, "conv", "relu", bias=True)).double()
    x = images(B=2)
    conv1 = torch.nn.Conv2d(C, HID, 3, padding=1).double()
    conv2 = torch.nn.Conv2d(HID, C, 3, padding=1).double()
    with torch.no_grad():
        conv1.weight.copy_(experts.w1_EFCkk[1]), conv1.bias.copy_(experts.b1_EF[1])
        conv2.weight.copy_(experts.w2_ECFkk[1]), conv2.bias.copy_(experts.b2_EC[1])
    torch.testing.assert_close(experts.forward_one(1, x), conv2(torch.relu(conv1(x))))


def test_one_expert_is_the_dense_block():
    layer = conv_layer(E=1, K=1, G=1, J=1, router=RouterOptions(renormalize=True))
    dense = ConvFFN(C, HID).double()
    with torch.no_grad():
        dense.inner.w1_EFCkk.copy_(layer.experts.w1_EFCkk), dense.inner.w2_ECFkk.copy_(layer.experts.w2_ECFkk)
    x = images()
    y, grads = output_and_grads(layer, x, layer_fn(layer))
    y_dense, grads_dense = output_and_grads(dense, x, dense)
    torch.testing.assert_close(y, y_dense, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(grads["input"], grads_dense["input"])
    torch.testing.assert_close(grads["experts.w1_EFCkk"], grads_dense["inner.w1_EFCkk"])


def test_aux_counts_one_decision_per_image_and_masks_padding():
    layer = conv_layer(balance=BalanceConfig(switch=0.01, group_switch=0.01, z=0.001, group_z=0.001))
    x = images(B=10)
    y, aux = layer(x)
    assert aux.routing.expert_ids_TK.shape == (10, 2) and aux.routing.group_ids_TJ.shape == (10, 2)
    assert int(aux.tokens_per_expert_E.sum()) == 20 and int(aux.tokens_per_group_G.sum()) == 20
    assert set(aux.losses) == {"switch", "group_switch", "z", "group_z"} and aux.loss.requires_grad
    mask = torch.tensor([True] * 7 + [False] * 3)
    y_masked, aux_masked = layer(x, mask)
    torch.testing.assert_close(y_masked, y)  # the mask changes statistics, not outputs
    _, aux_first = layer(x[:7])
    torch.testing.assert_close(aux_masked.tokens_per_expert_E, aux_first.tokens_per_expert_E)
    for name in aux_first.losses:
        torch.testing.assert_close(aux_masked.losses[name], aux_first.losses[name])


def test_correction_biases_move_with_the_conv_layer_s_loads():
    layer = conv_layer(router=RouterOptions(correction_bias=True), bias_scale=0.0)
    _, aux = layer(images(B=16))
    assert update_correction_biases(layer, [aux], 0.1) == 1
    load = aux.tokens_per_expert_E.double()
    want = 0.1 * torch.sign(load.mean() - load)
    torch.testing.assert_close(layer.router.expert_bias_E, want.to(layer.router.expert_bias_E.dtype))


def test_empty_batch():
    layer = conv_layer()
    y, aux = layer(images(B=0))
    assert y.shape == (0, C, 5, 4) and int(aux.tokens_per_expert_E.sum()) == 0


def test_bad_input_and_unsupported_options():
    layer = conv_layer()
    with pytest.raises(ValueError, match=r"\(B, 4, H, W\), got \(2, 3, 5, 5\)"):
        layer(torch.randn(2, 3, 5, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"got \(2, 4\)"):
        layer(torch.randn(2, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(2, 4, 5, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match="mask shape"):
        layer(images(B=3), torch.ones(4, dtype=torch.bool))
    conv = MoEConfig(dim=C, hidden=HID, expert_kind="conv")
    with pytest.raises(ValueError, match="expert kind 'conv' runs on feature maps"):
        MoELayer(conv)
    with pytest.raises(ValueError, match="expert kind 'conv'"):
        DenseFFN(C, HID, "conv")
    with pytest.raises(ValueError, match="expected 'linear', 'mlp', 'swiglu' or 'conv'"):
        Experts(ExpertConfig(C, HID, 2, "conv3"))
    with pytest.raises(ValueError, match="needs expert_kind='conv', got 'swiglu'"):
        ConvMoELayer(MoEConfig(dim=C, hidden=HID))
    with pytest.raises(ValueError, match="no shared experts"):
        ConvMoELayer(MoEConfig(dim=C, hidden=HID, expert_kind="conv", num_shared_experts=1))
    with pytest.raises(ValueError, match="'token_choice' only"):
        ConvMoELayer(MoEConfig(dim=C, hidden=HID, expert_kind="conv", routing_mode="expert_choice"))
    with pytest.raises(ValueError, match="out_dim must be None or 4"):
        ConvMoELayer(MoEConfig(dim=C, hidden=HID, expert_kind="conv", out_dim=5))
    nan = images(B=2)
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        layer(nan)
