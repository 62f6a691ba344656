"""Checkpoints cannot run code and cannot lie: no pickle anywhere, every file checked against the
SHA-256 recorded when it was written, and loaders that fall back to (or name) the newest intact one."""

from __future__ import annotations

import json
import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from dualroute.train import checkpoint as ckpt


class _Exploit:
    """Unpickling this creates ``marker``: proof that a load ran code from the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _save(path: Path, value: float = 1.0, step: int = 1, **kwargs) -> Path:
    return ckpt.save_checkpoint(path, model_state={"w": torch.full((64,), value)}, extra={"step": step}, **kwargs)


def _flip_byte(path: Path, offset_from_end: int = 3) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_checkpoint_holds_no_pickle(tmp_path):
    path = _save(tmp_path / "c", optimizer_state={"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": []})
    assert sorted(p.name for p in path.iterdir()) == sorted(
        ["meta.json", "model.safetensors", "state.json", "state.safetensors"])
    json.loads((path / "state.json").read_text())  # plain JSON
    for f in path.iterdir():
        assert not f.read_bytes().startswith(b"\x80"), f"{f.name} looks like a pickle"


def test_a_pickled_state_from_an_old_or_crafted_checkpoint_is_never_unpickled(tmp_path):
    """Format 1 kept the training state in state.pt, read with torch.load(weights_only=False)."""
    path = _save(tmp_path / "c")
    marker = tmp_path / "code-ran"
    (path / "state.pt").write_bytes(pickle.dumps({"optimizer": _Exploit(marker), "scheduler": None, "rng": None}))
    meta = json.loads((path / "meta.json").read_text())
    old = {"format": meta["format"], "version": 1, "extra": meta["extra"], "tied": {}}
    (path / "meta.json").write_text(json.dumps(old))
    for name in ("state.json", "state.safetensors"):
        (path / name).unlink()

    with pytest.raises(ValueError, match="pickle .*never loaded"):
        ckpt.load_checkpoint(path)
    weights_only = ckpt.load_checkpoint(path, state=False)  # eval / generate / inspect still work
    assert weights_only.model_state["w"].eq(1.0).all() and weights_only.optimizer_state is None
    assert not marker.exists()


def test_state_round_trips_types_exactly(tmp_path):
    random.seed(3)
    np.random.seed(4)
    state = {"ints": {0: 1, 7: (2, 3.5, None)}, "__tensor__": "a key that looks like a tag",
             "nested": [np.arange(5, dtype=np.uint32), np.float64(0.25), {"b": True, "s": "x"}],
             "t": torch.tensor([[1.5, 2.0]], dtype=torch.bfloat16), "inf": float("inf")}
    tensors: dict = {}
    encoded = json.loads(json.dumps(ckpt._encode_state(state, tensors)))
    back = ckpt._decode_state(encoded, tensors, "cpu")
    assert back["ints"] == {0: 1, 7: (2, 3.5, None)} and back["__tensor__"] == state["__tensor__"]
    assert back["nested"][0].dtype == np.uint32 and back["nested"][0].tolist() == [0, 1, 2, 3, 4]
    assert back["nested"][1:] == [0.25, {"b": True, "s": "x"}] and back["inf"] == float("inf")
    assert back["t"].dtype == torch.bfloat16 and back["t"].equal(state["t"])

    rng = ckpt.capture_rng()
    path = ckpt.save_checkpoint(tmp_path / "c", model_state={}, rng=True)
    expected = (random.random(), np.random.rand(), np.random.randn(), torch.rand(2))
    ckpt.restore_rng(ckpt.load_checkpoint(path).rng_state)
    assert (random.random(), np.random.rand(), np.random.randn()) == expected[:3]
    assert torch.rand(2).equal(expected[3])
    assert type(rng["python"]) is tuple


def test_state_refuses_objects_it_cannot_store(tmp_path):
    with pytest.raises(TypeError, match=r"state\['optimizer'\]\['f'\] is a builtin_function_or_method"):
        ckpt.save_checkpoint(tmp_path / "c", model_state={}, optimizer_state={"f": print})
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("name", ["model.safetensors", "state.safetensors", "state.json"])
def test_a_flipped_byte_in_any_file_is_an_error_naming_it(tmp_path, name):
    path = _save(tmp_path / "c", optimizer_state={"state": {0: {"exp_avg": torch.ones(64)}}})
    _flip_byte(path / name)
    with pytest.raises(ckpt.CorruptCheckpointError, match=rf"{name.replace('.', '[.]')} is corrupt"):
        ckpt.load_checkpoint(path)
    if name != "model.safetensors":  # the weights alone are intact
        assert ckpt.load_checkpoint(path, state=False).model_state["w"].eq(1.0).all()


def test_an_edited_manifest_is_an_error(tmp_path):
    path = _save(tmp_path / "c", step=5)
    meta = json.loads((path / "meta.json").read_text())
    meta["extra"]["step"] = 6  # still valid JSON, but not what was written
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ckpt.CorruptCheckpointError, match="meta.json is corrupt"):
        ckpt.load_checkpoint(path, state=False)


def test_load_newest_intact_skips_and_says_why(tmp_path):
    for step in (1, 2, 3):
        _save(ckpt.checkpoint_dir(tmp_path, step), float(step), step)
    _flip_byte(ckpt.checkpoint_dir(tmp_path, 3) / "model.safetensors")
    os.remove(ckpt.checkpoint_dir(tmp_path, 2) / "state.json")

    found, skipped = ckpt.load_newest_intact(tmp_path)
    assert found.extra["step"] == 1
    assert [(p.name, "corrupt" in why or "missing" in why) for p, why in skipped] == [
        ("ckpt-00000003", True), ("ckpt-00000002", True)]
    assert "model.safetensors" in skipped[0][1] and "state.json is missing" in skipped[1][1]

    found, skipped = ckpt.load_newest_intact(tmp_path, state=False)  # weights only: step 2 will do
    assert found.extra["step"] == 2 and len(skipped) == 1

    _flip_byte(ckpt.checkpoint_dir(tmp_path, 1) / "model.safetensors")
    assert ckpt.load_newest_intact(tmp_path)[0] is None
    assert ckpt.load_newest_intact(tmp_path / "empty") == (None, [])
