"""The speech task: spoken-word recognition from log-mel spectrograms; the model is a ``SpeechClassifier``.

Data kinds: ``speech-synth`` (default, no path: keywords synthesized by eSpeak NG and cached, see
``dualroute.data.speech_synth``; validation voices unheard in training) and ``wav`` (``data.path``: a folder
of recordings in the Free Spoken Digit Dataset or Speech Commands layout, split by speaker, see
``dualroute.data.wav_folder``). Every clip's log-mel spectrogram is computed once, normalised per clip;
training batches get SpecAugment-style masks. ``dualroute eval`` also writes ``confusion.png``.

Shapes: N clips, L samples, B batch, M mel bands, T frames, Y classes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

import numpy as np
import torch
from torch import nn

from dualroute.data.audio_features import FeatureConfig, LogMel, MaskConfig, spec_augment
from dualroute.data.speech_synth import ACCENTS, COMMANDS, DIGITS, VARIANTS, SpeechSet, SynthConfig, load_or_build
from dualroute.data.wav_folder import load_wav_folder
from dualroute.models import dense_twin
from dualroute.models.speech import SpeechClassifier, SpeechConfig
from dualroute.train.presets import DataConfig, RunConfig, TrainConfig, named_run, preset_moe, register_preset
from dualroute.train.registry import ModelType, TaskType, register_model, register_task
from dualroute.train.tasks.base import Batch, EvalResult, Task, to_device

SPEECH_KINDS = ("speech-synth", "wav")


@dataclass(frozen=True)
class SpeechOptions:
    sample_rate: int = 16000  # every clip is resampled to this rate
    clip_seconds: float = 1.0
    n_mels: int = 40
    window: int = 400  # STFT window and FFT size, samples
    hop: int = 160  # samples between frames
    freq_masks: int = 2  # SpecAugment in training: mel bands masked per clip
    freq_width: int = 6
    time_masks: int = 2  # spans of frames masked per clip
    time_width: int = 10
    words: tuple[str, ...] = ()  # speech-synth: the keywords (empty: digits + commands); wav: keep only these
    layout: Literal["auto", "fsdd", "commands"] = "auto"  # wav: the folder's layout
    synth_accents: tuple[str, ...] = ACCENTS  # speech-synth voices: accents x variants
    synth_variants: tuple[str, ...] = VARIANTS
    synth_val_variants: tuple[str, ...] = ("m6", "f4")  # voices with these variants are validation only
    synth_seed: int = 0  # noise, gains and time shifts of the synthesized clips

    def __post_init__(self) -> None:
        FeatureConfig(self.sample_rate, self.n_mels, self.window, self.hop)  # checks them
        MaskConfig(self.freq_masks, self.freq_width, self.time_masks, self.time_width)
        if not (isinstance(self.clip_seconds, (int, float)) and 0 < self.clip_seconds <= 60):
            raise ValueError(f"task.clip_seconds must be in (0, 60], got {self.clip_seconds!r}")

    @property
    def features(self) -> FeatureConfig:
        return FeatureConfig(self.sample_rate, self.n_mels, self.window, self.hop)

    @property
    def masks(self) -> MaskConfig:
        return MaskConfig(self.freq_masks, self.freq_width, self.time_masks, self.time_width)

    @property
    def clip_len(self) -> int:
        return int(round(self.sample_rate * self.clip_seconds))

    @property
    def frames(self) -> int:
        return self.features.frames(self.clip_len)

    def synth(self) -> SynthConfig:
        return SynthConfig(words=self.words or DIGITS + COMMANDS, accents=self.synth_accents,
                           variants=self.synth_variants, val_variants=self.synth_val_variants,
                           sample_rate=self.sample_rate, clip_seconds=self.clip_seconds, seed=self.synth_seed)


def check_run(cfg: RunConfig) -> None:
    """The model's input must be the spectrogram the options make."""
    model, opts = cfg.model, cfg.task
    if (model.n_mels, model.frames) != (opts.n_mels, opts.frames):
        raise ValueError(f"the model takes {model.n_mels} mel bands x {model.frames} frames, the task options make "
                         f"{opts.n_mels} x {opts.frames} (1 + clip samples // hop); set model.n_mels={opts.n_mels} "
                         f"model.frames={opts.frames}")


