"""`h2o`: heavy hitters + a recent window.

Zhang et al., 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models"
(NeurIPS 2023). Each cached token's score is the attention it has received, summed over every query that read it
while it was held (its own query included) and, under GQA, over the query heads of its KV head's group. When the
cache is full, the `recent` most recent tokens are kept and the rest of the budget goes to the highest scores, per
KV head. Tokens evicted once never come back, so a token's score only counts the queries that saw it in the cache.

Two ways to size it:
- `budget` (tokens, or a fraction of `budget_of`) and `recent` as a share of it (float in [0, 1]) or tokens (int);
- the paper's spelling, `heavy` and `recent` each as tokens (int) or a fraction (float < 1) of `budget_of`, with
  `budget: null`; the budget is then heavy + recent. "5% H2O" on Llama-2-7B (2.5% heavy + 2.5% recent of 4096
  positions, 102 + 102 tokens) is `budget: null, heavy: 0.025, recent: 0.025, budget_of: max_positions`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvx.errors import ConfigError
from kvx.methods.base import ArchInfo
from kvx.methods.common import (
    AttentionPolicy,
    EvictionMethod,
    check_amount,
    forced_recent,
    resolve_amount,
    resolve_share,
    slot_priority,
)
from kvx.registry import METHODS


class HeavyRecentPolicy(AttentionPolicy):
    """Accumulated attention per KV head; keeps the `recent` newest slots and the heaviest of the rest."""

    def __init__(self, budget: int, recent: int):
        super().__init__(budget)
        self.recent = recent

    def absorb(self, store, probs: torch.Tensor, qpos: torch.Tensor, row0: int = 0) -> None:
        # probs [B, Hkv, g, tb, N]; padding queries (qpos < 0) read every slot and must not count
        if bool((qpos < 0).any()) if qpos.device.type == "cpu" else True:
            probs = probs * (qpos >= 0).float()[:, None, None, :, None]
        self.scores += probs.sum(dim=(2, 3))

    def sums_block(self, sums: torch.Tensor) -> None:
        """One decoding query's attention summed over the group, [B, Hkv, N] (from the fused decode kernel)."""
        real = (self._qpos[:, -1] >= 0).float()[:, None, None]
        self.scores += sums * real

    def priority(self, store, m: int) -> torch.Tensor:
        return slot_priority(self.scores, store.pos, forced=forced_recent(store.pos, m, self.recent))


@METHODS.register("h2o")
@dataclass
class H2O(EvictionMethod):
    name: str = "h2o"
    budget: int | float | None = 64  # null when `heavy` sizes the cache
    recent: int | float = 0.5  # with budget: share of it (float) or tokens (int); with heavy: tokens or fraction
    heavy: int | float | None = None  # heavy-hitter tokens (int) or fraction of budget_of (float); needs budget: null

    def check_fields(self) -> None:
        if self.heavy is None:
            if self.budget is None:
                raise ConfigError("method.budget", "is null: give a budget, or heavy and recent (the paper's spelling)")
        else:
            if self.budget is not None:
                raise ConfigError("method.heavy", "give either method.budget (with method.recent a share of it) or "
                                                  "method.heavy + method.recent with method.budget=null, not both")
            check_amount(self.heavy, "method.heavy", allow_zero=True)
            check_amount(self.recent, "method.recent", allow_zero=True)

    def parts(self, ref: int | None) -> tuple[int | None, int | None]:
        """(heavy, recent) in tokens; None where a fraction needs the unknown length."""
        if self.heavy is None:
            total = resolve_amount(self.budget, "method.budget", ref)
            recent = resolve_share(self.recent, "method.recent", total)
            return (None if total is None or recent is None else total - recent), recent
        heavy = resolve_amount(self.heavy, "method.heavy", ref, allow_zero=True)
        recent = resolve_amount(self.recent, "method.recent", ref, allow_zero=True)
        if heavy is not None and recent is not None and heavy + recent < 1:
            raise ConfigError("method.heavy", "heavy + recent must hold at least one token")
        return heavy, recent

    def layout(self, ref):
        heavy, recent = self.parts(ref)
        if heavy is None or recent is None:
            return None, None
        return heavy + recent, recent

    def build_policy(self, layer_idx: int, budget: int, reserved: int, arch: ArchInfo) -> HeavyRecentPolicy:
        return HeavyRecentPolicy(budget, min(reserved, budget))
