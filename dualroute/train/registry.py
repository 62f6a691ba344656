"""Tasks and model types by name, so that a new application is a new file rather than edits in ten.

A **model type** ties a model config dataclass to the module it builds and to the task that trains it::

    register_model(ModelType("lm", LMConfig, TransformerLM, task="lm"))

A **task type** names the data kinds it reads, how to build the task object the trainer drives, and the
dataclass (if any) that holds its options in a run config's ``task`` section::

    register_task(TaskType("lm", data_kinds=("text", "stdlib", "tokens"), make=LMTask.from_saved))

A run config's ``data.kind`` picks the task type; its model config must be of a model type registered for
that task. The built-in tasks register themselves in ``dualroute.train.tasks`` (imported with
``dualroute.train``); a plug-in registers its own the same way, and its presets with
``presets.register_preset``.

``make(cfg, saved)`` builds the task: ``saved`` is the ``extra`` of the checkpoint being read (empty for a
fresh run), from which the task restores what it saved with ``task.state_extra()`` (a tokenizer, say).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

from torch import nn


@dataclass(frozen=True)
class ModelType:
    name: str  # written to a saved run config as ``model_kind``
    config_cls: type  # a frozen dataclass with ``moe`` / ``dense_twin_of`` fields
    build: Callable[[Any], nn.Module]  # config -> module returning a ``ModelOutput``
    task: str  # the task type that trains it


@dataclass(frozen=True)
class TaskType:
    name: str
    data_kinds: tuple[str, ...]  # the ``data.kind`` values this task reads
    make: Callable[[Any, dict[str, Any]], Any]  # (run config, saved checkpoint extra) -> task object
    options_cls: type | None = None  # dataclass of the run config's ``task`` section; None: no section
    # "tokens": routing statistics are labelled by input token (text); "classes": by the example's class
    labels: Literal["tokens", "classes"] = "classes"
    check: Callable[[Any], None] | None = None  # extra checks of a whole run config, raising ValueError


_MODELS: dict[str, ModelType] = {}
_TASKS: dict[str, TaskType] = {}


def register_model(model_type: ModelType) -> ModelType:
    old = _MODELS.get(model_type.name)
    if old is not None and old != model_type:
        raise ValueError(f"model type {model_type.name!r} is already registered (config {old.config_cls.__name__})")
    for other in _MODELS.values():
        if other.config_cls is model_type.config_cls and other.name != model_type.name:
            raise ValueError(f"{model_type.config_cls.__name__} is already the config of model type {other.name!r}")
    _MODELS[model_type.name] = model_type
    return model_type


def register_task(task_type: TaskType) -> TaskType:
    old = _TASKS.get(task_type.name)
    if old is not None and old != task_type:
        raise ValueError(f"task type {task_type.name!r} is already registered")
    for other in _TASKS.values():
        shared = set(other.data_kinds) & set(task_type.data_kinds)
        if shared and other.name != task_type.name:
            raise ValueError(f"data kinds {sorted(shared)} already belong to task {other.name!r}")
    _TASKS[task_type.name] = task_type
    return task_type


def data_kinds() -> tuple[str, ...]:
    return tuple(k for t in _TASKS.values() for k in t.data_kinds)


def task_type(name: str) -> TaskType:
    if name not in _TASKS:
        raise ValueError(f"unknown task {name!r}; registered: {', '.join(_TASKS)}")
    return _TASKS[name]


def task_type_for_kind(kind: str) -> TaskType:
    for t in _TASKS.values():
        if kind in t.data_kinds:
            return t
    raise ValueError(f"unknown data kind {kind!r}; expected one of {', '.join(data_kinds())}")


def model_type(name: str) -> ModelType:
    if name not in _MODELS:
        raise ValueError(f"unknown model type {name!r}; registered: {', '.join(_MODELS)}")
    return _MODELS[name]


def model_type_of(cfg: Any) -> ModelType:
    for m in _MODELS.values():
        if type(cfg) is m.config_cls:
            return m
    raise TypeError(f"{type(cfg).__name__} is not the config of a registered model type "
                    f"({', '.join(f'{m.name}: {m.config_cls.__name__}' for m in _MODELS.values())})")


def model_types_for(task: str) -> list[ModelType]:
    """The model types ``task`` trains, in registration order (the first is the default of an old config)."""
    return [m for m in _MODELS.values() if m.task == task]


def build_model(cfg: Any) -> nn.Module:
    return model_type_of(cfg).build(cfg)
