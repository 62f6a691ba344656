"""The speech task: synthesized keywords, WAV folders, log-mel features, the model, the task end to end."""

from __future__ import annotations

import dataclasses
import math
import os
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("espeakng_loader")
librosa = pytest.importorskip("librosa")

from dualroute.data.audio_features import FeatureConfig, LogMel, MaskConfig, mel_filters, spec_augment  # noqa: E402
from dualroute.data.speech_synth import ESPEAK_RATE, SynthConfig, build, load_or_build, speak  # noqa: E402
from dualroute.data.wav_folder import load_wav_folder  # noqa: E402
from dualroute.models import dense_twin, param_counts  # noqa: E402
from dualroute.models.speech import SpeechClassifier  # noqa: E402
from dualroute.train.presets import get_preset, override  # noqa: E402
from dualroute.train.tasks import make_task  # noqa: E402
from dualroute.train.tasks.speech import SpeechOptions  # noqa: E402

TINY_SYNTH = SynthConfig(words=("yes", "seven", "go"), accents=("en-us",), variants=("m1", "f2"), val_variants=("f2",),
                         rates=(175,), pitches=(50,), sample_rate=8000, clip_seconds=0.8, workers=1)


# ------------------------------------------------------------------------------------------ synthesis


def test_espeak_speaks_each_word_at_22050_hz_and_a_word_long():
    words = ("zero", "seven", "stop", "go")
    pcms = speak([(w, "en-us+m1", 175, 50) for w in words])
    assert ESPEAK_RATE == 22050
    for word, pcm in zip(words, pcms):
        assert pcm.dtype == np.int16
        assert 0.2 < len(pcm) / ESPEAK_RATE < 1.0, (word, len(pcm))
        assert np.abs(pcm).max() > 3000  # speech, not silence
    assert len(pcms[1]) > len(pcms[3])  # "seven" outlasts "go"
    slow, fast = speak([("seven", "en-us+m1", 100, 50), ("seven", "en-us+m1", 300, 50)])
    assert len(slow) > 1.5 * len(fast)


def test_an_unknown_voice_is_named():
    with pytest.raises(RuntimeError, match="no voice 'en-us\\+nosuchvariant'"):
        speak([("yes", "en-us+nosuchvariant", 175, 50)])


def test_the_synthetic_set_has_one_clip_length_and_is_deterministic_for_a_seed(tmp_path):
    a = load_or_build(TINY_SYNTH, tmp_path / "a", log=lambda _: None)
    b = build(TINY_SYNTH)
    assert a.audio_NL.shape == (2 * 3, int(8000 * 0.8)) and a.audio_NL.dtype == np.int16 and a.sample_rate == 8000
    assert np.array_equal(a.audio_NL, b.audio_NL) and np.array_equal(a.labels_N, b.labels_N)
    assert sorted(a.labels_N.tolist()) == [0, 0, 1, 1, 2, 2] and a.classes == ("yes", "seven", "go")
    assert a.speakers == ("en-us+m1", "en-us+f2")
    assert a.split_ids_N.tolist() == [int(a.speakers[v] == "en-us+f2") for v in a.speaker_ids_N]  # voice split
    other = build(dataclasses.replace(TINY_SYNTH, seed=1))
    assert not np.array_equal(a.audio_NL, other.audio_NL)  # noise and shifts follow the seed
    wide = build(dataclasses.replace(TINY_SYNTH, sample_rate=16000, clip_seconds=1.0, words=("yes",)))
    assert wide.audio_NL.shape == (2, 16000)
    for clip in a.audio_NL:  # the word is in the clip: its loudest 0.1 s is well above the noise floor
        power = np.convolve(clip.astype(np.float64) ** 2, np.ones(800), "valid")
        assert power.max() > 5 * power.min()


def test_the_cache_is_read_back_without_a_build_and_leaves_no_temporary_folder(tmp_path):
    built = []
    first = load_or_build(TINY_SYNTH, tmp_path, log=built.append)
    second = load_or_build(TINY_SYNTH, tmp_path, log=built.append)
    assert len(built) == 1 and np.array_equal(first.audio_NL, second.audio_NL)
    (folder,) = (tmp_path / "speech").iterdir()
    assert folder.name == TINY_SYNTH.key()
    assert sorted(p.name for p in folder.iterdir()) == ["audio.npy", "labels.npy", "meta.json", "split_ids.npy",
                                                         "voice_ids.npy"]
    assert TINY_SYNTH.key() == dataclasses.replace(TINY_SYNTH, workers=2).key() != \
        dataclasses.replace(TINY_SYNTH, seed=3).key()
    (folder / "labels.npy").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="speech cache .* is damaged"):
        load_or_build(TINY_SYNTH, tmp_path)


