"""Run configs (model + data + training + task options) and the named presets the CLI starts from.

A ``RunConfig`` is a tree of frozen dataclasses, so ``configio`` can override any leaf
(``model.moe.num_experts=16``, ``train.steps=200``) and round-trip it through JSON. Which model config and
which ``task`` options a run config may hold is up to the task its ``data.kind`` belongs to
(``dualroute.train.registry``); each task module registers its presets with ``register_preset``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from dualroute.layer import MoEConfig
from dualroute.routing import RouterOptions
from dualroute.train import registry
from dualroute.train.configio import apply_overrides, config_from_dict, config_to_dict

TEXT_KINDS = ("text", "stdlib", "tokens")  # the language-model task's (tasks/lm.py)
IMAGE_KINDS = ("digits", "mnist", "cifar10")  # the image task's (tasks/image.py)
DEFAULT_PRESET = "lm-dual"


@dataclass(frozen=True)
class DataConfig:
    # What the run reads; each kind belongs to one task (``registry.data_kinds()``). Language model: text
    # (a file or folder, or the embedded corpus: CPython's help text), stdlib (the Python standard library's
    # source, dualroute.data.stdlib_corpus), tokens (a uint16 .bin); images: digits, mnist, cifar10.
    kind: str = "text"
    path: str | None = None  # text: file or folder (None = embedded corpus); tokens: uint16 .bin; images: folder
    tokenizer: Literal["byte", "char", "bpe"] = "byte"  # text and stdlib kinds only
    bpe_vocab_size: int = 512
    val_fraction: float = 0.1  # stdlib: the share of files (by a hash of their path) kept for validation

    def __post_init__(self) -> None:
        registry.task_type_for_kind(self.kind)  # names the known kinds if it is none of them
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.bpe_vocab_size < 1:
            raise ValueError(f"bpe_vocab_size must be positive, got {self.bpe_vocab_size}")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000  # optimizer steps
    batch_size: int = 16  # per micro-batch
    seq_len: int = 128  # language models only
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50  # capped at steps
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0  # 0 = off
    grad_accum: int = 1  # micro-batches per optimizer step
    eval_every: int = 100  # 0 = only at the end
    eval_batches: int = 16
    log_every: int = 10
    save_every: int = 500  # 0 = only at the end
    keep_checkpoints: int = 2
    seed: int = 0
    balance_bias_rate: float = 1e-3  # correction-bias update rate (aux-loss-free balancing), if enabled
    out_dir: str = "runs/lm-dual"
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    # bfloat16: forward passes and the loss under torch.autocast to bfloat16 (training, evaluation and the
    # summary's sample); weights, gradients and the optimizer state stay float32, routing math too.
    precision: Literal["float32", "bfloat16"] = "float32"
    threads: int | None = None  # torch CPU threads; None = torch's default
    dist_timeout_s: float = 300.0  # expert parallelism: a collective waiting longer than this fails (dead peer)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "eval_batches", "log_every",
                     "keep_checkpoints"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"train.{name} must be >= 1, got {value}")
        for name in ("warmup_steps", "eval_every", "save_every"):
            value = getattr(self, name)
            if value < 0:
                raise ValueError(f"train.{name} must be >= 0, got {value}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"train.lr must be finite and > 0, got {self.lr}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.weight_decay < 0 or self.grad_clip < 0 or self.balance_bias_rate < 0:
            raise ValueError("train.weight_decay, train.grad_clip and train.balance_bias_rate must be >= 0, got "
                             f"{self.weight_decay}, {self.grad_clip}, {self.balance_bias_rate}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"train.betas must be in [0, 1), got {self.betas}")
        if self.precision not in ("float32", "bfloat16"):
            raise ValueError(f"train.precision must be 'float32' or 'bfloat16', got {self.precision!r}"
                             + (" (float16 would need loss scaling)" if self.precision == "float16" else ""))
        if not (math.isfinite(self.dist_timeout_s) and self.dist_timeout_s > 0):
            raise ValueError(f"train.dist_timeout_s must be finite and > 0, got {self.dist_timeout_s}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"train.threads must be >= 1 or None, got {self.threads}")


@dataclass(frozen=True)
class RunConfig:
    model: Any  # the config of a model type registered for the data kind's task (e.g. LMConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    task: Any = None  # the task's options (its TaskType.options_cls; filled with the defaults if None)

    def __post_init__(self) -> None:
        task = registry.task_type_for_kind(self.data.kind)
        try:
            model = registry.model_type_of(self.model)
        except TypeError as e:
            raise ValueError(str(e)) from None
        if model.task != task.name:
            wanted = ", ".join(f"{m.config_cls.__name__} ({m.name!r})" for m in registry.model_types_for(task.name))
            raise ValueError(f"data kind {self.data.kind!r} is read by the {task.name!r} task, which needs a model "
                             f"config among {wanted}; got {type(self.model).__name__}, a {model.task!r} model")
        if task.options_cls is None:
            if self.task is not None:
                raise ValueError(f"the {task.name!r} task takes no task options, got {self.task!r}")
        elif self.task is None:
            object.__setattr__(self, "task", task.options_cls())
        elif type(self.task) is not task.options_cls:
            raise ValueError(f"the {task.name!r} task's options are a {task.options_cls.__name__}, "
                             f"got {type(self.task).__name__}")
        if task.check is not None:
            task.check(self)

    @property
    def task_type(self) -> registry.TaskType:
        return registry.task_type_for_kind(self.data.kind)

    @property
    def model_type(self) -> registry.ModelType:
        return registry.model_type_of(self.model)

    @property
    def is_lm(self) -> bool:
        return self.task_type.name == "lm"


def run_config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    d = {"model_kind": cfg.model_type.name, **config_to_dict(cfg)}  # not "model_type": HF configs use that
    if d.get("task") is None:
        d.pop("task", None)
    return d


def run_config_from_dict(d: dict[str, Any]) -> RunConfig:
    """Inverse of ``run_config_to_dict``. ``model_kind`` names the model type (its config class); a config saved
    before it was written takes its task's first model type (the language model, or the ViT)."""
    if not isinstance(d, dict) or not {"model", "data"} <= set(d):
        raise ValueError(f"not a run config: expected a dict with 'model' and 'data', got {str(d)[:80]!r}")
    data = config_from_dict(DataConfig, d["data"])
    task = registry.task_type_for_kind(data.kind)
    if "model_kind" in d:
        model = registry.model_type(d["model_kind"])
    else:
        model = registry.model_types_for(task.name)[0]
    train = config_from_dict(TrainConfig, d.get("train", {}))
    options = None
    if task.options_cls is not None and d.get("task") is not None:
        options = config_from_dict(task.options_cls, d["task"])
    return RunConfig(model=config_from_dict(model.config_cls, d["model"]), data=data, train=train, task=options)


