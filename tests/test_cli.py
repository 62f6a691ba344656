"""The console script: train / eval / generate on a tiny run, compare, and one-line errors with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dualroute.cli import main, split_overrides

TINY = ["model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.max_seq_len=16", "train.seq_len=16",
        "train.batch_size=4", "train.eval_batches=2", "train.warmup_steps=1"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("run")
    assert main(["train", "lm-dual-small", "--out", str(out), "--quiet", "train.steps=2", *TINY]) == 0
    return out


def test_split_overrides():
    rest, overrides = split_overrides(["train", "lm-flat-small", "train.steps=3", "--model.moe.num_experts=4",
                                       "--data.path", "a b.txt", "--out", "x"])
    assert rest == ["train", "lm-flat-small", "--out", "x"]
    assert overrides == ["train.steps=3", "model.moe.num_experts=4", "data.path=a b.txt"]


def test_train_writes_run_and_prints_summary(run_dir, capsys):
    assert (run_dir / "summary.json").is_file() and (run_dir / "ckpt-00000002").is_dir()
    assert json.loads((run_dir / "config.json").read_text())["train"]["steps"] == 2


def test_resume_extends_a_run(run_dir, capsys):
    assert main(["train", "--resume", "--out", str(run_dir), "--quiet", "train.steps=3"]) == 0
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 3
    assert "3 steps" in capsys.readouterr().out


def test_eval_prints_metrics(run_dir, capsys):
    assert main(["eval", str(run_dir), "--train.eval_batches", "1"]) == 0
    out = capsys.readouterr().out
    assert "val_loss" in out and "val_bpb" in out and "moe_layer1_maxvio" in out


def test_generate_continues_the_prompt(run_dir, capsys):
    ckpt = sorted(run_dir.glob("ckpt-*"))[-1]
    assert main(["generate", str(ckpt), "--prompt", "Py", "--max-new-tokens", "5", "--seed", "1"]) == 0
    first = capsys.readouterr().out
    assert first.startswith("Py")
    assert main(["generate", str(ckpt), "--prompt", "Py", "--max-new-tokens", "5", "--seed", "1"]) == 0
    assert capsys.readouterr().out == first  # seeded



def test_eval_and_generate_run_under_the_runs_precision(run_dir, monkeypatch, capsys):
    from dualroute.train import trainer

    used = []
    real = trainer.precision_autocast

    def spy(device, precision):
        used.append(precision)
        return real(device, precision)

    monkeypatch.setattr(trainer, "precision_autocast", spy)
    assert main(["eval", str(run_dir), "train.eval_batches=1"]) == 0
    assert main(["eval", str(run_dir), "train.eval_batches=1", "train.precision=bfloat16"]) == 0
    assert main(["generate", str(run_dir), "--prompt", "Py", "--max-new-tokens", "2", "train.precision=bfloat16"]) == 0
    assert used == ["float32", "bfloat16", "bfloat16"]
    assert "val_loss" in capsys.readouterr().out


def test_compare_writes_table_and_png(tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", "--presets", "digits-dense,digits-dual", "--seeds", "0,1", "--steps", "3", "--out", str(out),
            "--quiet", "model.dim=16", "model.n_layers=1", "train.batch_size=16", "train.eval_every=1",
            "train.eval_batches=2"]
    assert main(argv) == 0
    table = (out / "compare.md").read_text()
    assert "digits-dense" in table and "digits-dual" in table and "±" in table and "val_acc" in table
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    runs = json.loads((out / "compare.json").read_text())
    assert {p: len(r) for p, r in runs.items()} == {"digits-dense": 2, "digits-dual": 2}
    assert "digits-dual" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["train", "no-such-preset"], "unknown preset 'no-such-preset'"),
    (["train", "train.stepz=3"], "unknown config key 'train.stepz'"),
    (["train", "lm-dual-small", "data.path=/no/such/corpus.txt", "train.steps=1"], "no such text file"),
    (["train", "data.path=/no/such/corpus.txt"], "data kind 'stdlib' reads this Python's standard library"),
    (["train", "mnist-dual"], "data.path"),
    (["eval", "/no/such/run"], "no checkpoint or run directory"),
    (["generate", "/no/such/run"], "no checkpoint or run directory"),
    (["compare", "--presets", "lm-dual-small,nope"], "unknown preset 'nope'"),
    (["frobnicate"], "invalid choice"),
])
def test_errors_exit_2_with_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_eval_refuses_model_overrides(run_dir, capsys):
    assert main(["eval", str(run_dir), "model.dim=64"]) == 2
    assert "model config comes from the checkpoint" in capsys.readouterr().err


def test_python_dash_m(tmp_path):
    result = subprocess.run([sys.executable, "-m", "dualroute", "train", "nope"], capture_output=True, text=True,
                            cwd=tmp_path, timeout=120)
    assert result.returncode == 2 and result.stderr.startswith("error: unknown preset")


def test_train_with_toml_config(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text("[train]\nsteps = 1\nbatch_size = 16\neval_batches = 1\n\n[model]\nn_layers = 1\ndim = 16\n\n"
                    "[model.dense_twin_of]\ndim = 16\n")
    out = tmp_path / "run"
    assert main(["train", "digits-dense", "--config", str(toml), "--out", str(out), "--quiet"]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["train"]["steps"] == 1 and saved["model"]["n_layers"] == 1 and saved["model"]["dim"] == 16


def test_tests_run_outside_the_clone(tmp_path):
    from pathlib import Path

    from conftest import REPO_ROOT

    assert Path.cwd() == tmp_path and REPO_ROOT not in Path.cwd().parents


def test_both_generate_forms_share_their_sampling_defaults(capsys):
    from dualroute.interop.cli_hooks import generate_hf_main

    assert main(["generate", "--help"]) == 0
    own = capsys.readouterr().out
    assert generate_hf_main(["--help"]) == 0
    hf = capsys.readouterr().out
    for text in (own, hf):  # defaults shown in --help, and the same temperature in both
        assert "0 = greedy (default: 0.8)" in " ".join(text.split())
        assert "(default: 0)" in text  # the seed
