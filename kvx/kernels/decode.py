"""Decode attention over a compressed cache: one query token per sequence, GQA, variable kept lengths.

Shapes (B sequences, Hq query heads, Hkv KV heads, g = Hq // Hkv, N slots, D head dim, R low-rank features):
    q        [B, Hq, D]          the new token's queries (after RoPE)
    k, v     [B, Hkv, N, D]      stored keys/values per KV head (never repeated for GQA)
    lengths  [B, Hkv]            slots kept per (sequence, KV head); slots at or beyond the length are ignored.
                                 None: all N slots.
    kpos     [B, Hkv, N]         optional token index per slot (-1 = padding); with qpos [B] the position rule of
                                 kvx.kernels.reference applies: a slot is read when 0 <= kpos <= qpos (or qpos < 0)
    phi_q    [B, Hq, R]          optional low-rank term (LESS): phi(q), with the state H [B, Hkv, R, D] and
    H, z                         z [B, Hkv, R] of the KV head the query head reads
Query head h reads KV head h // g.

Output, accumulated in fp32 and returned in q's dtype:
    out[b, h] = (phi_q·H + sum_kept e^{s_j} v_j) / (phi_q·z + sum_kept e^{s_j}),   s_j = scaling * q·k_j
computed shifted by c = max_j s_j (c = max(max_j s_j, 0) with the low-rank term, so that e^{-c} never overflows):
both numerator and denominator are multiplied by e^{-c}, which changes nothing but keeps every exponent <= 0.
With `return_scores`, also the attention weight of each slot summed over the query heads of its group,
scores [B, Hkv, N] (fp32, 0 for ignored slots): what H2O-style accumulators add per step, without a T x T matrix.

`decode_attention_ref` is the pure-torch twin of the Triton kernel `kvx.kernels.decode_triton.decode_attention_triton`
(same arguments; the Triton one adds tuning knobs). `decode_attention` picks one with `kvx.kernels.use_triton`.
"""

from __future__ import annotations

import torch

from kvx.kernels import use_triton


def check_decode_args(q, k, v, lengths, kpos, qpos, phi_q, H, z) -> tuple[int, int, int, int, int]:
    """Validate shapes; returns (B, Hq, Hkv, N, D)."""
    if q.dim() != 3 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"decode attention wants q [B, Hq, D] and k, v [B, Hkv, N, D]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, Hq, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    if k.shape[0] != B or k.shape[3] != D or Hq % Hkv:
        raise ValueError(f"q {tuple(q.shape)} does not match k {tuple(k.shape)} (Hq must be a multiple of Hkv)")
    if lengths is not None and tuple(lengths.shape) != (B, Hkv):
        raise ValueError(f"lengths must be [B, Hkv] = {(B, Hkv)}, got {tuple(lengths.shape)}")
    if (kpos is None) != (qpos is None):
        raise ValueError("kpos and qpos go together")
    if kpos is not None and (tuple(kpos.shape) != (B, Hkv, N) or tuple(qpos.shape) != (B,)):
        raise ValueError(f"kpos must be [B, Hkv, N] and qpos [B]; got {tuple(kpos.shape)}, {tuple(qpos.shape)}")
    lr = [x is not None for x in (phi_q, H, z)]
    if any(lr) and not all(lr):
        raise ValueError("the low-rank term needs phi_q, H and z together")
    if all(lr):
        R = phi_q.shape[-1]
        if tuple(phi_q.shape) != (B, Hq, R) or tuple(H.shape) != (B, Hkv, R, D) or tuple(z.shape) != (B, Hkv, R):
            raise ValueError(f"low-rank shapes: phi_q [B, Hq, R], H [B, Hkv, R, D], z [B, Hkv, R]; got "
                             f"{tuple(phi_q.shape)}, {tuple(H.shape)}, {tuple(z.shape)}")
    return B, Hq, Hkv, N, D


def slot_mask(B, Hkv, N, lengths, kpos, qpos, device) -> torch.Tensor:
    """[B, Hkv, N] True where a slot is read."""
    valid = torch.ones(B, Hkv, N, dtype=torch.bool, device=device)
    if lengths is not None:
        valid = torch.arange(N, device=device) < lengths[..., None].to(device)
    if kpos is not None:
        qp = qpos.to(device)[:, None, None]
        valid = valid & (((kpos >= 0) & (kpos <= qp)) | (qp < 0))
    return valid


def decode_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor | None,
    scaling: float,
    kpos: torch.Tensor | None = None,
    qpos: torch.Tensor | None = None,
    phi_q: torch.Tensor | None = None,
    H: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    return_scores: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Pure-torch decode attention (see the module docstring). Returns out [B, Hq, D] and scores [B, Hkv, N] or None."""
    B, Hq, Hkv, N, D = check_decode_args(q, k, v, lengths, kpos, qpos, phi_q, H, z)
    g = Hq // Hkv
    qg = q.float().view(B, Hkv, g, D)
    s = torch.matmul(qg, k.float().transpose(-1, -2)) * scaling  # [B, Hkv, g, N]
    valid = slot_mask(B, Hkv, N, lengths, kpos, qpos, q.device)[:, :, None]  # [B, Hkv, 1, N]
    s = s.masked_fill(~valid, float("-inf"))
    shift = s.amax(dim=-1) if N else torch.full((B, Hkv, g), float("-inf"), device=q.device)  # [B, Hkv, g]
    low_rank = phi_q is not None
    if low_rank:
        shift = shift.clamp(min=0.0)
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    p = torch.exp(s - shift[..., None])  # [B, Hkv, g, N]; 0 where ignored
    num = torch.matmul(p, v.float())  # [B, Hkv, g, D]
    den = p.sum(dim=-1)  # [B, Hkv, g]
    if low_rank:
        pq = phi_q.float().view(B, Hkv, g, -1)  # [B, Hkv, g, R]
        e = torch.exp(-shift)
        num = num + torch.matmul(pq, H.float()) * e[..., None]
        den = den + (pq * z.float()[:, :, None, :]).sum(-1) * e
    safe = torch.where(den != 0, den, torch.ones_like(den))
    out = torch.where((den != 0)[..., None], num / safe[..., None], torch.zeros_like(num))
    scores = None
    if return_scores:
        scores = (p / safe[..., None]).masked_fill((den == 0)[..., None], 0.0).sum(dim=2)  # [B, Hkv, N]
    return out.reshape(B, Hq, D).to(q.dtype), scores


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor | None,
    scaling: float,
    kpos: torch.Tensor | None = None,
    qpos: torch.Tensor | None = None,
    phi_q: torch.Tensor | None = None,
    H: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    return_scores: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Decode attention through the backend `kvx.kernels.use_triton(q.device)` selects."""
    if use_triton(q.device):
        from kvx.kernels.decode_triton import decode_attention_triton

        return decode_attention_triton(q, k, v, lengths, scaling, kpos, qpos, phi_q, H, z, return_scores)
    return decode_attention_ref(q, k, v, lengths, scaling, kpos, qpos, phi_q, H, z, return_scores)
