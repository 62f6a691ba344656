"""The task registry: a new task plugs into the trainer, checkpoints, eval and presets with no edits elsewhere."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

from dualroute.layer import MoEConfig, MoELayer
from dualroute.models import ModelOutput, dense_twin
from dualroute.train import presets, registry
from dualroute.train.presets import (DataConfig, RunConfig, TrainConfig, get_preset, override, run_config_from_dict,
                                     run_config_to_dict)
from dualroute.train.tasks import Task, make_task
from dualroute.train.trainer import load_run, train


@dataclass(frozen=True)
class ToyConfig:
    dim: int = 8
    classes: int = 3
    moe: MoEConfig | None = None
    dense_twin_of: MoEConfig | None = None


class ToyModel(nn.Module):
    context_len = 1  # no attention (flops_per_token counts attention over context_len positions)

    def __init__(self, cfg: ToyConfig) -> None:
        super().__init__()
        self.moe = MoELayer(cfg.moe) if cfg.moe is not None else nn.Linear(cfg.dim, cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.classes)

    def forward(self, x_BD: torch.Tensor) -> ModelOutput:
        if isinstance(self.moe, MoELayer):
            y_BD, aux = self.moe(x_BD)
            return ModelOutput(self.head(y_BD), [aux])
        return ModelOutput(self.head(self.moe(x_BD)), [])


@dataclass(frozen=True)
class ToyOptions:
    offset: float = 0.0


class ToyTask(Task):
    """Classify which of ``classes`` fixed centres a noisy point came from; remembers a 'vocabulary' string."""

    def __init__(self, cfg: RunConfig, vocabulary: str = "abc") -> None:
        super().__init__(cfg)
        self.vocabulary = vocabulary
        self.centres_YD = torch.randn(cfg.model.classes, cfg.model.dim, generator=torch.Generator().manual_seed(1))

    @classmethod
    def from_saved(cls, cfg: RunConfig, saved: dict[str, Any]) -> ToyTask:
        return cls(cfg, saved.get("toy_vocabulary", "abc"))

    def state_extra(self) -> dict[str, Any]:
        return {"toy_vocabulary": self.vocabulary}

    def _batch(self, generator: torch.Generator, n: int):
        y_B = torch.randint(0, self.centres_YD.shape[0], (n,), generator=generator)
        x_BD = self.centres_YD[y_B] + 0.3 * torch.randn(n, self.centres_YD.shape[1], generator=generator)
        return x_BD + self.run_config.task.offset, y_B

    def train_batch(self, generator):
        return self._batch(generator, self.run_config.train.batch_size)

    def eval_batches(self):
        g = torch.Generator().manual_seed(2)
        return iter([self._batch(g, 32) for _ in range(2)])

    def metrics(self, mean_loss, accuracy):
        return {"val_loss": mean_loss, "val_acc": accuracy}

    @property
    def baseline_loss(self) -> float:
        return math.log(self.run_config.model.classes)


@pytest.fixture
def toy_registered():
    """Register the toy task, model and preset for one test, then restore the registry as it was."""
    saved = dict(registry._MODELS), dict(registry._TASKS), dict(presets.PRESETS)
    registry.register_model(registry.ModelType("toy", ToyConfig, ToyModel, task="toy"))
    registry.register_task(registry.TaskType("toy", data_kinds=("toy-points",), make=ToyTask.from_saved,
                                             options_cls=ToyOptions))
    moe = MoEConfig(dim=8, hidden=8, num_experts=4, experts_per_token=2, num_groups=2, groups_per_token=1)
    presets.register_preset("toy-dual", lambda: presets.named_run(
        "toy-dual", ToyConfig(moe=moe), DataConfig(kind="toy-points"),
        TrainConfig(steps=4, batch_size=8, eval_every=2, eval_batches=2, log_every=1, save_every=2)))
    yield
    for live, old in zip((registry._MODELS, registry._TASKS, presets.PRESETS), saved):
        live.clear()
        live.update(old)


def test_a_registered_task_trains_saves_and_loads_with_its_own_state(toy_registered, tmp_path):
    cfg = override(get_preset("toy-dual"), [f"train.out_dir={tmp_path / 'run'}", "task.offset=0.5"])
    assert cfg.task == ToyOptions(offset=0.5) and cfg.is_lm is False
    summary = train(cfg, progress=False)
    assert summary.steps == 4 and set(summary.metrics) == {"val_loss", "val_acc"}
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["model_kind"] == "toy" and saved["task"] == {"offset": 0.5}
    assert run_config_from_dict(saved) == cfg
    task, model, ckpt = load_run(tmp_path / "run")
    assert isinstance(task, ToyTask) and isinstance(model, ToyModel) and ckpt.extra["toy_vocabulary"] == "abc"
    assert task.evaluate(model, torch.device("cpu")).metrics == pytest.approx(summary.metrics)
    assert make_task(cfg, {"toy_vocabulary": "xyz"}).vocabulary == "xyz"


def test_the_default_options_fill_in_and_a_dense_twin_is_generic(toy_registered):
    cfg = get_preset("toy-dual")
    assert cfg.task == ToyOptions()
    twin = dataclasses.replace(cfg, model=dense_twin(cfg.model))
    assert twin.model.moe is None and twin.model.dense_twin_of == cfg.model.moe


def test_mismatches_are_named(toy_registered):
    toy = get_preset("toy-dual")
    with pytest.raises(ValueError, match=r"'toy' task, which needs a model config among ToyConfig \('toy'\)"):
        dataclasses.replace(toy, model=get_preset("lm-dual-small").model)
    with pytest.raises(ValueError, match="'toy' task's options are a ToyOptions, got int"):
        dataclasses.replace(toy, task=3)
    with pytest.raises(ValueError, match="the 'lm' task takes no task options"):
        dataclasses.replace(get_preset("lm-dual-small"), task=ToyOptions())
    with pytest.raises(ValueError, match="unknown data kind 'toy-pts'; expected one of .*toy-points"):
        DataConfig(kind="toy-pts")
    with pytest.raises(ValueError, match="already belong to task 'toy'"):
        registry.register_task(registry.TaskType("other", data_kinds=("toy-points",), make=ToyTask.from_saved))
    with pytest.raises(ValueError, match="already the config of model type 'toy'"):
        registry.register_model(registry.ModelType("toy2", ToyConfig, ToyModel, task="toy"))
    with pytest.raises(ValueError, match="preset 'toy-dual' is already registered"):
        presets.register_preset("toy-dual", lambda: toy)


def test_a_config_saved_before_model_kind_existed_loads_as_its_tasks_first_model():
    for name, model_cls in (("lm-dual-small", "LMConfig"), ("digits-dual", "ImageConfig")):
        d = run_config_to_dict(get_preset(name))
        assert "task" not in d  # tasks without options write no section
        d.pop("model_kind")
        assert type(run_config_from_dict(d).model).__name__ == model_cls
