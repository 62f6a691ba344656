"""The trainer with expert parallelism: 2 local gloo ranks against one process, on the same config.

``train.batch_size`` is the GLOBAL batch: every rank draws it with the same generator and trains on
its contiguous half, so 2 ranks and one process train on the same rows and the comparison is exact
up to float rounding (the per-rank means are averaged instead of one mean):

* 10 steps: same losses (1e-5), same logged loads, same validation metrics, same final weights and
  Adam moments, and a run directory with the same files (rank 0 alone writes);
* checkpoints are single-process checkpoints: 2 ranks -> 1 process and 1 -> 2 ranks resume a run
  that stopped after step 2 and match the straight run;
* ``--expert-parallel`` must equal the world size (a clear error on every rank); E and the batch
  must split over the ranks;
* a rank that raises mid-training, or while saving, makes the other fail within the timeout and
  leaves the last checkpoint intact;
* ``torchrun -m dualroute train ... --expert-parallel 2`` (slow: it starts three interpreters).

The 2-rank runs share one spawned world (a module fixture); the single-process runs happen here.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from dualroute.cli import main
from dualroute.parallel import run_workers
from dualroute.train import checkpoint as ckpt
from dualroute.train.metrics_log import read_jsonl
from dualroute.train.presets import RunConfig, get_preset, override
from dualroute.train.trainer import Trainer, train

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

TINY = ["model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.ffn_hidden=32", "model.max_seq_len=16",
        "model.moe.hidden=16", "train.seq_len=16", "train.batch_size=4", "train.eval_batches=2",
        "train.log_every=1", "train.warmup_steps=1", "train.threads=1"]
STRAIGHT = ["train.steps=10", "train.eval_every=5"]
RESUMED = ["train.steps=4", "train.save_every=2", "train.eval_every=3"]
TIMEOUT_S = 60.0  # collectives of the equivalence world
FAULT_TIMEOUT_S = 5.0  # what a dead rank may cost the other


def tiny(out: Path, *extra: str, preset: str = "lm-dual-small") -> RunConfig:
    return override(get_preset(preset), [*TINY, f"train.out_dir={out}", *extra])


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r}


@contextmanager
def crash_at_step(step: int):
    """``Trainer.train_step`` raises before step ``step``, after the checkpoint of the one before."""
    original = Trainer.train_step

    def crash(self):
        if self.step == step - 1:
            raise RuntimeError("simulated crash")
        return original(self)

    Trainer.train_step = crash
    try:
        yield
    finally:
        Trainer.train_step = original


def crashed_run(out: Path, **kwargs) -> None:
    """Train RESUMED up to its crash before step 3: ckpt-00000002 is the last checkpoint."""
    with crash_at_step(3), pytest.raises(RuntimeError, match="simulated crash"):
        train(tiny(out, *RESUMED), progress=False, **kwargs)


def assert_same_state(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=1e-4, msg=lambda m: f"{what} {key}: {m}")


# ------------------------------------------------------------------------------------- workers


def scenarios(rank: int, world: int, tmp: str) -> None:
    """Everything the 2-rank world runs; the error messages land in ``tmp/errors<rank>.txt``."""
    tmp = Path(tmp)
    train(tiny(tmp / "two", *STRAIGHT), progress=False, expert_parallel=world)
    crashed_run(tmp / "two_to_one", expert_parallel=world)
    train(tiny(tmp / "one_to_two", *RESUMED), resume=True, progress=False, expert_parallel=world)
    messages = []
    for cfg, ep in [(tiny(tmp / "bad", "train.steps=1"), world + 1),
                    (tiny(tmp / "bad", "train.steps=1", "model.moe.num_experts=3", preset="lm-flat-small"), world),
                    (tiny(tmp / "bad", "train.steps=1", "train.batch_size=3"), world)]:
        try:
            train(cfg, progress=False, expert_parallel=ep)
            messages.append("no error")
        except ValueError as e:
            messages.append(str(e))
    dist.barrier()  # nobody is stuck in a collective
    (tmp / f"errors{rank}.txt").write_text("\n".join(messages))


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("ep")
    crashed_run(tmp / "one_to_two")  # one process; the 2 ranks resume it
    run_workers(scenarios, 2, str(tmp), timeout_s=TIMEOUT_S)
    return tmp


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("one")
    train(tiny(tmp / "straight", *STRAIGHT), progress=False)
    train(tiny(tmp / "straight4", *RESUMED), progress=False)
    return tmp


# ------------------------------------------------------------------------------------- tests


def test_two_ranks_train_as_one_process(two_ranks, one_process):
    ep, one = two_ranks / "two", one_process / "straight"
    assert sorted(os.listdir(ep)) == sorted(os.listdir(one))  # rank 0 alone wrote; the same files
    got, want = losses(ep), losses(one)
    assert sorted(got) == list(range(1, 11))
    assert got == pytest.approx(want, abs=1e-5)
    records = {r["step"]: r for r in read_jsonl(ep / "metrics.jsonl") if "loss" in r}
    for r in read_jsonl(one / "metrics.jsonl"):
        if "loss" in r:  # loads are summed over ranks: the global batch's, exactly
            mine = records[r["step"]]
            assert (mine["maxvio"], mine["group_maxvio"], mine["dropped"]) == \
                (r["maxvio"], r["group_maxvio"], r["dropped"])
            assert mine["grad_norm"] == pytest.approx(r["grad_norm"], rel=1e-4)
            assert mine["entropy"] == pytest.approx(r["entropy"], abs=1e-5)
    evals = [[r["val_loss"] for r in read_jsonl(d / "metrics.jsonl") if "val_loss" in r] for d in (ep, one)]
    assert evals[0] == pytest.approx(evals[1], abs=1e-5) and len(evals[0]) == 3
    a, b = (ckpt.load_checkpoint(d / "ckpt-00000010") for d in (ep, one))
    assert_same_state(a.model_state, b.model_state, "weights")  # gathered: single-process checkpoints
    assert a.optimizer_state["state"].keys() == b.optimizer_state["state"].keys()
    for index, moments in b.optimizer_state["state"].items():
        assert_same_state(a.optimizer_state["state"][index], moments, f"optimizer state {index}")


@pytest.mark.parametrize("run", ["two_to_one", "one_to_two"])
def test_resume_on_another_world_size(two_ranks, one_process, run):
    out = two_ranks / run
    if run == "two_to_one":  # 2 ranks stopped after step 2; one process resumes
        assert sorted(losses(out)) == [1, 2]
        train(tiny(out, *RESUMED), resume=True, progress=False)
    straight = one_process / "straight4"
    assert losses(out) == pytest.approx(losses(straight), abs=1e-5)
    a, b = (ckpt.load_checkpoint(d / "ckpt-00000004") for d in (out, straight))
    assert_same_state(a.model_state, b.model_state, "weights")


def test_sizes_that_do_not_split_raise_on_every_rank(two_ranks):
    for rank in range(2):
        wrong_world, indivisible, batch = (two_ranks / f"errors{rank}.txt").read_text().split("\n")
        assert "--expert-parallel 3" in wrong_world and "WORLD_SIZE=2" in wrong_world
        assert "E=3" in indivisible and "world=2" in indivisible
        assert "train.batch_size=3" in batch and "world=2" in batch


def test_world_size_mismatch_without_processes(tmp_path, monkeypatch, capsys):
    with pytest.raises(ValueError, match=r"--expert-parallel 2 must equal .* WORLD_SIZE=1"):
        train(tiny(tmp_path, "train.steps=1"), progress=False, expert_parallel=2)
    assert main(["train", "lm-dual-small", "--out", str(tmp_path), "--quiet", "--expert-parallel", "4", *TINY]) == 2
    assert "--expert-parallel 4 must equal" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun started 2 processes, the flag was forgotten
    with pytest.raises(ValueError, match=r"--expert-parallel 1 \(not given\) must equal .* WORLD_SIZE=2"):
        train(tiny(tmp_path, "train.steps=1"), progress=False)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert train(tiny(tmp_path, "train.steps=1"), progress=False, expert_parallel=1).steps == 1


# --------------------------------------------------------------------------------------- faults


def faulty(rank: int, world: int, out: str, how: str) -> None:
    """One rank raises (before step 3, or while writing ckpt-00000002) and dies, or stops answering
    before step 3; the other records when it failed and with what."""
    out = Path(out)
    cfg = tiny(out / "run", "train.steps=4", "train.save_every=1", "train.eval_every=0")
    if rank == (0 if how == "rank0_saving" else 1):
        try:
            with _fault(how, out):
                train(cfg, progress=False, expert_parallel=world)
        except (RuntimeError, OSError):
            if how != "rank1_stalls":
                (out / "died.txt").write_text(str(time.time()))
        os._exit(0)  # die as an uncaught exception would (exit 0: run_workers keeps the other rank)
    try:
        with entering_step(3, out):
            train(cfg, progress=False, expert_parallel=world)
        message = "no error"
    except RuntimeError as e:
        message = str(e)
    (out / "survivor.txt").write_text(f"{time.time()}\n{message}")
    os._exit(0)  # the group is broken; skip destroy_process_group


@contextmanager
def entering_step(step: int, out: Path):
    """Record when this rank starts step ``step``: a slow checkpoint write (fsync on a busy disk) can hold it
    back after the other rank has already stalled, and that wait is not the collective's timeout."""
    original = Trainer.train_step

    def enter(self):
        if self.step == step - 1:
            (out / "entered.txt").write_text(str(time.time()))
        return original(self)

    Trainer.train_step = enter
    try:
        yield
    finally:
        Trainer.train_step = original


