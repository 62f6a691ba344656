"""Spoken words from a folder of WAV recordings, resampled to one rate and split by speaker.

Two layouts (``layout="auto"`` tells them apart, see ``detect_layout``):

- Free Spoken Digit Dataset: ``{digit}_{speaker}_{index}.wav`` (optionally under ``recordings/``);
- Speech Commands: ``{word}/{speaker}_nohash_{index}.wav`` (the speaker is the name before ``_nohash_``,
  or the whole stem); ``_background_noise_/`` holds no words and is passed over.

Files are read with the standard library's ``wave`` (PCM, 8-, 16-, 24- or 32-bit), must be mono, non-empty
and of one sample rate across the folder; such a file stops the load with an error naming it. Files whose
name carries no label (a .wav outside the pattern, or at the top of a Speech Commands folder) are skipped
and counted. Each clip is resampled to ``sample_rate`` and centre-cropped or zero-padded to
``clip_seconds``. Speakers go to the validation split by a hash of their name (about ``val_fraction`` of
them, at least one each side), so no validation speaker is heard in training.
"""

from __future__ import annotations

import hashlib
import re
import wave
from collections import Counter
from pathlib import Path
from typing import Literal

import numpy as np

from .speech_synth import SpeechSet, resample

FSDD_NAME = re.compile(r"^(\d)_([^_]+)_(\d+)\.wav$", re.IGNORECASE)
NOISE_FOLDER = "_background_noise_"
Layout = Literal["auto", "fsdd", "commands"]


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    """(float32 mono samples in [-1, 1], sample rate); a ValueError naming ``path`` if it cannot be used."""
    try:
        with wave.open(str(path), "rb") as f:
            channels, width, rate, n = f.getnchannels(), f.getsampwidth(), f.getframerate(), f.getnframes()
            raw = f.readframes(n)
    except (wave.Error, EOFError, OSError) as e:
        raise ValueError(f"{path}: not a readable PCM WAV file ({e})") from None
    if channels != 1:
        raise ValueError(f"{path}: {channels} channels; only mono recordings are read (mix it down first)")
    if n == 0 or not raw:
        raise ValueError(f"{path}: empty recording (no samples)")
    if width == 1:
        samples = (np.frombuffer(raw, dtype=np.uint8).astype(np.float32) - 128) / 128
    elif width in (2, 4):
        samples = np.frombuffer(raw, dtype=f"<i{width}").astype(np.float32) / 2 ** (8 * width - 1)
    elif width == 3:
        b = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        samples = (((b[:, 2] << 24) | (b[:, 1] << 16) | (b[:, 0] << 8)) >> 8).astype(np.float32) / 2**23
    else:
        raise ValueError(f"{path}: {8 * width}-bit samples are not supported")
    return samples, rate


def detect_layout(root: Path) -> Literal["fsdd", "commands"]:
    """"fsdd" if a .wav at the top (or under ``recordings/``) is named like one, else "commands" if word
    folders hold .wav files; else "fsdd" again if there are top-level .wav files (all unlabelled then)."""
    tops = [*root.glob("*.wav"), *(root / "recordings").glob("*.wav")]
    if any(FSDD_NAME.match(p.name) for p in tops):
        return "fsdd"
    if any(root.glob("*/*.wav")):
        return "commands"
    if tops:
        return "fsdd"
    raise ValueError(f"{root}: no .wav files, neither {{digit}}_{{speaker}}_{{index}}.wav (Free Spoken Digit "
                     f"Dataset) nor {{word}}/{{file}}.wav (Speech Commands)")


def labelled_files(root: Path, layout: Literal["fsdd", "commands"]) -> tuple[list[tuple[Path, str, str]], int]:
    """``[(file, label, speaker)]`` sorted by path, and the number of .wav files skipped for want of a label."""
    found, skipped = [], 0
    if layout == "fsdd":
        folder = root if any(root.glob("*.wav")) else root / "recordings"
        for path in sorted(folder.glob("*.wav")):
            match = FSDD_NAME.match(path.name)
            if match:
                found.append((path, match.group(1), match.group(2)))
            else:
                skipped += 1
    else:
        skipped = len(list(root.glob("*.wav")))  # a word folder's files carry the label; these carry none
        for path in sorted(root.glob("*/*.wav")):
            if path.parent.name == NOISE_FOLDER:
                continue
            found.append((path, path.parent.name, path.stem.split("_nohash_")[0]))
    return found, skipped


def speaker_split(speakers: list[str], val_fraction: float) -> set[str]:
    """The validation speakers: those with the smallest hash of their name, ``round(val_fraction * n)`` of
    them, at least one and not all."""
    if len(speakers) < 2:
        raise ValueError(f"a split by speaker needs at least two speakers, found {len(speakers)}: {speakers}")
    ranked = sorted(speakers, key=lambda s: hashlib.sha256(s.encode()).hexdigest())
    n_val = min(max(1, round(val_fraction * len(speakers))), len(speakers) - 1)
    return set(ranked[:n_val])


def fit_clip(samples: np.ndarray, clip_len: int) -> np.ndarray:
    """Centre-crop or zero-pad to ``clip_len``."""
    if len(samples) >= clip_len:
        start = (len(samples) - clip_len) // 2
        return samples[start:start + clip_len]
    out = np.zeros(clip_len, dtype=np.float32)
    start = (clip_len - len(samples)) // 2
    out[start:start + len(samples)] = samples
    return out


def load_wav_folder(root: str | Path, sample_rate: int = 16000, clip_seconds: float = 1.0,
                    val_fraction: float = 0.1, layout: Layout = "auto", log=print) -> SpeechSet:
    """The labelled recordings under ``root`` as a ``SpeechSet`` (int16 clips at ``sample_rate``)."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root}: not a folder (expected WAV recordings in the Free Spoken Digit Dataset or "
                         f"Speech Commands layout)")
    if layout not in ("auto", "fsdd", "commands"):
        raise ValueError(f"layout must be 'auto', 'fsdd' or 'commands', got {layout!r}")
    kind = detect_layout(root) if layout == "auto" else layout
    files, skipped = labelled_files(root, kind)
    if skipped:
        log(f"{root}: skipped {skipped} .wav file(s) without a label in the {kind} layout")
    if not files:
        raise ValueError(f"{root}: no labelled .wav files in the {kind} layout")
    read = [(path, *read_wav(path)) for path, _, _ in files]
    rates = Counter(rate for _, _, rate in read)
    usual = rates.most_common(1)[0][0]
    for path, _, rate in read:
        if rate != usual:
            raise ValueError(f"{path}: sample rate {rate} Hz, but {rates[usual]} of the {len(read)} files are at "
                             f"{usual} Hz; resample it or move it out")
    clip_len = int(round(sample_rate * clip_seconds))
    audio = [fit_clip(resample(samples, rate, sample_rate), clip_len) for _, samples, rate in read]
    classes = tuple(sorted({label for _, label, _ in files}))
    speakers = tuple(sorted({speaker for _, _, speaker in files}))
    val = speaker_split(list(speakers), val_fraction)
    speaker_ids = np.array([speakers.index(s) for _, _, s in files], dtype=np.int64)
    return SpeechSet(
        audio_NL=(np.clip(np.stack(audio), -1.0, 1.0) * 32767).astype(np.int16),
        labels_N=np.array([classes.index(label) for _, label, _ in files], dtype=np.int64),
        speaker_ids_N=speaker_ids,
        split_ids_N=np.array([int(speakers[i] in val) for i in speaker_ids], dtype=np.int64),
        classes=classes, speakers=speakers, sample_rate=sample_rate,
    )