def override(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """``configio.apply_overrides`` on a run config (``model.*`` descends into whichever model config it holds).

    ``model.dim=N`` also sets the MoE (or dense-twin) config's dim unless that is given too, so one
    override resizes any preset.
    """
    overrides = list(overrides)
    given = {o.removeprefix("--").partition("=")[0].strip(): o.partition("=")[2] for o in overrides}
    if "model.dim" in given:
        for section in ("moe", "dense_twin_of"):
            if getattr(cfg.model, section, None) is not None and f"model.{section}.dim" not in given:
                overrides.append(f"model.{section}.dim={given['model.dim']}")
    return apply_overrides(cfg, overrides)


# ------------------------------------------------------------------------------------------ presets

PRESETS: dict[str, Callable[[], RunConfig]] = {}  # filled by the task modules (dualroute/train/tasks/)


def register_preset(name: str, make: Callable[[], RunConfig]) -> None:
    """Add a named preset; its ``train.out_dir`` should be ``runs/<name>``."""
    if name in PRESETS:
        raise ValueError(f"preset {name!r} is already registered")
    PRESETS[name] = make


def preset_moe(dim: int, hidden: int, groups: int, groups_per_token: int, *, num_experts: int = 8,
               experts_per_token: int = 2, expert_kind: str = "swiglu", num_shared_experts: int = 0,
               renormalize: bool = True) -> MoEConfig:
    """The presets' MoE layer: correction biases (zero until a balancer moves them) let
    ``train.balance_bias_rate`` act."""
    return MoEConfig(dim=dim, hidden=hidden, num_experts=num_experts, experts_per_token=experts_per_token,
                     num_groups=groups, groups_per_token=groups_per_token, expert_kind=expert_kind,
                     num_shared_experts=num_shared_experts,
                     router=RouterOptions(correction_bias=True, renormalize=renormalize))


def named_run(name: str, model: Any, data: DataConfig, train: TrainConfig, task: Any = None) -> RunConfig:
    """A preset's run config, writing to ``runs/<name>``."""
    return RunConfig(model=model, data=data, train=dataclasses.replace(train, out_dir=f"runs/{name}"), task=task)


def get_preset(name: str) -> RunConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]()
