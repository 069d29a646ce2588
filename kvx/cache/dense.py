"""Storage layers. A store holds one transformer layer's kept tokens and answers attention over them.

Every store keeps, per stored slot, the token index `pos` ([B, Hkv, n], int32; -1 marks padding) and the rotary
position its key was rotated with `rpos` (the position in use: equal to `pos` minus the cache's rotary offset when
the slot was appended, and rewritten whenever a method re-indexes positions). Policies read `n`, `pos`, `keys()`
and call `keep(idx)` (or `move_slots(dst, src, m)` where `slot_moves`); the engine's attention function calls `attend` and
`append`.

DenseStore holds its slots in preallocated buffers, written in place: appending writes after the last slot, and
eviction either gathers the kept slots in order (`keep`) or, with `move_slots`, copies the few kept slots from the end of
the store into the slots just freed (so decoding with a full store moves one slot per step, not the whole cache).
A policy tells the store its budget with `reserve(capacity)`: the buffers then hold exactly `capacity` slots between
steps, and `nbytes()` counts the allocated capacity, so the bytes measured are the bytes the method promises.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from kvx.kernels import reference, use_triton


def _nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def expand_index(idx: torch.Tensor, like: torch.Tensor, dim: int) -> torch.Tensor:
    """idx [B, H, m] along slot dimension `dim` of `like` ([B, H, ..., n, ...]) -> an index for gather/scatter."""
    shape = list(like.shape)
    shape[dim] = idx.shape[-1]
    view = [idx.shape[0], idx.shape[1]] + [1] * (like.dim() - 2)
    view[dim] = idx.shape[-1]
    return idx.view(view).expand(shape)


def swap_moves(drop: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Slot moves that remove `drop` [B, H, k] (distinct slots of n) and keep the rest in slots 0 .. n-k-1.

    Each dropped slot below n - k receives one kept slot from the tail (slots n-k .. n-1); the other pairs move a
    dropped tail slot onto a dropped tail slot, which changes nothing that is kept. Returns (dst, src) [B, H, k]:
    apply as `x.scatter_(d, dst, x.gather(d, src))`. Fixed shapes, no host synchronisation."""
    k = drop.shape[-1]
    m = n - k
    if k == 1:
        return drop, torch.full_like(drop, n - 1)
    dst = drop.sort(dim=-1).values
    tail_dropped = torch.zeros(*drop.shape[:2], n, dtype=torch.bool, device=drop.device)
    tail_dropped.scatter_(2, drop, True)
    order = tail_dropped[..., m:].to(torch.int8).argsort(dim=-1, stable=True)  # kept tail slots first
    return dst, order + m