def test_bad_synth_configs_are_named():
    with pytest.raises(ValueError, match="val_variants \\['m9'\\] are not among"):
        SynthConfig(val_variants=("m9",))
    with pytest.raises(ValueError, match="hold out some but not all"):
        SynthConfig(variants=("m1",), val_variants=("m1",))
    with pytest.raises(ValueError, match="duplicates"):
        SynthConfig(words=("yes", "yes"))


# ------------------------------------------------------------------------------------------ WAV folders


def write_wav(path: Path, rate: int = 8000, seconds: float = 0.3, channels: int = 1, width: int = 2,
              freq: float = 440.0) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(rate * seconds)) / rate
    x = 0.5 * np.sin(2 * np.pi * freq * t)
    ints = (x * (2 ** (8 * width - 1) - 1)).astype(np.int64)
    frames = np.repeat(ints, channels)
    if width == 1:  # 8-bit WAV samples are unsigned
        raw = (frames + 128).astype(np.uint8).tobytes()
    elif width == 3:
        raw = b"".join(int(v).to_bytes(3, "little", signed=True) for v in frames)
    else:
        raw = frames.astype(f"<i{width}").tobytes()
    with wave.open(str(path), "wb") as f:
        f.setnchannels(channels)
        f.setsampwidth(width)
        f.setframerate(rate)
        f.writeframes(raw)
    return x.astype(np.float32)


def fsdd_folder(root: Path, speakers=("jackson", "nicolas", "theo", "yweweler")) -> Path:
    for s, speaker in enumerate(speakers):
        for digit in (0, 1, 2):
            for index in (0, 1):
                write_wav(root / f"{digit}_{speaker}_{index}.wav", freq=200 + 100 * digit + 10 * s)
    return root


def test_a_free_spoken_digit_folder_is_resampled_and_split_by_speaker(tmp_path):
    root = fsdd_folder(tmp_path / "fsdd")
    data = load_wav_folder(root, sample_rate=16000, clip_seconds=0.5, val_fraction=0.25)
    assert data.audio_NL.shape == (24, 8000) and data.audio_NL.dtype == np.int16 and data.sample_rate == 16000
    assert data.classes == ("0", "1", "2") and data.speakers == ("jackson", "nicolas", "theo", "yweweler")
    val = {data.speakers[i] for i in data.speaker_ids_N[data.split_ids_N == 1]}
    train = {data.speakers[i] for i in data.speaker_ids_N[data.split_ids_N == 0]}
    assert len(val) == 1 and not val & train
    # 0.3 s at 8 kHz -> 4800 samples at 16 kHz, centred in the 0.5 s clip; the tone's frequency is kept
    clip = data.audio_NL[0].astype(np.float32) / 32767
    assert np.abs(clip[:1000]).max() == 0 and np.abs(clip[1700:6300]).max() > 0.45
    spectrum = np.abs(np.fft.rfft(clip[1700:6300]))
    assert abs(np.argmax(spectrum) * 16000 / 4600 - 200) < 5  # 0_jackson_0: 200 Hz
    assert load_wav_folder(root, layout="fsdd", val_fraction=0.25).audio_NL.shape == (24, 16000)
    sub = fsdd_folder(tmp_path / "fsdd2" / "recordings", speakers=("a", "b"))
    assert load_wav_folder(sub.parent, sample_rate=8000, clip_seconds=0.3).audio_NL.shape == (12, 2400)


def test_a_speech_commands_folder_skips_the_noise_and_counts_unlabelled_files(tmp_path):
    root = tmp_path / "commands"
    for word in ("yes", "no"):
        for speaker in ("0a7c2a8d", "0b09edd3", "0c40e715"):
            for n in (0, 1):
                write_wav(root / word / f"{speaker}_nohash_{n}.wav", rate=16000, seconds=1.2)
    write_wav(root / "_background_noise_" / "white_noise.wav", rate=16000, seconds=3.0)
    write_wav(root / "stray.wav", rate=16000)
    logged = []
    data = load_wav_folder(root, sample_rate=16000, clip_seconds=1.0, val_fraction=0.3, log=logged.append)
    assert data.audio_NL.shape == (12, 16000) and data.classes == ("no", "yes")
    assert data.speakers == ("0a7c2a8d", "0b09edd3", "0c40e715")
    assert any("skipped 1 .wav file(s) without a label" in line for line in logged)
    assert set(data.split_ids_N.tolist()) == {0, 1}
    with pytest.raises(ValueError, match="no labelled .wav files in the fsdd layout"):
        load_wav_folder(root, layout="fsdd", log=lambda _: None)


