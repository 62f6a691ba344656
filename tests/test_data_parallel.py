"""Data parallelism on PyTorch's DDP, on a ("dp", "ep") mesh, against one process.

W = EP x DP gloo ranks train on the same global batch as one process (each on its contiguous
``batch_size / W`` rows), so everything is compared with one process on the same config:

* the layer (float64, one world of 4 ranks as EP 2 x DP 2): outputs, the balance losses of the
  global batch (all six on) and every parameter gradient after DDP (two micro-batches, the first
  under ``no_sync``) and after the hand-written all-reduce; DDP's buckets hold no expert shard and
  are reduced in the last micro-batch's backward only;
* the trainer: DP 2 with a Switch loss and gradient accumulation (2 ranks), a dense model on DP 2;
  EP 2 x DP 2 and EP 4 (4 ranks, slow); losses, aux losses, grad norms and final weights and Adam
  moments;
* checkpoints resume across layouts: 1 -> DP 2, 1 -> EP 2 x DP 2, EP 2 x DP 2 -> 1;
* two ``torchrun --nnodes 2`` launchers on this machine (slow).

The parity tests print the largest differences they measured (``pytest -s``). Every world here is
slow on two busy cores; the quick suite's DDP coverage is tests/test_train_parallel.py (EP 2, which
now runs its replicated parameters under DDP too) and the checks below that start no process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

from conftest import make_layer
from dualroute.balance import BalanceConfig, aux_losses, global_aux_losses
from dualroute.cli import main
from dualroute.parallel import (ParallelLayout, apply_expert_parallel, data_parallel_grads, expert_parameters,
                                init_mesh, reduce_expert_grads, replicate_with_ddp, replicated_parameters,
                                run_workers, use_global_balance_losses)
from dualroute.train import checkpoint as ckpt
from dualroute.train.metrics_log import read_jsonl
from dualroute.train.presets import RunConfig, get_preset, override
from dualroute.train.trainer import Trainer, train

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

TIMEOUT_S = 60.0

# ------------------------------------------------------------------------------ the layer, float64

D, T = 6, 12  # model dim, tokens per rank per micro-batch
ALL_LOSSES = BalanceConfig(switch=0.1, group_switch=0.05, z=0.01, group_z=0.01, importance=0.02, load=0.02)


def balanced_layer():
    return make_layer(dim=D, hidden=5, seed=3, num_experts=8, experts_per_token=2, num_groups=4, groups_per_token=2,
                      num_shared_experts=1, shared_gate=True, balance=ALL_LOSSES)


def layer_batches(world: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Two micro-batches of the global batch (rank r: rows ``[r*T, (r+1)*T)``) and their cotangents."""
    gen = torch.Generator().manual_seed(11)
    return [(torch.randn(world * T, D, generator=gen, dtype=torch.float64),
             torch.randn(world * T, D, generator=gen, dtype=torch.float64)) for _ in range(2)]


def layer_loss(y, aux, c):
    return (y * c).sum() / y.shape[0] + aux.loss  # a mean over the rows, as training losses are


