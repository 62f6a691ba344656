"""Bytes on the wire and step time of expert parallelism: flat top-k vs dual-layer routing.

    dualroute bench ep [--worlds 1 2 4] [--json PATH]

For each world size W it starts W local gloo processes (``run_workers``), and each rank trains
one MoE layer (forward + backward, train mode) on its own T tokens for every routing setup,
all at the same E and K. Reported per rank, averaged over ranks:

* ``ranks/token``: the placement's bound on the ranks one token reaches (``Placement``);
* ``pairs/token``: (token, other rank) copies actually sent, forward;
* ``sent B/token``: bytes this rank sent to other ranks per token per training step, all
  all-to-alls forward and backward (payload, combine weights, expert ids, counts);
* ``per-row B/token``: what a dispatch sending one copy per (token, remote expert) would send
  (``rows * (D + O) * itemsize``, forward and backward): the cost placement does not remove;
* ``step ms``: the slowest rank's mean step time (CPU, gloo on localhost: a sanity check of
  overheads, not a network measurement).

Then, in the same process group, a small MoE language model (2 layers, dual G4 J1, the same E, K, D,
F; T tokens per rank) takes full training steps (forward, backward, gradient sync, clipping, AdamW)
with its replicated gradients synchronised both ways, steps alternating between the two models:

* ``manual ms``: the hand-written all-reduce after the whole backward (``data_parallel_grads``);
* ``ddp ms``: DistributedDataParallel (``replicate_with_ddp``), whose buckets are reduced while the
  backward still runs, then ``reduce_expert_grads``;
* ``ddp / manual``: their ratio (below 1: DDP is faster), per layout: EP = W, and EP = W/2 x DP = 2.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

import torch.nn.functional as F

from ..layer import MoEConfig, MoELayer
from ..models import LMConfig, TransformerLM
from ..parallel.data_parallel import clip_grad_norm_, data_parallel_grads, reduce_expert_grads, replicate_with_ddp
from ..parallel.expert_parallel import apply_expert_parallel, traffic
from ..parallel.launch import run_workers
from ..parallel.mesh import ParallelLayout, init_mesh

SETUPS = {  # name -> (G, J); all at the same E and K
    "flat": (1, 1),
    "dual G4 J1": (4, 1),
    "dual G4 J2": (4, 2),
}


@dataclass(frozen=True)
class Row:
    world: int
    routing: str
    G: int
    J: int
    E: int
    K: int
    ranks_per_token_bound: int
    pairs_per_token: float
    bytes_per_token: float
    per_row_bytes_per_token: float
    step_ms: float


@dataclass(frozen=True)
class SyncRow:
    """One layout's LM training step with the replicated gradients synchronised by hand and by DDP."""

    world: int
    expert_parallel: int
    data_parallel: int
    manual_ms: float  # the slowest rank's mean step
    ddp_ms: float

    @property
    def ratio(self) -> float:
        return self.ddp_ms / self.manual_ms


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    rows: list[Row] = []
    sync_rows: list[SyncRow] = []
    for world in args.worlds:
        with tempfile.TemporaryDirectory(prefix="dualroute-bench-ep-") as tmp:
            out = os.path.join(tmp, "rows.json")
            run_workers(_bench_rank, world, vars(args), out, timeout_s=args.timeout)
            with open(out) as f:
                saved = json.load(f)
            rows += [Row(**r) for r in saved["rows"]]
            sync_rows += [SyncRow(**r) for r in saved["sync"]]
    print(format_table(rows, args))
    if sync_rows:
        print()
        print(format_sync_table(sync_rows, args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": [asdict(r) for r in rows],
                       "sync": [{**asdict(r), "ratio": r.ratio} for r in sync_rows]}, f, indent=2)
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dualroute bench ep", description=__doc__.split("\n\n")[0])
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4], help="world sizes to run")
    p.add_argument("--experts", type=int, default=16, help="E")
    p.add_argument("--top-k", type=int, default=2, help="K")
    p.add_argument("--tokens", type=int, default=2048, help="tokens per rank per step")
    p.add_argument("--dim", type=int, default=256, help="D")
    p.add_argument("--hidden", type=int, default=512, help="F")
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--timeout", type=float, default=300.0, help="collective timeout, seconds")
    p.add_argument("--sync", action=argparse.BooleanOptionalAction, default=True,
                   help="also time an LM step with DDP against the hand-written all-reduce (W > 1)")
    p.add_argument("--seq-len", type=int, default=64, help="LM step: tokens per sequence (T / seq-len rows)")
    p.add_argument("--json", metavar="PATH", help="also write the rows here")
    return p


