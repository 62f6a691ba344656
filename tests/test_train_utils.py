"""Generic training utilities: config overrides / TOML / dict round-trip, atomic checkpoints, LR
schedule, JSON-lines metrics."""

from __future__ import annotations

import dataclasses
import json
import math
import random
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
import safetensors.torch
import torch

from dualroute.train import checkpoint as ckpt
from dualroute.train.configio import apply_overrides, config_from_dict, config_to_dict, load_config_file
from dualroute.train.metrics_log import JsonlLogger, read_jsonl
from dualroute.train.schedule import warmup_cosine, warmup_cosine_scheduler

# ---------------------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class MoECfg:
    num_experts: int = 8
    top_k: int = 2
    capacity: float | None = None
    router: Literal["flat", "two_level"] = "two_level"
    hidden_sizes: tuple[int, ...] = (64, 64)
    num_groups: int = dataclasses.field(init=False, default=0)

    def __post_init__(self) -> None:
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}")
        object.__setattr__(self, "num_groups", max(1, self.num_experts // 4))


@dataclasses.dataclass(frozen=True)
class ModelCfg:
    dim: int = 32
    name: str = "tiny"
    moe: MoECfg = dataclasses.field(default_factory=MoECfg)


@dataclasses.dataclass
class TrainCfg:
    lr: float = 1e-3
    compile: bool = False
    seed: int | None = 0


@dataclasses.dataclass(frozen=True)
class Cfg:
    model: ModelCfg = dataclasses.field(default_factory=ModelCfg)
    train: TrainCfg = dataclasses.field(default_factory=TrainCfg)
    out_dir: Path = Path("runs/x")


def test_overrides_parse_each_type_through_nested_frozen_dataclasses():
    base = Cfg()
    cfg = apply_overrides(
        base,
        [
            "model.moe.num_experts=16",
            "--model.moe.top_k=4",
            "model.moe.capacity=1.25",
            "model.moe.router=flat",
            "model.moe.hidden_sizes=128, 256,512",
            "model.name=big",
            "train.lr=3e-4",
            "train.compile=yes",
            "train.seed=none",
            "out_dir=/tmp/run",
        ],
    )
    assert cfg.model.moe == MoECfg(16, 4, 1.25, "flat", (128, 256, 512))
    assert cfg.model.moe.num_groups == 4  # derived field recomputed by __post_init__
    assert (cfg.model.name, cfg.model.dim) == ("big", 32)
    assert cfg.train == TrainCfg(lr=3e-4, compile=True, seed=None)
    assert cfg.out_dir == Path("/tmp/run")
    assert base == Cfg()  # the input is untouched
    for text, want in [("true", True), ("1", True), ("No", False), ("0", False), ("false", False)]:
        assert apply_overrides(base, [f"train.compile={text}"]).train.compile is want
    assert apply_overrides(base, ["model.moe.capacity=null"]).model.moe.capacity is None
    assert apply_overrides(base, ["model.moe.hidden_sizes="]).model.moe.hidden_sizes == ()
    assert apply_overrides(base, ["train.seed=7", "train.seed=9"]).train.seed == 9  # last wins


def test_overrides_validate_the_final_combination_in_post_init():
    # applied one at a time, top_k=12 would fail against num_experts=8; grouped, it passes
    cfg = apply_overrides(Cfg(), ["model.moe.top_k=12", "model.moe.num_experts=16"])
    assert (cfg.model.moe.top_k, cfg.model.moe.num_experts) == (12, 16)
    with pytest.raises(ValueError, match=r"top_k must be in \[1, num_experts=8\], got 9"):
        apply_overrides(Cfg(), ["model.moe.top_k=9"])


def test_unknown_key_lists_close_matches_and_valid_keys():
    with pytest.raises(ValueError) as info:
        apply_overrides(Cfg(), ["model.moe.num_expert=16"])
    msg = str(info.value)
    assert "'model.moe.num_expert'" in msg and "did you mean 'num_experts'" in msg
    assert "capacity, hidden_sizes, num_experts, router, top_k" in msg
    assert "num_groups" not in msg  # init=False fields are not settable
    with pytest.raises(ValueError, match="unknown config key 'modle'.*model, out_dir, train"):
        apply_overrides(Cfg(), ["modle.dim=3"])
    with pytest.raises(ValueError, match="'model.dim' is a value"):
        apply_overrides(Cfg(), ["model.dim.x=3"])
    with pytest.raises(ValueError, match="not of the form key=value"):
        apply_overrides(Cfg(), ["model.dim"])


@pytest.mark.parametrize(
    ("override", "pieces"),
    [
        ("model.dim=3.5", ["'model.dim'", "'3.5'", "int"]),
        ("train.lr=fast", ["'train.lr'", "'fast'", "float"]),
        ("train.compile=maybe", ["'train.compile'", "'maybe'", "bool"]),
        ("train.seed=abc", ["'train.seed'", "'abc'", "int | None"]),
        ("model.moe.hidden_sizes=1,x", ["'model.moe.hidden_sizes'", "'1,x'", "tuple[int, ...]"]),
        ("model.moe.router=dense", ["'model.moe.router'", "'dense'", "one of ['flat', 'two_level']"]),
        ("model.moe=3", ["'model.moe'", "config section"]),
    ],
)
def test_bad_override_value_names_key_value_and_type(override, pieces):
    with pytest.raises(ValueError) as info:
        apply_overrides(Cfg(), [override])
    for piece in pieces:
        assert piece in str(info.value)


def test_toml_nested_tables(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(
        'out_dir = "runs/toml"\n'
        "[model]\ndim = 64\n"
        '[model.moe]\nnum_experts = 32\ntop_k = 3\nrouter = "flat"\nhidden_sizes = [8, 16]\ncapacity = 2\n'
        '[train]\nlr = 1\nseed = "none"\n'
    )
    cfg = load_config_file(path, Cfg())
    assert cfg.model.moe == MoECfg(32, 3, 2.0, "flat", (8, 16))
    assert isinstance(cfg.model.moe.capacity, float) and isinstance(cfg.train.lr, float)
    assert cfg.model.dim == 64 and cfg.model.name == "tiny"
    assert cfg.train.seed is None and cfg.out_dir == Path("runs/toml")


@pytest.mark.parametrize(
    ("text", "error", "pieces"),
    [
        ("[model]\ndimm = 3\n", ValueError, ["'model.dimm'", "did you mean 'dim'", "dim, moe, name"]),
        ("[model]\ndim = 3.0\n", TypeError, ["'model.dim'", "3.0", "int"]),
        ("[train]\ncompile = 1\n", TypeError, ["'train.compile'", "bool"]),
        ('[model.moe]\nrouter = "dense"\n', TypeError, ["'model.moe.router'", "'dense'", "Literal"]),
        ("[model.moe]\nhidden_sizes = [1, 2.5]\n", TypeError, ["'model.moe.hidden_sizes'", "tuple[int, ...]"]),
        ("model = 3\n", TypeError, ["'model'", "table"]),
        ("[model\n", ValueError, ["invalid TOML"]),
    ],
)
def test_toml_errors_name_the_file_and_key(tmp_path, text, error, pieces):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(error) as info:
        load_config_file(path, Cfg())
    for piece in [str(path), *pieces]:
        assert piece in str(info.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.toml"):
        load_config_file(tmp_path / "nope.toml", Cfg())


def test_config_dict_round_trip_through_json():
    cfg = apply_overrides(Cfg(), ["model.moe.hidden_sizes=3,4", "train.seed=none", "model.moe.capacity=1.5"])
    d = json.loads(json.dumps(config_to_dict(cfg)))
    assert d["model"]["moe"]["hidden_sizes"] == [3, 4] and "num_groups" not in d["model"]["moe"]
    assert config_from_dict(Cfg, d) == cfg
    assert config_from_dict(Cfg, {"train": {"lr": 2}}) == Cfg(train=TrainCfg(lr=2.0))  # partial dict
    with pytest.raises(ValueError, match="'train.lrr'"):
        config_from_dict(Cfg, {"train": {"lrr": 2}})
    with pytest.raises(TypeError, match="'model.moe.router'.*'dense'"):
        config_from_dict(Cfg, {"model": {"moe": {"router": "dense"}}})


# ------------------------------------------------------------------------------------ checkpoints


def _model_and_optimizer(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False))
    model[1].weight = model[0].weight  # tied weights share one tensor
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.arange(10)).square().mean().backward()
    opt.step()
    return model, opt


def test_checkpoint_round_trip_model_optimizer_scheduler_rng(tmp_path):
    model, opt = _model_and_optimizer(0)
    sched = warmup_cosine_scheduler(opt, warmup_steps=2, total_steps=10)
    opt.step()
    sched.step()
    state = model.state_dict()
    state["transposed"] = torch.arange(6.0).reshape(2, 3).t()  # non-contiguous view
    path = ckpt.save_checkpoint(
        tmp_path / "ckpt",
        model_state=state,
        optimizer_state=opt.state_dict(),
        scheduler_state=sched.state_dict(),
        extra={"step": 1, "config": config_to_dict(Cfg())},
    )
    expected = (random.random(), np.random.rand(), torch.rand(3))

    loaded = ckpt.load_checkpoint(path)
    assert loaded.extra == {"step": 1, "config": config_to_dict(Cfg())}
    assert set(loaded.model_state) == set(state)
    for name, tensor in state.items():
        torch.testing.assert_close(loaded.model_state[name], tensor, rtol=0, atol=0)
    assert loaded.model_state["0.weight"] is loaded.model_state["1.weight"]  # tie restored

    fresh_model, fresh_opt = _model_and_optimizer(1)
    fresh_model.load_state_dict({k: v for k, v in loaded.model_state.items() if k != "transposed"})
    fresh_opt.load_state_dict(loaded.optimizer_state)
    a, b = opt.state_dict(), fresh_opt.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for pid, slots in a["state"].items():
        for slot, value in slots.items():
            torch.testing.assert_close(b["state"][pid][slot], value, rtol=0, atol=0)
    fresh_sched = warmup_cosine_scheduler(fresh_opt, warmup_steps=2, total_steps=10)
    fresh_sched.load_state_dict(loaded.scheduler_state)
    assert fresh_sched.last_epoch == sched.last_epoch

    ckpt.restore_rng(loaded.rng_state)
    assert (random.random(), np.random.rand()) == expected[:2]
    torch.testing.assert_close(torch.rand(3), expected[2], rtol=0, atol=0)


def _save(path: Path, value: float, step: int) -> Path:
    return ckpt.save_checkpoint(path, model_state={"w": torch.full((4,), value)}, extra={"step": step}, rng=False)


def test_checkpoint_overwrite_replaces_and_leaves_no_temp(tmp_path):
    target = tmp_path / "ckpt"
    _save(target, 1.0, 1)
    _save(target, 2.0, 2)
    loaded = ckpt.load_checkpoint(target)
    assert loaded.extra["step"] == 2 and loaded.model_state["w"].eq(2.0).all()
    assert loaded.rng_state is None and loaded.optimizer_state is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


@pytest.mark.parametrize("crash_in", ["serialize", "write_state", "swap"])
def test_crash_mid_save_keeps_previous_checkpoint(tmp_path, monkeypatch, crash_in):
    target = tmp_path / "ckpt"
    _save(target, 1.0, 1)

    def boom(*args, **kwargs):
        raise OSError("disk full (simulated)")

    if crash_in == "serialize":
        monkeypatch.setattr(safetensors.torch, "save", boom)
    elif crash_in == "write_state":  # the weights are written, the state file fails
        real_write = ckpt._write_file
        monkeypatch.setattr(ckpt, "_write_file", lambda path, data: (
            boom() if path.name == ckpt.STATE_TENSORS_FILE else real_write(path, data)))
    else:  # old checkpoint already moved to the backup when the second rename fails
        real_replace = ckpt.os.replace

        def replace(src, dst):
            if Path(src).name.startswith(".tmp-"):
                raise OSError("crash between renames (simulated)")
            real_replace(src, dst)

        monkeypatch.setattr(ckpt.os, "replace", replace)
    with pytest.raises(OSError, match="simulated"):
        _save(target, 2.0, 2)
    monkeypatch.undo()

    loaded = ckpt.load_checkpoint(target)
    assert loaded.extra == {"step": 1} and loaded.model_state["w"].eq(1.0).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_load_recovers_backup_left_between_renames(tmp_path):
    target = tmp_path / "ckpt"
    _save(target, 1.0, 1)
    target.rename(tmp_path / ".bak-ckpt")  # as if killed after the first rename
    with pytest.warns(UserWarning, match="interrupted save"):
        assert ckpt.load_checkpoint(target).extra == {"step": 1}
    _save(target, 2.0, 2)  # the next save completes and clears the backup
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_stale_temp_dir_of_dead_process_is_removed(tmp_path, monkeypatch):
    stale = tmp_path / ".tmp-ckpt-999999999"
    stale.mkdir()
    monkeypatch.setattr(ckpt, "_pid_alive", lambda pid: False)
    _save(tmp_path / "ckpt", 1.0, 1)
    assert not stale.exists()


def test_load_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint directory at .*missing"):
        ckpt.load_checkpoint(tmp_path / "missing")
    target = _save(tmp_path / "ckpt", 1.0, 1)
    (target / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"corrupt checkpoint metadata .*meta\.json: not valid JSON"):
        ckpt.load_checkpoint(target)
    target = _save(tmp_path / "ckpt", 1.0, 1)
    (target / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ckpt.CorruptCheckpointError, match=r"model\.safetensors is corrupt: 7 bytes"):
        ckpt.load_checkpoint(target)
    target = _save(tmp_path / "ckpt", 1.0, 1)
    (target / "state.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="incomplete: state.safetensors is missing"):
        ckpt.load_checkpoint(target)
    assert ckpt.load_checkpoint(target, state=False).extra == {"step": 1}  # the weights need no state
    with pytest.raises(TypeError, match="JSON-serialisable"):
        ckpt.save_checkpoint(tmp_path / "c2", model_state={}, extra={"x": object()})
    with pytest.raises(TypeError, match=r"model_state\['x'\] is a int"):
        ckpt.save_checkpoint(tmp_path / "c2", model_state={"x": 3})
    assert not (tmp_path / "c2").exists()


def test_run_dir_latest_and_prune(tmp_path):
    assert ckpt.latest_checkpoint(tmp_path) is None
    for step in (5, 100, 20):
        _save(ckpt.checkpoint_dir(tmp_path, step), float(step), step)
    (tmp_path / "ckpt-00000200").mkdir()  # incomplete: no meta.json, ignored
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "ckpt-00000100"
    deleted = ckpt.prune_checkpoints(tmp_path, keep=2)
    assert deleted == [tmp_path / "ckpt-00000005"]
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "ckpt-00000100"


# --------------------------------------------------------------------------------------- schedule


def test_warmup_cosine_key_points():
    kw = dict(warmup_steps=10, total_steps=110, min_ratio=0.1)
    assert warmup_cosine(0, **kw) == pytest.approx(0.1)
    assert warmup_cosine(9, **kw) == pytest.approx(1.0)
    assert warmup_cosine(10, **kw) == pytest.approx(1.0)
    assert warmup_cosine(60, **kw) == pytest.approx(0.55)
    assert warmup_cosine(110, **kw) == pytest.approx(0.1)
    assert warmup_cosine(500, **kw) == pytest.approx(0.1)
    assert warmup_cosine(0, warmup_steps=0, total_steps=5) == pytest.approx(1.0)
    values = [warmup_cosine(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(step=-1, warmup_steps=1, total_steps=5), "step must be >= 0, got -1"),
        (dict(step=0, warmup_steps=6, total_steps=5), r"warmup_steps must be in \[0, total_steps=5\], got 6"),
        (dict(step=0, warmup_steps=0, total_steps=0), "total_steps must be >= 1, got 0"),
        (dict(step=0, warmup_steps=0, total_steps=5, min_ratio=1.5), r"min_ratio must be in \[0, 1\], got 1.5"),
    ],
)
def test_warmup_cosine_rejects_bad_arguments(kwargs, match):
    step = kwargs.pop("step")
    with pytest.raises(ValueError, match=match):
        warmup_cosine(step, **kwargs)


def test_scheduler_applies_multiplier():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = warmup_cosine_scheduler(opt, warmup_steps=4, total_steps=20, min_ratio=0.0)
    lrs = []
    for _ in range(21):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.5) and lrs[3] == pytest.approx(2.0) and lrs[20] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="warmup_steps"):
        warmup_cosine_scheduler(opt, warmup_steps=30, total_steps=20)


