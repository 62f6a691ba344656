"""Run configs and presets, tasks, and the trainer: logs, checkpoints, exact resume, crash safety."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from dualroute.models import ImageConfig, LMConfig, TransformerLM, param_counts
from dualroute.train import checkpoint as ckpt
from dualroute.train.metrics_log import read_jsonl
from dualroute.train.presets import (
    PRESETS,
    RunConfig,
    TrainConfig,
    get_preset,
    override,
    run_config_from_dict,
    run_config_to_dict,
)
from dualroute.train.tasks import make_task
from dualroute.train.trainer import Trainer, train, train_lockstep

TINY_LM = ["model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.ffn_hidden=32", "model.max_seq_len=16",
           "train.seq_len=16", "train.batch_size=4", "train.eval_batches=2", "train.log_every=1",
           "train.warmup_steps=1"]


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_lm(out: Path, *extra: str, preset: str = "lm-dual-small") -> RunConfig:
    moe = ["model.moe.hidden=16"] if preset != "lm-dense-small" else []
    return override(get_preset(preset), [*TINY_LM, *moe, f"train.out_dir={out}", *extra])


def crash_before_step_3(out: Path, extra: tuple[str, ...], monkeypatch,
                        on_step: Callable[[Trainer], None] | None = None) -> None:
    """Train ``tiny_lm(out, *extra)`` until a simulated crash as step 3 starts (``on_step`` sees the trainer
    before every step), then lift the crash (``monkeypatch.undo()``) so the run can be resumed."""
    step = Trainer.train_step

    def crash_at_step_3(self):
        if on_step is not None:
            on_step(self)
        if self.step == 2:
            raise RuntimeError("simulated crash")
        return step(self)

    monkeypatch.setattr(Trainer, "train_step", crash_at_step_3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(tiny_lm(out, *extra), progress=False)
    monkeypatch.undo()


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r}


# ------------------------------------------------------------------------------------------ configs


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_build_and_round_trip(name):
    cfg = get_preset(name)
    if name.startswith(("lm-", "digits-", "mnist-", "cifar10-")):  # the built-in tasks' own presets
        assert isinstance(cfg.model, LMConfig if name.startswith("lm") else ImageConfig)
    else:  # a task module's presets (dualroute/train/tasks/): a model type registered for the data's task
        assert type(cfg.model) is cfg.model_type.config_cls and cfg.model_type.task == cfg.task_type.name
    assert run_config_from_dict(json.loads(json.dumps(run_config_to_dict(cfg)))) == cfg


def test_lm_presets_differ_only_in_routing():
    dual, flat, dense = (get_preset(n).model for n in ("lm-dual-small", "lm-flat-small", "lm-dense-small"))
    assert (dual.moe.num_groups, dual.moe.groups_per_token) == (4, 2)
    assert (flat.moe.num_groups, flat.moe.groups_per_token) == (1, 1)
    assert dual.moe.num_experts == flat.moe.num_experts and dual.moe.hidden == flat.moe.hidden
    assert dense.moe is None and dense.dense_twin_of == dual.moe
    tasks = {n: make_task(get_preset(n)) for n in ("lm-dual-small", "lm-dense-small")}
    active = {n: param_counts(t.build_model())[1] for n, t in tasks.items()}
    # only the routers differ
    assert abs(active["lm-dual-small"] - active["lm-dense-small"]) / active["lm-dense-small"] < 0.02


def test_the_search_presets_shapes_and_equal_active_parameters():
    # lm-dual / lm-flat / lm-dense: issue #14's presets (docs/results.md). Built without reading the corpus.
    dual, flat, dense = (get_preset(n) for n in ("lm-dual", "lm-flat", "lm-dense"))
    assert {c.data.kind for c in (dual, flat, dense)} == {"stdlib"}
    assert len({dataclasses.replace(c.train, out_dir="") for c in (dual, flat, dense)}) == 1  # one schedule
    moe = dual.model.moe
    assert (moe.dim, moe.num_experts, moe.experts_per_token, moe.hidden, moe.num_shared_experts) == (128, 16, 1, 512, 1)
    # K=1 weighs by probability, so the router learns from the loss
    assert (moe.num_groups, moe.groups_per_token) == (4, 2) and not moe.router.renormalize
    assert flat.model.moe == dataclasses.replace(moe, num_groups=1, groups_per_token=1)
    assert dense.model.moe is None and dense.model.dense_twin_of == moe
    models = {n: TransformerLM(c.model) for n, c in (("dual", dual), ("flat", flat), ("dense", dense))}
    assert {b.ffn.inner.cfg.hidden for b in models["dense"].blocks} == {1024}  # shared F + one routed F
    counts = {n: param_counts(m) for n, m in models.items()}
    routers = {n: sum(p.numel() for b in m.blocks for p in b.ffn.router.parameters()) for n, m in models.items()
               if n != "dense"}
    assert routers == {"flat": 4 * (16 * 128 + 16), "dual": 4 * ((16 + 4) * 128 + 16 + 4)}
    for n in ("dual", "flat"):
        assert counts[n][1] - routers[n] == counts["dense"][1] == counts["dense"][0]  # active = the twin + routers
        assert counts[n][0] - counts[n][1] == 4 * 15 * 3 * 128 * 512  # 15 of 16 routed experts idle per token


def test_overrides_reach_nested_and_union_typed_fields():
    cfg = override(get_preset("lm-dual-small"), ["model.moe.num_experts=16", "--train.steps=7", "model.dim=64"])
    assert cfg.model.moe.num_experts == 16 and cfg.train.steps == 7
    assert cfg.model.dim == cfg.model.moe.dim == 64  # model.dim carries the MoE dim along
    img = override(get_preset("digits-dense"), ["model.dim=32", "model.n_layers=1"])
    assert img.model.dim == img.model.dense_twin_of.dim == 32 and img.model.n_layers == 1


@pytest.mark.parametrize("bad, match", [
    (["train.stepz=3"], "unknown config key 'train.stepz'"),
    (["model.moe.nope=1"], "unknown config key"),
    (["train.steps=abc"], "cannot parse"),
    (["train.steps=0"], "train.steps must be >= 1"),
    (["data.kind=digits"], r"'image' task, which needs a model config among ImageConfig \('vit'\).*; got LMConfig"),
    (["train.seq_len=4096"], "exceeds model.max_seq_len"),
    (["train.precision=float16"], "'float16' as Literal\\['float32', 'bfloat16'\\]"),
])
def test_bad_overrides_raise(bad, match):
    with pytest.raises(ValueError, match=match):
        override(get_preset("lm-dual-small"), bad)


# ---------------------------------------------------------------------------------------- training


def test_tiny_run_writes_log_checkpoint_summary(tmp_path):
    summary = train(tiny_lm(tmp_path, "train.steps=3", "train.eval_every=2"), progress=False)
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert sorted(train_losses(tmp_path)) == [1, 2, 3]
    assert [r["step"] for r in records if "val_loss" in r] == [0, 2, 3]
    assert all(len(r["maxvio"]) == 2 for r in records if "loss" in r)  # two MoE layers
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "ckpt-00000003"
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["steps"] == 3 and saved["metrics"]["val_loss"] == summary.metrics["val_loss"]
    assert saved["params_active"] < saved["params_total"] and saved["flops_per_token"] > 0
    assert len(saved["experts"]) == 2 and abs(sum(saved["experts"][0]["share"]) - 1) < 1e-3
    assert saved["sample"].startswith("The ")
    assert run_config_from_dict(json.loads((tmp_path / "config.json").read_text())).train.steps == 3


def test_image_run_reports_accuracy(tmp_path):
    cfg = override(get_preset("digits-dual"), ["train.steps=2", "train.batch_size=16", "train.eval_batches=2",
                                               "model.dim=16", "model.n_layers=1", f"train.out_dir={tmp_path}"])
    summary = train(cfg, progress=False)
    assert 0.0 <= summary.metrics["val_acc"] <= 1.0 and summary.unit == "images" and summary.sample is None


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_resume_is_exact(tmp_path, monkeypatch, precision):
    """4 straight steps == 2 steps, a crash, and a resume for 2 more: same losses, same weights."""
    extra = ("train.steps=4", "train.save_every=2", "train.eval_every=3", "model.dropout=0.1",
             f"train.precision={precision}")
    train(tiny_lm(tmp_path / "straight", *extra), progress=False)
    crash_before_step_3(tmp_path / "resumed", extra, monkeypatch)
    assert sorted(train_losses(tmp_path / "resumed")) == [1, 2]
    train(tiny_lm(tmp_path / "resumed", *extra), resume=True, progress=False)

    assert train_losses(tmp_path / "resumed") == train_losses(tmp_path / "straight")
    a = ckpt.load_checkpoint(tmp_path / "straight" / "ckpt-00000004")
    b = ckpt.load_checkpoint(tmp_path / "resumed" / "ckpt-00000004")
    assert a.model_state.keys() == b.model_state.keys()
    for name in a.model_state:
        assert torch.equal(a.model_state[name], b.model_state[name]), name



def test_train_config_rejects_float16_with_the_reason():
    with pytest.raises(ValueError, match="got 'float16' \\(float16 would need loss scaling\\)"):
        TrainConfig(precision="float16")


def test_bfloat16_precision_runs_forward_passes_under_autocast(tmp_path, monkeypatch):
    """train.precision=bfloat16: training, evaluation and the summary's sample run their forward passes in
    bfloat16 (a Linear's output dtype shows it); the weights and their gradients stay float32."""
    seen: dict[str, set] = {}
    forward = TransformerLM.forward

    def spy(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        phase = "train" if self.training else "eval"
        seen.setdefault(phase, set()).add(self.blocks[0].attn.qkv(self.tok_emb(args[0][:, :1])).dtype)
        return out

    monkeypatch.setattr(TransformerLM, "forward", spy)
    trainer = Trainer(tiny_lm(tmp_path, "train.steps=2", "train.precision=bfloat16"), progress=False)
    summary = trainer.fit()
    assert seen == {"train": {torch.bfloat16}, "eval": {torch.bfloat16}}  # eval: validation and the sample
    assert math.isfinite(summary.metrics["val_loss"]) and summary.sample
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    state = ckpt.load_checkpoint(tmp_path / "ckpt-00000002").optimizer_state["state"]
    assert all(v.dtype == torch.float32 for s in state.values() for v in s.values() if v.ndim > 0)


def test_crash_during_save_keeps_last_checkpoint(tmp_path, monkeypatch):
    cfg = tiny_lm(tmp_path, "train.steps=2", "train.save_every=1")
    write_all = ckpt._write_all

    def fail_on_second_save(tmp, *args):
        if (tmp_path / "ckpt-00000001").exists():
            tmp.mkdir()
            (tmp / ckpt.MODEL_FILE).write_bytes(b"half a file")
            raise OSError("disk full")
        write_all(tmp, *args)

    monkeypatch.setattr(ckpt, "_write_all", fail_on_second_save)
    with pytest.raises(OSError, match="disk full"):
        train(cfg, progress=False)
    monkeypatch.undo()
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "ckpt-00000001"
    assert ckpt.load_checkpoint(tmp_path / "ckpt-00000001").extra["step"] == 1
    assert not list(tmp_path.glob(".tmp-*"))
    assert train(cfg, resume=True, progress=False).steps == 2


def test_resume_rejects_another_model(tmp_path):
    train(tiny_lm(tmp_path, "train.steps=1"), progress=False)
    with pytest.raises(ValueError, match="different model config"):
        train(tiny_lm(tmp_path, "train.steps=2", "model.n_layers=1"), resume=True, progress=False)


@pytest.mark.parametrize("turn_steps", [1, 3])
def test_lockstep_runs_are_the_runs_trained_alone(tmp_path, turn_steps):
    """Interleaved a step or a few at a time, each run keeps its own RNG (dropout, router noise): same logs, same
    weights."""
    common = ("model.dropout=0.1", "train.steps=4", "train.eval_every=2")
    noisy = ("model.moe.router.noisy_gating=true",)
    configs = {name: tiny_lm(tmp_path / "alone" / name, *common, *extra, f"train.seed={seed}", preset=preset)
               for name, preset, extra, seed in [("dual", "lm-dual-small", noisy, 0), ("dense", "lm-dense-small", (), 0),
                                                 ("dual1", "lm-dual-small", noisy, 1)]}
    alone = {name: train(cfg, progress=False) for name, cfg in configs.items()}
    together = train_lockstep([override(c, [f"train.out_dir={tmp_path / 'lock' / n}"]) for n, c in configs.items()],
                              turn_steps=turn_steps, progress=False)
    for (name, a), b in zip(alone.items(), together):
        assert b.steps == 4 and b.metrics == a.metrics and b.train_time_s > 0
        logged = [{k: v for k, v in r.items() if k not in ("train_time", "elapsed", "tokens_per_s")}
                  for r in read_jsonl(tmp_path / "lock" / name / "metrics.jsonl")]
        assert logged == [{k: v for k, v in r.items() if k not in ("train_time", "elapsed", "tokens_per_s")}
                          for r in read_jsonl(tmp_path / "alone" / name / "metrics.jsonl")]
        a_state = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "alone" / name)).model_state
        b_state = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "lock" / name)).model_state
        assert all(torch.equal(a_state[k], b_state[k]) for k in a_state)


