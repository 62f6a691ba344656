"""Expert parallelism on CPU with gloo, against one process on the concatenated batch.

Each world size is spawned ONCE (a module-scoped fixture): the workers run every scenario and
save what they saw; the tests compare it here with the single-process layer / model.

* layer: outputs, the input gradient and EVERY parameter gradient (expert shards gathered),
  after ``data_parallel_grads``, for flat and dual-layer routing; aux == the single-process
  layer's on the local batch; traffic bounded by the placement;
* training: 10 Adam steps of a tiny LM (with grad clipping) give the same losses and weights;
* checkpoints: a 1-process state dict loads into 2 ranks, 2 ranks' gather loads into 1 process;
* faults: a bad world size / E not divisible raises ValueError on every rank before any
  collective, ranks that built different layers all raise; a rank that exits (or stalls)
  makes the others raise within the timeout.

Shapes: W ranks, T tokens per rank, D model dim, E experts, G groups, J / K chosen per token.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from conftest import TOL, make_layer
from dualroute.balance import BalanceConfig
from dualroute.layer import MoEConfig, MoELayer
from dualroute.models import LMConfig, TransformerLM
from dualroute.parallel import (Placement, apply_expert_parallel, clip_grad_norm_, data_parallel_grads,
                                expert_parameters, gather_expert_state, load_full_state_dict, run_workers,
                                sum_loads_over_ranks, traffic)
from dualroute.routing import RouterOptions

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

D, T = 6, 12  # model dim, tokens per rank
TIMEOUT_S = 20.0  # collectives of the equivalence worlds
FAULT_TIMEOUT_S = 8.0  # what a dead rank may cost the others

CASES = {
    "flat": dict(num_experts=8, experts_per_token=2, expert_kind="swiglu", expert_bias=True),
    "dual": dict(num_experts=8, experts_per_token=2, num_groups=4, groups_per_token=2, expert_kind="mlp",
                 expert_bias=True, num_shared_experts=1, shared_gate=True,
                 balance=BalanceConfig(switch=0.01, group_switch=0.01, z=1e-3, group_z=1e-3)),
    "dual_j1": dict(num_experts=8, experts_per_token=2, num_groups=4, groups_per_token=1,
                    router=RouterOptions(group_router="derived", score_func="sigmoid"),
                    balance=BalanceConfig(switch=0.01)),
    "capacity": dict(num_experts=8, experts_per_token=2, num_groups=2, groups_per_token=1,
                     eval_capacity_factor=0.75, eval_group_capacity_factor=1.0),
}


def case_layer(name: str) -> MoELayer:
    return make_layer(dim=D, hidden=5, seed=3, **CASES[name])


def case_batch(world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The concatenated batch ``x`` (rank r holds rows ``[r*T, (r+1)*T)``) and a fixed cotangent."""
    gen = torch.Generator().manual_seed(11)
    return torch.randn(world * T, D, generator=gen, dtype=torch.float64), \
        torch.randn(world * T, D, generator=gen, dtype=torch.float64)


