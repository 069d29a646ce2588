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

from kvx.cache.dense import SlotBuffer
from kvx.errors import ConfigError
from kvx.methods.base import ArchInfo
from kvx.methods.common import (
    AttentionPolicy,
    EvictionMethod,
    check_share,
    forced_recent,
    readable,
    resolve_share,
    slot_priority,
)
from kvx.registry import METHODS


class PersistencePolicy(AttentionPolicy):
    """Keeps, per KV head, how many query heads found each slot above average for each of the last `history` queries.

    hist [B, Hkv, history, n] (int16) is the score buffer, a ring over the last `history` queries (rows of queries
    not seen yet are zero); a slot's score is its column sum."""

    def __init__(self, budget: int, recent: int, history: int, drop: int):
        super().__init__(budget)
        self.recent = recent
        self.history = history
        self.drop = drop
        self._hist = SlotBuffer(3, budget)
        self._row = 0  # the ring row the next query writes

    @property
    def hist(self) -> torch.Tensor | None:
        return self._hist.view

    def grow_scores(self, store, t: int, fill: float = 0.0, heads: tuple | None = None) -> None:
        B, H, dev = heads if heads is not None else (*store.pos.shape[:2], store.pos.device)
        h = self._hist
        if h.buf is None:
            h.buf = torch.zeros(B, H, self.history, max(t, self.budget), dtype=torch.int16, device=dev)
            h.n = 0
        else:
            h.ensure(h.n + t)
        h.buf.narrow(3, h.n, t).zero_()
        h._set_n(h.n + t)

    def absorb(self, store, probs: torch.Tensor, qpos: torch.Tensor, row0: int = 0) -> None:
        # probs [B, Hkv, g, tb, N] of rows row0 .. row0 + tb of this forward's t queries; only the last `history`
        # rows are kept, so the others are not counted at all. A padding query's row is all zeros.
        t = self._qpos.shape[1]
        first = max(0, t - self.history - row0)
        if first >= probs.shape[3]:
            return
        probs, qpos = probs[:, :, :, first:], qpos[:, first:]
        ok = readable(self.slot_pos(store), qpos)  # [B, Hkv, tb, N]
        n_read = ok.sum(dim=-1, keepdim=True).clamp(min=1)  # [B, Hkv, tb, 1]
        above = (probs > (1.0 / n_read)[:, :, None]) & ok[:, :, None]
        counts = above.sum(dim=2).to(torch.int16)  # [B, Hkv, tb, N]
        rows = (self._row + torch.arange(counts.shape[2], device=counts.device)) % self.history
        self.hist.index_copy_(2, rows, counts)
        self._row = (self._row + counts.shape[2]) % self.history

    def on_keep(self, store, idx: torch.Tensor) -> None:
        self._hist.keep(idx)

    def on_move(self, store, dst, src, m: int) -> None:
        self._hist.move(dst, src, m)

    def priority(self, store, m: int) -> torch.Tensor:
        # counts are integers: among equal counts the newer token wins (it was counted by fewer queries)
        pos = store.pos.double()
        score = self.hist.sum(dim=2).double() + (pos + 1) / (pos.max() + 2)
        return slot_priority(score, store.pos, forced=forced_recent(store.pos, m, self.recent))

    def before_attend(self, store, t: int) -> None:
        if not self._reserved:
            self.reserve(store)
        if t < self.budget and store.n + t > self.budget:
            self.evict_to(store, min(self.budget - t, self.budget - self.drop))

    def nbytes(self) -> int:
        return self._hist.allocated()


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
