"""`streaming_llm`: attention sinks + a recent window (Λ-shaped masking).

Xiao et al., 2024, "Efficient Streaming Language Models with Attention Sinks" (ICLR 2024); the Λ-masking of
Han et al., 2023 (LM-Infinite). The first `sink` tokens and the most recent ones are kept: `budget` counts every
cached token, the current one included, so the recent window holds `budget - sink` tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvx.errors import ConfigError
from kvx.methods.base import ArchInfo, Method, ScoredPolicy, recency_rank, resolve_tokens, select_top
from kvx.registry import METHODS


class SinkRecentPolicy(ScoredPolicy):
    def __init__(self, budget: int, sink: int):
        super().__init__(budget)
        self.sink = sink

    def on_append(self, store, t):  # no scores: the choice depends on positions only
        pass

    def on_keep(self, store, idx):
        pass

    def select(self, store, m: int) -> torch.Tensor:
        pos = store.pos
        rank = recency_rank(pos)  # 0 = most recent
        is_sink = (pos >= 0) & (pos < self.sink)
        n_sink = min(self.sink, m)
        recent = rank < (m - n_sink)
        score = -rank.float()
        return select_top(score, pos, m, forced=is_sink | recent)


@METHODS.register("streaming_llm")
@dataclass
class StreamingLLM(Method):
    name: str = "streaming_llm"
    budget: float = 64  # int: tokens per head; float in (0, 1): fraction of the sequence
    sink: int = 4

    compresses = True

    def validate(self) -> None:
        resolve_tokens(self.budget, "method.budget", 1000)
        if self.sink < 0:
            raise ConfigError("method.sink", f"must be >= 0, got {self.sink}")
        if isinstance(self.budget, int) or float(self.budget).is_integer():
            if self.sink >= int(self.budget):
                raise ConfigError("method.sink", f"must be smaller than method.budget={int(self.budget)}")

    def make_policy(self, layer_idx: int, arch: ArchInfo, seq_len: int | None):
        return SinkRecentPolicy(resolve_tokens(self.budget, "method.budget", seq_len, arch.max_positions), self.sink)