def _bench_rank(rank: int, world: int, args: dict, out: str) -> None:
    mine = [_bench_setup(rank, world, args, name, G, J) for name, (G, J) in SETUPS.items()]
    layouts = sync_layouts(world, args["experts"]) if args["sync"] else []
    times = [_bench_sync(rank, world, args, layout) for layout in layouts]
    everyone: list = [None] * world
    dist.all_gather_object(everyone, (mine, times))
    if rank == 0:
        rows = [_average(world, [r[0][i] for r in everyone]) for i in range(len(SETUPS))]
        sync = [SyncRow(world, layout.expert_parallel, layout.data_parallel,
                        manual_ms=max(r[1][i][0] for r in everyone), ddp_ms=max(r[1][i][1] for r in everyone))
                for i, layout in enumerate(layouts)]
        with open(out, "w") as f:
            json.dump({"rows": [asdict(r) for r in rows], "sync": [asdict(r) for r in sync]}, f)


def sync_layouts(world: int, experts: int) -> list[ParallelLayout]:
    """The layouts the LM step is timed on: EP = W, and EP = W/2 x DP = 2 (when that splits the experts)."""
    if world < 2:
        return []
    layouts = [ParallelLayout(expert_parallel=world)]
    if world >= 4 and world % 2 == 0:
        layouts.append(ParallelLayout(expert_parallel=world // 2, data_parallel=2))
    return [layout for layout in layouts if experts % layout.expert_parallel == 0]


def _bench_sync(rank: int, world: int, args: dict, layout: ParallelLayout) -> tuple[float, float]:
    """This rank's mean step time (ms) of the LM with hand-written gradient sync, and with DDP."""
    mesh = init_mesh(layout, args["timeout"])
    models, optimizers = {}, {}
    for sync in ("manual", "ddp"):
        torch.manual_seed(0)  # the same model on every rank
        moe = MoEConfig(dim=args["dim"], hidden=args["hidden"], num_experts=args["experts"],
                        experts_per_token=args["top_k"], num_groups=4, groups_per_token=1)
        model = apply_expert_parallel(TransformerLM(LMConfig(dim=args["dim"], n_layers=2, n_heads=4,
                                                             max_seq_len=args["seq_len"], moe=moe)), mesh.ep_group)
        models[sync] = (model, replicate_with_ddp(model, mesh.grad_group) if sync == "ddp" else model)
        optimizers[sync] = torch.optim.AdamW(model.parameters(), lr=1e-3)
    rows = max(1, args["tokens"] // args["seq_len"])
    idx_BS = torch.randint(0, 256, (rows, args["seq_len"] + 1), generator=torch.Generator().manual_seed(rank))
    times: dict[str, list[float]] = {"manual": [], "ddp": []}
    for step in range(args["warmup"] + args["steps"]):
        for sync in ("manual", "ddp") if step % 2 == 0 else ("ddp", "manual"):  # alternate who goes first
            model, train_model = models[sync]
            dist.barrier()
            start = time.perf_counter()
            out = train_model(idx_BS[:, :-1])
            loss = F.cross_entropy(out.logits.flatten(0, 1), idx_BS[:, 1:].flatten()) + sum(a.loss for a in out.aux)
            loss.backward()
            if sync == "manual":
                data_parallel_grads(model, dp_group=mesh.dp_group)
            else:
                reduce_expert_grads(model, world, mesh.dp_group)
            clip_grad_norm_(model, 1.0, mesh.ep_group)
            optimizers[sync].step()
            optimizers[sync].zero_grad(set_to_none=True)
            if step >= args["warmup"]:
                times[sync].append(time.perf_counter() - start)
    dist.barrier()
    mesh.destroy()
    return 1e3 * statistics.mean(times["manual"]), 1e3 * statistics.mean(times["ddp"])


def _bench_setup(rank: int, world: int, args: dict, name: str, G: int, J: int) -> Row:
    E, K, T = args["experts"], args["top_k"], args["tokens"]
    torch.manual_seed(0)  # the same layer on every rank
    layer = MoELayer(MoEConfig(dim=args["dim"], hidden=args["hidden"], num_experts=E, experts_per_token=K,
                               num_groups=G, groups_per_token=J))
    apply_expert_parallel(layer)
    x_TD = torch.randn(T, args["dim"], generator=torch.Generator().manual_seed(rank))
    times = []
    for step in range(args["warmup"] + args["steps"]):
        if step == args["warmup"]:
            traffic(layer, reset=True)
        dist.barrier()
        start = time.perf_counter()
        y_TD, aux = layer(x_TD)
        (y_TD.square().mean() + aux.loss).backward()
        times.append(time.perf_counter() - start)
    sent = traffic(layer)
    steps, itemsize = args["steps"], x_TD.element_size()
    per_row = sent.rows_remote * (args["dim"] + args["dim"]) * itemsize * 2
    return Row(world, name, G, J, E, K, layer.ep.placement.max_ranks_per_token,
               pairs_per_token=sent.pairs_remote / sent.tokens,
               bytes_per_token=sent.bytes_sent / (steps * T),
               per_row_bytes_per_token=per_row / sent.tokens,
               step_ms=1e3 * statistics.mean(times[args["warmup"]:]))


def _average(world: int, ranks: list[Row]) -> Row:
    first = ranks[0]
    mean = lambda field: statistics.mean(getattr(r, field) for r in ranks)  # noqa: E731
    return Row(world, first.routing, first.G, first.J, first.E, first.K, first.ranks_per_token_bound,
               pairs_per_token=mean("pairs_per_token"), bytes_per_token=mean("bytes_per_token"),
               per_row_bytes_per_token=mean("per_row_bytes_per_token"),
               step_ms=max(r.step_ms for r in ranks))


def format_table(rows: list[Row], args: argparse.Namespace) -> str:
    head = (f"E={args.experts} K={args.top_k} D={args.dim} F={args.hidden} T={args.tokens}/rank float32, "
            f"bytes sent to other ranks per token per training step (forward + backward)\n\n"
            "| W | routing | ranks/token (bound) | remote pairs/token | sent B/token | per-row B/token | step ms |\n"
            "|---|---|---|---|---|---|---|")
    lines = [f"| {r.world} | {r.routing} | {r.ranks_per_token_bound} | {r.pairs_per_token:.2f} | "
             f"{r.bytes_per_token:,.0f} | {r.per_row_bytes_per_token:,.0f} | {r.step_ms:.1f} |" for r in rows]
    return "\n".join([head, *lines])


def format_sync_table(rows: list[SyncRow], args: argparse.Namespace) -> str:
    head = (f"LM training step (2 layers, dual G4 J1, E={args.experts} K={args.top_k} D={args.dim} F={args.hidden}, "
            f"T={args.tokens}/rank): replicated gradients by the hand-written all-reduce after backward vs DDP "
            f"(same process group, steps alternating)\n\n"
            "| W | layout | manual ms | ddp ms | ddp / manual |\n"
            "|---|---|---|---|---|")
    lines = [f"| {r.world} | EP {r.expert_parallel} x DP {r.data_parallel} | {r.manual_ms:.1f} | {r.ddp_ms:.1f} | "
             f"{r.ratio:.2f} |" for r in rows]
    return "\n".join([head, *lines])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
