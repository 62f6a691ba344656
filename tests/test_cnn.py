"""The CNN classifier with conv experts (dualroute.models.cnn) and its presets.

* the whole model with its conv MoE blocks == the same model whose MoE blocks run the per-image reference,
  on logits and every gradient (float64);
* the dense twin spends the MoE model's FLOPs per image, router excluded: counted by the model and measured
  by ``torch.utils.flop_counter``; active parameters likewise;
* config checks; presets, the image task and ``dualroute train`` / ``eval`` / ``inspect`` on a tiny run.

Shapes: B images, C channels, H x W image, Y classes, E experts, G groups, K experts per image.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import assert_same_grads, output_and_grads
from dualroute.conv_experts import ConvFFN, ConvMoELayer
from dualroute.layer import MoEConfig
from dualroute.models import flops_per_token, param_counts
from dualroute.models.cnn import CNNClassifier, CNNConfig, dense_twin
from dualroute.reference import reference_conv_forward
from dualroute.routing import RouterOptions
from dualroute.train import registry
from dualroute.train.presets import get_preset, override, run_config_from_dict, run_config_to_dict

pytestmark = pytest.mark.usefixtures("one_thread")


def small_cfg(**changes) -> CNNConfig:
    moe = MoEConfig(dim=8, hidden=4, num_experts=4, experts_per_token=2, num_groups=2, groups_per_token=1,
                    expert_kind="conv", router=RouterOptions(correction_bias=True))
    fields = dict(image_size=7, channels=2, num_classes=3, widths=(6, 8), depths=(1, 2), moe_blocks=(1, 2), moe=moe)
    return CNNConfig(**{**fields, **changes})


def random_model(cfg: CNNConfig, seed: int = 0) -> CNNClassifier:
    torch.manual_seed(seed)
    model = CNNClassifier(cfg).double().eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


def images(cfg: CNNConfig, B: int = 6) -> torch.Tensor:
    gen = torch.Generator().manual_seed(5)
    return torch.randn(B, cfg.channels, cfg.image_size, cfg.image_size, generator=gen, dtype=torch.float64)


def test_model_matches_its_blocks_run_by_the_reference(monkeypatch):
    cfg = small_cfg()
    model = random_model(cfg)
    x = images(cfg)
    logits, grads = output_and_grads(model, x, lambda x: model(x).logits)
    monkeypatch.setattr(ConvMoELayer, "forward", lambda self, x, mask=None: (reference_conv_forward(self, x), None))
    ref, grads_ref = output_and_grads(model, x, lambda x: model(x).logits)
    torch.testing.assert_close(logits, ref, atol=1e-10, rtol=1e-10)
    assert_same_grads(grads, grads_ref, torch.float64)
    assert torch.count_nonzero(grads["blocks.1.body.router.group_gate.weight"]) > 0


def test_forward_shapes_aux_and_input_checks():
    cfg = small_cfg()
    model = CNNClassifier(cfg)
    out = model(torch.randn(5, 2, 7, 7))
    assert out.logits.shape == (5, 3) and out.logits.dtype == torch.float32
    assert len(out.aux) == 2 and all(a.routing.expert_ids_TK.shape == (5, 2) for a in out.aux)
    assert [cfg.stage_size(s) for s in range(2)] == [7, 4]
    with pytest.raises(ValueError, match=r"\(B, 2, 7, 7\), got \(5, 1, 7, 7\)"):
        model(torch.randn(5, 1, 7, 7))
    with pytest.raises(TypeError, match="floating-point"):
        model(torch.zeros(5, 2, 7, 7, dtype=torch.int64))
    assert CNNClassifier(dense_twin(cfg))(torch.randn(5, 2, 7, 7)).aux == []


def measured_flops(model: CNNClassifier, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops()


def router_flops(model: CNNClassifier, B: int) -> int:
    return 2 * B * sum(m.router.gate.weight.numel() + m.router.group_gate.weight.numel()
                       for m in model.modules() if isinstance(m, ConvMoELayer))


@pytest.mark.parametrize("K", [1, 2, 3])
def test_dense_twin_spends_the_same_flops_per_image(K):
    moe = dataclasses.replace(small_cfg().moe, experts_per_token=K, groups_per_token=2)
    cfg = small_cfg(moe=moe)
    model, twin = CNNClassifier(cfg).eval(), CNNClassifier(dense_twin(cfg)).eval()
    assert all(isinstance(twin.blocks[i].body, ConvFFN) for i in cfg.moe_blocks)
    B = 6
    x = torch.randn(B, 2, 7, 7)
    # measured: each image runs K experts (dropless), the twin one K*F block; the router is the difference
    assert measured_flops(model, x) - router_flops(model, B) == measured_flops(twin, x)
    # counted by the model (what the trainer reports) == measured per image
    assert model.flops_per_example() * B == measured_flops(model, x)
    assert twin.flops_per_example() * B == measured_flops(twin, x)
    assert flops_per_token(model) == model.flops_per_example()
    # active parameters: the twin's are the MoE model's without its routers
    total, active = param_counts(model)
    router_params = sum(p.numel() for n, p in model.named_parameters() if ".router." in n)
    assert active - router_params == param_counts(twin)[1] == param_counts(twin)[0]
    assert total > active


def test_presets_keep_the_twin_equal():
    for dual, dense in (("cnn-dual", "cnn-dense"), ("cnn-mnist-dual", "cnn-mnist-dense"),
                        ("cnn-cifar10-dual", "cnn-cifar10-dense")):
        a, b = get_preset(dual).model, get_preset(dense).model
        assert dense_twin(a) == b
        moe_model, twin = CNNClassifier(a), CNNClassifier(b)
        routers = sum(2 * (m.router.gate.weight.numel() + m.router.group_gate.weight.numel())
                      for m in moe_model.modules() if isinstance(m, ConvMoELayer))
        assert moe_model.flops_per_example() - routers == twin.flops_per_example()
        x = torch.zeros(2, a.channels, a.image_size, a.image_size)  # 8x8x1, 28x28x1, 32x32x3
        assert moe_model(x).logits.shape == twin(x).logits.shape == (2, 10)
    flat = get_preset("cnn-flat").model.moe
    assert (flat.num_groups, flat.groups_per_token, flat.experts_per_token) == (1, 1, 2)


@pytest.mark.parametrize("changes,words", [
    (dict(widths=(6,)), "one entry per stage"),
    (dict(widths=(6, 0)), "positive ints, got (6, 0)"),
    (dict(moe_blocks=(3,)), "in [0, 3), got (3,)"),
    (dict(moe_blocks=(1, 1)), "distinct"),
    (dict(moe_blocks=(0, 1)), "channels of MoE block 0 (6"),
    (dict(activation="tanh"), "'tanh'"),
    (dict(image_size=0), "image_size"),
])
def test_bad_configs_name_the_value(changes, words):
    with pytest.raises(ValueError) as info:
        small_cfg(**changes)
    assert words in str(info.value)


def test_moe_must_be_conv_and_not_both():
    swiglu = MoEConfig(dim=8, hidden=4)
    with pytest.raises(ValueError, match="needs expert_kind='conv'"):
        small_cfg(moe=swiglu)
    with pytest.raises(ValueError, match="at most one"):
        small_cfg(dense_twin_of=small_cfg().moe)
    with pytest.raises(TypeError, match="CNNConfig"):
        dense_twin(object())


def test_run_config_round_trips_and_overrides():
    cfg = get_preset("cnn-dual")
    assert isinstance(registry.build_model(cfg.model), CNNClassifier)
    assert run_config_from_dict(run_config_to_dict(cfg)) == cfg
    changed = override(cfg, ["model.moe.num_experts=4", "model.moe.num_groups=2", "model.widths=16,32",
                             "model.moe.dim=32"])
    assert changed.model.widths == (16, 32) and changed.model.moe.num_experts == 4
    with pytest.raises(ValueError, match="must equal the channels of MoE block 1"):
        override(cfg, ["model.widths=16,32"])
    with pytest.raises(ValueError, match="model expects 1x28x28 images"):
        from dualroute.train.tasks import make_task
        make_task(override(cfg, ["model.image_size=28"]))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, one_thread):
    from dualroute.cli import main

    out = tmp_path_factory.mktemp("cnn")
    assert main(["train", "cnn-dual", "--out", str(out), "--quiet", "train.steps=3", "train.batch_size=16",
                 "train.eval_batches=1", "train.warmup_steps=1"]) == 0
    return out


def test_train_and_eval_from_the_cli(tiny_run, capsys):
    from dualroute.cli import main

    assert (tiny_run / "summary.json").is_file()
    assert main(["eval", str(tiny_run), "train.eval_batches=1"]) == 0
    assert "val_acc" in capsys.readouterr().out


@pytest.mark.slow
def test_inspect_routes_each_image_once(tiny_run, tmp_path, capsys):
    from dualroute.inspect.cli_hook import inspect_main

    assert inspect_main([str(tiny_run), "--out", str(tmp_path / "report"), "--batches", "1"]) == 0
    report = (tmp_path / "report" / "report.md").read_text(encoding="utf-8")
    assert "one routing decision per image" in report and "CNNClassifier" in report
