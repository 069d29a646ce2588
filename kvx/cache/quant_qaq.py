"""QAQ's bit allocation (Dong et al., 2024, "QAQ: Quality Adaptive Quantization for LLM KV Cache",
arXiv:2403.04643): the per-token key and value error bounds, the bit rule, the cross-layer board of token
granularity, and the per-layer state that tracks each slot's importance. The store that applies the bits:
kvx/cache/quantized.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from kvx.cache.quant_packed import QuantSpec, unit_range
from kvx.kernels.quant import EXACT_BITS

if TYPE_CHECKING:
    from kvx.cache.quantized import QuantizedStore

SQRT12 = 2.0 * math.sqrt(3.0)


@dataclass(frozen=True)
class QAQConfig:
    """QAQ's bounds. `bit_rule: paper` (arXiv:2403.04643, section 3):
        values: sigma_V,t <= value_error / (sqrt(T) * |S_t|)
        keys:   sigma_K,t^2 <= log(T^3 / (T - 1) * key_error^2 + 1) / ||q||^2
        bits:   B_t = ceil(log2((max_t - min_t) / (2 sqrt(3) sigma_t))), clamped to [min_bits, max_bits]
    T: tokens attended; S_t: max of the last `attn_window` attention weights token t received; ||q||^2: the
    `query_quantile` quantile of the squared norms of the last `query_history` queries, taken after the attention
    scaling (the vector whose dot product with a key is the logit). max_t - min_t spans the token's unit (its
    outliers excluded): all KV heads of the layer (granularity layer/token) or one head (head).

    `bit_rule: official` (the authors' code, ClubieDong/QAQ-KVCacheQuantization, src/quantizer.py): a bound e on
    the largest error instead of a standard deviation,
        values: e_V,t = sqrt(value_error) / T / |S_t|
        keys:   e_K,t = sqrt(key_error / D) / T / (max_q_value * J_t),  J_t = max_j |d_tj S_t - S_t S_j|
        bits:   B_t = ceil(log2((max_t - min_t) / (2 e_t) + 1)), clamped to [min_bits, max_bits]
    (J_t: the largest entry of row t of the softmax Jacobian over the importance vector S; D: head dim)."""

    key_error: float = 1.0
    value_error: float = 1.0
    min_bits: int = 2
    max_bits: int = 8
    attn_window: int = 5
    granularity: str = "layer"  # token | layer | head
    query_quantile: float = 0.9
    query_history: int = 1024
    requant: bool = True
    offload_device: str = "cpu"
    bit_rule: str = "paper"  # paper | official
    max_q_value: float = 3.0  # official rule: the query magnitude in the key bound (the authors' grid uses 3)


def qaq_bits(rng: torch.Tensor, sigma: torch.Tensor, min_bits: int, max_bits: int) -> torch.Tensor:
    """B = ceil(log2(rng / (2 sqrt(3) sigma))) clamped to [min_bits, max_bits]; 16 and more means exact."""
    return _clamp_bits(torch.ceil(torch.log2(rng.double() / (SQRT12 * sigma.double()))), min_bits, max_bits)


def official_bits(rng: torch.Tensor, err: torch.Tensor, min_bits: int, max_bits: int) -> torch.Tensor:
    """B = ceil(log2(rng / (2 e) + 1)) clamped to [min_bits, max_bits] (the authors' code)."""
    return _clamp_bits(torch.ceil(torch.log2(rng.double() / (2.0 * err.double()) + 1.0)), min_bits, max_bits)


def _clamp_bits(b: torch.Tensor, min_bits: int, max_bits: int) -> torch.Tensor:
    with torch.no_grad():
        b = torch.nan_to_num(b, nan=float(min_bits), neginf=float(min_bits), posinf=float(max_bits))
        b = b.clamp(min_bits, max_bits)
        return torch.where(b >= EXACT_BITS, EXACT_BITS, b).long()


def rule_bits(cfg: QAQConfig, rng: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    fn = official_bits if cfg.bit_rule == "official" else qaq_bits
    return fn(rng, bound, cfg.min_bits, cfg.max_bits)


def jacobian_row_max(S: torch.Tensor) -> torch.Tensor:
    """J_t = max_j |d_tj S_t - S_t S_j| = max(S_t - S_t^2, S_t * max_{j != t} S_j) over the last dim of S."""
    S = S.double()
    if S.shape[-1] < 2:
        return (S - S * S).abs()
    top2 = S.topk(2, dim=-1).values
    first = S >= top2[..., :1]
    other = torch.where(first, top2[..., 1:2], top2[..., :1])
    return torch.maximum((S - S * S).abs(), S * other)


def official_bounds(cfg: QAQConfig, T: torch.Tensor, S: torch.Tensor, D: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(e_K, e_V) of the official rule; S [..., n] importance of n slots of one (sequence, head)."""
    T = T.double()
    e_v = math.sqrt(cfg.value_error) / T / S.double().abs()
    e_k = math.sqrt(cfg.key_error / D) / T / (cfg.max_q_value * jacobian_row_max(S))
    return e_k, e_v


def key_sigma(T: torch.Tensor, key_error: float, qn2: torch.Tensor) -> torch.Tensor:
    T = T.double()
    ratio = torch.where(T > 1, T**3 / (T - 1).clamp(min=1e-30), torch.full_like(T, float("inf")))
    s2 = torch.log(ratio * key_error**2 + 1.0) / qn2.double()
    return torch.sqrt(s2)


def value_sigma(T: torch.Tensor, value_error: float, S: torch.Tensor) -> torch.Tensor:
    return value_error / (torch.sqrt(T.double()) * S.double().abs())


class BitBoard:
    """QAQ's token granularity: one bit width per token for every layer (the maximum that the layers ask for).

    Each layer posts the bits its tokens need after a forward; every layer quantizes before the next forward, by
    which time all layers have posted. req [L, 2 (keys, values), B, positions]."""

    def __init__(self, n_layers: int):
        self.n_layers = n_layers
        self.req: torch.Tensor | None = None

    def post(self, layer: int, pos: torch.Tensor, bk: torch.Tensor, bv: torch.Tensor) -> None:
        B = pos.shape[0]
        P = int(pos.max()) + 1 if pos.numel() else 1
        if self.req is None or self.req.shape[-1] < P or self.req.shape[2] != B:
            new = torch.full((self.n_layers, 2, B, max(P, 1)), -1, dtype=torch.int32, device=pos.device)
            if self.req is not None and self.req.shape[2] == B:
                new[..., : self.req.shape[-1]] = self.req
            self.req = new
        row = torch.full((2, B, self.req.shape[-1]), -1, dtype=torch.int32, device=pos.device)
        ok = pos >= 0
        p = torch.where(ok, pos, 0).long().reshape(B, -1)
        for i, bb in enumerate((bk, bv)):
            val = torch.where(ok, bb, -1).to(torch.int32).reshape(B, -1)
            row[i].scatter_reduce_(1, p, val, reduce="amax", include_self=True)
        self.req[layer] = row

    def get(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B = pos.shape[0]
        top = self.req.amax(0)  # [2, B, P]
        p = pos.long().clamp(0, top.shape[-1] - 1).reshape(B, -1)
        out = [top[i].gather(1, p).view_as(pos).long() for i in range(2)]
        return out[0], out[1]


class QAQState:
    """Per-layer QAQ bookkeeping, aligned with the store's slots: the last n attention weights of each slot (max
    over the query heads of its KV head), each slot's unit range, the bits each slot needs now and the sigma that
    asked for them. Policy state, not payload: not counted in nbytes() (like an eviction policy's scores)."""

    def __init__(self, cfg: QAQConfig, layer_idx: int, board: BitBoard | None):
        self.cfg, self.layer_idx, self.board = cfg, layer_idx, board
        self.ring = self.stash = self.qn2 = None
        self.rng_k = self.rng_v = self.req_k = self.req_v = self.sig_k = self.sig_v = None
        self.qsig_k = self.qsig_v = None  # sigma each quantized row was last quantized for (diagnostics, tests)

    @property
    def heads_unit(self) -> bool:
        return self.cfg.granularity != "head"

    def observe(self, q: torch.Tensor, probs: torch.Tensor | None, scaling: float, qpos: torch.Tensor,
                n_kv: int) -> None:
        """q [B, Hq, t, D] (before scaling); probs [B, Hq, t, n + t] (stored slots, then the new tokens) or None."""
        B, Hq, t, _ = q.shape
        qn2 = ((q.float() * scaling) ** 2).sum(-1)  # [B, Hq, t]
        qn2 = torch.where(qpos[:, None, :] >= 0, qn2, float("nan"))
        self.qn2 = qn2 if self.qn2 is None else torch.cat([self.qn2, qn2], -1)[..., -self.cfg.query_history :]
        self.stash = None
        if probs is None:
            return
        N = probs.shape[-1]
        n = N - t
        P = probs.float().view(B, n_kv, Hq // n_kv, t, N).amax(2)  # [B, Hkv, t, N]
        w = self.cfg.attn_window
        if n:
            self.ring = torch.cat([self.ring, P[..., :n].transpose(-1, -2)], -1)[..., -w:]
        new = P[..., n:].transpose(-1, -2)[..., -w:]  # [B, Hkv, t (new slots), <= w rows]
        if new.shape[-1] < w:
            new = torch.cat([new.new_zeros(*new.shape[:-1], w - new.shape[-1]), new], -1)
        self.stash = new

    def on_append(self, k_new, v_new, spec_k: QuantSpec, spec_v: QuantSpec, pos_new: torch.Tensor) -> None:
        B, H, t, _ = k_new.shape
        w = self.cfg.attn_window
        rows = self.stash if self.stash is not None and self.stash.shape[2] == t else k_new.new_zeros(B, H, t, w).float()
        self.stash = None
        valid = torch.ones(B, H, t, dtype=torch.bool, device=k_new.device)
        rk = unit_range(k_new, valid, spec_k, self.heads_unit, pos_new)
        rv = unit_range(v_new, valid, spec_v, self.heads_unit, pos_new)
        neg = torch.full((B, H, t), -1, dtype=torch.long, device=k_new.device)
        nan = torch.full((B, H, t), float("nan"), dtype=torch.float64, device=k_new.device)

        def cat(a, b):
            return b if a is None else torch.cat([a, b], 2)

        self.ring, self.rng_k, self.rng_v = cat(self.ring, rows), cat(self.rng_k, rk), cat(self.rng_v, rv)
        self.req_k, self.req_v = cat(self.req_k, neg), cat(self.req_v, neg.clone())
        self.sig_k, self.sig_v = cat(self.sig_k, nan), cat(self.sig_v, nan.clone())
        self.qsig_k, self.qsig_v = cat(self.qsig_k, nan.clone()), cat(self.qsig_v, nan.clone())

    def take(self, idx: torch.Tensor) -> None:
        if self.ring is None:
            return
        self.ring = self.ring.gather(2, idx[..., None].expand(*idx.shape, self.ring.shape[-1]))
        for name in ("rng_k", "rng_v", "req_k", "req_v", "sig_k", "sig_v", "qsig_k", "qsig_v"):
            setattr(self, name, getattr(self, name).gather(2, idx))

    def _query_norm2(self) -> torch.Tensor:
        B, Hq, L = self.qn2.shape
        H = self.ring.shape[1]
        x = self.qn2.reshape(B, 1, Hq * L) if self.heads_unit else self.qn2.reshape(B, H, (Hq // H) * L)
        return torch.nanquantile(x.double(), self.cfg.query_quantile, dim=-1, keepdim=True)  # [B, 1 or H, 1]

    def plan(self, store: QuantizedStore) -> None:
        """After a forward: the bits each slot needs now (and post them for token granularity)."""
        if self.ring is None or self.qn2 is None:
            return
        c = self.cfg
        T = torch.tensor(float(store.n), dtype=torch.float64, device=self.ring.device)
        S = self.ring.amax(-1)
        if self.heads_unit:
            S = S.amax(1, keepdim=True).expand_as(S)
        if c.bit_rule == "official":
            self.sig_k, self.sig_v = official_bounds(c, T, S, store.k.shape[-1])
        else:
            self.sig_v = value_sigma(T, c.value_error, S)
            qn2 = self._query_norm2()
            self.sig_k = key_sigma(T, c.key_error, qn2).expand_as(self.sig_v)
            self.sig_k = torch.where(torch.isnan(self.sig_k), 0.0, self.sig_k)  # no query seen yet: most bits
        self.req_k = rule_bits(c, self.rng_k, self.sig_k)
        self.req_v = rule_bits(c, self.rng_v, self.sig_v)
        if self.board is not None:
            self.board.post(self.layer_idx, store.pos, self.req_k, self.req_v)

    def bits(self, store: QuantizedStore, sl: slice | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Bits for slots `sl` (a slice of slots, or indices [B, H, m])."""
        def pick(t):
            return t[:, :, sl] if isinstance(sl, slice) else t.gather(2, sl)

        if self.board is not None and self.board.req is not None:
            bk, bv = self.board.get(pick(store.pos))
        else:
            bk, bv = pick(self.req_k), pick(self.req_v)
        top = min(self.cfg.max_bits, EXACT_BITS)
        return torch.where(bk < 0, top, bk), torch.where(bv < 0, top, bv)
