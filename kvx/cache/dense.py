"""Storage layers. A store holds one transformer layer's kept tokens and answers attention over them.

Every store keeps, per stored slot, the token index `pos` ([B, Hkv, n], int32; -1 marks padding) and the rotary
position its key was rotated with `rpos` (equal to `pos` unless a method re-indexes positions). Policies read
`n`, `pos`, `keys()` and call `keep(idx)`; the engine's attention function calls `attend` and `append`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from kvx.kernels import reference, use_triton


def _nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class Store(ABC):
    """What every storage layer offers policies: `n`, `pos`, `keys()`, `keep(idx)` and the bytes it holds.

    Stores that hold tensors for stream mode (DenseStore and those built on it) add `attend` and `append`; the
    masked-mode IndexStore holds indices instead and is filled with `append_index`."""

    pos: torch.Tensor | None

    @property
    @abstractmethod
    def n(self) -> int:
        """Slots held per (sequence, KV head)."""

    @abstractmethod
    def keys(self) -> torch.Tensor:
        """The kept keys, [B, Hkv, n, D] (dequantized for quantized stores)."""

    @abstractmethod
    def keep(self, idx: torch.Tensor) -> dict | None:
        """Keep slots idx [B, Hkv, m]; return the evicted tokens ({k, v, pos, rpos}) where the store has them."""

    @abstractmethod
    def nbytes(self) -> int:
        """Bytes of the key/value payload actually held (codes, scales and state included, indices excluded)."""

    def aux_nbytes(self) -> int:
        """Bytes of bookkeeping held beside the payload (token indices)."""
        return _nbytes(getattr(self, "pos", None), getattr(self, "rpos", None))

    def state_nbytes(self) -> int:
        """Bytes held whatever the number of tokens (e.g. a low-rank state); included in nbytes()."""
        return 0

    def masked_attention(self, q, k, v, allowed, scaling, evicted=None):
        """Masked-mode twin: one parallel attention over a whole window with the policy's mask.

        q [B, Hq, T, D]; k, v [B, Hkv, T, D]; allowed/evicted [B, Hkv, 1, T, T] booleans."""
        out, _ = reference.attention(q, k, v, None, None, scaling, allowed=allowed)
        return out


class DenseStore(Store):
    """Full-precision keys and values of the kept tokens: k, v [B, Hkv, n, D]."""

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.pos: torch.Tensor | None = None
        self.rpos: torch.Tensor | None = None
        # decode fast paths (CPU): the `pos` tensor known to hold no padding slot, and attend's concatenation of
        # stored + new tokens, reused by the append that follows it (one copy of the cache per step instead of two)
        self._real_pos: torch.Tensor | None = None
        self._pending: tuple | None = None

    @property
    def n(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def keys(self) -> torch.Tensor:
        return self.k

    def values(self) -> torch.Tensor:
        return self.v

    def _cat(self, k_new, v_new, pos_new):
        if self.k is None:
            return k_new, v_new, pos_new
        return (
            torch.cat([self.k, k_new], dim=2),
            torch.cat([self.v, v_new], dim=2),
            torch.cat([self.pos, pos_new.to(self.pos.dtype)], dim=2),
        )

    def attend(self, q, k_new, v_new, pos_new, qpos, scaling, return_probs=False):
        """Attention of the new queries over stored + new tokens. Returns out [B, Hq, t, D], probs or None."""
        k, v, pos = self._cat(k_new, v_new, pos_new)
        if self.k is not None:
            self._pending = (self.k, self.v, self.pos, k_new, v_new, pos_new, k, v, pos)
        if q.shape[2] == 1 and not return_probs:
            if use_triton(q.device):
                from kvx.kernels.decode import decode_attention

                out, _ = decode_attention(q[:, :, 0], k, v, None, scaling, kpos=pos, qpos=qpos[:, 0])
                return out[:, :, None], None
            if self.pos is None or self._real_pos is self.pos:
                # one query and no padding slot: stored tokens all precede it, so it may read every slot
                # (attention without a mask is the same computation, without building one)
                return reference.attention(q, k, v, None, None, scaling)
        return reference.attention(q, k, v, pos, qpos, scaling, return_probs=return_probs)

    def append(self, k_new, v_new, pos_new) -> None:
        pending, self._pending = self._pending, None
        real = self.pos is None or self._real_pos is self.pos
        pos_in = pos_new
        pos_new = pos_new.to(torch.int32)
        if self.k is None:
            self.k, self.v, self.pos, self.rpos = k_new, v_new, pos_new, pos_new.clone()
        else:
            if pending is not None and all(a is b for a, b in zip(
                    pending[:6], (self.k, self.v, self.pos, k_new, v_new, pos_in))):
                self.k, self.v, self.pos = pending[6:]
            else:
                self.k, self.v, self.pos = self._cat(k_new, v_new, pos_new)
            self.rpos = torch.cat([self.rpos, pos_new], dim=2)
        real = real and pos_new.device.type == "cpu" and bool((pos_new >= 0).all())
        self._real_pos = self.pos if real else None

    def keep(self, idx: torch.Tensor) -> dict:
        """Keep slots idx [B, Hkv, m] (any order; stored in increasing slot order). Returns the evicted tokens."""
        idx = idx.sort(dim=-1).values
        n = self.n
        drop_mask = torch.ones(self.pos.shape, dtype=torch.bool, device=self.pos.device)
        drop_mask.scatter_(2, idx, False)
        m_drop = n - idx.shape[-1]
        evicted = None
        if m_drop > 0:
            drop_idx = drop_mask.nonzero(as_tuple=False)[:, 2].view(*self.pos.shape[:2], m_drop)
            evicted = self._gather(drop_idx)
        kept = self._gather(idx)
        real = self._real_pos is self.pos
        self.k, self.v, self.pos, self.rpos = kept["k"], kept["v"], kept["pos"], kept["rpos"]
        self._real_pos = self.pos if real else None
        self._pending = None
        return evicted

    def _gather(self, idx: torch.Tensor) -> dict:
        D = self.k.shape[-1]
        ie = idx[..., None].expand(*idx.shape, D)
        return {
            "k": self.k.gather(2, ie),
            "v": self.v.gather(2, ie),
            "pos": self.pos.gather(2, idx),
            "rpos": self.rpos.gather(2, idx),
        }

    def nbytes(self) -> int:
        return _nbytes(self.k, self.v)


class IndexStore(Store):
    """Masked-mode stand-in for a store: holds indices into one window's tokens instead of tensors.

    Policies run against it unchanged, so `masked` and `stream` evaluation share every line of policy code."""

    def __init__(self, k_window: torch.Tensor, pos_window: torch.Tensor, bytes_per_token: int) -> None:
        # k_window: [B, Hkv, T, D]; pos_window: [B, T]
        self.k_window = k_window
        self.pos_window = pos_window
        self.idx = torch.zeros(*k_window.shape[:2], 0, dtype=torch.long, device=k_window.device)
        self.bytes_per_token = bytes_per_token
        B, H = k_window.shape[:2]
        self.pos = torch.zeros(B, H, 0, dtype=torch.int32, device=k_window.device)
        self.rpos = self.pos

    @property
    def n(self) -> int:
        return self.idx.shape[-1]

    def keys(self) -> torch.Tensor:
        D = self.k_window.shape[-1]
        return self.k_window.gather(2, self.idx[..., None].expand(*self.idx.shape, D))

    def append_index(self, i0: int, t: int) -> None:
        B, H = self.idx.shape[:2]
        new = torch.arange(i0, i0 + t, device=self.idx.device).expand(B, H, t)
        self.idx = torch.cat([self.idx, new], dim=2)
        newpos = self.pos_window[:, None, i0 : i0 + t].expand(B, H, t).to(torch.int32)
        self.pos = torch.cat([self.pos, newpos], dim=2)
        self.rpos = self.pos

    def keep(self, idx: torch.Tensor) -> None:
        idx = idx.sort(dim=-1).values
        self.idx = self.idx.gather(2, idx)
        self.pos = self.pos.gather(2, idx)
        self.rpos = self.pos
        return None

    def nbytes(self) -> int:
        return self.n * self.idx.shape[0] * self.idx.shape[1] * self.bytes_per_token