class SlotBuffer:
    """A tensor with a slot dimension `dim`, preallocated to a capacity and filled in place; `view` is its first n
    slots. `capacity` (when set) is the size it returns to once it holds no more; without one it holds exactly its
    slots (each growth reallocates, as a concatenation would), so the allocated bytes are the bytes held."""

    def __init__(self, dim: int = 2, capacity: int | None = None):
        self.dim = dim
        self.capacity = capacity
        self.buf: torch.Tensor | None = None
        self.n = 0
        self.view: torch.Tensor | None = None

    def _set_n(self, n: int) -> None:
        self.n = n
        self.view = self.buf.narrow(self.dim, 0, n)

    def _realloc(self, cap: int) -> None:
        shape = list(self.buf.shape)
        shape[self.dim] = cap
        new = self.buf.new_empty(shape)
        if self.n:
            new.narrow(self.dim, 0, self.n).copy_(self.view)
        self.buf = new
        self._set_n(self.n)

    def ensure(self, need: int, exact: bool = False) -> None:
        """Room for `need` slots: the capacity, or exactly `need` beyond it (a chunk longer than the budget)."""
        have = self.buf.shape[self.dim]
        if need > have:
            self._realloc(max(need, self.capacity or 0))

    def settle(self) -> None:
        """Back to the capacity (exactly the slots held, without one) once the slots fit."""
        if self.buf is not None:
            target = self.n if self.capacity is None else self.capacity
            if self.n <= target < self.buf.shape[self.dim]:
                self._realloc(target)

    def append(self, x: torch.Tensor) -> None:
        t = x.shape[self.dim]
        if self.buf is None:
            shape = list(x.shape)
            shape[self.dim] = max(t, self.capacity or 0)
            self.buf = x.new_empty(shape)
            self.n = 0
        else:
            self.ensure(self.n + t)
        self.buf.narrow(self.dim, self.n, t).copy_(x)
        self._set_n(self.n + t)

    def extend(self, B: int, H: int, t: int, fill: float, dtype, device) -> None:
        """Append t slots of a constant (a [B, H, t] buffer; written in place)."""
        if self.buf is None:
            self.buf = torch.empty(B, H, max(t, self.capacity or 0), dtype=dtype, device=device)
            self.n = 0
        else:
            self.ensure(self.n + t)
        self.buf.narrow(self.dim, self.n, t).fill_(fill)
        self._set_n(self.n + t)

    def adopt(self, x: torch.Tensor) -> None:
        """Hold x's slots (a tensor set from outside the store)."""
        if self.buf is not None and self.view is not None and x.shape == self.view.shape:
            if x is not self.view:
                self.view.copy_(x)
            return
        self.buf, self.n = None, 0
        self.append(x)

    def _flat(self, idx: torch.Tensor) -> torch.Tensor | None:
        """Row indices into the buffer seen as [B * H * capacity, D] for slots idx [B, H, m] (slot dimension 2 of a
        contiguous [B, H, capacity, D] buffer; None otherwise): whole rows are copied, faster than a gather."""
        b = self.buf
        if self.dim != 2 or b.dim() < 4 or not b.is_contiguous():  # rows of one element: gather is as good
            return None
        B, H, cap = b.shape[:3]
        base = torch.arange(0, B * H * cap, cap, device=idx.device).view(B, H, 1)
        return (idx + base).reshape(-1)

    def keep(self, idx: torch.Tensor) -> None:
        """Keep slots idx [B, H, m], in that order."""
        m = idx.shape[-1]
        rows = self._flat(idx)
        if rows is not None:
            b = self.buf
            kept = b.view(-1, *b.shape[3:]).index_select(0, rows).view(*b.shape[:2], m, *b.shape[3:])
        else:
            kept = self.view.gather(self.dim, expand_index(idx, self.view, self.dim))
        self.buf.narrow(self.dim, 0, m).copy_(kept)
        self._set_n(m)
        self.settle()

    def move(self, dst: torch.Tensor, src: torch.Tensor, m: int) -> None:
        """Apply slot moves (from `swap_moves`) and keep the first m slots."""
        rows_dst = self._flat(dst)
        if rows_dst is not None:
            flat = self.buf.view(-1, *self.buf.shape[3:])
            flat.index_copy_(0, rows_dst, flat.index_select(0, self._flat(src)))
        else:
            b = self.view
            b.scatter_(self.dim, expand_index(dst, b, self.dim), b.gather(self.dim, expand_index(src, b, self.dim)))
        self._set_n(m)
        self.settle()

    def allocated(self) -> int:
        return 0 if self.buf is None else self.buf.numel() * self.buf.element_size()


class Store(ABC):
    """What every storage layer offers policies: `n`, `pos`, `keys()`, `keep(idx)` and the bytes it holds.

    Stores that hold tensors for stream mode (DenseStore and those built on it) add `attend` and `append`; the
    masked-mode IndexStore holds indices instead and is filled with `append_index`. Stores with `slot_moves` also
    take `move(dst, src, m)` (eviction by moving kept slots into freed ones; slot order is then not token order)."""

    pos: torch.Tensor | None
    slot_moves: bool = False  # takes move_slots(dst, src, m)
    probs_blocks: bool = False  # attend takes probs_fn (probabilities handed over block by block)

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


