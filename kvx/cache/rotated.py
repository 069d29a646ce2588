"""A dense store whose keys move to new rotary positions without being rounded again at every move.

Methods that re-assign positions inside the cache (InfiniPot's CR-RoPE after every distillation) move kept keys by a
rotary delta each time. Re-rotating a stored fp16/bf16 key in place rounds it once per move, so the error grows
with the number of moves (about 3e-3 in fp16 and 4e-2 in bf16 after 200). `MovableStore` keeps each key as the model
rotated it and the total rotary distance `shift` from there to the position in use (`rpos`); attention and `keys()`
read the keys rotated by `shift` in fp32 and rounded once, so the error does not depend on how often they moved.
"""

from __future__ import annotations

import torch

from kvx.cache.dense import DenseStore, _nbytes
from kvx.rope import rerotate


class MovableStore(DenseStore):
    """DenseStore plus `shift` [B, Hkv, n] (int32): the rotary delta between a held key and its position in use.

    `k` holds the keys as the model produced them (never re-rotated); `move(delta)` only adds to `shift`."""

    slot_moves = False  # `shift` follows keep(), not slot moves

    def __init__(self, rotary_emb) -> None:
        super().__init__()
        self.rotary_emb = rotary_emb  # the model's rotary embedding module (kvx.rope.find_rotary_embedding)
        self.shift: torch.Tensor | None = None  # None: every key sits where the model put it

    def moved_keys(self) -> torch.Tensor | None:
        """The keys at their positions in use: k rotated by shift (fp32, one rounding to k's dtype)."""
        if self.k is None or self.shift is None or not bool(self.shift.any()):
            return self.k
        return rerotate(self.k, self.shift, self.rotary_emb)

    def keys(self) -> torch.Tensor:
        return self.moved_keys()

    def move(self, delta: torch.Tensor) -> None:
        """Move every slot's key by delta [B, Hkv, n] rotary positions (read lazily)."""
        delta = delta.to(torch.int32)
        self.shift = delta if self.shift is None else self.shift + delta

    def attention_keys(self, k: torch.Tensor, n: int) -> torch.Tensor:
        """Attention reads the moved keys (the n stored ones; the new ones sit where the model put them); the held
        keys stay untouched."""
        if self.shift is None or n == 0 or not bool(self.shift.any()):
            return k
        return torch.cat([rerotate(k[:, :, :n], self.shift, self.rotary_emb), k[:, :, n:]], dim=2)

    def append(self, k_new, v_new, pos_new) -> None:
        super().append(k_new, v_new, pos_new)
        if self.shift is not None:
            zeros = torch.zeros(pos_new.shape, dtype=torch.int32, device=self.shift.device)
            self.shift = torch.cat([self.shift, zeros], dim=2)

    def keep(self, idx: torch.Tensor) -> dict:
        """As DenseStore.keep; the evicted keys come back at their positions in use."""
        idx = idx.sort(dim=-1).values
        shift = self.shift
        if shift is not None and self.n > idx.shape[-1]:
            drop = torch.ones(shift.shape, dtype=torch.bool, device=shift.device).scatter_(2, idx, False)
            dropped = shift[drop].view(*shift.shape[:2], -1)
        evicted = super().keep(idx)
        if shift is not None:
            if evicted is not None:
                evicted["k"] = rerotate(evicted["k"], dropped, self.rotary_emb)
            self.shift = shift.gather(2, idx)
        return evicted

    def aux_nbytes(self) -> int:
        return super().aux_nbytes() + _nbytes(self.shift)
