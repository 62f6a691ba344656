"""The run directory under damage and mistakes: --resume falls back to the newest intact checkpoint,
eval names it, a failed start leaves nothing behind, and messages name the file or field at fault."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from dualroute.cli import main
from dualroute.train import checkpoint as ckpt
from dualroute.train.tasks import LMTask
from dualroute.train.trainer import load_run, train

from test_trainer import tiny_lm

pytestmark = pytest.mark.usefixtures("one_thread")


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture
def three_checkpoints(tmp_path) -> Path:
    out = tmp_path / "run"
    train(tiny_lm(out, "train.steps=3", "train.save_every=1", "train.keep_checkpoints=3"), progress=False)
    assert [p.name for p in sorted(out.glob("ckpt-*"))] == ["ckpt-00000001", "ckpt-00000002", "ckpt-00000003"]
    return out


def test_resume_skips_corrupt_checkpoints_and_says_which(three_checkpoints, caplog):
    out = three_checkpoints
    _flip_byte(out / "ckpt-00000003" / "model.safetensors")
    (out / "ckpt-00000002" / "state.safetensors").unlink()
    with caplog.at_level(logging.WARNING, logger="dualroute"):
        summary = train(tiny_lm(out, "train.steps=4", "train.save_every=1", "train.keep_checkpoints=3"),
                        resume=True, progress=False)
    said = caplog.text
    assert "skipping ckpt-00000003" in said and "model.safetensors" in said and "corrupt" in said
    assert "skipping ckpt-00000002" in said and "state.safetensors is missing" in said
    assert "continuing from ckpt-00000001" in said
    assert summary.steps == 4
    assert ckpt.load_checkpoint(out / "ckpt-00000003").extra["step"] == 3  # rewritten intact


def test_resume_with_no_intact_checkpoint_stops(three_checkpoints):
    for path in three_checkpoints.glob("ckpt-*"):
        _flip_byte(path / "model.safetensors")
    with pytest.raises(ValueError, match="no checkpoint in .* is intact \\(3 skipped"):
        train(tiny_lm(three_checkpoints, "train.steps=4"), resume=True, progress=False)


def test_resume_without_a_checkpoint_says_it_starts_fresh(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="dualroute"):
        assert train(tiny_lm(tmp_path / "typo", "train.steps=1"), resume=True, progress=False).steps == 1
    assert "holds no checkpoint; starting a new run there" in caplog.text


def test_eval_of_a_corrupt_newest_checkpoint_names_the_intact_one(three_checkpoints, capsys):
    out = three_checkpoints
    _flip_byte(out / "ckpt-00000003" / "model.safetensors")
    assert main(["eval", str(out), "train.eval_batches=1"]) == 2
    err = capsys.readouterr().err
    assert "ckpt-00000003/model.safetensors is corrupt" in err
    assert f"the newest intact checkpoint of the run is {out / 'ckpt-00000002'}" in err


def test_weights_only_commands_ignore_missing_training_state(three_checkpoints, capsys):
    newest = three_checkpoints / "ckpt-00000003"
    for name in ckpt.STATE_FILES:
        (newest / name).unlink()
    task, model, loaded = load_run(three_checkpoints)
    assert loaded.path == newest and isinstance(task, LMTask)
    assert main(["eval", str(three_checkpoints), "train.eval_batches=1"]) == 0
    assert main(["generate", str(three_checkpoints), "--max-new-tokens", "2"]) == 0


def test_a_start_that_fails_leaves_no_run_directory(tmp_path, monkeypatch):
    def bad_batch(self, generator):
        raise ValueError("token id 999 out of range (simulated bad data)")

    monkeypatch.setattr(LMTask, "train_batch", bad_batch)
    out = tmp_path / "new"
    with pytest.raises(ValueError, match="simulated bad data"):
        train(tiny_lm(out, "train.steps=2"), progress=False)
    assert not out.exists()

    kept = tmp_path / "mine"  # a directory the user made is theirs: only what the run wrote may go
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="simulated bad data"):
        train(tiny_lm(kept, "train.steps=2"), progress=False)
    assert (kept / "notes.txt").read_text() == "mine"


def test_a_changed_model_names_the_fields(tmp_path):
    train(tiny_lm(tmp_path, "train.steps=1"), progress=False)
    with pytest.raises(ValueError, match=r"model\.n_layers: 2 in the checkpoint, 1 now"):
        train(tiny_lm(tmp_path, "train.steps=2", "model.n_layers=1"), resume=True, progress=False)


def test_a_broken_config_json_is_named(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{not json")
    assert main(["train", "--resume", "--out", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{run / 'config.json'} is not valid JSON" in err
    (run / "config.json").write_text(json.dumps({"model": {}, "data": {"kind": "nope"}}))
    assert main(["train", "--resume", "--out", str(run), "--quiet"]) == 2
    assert str(run / "config.json") in capsys.readouterr().err


_KILLED_WHILE_SAVING = """
import sys, time
from pathlib import Path
from dualroute.cli import main
from dualroute.train import checkpoint as ckpt

marker, files_before_kill = Path(sys.argv[1]), int(sys.argv[2])
write_file, written = ckpt._write_file, []

def write_then_wait(path, data):  # ckpt-00000003: write some files, then wait for SIGKILL
    entry = write_file(path, data)
    if path.parent.name.startswith(".tmp-ckpt-00000003"):
        written.append(path.name)
        if len(written) == files_before_kill:
            marker.write_text(",".join(written))
            time.sleep(300)
    return entry

ckpt._write_file = write_then_wait
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("files_before_kill", [1, 3, 4])  # the weights; every data file; meta.json too
def test_kill_9_while_saving_leaves_the_last_checkpoint_and_an_exact_resume(tmp_path, files_before_kill):
    """SIGKILL in the middle of writing a checkpoint: the newest complete one loads intact, and the run
    resumed from it ends with the very weights of a run that was never interrupted."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from test_trainer import TINY_LM

    common = [*TINY_LM, "model.moe.hidden=16", "train.steps=4", "train.save_every=1", "model.dropout=0.1",
              "train.threads=1"]  # one thread in both processes: the same float reductions
    script, marker = tmp_path / "kill.py", tmp_path / "in-save"
    script.write_text(_KILLED_WHILE_SAVING)
    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(script), str(marker), str(files_before_kill), "train", "lm-dual-small",
                             "--out", str(run), "--quiet", *common], cwd=tmp_path, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not marker.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()[-2000:]
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert len(marker.read_text().split(",")) == files_before_kill

    assert ckpt.latest_checkpoint(run) == run / "ckpt-00000002"
    assert ckpt.load_checkpoint(run / "ckpt-00000002").extra["step"] == 2
    assert main(["train", "lm-dual-small", "--out", str(run), "--resume", "--quiet", *common]) == 0
    assert not list(run.glob(".tmp-*"))
    assert main(["train", "lm-dual-small", "--out", str(tmp_path / "straight"), "--quiet", *common]) == 0
    a = ckpt.load_checkpoint(run / "ckpt-00000004").model_state
    b = ckpt.load_checkpoint(tmp_path / "straight" / "ckpt-00000004").model_state
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