def test_lockstep_refuses_shared_or_used_directories_before_training(tmp_path):
    cfg = tiny_lm(tmp_path / "a", "train.steps=1")
    with pytest.raises(ValueError, match="turn_steps must be an integer >= 1, got 0"):
        train_lockstep([cfg], turn_steps=0, progress=False)
    with pytest.raises(ValueError, match=r"one thread count; got train.threads \[2, None\]"):
        train_lockstep([cfg, tiny_lm(tmp_path / "c", "train.steps=1", "train.threads=2")], progress=False)
    with pytest.raises(ValueError, match="one output directory each"):
        train_lockstep([cfg, cfg], progress=False)
    assert not (tmp_path / "a").exists()
    train(cfg, progress=False)
    with pytest.raises(ValueError, match="already holds checkpoints"):
        train_lockstep([tiny_lm(tmp_path / "b", "train.steps=1"), cfg], progress=False)
    assert not (tmp_path / "b").exists()


def test_grad_accumulation_matches_larger_batch(tmp_path):
    """Dense model, no dropout: 2 micro-batches of 4 take the same step as one batch of 8."""
    common = ("train.steps=2", "train.eval_every=0", "train.grad_clip=0")
    train(tiny_lm(tmp_path / "accum", *common, "train.batch_size=4", "train.grad_accum=2", preset="lm-dense-small"),
          progress=False)
    train(tiny_lm(tmp_path / "big", *common, "train.batch_size=8", preset="lm-dense-small"), progress=False)
    for step, loss in train_losses(tmp_path / "big").items():
        assert train_losses(tmp_path / "accum")[step] == pytest.approx(loss, abs=1e-5)
    a = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "accum")).model_state
    b = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "big")).model_state
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-4)