def load_speech(cfg: RunConfig, log=print) -> SpeechSet:
    opts = cfg.task
    if cfg.data.kind == "speech-synth":
        if cfg.data.path:
            raise ValueError(f"data kind 'speech-synth' is synthesized, it reads no path (got {cfg.data.path!r}); "
                             f"use data.kind=wav for recordings")
        return load_or_build(opts.synth(), log=log)
    if not cfg.data.path:
        raise ValueError("data kind 'wav' reads a folder of recordings: pass --data.path=<folder>")
    data = load_wav_folder(cfg.data.path, opts.sample_rate, opts.clip_seconds, cfg.data.val_fraction, opts.layout,
                           log=log)
    return keep_words(data, opts.words) if opts.words else data


def keep_words(data: SpeechSet, words: tuple[str, ...]) -> SpeechSet:
    missing = [w for w in words if w not in data.classes]
    if missing:
        raise ValueError(f"task.words {missing} are not among the recorded words {list(data.classes)}")
    old_to_new = np.array([words.index(c) if c in words else -1 for c in data.classes])
    keep_N = old_to_new[data.labels_N] >= 0
    return SpeechSet(data.audio_NL[keep_N], old_to_new[data.labels_N[keep_N]], data.speaker_ids_N[keep_N],
                     data.split_ids_N[keep_N], tuple(words), data.speakers, data.sample_rate)


@torch.no_grad()
def log_mel_features(audio_NL: np.ndarray, features: FeatureConfig, chunk: int = 256) -> torch.Tensor:
    """(N, M, T) float32 log-mel spectrograms of int16 clips, each standardised over all its bins."""
    log_mel = LogMel(features)
    out = []
    for i in range(0, len(audio_NL), chunk):
        wave_BL = torch.from_numpy(audio_NL[i:i + chunk].astype(np.float32) / 32768)
        feats_BMT = log_mel(wave_BL)
        mean_B11 = feats_BMT.mean(dim=(1, 2), keepdim=True)
        std_B11 = feats_BMT.std(dim=(1, 2), keepdim=True).clamp_min(1e-5)
        out.append((feats_BMT - mean_B11) / std_B11)
    return torch.cat(out) if out else torch.zeros(0, features.n_mels, features.frames(audio_NL.shape[1]))


