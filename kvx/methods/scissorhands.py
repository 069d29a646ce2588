"""`scissorhands`: persistence of importance over a history window.

Liu et al., 2023, "Scissorhands: Exploiting the Persistence of Importance Hypothesis for LLM KV Cache Compression at
Test Time" (NeurIPS 2023). A token that was important once tends to stay important. Importance is counted over the
last `history` queries: each time a query gave a token more than the average attention of that query (1/n over the
n tokens it read), the token scores one (summed over the query heads of a KV head's group). When the cache reaches
its budget it is compressed: the `recent` newest tokens stay and the least persistent of the others are dropped,
`drop` tokens at a time (the paper drops a batch of tokens per compression so that it runs only now and then; with
`drop: 1` it runs at every step once the cache is full). A query never reads more than `budget` tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvx.errors import ConfigError
from kvx.methods.base import ArchInfo
from kvx.methods.common import (
    AttentionPolicy,
    EvictionMethod,
    check_share,
    forced_recent,
    readable,
    resolve_share,
    top_slots,
)
from kvx.registry import METHODS


class PersistencePolicy(AttentionPolicy):
    """Keeps, per KV head, how many query heads found each slot above average for each of the last `history` queries.

    hist [B, Hkv, h, n] (int16, h <= history) is the score buffer; a slot's score is its column sum."""

    def __init__(self, budget: int, recent: int, history: int, drop: int):
        super().__init__(budget)
        self.recent = recent
        self.history = history
        self.drop = drop
        self.hist: torch.Tensor | None = None

    def grow_scores(self, store, t: int, fill: float = 0.0) -> None:
        B, H, n = store.pos.shape
        if self.hist is None:
            self.hist = torch.zeros(B, H, 0, n, dtype=torch.int16, device=store.pos.device)
        else:
            pad = torch.zeros(B, H, self.hist.shape[2], t, dtype=torch.int16, device=store.pos.device)
            self.hist = torch.cat([self.hist, pad], dim=3)

    def absorb(self, store, probs: torch.Tensor, qpos: torch.Tensor) -> None:
        # probs [B, Hkv, g, t, n]; a padding query's row is all zeros
        ok = readable(store.pos, qpos)  # [B, Hkv, t, n]
        n_read = ok.sum(dim=-1, keepdim=True).clamp(min=1)  # [B, Hkv, t, 1]
        above = (probs > (1.0 / n_read)[:, :, None]) & ok[:, :, None]
        counts = above.sum(dim=2).to(torch.int16)  # [B, Hkv, t, n]
        self.hist = torch.cat([self.hist, counts], dim=2)[:, :, -self.history :]

    def on_keep(self, store, idx: torch.Tensor) -> None:
        h = self.hist.shape[2]
        self.hist = self.hist.gather(3, idx[:, :, None, :].expand(*idx.shape[:2], h, idx.shape[-1]))

    def select(self, store, m: int) -> torch.Tensor:
        # counts are integers: among equal counts the newer token wins (it was counted by fewer queries)
        pos = store.pos.double()
        score = self.hist.sum(dim=2).double() + (pos + 1) / (pos.max() + 2)
        return top_slots(score, store.pos, m, forced=forced_recent(store.pos, m, self.recent))

    def before_attend(self, store, t: int) -> None:
        if t < self.budget and store.n + t > self.budget:
            self.evict_to(store, min(self.budget - t, self.budget - self.drop))

    def nbytes(self) -> int:
        return 0 if self.hist is None else self.hist.numel() * self.hist.element_size()


@METHODS.register("scissorhands")
@dataclass
class Scissorhands(EvictionMethod):
    name: str = "scissorhands"
    recent: int | float = 0.25  # recent window: share of the budget (float) or tokens (int)
    history: int = 32  # queries over which persistence is counted
    drop: int | float = 1  # tokens dropped per compression once full: tokens (int) or share of the budget (float)

    def check_fields(self) -> None:
        check_share(self.recent, "method.recent")
        check_share(self.drop, "method.drop")
        if isinstance(self.history, bool) or not isinstance(self.history, int) or self.history < 1:
            raise ConfigError("method.history", f"must be an int >= 1, got {self.history!r}")

    def reserved(self, total):
        drop = resolve_share(self.drop, "method.drop", total)
        if drop is not None and total is not None and isinstance(self.drop, int) and drop >= total:
            raise ConfigError("method.drop", f"must be smaller than the budget of {total} tokens, got {drop}")
        return resolve_share(self.recent, "method.recent", total)

    def build_policy(self, layer_idx: int, budget: int, reserved: int, arch: ArchInfo) -> PersistencePolicy:
        drop = self.drop if isinstance(self.drop, int) else int(self.drop * budget)  # share of this layer's budget
        drop = min(max(1, drop), max(1, budget - 1))
        return PersistencePolicy(budget, min(reserved, budget), self.history, drop)
