"""Run configs (model + data + training) and the named presets the CLI starts from.

A ``RunConfig`` is a tree of frozen dataclasses, so ``configio`` can override any leaf
(``model.moe.num_experts=16``, ``train.steps=200``) and round-trip it through JSON.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from dualroute.layer import MoEConfig
from dualroute.models import ImageConfig, LMConfig, dense_twin
from dualroute.routing import RouterOptions
from dualroute.train.configio import apply_overrides, config_from_dict, config_to_dict

DataKind = Literal["text", "stdlib", "tokens", "digits", "mnist", "cifar10"]
TEXT_KINDS = ("text", "stdlib", "tokens")
IMAGE_KINDS = ("digits", "mnist", "cifar10")
DEFAULT_PRESET = "lm-dual"


@dataclass(frozen=True)
class DataConfig:
    # text: a file or folder, or the embedded corpus (CPython's help text); stdlib: the Python standard
    # library's source (dualroute.data.stdlib_corpus); tokens: a uint16 .bin; digits / mnist / cifar10: images
    kind: DataKind = "text"
    path: str | None = None  # text: file or folder (None = embedded corpus); tokens: uint16 .bin; images: folder
    tokenizer: Literal["byte", "char", "bpe"] = "byte"  # text and stdlib kinds only
    bpe_vocab_size: int = 512
    val_fraction: float = 0.1  # stdlib: the share of files (by a hash of their path) kept for validation

    def __post_init__(self) -> None:
        if self.kind not in TEXT_KINDS + IMAGE_KINDS:
            raise ValueError(f"unknown data kind {self.kind!r}; expected one of {TEXT_KINDS + IMAGE_KINDS}")
        if self.kind == "stdlib" and self.path is not None:
            raise ValueError(f"data kind 'stdlib' reads this Python's standard library; it takes no data.path "
                             f"(got {self.path!r}; for your own text use data.kind=text data.path=...)")
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
    model: LMConfig | ImageConfig
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        wants_lm = self.data.kind in TEXT_KINDS
        if wants_lm and not isinstance(self.model, LMConfig):
            raise ValueError(f"data kind {self.data.kind!r} needs a language model (LMConfig), "
                             f"got {type(self.model).__name__}")
        if not wants_lm and not isinstance(self.model, ImageConfig):
            raise ValueError(f"data kind {self.data.kind!r} needs an image model (ImageConfig), "
                             f"got {type(self.model).__name__}")
        if wants_lm and self.train.seq_len > self.model.max_seq_len:
            raise ValueError(f"train.seq_len ({self.train.seq_len}) exceeds model.max_seq_len "
                             f"({self.model.max_seq_len})")

    @property
    def is_lm(self) -> bool:
        return self.data.kind in TEXT_KINDS


def run_config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    return config_to_dict(cfg)


def run_config_from_dict(d: dict[str, Any]) -> RunConfig:
    """Inverse of ``run_config_to_dict``; the data kind says which model config class to build."""
    if not isinstance(d, dict) or not {"model", "data"} <= set(d):
        raise ValueError(f"not a run config: expected a dict with 'model' and 'data', got {str(d)[:80]!r}")
    data = config_from_dict(DataConfig, d["data"])
    model_cls = LMConfig if data.kind in TEXT_KINDS else ImageConfig
    train = config_from_dict(TrainConfig, d.get("train", {}))
    return RunConfig(model=config_from_dict(model_cls, d["model"]), data=data, train=train)


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

# Language model: byte-level, D=128, 4 layers; each MoE layer has E=8 swiglu experts of width F=128
# and K=2 active, so the dense twin's FFN is 256 wide (active width K*F). 1000 steps of 16 x 128 bytes
# take about 2.5-3.5 minutes on two idle CPU cores and reach ~1.2 nats/byte over the validation split
# (unigram baseline 3.25).
_LM = dict(vocab_size=256, dim=128, n_layers=4, n_heads=4, max_seq_len=128)
_LM_F = 128
_LM_TRAIN = TrainConfig(steps=1000, batch_size=16, seq_len=128, lr=2e-3, warmup_steps=30, eval_every=50,
                        eval_batches=8, log_every=10, save_every=250)

# Image classifier on 8x8 digits: 2x2 patches -> 16 tokens, D=64, 2 layers, E=8 experts of F=64.
_IMG = dict(image_size=8, channels=1, patch_size=2, num_classes=10, dim=64, n_layers=2, n_heads=4)
_IMG_F = 64
_IMG_TRAIN = TrainConfig(steps=400, batch_size=64, lr=2e-3, warmup_steps=20, eval_every=50, eval_batches=8,
                         log_every=10, save_every=200)


def _moe(dim: int, hidden: int, groups: int, groups_per_token: int) -> MoEConfig:
    # Correction biases (zero until a balancer moves them) let train.balance_bias_rate act.
    return MoEConfig(dim=dim, hidden=hidden, num_experts=8, experts_per_token=2, num_groups=groups,
                     groups_per_token=groups_per_token, expert_kind="swiglu",
                     router=RouterOptions(correction_bias=True))


def _lm(groups: int, groups_per_token: int) -> LMConfig:
    return LMConfig(**_LM, ffn_hidden=2 * _LM_F, moe=_moe(_LM["dim"], _LM_F, groups, groups_per_token))


def _image(groups: int, groups_per_token: int, **size: Any) -> ImageConfig:
    fields = {**_IMG, **size}
    return ImageConfig(**fields, ffn_hidden=2 * _IMG_F, moe=_moe(fields["dim"], _IMG_F, groups, groups_per_token))


def _run(name: str, model: LMConfig | ImageConfig, data: DataConfig, train: TrainConfig) -> RunConfig:
    return RunConfig(model=model, data=data, train=dataclasses.replace(train, out_dir=f"runs/{name}"))


_TEXT = DataConfig(kind="text")
_DIGITS = DataConfig(kind="digits")
PRESETS: dict[str, Callable[[], RunConfig]] = {
    "lm-dual": lambda: _run("lm-dual", _lm(4, 2), _TEXT, _LM_TRAIN),
    "lm-flat": lambda: _run("lm-flat", _lm(1, 1), _TEXT, _LM_TRAIN),
    "lm-dense": lambda: _run("lm-dense", dense_twin(_lm(4, 2)), _TEXT, _LM_TRAIN),
    "digits-dual": lambda: _run("digits-dual", _image(4, 2), _DIGITS, _IMG_TRAIN),
    "digits-flat": lambda: _run("digits-flat", _image(1, 1), _DIGITS, _IMG_TRAIN),
    "digits-dense": lambda: _run("digits-dense", dense_twin(_image(4, 2)), _DIGITS, _IMG_TRAIN),
    "mnist-dual": lambda: _run("mnist-dual", _image(4, 2, image_size=28, patch_size=4),
                               DataConfig(kind="mnist"), _IMG_TRAIN),
    "cifar10-dual": lambda: _run("cifar10-dual", _image(4, 2, image_size=32, channels=3, patch_size=4, dim=128),
                                 DataConfig(kind="cifar10"), _IMG_TRAIN),
}


def get_preset(name: str) -> RunConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]()