def mean_loss(y: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """A loss that is a mean over the batch, as training losses are: ``sum(y * c) / rows``."""
    return (y * c).sum() / y.shape[0]


def tiny_lm() -> TransformerLM:
    moe = MoEConfig(dim=16, hidden=12, num_experts=4, experts_per_token=2, num_groups=2, groups_per_token=1)
    torch.manual_seed(0)
    return TransformerLM(LMConfig(vocab_size=24, dim=16, n_layers=2, n_heads=2, max_seq_len=8, ffn_hidden=16,
                                  moe=moe)).double()


def lm_batches(world: int, steps: int = 10) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    return [torch.randint(0, 24, (2 * world, 9), generator=gen) for _ in range(steps)]


def lm_step(model, idx_BS: torch.Tensor) -> torch.Tensor:
    out = model(idx_BS[:, :-1])
    loss = F.cross_entropy(out.logits.reshape(-1, 24), idx_BS[:, 1:].reshape(-1))
    loss = loss + sum(a.loss for a in out.aux)  # zero balance weights: the aux term is 0 here
    loss.backward()
    return loss.detach()


# ------------------------------------------------------------------------------------- workers


def scenarios(rank: int, world: int, out: str) -> None:
    """Everything one spawned world runs; each result lands in ``out/<scenario>_<rank>.pt``."""
    results = {"errors": _errors(rank, world)}
    for name in CASES:
        results[name] = _layer_case(name, rank, world)
    results["train"] = _train(rank, world)
    results["load"] = _load_checkpoint(rank, world, Path(out) / "one_process.pt")
    torch.save(results, Path(out) / f"rank{rank}.pt")


def _errors(rank: int, world: int) -> dict:
    messages = {}
    bad = MoELayer(MoEConfig(dim=D, hidden=4, num_experts=2 * world + 1, experts_per_token=1))
    differs = MoELayer(MoEConfig(dim=D, hidden=4, num_experts=world * (rank + 1), experts_per_token=1))
    for what, call in {"indivisible": lambda: apply_expert_parallel(bad),
                       "world_size": lambda: apply_expert_parallel(case_layer("flat"), world_size=world + 1),
                       "disagree": lambda: apply_expert_parallel(differs)}.items():
        try:
            call()
        except ValueError as e:
            messages[what] = str(e)
    dist.barrier()  # nobody is stuck in a collective
    return messages


def _layer_case(name: str, rank: int, world: int) -> dict:
    layer = apply_expert_parallel(case_layer(name))
    x, c = case_batch(world)
    rows = slice(rank * T, (rank + 1) * T)
    x_local = x[rows].clone().requires_grad_(True)
    traffic(layer, reset=True)
    y, aux = layer(x_local)
    forward = traffic(layer, reset=True)
    mean_loss(y, c[rows]).backward()
    data_parallel_grads(layer)
    grads = {n: _gather(p.grad) if any(p is q for q in expert_parameters(layer)) else p.grad
             for n, p in layer.named_parameters()}
    (global_aux,) = sum_loads_over_ranks([aux])
    return dict(y=y.detach(), x_grad=x_local.grad, grads=grads, aux=_aux_fields(aux), forward=forward,
                step=traffic(layer), placement=layer.ep.placement, global_loads=_aux_fields(global_aux))


def _gather(shard: torch.Tensor) -> torch.Tensor:
    pieces = [torch.empty_like(shard) for _ in range(dist.get_world_size())]
    dist.all_gather(pieces, shard.contiguous())
    return torch.cat(pieces)


def _aux_fields(aux) -> dict:
    return dict(tokens_per_expert_E=aux.tokens_per_expert_E, tokens_per_group_G=aux.tokens_per_group_G,
                dropped_per_expert_E=aux.dropped_per_expert_E, num_dropped=aux.num_dropped,
                loss=aux.loss.detach(), losses={k: v.detach() for k, v in aux.losses.items()})


def _train(rank: int, world: int) -> dict:
    model = apply_expert_parallel(tiny_lm())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for idx in lm_batches(world):
        optimizer.zero_grad(set_to_none=True)
        loss = lm_step(model, idx[2 * rank : 2 * rank + 2])
        data_parallel_grads(model)
        clip_grad_norm_(model, 0.5)
        optimizer.step()
        dist.all_reduce(loss)
        losses.append(float(loss) / world)
    return dict(losses=losses, state=gather_expert_state(model))


def _load_checkpoint(rank: int, world: int, path: Path) -> dict:
    torch.manual_seed(99)  # different weights, all to be overwritten
    model = apply_expert_parallel(TransformerLM(tiny_lm().cfg).double())
    load_full_state_dict(model, torch.load(path))
    idx = lm_batches(world)[0][2 * rank : 2 * rank + 2, :-1]
    with torch.no_grad():
        logits = model(idx).logits
    return dict(logits=logits, state=gather_expert_state(model))


def _fault(rank: int, world: int, out: str, how: str) -> None:
    """Rank 1 leaves (``exit``) or stops answering (``stall``); rank 0 records what it got and when."""
    layer = apply_expert_parallel(case_layer("flat"))
    x, _ = case_batch(world)
    layer(x[rank * T : (rank + 1) * T])  # one good step together
    done = Path(out) / "rank0.txt"
    if rank == 1:
        if how == "stall":
            deadline = time.monotonic() + 3 * FAULT_TIMEOUT_S
            while not done.exists() and time.monotonic() < deadline:
                time.sleep(0.1)
        os._exit(0)  # leave without saying goodbye
    start = time.monotonic()
    try:
        layer(x[:T])
        message = "no error"
    except Exception as e:  # noqa: BLE001 - the test inspects what was raised
        message = f"{type(e).__name__}: {e}"
    done.write_text(f"{time.monotonic() - start}\n{message}")
    os._exit(0)  # the group is broken; skip destroy_process_group


# ------------------------------------------------------------------------------------- fixtures


def _spawn_world(world: int, tmp: Path) -> list[dict]:
    reference = tiny_lm()
    torch.save(_perturbed(reference).state_dict(), tmp / "one_process.pt")
    run_workers(scenarios, world, str(tmp), timeout_s=TIMEOUT_S)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(world)]


