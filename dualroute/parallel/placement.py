"""Where experts live: contiguous expert ranges per rank, so level-1 groups map to ranks.

Shapes: E experts, G groups, M = E/G experts per group, W ranks, L = E/W experts per rank,
J groups and K experts chosen per token.

Rank r owns experts ``[r*L, (r+1)*L)``. Group g owns experts ``[g*M, (g+1)*M)``, so when
``G % W == 0`` each rank owns ``G/W`` whole groups, and a token that keeps J groups sends its
rows to at most J ranks, whatever K is. Flat top-k (G = 1) can reach ``min(K, W)`` ranks.
This is pure arithmetic: nothing here talks to other ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..layer import MoEConfig


@dataclass(frozen=True)
class Placement:
    num_experts: int  # E
    num_groups: int  # G
    groups_per_token: int  # J
    experts_per_token: int  # K
    world: int  # W

    def __post_init__(self) -> None:
        E, W = self.num_experts, self.world
        if isinstance(W, bool) or not isinstance(W, int) or W < 1:
            raise ValueError(f"world size must be a positive int, got {W!r}")
        if E % W != 0:
            raise ValueError(f"expert parallelism needs num_experts divisible by the world size: "
                             f"E={E} experts cannot be split evenly over world={W} ranks")

    @classmethod
    def of(cls, cfg: MoEConfig, world: int) -> Placement:
        return cls(cfg.num_experts, cfg.num_groups, cfg.groups_per_token, cfg.experts_per_token, world)

    @property
    def local_experts(self) -> int:  # L
        return self.num_experts // self.world

    def expert_range(self, rank: int) -> tuple[int, int]:
        """``[first, stop)`` of the experts ``rank`` owns."""
        return rank * self.local_experts, (rank + 1) * self.local_experts

    @property
    def groups_per_rank(self) -> int | None:
        """Whole groups per rank, or None when groups straddle ranks (``G % W != 0``)."""
        return self.num_groups // self.world if self.num_groups % self.world == 0 else None

    @property
    def ranks_per_group(self) -> int:
        """The most ranks one group's experts are spread over."""
        M, L = self.num_experts // self.num_groups, self.local_experts
        return max((g * M + M - 1) // L - (g * M) // L + 1 for g in range(self.num_groups))

    @property
    def max_ranks_per_token(self) -> int:
        """Bound on the ranks one token's rows reach: ``min(K, W, J * ranks_per_group)``."""
        return min(self.experts_per_token, self.world, self.groups_per_token * self.ranks_per_group)
