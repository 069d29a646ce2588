"""`sirllm`: token-entropy (cross-entropy) scoring with attention sinks and a recent window.

Yao et al., 2024, "SirLLM: Streaming Infinite Retentive LLM" (ACL 2024). A token's score is its token entropy in
SirLLM's sense, -log p(token | prefix), the loss the model had on it: surprising tokens carry information and are
kept. The first `sink` tokens (attention sinks, as in StreamingLLM) and the `recent` newest tokens are always kept;
the rest of the budget goes to the highest scores. `decay` (SirLLM's memory decay, in (0, 1]) multiplies the scores
of the tokens already cached at every forward, so that old key tokens fade; 1 disables it.

The engine reports each token's loss after the forward (`needs_token_nll`); the score is the same for every layer and
head. There is no mask form: the losses are only known after the forward that a mask would have to shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvx.errors import ConfigError
from kvx.methods.base import ArchInfo
from kvx.methods.common import (
    BudgetPolicy,
    EvictionMethod,
    check_share,
    forced_recent,
    resolve_share,
    slot_priority,
)
from kvx.registry import METHODS


class TokenNLLPolicy(BudgetPolicy):
    """Scores = -log p of each cached token (decayed); sinks and the recent window are forced."""

    def __init__(self, budget: int, sink: int, recent: int, decay: float):
        super().__init__(budget)
        self.sink = sink
        self.recent = recent
        self.decay = decay

    def observe_token_nll(self, store, nll: torch.Tensor) -> None:
        # nll [B, t] of the tokens just appended: they are the store's last t slots
        t = nll.shape[1]
        if t == 0:
            return
        if self.decay != 1.0:
            self.scores[..., :-t] *= self.decay
        self.scores[..., -t:] = nll.float()[:, None, :]

    def priority(self, store, m: int) -> torch.Tensor:
        pos = store.pos
        n_sink = min(self.sink, m)
        forced = ((pos >= 0) & (pos < n_sink)) | forced_recent(pos, m, min(self.recent, m - n_sink))
        return slot_priority(self.scores, pos, forced=forced)


@METHODS.register("sirllm")
@dataclass
class SirLLM(EvictionMethod):
    name: str = "sirllm"
    sink: int = 4  # attention-sink tokens kept from the start
    recent: int | float = 0.25  # recent window: share of the budget (float) or tokens (int)
    decay: float = 1.0  # memory decay of the cached tokens' scores per forward, in (0, 1]

    has_mask_form: ClassVar[bool] = False
    needs_token_nll: ClassVar[bool] = True

    def check_fields(self) -> None:
        if isinstance(self.sink, bool) or not isinstance(self.sink, int) or self.sink < 0:
            raise ConfigError("method.sink", f"must be an int >= 0, got {self.sink!r}")
        check_share(self.recent, "method.recent")
        if isinstance(self.decay, bool) or not isinstance(self.decay, (int, float)) or not 0.0 < self.decay <= 1.0:
            raise ConfigError("method.decay", f"must lie in (0, 1], got {self.decay!r}")

    def reserved(self, total):
        recent = resolve_share(self.recent, "method.recent", total)
        if recent is None:
            return None
        if total is not None and self.sink + recent > total:
            raise ConfigError("method.recent", f"sink ({self.sink}) + recent ({recent}) is more than the budget of "
                                               f"{total} tokens (method.budget)")
        return self.sink + recent

    def build_policy(self, layer_idx: int, budget: int, reserved: int, arch: ArchInfo) -> TokenNLLPolicy:
        recent = max(0, min(reserved, budget) - self.sink)
        return TokenNLLPolicy(budget, self.sink, recent, float(self.decay))