@contextmanager
def _fault(how: str, out: Path):
    if how == "rank1_step":
        with crash_at_step(3):
            yield
        return
    if how == "rank1_stalls":
        with stall_at_step(3, out):
            yield
        return
    write_all = ckpt._write_all

    def half_written(tmp, *args):
        if tmp.name.startswith(".tmp-ckpt-00000002"):
            tmp.mkdir()
            (tmp / ckpt.MODEL_FILE).write_bytes(b"half a file")
            raise OSError("disk full")
        write_all(tmp, *args)

    ckpt._write_all = half_written
    try:
        yield
    finally:
        ckpt._write_all = write_all


@contextmanager
def stall_at_step(step: int, out: Path):
    """Before step ``step``, stop answering until the other rank has given up (or for a long while)."""
    original = Trainer.train_step

    def stall(self):
        if self.step == step - 1:
            (out / "died.txt").write_text(str(time.time()))
            deadline = time.monotonic() + 6 * FAULT_TIMEOUT_S
            while not (out / "survivor.txt").exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            raise RuntimeError("stalled")
        return original(self)

    Trainer.train_step = stall
    try:
        yield
    finally:
        Trainer.train_step = original


@pytest.mark.parametrize("how", ["rank1_step", "rank0_saving", "rank1_stalls"])
def test_a_failing_rank_stops_the_other_and_keeps_the_last_checkpoint(tmp_path, how):
    run_workers(faulty, 2, str(tmp_path), how, timeout_s=FAULT_TIMEOUT_S, join_timeout_s=10 * FAULT_TIMEOUT_S)
    died = float((tmp_path / "died.txt").read_text())
    failed, message = (tmp_path / "survivor.txt").read_text().split("\n", 1)
    survivor = 1 if how == "rank0_saving" else 0
    assert message.startswith(f"rank {survivor} of 2 stopped:") and "--resume" in message, message
    entered = tmp_path / "entered.txt"  # the survivor started the step the other rank never joined
    since = max(died, float(entered.read_text())) if entered.exists() else died
    waited = float(failed) - since  # a dead peer: at once; a stalled one: the timeout
    low = FAULT_TIMEOUT_S - 1 if how == "rank1_stalls" else 0.0
    assert low < waited < FAULT_TIMEOUT_S + 3, waited
    run = tmp_path / "run"
    last = 1 if how == "rank0_saving" else 2  # rank 0 failed while writing ckpt-00000002
    assert ckpt.latest_checkpoint(run) == run / f"ckpt-{last:08d}"
    assert ckpt.load_checkpoint(run / f"ckpt-{last:08d}").extra["step"] == last
    assert not list(run.glob(".tmp-*")) and not list(run.glob(".bak-*"))