def _perturbed(model: torch.nn.Module) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.1)
    return model


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    return _spawn_world(2, tmp_path_factory.mktemp("ep2"))


@pytest.fixture(scope="module")
def world4(tmp_path_factory):
    return _spawn_world(4, tmp_path_factory.mktemp("ep4"))


WORLDS = [pytest.param("world2", id="W2"), pytest.param("world4", id="W4", marks=pytest.mark.slow)]


# ------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("world_fixture", WORLDS)
@pytest.mark.parametrize("name", list(CASES))
def test_layer_matches_one_process(request, world_fixture, name):
    ranks = request.getfixturevalue(world_fixture)
    W = len(ranks)
    layer = case_layer(name)
    x, c = case_batch(W)
    x = x.clone().requires_grad_(True)
    if name == "capacity":  # capacity is decided per rank, from the local token count
        y_ref = torch.cat([layer(x[r * T : (r + 1) * T])[0] for r in range(W)])
        loss = sum(mean_loss(y_ref[r * T : (r + 1) * T], c[r * T : (r + 1) * T]) for r in range(W)) / W
    else:  # one process on the concatenated batch
        y_ref = layer(x)[0]
        loss = mean_loss(y_ref, c)
    loss.backward()
    atol, rtol = TOL[torch.float64]
    torch.testing.assert_close(torch.cat([o[name]["y"] for o in ranks]), y_ref.detach(), atol=atol, rtol=rtol)
    # Rank r's input gradient is that of its own mean loss: W times its share of the global one.
    torch.testing.assert_close(torch.cat([o[name]["x_grad"] for o in ranks]) / W, x.grad, atol=atol, rtol=rtol)
    for pname, p in layer.named_parameters():
        for r, out in enumerate(ranks):
            torch.testing.assert_close(out[name]["grads"][pname], p.grad, atol=atol, rtol=rtol,
                                       msg=lambda m: f"grad of {pname} on rank {r}: {m}")


@pytest.mark.parametrize("world_fixture", WORLDS)
@pytest.mark.parametrize("name", list(CASES))
def test_aux_is_the_local_batch_aux(request, world_fixture, name):
    ranks = request.getfixturevalue(world_fixture)
    layer = case_layer(name)
    x, _ = case_batch(len(ranks))
    for r, out in enumerate(ranks):
        _, aux = layer(x[r * T : (r + 1) * T])
        got = out[name]["aux"]
        for field in ("tokens_per_expert_E", "tokens_per_group_G", "dropped_per_expert_E", "num_dropped"):
            assert torch.equal(got[field], getattr(aux, field)), (field, r)
        torch.testing.assert_close(got["loss"], aux.loss.detach())
        assert got["losses"].keys() == aux.losses.keys()
    if name == "capacity":
        assert sum(int(o[name]["aux"]["num_dropped"]) for o in ranks) > 0  # the case really drops
    _, whole = layer(x)  # loads summed over ranks == the loads of the concatenated batch
    for out in ranks:
        assert torch.equal(out[name]["global_loads"]["tokens_per_expert_E"], whole.tokens_per_expert_E)
        assert torch.equal(out[name]["global_loads"]["tokens_per_group_G"], whole.tokens_per_group_G)


@pytest.mark.parametrize("world_fixture", WORLDS)
@pytest.mark.parametrize("name", list(CASES))
def test_traffic_is_bounded_and_counted(request, world_fixture, name):
    ranks = request.getfixturevalue(world_fixture)
    W, cfg = len(ranks), case_layer(name).cfg
    placement = ranks[0][name]["placement"]
    assert placement == Placement.of(cfg, W)
    forward = [o[name]["forward"] for o in ranks]
    for f in forward:
        assert f.tokens == T and f.rows <= T * cfg.experts_per_token
        assert f.pairs <= T * placement.max_ranks_per_token  # a token reaches at most this many ranks
        assert f.pairs_remote <= f.rows_remote  # one copy per rank, never more than one per row
    if cfg.num_groups % W == 0 and cfg.groups_per_token == 1:
        assert all(f.pairs == T for f in forward)  # J = 1: every token goes to exactly one rank
    # Forward bytes: counts, pairs (x, K weights in float64, K int32 ids), and the returned rows.
    K, O = cfg.experts_per_token, D
    pair_bytes = (D + K) * 8 + K * 4 + O * 8
    assert sum(f.bytes_sent for f in forward) == sum((W - 1) * 8 + f.pairs_remote * pair_bytes for f in forward)
    # Backward sends the same float payload once more, in the other direction.
    step = [o[name]["step"] for o in ranks]
    assert sum(s.bytes_sent for s in step) == sum(f.pairs_remote * (D + K + O) * 8 for f in forward)


