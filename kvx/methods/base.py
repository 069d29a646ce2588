"""The method interface: a method chooses each layer's storage and the policy that decides what it keeps.

A method is a dataclass (its fields are the YAML fields of configs/method/<name>.yaml) registered by name.
Most eviction methods only write a policy with a `score`; see kvx/methods/streaming_llm.py for the smallest one.

Policy life cycle for one forward of t new tokens through one layer (stream mode):
    before_attend(store, t)      may evict (lazy eviction: make room so that attention reads at most `budget`)
    store.attend(...)            attention over stored + new tokens (probabilities only if `needs_probs`)
    observe(store, q, probs)     accumulate scores; probs [B, Hq, t, n + t] (stored slots, then new tokens)
    store.append(...)            the new tokens enter the store; the policy's slot scores grow with `on_append`
and after the whole forward, once the engine knows the new tokens' losses:
    observe_token_nll(store, nll) only if `needs_token_nll`; nll [B, t] of the tokens just appended
    end_step(store)              may evict (after a prefill chunk longer than the budget)
In masked mode the same calls run against an IndexStore, one token at a time, inside one parallel forward.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from kvx.cache.dense import DenseStore, SlotBuffer, Store, swap_moves
from kvx.errors import AMBIGUOUS_ONE, ConfigError, warn_once


@dataclass(frozen=True)
class ArchInfo:
    """What the engine knows of a model's attention."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    max_positions: int
    dtype_bytes: int = 4
    model_id: str = ""  # the model's name or path as loaded (lets trained per-model artifacts check their model)
    windows: tuple = ()  # per layer: the sliding window in tokens, or None for a global layer (kvx/cache/sliding.py)
    softcap: float | None = None  # attention-logit softcapping (Gemma 2): tanh(s / c) * c before the softmax

    @property
    def group(self) -> int:
        return self.n_heads // self.n_kv_heads