# -------------------------------------------------------------------------------------- torchrun


@pytest.mark.slow
def test_torchrun_launches_the_cli(tmp_path, capsys):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "dualroute", "train", "lm-dual-small", "--out", str(out), "--quiet", "--expert-parallel", "2",
           *TINY, "train.steps=2"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count(f"run {out}: 2 steps") == 1  # rank 0 alone prints
    assert {"config.json", "metrics.jsonl", "summary.json", "ckpt-00000002"} <= set(os.listdir(out))
    assert sorted(losses(out)) == [1, 2]
    # A single-process checkpoint: one process continues the run with the CLI.
    assert main(["train", "--out", str(out), "--resume", "--quiet", "train.steps=3"]) == 0
    assert f"run {out}: 3 steps" in capsys.readouterr().out and sorted(losses(out)) == [1, 2, 3]


_STALL_WHILE_SAVING = """
import os, sys, time
from dualroute.cli import main
from dualroute.train import checkpoint as ckpt

write_all = ckpt._write_all

def stall(tmp, *args):  # rank 0 stops answering while it writes ckpt-00000002; rank 1 waits at the barrier
    if tmp.name.startswith(".tmp-ckpt-00000002"):
        time.sleep(120)
    return write_all(tmp, *args)

ckpt._write_all = stall
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_rank_whose_peer_stalls_exits_2_not_abort(tmp_path):
    """The rank left waiting at a barrier gives the timeout message and exits with status 2: tearing the
    dead process group down at interpreter exit used to abort it ("terminate called...", SIGABRT)."""
    script = tmp_path / "stall.py"
    script.write_text(_STALL_WHILE_SAVING)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
           "train", "lm-dual-small", "--out", str(tmp_path / "run"), "--quiet", "--expert-parallel", "2", *TINY,
           "train.steps=3", "train.save_every=1", f"train.dist_timeout_s={FAULT_TIMEOUT_S}"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode != 0
    assert "error: rank 1 of 2 stopped:" in result.stderr and "--resume" in result.stderr
    assert "terminate called" not in result.stderr and "SIGABRT" not in result.stderr, result.stderr[-3000:]
    assert re.search(r"rank\s*: 1 .*\n\s*exitcode\s*: 2 ", result.stderr), result.stderr[-3000:]


def test_batches_that_do_not_split_into_equal_row_shares_are_refused_by_name():
    from types import SimpleNamespace

    from dualroute.train.distributed import ExpertParallel
    ranks = SimpleNamespace(world=2, rank=1)
    x, y = torch.arange(8).view(4, 2), torch.arange(4)
    mine = ExpertParallel.my_rows(ranks, (x, y))
    assert torch.equal(mine[0], x[2:]) and torch.equal(mine[1], y[2:])
    with pytest.raises(ValueError, match="2 ranks split each batch.*a tuple of tensors.*translation"):
        ExpertParallel.my_rows(ranks, ((x, x), y))  # a translation batch: (source, target prefix)
    with pytest.raises(ValueError, match="are 3 rows"):
        ExpertParallel.my_rows(ranks, (x[:3], y[:3]))