def _attend(q, k, v, pos, qpos, scaling, return_probs, probs_fn, all_real: bool, n_stored: int, sums_fn=None):
    """Attention of q [B, Hq, t, D] over k, v [B, Hkv, n, D] (stored + new; the new tokens are the last t slots),
    through the Triton decode kernel where selected. all_real: no stored slot is padding. With `sums_fn`, a decoding
    step through the kernel hands over the attention summed over each KV head's query heads, [B, Hkv, n], which the
    kernel computes beside the output (fused score accumulation), instead of the probabilities."""
    t = q.shape[2]
    plain = not return_probs and probs_fn is None
    if t == 1 and (plain or (sums_fn is not None and not return_probs)) and use_triton(q.device):
        from kvx.kernels.decode import decode_attention

        out, sums = decode_attention(q[:, :, 0], k, v, None, scaling, kpos=pos, qpos=qpos[:, 0],
                                     return_scores=not plain)
        if sums is not None:
            sums_fn(sums)
        return out[:, :, None], None
    if t == 1 and plain and all_real:
        # one query and no padding slot: stored tokens all precede it, so it may read every slot
        # (attention without a mask is the same computation, without building one)
        return reference.attention(q, k, v, None, None, scaling)
    if plain and n_stored == 0 and bool((qpos >= 0).all()):
        # a first chunk without padding: plain causal attention (no mask is built)
        return reference.attention(q, k, v, None, None, scaling, causal=True)
    return reference.attention(q, k, v, pos, qpos, scaling, return_probs=return_probs, probs_fn=probs_fn)


