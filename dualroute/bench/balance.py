"""``dualroute bench balance``: do the balancing methods balance both levels, and at what task cost?

Trains one MoE layer alone (E = 16 experts in G = 4 groups, K = 2) on a fixed synthetic regression
built to make the router collapse: tokens come from a few clusters that share a large mean
direction, each cluster with its own linear target, and the router starts with a strong
preference (along that shared direction) for one group's experts. For two routers (learned group
router, J = 1; DeepSeek-style derived groups with sigmoid scores, J = 2) and every balancing method
(none, Switch at the expert level, Switch at both levels, z-loss only, aux-loss-free bias at two
rates), it reports MaxVio of both levels on a held-out batch before and after training, and the
held-out task loss against the unbalanced baseline. Within a seed every method sees the same task,
data stream and initial weights; the table averages a few seeds.
"""

from __future__ import annotations

import argparse
import math
import platform
import time
from dataclasses import dataclass

import torch

from ..balance import BalanceConfig, update_correction_biases
from ..layer import MoEConfig, MoELayer
from ..losses import max_violation
from ..routing import RouterOptions
from .common import write_json

LOSS_MARGIN = 0.05  # a method "keeps the task loss" if it is at most 5% above the "none" baseline

ROUTERS = {  # name -> (options, groups per token)
    "learned": (RouterOptions(group_router="learned", correction_bias=True), 1),
    "derived-sigmoid": (RouterOptions(group_router="derived", score_func="sigmoid", bias=False,
                                      correction_bias=True), 2),
}


def methods(switch: float, z: float) -> dict[str, tuple[BalanceConfig, float]]:
    """name -> (aux loss weights, correction-bias update rate)."""
    return {
        "none": (BalanceConfig(), 0.0),
        f"switch {switch:g}": (BalanceConfig(switch=switch), 0.0),
        f"switch+group {switch:g}": (BalanceConfig(switch=switch, group_switch=switch), 0.0),
        f"z-loss {z:g}": (BalanceConfig(z=z, group_z=z), 0.0),
        "bias rate 1e-3": (BalanceConfig(), 1e-3),
        "bias rate 1e-2": (BalanceConfig(), 1e-2),
    }