@pytest.mark.parametrize("case, match", [
    ("stereo", "2 channels; only mono"),
    ("empty", "empty recording"),
    ("garbage", "not a readable PCM WAV file"),
    ("rate", "sample rate 44100 Hz, but 11 of the 12 files are at 8000 Hz"),
])
def test_a_bad_file_is_named(tmp_path, case, match):
    root = fsdd_folder(tmp_path / "fsdd", speakers=("a", "b"))
    bad = root / "2_b_1.wav"
    if case == "stereo":
        write_wav(bad, channels=2)
    elif case == "empty":
        write_wav(bad, seconds=0.0)
    elif case == "garbage":
        bad.write_bytes(b"RIFF not really a wave file")
    else:
        write_wav(bad, rate=44100)
    with pytest.raises(ValueError, match=match) as info:
        load_wav_folder(root)
    assert str(bad) in str(info.value)


def test_other_folder_errors_are_named(tmp_path):
    with pytest.raises(ValueError, match="not a folder"):
        load_wav_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .wav files"):
        load_wav_folder(tmp_path / "empty")
    one = fsdd_folder(tmp_path / "one", speakers=("solo",))
    with pytest.raises(ValueError, match="at least two speakers, found 1"):
        load_wav_folder(one)
    with pytest.raises(ValueError, match="layout must be"):
        load_wav_folder(one, layout="timit")


def test_24_bit_and_8_bit_samples_read_as_16_bit_do(tmp_path):
    from dualroute.data.wav_folder import read_wav

    want = write_wav(tmp_path / "a.wav", width=2)
    for width in (1, 3, 4):
        write_wav(tmp_path / f"w{width}.wav", width=width)
        got, rate = read_wav(tmp_path / f"w{width}.wav")
        assert rate == 8000 and np.abs(got - want).max() < (0.02 if width == 1 else 1e-4)


# ------------------------------------------------------------------------------------------ features


