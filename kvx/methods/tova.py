"""`tova`: Token Omission Via Attention.

Oren et al., 2024, "Transformers are Multi-State RNNs" (EMNLP 2024). When the cache is full, the token the current
query attends to least, its attention averaged over all the heads of the layer, is dropped; every head of a layer
keeps the same tokens. Here "the current query" is the latest real query that read the cache: a decoding step drops
the argmin of the previous token's head-averaged attention (over what it read, itself included) before the new token
attends, so a query never reads more than `budget` tokens; after a prefill chunk longer than the budget the chunk's
last query decides which `budget` tokens stay.

The newest token. The token just appended read itself, so its score is its own self-attention, and it may be the
argmin and be dropped before the next token attends. TOVA's own code lets it compete (the paper's rule: drop the
lowest score); kvpress always keeps it. Default `keep_newest: false` follows the paper; `keep_newest: true` keeps the
newest token whatever its score, as kvpress does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvx.errors import ConfigError
from kvx.methods.base import ArchInfo, most_recent
from kvx.methods.common import AttentionPolicy, EvictionMethod, slot_priority
from kvx.registry import METHODS


class LastQueryPolicy(AttentionPolicy):
    """Scores = the latest real query's attention averaged over all query heads; one kept set for the layer.

    `keep_newest`: the newest token is never dropped (as in kvpress); without it, it competes on its score."""

    def __init__(self, budget: int, keep_newest: bool = False, group: int = 1):
        super().__init__(budget)
        self.keep_newest = keep_newest
        self._group = group  # query heads per KV head

    def begin(self, store, t: int) -> None:
        # the last real query of each row (left padding: the last query of a chunk is real unless the whole chunk
        # is padding, in which case the scores stay as they were)
        real = self._qpos >= 0  # [B, t]
        self._last = (t - 1) - real.flip(1).long().argmax(dim=1)  # [B]
        self._has = real.any(dim=1)  # [B]

    def absorb(self, store, probs: torch.Tensor, qpos: torch.Tensor, row0: int = 0) -> None:
        # probs [B, Hkv, g, tb, N]: rows row0 .. row0 + tb of this forward
        B, Hkv, g, tb, N = probs.shape
        rel = self._last - row0
        inside = self._has & (rel >= 0) & (rel < tb)  # [B]
        if probs.device.type == "cpu" and not bool(inside.any()):
            return
        rel = rel.clamp(0, tb - 1)
        row = probs.gather(3, rel.view(B, 1, 1, 1, 1).expand(B, Hkv, g, 1, N)).mean(dim=(1, 2, 3))  # [B, N]
        self.scores.copy_(torch.where(inside[:, None, None], row[:, None, :].expand(B, Hkv, N), self.scores))

    def sums_block(self, sums: torch.Tensor) -> None:
        """One decoding query's attention summed over each group, [B, Hkv, N] (from the fused decode kernel): the
        mean over all query heads is their sum over the KV heads / Hq."""
        B, Hkv, N = sums.shape
        row = sums.sum(dim=1) / (Hkv * self._group)  # [B, N]
        real = self._qpos[:, -1] >= 0
        self.scores.copy_(torch.where(real[:, None, None], row[:, None, :].expand(B, Hkv, N), self.scores))

    def priority(self, store, m: int) -> torch.Tensor:
        B, Hkv = store.pos.shape[:2]
        pos = store.pos[:, :1]
        forced = most_recent(pos, 1) if self.keep_newest else None
        return slot_priority(self.scores[:, :1], pos, forced).expand(B, Hkv, -1)  # the same set for every head

    def select_drop(self, store, k: int) -> torch.Tensor:
        B, Hkv = store.pos.shape[:2]
        return super().select_drop(store, k)[:, :1].expand(B, Hkv, k)  # computed once, for head 0


@METHODS.register("tova")
@dataclass
class TOVA(EvictionMethod):
    name: str = "tova"
    keep_newest: bool = False  # never drop the newest token (kvpress); false: it competes on its score (the paper)

    def check_fields(self) -> None:
        if not isinstance(self.keep_newest, bool):
            raise ConfigError("method.keep_newest", f"must be true or false, got {self.keep_newest!r}")

    def build_policy(self, layer_idx: int, budget: int, reserved: int, arch: ArchInfo) -> LastQueryPolicy:
        return LastQueryPolicy(budget, self.keep_newest, arch.group)