@dataclass(frozen=True)
class Task:
    """Clusters around a shared mean; cluster c's target is ``(x - mean) @ maps[c]``."""

    mean_D: torch.Tensor
    centers_CD: torch.Tensor
    maps_CDD: torch.Tensor

    def sample(self, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        C, D = self.centers_CD.shape
        cluster_T = torch.randint(C, (n,), generator=gen)
        offset_TD = self.centers_CD[cluster_T] + 0.3 * torch.randn(n, D, generator=gen)
        y_TD = torch.einsum("td,tde->te", offset_TD, self.maps_CDD[cluster_T])
        return self.mean_D + offset_TD, y_TD


def make_task(dim: int, clusters: int, seed: int) -> Task:
    gen = torch.Generator().manual_seed(1000 * seed)
    direction_D = torch.randn(dim, generator=gen)
    return Task(
        mean_D=4.0 * direction_D / direction_D.norm(),
        centers_CD=torch.randn(clusters, dim, generator=gen),
        maps_CDD=torch.randn(clusters, dim, dim, generator=gen) / math.sqrt(2 * dim),
    )


def collapsed_layer(cfg: MoEConfig, task: Task, strength: float, seed: int) -> MoELayer:
    """A fresh layer whose router prefers group 0 (and its first experts) for every token."""
    torch.manual_seed(seed)
    layer = MoELayer(cfg)
    router, favoured = layer.router, slice(0, 2)  # experts 0 and 1, both in group 0
    push_D = strength * task.mean_D / task.mean_D.norm() ** 2  # adds `strength` to the logit of every token
    with torch.no_grad():
        router.gate.weight[favoured] += push_D
        if router.group_gate is not None:
            router.group_gate.weight[0] += push_D
    return layer


@torch.no_grad()
def evaluate(layer: MoELayer, x_TD: torch.Tensor, y_TD: torch.Tensor) -> dict[str, float]:
    was_training = layer.training
    out_TD, aux = layer.eval()(x_TD)
    layer.train(was_training)
    return {
        "expert_maxvio": max_violation(aux.tokens_per_expert_E),
        "group_maxvio": max_violation(aux.tokens_per_group_G),
        "task_loss": torch.nn.functional.mse_loss(out_TD, y_TD).item(),
    }


def train(layer: MoELayer, task: Task, rate: float, steps: int, tokens: int, lr: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(1000 * seed + 1)  # the same stream for every method
    opt = torch.optim.Adam(layer.parameters(), lr=lr)
    layer.train()
    for _ in range(steps):
        x_TD, y_TD = task.sample(tokens, gen)
        out_TD, aux = layer(x_TD)
        loss = torch.nn.functional.mse_loss(out_TD, y_TD) + aux.loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if rate > 0:
            update_correction_biases(layer, [aux], rate)


def run_seed(args: argparse.Namespace, seed: int) -> dict[tuple[str, str], dict]:
    """(router, method) -> held-out metrics before and after training, for one seed."""
    task = make_task(args.dim, args.clusters, seed)
    held_x, held_y = task.sample(args.eval_tokens, torch.Generator().manual_seed(1000 * seed + 2))
    results = {}
    for router_name, (options, J) in ROUTERS.items():
        for method, (balance, rate) in methods(args.switch, args.z).items():
            cfg = MoEConfig(dim=args.dim, hidden=args.hidden, num_experts=16, experts_per_token=2, num_groups=4,
                            groups_per_token=J, router=options, balance=balance)
            layer = collapsed_layer(cfg, task, args.strength, seed)
            start = evaluate(layer, held_x, held_y)
            train(layer, task, rate, args.steps, args.tokens, args.lr, seed)
            results[router_name, method] = {"start": start, "end": evaluate(layer, held_x, held_y)}
    return results


def run(args: argparse.Namespace) -> list[dict]:
    """Every metric averaged over the seeds; the task loss also as a ratio to "none", mean and worst seed."""
    per_seed = [run_seed(args, args.seed + i) for i in range(args.seeds)]
    rows = []
    for router_name, method in per_seed[0]:
        runs = [s[router_name, method] for s in per_seed]
        bases = [s[router_name, "none"] for s in per_seed]
        mean = {when: _mean([r[when] for r in runs]) for when in ("start", "end")}
        base_loss = sum(b["end"]["task_loss"] for b in bases) / len(bases)
        ratios = [r["end"]["task_loss"] / b["end"]["task_loss"] - 1 for r, b in zip(runs, bases)]
        vs_none = mean["end"]["task_loss"] / base_loss - 1
        rows.append({"router": router_name, "method": method, **mean, "loss_vs_none": vs_none,
                     "worst_seed_vs_none": max(ratios), "within_margin": vs_none <= LOSS_MARGIN,
                     "per_seed": runs})
    return rows


def _mean(results: list[dict[str, float]]) -> dict[str, float]:
    return {k: sum(r[k] for r in results) / len(results) for k in results[0]}


def table(rows: list[dict]) -> str:
    lines = [
        "| router | method | expert MaxVio start | expert MaxVio end | group MaxVio start | group MaxVio end "
        f"| task loss | vs none (mean) | vs none (worst seed) | within {LOSS_MARGIN:.0%} |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|:-:|",
    ]
    for r in rows:
        s, e = r["start"], r["end"]
        lines.append(
            f"| {r['router']} | {r['method']} | {s['expert_maxvio']:.2f} | {e['expert_maxvio']:.2f} "
            f"| {s['group_maxvio']:.2f} | {e['group_maxvio']:.2f} | {e['task_loss']:.4f} "
            f"| {r['loss_vs_none']:+.1%} | {r['worst_seed_vs_none']:+.1%} | {'yes' if r['within_margin'] else 'no'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dualroute bench balance", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300, help="Adam steps per run")
    p.add_argument("--tokens", type=int, default=256, help="tokens per training batch")
    p.add_argument("--eval-tokens", type=int, default=2048, help="held-out tokens")
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--clusters", type=int, default=8)
    p.add_argument("--strength", type=float, default=3.0, help="initial logit advantage of the favoured experts")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--switch", type=float, default=1e-2, help="Switch loss weight (Fedus et al.: 1e-2)")
    p.add_argument("--z", type=float, default=1e-3, help="z-loss weight (ST-MoE: 1e-3)")
    p.add_argument("--seed", type=int, default=0, help="first seed (task, initial weights, data stream)")
    p.add_argument("--seeds", type=int, default=3, help="seeds averaged: seed, seed+1, ...")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    for name in ("steps", "tokens", "eval_tokens", "dim", "hidden", "clusters", "seeds", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("lr", "switch", "z", "strength"):
        if not math.isfinite(getattr(args, name)) or getattr(args, name) < 0:
            p.error(f"--{name} must be finite and >= 0, got {getattr(args, name)}")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    rows = run(args)
    seconds = time.perf_counter() - started
    print(f"dualroute bench balance: E=16 G=4 K=2 D={args.dim} F={args.hidden} T={args.tokens}, "
          f"{args.steps} Adam steps (lr {args.lr:g}), held-out {args.eval_tokens} tokens, "
          f"mean of seeds {args.seed}..{args.seed + args.seeds - 1}, "
          f"torch {torch.__version__}, {args.threads} thread(s), {seconds:.0f} s\n")
    print(table(rows))
    if args.json:
        setup = {k: v for k, v in vars(args).items() if k != "json"}
        setup.update(torch=torch.__version__, machine=platform.machine(), seconds=seconds, loss_margin=LOSS_MARGIN)
        print()
        write_json(args.json, {"setup": setup, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