@pytest.mark.parametrize("world_fixture", WORLDS)
def test_training_matches_one_process(request, world_fixture):
    ranks = request.getfixturevalue(world_fixture)
    W = len(ranks)
    model = tiny_lm()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for idx in lm_batches(W):
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(lm_step(model, idx)))
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        optimizer.step()
    for out in ranks:
        # The LM's logits are float32: the per-rank means round differently from the global one.
        assert out["train"]["losses"] == pytest.approx(losses, rel=1e-6)
    want = model.state_dict()
    for out in ranks:
        got = out["train"]["state"]
        assert got.keys() == want.keys()
        for key in want:
            torch.testing.assert_close(got[key], want[key], atol=1e-6, rtol=1e-6, msg=lambda m: f"{key}: {m}")


@pytest.mark.parametrize("world_fixture", WORLDS)
def test_checkpoint_across_world_sizes(request, world_fixture, tmp_path):
    ranks = request.getfixturevalue(world_fixture)
    W = len(ranks)
    saved = _perturbed(tiny_lm()).state_dict()  # what one process saved (the fixture wrote the same)
    # 1 -> W: each rank loaded the one-process checkpoint and computes what one process computes.
    one = TransformerLM(tiny_lm().cfg).double()
    one.load_state_dict(saved)
    with torch.no_grad():
        want = one(lm_batches(W)[0][:, :-1]).logits
    torch.testing.assert_close(torch.cat([o["load"]["logits"] for o in ranks]), want, atol=1e-12, rtol=1e-12)
    # W -> 1: the gathered state is the one-process state, exactly, and loads into a plain model.
    for out in ranks:
        gathered = out["load"]["state"]
        assert gathered.keys() == saved.keys()
        assert all(torch.equal(gathered[k], saved[k]) for k in saved)
    plain = TransformerLM(tiny_lm().cfg).double()
    plain.load_state_dict(ranks[0]["train"]["state"])


@pytest.mark.parametrize("world_fixture", WORLDS)
def test_bad_sizes_raise_on_every_rank(request, world_fixture):
    ranks = request.getfixturevalue(world_fixture)
    W = len(ranks)
    for out in ranks:
        assert f"E={2 * W + 1}" in out["errors"]["indivisible"] and f"world={W}" in out["errors"]["indivisible"]
        assert f"{W + 1} ranks" in out["errors"]["world_size"] and f"has {W} ranks" in out["errors"]["world_size"]
        assert "ranks disagree on the MoE layers' configs" in out["errors"]["disagree"]


@pytest.mark.parametrize("how", ["exit", "stall"])
def test_dead_rank_raises_within_the_timeout(tmp_path, how):
    run_workers(_fault, 2, str(tmp_path), how, timeout_s=FAULT_TIMEOUT_S, join_timeout_s=8 * FAULT_TIMEOUT_S)
    elapsed, message = (tmp_path / "rank0.txt").read_text().split("\n", 1)
    assert message.startswith("RuntimeError: expert-parallel all-to-all failed on rank 0"), message
    assert float(elapsed) < FAULT_TIMEOUT_S + 5, message


# ---------------------------------------------------------------------- placement (no processes)


def test_placement_bounds_the_ranks_a_token_reaches():
    assert Placement(16, 1, 1, 2, 4).max_ranks_per_token == 2  # flat top-2: up to K ranks
    assert Placement(16, 4, 1, 2, 4).max_ranks_per_token == 1  # one group per rank, J = 1
    assert Placement(16, 4, 2, 4, 2).max_ranks_per_token == 2  # two groups per rank, J = 2
    assert Placement(16, 4, 1, 4, 2).groups_per_rank == 2
    assert Placement(16, 2, 1, 2, 4).ranks_per_group == 2  # a group straddles 2 ranks
    assert Placement(16, 2, 1, 2, 4).max_ranks_per_token == 2
    assert Placement(12, 3, 1, 2, 2).groups_per_rank is None  # groups straddle ranks


def test_indivisible_experts_name_e_and_world():
    with pytest.raises(ValueError, match=r"E=6 .* world=4"):
        Placement(6, 1, 1, 2, 4)
