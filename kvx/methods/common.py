"""What the eviction methods share: budgets, per-layer schedules and attention-scored policies.

Budgets. Every eviction method's `budget` is the number of tokens cached per KV head and layer, the current one
included: an int is tokens, a float below 1 a fraction of `budget_of` (`seq`: the sequence the cache is built for;
`max_positions`: the model's context, so "5% of Llama-2-7B's 4096" is `budget: 0.05, budget_of: max_positions`).

Schedules. `uniform` gives every layer the same budget. `pyramid` is PyramidKV's (Cai et al., 2024, "PyramidKV:
Dynamic KV Cache Compression based on Pyramidal Information Funneling"): the part of the budget a method selects
freely decreases linearly from the lowest to the highest layer, from `2·s − s/β` down to `s/β` (s: that part of the
uniform budget, β: `pyramid_beta`, 20 in PyramidKV), with the same total over the layers as the uniform schedule.
Windows a method always keeps (recent tokens, sinks, SnapKV's observation window) are the same in every layer.

Eviction (`evict_by`). `keep` (default) gathers the kept slots in token order into the store's buffers: O(budget)
per evicting step. `move` drops the lowest-priority slots and moves the kept slots at the end of the store into the
freed ones: O(evicted) per step (one slot per decoding step, whatever the budget). The kept sets are the same; slot
order then differs from token order, so attention sums in another order and logits differ in the last bits; methods
that need token order (SnapKV's pooling, StreamingLLM's in-cache positions) and stores that cannot move slots
(quantized) evict with keep whatever is asked.

GQA. Scores are kept per KV head and aggregated over the query heads of its group (never by repeating K/V), so a
KV head's selection serves all the query heads that read it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from kvx.cache.dense import Store
from kvx.errors import AMBIGUOUS_ONE, ConfigError, warn_once
from kvx.methods.base import ArchInfo, LayerPolicy, Method, RankedPolicy, ScoredPolicy, most_recent

SCHEDULES = ("uniform", "pyramid")
BUDGET_OF = ("seq", "max_positions")
EVICT_BY = ("keep", "move")


# amounts of tokens ---------------------------------------------------------------------------------------------------
def check_amount(value, field: str, allow_zero: bool = False) -> None:
    """An amount of tokens: an int (>= 1, or >= 0 with allow_zero) or a float fraction in (0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(field, f"must be an int (tokens) or a float in (0, 1) (a fraction), got {value!r}")
    if isinstance(value, float) and value == 1.0:
        raise ConfigError(field, AMBIGUOUS_ONE)
    if isinstance(value, float) and not value.is_integer():
        if not 0.0 < value < 1.0:
            raise ConfigError(field, f"a fraction must lie in (0, 1), got {value}")
        return
    lo = 0 if allow_zero else 1
    if int(value) < lo:
        raise ConfigError(field, f"must be >= {lo}, got {value}")


def resolve_amount(value, field: str, ref: int | None, allow_zero: bool = False) -> int | None:
    """Tokens of an amount: an int as is, a fraction of `ref` rounded down (at least 1). None if ref is unknown."""
    check_amount(value, field, allow_zero)
    if isinstance(value, float) and not value.is_integer():
        return None if ref is None else max(1, int(value * ref))
    return int(value)


def check_share(value, field: str) -> None:
    """A part of a budget: an int (tokens, >= 0) or a float share in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(field, f"must be an int (tokens) or a float in [0, 1] (a share of the budget), got {value!r}")
    if isinstance(value, float) and not 0.0 <= value <= 1.0:
        raise ConfigError(field, f"a share of the budget must lie in [0, 1], got {value}")
    if isinstance(value, int) and value < 0:
        raise ConfigError(field, f"must be >= 0, got {value}")


def resolve_share(value, field: str, total: int | None, budget_field: str = "method.budget") -> int | None:
    """Tokens of a part of a budget of `total` tokens: an int as is (at most total), a float share rounded down."""
    check_share(value, field)
    if isinstance(value, float):
        return None if total is None else int(value * total)
    if total is not None and value > total:
        raise ConfigError(field, f"{value} tokens is more than the budget of {total} tokens ({budget_field})")
    return int(value)


# schedules -----------------------------------------------------------------------------------------------------------
def largest_remainder(values: list[float], total: int) -> list[int]:
    """Round non-negative reals to ints that sum to `total` (Hamilton's method: floors, then the largest remainders)."""
    floors = [int(v) for v in values]
    rest = total - sum(floors)
    order = sorted(range(len(values)), key=lambda i: (-(values[i] - floors[i]), i))
    for i in order[: max(0, rest)]:
        floors[i] += 1
    return floors


def layer_budgets(total: int, n_layers: int, schedule: str = "uniform", reserved: int = 0,
                  beta: float = 20.0) -> list[int]:
    """Budget of each layer; they sum to n_layers * total. `reserved` tokens (windows) go to every layer alike."""
    if schedule not in SCHEDULES:
        raise ConfigError("method.schedule", f"unknown schedule {schedule!r}; allowed: {', '.join(SCHEDULES)}")
    if schedule == "uniform" or n_layers == 1:
        return [total] * n_layers
    free = total - reserved
    lo = free / beta
    hi = 2 * free - lo
    vals = [hi - (hi - lo) * i / (n_layers - 1) for i in range(n_layers)]
    ints = largest_remainder(vals, n_layers * free)
    if reserved == 0:  # every layer holds at least the current token
        for i in range(n_layers):
            while ints[i] < 1:
                j = max(range(n_layers), key=lambda x: ints[x])
                ints[j] -= 1
                ints[i] += 1
    return [reserved + x for x in ints]


# methods -------------------------------------------------------------------------------------------------------------
@dataclass
class EvictionMethod(Method, ABC):
    """Base of the eviction methods: a budget (per KV head and layer), what fractions refer to, a layer schedule.

    Subclasses write `build_policy(layer_idx, budget, reserved, arch)` and, when part of the budget is a fixed window,
    `reserved(total)` (validating their own fields there) and `check_fields()`.
    """

    name: str = "eviction"
    budget: int | float = 64  # tokens per KV head and layer, the current one included; float < 1: fraction
    budget_of: str = "seq"  # what a fractional budget is a fraction of: seq | max_positions
    schedule: str = "uniform"  # uniform | pyramid (PyramidKV)
    pyramid_beta: float = 20.0  # pyramid: the top layer selects 1/beta of the uniform share
    evict_by: str = "keep"  # keep: kept slots stay in token order | move: kept tail slots fill the freed ones

    compresses: ClassVar[bool] = True

    # configuration ---------------------------------------------------------------------------------------------------
    def validate(self) -> None:
        if self.budget_of not in BUDGET_OF:
            raise ConfigError("method.budget_of", f"must be one of {', '.join(BUDGET_OF)}, got {self.budget_of!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError("method.schedule", f"unknown schedule {self.schedule!r}; allowed: {', '.join(SCHEDULES)}")
        if self.evict_by not in EVICT_BY:
            raise ConfigError("method.evict_by", f"must be one of {', '.join(EVICT_BY)}, got {self.evict_by!r}")
        beta = self.pyramid_beta
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or beta < 1:
            raise ConfigError("method.pyramid_beta", f"must be a number >= 1, got {beta!r}")
        self.check_fields()
        self.layout(None)  # checks the parts of the budget against each other where no length is needed

    def check_fields(self) -> None:
        """Check the method's own fields (types and ranges)."""

    def reference_length(self, seq_len: int | None, arch: ArchInfo | None) -> int | None:
        """The length a fraction refers to (None when unknown yet)."""
        max_pos = None if arch is None else arch.max_positions
        if self.budget_of == "max_positions":
            return max_pos
        return seq_len if seq_len is not None else max_pos

    def total_budget(self, ref: int | None) -> int | None:
        return resolve_amount(self.budget, "method.budget", ref)

    def reserved(self, total: int | None) -> int | None:
        """Tokens of the budget every layer keeps as a fixed window (the schedule spreads only the rest)."""
        return 0

    def layout(self, ref: int | None) -> tuple[int | None, int | None]:
        """(total budget, reserved window) in tokens for a reference length; None where the length is needed."""
        total = self.total_budget(ref)
        reserved = self.reserved(total)
        if total is not None and reserved is not None and reserved > total:
            raise ConfigError("method.budget", f"the budget of {total} tokens is smaller than the {reserved} tokens "
                                               "the method always keeps")
        return total, reserved

    def layer_budget(self, layer_idx: int, arch: ArchInfo, seq_len: int | None) -> tuple[int, int]:
        """(budget, reserved window) of one layer, in tokens."""
        total, reserved = self.layout(self.reference_length(seq_len, arch))
        if total is None:  # a fraction with no length known: the model's context
            total, reserved = self.layout(arch.max_positions)
        budgets = layer_budgets(total, arch.n_layers, self.schedule, reserved, float(self.pyramid_beta))
        return budgets[layer_idx], reserved

    def make_policy(self, layer_idx: int, arch: ArchInfo, seq_len: int | None) -> LayerPolicy:
        budget, reserved = self.layer_budget(layer_idx, arch, seq_len)
        if seq_len is not None and budget >= seq_len:
            warn_once(f"method.budget={self.budget} keeps {budget} tokens per layer, at or above the sequence length "
                      f"({seq_len}): nothing is evicted")
            return WithinBudget(budget, seq_len, layer_idx)
        policy = self.build_policy(layer_idx, budget, reserved, arch)
        if self.evict_by == "move" and isinstance(policy, ScoredPolicy):
            policy.moves = True
        return policy

    @abstractmethod
    def build_policy(self, layer_idx: int, budget: int, reserved: int, arch: ArchInfo) -> LayerPolicy:
        """The policy of one layer, given its budget and the slots reserved beside it."""


class WithinBudget(LayerPolicy):
    """A layer whose budget covers the whole sequence: nothing is ever evicted, so no score is kept at all.

    Attention then runs exactly as with the full cache. Feeding more tokens than the cache was built for
    (`seq_len`) is an error rather than a silent switch to a policy without scores."""

    def __init__(self, budget: int, seq_len: int, layer_idx: int):
        self.budget = budget
        self.seq_len = seq_len
        self.layer_idx = layer_idx

    def before_attend(self, store: Store, t: int) -> None:
        if store.n == 0 and hasattr(store, "reserve"):
            store.reserve(self.seq_len)  # the whole sequence fits: hold exactly its slots
        if store.n + t > self.budget:
            raise RuntimeError(
                f"layer {self.layer_idx}: the cache was built for {self.seq_len} tokens, within the budget of "
                f"{self.budget}, so it keeps no scores; it now receives {store.n + t}. Build the cache with the real "
                "length (engine.new_cache(batch_size, seq_len=...))"
            )

    def nbytes(self) -> int:
        return 0


# policies ------------------------------------------------------------------------------------------------------------
def score_nbytes(cache) -> int:
    """Bytes of the policies' score buffers (scores, attention history, observation queries), beside the cache."""
    return sum(layer.policy.nbytes() for layer in cache.layers if hasattr(layer.policy, "nbytes"))


def slot_priority(scores: torch.Tensor, pos: torch.Tensor, forced: torch.Tensor | None = None) -> torch.Tensor:
    """[B, Hkv, n] float64 keep priority: forced slots first, then the scores, padding last."""
    s = torch.where(pos >= 0, scores.double(), -1e300)
    if forced is not None:
        s = torch.where(forced, 1e300, s)
    return s


def top_slots(scores: torch.Tensor, pos: torch.Tensor, m: int, forced: torch.Tensor | None = None) -> torch.Tensor:
    """Indices [B, Hkv, m] of the m best slots: forced slots first, then the highest scores, padding last.

    Like base.select_top but in float64, so that scores with fine tie-breaks added stay apart."""
    return slot_priority(scores, pos, forced).topk(m, dim=-1).indices


def forced_recent(pos: torch.Tensor, m: int, recent: int) -> torch.Tensor:
    """[B, Hkv, n] True on the min(recent, m) most recent real slots."""
    return most_recent(pos, min(recent, m))


class BudgetPolicy(RankedPolicy):
    """RankedPolicy that reports its score buffers (`nbytes`, as allocated)."""

    def nbytes(self) -> int:
        return self._scores.allocated()


class AttentionPolicy(BudgetPolicy):
    """Scores from the attention the new queries paid; declares `needs_probs`.

    The probabilities reach the policy in one of two ways, both folded by `absorb(probs [B, Hkv, g, tb, N],
    qpos [B, tb], row0)` into the slot scores (already grown to the N = n + t slots of stored + new tokens):
    - blocks: the engine calls `begin_probs(store, qpos)` before attention, and the store's attention pass hands
      `probs_block(probs [B, Hq, tb, N], row0)` one block of queries at a time (no [B, Hq, t, N] tensor);
    - whole: `observe(store, q, probs [B, Hq, t, N])` (stores that return all probabilities), folded in `on_append`.
    qpos is -1 for a padding query: its row must not count (a padding query reads every slot)."""

    needs_probs: ClassVar[bool] = True

    def __init__(self, budget: int):
        super().__init__(budget)
        self._probs: torch.Tensor | None = None
        self._qpos: torch.Tensor | None = None
        self._kpos: torch.Tensor | None = None
        self._grown = False

    def begin_probs(self, store: Store, qpos: torch.Tensor, n_kv_heads: int) -> None:
        """Before attention over stored + t new tokens (qpos [B, t]): make the score slots ready for the blocks."""
        B, t = qpos.shape
        self._qpos = qpos.long()
        self._kpos = None
        self._store = store
        self._hkv = n_kv_heads
        self.grow_scores(store, t, heads=(B, n_kv_heads, qpos.device))
        self._grown = True
        self.begin(store, t)

    def slot_pos(self, store: Store) -> torch.Tensor:
        """[B, Hkv, N] token index of every slot the current queries read (stored, then new)."""
        if self._kpos is None:
            B, t = self._qpos.shape
            H = self._hkv
            new = self._qpos[:, None, :].expand(B, H, t).to(torch.int32)
            self._kpos = new if store.n == 0 else torch.cat([store.pos.to(torch.int32), new], dim=2)
        return self._kpos

    def probs_block(self, probs: torch.Tensor, row0: int) -> None:
        B, Hq, tb, N = probs.shape
        Hkv = self._hkv
        self.absorb(self._store, probs.float().view(B, Hkv, Hq // Hkv, tb, N), self._qpos[:, row0 : row0 + tb], row0)

    def observe(self, store: Store, q: torch.Tensor, probs: torch.Tensor | None) -> None:
        self._probs = probs

    def on_append(self, store: Store, t: int) -> None:
        probs, self._probs = self._probs, None
        if self._grown:
            self._grown = False
            self._qpos = self._kpos = None
            return
        self.grow_scores(store, t)
        if probs is None:
            return
        self._qpos = store.pos[:, 0, -t:].long()  # [B, t]
        self._kpos = store.pos
        self._store = store
        self._hkv = store.pos.shape[1]
        self.begin(store, t)
        self.probs_block(probs, 0)
        self._qpos = self._kpos = None

    def begin(self, store: Store, t: int) -> None:
        """Prepare for the probabilities of t new queries (the scores already have their slots)."""

    @abstractmethod
    def absorb(self, store: Store, probs: torch.Tensor, qpos: torch.Tensor, row0: int = 0) -> None:
        """Fold one block of queries' attention (rows row0 .. row0 + tb of this forward) into the slot scores."""


def readable(spos: torch.Tensor, qpos: torch.Tensor) -> torch.Tensor:
    """[B, Hkv, t, n]: slot n holds a real token that query t (a real one) may read. spos [B, Hkv, n]; qpos [B, t]."""
    sp = spos.long()[:, :, None, :]
    qp = qpos.long()[:, None, :, None]
    return (sp >= 0) & (sp <= qp) & (qp >= 0)
