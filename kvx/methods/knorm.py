"""`knorm`: keep the keys of lowest L2 norm.

Devoto et al., 2024, "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression" (EMNLP 2024), as
kvpress's KnormPress scores it: a cached token's score is minus the L2 norm of its key (after RoPE), so when the
cache is full each KV head keeps the `budget` tokens whose keys have the smallest norms. No attention is needed
(`needs_probs` is False) and no score is stored: norms are read from the kept keys when the policy selects.

Ties. RoPE preserves norms, so repeated tokens have keys of equal norm in the first layer, and rounding (a chunked
forward against one parallel forward) would break such ties at random. Norms are therefore compared at half
precision (a relative grid of 2^-11) and equal ones go to the newer token, so that stream and masked mode keep the
same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvx.methods.base import ArchInfo
from kvx.methods.common import BudgetPolicy, EvictionMethod, slot_priority
from kvx.registry import METHODS


class KeyNormPolicy(BudgetPolicy):
    """Scores = -||k||_2 of each stored key, per KV head."""

    def on_append(self, store, t: int) -> None:  # nothing to accumulate
        pass

    def on_keep(self, store, idx) -> None:
        pass

    def priority(self, store, m: int) -> torch.Tensor:
        norm = store.keys().float().norm(dim=-1).half().double()  # [B, Hkv, n], on a grid coarser than rounding
        return slot_priority(-norm + store.pos.double() * 1e-12, store.pos)  # equal norms: the newer token first


@METHODS.register("knorm")
@dataclass
class Knorm(EvictionMethod):
    name: str = "knorm"

    def build_policy(self, layer_idx: int, budget: int, reserved: int, arch: ArchInfo) -> KeyNormPolicy:
        return KeyNormPolicy(budget)