# ---------------------------------------------------------------------------------------- jsonl


def test_jsonl_round_trip_and_corrupt_line(tmp_path):
    path = tmp_path / "logs" / "deep" / "metrics.jsonl"
    with JsonlLogger(path) as log:
        log.log({"step": 1, "loss": 2.5, "t": torch.tensor(0.25), "n": np.float32(1.5), "v": np.arange(2)})
        log.log({"step": 2, "loss": math.inf})
    assert read_jsonl(path) == [
        {"step": 1, "loss": 2.5, "t": 0.25, "n": 1.5, "v": [0, 1]},
        {"step": 2, "loss": math.inf},
    ]
    with path.open("a") as f:
        f.write('{"step": 3, "lo')  # a crash mid-line
    with pytest.raises(ValueError, match=r"metrics\.jsonl:3: corrupt JSON line"):
        read_jsonl(path)
    with JsonlLogger(path) as log:  # appending starts a fresh line after the partial one
        log.log({"step": 4})
    assert path.read_text().splitlines()[-1] == '{"step": 4}'
    with pytest.raises(TypeError, match="not JSON-serialisable"), JsonlLogger(path) as log:
        log.log({"x": object()})


def test_optimizer_is_fused_adamw_with_the_plain_update_rule():
    from dualroute.train.optim import build_optimizer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    plain_model = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    plain_model.load_state_dict(model.state_dict())
    fused = build_optimizer(model, 1e-2, 0.1, (0.9, 0.95))
    assert fused.defaults["fused"]  # the CPU has the fused kernel
    embedding, linear, norm = plain_model
    groups = [{"params": [linear.weight], "weight_decay": 0.1},  # only matrices decay
              {"params": [embedding.weight, linear.bias, *norm.parameters()], "weight_decay": 0.0}]
    plain = torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.95), foreach=False)
    idx = torch.randint(0, 10, (16,))
    for _ in range(3):
        for m, opt in ((model, fused), (plain_model, plain)):
            opt.zero_grad()
            m(idx).pow(2).sum().backward()
            opt.step()
    for (name, got), want in zip(model.named_parameters(), plain_model.parameters()):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5, msg=name)


