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

from ..layer import MoEConfig, MoELayer
from ..parallel.expert_parallel import apply_expert_parallel, traffic
from ..parallel.launch import run_workers

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


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    rows: list[Row] = []
    for world in args.worlds:
        with tempfile.TemporaryDirectory(prefix="dualroute-bench-ep-") as tmp:
            out = os.path.join(tmp, "rows.json")
            run_workers(_bench_rank, world, vars(args), out, timeout_s=args.timeout)
            with open(out) as f:
                rows += [Row(**r) for r in json.load(f)]
    print(format_table(rows, args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": [asdict(r) for r in rows]}, f, indent=2)
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
    p.add_argument("--json", metavar="PATH", help="also write the rows here")
    return p


def _bench_rank(rank: int, world: int, args: dict, out: str) -> None:
    mine = [_bench_setup(rank, world, args, name, G, J) for name, (G, J) in SETUPS.items()]
    everyone: list = [None] * world
    dist.all_gather_object(everyone, mine)
    if rank == 0:
        rows = [_average(world, [r[i] for r in everyone]) for i in range(len(SETUPS))]
        with open(out, "w") as f:
            json.dump([asdict(r) for r in rows], f)


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


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
