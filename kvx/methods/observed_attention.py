"""`observed_attention`: H2O's accumulated attention divided by the number of queries that saw each token.

kvpress's ObservedAttentionPress: a token's score is the attention it received, summed over the queries that read
it, divided by how many queries did (`n_tokens_in_sum`: T - j for token j of a prompt of T tokens), averaged over the
query heads of its KV head's group. Plain H2O sums without dividing, which favours old tokens (more queries saw
them); the average does not. Here the accumulation is H2O's (kvx/methods/h2o.py, summed over the group: the same
ranking as the group mean) and the count needs no buffer: every real query after a token reads it while it is held
(eviction is final), so the token at index s has been seen by `last - s + 1` queries, `last` the newest token held.
The fields are H2O's; `recent` defaults to 0 (kvpress keeps no recent window).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvx.methods.base import ArchInfo
from kvx.methods.common import forced_recent, slot_priority
from kvx.methods.h2o import H2O, HeavyRecentPolicy
from kvx.registry import METHODS


def observed_counts(pos: torch.Tensor) -> torch.Tensor:
    """[B, Hkv, n]: how many queries read each slot, last - pos + 1 (at least 1; padding slots get 1)."""
    p = pos.long()
    last = p.max(dim=-1, keepdim=True).values
    return (last - p + 1).clamp(min=1)


class ObservedAttentionPolicy(HeavyRecentPolicy):
    def priority(self, store, m: int) -> torch.Tensor:
        """Mean attention per query that saw the slot; the recent slots (if any) first."""
        forced = forced_recent(store.pos, m, self.recent) if self.recent else None
        return slot_priority(self.scores / observed_counts(store.pos), store.pos, forced)


@METHODS.register("observed_attention")
@dataclass
class ObservedAttention(H2O):
    name: str = "observed_attention"
    recent: int | float = 0  # kvpress keeps no recent window; a share (float) or tokens (int) as in h2o

    def build_policy(self, layer_idx: int, budget: int, reserved: int, arch: ArchInfo) -> ObservedAttentionPolicy:
        return ObservedAttentionPolicy(budget, min(reserved, budget))
