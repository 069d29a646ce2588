"""`streaming_llm`: attention sinks + a recent window (Λ-shaped masking).

Xiao et al., 2024, "Efficient Streaming Language Models with Attention Sinks" (ICLR 2024); the Λ-masking of
Han et al., 2023 (LM-Infinite). The first `sink` tokens and the most recent ones are kept: `budget` counts every
cached token, the current one included, so the recent window holds `budget - sink` tokens.

`reindex: true` uses StreamingLLM's positions within the cache (Sec. 3.2 of the paper): before each forward the
cache is cut to make room for the new tokens and the kept keys are re-rotated so that their rotary positions are
contiguous, 0 .. n-1, and the new tokens continue from n (kvx/rope.py), so rotary positions never exceed the budget
plus one chunk and the model can stream past its context. The keys are held as the model rotated them and moved on
read (kvx.cache.rotated.MovableStore): a key rounded to fp16/bf16 once, however many steps it moved. A query at in-cache position n then sees its keys at
distances 1 .. n, whatever their token indices. That has no mask form: with `reindex` only task.mode=stream runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvx.errors import ConfigError
from kvx.methods.base import ArchInfo, ScoredPolicy
from kvx.methods.common import EvictionMethod
from kvx.registry import METHODS


class SinkRecentPolicy(ScoredPolicy):
    """Keeps the sinks and the most recent tokens: the keep priority is the token index, sinks above all."""

    def __init__(self, budget: int, sink: int, ordered: bool = False):
        super().__init__(budget)
        self.sink = sink
        self.ordered = ordered  # in-cache positions are assigned in slot order: keep slots in token order

    def on_append(self, store, t):  # no scores: the choice depends on positions only
        pass

    def on_keep(self, store, idx):
        pass

    def on_move(self, store, dst, src, m):
        pass

    def closed_mask(self, qpos: torch.Tensor) -> torch.Tensor | None:
        """Masked mode over tokens 0 .. T-1 (qpos [B, T]): query i reads j <= i with j < sink or
        j > i - (budget - sink), exactly what the step-by-step policy keeps ([1, 1, 1, T, T]). None (run the policy
        step by step) for other positions, or with in-cache positions (reindex has no mask form)."""
        T, device = qpos.shape[1], qpos.device
        if self.ordered or not bool((qpos == torch.arange(T, device=device)).all()):
            return None
        i = torch.arange(T, device=device)[:, None]
        j = torch.arange(T, device=device)[None, :]
        return ((j <= i) & ((j < self.sink) | (j > i - (self.budget - self.sink))))[None, None, None]

    def _order(self, store) -> torch.Tensor:
        # position, not a score: the most recent tokens win, the sinks (the first `sink` token indices) before all;
        # padding (-1) last
        pos = store.pos.double()
        return torch.where((store.pos >= 0) & (store.pos < self.sink), pos + 2.0 ** 40, pos)

    def select(self, store, m: int) -> torch.Tensor:
        return self._order(store).topk(m, dim=-1).indices

    def select_drop(self, store, k: int) -> torch.Tensor:
        return self._order(store).topk(k, dim=-1, largest=False).indices

    def nbytes(self) -> int:
        return 0


@METHODS.register("streaming_llm")
@dataclass
class StreamingLLM(EvictionMethod):
    name: str = "streaming_llm"
    sink: int = 4
    reindex: bool = False  # StreamingLLM's in-cache positions: re-rotate kept keys to 0..n-1 (stream mode only)

    def __post_init__(self) -> None:
        self._rotary = None

    @property
    def has_mask_form(self) -> bool:  # type: ignore[override]
        return not self.reindex

    def check_fields(self) -> None:
        if isinstance(self.sink, bool) or not isinstance(self.sink, int) or self.sink < 0:
            raise ConfigError("method.sink", f"must be an int >= 0, got {self.sink!r}")
        if not isinstance(self.reindex, bool):
            raise ConfigError("method.reindex", f"must be true or false, got {self.reindex!r}")

    def reserved(self, total):
        if total is not None and self.sink >= total:
            raise ConfigError("method.sink", f"must be smaller than method.budget={total}")
        return self.sink

    def build_policy(self, layer_idx: int, budget: int, reserved: int, arch: ArchInfo) -> SinkRecentPolicy:
        return SinkRecentPolicy(budget, self.sink, ordered=self.reindex)

    def make_store(self, layer_idx: int, arch: ArchInfo):
        if self.reindex and self._rotary is not None:  # bound to a model: keys move on read, rounded once
            from kvx.cache.rotated import MovableStore

            return MovableStore(self._rotary)
        return super().make_store(layer_idx, arch)

    # in-cache positions --------------------------------------------------------------------------------------------
    def bind(self, engine) -> None:
        if self.reindex:
            from kvx.rope import find_rotary_embedding

            self._rotary = find_rotary_embedding(engine.model)

    def before_forward(self, engine, cache, t: int) -> None:
        """With `reindex`: make room for t new tokens, then compact the rotary positions before they are assigned."""
        if not self.reindex:
            return
        if cache.mode != "stream":
            raise ConfigError("task.mode", "streaming_llm with reindex has no mask form; use task.mode=stream")
        from kvx.rope import compact_positions, find_rotary_embedding

        if self._rotary is None:
            self._rotary = find_rotary_embedding(engine.model)
        for layer in cache.layers:
            if layer.policy is not None:
                layer.policy.before_attend(layer.store, t)
        compact_positions(cache, self._rotary)