def test_char_tokenizer_travels_with_the_checkpoint(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    cfg = tiny_lm(tmp_path / "run", "train.steps=1", "data.tokenizer=char", f"data.path={corpus}")
    train(cfg, progress=False)
    saved = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "run"))
    assert saved.extra["tokenizer"]["kind"] == "char"
    assert saved.extra["config"]["model"]["vocab_size"] == len(set(corpus.read_text())) + 1


def test_balance_losses_and_correction_biases(tmp_path):
    """The layers' aux losses join the loss; correction biases move after each step only when rate > 0."""
    def router_biases(rate: str, out: Path) -> list[torch.Tensor]:
        trainer = Trainer(tiny_lm(out, "train.steps=1", "model.moe.balance.switch=0.01",
                                  f"train.balance_bias_rate={rate}"), progress=False)
        stats = trainer.train_step()
        assert stats.aux_loss > 0
        return [m.router.expert_bias_E for m in trainer.model.modules() if hasattr(m, "router")]

    assert all(b.abs().sum() > 0 for b in router_biases("0.01", tmp_path / "a"))
    assert all(b.abs().sum() == 0 for b in router_biases("0", tmp_path / "b"))


def test_fresh_run_refuses_a_used_directory(tmp_path):
    train(tiny_lm(tmp_path, "train.steps=1"), progress=False)
    with pytest.raises(ValueError, match="already holds checkpoints"):
        train(tiny_lm(tmp_path, "train.steps=1"), progress=False)