def reference_log_mel(wave_BL: torch.Tensor, cfg: FeatureConfig, eps: float = 1e-6) -> torch.Tensor:
    """Plain framing and a DFT matrix (no torch.stft), float64."""
    x = wave_BL.double()
    pad = cfg.window // 2
    x = torch.nn.functional.pad(x.unsqueeze(1), (pad, pad), mode="reflect").squeeze(1)
    frames_BTW = x.unfold(1, cfg.window, cfg.hop) * torch.hann_window(cfg.window, dtype=torch.float64)
    k = torch.arange(cfg.window // 2 + 1, dtype=torch.float64)
    n = torch.arange(cfg.window, dtype=torch.float64)
    angle_WF = 2 * math.pi * torch.outer(n, k) / cfg.window
    power_BTF = (frames_BTW @ torch.cos(angle_WF)) ** 2 + (frames_BTW @ torch.sin(angle_WF)) ** 2
    return torch.log(power_BTF @ mel_filters(cfg).double().T + eps).transpose(1, 2)


def test_log_mel_matches_a_plain_dft_and_librosa_on_values_and_gradients():
    cfg = FeatureConfig(sample_rate=8000, n_mels=20, window=200, hop=80)
    wave_BL = (0.3 * torch.randn(3, 4000, generator=torch.Generator().manual_seed(0))).requires_grad_()
    got_BMT = LogMel(cfg)(wave_BL)
    assert got_BMT.shape == (3, 20, cfg.frames(4000)) == (3, 20, 51)
    ref_BMT = reference_log_mel(wave_BL, cfg)
    torch.testing.assert_close(got_BMT.double(), ref_BMT, atol=2e-4, rtol=1e-4)
    weights_BMT = torch.randn_like(ref_BMT)
    (g_got,) = torch.autograd.grad((got_BMT.double() * weights_BMT).sum(), wave_BL)
    (g_ref,) = torch.autograd.grad((ref_BMT * weights_BMT).sum(), wave_BL)
    torch.testing.assert_close(g_got, g_ref, atol=1e-3 * g_ref.abs().max().item(), rtol=1e-3)
    mel = librosa.feature.melspectrogram(y=wave_BL[0].detach().numpy(), sr=8000, n_fft=200, hop_length=80,
                                         n_mels=20, fmin=20.0, pad_mode="reflect", power=2.0)
    np.testing.assert_allclose(got_BMT[0].detach().numpy(), np.log(mel + 1e-6), atol=2e-4)


def test_bad_feature_input_is_named():
    log_mel = LogMel(FeatureConfig())
    with pytest.raises(ValueError, match="float waveforms of shape \\(B, L\\), got \\(16000,\\)"):
        log_mel(torch.zeros(16000))
    with pytest.raises(ValueError, match="shorter than half the window"):
        log_mel(torch.zeros(1, 100))
    with pytest.raises(ValueError, match="f_max"):
        FeatureConfig(sample_rate=8000, f_max=6000.0)
    with pytest.raises(ValueError, match="hop must be a positive int"):
        FeatureConfig(hop=0)


def test_spec_augment_masks_bands_and_spans_with_the_clip_mean():
    feats_BMT = torch.randn(16, 40, 101, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    out = spec_augment(feats_BMT, MaskConfig(freq_masks=1, freq_width=6, time_masks=0, time_width=10), g)
    for b in range(16):
        masked_rows = (out[b] != feats_BMT[b]).all(dim=1)
        assert masked_rows.sum() <= 6
        rows = masked_rows.nonzero().flatten()
        if len(rows):
            assert (rows.diff() == 1).all()  # one band
            assert torch.allclose(out[b, rows], feats_BMT[b].mean().expand(len(rows), 101))
    out = spec_augment(feats_BMT, MaskConfig(freq_masks=0, time_masks=2, time_width=10), g)
    masked_cols = (out != feats_BMT).all(dim=1)  # (B, T)
    assert (masked_cols.sum(dim=1) <= 20).all() and masked_cols.any()
    assert torch.equal(spec_augment(feats_BMT, MaskConfig(0, 6, 0, 10), g), feats_BMT)
    a = spec_augment(feats_BMT, MaskConfig(), torch.Generator().manual_seed(5))
    assert torch.equal(a, spec_augment(feats_BMT, MaskConfig(), torch.Generator().manual_seed(5)))


# ------------------------------------------------------------------------------------------ model


def test_the_classifier_maps_spectrograms_to_classes_and_its_dense_twin_matches_active_size():
    preset = get_preset("speech-dual").model
    model = SpeechClassifier(preset)
    out = model(torch.randn(3, 40, 101))
    assert out.logits.shape == (3, 16) and len(out.aux) == 2 and model.context_len == 26 == preset.tokens
    twin = SpeechClassifier(dense_twin(preset))
    assert twin(torch.randn(3, 40, 101)).aux == []
    routers = sum(p.numel() for layer_ in model.blocks for n, p in layer_.ffn.named_parameters() if "router" in n)
    assert param_counts(model)[1] - param_counts(twin)[1] == routers > 0
    with pytest.raises(ValueError, match="\\(B, n_mels, frames\\) = \\(B, 40, 101\\), got \\(3, 40, 100\\)"):
        model(torch.randn(3, 40, 100))
    with pytest.raises(TypeError, match="floating-point"):
        model(torch.zeros(3, 40, 101, dtype=torch.long))


# ------------------------------------------------------------------------------------------ the task


def tiny_run(tmp_path: Path, preset: str = "speech-dual", *more: str):
    """A run on 2 voices x 2 words (8 kHz, 0.5 s clips) that trains in seconds."""
    return override(get_preset(preset), [
        f"train.out_dir={tmp_path / 'run'}", "train.steps=3", "train.batch_size=4", "train.eval_every=0",
        "train.eval_batches=2", "train.save_every=0", "train.log_every=1", "task.words=yes,no",
        "task.sample_rate=8000", "task.clip_seconds=0.5", "task.window=200", "task.hop=80", "task.n_mels=20",
        "task.synth_accents=en-us", "task.synth_variants=m1,f2", "task.synth_val_variants=f2",
        "model.n_mels=20", "model.frames=51", "model.num_classes=2", *more])


def test_the_speech_task_trains_saves_and_evaluates_with_a_confusion_matrix(tmp_path, monkeypatch):
    from dualroute.cli import main

    monkeypatch.setenv("DUALROUTE_CACHE_DIR", str(tmp_path / "cache"))
    cfg = tiny_run(tmp_path)
    assert main(["train", "speech-dual", "--quiet", *[f"{k}={v}" for k, v in _flat_overrides(cfg)]]) == 0
    assert any((tmp_path / "cache" / "speech").iterdir())
    out = tmp_path / "figs"
    assert main(["eval", str(tmp_path / "run"), "--out", str(out)]) == 0
    assert (out / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from dualroute.train.trainer import load_run

    task, model, _ = load_run(tmp_path / "run")
    counts = task.confusion(model, torch.device("cpu"))
    assert counts.shape == (2, 2) and counts.sum() == len(task.val_y) == 8  # 1 voice x 2 words x 4 renditions
    result = task.evaluate(model, torch.device("cpu"))
    assert result.metrics["val_acc"] == pytest.approx(np.trace(counts) / counts.sum())
    with pytest.raises(ValueError, match="trained on the words \\['yes', 'no'\\], the data has \\['no', 'yes'\\]"):
        load_run(tmp_path / "run", lambda c: override(c, ["task.words=no,yes"]))


def _flat_overrides(cfg) -> list[tuple[str, str]]:
    return [("train.out_dir", cfg.train.out_dir), ("train.steps", "3"), ("train.batch_size", "4"),
            ("train.eval_every", "0"), ("train.eval_batches", "2"), ("train.save_every", "0"),
            ("task.words", "yes,no"), ("task.sample_rate", "8000"), ("task.clip_seconds", "0.5"),
            ("task.window", "200"), ("task.hop", "80"), ("task.n_mels", "20"),
            ("task.synth_accents", "en-us"), ("task.synth_variants", "m1,f2"),
            ("task.synth_val_variants", "f2"), ("model.n_mels", "20"), ("model.frames", "51"),
            ("model.num_classes", "2")]


def test_the_task_reads_a_wav_folder(tmp_path):
    root = fsdd_folder(tmp_path / "fsdd")
    cfg = tiny_run(tmp_path, "speech-flat", "data.kind=wav", f"data.path={root}", "task.words=",
                   "model.num_classes=3", "data.val_fraction=0.25")
    task = make_task(cfg)
    assert task.classes == ("0", "1", "2") and len(task.train_y) == 18 and len(task.val_y) == 6
    x, y = task.train_batch(torch.Generator().manual_seed(0))
    assert x.shape == (4, 20, 51) and y.shape == (4,)
    two = make_task(override(cfg, ["task.words=2,0", "model.num_classes=2"]))
    assert two.classes == ("2", "0") and len(two.train_y) == 12


def test_mismatched_runs_are_named(tmp_path, monkeypatch):
    monkeypatch.setenv("DUALROUTE_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="task options make 32 x 101 .* set model.n_mels=32 model.frames=101"):
        override(get_preset("speech-dual"), ["task.n_mels=32"])
    with pytest.raises(ValueError, match="make 40 x 51 .* model.frames=51"):
        override(get_preset("speech-dual"), ["task.clip_seconds=0.5"])
    with pytest.raises(ValueError, match="'wav' reads a folder of recordings: pass --data.path"):
        make_task(override(get_preset("speech-dual"), ["data.kind=wav"]))
    with pytest.raises(ValueError, match="'speech-synth' is synthesized, it reads no path"):
        make_task(override(get_preset("speech-dual"), ["data.path=/tmp/x"]))
    root = fsdd_folder(tmp_path / "fsdd")
    with pytest.raises(ValueError, match="the model has 16 classes, the data 3 words .* set model.num_classes=3"):
        make_task(override(get_preset("speech-dual"), ["data.kind=wav", f"data.path={root}"]))
    with pytest.raises(ValueError, match="task.words \\['nine'\\] are not among"):
        make_task(override(get_preset("speech-dual"), ["data.kind=wav", f"data.path={root}", "task.words=nine",
                                                       "model.num_classes=1"]))
    assert SpeechOptions().frames == 101


@pytest.mark.slow
def test_dualroute_train_speech_dual_runs_on_a_fresh_machine_with_no_data_path(tmp_path, monkeypatch):
    """The default set is built from nothing into an empty cache (~30 s on 2 cores), then two steps train."""
    from dualroute.cli import main

    monkeypatch.setenv("DUALROUTE_CACHE_DIR", str(tmp_path / "cache"))
    assert main(["train", "speech-dual", "--quiet", f"train.out_dir={tmp_path / 'run'}", "train.steps=2",
                 "train.eval_batches=1", "train.eval_every=0"]) == 0
    (folder,) = (tmp_path / "cache" / "speech").iterdir()
    audio = np.load(folder / "audio.npy", allow_pickle=False)
    labels = np.load(folder / "labels.npy", allow_pickle=False)
    assert audio.shape == (40 * 16 * 4, 16000) and np.bincount(labels).tolist() == [160] * 16
    assert os.path.isdir(tmp_path / "run")
