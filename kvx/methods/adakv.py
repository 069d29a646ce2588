"""`adakv`: per-head adaptive budgets over a scored eviction policy.

Feng et al., 2024, "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for Efficient LLM
Inference", as kvpress's AdaKVPress does it: a layer's budget, `budget` tokens per KV head of the base method, is
shared among its KV heads by score. When the layer holds more than n_kv_heads x budget real tokens, the base policy's
per-slot priorities (H2O's accumulated attention, SnapKV's window votes, key norms, ... with their forced slots)
are compared across all the heads of the layer and the top n_kv_heads x budget are kept, after a safeguard that
keeps each head's own top `alpha_safeguard` x budget slots. So a head whose attention is spread keeps more tokens
than one whose attention is peaked, with the same total per layer.

Storage. A store holds [B, Hkv, n] slots, the same n for every head, so the heads' different counts are padded:
n is the largest count of the layer, and a head's unused slots are marked as padding (token index -1), which
attention never reads. The bytes measured are the bytes held, padding included: n_kv_heads x (largest head count)
per layer, which can exceed n_kv_heads x budget (the real tokens never do). `stats` of a run report the bytes held.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from kvx.errors import ConfigError
from kvx.methods.base import ArchInfo, LayerPolicy, Method, NestedMethod, RankedPolicy, ScoredPolicy
from kvx.registry import METHODS

REFUSED = {"adakv": "AdaKV cannot wrap itself", "less": "give LESS's own base policy instead",
           "infinipot": "InfiniPot's pot compresses every layer together, not per head"}


def build_base(values: Any) -> Method:
    from kvx.config import build_nested_method

    return build_nested_method(values, "method.base", lambda name: REFUSED.get(name),
                               evicts_nothing="evicts nothing; give a scored eviction method (snapkv, h2o, knorm, ...)")


def has_priority(policy) -> bool:
    """Whether the policy ranks slots by a priority (RankedPolicy.priority) that heads can share."""
    return isinstance(policy, RankedPolicy)


def mark_unused(store, valid: torch.Tensor) -> None:
    """Turn the slots where valid [B, Hkv, n] is False into padding (token index -1): attention skips them."""
    store.pos.masked_fill_(~valid, -1)  # in place: stores that keep pos in a buffer see it
    # the store now holds padding slots: its decode shortcuts for a store without padding must not apply
    if hasattr(store, "_real_pos"):
        store._real_pos = None
    if hasattr(store, "_all_real"):
        store._all_real = False


def head_counts(pos: torch.Tensor) -> torch.Tensor:
    """[B, Hkv]: real tokens held per sequence and KV head."""
    return (pos >= 0).sum(dim=-1)


class AdaptivePolicy(LayerPolicy):
    """Wraps a scored policy: its scores accumulate as usual; eviction shares the layer's budget among the heads."""

    pads_heads = True  # a head's unused slots are padding (pos -1): masked mode must skip them

    def __init__(self, inner: ScoredPolicy, alpha: float, n_kv_heads: int):
        self.inner = inner
        self.alpha = alpha
        self.n_kv_heads = n_kv_heads

    def __getattr__(self, name):  # everything but eviction is the base policy's (needs_probs, observe, ...)
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    @property
    def needs_probs(self) -> bool:
        return self.inner.needs_probs

    @property
    def budget(self) -> int:
        """The most slots one head may hold: the whole layer's budget."""
        return self.n_kv_heads * self.inner.budget

    def observe(self, store, q, probs) -> None:
        self.inner.observe(store, q, probs)

    def on_append(self, store, t: int) -> None:
        self.inner.on_append(store, t)

    def observe_token_nll(self, store, nll) -> None:
        self.inner.observe_token_nll(store, nll)

    def _held(self, store) -> int:
        return 0 if store.n == 0 else int(head_counts(store.pos).sum(dim=1).max())

    def before_attend(self, store, t: int) -> None:
        b, H = self.inner.budget, self.n_kv_heads
        if store.n == 0 and hasattr(store, "reserve"):  # preallocating stores: start at the per-head budget
            store.reserve(b)
        if store.n and t < b and self._held(store) + H * t > H * b:
            self.evict_to(store, b - t)

    def end_step(self, store) -> None:
        if store.n and self._held(store) > self.n_kv_heads * self.inner.budget:
            self.evict_to(store, self.inner.budget)

    def evict_to(self, store, m: int) -> None:
        """Keep n_kv_heads x m real tokens per sequence: each head's top alpha x m, then the best over the heads."""
        pos = store.pos
        B, H, n = pos.shape
        real = pos >= 0
        pri = self.inner.priority(store, m)  # [B, Hkv, n] float64
        safe = min(int(m * self.alpha), n)
        if safe:
            top = torch.zeros_like(real).scatter_(2, pri.topk(safe, dim=-1).indices, True)
            pri = torch.where(top & real, 1e300, pri)
        chosen = pri.reshape(B, H * n).topk(min(H * m, H * n), dim=-1).indices
        sel = torch.zeros(B, H * n, dtype=torch.bool, device=pos.device).scatter_(1, chosen, True).view(B, H, n) & real
        width = max(1, int(sel.sum(dim=-1).max()))
        slot = torch.arange(n, device=pos.device)
        idx = torch.where(sel, slot, n + slot).argsort(dim=-1)[..., :width].sort(dim=-1).values  # [B, H, width]
        valid = sel.gather(2, idx)
        self.inner.on_keep(store, idx)
        store.keep(idx)
        if hasattr(store, "reserve"):  # preallocating stores: hold exactly the padded width between steps
            store.reserve(width)
        mark_unused(store, valid)

    def nbytes(self) -> int:
        return self.inner.nbytes() if hasattr(self.inner, "nbytes") else 0


@METHODS.register("adakv")
@dataclass
class AdaKV(NestedMethod, Method):
    name: str = "adakv"
    base: dict = field(default_factory=dict)  # a scored eviction method's config, e.g. {name: snapkv, budget: 64}
    alpha_safeguard: float = 0.2  # each head keeps at least its own top alpha x budget tokens

    compresses = True

    def build_inner(self) -> Method:
        return build_base(self.base)

    @property
    def base_method(self) -> Method:
        return self.inner

    def validate(self) -> None:
        self.validate_inner()
        a = self.alpha_safeguard
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0.0 <= a <= 1.0:
            raise ConfigError("method.alpha_safeguard", f"must be a number in [0, 1], got {a!r}")

    def make_store(self, layer_idx: int, arch: ArchInfo):
        return self.base_method.make_store(layer_idx, arch)

    def make_policy(self, layer_idx: int, arch: ArchInfo, seq_len: int | None):
        policy = self.base_method.make_policy(layer_idx, arch, seq_len)
        if not isinstance(policy, ScoredPolicy):  # e.g. a budget that covers the whole sequence: nothing to share
            return policy
        if not has_priority(policy):
            raise ConfigError("method.base.name", f"{self.base_method.name!r} ranks slots without a per-slot score "
                                                  "that heads can share; give a scored method (snapkv, h2o, knorm, "
                                                  "observed_attention, ...)")
        return AdaptivePolicy(policy, float(self.alpha_safeguard), arch.n_kv_heads)

