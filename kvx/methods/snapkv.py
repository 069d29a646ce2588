"""`snapkv`: selection by an observation window of the last queries, with pooled scores.

Li et al., 2024, "SnapKV: LLM Knows What You are Looking for Before Generation" (NeurIPS 2024). The last `window`
queries of the prompt (the observation window) vote: each cached token's score is the attention these queries pay
it (softmax over everything each of them may read, summed over the window and over the query heads of a KV head's
group), smoothed over neighbouring tokens by a 1-D pooling (`pooling: avg | max`, `kernel_size`, odd, stride 1, as
in SnapKV's clustering step). The window's own tokens are always kept; the rest of the budget goes to the top
scores, per KV head.

Prefill: after a chunk that leaves more than `budget` tokens (one-shot or chunked prefill), `end_step` keeps the
window + the top `budget - window` of the prefix: SnapKV as published. Decoding (not in the paper, which compresses
the prompt only): the policy keeps the last `window` queries (after RoPE) and their positions, and whenever the cache
is full before a new token, it re-applies the same selection with those queries over the tokens now cached, so the
cache stays within budget; this costs window x budget per step, never T x T, and needs no attention probabilities
from the forward (`needs_probs` is False).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvx.errors import ConfigError
from kvx.kernels.reference import group_logits
from kvx.methods.base import ArchInfo
from kvx.methods.common import BudgetPolicy, EvictionMethod, forced_recent, readable, slot_priority
from kvx.registry import METHODS

POOLINGS = ("avg", "max")


def pool_scores(score: torch.Tensor, kernel_size: int, pooling: str) -> torch.Tensor:
    """1-D pooling along the slot axis, stride 1, same length (zero padding, as SnapKV's avg/max pool1d)."""
    if kernel_size == 1:
        return score
    B, H, n = score.shape
    x = score.reshape(B * H, 1, n)
    pad = kernel_size // 2
    if pooling == "avg":
        y = F.avg_pool1d(x, kernel_size, stride=1, padding=pad)
    else:
        y = F.max_pool1d(F.pad(x, (pad, pad)), kernel_size, stride=1)  # scores >= 0: zero padding == -inf padding
    return y.reshape(B, H, n)


class ObservationWindowPolicy(BudgetPolicy):
    """Keeps the last `window` queries [B, Hq, w, D] and their positions [B, w]; scores are computed at selection.

    The pooling runs along the slots, so the slots stay in token order (`ordered`: eviction keeps, never moves)."""

    ordered = True

    def __init__(self, budget: int, window: int, kernel_size: int, pooling: str, scaling: float):
        super().__init__(budget)
        self.window = window
        self.kernel_size = kernel_size
        self.pooling = pooling
        self.scaling = scaling
        self.q: torch.Tensor | None = None  # [B, Hq, w, D]
        self.qpos: torch.Tensor | None = None  # [B, w]
        self._q_new: torch.Tensor | None = None

    def observe(self, store, q: torch.Tensor, probs) -> None:
        self._q_new = q[:, :, -self.window :]

    def on_append(self, store, t: int) -> None:
        q, self._q_new = self._q_new, None
        qpos = store.pos[:, 0, -q.shape[2] :].long()  # positions of the kept new queries (-1: padding)
        if self.q is None:
            self.q, self.qpos = q, qpos
        else:
            self.q = torch.cat([self.q, q], dim=2)[:, :, -self.window :]
            self.qpos = torch.cat([self.qpos, qpos], dim=1)[:, -self.window :]

    def on_keep(self, store, idx) -> None:
        pass

    def grow_scores(self, store, t: int, fill: float = 0.0, heads=None) -> None:
        pass  # no slot scores: they are computed at selection

    def window_scores(self, store) -> torch.Tensor:
        """[B, Hkv, n]: attention of the window queries to each cached slot, summed over queries and the group."""
        k = store.keys()  # [B, Hkv, n, D]
        B, Hkv, n, D = k.shape
        logits = group_logits(self.q.float(), k.float(), self.scaling)  # [B, Hkv, g, w, n]
        ok = readable(store.pos, self.qpos)[:, :, None]  # [B, Hkv, 1, w, n]
        logits = logits.masked_fill(~ok, float("-inf"))
        probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # a padding query reads nothing
        return probs.sum(dim=(2, 3))

    def priority(self, store, m: int) -> torch.Tensor:
        keep_window = forced_recent(store.pos, m, self.window)
        score = self.window_scores(store).masked_fill(keep_window, 0.0)
        score = pool_scores(score, self.kernel_size, self.pooling)
        return slot_priority(score, store.pos, forced=keep_window)

    def nbytes(self) -> int:
        if self.q is None:
            return 0
        return self.q.numel() * self.q.element_size() + self.qpos.numel() * self.qpos.element_size()


@METHODS.register("snapkv")
@dataclass
class SnapKV(EvictionMethod):
    name: str = "snapkv"
    window: int = 32  # observation window: the last queries that vote, and whose tokens are kept
    kernel_size: int = 7  # pooling width (odd)
    pooling: str = "avg"  # avg | max

    def __post_init__(self) -> None:
        self._scaling: dict[int, float] = {}

    def check_fields(self) -> None:
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise ConfigError("method.window", f"must be an int >= 1, got {self.window!r}")
        if isinstance(self.kernel_size, bool) or not isinstance(self.kernel_size, int) or self.kernel_size < 1 \
                or self.kernel_size % 2 == 0:
            raise ConfigError("method.kernel_size", f"must be an odd int >= 1, got {self.kernel_size!r}")
        if self.pooling not in POOLINGS:
            raise ConfigError("method.pooling", f"must be one of {', '.join(POOLINGS)}, got {self.pooling!r}")

    def reserved(self, total):
        if total is not None and self.window >= total:
            raise ConfigError("method.window", f"the observation window ({self.window}) must be smaller than the "
                                               f"budget of {total} tokens (method.budget)")
        return self.window

    def bind(self, engine) -> None:
        """Read each attention layer's softmax scaling from the model (head_dim ** -0.5 where none is found)."""
        self._scaling = {int(m.layer_idx): float(m.scaling) for m in engine.model.modules()
                         if isinstance(getattr(m, "layer_idx", None), int) and isinstance(getattr(m, "scaling", None), float)}

    def build_policy(self, layer_idx: int, budget: int, reserved: int, arch: ArchInfo) -> ObservationWindowPolicy:
        scaling = self._scaling.get(layer_idx, arch.head_dim ** -0.5)
        return ObservationWindowPolicy(budget, min(self.window, budget - 1), self.kernel_size, self.pooling, scaling)