class TensorStore(Store):
    """A store whose kept keys and values are the tensors k, v [B, Hkv, n, D] (with pos, rpos [B, Hkv, n])."""

    k: torch.Tensor | None
    v: torch.Tensor | None
    rpos: torch.Tensor | None

    @property
    def n(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def keys(self) -> torch.Tensor:
        return self.k

    def values(self) -> torch.Tensor:
        return self.v

    def _gather(self, idx: torch.Tensor | None) -> dict | None:
        return gather_tokens(self, idx)


class ConcatStore(TensorStore):
    """Full-precision keys and values held as plain tensors that each change replaces (k, v [B, Hkv, n, D]).

    The base of stores that manage their own layout (QuantizedStore's full-precision residual window)."""

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.pos: torch.Tensor | None = None
        self.rpos: torch.Tensor | None = None

    def _cat(self, k_new, v_new, pos_new):
        if self.k is None:
            return k_new, v_new, pos_new
        return (
            torch.cat([self.k, k_new], dim=2),
            torch.cat([self.v, v_new], dim=2),
            torch.cat([self.pos, pos_new.to(self.pos.dtype)], dim=2),
        )

    def attend(self, q, k_new, v_new, pos_new, qpos, scaling, return_probs=False, probs_fn=None):
        """Attention of the new queries over stored + new tokens. Returns out [B, Hq, t, D], probs or None."""
        k, v, pos = self._cat(k_new, v_new, pos_new)
        return _attend(q, k, v, pos, qpos, scaling, return_probs, probs_fn, all_real=False, n_stored=self.n)

    def append(self, k_new, v_new, pos_new, rpos_new=None) -> None:
        pos_new = pos_new.to(torch.int32)
        rpos_new = pos_new if rpos_new is None else rpos_new.to(torch.int32)
        if self.k is None:
            self.k, self.v, self.pos, self.rpos = k_new, v_new, pos_new, rpos_new.clone()
        else:
            self.k, self.v, self.pos = self._cat(k_new, v_new, pos_new)
            self.rpos = torch.cat([self.rpos, rpos_new], dim=2)

    def keep(self, idx: torch.Tensor) -> dict:
        """Keep slots idx [B, Hkv, m] (any order; stored in increasing slot order). Returns the evicted tokens."""
        idx = idx.sort(dim=-1).values
        evicted = self._gather(dropped_slots(idx, self.n))
        kept = self._gather(idx)
        self.k, self.v, self.pos, self.rpos = kept["k"], kept["v"], kept["pos"], kept["rpos"]
        return evicted


    def nbytes(self) -> int:
        return _nbytes(self.k, self.v)


def gather_tokens(store, idx: torch.Tensor | None) -> dict | None:
    """The tokens ({k, v, pos, rpos}) a store holds in slots idx [B, Hkv, m]; None for no index."""
    if idx is None:
        return None
    ie = idx[..., None].expand(*idx.shape, store.k.shape[-1])
    return {"k": store.k.gather(2, ie), "v": store.v.gather(2, ie), "pos": store.pos.gather(2, idx),
            "rpos": store.rpos.gather(2, idx)}


def dropped_slots(idx: torch.Tensor, n: int) -> torch.Tensor | None:
    """The slots [B, H, n - m] (increasing) not in idx [B, H, m]; None if none."""
    m_drop = n - idx.shape[-1]
    if m_drop <= 0:
        return None
    drop_mask = torch.ones(*idx.shape[:2], n, dtype=torch.bool, device=idx.device)
    drop_mask.scatter_(2, idx, False)
    return drop_mask.nonzero(as_tuple=False)[:, 2].view(*idx.shape[:2], m_drop)


class DenseStore(TensorStore):
    """Full-precision keys and values of the kept tokens in preallocated buffers: k, v [B, Hkv, n, D] are views.

    `k`, `v`, `pos` and `rpos` may be replaced from outside (a re-rotation sets new keys): the store notices and
    takes the new tensors in at its next change."""

    slot_moves = True
    probs_blocks = True
    stages_new = True  # attend writes the new tokens into the buffers (nbytes() then counts them)

    def __init__(self, capacity: int | None = None) -> None:
        self._f = {name: SlotBuffer(2, capacity) for name in ("k", "v", "pos", "rpos")}
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.pos: torch.Tensor | None = None
        self.rpos: torch.Tensor | None = None
        self._all_real = True  # no padding slot held (decode may skip the position mask)
        self._staged = None

    # buffers -----------------------------------------------------------------------------------------------------
    def reserve(self, capacity: int) -> None:
        """Hold `capacity` slots between steps (a policy's budget, or the sequence length of a full cache)."""
        for f in self._f.values():
            f.capacity = int(capacity)
            if f.buf is not None:
                f.ensure(capacity)
                f.settle()
        self._publish()

    @property
    def capacity(self) -> int | None:
        return self._f["k"].capacity

    def _sync(self) -> None:
        """Take in tensors assigned from outside since the last change."""
        for name, f in self._f.items():
            cur = getattr(self, name)
            if cur is not f.view and cur is not None:
                f.adopt(cur)

    def _publish(self) -> None:
        for name, f in self._f.items():
            setattr(self, name, f.view)

    # attention -----------------------------------------------------------------------------------------------------
    def attend(self, q, k_new, v_new, pos_new, qpos, scaling, return_probs=False, probs_fn=None, sums_fn=None):
        """Attention of the new queries over stored + new tokens. Returns out [B, Hq, t, D], probs or None.

        The new tokens are written into the buffers here (the `append` that follows only counts them), so the
        attention reads one contiguous view and nothing is concatenated. `probs_fn(probs_block [B, Hq, tb, n + t],
        row0)` receives the probabilities block by block of queries when given (never [B, Hq, t, n + t] at once);
        `sums_fn` (with it) takes the per-KV-head sums instead where the Triton decode kernel computes them."""
        self._sync()
        n, t = self.n, k_new.shape[2]
        pos32 = pos_new.to(torch.int32)
        for name, x in (("k", k_new), ("v", v_new), ("pos", pos32), ("rpos", pos32)):
            self._f[name].append(x)
            self._f[name]._set_n(n)  # staged: counted by the `append` that follows
        self._publish()
        self._staged = k_new
        k, v, pos = (self._f[x].buf.narrow(2, 0, n + t) for x in ("k", "v", "pos"))
        k = self.attention_keys(k, n)
        return _attend(q, k, v, pos, qpos, scaling, return_probs, probs_fn, all_real=self._all_real, n_stored=n,
                       sums_fn=sums_fn)

    def attention_keys(self, k: torch.Tensor, n: int) -> torch.Tensor:
        """The keys attention reads, from k [B, Hkv, n + t, D] (n stored, then the new ones): k itself here; a store
        that keeps keys apart from their positions in use (kvx.cache.rotated.MovableStore) moves them here."""
        return k

    def append(self, k_new, v_new, pos_new, rpos_new=None) -> None:
        staged = getattr(self, "_staged", None)
        self._staged = None
        t = k_new.shape[2]
        if staged is k_new and all(getattr(self, x) is f.view for x, f in self._f.items()):
            for f in self._f.values():
                f._set_n(f.n + t)
        else:
            self._sync()
            pos32 = pos_new.to(torch.int32)
            for name, x in (("k", k_new), ("v", v_new), ("pos", pos32), ("rpos", pos32)):
                self._f[name].append(x)
        if rpos_new is not None:
            self._f["rpos"].view.narrow(2, self._f["rpos"].n - t, t).copy_(rpos_new)
        if self._all_real and pos_new.device.type == "cpu":
            self._all_real = bool((pos_new >= 0).all())
        elif pos_new.device.type != "cpu":
            self._all_real = False
        self._publish()

    # eviction ------------------------------------------------------------------------------------------------------
    def keep(self, idx: torch.Tensor) -> dict | None:
        """Keep slots idx [B, Hkv, m] (any order; stored in increasing slot order). Returns the evicted tokens."""
        self._sync()
        idx = idx.sort(dim=-1).values
        evicted = self._gather(dropped_slots(idx, self.n))
        for f in self._f.values():
            f.keep(idx)
        self._publish()
        return evicted

    def move_slots(self, dst: torch.Tensor, src: torch.Tensor, m: int, drop: torch.Tensor | None = None) -> None:
        """Evict by slot moves (see `swap_moves`), keeping m slots; O(moved slots), not O(n). `drop` (the slots
        evicted) is for stores that keep what is evicted."""
        self._sync()
        for f in self._f.values():
            f.move(dst, src, m)
        self._publish()


    def gather_slots(self, idx: torch.Tensor) -> dict:
        """The tokens ({k, v, pos, rpos}) in slots idx [B, Hkv, m]."""
        self._sync()
        return self._gather(idx)

    def nbytes(self) -> int:
        """Bytes of the key/value buffers as allocated (the capacity: the budget between steps)."""
        return self._f["k"].allocated() + self._f["v"].allocated()

    def aux_nbytes(self) -> int:
        return self._f["pos"].allocated() + self._f["rpos"].allocated()


class IndexStore(Store):
    """Masked-mode stand-in for a store: holds indices into one window's tokens instead of tensors.

    Policies run against it unchanged, so `masked` and `stream` evaluation share every line of policy code; it
    takes the same slot moves as DenseStore, so both keep their slots in the same order."""

    slot_moves = True

    def __init__(self, k_window: torch.Tensor, pos_window: torch.Tensor, bytes_per_token: int,
                 capacity: int | None = None) -> None:
        # k_window: [B, Hkv, T, D]; pos_window: [B, T]
        self.k_window = k_window
        self.pos_window = pos_window.to(torch.int32)
        B, H = k_window.shape[:2]
        self._idx = SlotBuffer(2, capacity)
        self._pos = SlotBuffer(2, capacity)
        self._idx.append(torch.zeros(B, H, 0, dtype=torch.long, device=k_window.device))
        self._pos.append(torch.zeros(B, H, 0, dtype=torch.int32, device=k_window.device))
        self.bytes_per_token = bytes_per_token
        self._all_real = True  # no slot marked unused by a policy (see kvx/methods/adakv.py mark_unused)
        self._publish()

    def _publish(self) -> None:
        self.idx = self._idx.view
        self.pos = self._pos.view
        self.rpos = self.pos

    def _sync(self) -> None:
        """Take in `pos` set from outside (a policy marking slots unused)."""
        if self.pos is not self._pos.view:
            self._pos.adopt(self.pos)

    def reserve(self, capacity: int) -> None:
        self._sync()
        for f in (self._idx, self._pos):
            f.capacity = int(capacity)
            f.ensure(capacity)
        self._publish()

    @property
    def n(self) -> int:
        return self._idx.n

    def keys(self) -> torch.Tensor:
        D = self.k_window.shape[-1]
        return self.k_window.gather(2, self.idx[..., None].expand(*self.idx.shape, D))

    def append_index(self, i0: int, t: int) -> None:
        self._sync()
        B, H = self.idx.shape[:2]
        new = torch.arange(i0, i0 + t, device=self.idx.device).expand(B, H, t)
        self._idx.append(new)
        self._pos.append(self.pos_window[:, None, i0 : i0 + t].expand(B, H, t))
        self._publish()

    def keep(self, idx: torch.Tensor) -> None:
        self._sync()
        idx = idx.sort(dim=-1).values
        self._idx.keep(idx)
        self._pos.keep(idx)
        self._publish()
        return None

    def move_slots(self, dst: torch.Tensor, src: torch.Tensor, m: int, drop: torch.Tensor | None = None) -> None:
        self._sync()
        self._idx.move(dst, src, m)
        self._pos.move(dst, src, m)
        self._publish()

    def nbytes(self) -> int:
        return self.n * self.idx.shape[0] * self.idx.shape[1] * self.bytes_per_token