class SpeechTask(Task):
    """Keyword classification; ``model.num_classes`` must equal the number of words in the data."""

    unit = "clips"

    def __init__(self, cfg: RunConfig) -> None:
        data = load_speech(cfg)
        if cfg.model.num_classes != len(data.classes):
            raise ValueError(f"the model has {cfg.model.num_classes} classes, the data {len(data.classes)} words "
                             f"({', '.join(data.classes)}); set model.num_classes={len(data.classes)}")
        feats_NMT = log_mel_features(data.audio_NL, cfg.task.features)
        labels_N = torch.from_numpy(data.labels_N)
        split_N = torch.from_numpy(data.split_ids_N)
        self.train_x, self.train_y = feats_NMT[split_N == 0], labels_N[split_N == 0]
        self.val_x, self.val_y = feats_NMT[split_N == 1], labels_N[split_N == 1]
        if len(self.train_y) == 0 or len(self.val_y) == 0:
            raise ValueError(f"the speech data has {len(self.train_y)} training and {len(self.val_y)} validation "
                             f"clips; both splits need some")
        self.classes = data.classes
        super().__init__(cfg)

    @classmethod
    def from_saved(cls, cfg: RunConfig, saved: dict) -> "SpeechTask":
        """The task, checking that the data's words are the ones the checkpoint was trained on, in order."""
        task = cls(cfg)
        trained = saved.get("speech_classes")
        if trained is not None and tuple(trained) != task.classes:
            raise ValueError(f"the checkpoint was trained on the words {list(trained)}, the data has "
                             f"{list(task.classes)}")
        return task

    def state_extra(self) -> dict:
        return {"speech_classes": list(self.classes)}

    def train_batch(self, generator: torch.Generator) -> Batch:
        idx_B = torch.randint(0, len(self.train_y), (self.run_config.train.batch_size,), generator=generator)
        return spec_augment(self.train_x[idx_B], self.run_config.task.masks, generator), self.train_y[idx_B]

    def eval_batches(self) -> Iterator[Batch]:
        """The first ``eval_batches`` batches of the validation split, in order (all of it if it is smaller)."""
        t = self.run_config.train
        n = min(len(self.val_y), t.batch_size * t.eval_batches)
        for i in range(0, n, t.batch_size):
            yield self.val_x[i:min(i + t.batch_size, n)], self.val_y[i:min(i + t.batch_size, n)]

    def metrics(self, mean_loss: float, accuracy: float) -> dict[str, float]:
        return {"val_loss": mean_loss, "val_acc": accuracy}

    @property
    def baseline_loss(self) -> float:
        """Cross-entropy of a uniform guess."""
        return math.log(self.model_config.num_classes)

    @torch.no_grad()
    def confusion(self, model: nn.Module, device: torch.device) -> np.ndarray:
        """(Y, Y) counts over ``eval_batches()``: row = the spoken word, column = the predicted one."""
        was_training = model.training
        model.eval()
        Y = len(self.classes)
        counts_YY = torch.zeros(Y * Y, dtype=torch.int64)
        for x, y in self.eval_batches():
            pred = self.forward(model, to_device(x, device)).logits.argmax(-1).cpu()
            counts_YY += torch.bincount(y * Y + pred, minlength=Y * Y)
        model.train(was_training)
        return counts_YY.view(Y, Y).numpy()

    def write_eval_artifacts(self, model: nn.Module, result: EvalResult, device: torch.device,
                             out_dir: Path) -> list[Path]:
        """``confusion.png``: the validation confusion matrix."""
        counts_YY = self.confusion(model, device)
        path = Path(out_dir) / "confusion.png"
        plot_confusion(counts_YY, self.classes, path, title=f"val_acc {result.metrics['val_acc']:.3f}")
        return [path]


def plot_confusion(counts_YY: np.ndarray, classes: tuple[str, ...], path: Path, title: str = "") -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("the confusion matrix figure needs matplotlib: pip install 'dualroute[plots]'") from None
    Y = len(classes)
    fig, ax = plt.subplots(figsize=(1.0 + 0.45 * Y, 0.8 + 0.45 * Y))
    ax.imshow(counts_YY, cmap="Blues")
    ax.set_xticks(range(Y), classes, rotation=90)
    ax.set_yticks(range(Y), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("spoken")
    ax.set_title(title)
    for i in range(Y):
        for j in range(Y):
            if counts_YY[i, j]:
                ax.text(j, i, str(counts_YY[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if counts_YY[i, j] > counts_YY.max() / 2 else "black")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


register_task(TaskType("speech", data_kinds=SPEECH_KINDS, make=SpeechTask.from_saved, options_cls=SpeechOptions,
                       labels="classes", check=check_run))
register_model(ModelType("speech", SpeechConfig, SpeechClassifier, task="speech"))


# ------------------------------------------------------------------------------------------ presets

# 40 mel bands x 101 frames -> 26 tokens, D=64, 2 layers, E=8 experts of F=64, K=2; 2,048 training clips.
_SPEECH_F = 64
_SPEECH_TRAIN = TrainConfig(steps=200, batch_size=32, lr=2e-3, warmup_steps=20, eval_every=50, eval_batches=16,
                            log_every=20, save_every=200)  # 16 x 32 = the 512 validation clips


def _speech(groups: int, groups_per_token: int) -> SpeechConfig:
    return SpeechConfig(ffn_hidden=2 * _SPEECH_F, moe=preset_moe(64, _SPEECH_F, groups, groups_per_token))


def _run(name: str, model: SpeechConfig) -> RunConfig:
    return named_run(name, model, DataConfig(kind="speech-synth"), _SPEECH_TRAIN, SpeechOptions())


register_preset("speech-dual", lambda: _run("speech-dual", _speech(4, 2)))
register_preset("speech-flat", lambda: _run("speech-flat", _speech(1, 1)))
register_preset("speech-dense", lambda: _run("speech-dense", dense_twin(_speech(4, 2))))