def resolve_tokens(value: int | float, field: str, seq_len: int | None, max_positions: int | None = None) -> int:
    """An int is tokens; a float in (0, 1) is a fraction of the sequence length (rounded down, at least 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(field, f"must be an int (tokens) or a float in (0, 1) (fraction), got {value!r}")
    if isinstance(value, float) and value == 1.0:
        raise ConfigError(field, AMBIGUOUS_ONE)
    if isinstance(value, float) and not value.is_integer():
        if not 0.0 < value < 1.0:
            raise ConfigError(field, f"a fraction must lie in (0, 1), got {value}")
        ref = seq_len if seq_len is not None else max_positions
        if ref is None:
            raise ConfigError(field, "a fractional budget needs the sequence length")
        return max(1, int(value * ref))
    value = int(value)
    if value <= 0:
        raise ConfigError(field, f"must be > 0, got {value}")
    if seq_len is not None and value >= seq_len:
        warn_once(f"{field}={value} is at or above the sequence length ({seq_len}): nothing is evicted")
    return value


class LayerPolicy:
    """Per-layer, per-sequence-batch policy state. The default keeps everything."""

    needs_probs: ClassVar[bool] = False

    def before_attend(self, store: Store, t: int) -> None:
        pass

    def observe(self, store: Store, q: torch.Tensor, probs: torch.Tensor | None) -> None:
        pass

    def on_append(self, store: Store, t: int) -> None:
        pass

    def observe_token_nll(self, store: Store, nll: torch.Tensor) -> None:
        pass

    def end_step(self, store: Store) -> None:
        pass


class ScoredPolicy(LayerPolicy, ABC):
    """A policy that keeps a score per stored slot and evicts to a budget.

    Subclasses implement `select(store, m) -> idx [B, Hkv, m]` (the slots to keep); a policy that ranks slots by a
    score derives from `RankedPolicy` and implements `priority` instead. Lazy eviction: before
    t < budget new tokens are attended, the store is cut to budget - t so that no query reads more than `budget`
    tokens (its own included) and the store never holds more than `budget` between steps. A prefill chunk longer than
    the budget is attended in full and the store is cut to `budget` at the end of the step.

    Eviction keeps the top `m` slots in token order (`keep`), or, with `moves` (stores with `slot_moves`), drops the
    lowest-priority slots and moves the kept slots at the end of the store into the holes
    (`kvx.cache.dense.swap_moves`), so a decoding step moves one slot, whatever the budget; per-slot arrays (scores)
    take the same moves in `on_move`. Slot order is then not token order: policies that need token order
    (`ordered = True`) always evict with `keep`. The store and the score buffer are preallocated to the budget
    (`reserve`).
    """

    ordered: ClassVar[bool] = False  # needs slots in token order: never evicts by slot moves
    moves: bool = False  # evict by slot moves where the store takes them (method field `evict_by: move`)

    def __init__(self, budget: int):
        self.budget = budget
        self._scores = SlotBuffer(2, budget)  # [B, Hkv, n] float32, aligned with the store's slots
        self._reserved = False

    @property
    def scores(self) -> torch.Tensor | None:
        return self._scores.view

    @scores.setter
    def scores(self, value: torch.Tensor | None) -> None:
        if value is None:
            self._scores = SlotBuffer(2, self.budget)
        else:
            self._scores.adopt(value)

    def reserve(self, store: Store) -> None:
        """Size the store's buffers to the budget (once, before its first tokens)."""
        self._reserved = True
        reserve = getattr(store, "reserve", None)
        if reserve is not None:
            reserve(self.budget)

    def grow_scores(self, store: Store, t: int, fill: float = 0.0, heads: tuple | None = None) -> None:
        """Slots for t new tokens (`heads`: (B, Hkv, device) when the store holds nothing yet)."""
        B, H, dev = heads if heads is not None else (*store.pos.shape[:2], store.pos.device)
        self._scores.extend(B, H, t, fill, dtype=torch.float32, device=dev)

    def on_append(self, store: Store, t: int) -> None:
        self.grow_scores(store, t)

    @abstractmethod
    def select(self, store: Store, m: int) -> torch.Tensor:
        """Indices [B, Hkv, m] of the slots to keep."""

    def select_drop(self, store: Store, k: int) -> torch.Tensor:
        """Indices [B, Hkv, k] of the slots to drop: those `select` does not keep (ascending)."""
        n = store.n
        kept = torch.zeros(*store.pos.shape[:2], n, dtype=torch.bool, device=store.pos.device)
        kept.scatter_(-1, self.select(store, n - k), True)
        order = torch.arange(n, device=kept.device).expand(kept.shape)
        return torch.where(kept, n, order).sort(dim=-1).values[..., :k]

    def evict_to(self, store: Store, m: int) -> None:
        n = store.n
        if n <= m:
            return
        if not self.moves or self.ordered or not store.slot_moves:
            idx = self.select(store, m).sort(dim=-1).values
            self.on_keep(store, idx)
            store.keep(idx)
            return
        drop = self.select_drop(store, n - m)
        dst, src = swap_moves(drop, n)
        self.on_move(store, dst, src, m)
        store.move_slots(dst, src, m, drop)

    def on_keep(self, store: Store, idx: torch.Tensor) -> None:
        if self._scores.buf is not None:
            self._scores.keep(idx)

    def on_move(self, store: Store, dst: torch.Tensor, src: torch.Tensor, m: int) -> None:
        if self._scores.buf is not None:
            self._scores.move(dst, src, m)

    def before_attend(self, store: Store, t: int) -> None:
        if not self._reserved:
            self.reserve(store)
        if t < self.budget and store.n + t > self.budget:
            self.evict_to(store, self.budget - t)

    def end_step(self, store: Store) -> None:
        if store.n > self.budget:
            self.evict_to(store, self.budget)


class RankedPolicy(ScoredPolicy):
    """A ScoredPolicy that ranks slots: `priority(store, m) -> [B, Hkv, n]` (float64; the m highest are kept, ties
    broken as torch.topk breaks them). A ranking can be shared between heads (AdaKV's allocation)."""

    @abstractmethod
    def priority(self, store: Store, m: int) -> torch.Tensor:
        """[B, Hkv, n] float64 keep priority of every slot."""

    def select(self, store: Store, m: int) -> torch.Tensor:
        return self.priority(store, m).topk(m, dim=-1).indices

    def select_drop(self, store: Store, k: int) -> torch.Tensor:
        p = self.priority(store, store.n - k)
        if k == 1:
            return p.argmin(dim=-1, keepdim=True)
        return p.topk(k, dim=-1, largest=False).indices


