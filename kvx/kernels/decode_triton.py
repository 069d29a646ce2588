"""Triton split-K (flash-decoding) decode attention over a compressed cache, GQA-packed.

Twin of `kvx.kernels.decode.decode_attention_ref` (same arguments and results; see kvx/kernels/decode.py).
Three launches:
  1. split:   grid (B * Hkv, S). Each program reads one KV head's slots in one split of the kept length, for all g
              query heads of the group at once (rows padded to >= 16 for tl.dot), with an online softmax in fp32;
              writes its partial max m, sum l and numerator acc.
  2. combine: grid (B * Hkv,). Merges the splits with the common shift c (max of m; max(., 0) with the low-rank
              term), adds e^{-c} (phi_q·H, phi_q·z), divides, writes out; keeps c and the denominator for 3.
  3. scores:  grid (B * Hkv, S), only with return_scores: recomputes each slot's logit and writes
              sum over the group of e^{s - c} / den.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from kvx.kernels.decode import check_decode_args


@triton.jit
def _split_kernel(
    Q, K, V, LEN, KPOS, QPOS, PM, PL, PACC,
    sqb, sqh, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    slb, slh,
    spb, sph, spn,
    sqpb,
    scaling, HKV, N, S, SPLIT_LEN,
    G: tl.constexpr, D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_LEN: tl.constexpr, HAS_POS: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid = tl.program_id(0)
    sp = tl.program_id(1)
    b = (pid // HKV).to(tl.int64)  # int64: base offsets of a large cache exceed int32
    kh = (pid % HKV).to(tl.int64)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    g_ok = offs_g < G
    d_ok = offs_d < D
    q = tl.load(Q + b * sqb + (kh * G + offs_g)[:, None] * sqh + offs_d[None, :] * sqd,
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_G, BLOCK_D]
    if HAS_LEN:
        length = tl.load(LEN + b * slb + kh * slh).to(tl.int32)
        length = tl.minimum(length, N)
    else:
        length = N
    if HAS_POS:
        qp = tl.load(QPOS + b * sqpb)
    start = sp * SPLIT_LEN
    end = tl.minimum(start + SPLIT_LEN, length)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    k_base = K + b * skb + kh * skh
    v_base = V + b * svb + kh * svh
    for n0 in range(start, end, BLOCK_N):
        offs = n0 + offs_n
        n_ok = offs < end
        kb = tl.load(k_base + offs[:, None] * skn + offs_d[None, :] * skd, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        s = tl.dot(q, tl.trans(kb), input_precision=DOT_PREC) * scaling  # [BLOCK_G, BLOCK_N] fp32
        ok = n_ok
        if HAS_POS:
            kp = tl.load(KPOS + b * spb + kh * sph + offs * spn, mask=n_ok, other=-1)
            ok = ok & (((kp >= 0) & (kp <= qp)) | (qp < 0))
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        vb = tl.load(v_base + offs[:, None] * svn + offs_d[None, :] * svd, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(vb.dtype), vb, input_precision=DOT_PREC)
        m_i = m_new
    row = pid * S + sp
    tl.store(PM + row * G + offs_g, m_i, mask=g_ok)
    tl.store(PL + row * G + offs_g, l_i, mask=g_ok)
    tl.store(PACC + (row * G + offs_g)[:, None] * D + offs_d[None, :], acc, mask=g_ok[:, None] & d_ok[None, :])


@triton.jit
def _combine_kernel(
    PM, PL, PACC, O, PHI, HS, ZS, SHIFT, DEN,
    sob, soh, sod,
    sfb, sfh, sfr,
    shb, shh, shr, shd,
    szb, szh, szr,
    HKV, S,
    G: tl.constexpr, D: tl.constexpr, R: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
    HAS_LR: tl.constexpr, KEEP_STATS: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // HKV).to(tl.int64)
    kh = (pid % HKV).to(tl.int64)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    g_ok = offs_g < G
    d_ok = offs_d < D
    gd_ok = g_ok[:, None] & d_ok[None, :]
    mx = tl.full([BLOCK_G], float("-inf"), tl.float32)
    for s in range(0, S):
        m_s = tl.load(PM + (pid * S + s) * G + offs_g, mask=g_ok, other=float("-inf"))
        mx = tl.maximum(mx, m_s)
    if HAS_LR:
        mx = tl.maximum(mx, 0.0)
    shift = tl.where(mx == float("-inf"), 0.0, mx)
    num = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    den = tl.zeros([BLOCK_G], tl.float32)
    for s in range(0, S):
        row = pid * S + s
        m_s = tl.load(PM + row * G + offs_g, mask=g_ok, other=float("-inf"))
        l_s = tl.load(PL + row * G + offs_g, mask=g_ok, other=0.0)
        a_s = tl.load(PACC + (row * G + offs_g)[:, None] * D + offs_d[None, :], mask=gd_ok, other=0.0)
        w = tl.exp(m_s - shift)
        num += a_s * w[:, None]
        den += l_s * w
    if HAS_LR:
        offs_r = tl.arange(0, BLOCK_R)
        r_ok = offs_r < R
        phi = tl.load(PHI + b * sfb + (kh * G + offs_g)[:, None] * sfh + offs_r[None, :] * sfr,
                      mask=g_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)  # [BLOCK_G, BLOCK_R]
        hs = tl.load(HS + b * shb + kh * shh + offs_r[:, None] * shr + offs_d[None, :] * shd,
                     mask=r_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)  # [BLOCK_R, BLOCK_D]
        zs = tl.load(ZS + b * szb + kh * szh + offs_r * szr, mask=r_ok, other=0.0).to(tl.float32)  # [BLOCK_R]
        e = tl.exp(-shift)
        num += tl.dot(phi, hs, input_precision="ieee") * e[:, None]
        den += tl.sum(phi * zs[None, :], axis=1) * e
    nz = den != 0.0
    safe = tl.where(nz, den, 1.0)
    out = tl.where(nz[:, None], num / safe[:, None], 0.0)
    tl.store(O + b * sob + (kh * G + offs_g)[:, None] * soh + offs_d[None, :] * sod,
             out.to(O.dtype.element_ty), mask=gd_ok)
    if KEEP_STATS:
        tl.store(SHIFT + pid * G + offs_g, shift, mask=g_ok)
        tl.store(DEN + pid * G + offs_g, den, mask=g_ok)


@triton.jit
def _scores_kernel(
    Q, K, LEN, KPOS, QPOS, SHIFT, DEN, SC,
    sqb, sqh, sqd,
    skb, skh, skn, skd,
    slb, slh,
    spb, sph, spn,
    sqpb,
    scaling, HKV, N, SPLIT_LEN,
    G: tl.constexpr, D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_LEN: tl.constexpr, HAS_POS: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid = tl.program_id(0)
    sp = tl.program_id(1)
    b = (pid // HKV).to(tl.int64)  # int64: base offsets of a large cache exceed int32
    kh = (pid % HKV).to(tl.int64)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    g_ok = offs_g < G
    d_ok = offs_d < D
    q = tl.load(Q + b * sqb + (kh * G + offs_g)[:, None] * sqh + offs_d[None, :] * sqd,
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)
    shift = tl.load(SHIFT + pid * G + offs_g, mask=g_ok, other=0.0)
    den = tl.load(DEN + pid * G + offs_g, mask=g_ok, other=0.0)
    inv = tl.where(g_ok & (den != 0.0), 1.0 / tl.where(den != 0.0, den, 1.0), 0.0)  # [BLOCK_G]
    if HAS_LEN:
        length = tl.load(LEN + b * slb + kh * slh).to(tl.int32)
        length = tl.minimum(length, N)
    else:
        length = N
    if HAS_POS:
        qp = tl.load(QPOS + b * sqpb)
    start = sp * SPLIT_LEN
    end = tl.minimum(start + SPLIT_LEN, length)
    k_base = K + b * skb + kh * skh
    for n0 in range(start, end, BLOCK_N):
        offs = n0 + offs_n
        n_ok = offs < end
        kb = tl.load(k_base + offs[:, None] * skn + offs_d[None, :] * skd, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        s = tl.dot(q, tl.trans(kb), input_precision=DOT_PREC) * scaling
        ok = n_ok
        if HAS_POS:
            kp = tl.load(KPOS + b * spb + kh * sph + offs * spn, mask=n_ok, other=-1)
            ok = ok & (((kp >= 0) & (kp <= qp)) | (qp < 0))
        p = tl.where(ok[None, :], tl.exp(s - shift[:, None]), 0.0) * inv[:, None]
        tl.store(SC + pid * N + offs, tl.sum(p, axis=0), mask=n_ok)


def _pow2(x: int, lo: int = 1) -> int:
    return max(lo, triton.next_power_of_2(max(int(x), 1)))


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _default_splits(B: int, Hkv: int, n_blocks: int, device: torch.device) -> int:
    """Enough programs to fill the GPU (about 4 per SM), but no more splits than blocks."""
    if device.type == "cuda":
        target = 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    else:
        target = 4
    return max(1, min(n_blocks, triton.cdiv(target, B * Hkv)))


def decode_attention_triton(
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
    *,
    num_splits: int | None = None,
    block_n: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Triton twin of `decode_attention_ref`. Tuning: `num_splits` (default: fill the device), `block_n` (>= 16)."""
    B, Hq, Hkv, N, D = check_decode_args(q, k, v, lengths, kpos, qpos, phi_q, H, z)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two >= 16, got {block_n}")
    G = Hq // Hkv
    dev = q.device
    out = torch.empty(B, Hq, D, dtype=q.dtype, device=dev)
    scores = torch.zeros(B, Hkv, N, dtype=torch.float32, device=dev) if return_scores else None
    if B == 0 or Hq == 0:
        return out, scores
    n_blocks = max(1, triton.cdiv(N, block_n))
    S = num_splits if num_splits is not None else _default_splits(B, Hkv, n_blocks, dev)
    S = max(1, min(int(S), n_blocks))
    split_len = triton.cdiv(n_blocks, S) * block_n
    S = max(1, triton.cdiv(max(N, 1), split_len))
    BLOCK_G, BLOCK_D = _pow2(G, 16), _pow2(D, 16)
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    pm = torch.empty(B * Hkv * S * G, dtype=torch.float32, device=dev)
    pl = torch.empty_like(pm)
    pacc = torch.empty(B * Hkv * S * G * D, dtype=torch.float32, device=dev)
    has_len, has_pos = lengths is not None, kpos is not None
    dummy = pm  # stands in for absent optional pointers (never read: guarded by constexpr flags)
    len_t = lengths if has_len else dummy
    sl = (lengths.stride(0), lengths.stride(1)) if has_len else (0, 0)
    kpos_t = kpos if has_pos else dummy
    sp = (kpos.stride(0), kpos.stride(1), kpos.stride(2)) if has_pos else (0, 0, 0)
    qpos_t = qpos if has_pos else dummy
    sqp = qpos.stride(0) if has_pos else 0
    _split_kernel[(B * Hkv, S)](
        q, k, v, len_t, kpos_t, qpos_t, pm, pl, pacc,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2), k.stride(3),
        v.stride(0), v.stride(1), v.stride(2), v.stride(3),
        *sl, *sp, sqp,
        float(scaling), Hkv, N, S, split_len,
        G=G, D=D, BLOCK_G=BLOCK_G, BLOCK_N=block_n, BLOCK_D=BLOCK_D,
        HAS_LEN=has_len, HAS_POS=has_pos, DOT_PREC=prec,
    )
    has_lr = phi_q is not None
    R = phi_q.shape[-1] if has_lr else 1
    shift = torch.empty(B * Hkv * G, dtype=torch.float32, device=dev) if return_scores else dummy
    den = torch.empty_like(shift) if return_scores else dummy
    _combine_kernel[(B * Hkv,)](
        pm, pl, pacc, out,
        phi_q if has_lr else dummy, H if has_lr else dummy, z if has_lr else dummy, shift, den,
        out.stride(0), out.stride(1), out.stride(2),
        *(phi_q.stride() if has_lr else (0, 0, 0)),
        *(H.stride() if has_lr else (0, 0, 0, 0)),
        *(z.stride() if has_lr else (0, 0, 0)),
        Hkv, S,
        G=G, D=D, R=R, BLOCK_G=BLOCK_G, BLOCK_D=BLOCK_D, BLOCK_R=_pow2(R, 16),
        HAS_LR=has_lr, KEEP_STATS=return_scores,
    )
    if return_scores and N:
        _scores_kernel[(B * Hkv, S)](
            q, k, len_t, kpos_t, qpos_t, shift, den, scores,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2), k.stride(3),
            *sl, *sp, sqp,
            float(scaling), Hkv, N, split_len,
            G=G, D=D, BLOCK_G=BLOCK_G, BLOCK_N=block_n, BLOCK_D=BLOCK_D,
            HAS_LEN=has_len, HAS_POS=has_pos, DOT_PREC=prec,
        )
    return out, scores