def layer_scenarios(rank: int, world: int, out: str) -> None:
    mesh = init_mesh(ParallelLayout(expert_parallel=2, data_parallel=world // 2))
    results = {}
    for sync in ("ddp", "manual"):
        layer = apply_expert_parallel(balanced_layer(), mesh.ep_group)
        use_global_balance_losses(layer, mesh.balance_group)
        buckets: list[tuple[int, int]] = []  # (micro-batch, elements) of every bucket DDP reduced
        micro = 0

        def counting_hook(_, bucket):
            buckets.append((micro, bucket.buffer().numel()))
            return allreduce_hook(mesh.grad_group, bucket)

        if sync == "ddp":
            ddp = replicate_with_ddp(layer, mesh.grad_group)
            ddp.register_comm_hook(None, counting_hook)
        ys, losses = [], []
        for m, (x, c) in enumerate(layer_batches(world)):
            micro = m
            rows = slice(rank * T, (rank + 1) * T)
            if sync == "ddp" and m == 0:
                with ddp.no_sync():
                    y, aux = ddp(x[rows])
                    (layer_loss(y, aux, c[rows]) / 2).backward()
            else:
                y, aux = (ddp if sync == "ddp" else layer)(x[rows])
                (layer_loss(y, aux, c[rows]) / 2).backward()
            ys.append(y.detach())
            losses.append({k: v.detach() for k, v in aux.losses.items()})
        if sync == "ddp":
            reduce_expert_grads(layer, world, mesh.dp_group)
        else:
            data_parallel_grads(layer, dp_group=mesh.dp_group)
        sharded = {id(p) for p in expert_parameters(layer)}
        grads = {n: _gather(p.grad, mesh.ep_group) if id(p) in sharded else p.grad.clone()
                 for n, p in layer.named_parameters()}
        results[sync] = dict(y=ys, losses=losses, grads=grads, buckets=buckets,
                             replicated=sum(p.numel() for p in replicated_parameters(layer)))
    try:
        apply_expert_parallel(make_layer(dim=D, num_experts=4, experts_per_token=1, routing_mode="expert_choice"),
                              mesh.ep_group)
        results["expert_choice"] = "no error"
    except ValueError as e:
        results["expert_choice"] = str(e)
    torch.save(results, Path(out) / f"rank{rank}.pt")
    mesh.destroy()


def _gather(shard: torch.Tensor, group) -> torch.Tensor:
    pieces = [torch.empty_like(shard) for _ in range(dist.get_world_size(group))]
    dist.all_gather(pieces, shard.contiguous(), group=group)
    return torch.cat(pieces)


@pytest.fixture(scope="module")
def layer_world(tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("layer")
    run_workers(layer_scenarios, 4, str(tmp), timeout_s=TIMEOUT_S)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(4)]


@pytest.mark.slow
@pytest.mark.parametrize("sync", ["ddp", "manual"])
def test_ep2_dp2_layer_equals_one_process_with_global_balance_losses(layer_world, sync):
    W = len(layer_world)
    layer = balanced_layer()
    want_losses, want_y = [], []
    for x, c in layer_batches(W):
        y, aux = layer(x)
        (layer_loss(y, aux, c) / 2).backward()
        want_y.append(y.detach())
        want_losses.append({k: v.detach() for k, v in aux.losses.items()})
    worst = 0.0
    for r, out in enumerate(layer_world):
        got = out[sync]
        for m in range(2):
            torch.testing.assert_close(got["y"][m], want_y[m][r * T : (r + 1) * T], atol=1e-10, rtol=1e-10)
            assert got["losses"][m].keys() == want_losses[m].keys() == set(ALL_LOSSES.active())
            for name, value in want_losses[m].items():  # the global batch's, on every rank
                torch.testing.assert_close(got["losses"][m][name], value, atol=1e-12, rtol=1e-12)
        for name, p in layer.named_parameters():
            torch.testing.assert_close(got["grads"][name], p.grad, atol=1e-10, rtol=1e-10,
                                       msg=lambda msg: f"grad of {name} on rank {r}: {msg}")
            worst = max(worst, float((got["grads"][name] - p.grad).abs().max()))
    print(f"\nEP2xDP2 layer ({sync}), float64: largest gradient difference {worst:.1e}")


@pytest.mark.slow
def test_ddp_buckets_hold_no_expert_and_wait_for_the_last_micro_batch(layer_world):
    for out in layer_world:
        buckets = out["ddp"]["buckets"]
        assert buckets and all(m == 1 for m, _ in buckets)  # no_sync: nothing reduced in micro-batch 0
        assert sum(n for _, n in buckets) == out["ddp"]["replicated"]  # the replicated parameters, nothing else


@pytest.mark.slow
def test_expert_parallelism_refuses_expert_choice(layer_world):
    for out in layer_world:  # its sharded forward is token choice's: it used to ignore routing_mode
        assert "token-choice routing only, got routing_mode='expert_choice'" in out["expert_choice"]


def test_layers_that_route_their_own_way_are_not_sharded():
    from dualroute.layer import MoELayer
    from dualroute.parallel.expert_parallel import unshardable

    class OwnRouting(MoELayer):  # as ConvMoELayer: images, not (T, D) tokens
        def route_and_compute(self, x, routing, mask=None):
            return super().route_and_compute(x, routing, mask)

    assert unshardable(balanced_layer()) is None
    layer = balanced_layer()
    layer.__class__ = OwnRouting
    assert "OwnRouting overrides route_and_compute" in unshardable(layer)
    expert_choice = make_layer(dim=D, num_experts=4, experts_per_token=1, routing_mode="expert_choice")
    assert "routing_mode='expert_choice'" in unshardable(expert_choice)


def test_global_balance_losses_of_one_rank_are_the_local_ones():
    layer = balanced_layer()
    x = torch.randn(T, D, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    routing = layer.router(x)
    for mask in (None, torch.arange(T) % 3 > 0):
        want = aux_losses(routing, ALL_LOSSES, mask)
        got = global_aux_losses(routing, ALL_LOSSES, mask, lambda v: v)
        assert got.keys() == want.keys()
        for name in want:
            assert torch.equal(got[name], want[name]), name
    assert global_aux_losses(routing, BalanceConfig(), None, lambda v: 1 / 0) == {}  # nothing on: no collective


def test_use_global_balance_losses_needs_a_sharded_model():
    with pytest.raises(ValueError, match="no expert-parallel layer"):
        use_global_balance_losses(balanced_layer())


def test_parallel_layout_checks_its_sizes():
    assert ParallelLayout(expert_parallel=2, data_parallel=3).world == 6
    assert ParallelLayout(2, 3).coords(5) == (2, 1)  # rank = d * EP + e
    with pytest.raises(ValueError, match="data_parallel must be >= 1, got 0"):
        ParallelLayout(2, 0)
    with pytest.raises(TypeError, match="expert_parallel must be an int, got True"):
        ParallelLayout(True, 1)


# ------------------------------------------------------------------------------------ the trainer

TINY = ["model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.ffn_hidden=32", "model.max_seq_len=16",
        "model.moe.hidden=16", "train.seq_len=16", "train.batch_size=4", "train.eval_batches=2",
        "train.log_every=1", "train.warmup_steps=1", "train.threads=1"]
BALANCED = ["model.moe.balance.switch=0.05", "model.moe.balance.group_switch=0.02", "train.grad_accum=2"]
STRAIGHT = ["train.steps=6", "train.eval_every=3"]
RESUMED = ["train.steps=4", "train.save_every=2", "train.eval_every=3"]


def tiny(out: Path, *extra: str, preset: str = "lm-dual-small") -> RunConfig:
    words = [*TINY, *BALANCED] if preset != "lm-dense-small" else \
        [w for w in [*TINY, *BALANCED] if not w.startswith("model.moe.")]  # the dense twin: no MoE section
    return override(get_preset(preset), [*words, f"train.out_dir={out}", *extra])


def records(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r}


def crashed_run(out: Path, **layout) -> None:
    """Train RESUMED and stop before step 3: ckpt-00000002 is the last checkpoint."""
    original = Trainer.train_step

    def crash(self):
        if self.step == 2:
            raise RuntimeError("simulated crash")
        return original(self)

    Trainer.train_step = crash
    try:
        with pytest.raises(RuntimeError, match="simulated crash"):
            train(tiny(out, *RESUMED), progress=False, **layout)
    finally:
        Trainer.train_step = original


def two_ranks(rank: int, world: int, tmp: str) -> None:
    tmp = Path(tmp)
    train(tiny(tmp / "dp2", *STRAIGHT), progress=False, expert_parallel=1, data_parallel=2)
    train(tiny(tmp / "one_to_dp2", *RESUMED), resume=True, progress=False, data_parallel=2)
    train(tiny(tmp / "dense_dp2", *STRAIGHT, preset="lm-dense-small"), progress=False, data_parallel=2)


def four_ranks(rank: int, world: int, tmp: str) -> None:
    tmp = Path(tmp)
    train(tiny(tmp / "ep2dp2", *STRAIGHT), progress=False, expert_parallel=2, data_parallel=2)
    train(tiny(tmp / "ep4", *STRAIGHT), progress=False, expert_parallel=4)
    crashed_run(tmp / "ep2dp2_to_one", expert_parallel=2, data_parallel=2)
    train(tiny(tmp / "one_to_ep2dp2", *RESUMED), resume=True, progress=False, expert_parallel=2, data_parallel=2)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("one")
    train(tiny(tmp / "straight", *STRAIGHT), progress=False)
    train(tiny(tmp / "straight4", *RESUMED), progress=False)
    train(tiny(tmp / "dense", *STRAIGHT, preset="lm-dense-small"), progress=False)
    return tmp


@pytest.fixture(scope="module")
def world2(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("w2")
    crashed_run(tmp / "one_to_dp2")  # one process; DP 2 resumes it
    run_workers(two_ranks, 2, str(tmp), timeout_s=TIMEOUT_S)
    return tmp


@pytest.fixture(scope="module")
def world4(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("w4")
    crashed_run(tmp / "one_to_ep2dp2")
    run_workers(four_ranks, 4, str(tmp), timeout_s=TIMEOUT_S)
    return tmp


def assert_same_run(got_dir: Path, want_dir: Path, step: int, what: str) -> None:
    """Same logged losses, aux losses, loads and grad norms, same checkpoint (weights and Adam moments)."""
    got, want = records(got_dir), records(want_dir)
    assert sorted(got) == sorted(want)
    for s, r in want.items():
        assert got[s]["loss"] == pytest.approx(r["loss"], abs=1e-5), (what, s)
        assert got[s]["aux_loss"] == pytest.approx(r["aux_loss"], abs=1e-6), (what, s)
        assert (got[s]["maxvio"], got[s]["dropped"]) == (r["maxvio"], r["dropped"]), (what, s)
        assert got[s]["grad_norm"] == pytest.approx(r["grad_norm"], rel=1e-4), (what, s)
    a, b = (ckpt.load_checkpoint(d / f"ckpt-{step:08d}") for d in (got_dir, want_dir))
    assert a.model_state.keys() == b.model_state.keys()
    for key, value in b.model_state.items():
        torch.testing.assert_close(a.model_state[key], value, atol=1e-5, rtol=1e-4, msg=lambda m: f"{what} {key}: {m}")
    for index, moments in b.optimizer_state["state"].items():
        for name, value in moments.items():
            torch.testing.assert_close(a.optimizer_state["state"][index][name], value, atol=1e-5, rtol=1e-4)
    loss_diff = max(abs(got[s]["loss"] - r["loss"]) for s, r in want.items())
    aux_diff = max(abs(got[s]["aux_loss"] - r["aux_loss"]) for s, r in want.items())
    weight_diff = max(float((a.model_state[k] - v).abs().max()) for k, v in b.model_state.items())
    print(f"\n{what}: {len(want)} steps, largest difference from one process: loss {loss_diff:.1e}, "
          f"aux loss {aux_diff:.1e}, weights {weight_diff:.1e}")


@pytest.mark.slow
def test_dp2_with_switch_loss_and_grad_accum_equals_one_process(world2, one_process):
    assert sorted(os.listdir(world2 / "dp2")) == sorted(os.listdir(one_process / "straight"))
    assert all(r["aux_loss"] > 0 for r in records(one_process / "straight").values())  # the losses are on
    assert_same_run(world2 / "dp2", one_process / "straight", 6, "DP2 (switch + group switch, grad_accum 2)")


@pytest.mark.slow
def test_dense_model_trains_with_data_parallelism_alone(world2, one_process):
    got, want = records(world2 / "dense_dp2"), records(one_process / "dense")
    assert sorted(got) == sorted(want) == list(range(1, 7))
    assert [got[s]["loss"] for s in got] == pytest.approx([want[s]["loss"] for s in want], abs=1e-5)
    a, b = (ckpt.load_checkpoint(d / "ckpt-00000006").model_state for d in (world2 / "dense_dp2", one_process / "dense"))
    for key, value in b.items():
        torch.testing.assert_close(a[key], value, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_resume_one_process_on_dp2(world2, one_process):
    assert_same_run(world2 / "one_to_dp2", one_process / "straight4", 4, "1 -> DP2 resume")


@pytest.mark.slow
@pytest.mark.parametrize("run", ["ep2dp2", "ep4"])
def test_four_ranks_equal_one_process(world4, one_process, run):
    assert_same_run(world4 / run, one_process / "straight", 6, f"{run} (switch + group switch, grad_accum 2)")


@pytest.mark.slow
def test_resume_across_layouts(world4, one_process):
    assert_same_run(world4 / "one_to_ep2dp2", one_process / "straight4", 4, "1 -> EP2xDP2 resume")
    out = world4 / "ep2dp2_to_one"
    assert sorted(records(out)) == [1, 2]
    train(tiny(out, *RESUMED), resume=True, progress=False)
    assert_same_run(out, one_process / "straight4", 4, "EP2xDP2 -> 1 resume")


def test_layout_must_match_the_launched_processes(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"--expert-parallel 2 x --data-parallel 2 = 4 must equal .* WORLD_SIZE=1"):
        train(tiny(tmp_path, "train.steps=1"), progress=False, expert_parallel=2, data_parallel=2)
    with pytest.raises(ValueError, match=r"--data-parallel must be an int >= 1, got 0"):
        train(tiny(tmp_path, "train.steps=1"), progress=False, data_parallel=0)
    assert main(["train", "lm-dual-small", "--out", str(tmp_path), "--quiet", "--data-parallel", "3", *TINY]) == 2
    assert "--expert-parallel 1 x --data-parallel 3 = 3 must equal" in capsys.readouterr().err
    assert train(tiny(tmp_path, "train.steps=1"), progress=False, expert_parallel=1, data_parallel=1).steps == 1


# ------------------------------------------------------------------------ two launchers, two "nodes"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_torchrun_launchers_equal_one_process(tmp_path, one_process):
    """Two ``torchrun --nnodes 2`` launchers of 2 processes each (EP 2 x DP 2) meet on 127.0.0.1."""
    out = tmp_path / "run"
    port = free_port()
    steps = ["train.steps=6", "train.eval_every=3"]
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
         "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(port),
         "-m", "dualroute", "train", "lm-dual-small", "--out", str(out), "--quiet",
         "--expert-parallel", "2", "--data-parallel", "2", *TINY, *BALANCED, *steps],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path) for node in (0, 1)]
    try:
        results = [node.communicate(timeout=300) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    for node, (stdout, stderr) in zip(nodes, results):
        assert node.returncode == 0, stderr[-3000:]
    assert results[0][0].count(f"run {out}: 6 steps") == 1 and f"run {out}" not in results[1][0]  # rank 0 prints
    assert_same_run(out, one_process / "straight", 6, "two torchrun launchers, EP2xDP2")


# ------------------------------------------------------------------------------------- bench ep


def test_bench_ep_times_ddp_on_these_layouts():
    from dualroute.bench.ep import sync_layouts

    assert sync_layouts(1, 16) == []
    assert sync_layouts(2, 16) == [ParallelLayout(2, 1)]
    assert sync_layouts(4, 16) == [ParallelLayout(4, 1), ParallelLayout(2, 2)]
    assert sync_layouts(4, 6) == [ParallelLayout(2, 2)]  # EP 4 does not split 6 experts
    assert sync_layouts(3, 4) == []


@pytest.mark.slow
def test_bench_ep_prints_ddp_against_the_hand_written_all_reduce(tmp_path, capsys):
    from dualroute.bench.ep import main as bench_ep

    path = tmp_path / "ep.json"
    assert bench_ep(["--worlds", "4", "--tokens", "64", "--dim", "16", "--hidden", "16", "--steps", "1",
                     "--warmup", "0", "--seq-len", "16", "--json", str(path)]) == 0
    text = capsys.readouterr().out
    assert "| W | layout | manual ms | ddp ms | ddp / manual |" in text
    assert "| 4 | EP 4 x DP 1 |" in text and "| 4 | EP 2 x DP 2 |" in text
    sync = json.loads(path.read_text())["sync"]
    assert [(r["expert_parallel"], r["data_parallel"]) for r in sync] == [(4, 1), (2, 2)]
    assert all(r["manual_ms"] > 0 and r["ddp_ms"] > 0 and r["ratio"] == r["ddp_ms"] / r["manual_ms"] for r in sync)
