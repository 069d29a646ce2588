"""LESS storage: a sparse store plus a constant-size low-rank state that absorbs every evicted (k, v).

Dong et al., 2024, "Get More with LESS: Synthesizing Recurrence with KV Cache Compression for Efficient LLM
Inference" (ICML 2024). Per layer and per KV head the state is H in R^{R x D} and z in R^R, zero at the start; a
token the eviction policy drops is folded in as H += psi(k)^T v, z += psi(k), and attention over the kept tokens S
becomes

    o = (phi(q) H + sum_{j in S} exp(q k_j / sqrt(d)) v_j) / (phi(q) z^T + sum_{j in S} exp(q k_j / sqrt(d))).

phi and psi are small learned feature maps (two-layer MLPs with GELU and absolute-value outputs, trained per layer;
see kvx/less_train.py). As in the paper's code for multi-query models, phi is per query head and psi per KV head, so
the state lives per KV head and is shared by the query heads of a GQA group.

Numerics: o = o_sparse * exp(lse - L) + (phi H / phi z^T) * exp(log(phi z^T) - L), with lse the log-sum-exp of the
kept logits and L = logaddexp(lse, log(phi z^T)). Every exponent is <= 0 and phi H / phi z^T is a convex combination
of absorbed values (phi, psi >= 0), so nothing overflows in any dtype; the merge runs in float32. When the low-rank
mass is zero, L == lse exactly and the output is the sparse output bit for bit.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from kvx.cache.dense import DenseStore, Store, _nbytes
from kvx.kernels import reference, use_triton

_TINY = torch.finfo(torch.float32).tiny


class FeatureMaps(nn.Module):
    """phi (per query head) and psi (per KV head) of one layer, as in the LESS reference implementation.

    phi(q) = |GELU(GELU(q W1) W2)|;  psi(k) = |f + (f M) * s2| with f = |s1| * GELU(GELU(k U1) U2).
    s1 and s2 start at 1e-4, so an untrained psi is close to zero and LESS starts close to its sparse policy.
    Dropout (training only) acts on the first layer's pre-activation. Inputs [B, H, T, D] -> [B, H, T, R] float32.
    """

    def __init__(self, n_heads: int, n_kv_heads: int, head_dim: int, rank: int = 8, hidden: int = 512,
                 dropout: float = 0.0, generator: torch.Generator | None = None):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim, self.rank, self.hidden = n_heads, n_kv_heads, head_dim, rank, hidden

        def xavier(*shape):
            a = math.sqrt(6.0 / (shape[-2] + shape[-1]))
            return nn.Parameter(torch.empty(*shape).uniform_(-a, a, generator=generator))

        self.phi_w1 = xavier(n_heads, head_dim, hidden)
        self.phi_w2 = xavier(n_heads, hidden, rank)
        self.psi_w1 = xavier(n_kv_heads, head_dim, hidden)
        self.psi_w2 = xavier(n_kv_heads, hidden, rank)
        self.psi_mix = xavier(n_kv_heads, rank, rank)
        self.psi_scale = nn.Parameter(torch.full((n_kv_heads, rank), 1e-4))
        self.psi_mix_scale = nn.Parameter(torch.full((n_kv_heads, rank), 1e-4))
        self.dropout = nn.Dropout(dropout)

    def phi(self, q: torch.Tensor) -> torch.Tensor:
        """q [B, Hq, T, D] -> [B, Hq, T, R] (float32, >= 0)."""
        h = F.gelu(self.dropout(torch.einsum("bhtd,hde->bhte", q.float(), self.phi_w1)))
        return F.gelu(torch.einsum("bhte,her->bhtr", h, self.phi_w2)).abs()

    def psi(self, k: torch.Tensor) -> torch.Tensor:
        """k [B, Hkv, T, D] (after RoPE) -> [B, Hkv, T, R] (float32, >= 0)."""
        h = F.gelu(self.dropout(torch.einsum("bhtd,hde->bhte", k.float(), self.psi_w1)))
        f = self.psi_scale.abs()[None, :, None] * F.gelu(torch.einsum("bhte,her->bhtr", h, self.psi_w2))
        f = f + torch.einsum("bhtr,hrs->bhts", f, self.psi_mix) * self.psi_mix_scale[None, :, None]
        return f.abs()

    def geometry(self) -> dict:
        return {"n_heads": self.n_heads, "n_kv_heads": self.n_kv_heads, "head_dim": self.head_dim,
                "rank": self.rank, "hidden": self.hidden}


# ---------------------------------------------------------------------------------------------------------------
# the attention formula, shared by stream mode, masked mode and training


def sparse_lse(q: torch.Tensor, k: torch.Tensor, allowed: torch.Tensor, scaling: float) -> torch.Tensor:
    """Log-sum-exp of the logits each query may read. q [B, Hq, t, D]; k [B, Hkv, n, D]; allowed [B, Hkv, 1|g, t, n].

    Returns [B, Hkv, g, t] float32 (-inf for a query that reads nothing)."""
    B, Hq, t, D = q.shape
    Hkv = k.shape[1]
    logits = torch.matmul(q.float().view(B, Hkv, Hq // Hkv, t, D), k.float()[:, :, None].transpose(-1, -2)) * scaling
    return torch.logsumexp(logits.masked_fill(~allowed, float("-inf")), dim=-1)


def merge_lowrank(sparse_out: torch.Tensor, lse: torch.Tensor, lr_num: torch.Tensor, lr_den: torch.Tensor) -> torch.Tensor:
    """Combine a softmax over the kept tokens with the low-rank term; all [..., D] / [...] , returns float32.

    sparse_out: softmax attention over the kept tokens; lse: log-sum-exp of their logits; lr_num = phi(q) H (or its
    parallel form sum_j E_ij phi(q_i) psi(k_j)^T v_j); lr_den = phi(q) z^T >= 0.
    """
    has = lr_den > 0
    log_den = torch.where(has, torch.log(lr_den.clamp_min(_TINY)), torch.full_like(lr_den, float("-inf")))
    total = torch.logaddexp(lse, log_den)
    w_sparse = torch.exp(lse - total)
    w_lr = torch.exp(log_den - total)
    lr_mean = torch.where(has[..., None], lr_num / lr_den.clamp_min(_TINY)[..., None], torch.zeros_like(lr_num))
    return sparse_out.float() * w_sparse[..., None] + lr_mean * w_lr[..., None]


def parallel_lowrank(phi_q: torch.Tensor, psi_k: torch.Tensor, v: torch.Tensor, evicted: torch.Tensor):
    """Parallel form of the state: ((phi(Q) psi(K)^T) * E) V and its row sums.

    phi_q [B, Hq, T, R]; psi_k [B, Hkv, T, R]; v [B, Hkv, T, D]; evicted [B, Hkv, 1|g, T, T] (query i has absorbed
    token j). Returns lr_num [B, Hkv, g, T, D] and lr_den [B, Hkv, g, T] (float32)."""
    B, Hq, T, R = phi_q.shape
    Hkv = psi_k.shape[1]
    w = torch.matmul(phi_q.view(B, Hkv, Hq // Hkv, T, R), psi_k[:, :, None].transpose(-1, -2))  # [B, Hkv, g, T, T]
    w = w * evicted
    return torch.matmul(w, v.float()[:, :, None]), w.sum(-1)


def less_attention_parallel(q, k, v, allowed, evicted, scaling, maps: FeatureMaps, sparse_out=None, psi_k=None,
                            lse=None):
    """LESS attention over a whole window in parallel form. q [B, Hq, T, D]; k, v [B, Hkv, T, D];
    allowed/evicted [B, Hkv, 1, T, T]; sparse_out [B, Hq, T, D], psi_k [B, Hkv, T, R] and lse [B, Hkv, g, T] when
    already computed. Returns [B, Hq, T, D] float32."""
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    g = Hq // Hkv
    if sparse_out is None:
        sparse_out, _ = reference.attention(q.float(), k.float(), v.float(), None, None, scaling, allowed=allowed)
    if lse is None:
        lse = sparse_lse(q, k, allowed, scaling)
    num, den = parallel_lowrank(maps.phi(q), maps.psi(k) if psi_k is None else psi_k, v, evicted)
    out = merge_lowrank(sparse_out.reshape(B, Hkv, g, T, D), lse, num, den)
    return out.view(B, Hq, T, D)


# ---------------------------------------------------------------------------------------------------------------


class LowRankStore(Store):
    """A sparse store (DenseStore or any store whose `keep` returns the evicted k, v, pos) plus the LESS state.

    H [B, Hkv, R, D] and z [B, Hkv, R] are float32 and allocated with the first tokens, so `nbytes()` counts them
    from the start and they stay the same size however long the sequence grows."""

    def __init__(self, inner: Store, maps: FeatureMaps):
        self.__dict__["inner"] = inner
        self.maps = maps
        self.H: torch.Tensor | None = None
        self.z: torch.Tensor | None = None
        self.absorbed = 0  # tokens folded into the state so far (all sequences and heads)

    # the policy-facing view is the inner store's -------------------------------------------------------------------
    @property
    def n(self) -> int:
        return self.inner.n

    def keys(self) -> torch.Tensor:
        return self.inner.keys()

    def values(self) -> torch.Tensor:
        return self.inner.values()

    def __getattr__(self, name):  # k, v, pos, rpos and any extra field of the inner store
        inner = self.__dict__.get("inner")
        if inner is None:
            raise AttributeError(name)
        return getattr(inner, name)

    def __setattr__(self, name, value):
        if name in ("k", "v", "pos", "rpos"):
            setattr(self.inner, name, value)
        else:
            super().__setattr__(name, value)

    # state ---------------------------------------------------------------------------------------------------------
    def _ensure_state(self, k: torch.Tensor) -> None:
        if self.H is None:
            B, Hkv, _, D = k.shape
            R = self.maps.rank
            self.H = torch.zeros(B, Hkv, R, D, dtype=torch.float32, device=k.device)
            self.z = torch.zeros(B, Hkv, R, dtype=torch.float32, device=k.device)
            if next(self.maps.parameters()).device != k.device:
                self.maps.to(k.device)

    def absorb(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> None:
        """Fold evicted tokens into the state: k, v [B, Hkv, m, D] (after RoPE), pos [B, Hkv, m] (-1: padding)."""
        self._ensure_state(k)
        with torch.no_grad():
            f = self.maps.psi(k) * (pos >= 0)[..., None]  # [B, Hkv, m, R]
            self.H += torch.einsum("bhmr,bhmd->bhrd", f, v.float())
            self.z += f.sum(2)
        self.absorbed += int((pos >= 0).sum())

    def state_nbytes(self) -> int:
        return _nbytes(self.H, self.z)

    # store protocol ------------------------------------------------------------------------------------------------
    def attend(self, q, k_new, v_new, pos_new, qpos, scaling, return_probs=False):
        self._ensure_state(k_new)
        if self.absorbed and q.shape[2] == 1 and not return_probs and type(self.inner) is DenseStore \
                and self.inner.k is not None and use_triton(q.device):
            return self._decode_fused(q, k_new, v_new, pos_new, qpos, scaling), None
        out, probs = self.inner.attend(q, k_new, v_new, pos_new, qpos, scaling, return_probs=return_probs)
        if self.absorbed == 0:
            return out, probs
        B, Hq, t, D = q.shape
        Hkv = k_new.shape[1]
        g = Hq // Hkv
        k_old = self.inner.keys() if self.inner.n else None
        k_all = k_new if k_old is None else torch.cat([k_old.to(k_new.dtype), k_new], dim=2)
        kpos = pos_new if k_old is None else torch.cat([self.inner.pos.to(pos_new.dtype), pos_new], dim=2)
        lse = sparse_lse(q, k_all, reference.allowed_mask(kpos, qpos), scaling)  # [B, Hkv, g, t]
        with torch.no_grad():
            phi = self.maps.phi(q).view(B, Hkv, g, t, -1)
        num = torch.matmul(phi, self.H[:, :, None])  # [B, Hkv, g, t, D]
        den = torch.matmul(phi, self.z[:, :, None, :, None]).squeeze(-1)  # [B, Hkv, g, t]
        merged = merge_lowrank(out.reshape(B, Hkv, g, t, D), lse, num, den)
        return merged.view(B, Hq, t, D).to(out.dtype), probs

    def _decode_fused(self, q, k_new, v_new, pos_new, qpos, scaling):
        """One query per sequence: the Triton decode kernel adds the low-rank term itself (kvx/kernels/decode.py)."""
        from kvx.kernels.decode import decode_attention

        inner = self.inner
        k = torch.cat([inner.k, k_new], dim=2)
        v = torch.cat([inner.v, v_new], dim=2)
        pos = torch.cat([inner.pos, pos_new.to(inner.pos.dtype)], dim=2)
        with torch.no_grad():
            phi = self.maps.phi(q)[:, :, 0]  # [B, Hq, R]
        out, _ = decode_attention(q[:, :, 0], k, v, None, scaling, kpos=pos, qpos=qpos[:, 0], phi_q=phi, H=self.H,
                                  z=self.z)
        return out[:, :, None]

    def append(self, k_new, v_new, pos_new) -> None:
        self._ensure_state(k_new)
        self.inner.append(k_new, v_new, pos_new)

    def keep(self, idx: torch.Tensor) -> dict | None:
        evicted = self.inner.keep(idx)
        if evicted is not None:
            missing = [key for key in ("k", "v", "pos") if key not in evicted]
            if missing:
                raise TypeError(f"{type(self.inner).__name__}.keep must return the evicted k, v and pos for LESS; "
                                f"missing {missing}")
            self.absorb(evicted["k"], evicted["v"], evicted["pos"])
        return evicted

    @property
    def slot_moves(self) -> bool:
        return bool(getattr(self.inner, "slot_moves", False))

    def move_slots(self, dst: torch.Tensor, src: torch.Tensor, m: int, drop: torch.Tensor | None = None) -> None:
        """Eviction by slot moves (kvx.cache.dense.swap_moves): the dropped slots are folded into the state first."""
        if drop is not None:
            ev = self.inner.gather_slots(drop.sort(dim=-1).values)
            self.absorb(ev["k"], ev["v"], ev["pos"])
        self.inner.move_slots(dst, src, m)

    def nbytes(self) -> int:
        return self.inner.nbytes() + self.state_nbytes()

    def aux_nbytes(self) -> int:
        return self.inner.aux_nbytes()

    def masked_attention(self, q, k, v, allowed, scaling, evicted=None):
        """Masked mode: the sparse attention of the inner store merged with the parallel form of the state.

        Also leaves in H, z the state a stream run holds when the window's last token is attended."""
        self._ensure_state(k)
        out = self.inner.masked_attention(q, k, v, allowed, scaling, evicted)
        if evicted is None or not bool(evicted.any()):
            return out
        with torch.no_grad():
            psi = self.maps.psi(k)  # [B, Hkv, T, R]
            last = evicted[:, :, 0, -1, :].float()  # [B, Hkv, T]: absorbed before the last query
            self.H = torch.einsum("bhtr,bhtd->bhrd", psi * last[..., None], v.float())
            self.z = (psi * last[..., None]).sum(2)
            self.absorbed = int(last.sum())
            merged = less_attention_parallel(q, k, v, allowed, evicted, scaling, self.maps, sparse_out=out, psi_k=psi)
        return merged.to(out.dtype)
