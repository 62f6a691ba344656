"""A synthetic spoken-keyword set, made offline by eSpeak NG (the ``espeakng-loader`` wheel ships the library
and its voice data) and cached on disk after the first build.

Every word is spoken by every voice (an English accent with a timbre variant, e.g. ``en-us+f3``) at a few
speaking rates and pitches; each rendition is trimmed of silence, resampled to ``sample_rate``, placed at a
random offset in a clip of ``clip_seconds`` (a time shift), scaled by a random gain and mixed with white
noise at a random SNR. Validation voices are those with a held-out variant: their timbre is never heard in
training (the accents' pronunciation rules are shared). It is synthetic speech, far cleaner and more regular
than recordings.

The build is deterministic for a config (seed included): eSpeak NG runs in fresh worker processes, one per
voice (``espeak_worker``), and the augmentation draws from a generator seeded per clip. The cache lives in
``$DUALROUTE_CACHE_DIR`` (else ``$XDG_CACHE_HOME/dualroute``, else ``~/.cache/dualroute``) under
``speech/<hash of the config>/``, written to a temporary folder and renamed into place: ``audio.npy``
(int16, N x L), ``labels.npy`` (int64, N), ``voice_ids.npy`` (int64, N) and ``meta.json``. Nothing is pickled.

Shapes: N clips, L samples per clip.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ESPEAK_RATE = 22050  # what eSpeak NG synthesizes
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
COMMANDS = ("yes", "no", "up", "down", "stop", "go")
ACCENTS = ("en-us", "en", "en-gb-scotland", "en-029")
VARIANTS = ("m1", "m2", "m3", "m4", "m6", "f1", "f2", "f3", "f4", "f5")
CACHE_VERSION = 1  # bump when the build changes what a config produces


@dataclass(frozen=True)
class SynthConfig:
    words: tuple[str, ...] = DIGITS + COMMANDS  # the classes, in label order
    accents: tuple[str, ...] = ACCENTS
    variants: tuple[str, ...] = VARIANTS  # timbre variants (espeak-ng-data/voices/!v)
    val_variants: tuple[str, ...] = ("m6", "f4")  # voices with these variants are the validation split
    rates: tuple[int, ...] = (140, 200)  # words per minute (eSpeak NG takes 80..450)
    pitches: tuple[int, ...] = (35, 65)  # base pitch, 0..100
    sample_rate: int = 16000
    clip_seconds: float = 1.0
    snr_db: tuple[float, float] = (10.0, 40.0)  # white noise at an SNR drawn uniformly in this range
    gain_db: tuple[float, float] = (-12.0, 0.0)
    seed: int = 0
    workers: int = 2  # eSpeak NG processes at a time

    def __post_init__(self) -> None:
        for name in ("words", "accents", "variants", "rates", "pitches"):
            if not getattr(self, name):
                raise ValueError(f"SynthConfig.{name} must not be empty")
        if len(set(self.words)) != len(self.words):
            raise ValueError(f"SynthConfig.words has duplicates: {self.words}")
        unknown = [v for v in self.val_variants if v not in self.variants]
        if unknown:
            raise ValueError(f"val_variants {unknown} are not among the variants {self.variants}")
        if not 0 < len(self.val_variants) < len(self.variants):
            raise ValueError(f"val_variants must hold out some but not all variants, got {self.val_variants}")
        if not all(80 <= r <= 450 for r in self.rates) or not all(0 <= p <= 100 for p in self.pitches):
            raise ValueError(f"rates must be in 80..450 and pitches in 0..100, got {self.rates}, {self.pitches}")
        if self.sample_rate < 4000 or self.clip_seconds <= 0 or self.workers < 1:
            raise ValueError(f"need sample_rate >= 4000, clip_seconds > 0, workers >= 1; got {self.sample_rate}, "
                             f"{self.clip_seconds}, {self.workers}")

    @property
    def voices(self) -> tuple[str, ...]:
        return tuple(f"{a}+{v}" for a in self.accents for v in self.variants)

    @property
    def clip_len(self) -> int:
        return int(round(self.sample_rate * self.clip_seconds))

    def key(self) -> str:
        """Hash of everything that changes the clips (``workers`` does not)."""
        d = dataclasses.asdict(self)
        d.pop("workers")
        blob = json.dumps({"version": CACHE_VERSION, **d}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class SpeechSet:
    """Labelled clips; ``split_ids`` 0 = train, 1 = validation."""

    audio_NL: np.ndarray  # int16
    labels_N: np.ndarray  # int64 class ids into ``classes``
    speaker_ids_N: np.ndarray  # int64 ids into ``speakers``
    split_ids_N: np.ndarray  # int64: 0 train, 1 validation
    classes: tuple[str, ...]
    speakers: tuple[str, ...]
    sample_rate: int


def cache_root() -> Path:
    if os.environ.get("DUALROUTE_CACHE_DIR"):
        return Path(os.environ["DUALROUTE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dualroute"


# ------------------------------------------------------------------------------------------ synthesis


def speak(items: list[tuple[str, str, int, int]]) -> list[np.ndarray]:
    """Each ``(text, voice, rate, pitch)`` spoken by eSpeak NG in one fresh process: int16 at 22,050 Hz."""
    try:
        import espeakng_loader
    except ImportError:
        raise ImportError("the synthetic speech set needs eSpeak NG: pip install 'dualroute[speech]' "
                          "(espeakng-loader)") from None
    job = {"library": espeakng_loader.get_library_path(),
           "data_parent": str(Path(espeakng_loader.get_data_path()).parent), "items": [list(i) for i in items]}
    worker = Path(__file__).with_name("espeak_worker.py")
    done = subprocess.run([sys.executable, "-I", str(worker)], input=json.dumps(job).encode(),
                          capture_output=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"eSpeak NG worker failed (exit {done.returncode}): "
                           f"{done.stderr.decode(errors='replace').strip()[-400:]}")
    return _read_pcm(done.stdout, len(items))


def _read_pcm(blob: bytes, count: int) -> list[np.ndarray]:
    out, pos = [], 0
    for _ in range(count):
        (n,) = struct.unpack_from("<I", blob, pos)
        out.append(np.frombuffer(blob, dtype="<i2", count=n, offset=pos + 4).copy())
        pos += 4 + 2 * n
    if pos != len(blob):
        raise RuntimeError(f"eSpeak NG worker wrote {len(blob)} bytes, expected {pos}")
    return out


def trim_silence(pcm: np.ndarray, threshold: float = 0.02) -> np.ndarray:
    """The span from the first to the last sample above ``threshold`` of the peak (the whole clip if silent)."""
    loud = np.flatnonzero(np.abs(pcm.astype(np.float32)) > threshold * max(1, int(np.abs(pcm).max())))
    return pcm[loud[0]:loud[-1] + 1] if loud.size else pcm


def resample(wave: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """float32 ``wave`` at ``to_rate``: SciPy's polyphase filter at the exact rational ratio (librosa's
    "polyphase" resampler, without the seconds librosa's resampling module takes to import)."""
    if from_rate == to_rate:
        return wave.astype(np.float32)
    from scipy.signal import resample_poly

    g = math.gcd(from_rate, to_rate)
    return resample_poly(wave.astype(np.float32), to_rate // g, from_rate // g).astype(np.float32)


def place_in_clip(wave: np.ndarray, clip_len: int, rng: np.random.Generator) -> np.ndarray:
    """``wave`` at a random offset in a silent clip (its start, if it is longer than the clip)."""
    clip = np.zeros(clip_len, dtype=np.float32)
    n = min(len(wave), clip_len)
    start = int(rng.integers(0, clip_len - n + 1))
    clip[start:start + n] = wave[:n]
    return clip


def augment(wave: np.ndarray, cfg: SynthConfig, rng: np.random.Generator) -> np.ndarray:
    """A time-shifted, gain-scaled, noisy clip of ``cfg.clip_len`` int16 samples from float ``wave`` in [-1, 1]."""
    gain = np.float32(10 ** (rng.uniform(*cfg.gain_db) / 20))
    clip = place_in_clip(wave, cfg.clip_len, rng) * gain
    signal_power = float(np.mean(wave**2)) * float(gain) ** 2 if wave.size else 0.0
    noise_power = signal_power / 10 ** (rng.uniform(*cfg.snr_db) / 10)
    clip += rng.standard_normal(cfg.clip_len).astype(np.float32) * np.float32(np.sqrt(noise_power))
    return (np.clip(clip, -1.0, 1.0) * 32767).astype(np.int16)


def build(cfg: SynthConfig) -> SpeechSet:
    """Synthesize and augment every clip (no cache): voices x words x rates x pitches clips."""
    renditions = [(w, r, p) for w in range(len(cfg.words)) for r in cfg.rates for p in cfg.pitches]

    def one_voice(voice: str) -> list[np.ndarray]:
        return speak([(cfg.words[w], voice, r, p) for w, r, p in renditions])

    with ThreadPoolExecutor(cfg.workers) as pool:  # each thread waits on its own eSpeak NG process
        spoken = list(pool.map(one_voice, cfg.voices))
    audio, labels, speakers = [], [], []
    for v, pcms in enumerate(spoken):
        for i, ((w, _, _), pcm) in enumerate(zip(renditions, pcms)):
            rng = np.random.default_rng([cfg.seed, v, i])
            wave = resample(trim_silence(pcm).astype(np.float32) / 32768, ESPEAK_RATE, cfg.sample_rate)
            audio.append(augment(wave, cfg, rng))
            labels.append(w)
            speakers.append(v)
    val_voices = {i for i, name in enumerate(cfg.voices) if name.split("+")[1] in cfg.val_variants}
    speaker_ids = np.array(speakers, dtype=np.int64)
    return SpeechSet(np.stack(audio), np.array(labels, dtype=np.int64), speaker_ids,
                     np.isin(speaker_ids, sorted(val_voices)).astype(np.int64), tuple(cfg.words), cfg.voices,
                     cfg.sample_rate)


def load_or_build(cfg: SynthConfig, root: Path | None = None, log=print) -> SpeechSet:
    """The cached set for ``cfg`` under ``root/speech/<cfg.key()>``, built and written atomically if missing."""
    folder = (root or cache_root()) / "speech" / cfg.key()
    if not (folder / "meta.json").is_file():
        log(f"building the synthetic speech set ({len(cfg.voices)} voices x {len(cfg.words)} words x "
            f"{len(cfg.rates) * len(cfg.pitches)} renditions) into {folder}")
        data = build(cfg)
        _write(folder, data, cfg)
    return _read(folder)


def _write(folder: Path, data: SpeechSet, cfg: SynthConfig) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
    try:
        for name, array in (("audio", data.audio_NL), ("labels", data.labels_N),
                            ("voice_ids", data.speaker_ids_N), ("split_ids", data.split_ids_N)):
            np.save(tmp / f"{name}.npy", array, allow_pickle=False)
        meta = {"config": dataclasses.asdict(cfg), "classes": list(data.classes), "voices": list(data.speakers),
                "sample_rate": data.sample_rate}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            os.replace(tmp, folder)
        except OSError:  # another process finished the same build first
            if not (folder / "meta.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _read(folder: Path) -> SpeechSet:
    try:
        meta = json.loads((folder / "meta.json").read_text())
        arrays = {n: np.load(folder / f"{n}.npy", allow_pickle=False)
                  for n in ("audio", "labels", "voice_ids", "split_ids")}
    except (OSError, ValueError) as e:
        raise ValueError(f"the speech cache {folder} is damaged ({e}); delete the folder to rebuild it") from None
    return SpeechSet(arrays["audio"], arrays["labels"], arrays["voice_ids"], arrays["split_ids"],
                     tuple(meta["classes"]), tuple(meta["voices"]), int(meta["sample_rate"]))


def main(argv: list[str] | None = None) -> int:
    """``python -m dualroute.data.speech_synth [CACHE_ROOT]``: build (or read) the default set, print its size
    and the seconds taken."""
    import time

    args = sys.argv[1:] if argv is None else argv
    if len(args) > 1 or (args and args[0].startswith("-")):
        print("usage: python -m dualroute.data.speech_synth [CACHE_ROOT]", file=sys.stderr)
        return 2
    start = time.perf_counter()
    data = load_or_build(SynthConfig(), Path(args[0]) if args else None)
    seconds = time.perf_counter() - start
    n_val = int(data.split_ids_N.sum())
    print(f"{len(data.labels_N)} clips of {data.audio_NL.shape[1]} samples at {data.sample_rate} Hz, "
          f"{len(data.classes)} words, {len(data.speakers)} voices; {len(data.labels_N) - n_val} training, "
          f"{n_val} validation clips; {data.audio_NL.nbytes / 1e6:.0f} MB; {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
