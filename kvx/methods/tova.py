"""`tova`: Token Omission Via Attention.

Oren et al., 2024, "Transformers are Multi-State RNNs" (EMNLP 2024). When the cache is full, the token the current
query attends to least, its attention averaged over all the heads of the layer, is dropped; every head of a layer
keeps the same tokens. Here "the current query" is the latest real query that read the cache: a decoding step drops
the argmin of the previous token's head-averaged attention (over what it read, itself included) before the new token
attends, so a query never reads more than `budget` tokens; after a prefill chunk longer than the budget the chunk's
last query decides which `budget` tokens stay.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvx.methods.base import ArchInfo
from kvx.methods.common import AttentionPolicy, EvictionMethod, top_slots
from kvx.registry import METHODS


class LastQueryPolicy(AttentionPolicy):
    """Scores = the latest real query's attention averaged over all query heads; one kept set for the layer."""

    def absorb(self, store, probs: torch.Tensor, qpos: torch.Tensor) -> None:
        # probs [B, Hkv, g, t, n]; take each row's last real query (left padding: the last query of a chunk is real
        # unless the whole chunk is padding, in which case the scores stay as they were)
        B, Hkv, g, t, n = probs.shape
        real = qpos >= 0  # [B, t]
        last = (t - 1) - real.flip(1).long().argmax(dim=1)  # [B]
        row = probs.gather(3, last.view(B, 1, 1, 1, 1).expand(B, Hkv, g, 1, n)).mean(dim=(1, 2, 3))  # [B, n]
        has = real.any(dim=1)[:, None, None]
        self.scores = torch.where(has, row[:, None, :].expand(B, Hkv, n), self.scores)

    def select(self, store, m: int) -> torch.Tensor:
        B, Hkv = store.pos.shape[:2]
        idx = top_slots(self.scores[:, :1], store.pos[:, :1], m)  # the same set for every head of the layer
        return idx.expand(B, Hkv, m)


@METHODS.register("tova")
@dataclass
class TOVA(EvictionMethod):
    name: str = "tova"

    def build_policy(self, layer_idx: int, budget: int, reserved: int, arch: ArchInfo) -> LastQueryPolicy:
        return LastQueryPolicy(budget)