def recency_rank(pos: torch.Tensor) -> torch.Tensor:
    """Rank of each slot by recency: 0 for the most recent real token; padding ranks last."""
    key = torch.where(pos >= 0, pos, torch.iinfo(pos.dtype).min).to(torch.int64)
    order = key.argsort(dim=-1, descending=True, stable=True)
    return order.argsort(dim=-1)


def most_recent(pos: torch.Tensor, r: int) -> torch.Tensor:
    """[B, Hkv, n] True on the r most recent real slots (token indices are distinct within a head)."""
    if r <= 0:
        return torch.zeros(pos.shape, dtype=torch.bool, device=pos.device)
    r = min(r, pos.shape[-1])
    thr = pos.topk(r, dim=-1).values[..., -1:]
    return (pos >= thr) & (pos >= 0)


def select_top(scores: torch.Tensor, pos: torch.Tensor, m: int, forced: torch.Tensor | None = None) -> torch.Tensor:
    """Indices [B, Hkv, m] of the m best slots: forced slots first, then the highest scores; padding last."""
    s = scores.float().clone()
    s = torch.where(pos >= 0, s, torch.finfo(torch.float32).min / 4)
    if forced is not None:
        s = torch.where(forced, torch.finfo(torch.float32).max / 4, s)
    return s.topk(m, dim=-1).indices


@dataclass
class Method:
    """Base of every method. Fields shared by all: `name`; compressing methods add `budget`."""

    name: str = "full"

    compresses: ClassVar[bool] = False  # whether the method ever drops or approximates anything
    has_mask_form: ClassVar[bool] = True  # whether task.mode=masked is defined for it
    needs_token_nll: ClassVar[bool] = False  # whether the engine must report each token's loss

    def validate(self) -> None:
        """Check the fields; raise ConfigError naming the field. Called before any model loads."""

    def check_arch(self, arch: ArchInfo) -> None:
        """Check fields against the model (e.g. a schedule needs the layer count)."""

    def make_store(self, layer_idx: int, arch: ArchInfo) -> Store:
        return DenseStore()

    def make_policy(self, layer_idx: int, arch: ArchInfo, seq_len: int | None) -> LayerPolicy | None:
        return None

    # engine hooks (no-ops by default; InfiniPot's pot uses them) -----------------------------------------------
    def bind(self, engine) -> None:
        """Called once by the engine that drives this method (its model and tokenizer are known then)."""

    def max_chunk(self, cache) -> int | None:
        """The most tokens the next forward through `cache` may carry (None: any); the engine splits longer inputs."""
        return None

    def before_forward(self, engine, cache, t: int) -> None:
        """Called by the engine before each forward of t tokens through `cache` (e.g. to distill a full pot)."""

    def describe(self) -> dict:
        return dataclasses.asdict(self)


class NestedMethod(ABC):
    """Mixin of a method built around another method configured in one of its fields (LESS's and AdaKV's `base`).

    The subclass says how to build the inner method (`build_inner`); the inner method, built once, decides the mask
    form, whether token losses are needed, the architecture check and the engine hooks. List it before `Method`."""

    @abstractmethod
    def build_inner(self) -> Method:
        """Build and validate the inner method from this method's field."""

    @property
    def inner(self) -> Method:
        if getattr(self, "_inner", None) is None:
            self._inner = self.build_inner()
        return self._inner

    def validate_inner(self) -> Method:
        """Build (again) and validate the inner method; errors name its field."""
        self._inner = self.build_inner()
        return self._inner

    @property
    def has_mask_form(self) -> bool:  # type: ignore[override]
        return self.inner.has_mask_form

    @property
    def needs_token_nll(self) -> bool:  # type: ignore[override]
        return self.inner.needs_token_nll

    def check_arch(self, arch: ArchInfo) -> None:
        self.inner.check_arch(arch)

    def make_policy(self, layer_idx: int, arch: ArchInfo, seq_len: int | None):
        return self.inner.make_policy(layer_idx, arch, seq_len)

    def bind(self, engine) -> None:
        self.inner.bind(engine)

    def max_chunk(self, cache) -> int | None:
        return self.inner.max_chunk(cache)

    def before_forward(self, engine, cache, t: int) -> None:
        self.inner.before_forward(engine, cache, t)