def test_loaded_optimizer_state_takes_the_parameter_layout():
    """Moments saved or gathered in another memory layout (an all-gather is contiguous; routed expert
    weights are out-major) are given the parameter's layout on load, so the fused AdamW step, which walks
    memory flat, updates each element with its own moments: the same step as the plain implementation."""
    from dualroute.layer import MoEConfig, MoELayer
    from dualroute.train.optim import build_optimizer, match_state_layout

    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(dim=8, hidden=12, num_experts=4))
    x = torch.randn(16, 8)

    def step(model, opt):
        opt.zero_grad()
        model(x)[0].pow(2).sum().backward()
        opt.step()

    opt = build_optimizer(layer, 1e-2, 0.1, (0.9, 0.95))
    step(layer, opt)
    saved = opt.state_dict()  # as read back from a file: new tensors, here all contiguous
    saved["state"] = {i: {k: v.clone(memory_format=torch.contiguous_format) for k, v in s.items()}
                      for i, s in saved["state"].items()}
    twin = MoELayer(MoEConfig(dim=8, hidden=12, num_experts=4))
    twin.load_state_dict(layer.state_dict())
    fused = build_optimizer(twin, 1e-2, 0.1, (0.9, 0.95))
    fused.load_state_dict(saved)
    match_state_layout(fused)
    w13 = twin.experts.w13
    assert fused.state[w13]["exp_avg"].stride() == w13.stride()
    # The reference: the plain implementation from the same saved state, on the original layer.
    same = dict(zip((id(p) for p in twin.parameters()), layer.parameters()))
    plain = torch.optim.AdamW([{"params": [same[id(p)] for p in g["params"]], "weight_decay": g["weight_decay"]}
                               for g in fused.param_groups], lr=1e-2, betas=(0.9, 0.95), foreach=False)
    plain.load_state_dict({"state": {i: {k: v.clone() for k, v in s.items()} for i, s in saved["state"].items()},
                           "param_groups": [{**g, "fused": None, "foreach": False} for g in saved["param_groups"]]})
    assert not plain.param_groups[0]["fused"]
    step(twin, fused)
    step(layer, plain)
    for (name, got), want in zip(twin.named_parameters(), layer.parameters()):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5, msg=name)
