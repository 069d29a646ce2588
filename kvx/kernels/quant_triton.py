"""Triton kernels for bit-packed quantized rows; twins of `kvx.kernels.quant` (same arguments, same results).

    pack_rows_triton               grid (ceil(M / BLOCK_R),): each program quantizes and packs BLOCK_R rows; every
                                   output byte gathers its 8 bits from the elements that cover them.
    dequant_rows_triton            grid (ceil(M / BLOCK_R),): unpack + dequantize + restore outliers/exact rows.
    decode_attention_quant_triton  split-K (flash-decoding): grid (B * Hkv, S); program (bh, s) reads split s of one
                                   KV head's slots (packed rows, dequantized in registers and never written back,
                                   then the full-precision tail), for all g query heads of the group, with an
                                   online softmax in fp32, and writes its partial max, sum and numerator; a
                                   reduction over the splits gives the output and the log-sum-exp. Optionally
                                   writes the scaled logits (for policies that need attention weights).
The outlier loop runs to the largest outlier count of a row as a runtime bound (no recompilation when it changes).
Products use broadcast multiply + sum (no tl.dot), so any head dim and group size is legal on a GPU as in the
interpreter. Layout and quantizer: see kvx/kernels/quant.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvx.kernels.quant import PackedRows


def _p2(n: int, lo: int = 2) -> int:
    return max(lo, triton.next_power_of_2(max(int(n), 1)))


def _nonempty(t: torch.Tensor) -> torch.Tensor:
    """Kernels take a pointer even to an empty array (never dereferenced): give them one element."""
    return t if t.numel() else torch.zeros(1, dtype=t.dtype, device=t.device)


@triton.jit
def _dequant_tile(BUF, L, OFF, BITS, SROW, ZERO, DELTA, OSTART, OCNT, OCOL, OVAL, XVAL,
                  rows, rmask, cols, cmask, NG, GSZ, OMAX):
    """Dequantized values [BLOCK_R, BLOCK_D] (fp32) of packed rows `rows` (int64 indices)."""
    off = tl.load(OFF + rows, mask=rmask, other=0)
    b = tl.load(BITS + rows, mask=rmask, other=0).to(tl.int32)
    s = tl.load(SROW + rows, mask=rmask, other=0)
    m2 = rmask[:, None] & cmask[None, :]
    bp = cols[None, :] * b[:, None]
    byte = off[:, None] + (bp >> 3)
    sh = bp & 7
    b0 = tl.load(BUF + byte, mask=m2 & (byte < L), other=0).to(tl.int32)
    b1 = tl.load(BUF + byte + 1, mask=m2 & (byte + 1 < L), other=0).to(tl.int32)
    b2 = tl.load(BUF + byte + 2, mask=m2 & (byte + 2 < L), other=0).to(tl.int32)
    w = b0 | (b1 << 8) | (b2 << 16)
    bc = tl.minimum(b, 15)
    code = (w >> sh) & ((1 << bc[:, None]) - 1)
    sidx = s[:, None] * NG + cols[None, :] // GSZ
    z = tl.load(ZERO + sidx, mask=m2, other=0.0).to(tl.float32)
    d = tl.load(DELTA + sidx, mask=m2, other=0.0).to(tl.float32)
    x = z + (code.to(tl.float32) + 0.5) * d
    ostart = tl.load(OSTART + rows, mask=rmask, other=0)
    ocnt = tl.load(OCNT + rows, mask=rmask, other=0)
    exact = b >= 16
    xe = tl.load(XVAL + ostart[:, None] + cols[None, :], mask=m2 & exact[:, None], other=0.0).to(tl.float32)
    x = tl.where(exact[:, None], xe, x)
    for j in range(0, OMAX):
        has = (j < ocnt) & (b < 16) & rmask
        oc = tl.load(OCOL + ostart + j, mask=has, other=-1).to(tl.int32)
        ov = tl.load(OVAL + ostart + j, mask=has, other=0.0).to(tl.float32)
        x = tl.where(has[:, None] & (cols[None, :] == oc[:, None]), ov[:, None], x)
    return x


@triton.jit
def _pack_kernel(X, BITS, OFF, SROW, ZERO, DELTA, OUT, M, D, NG, GSZ,
                 BLOCK_R: tl.constexpr, BLOCK_B: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < M
    rows64 = rows.to(tl.int64)
    b = tl.load(BITS + rows64, mask=rmask, other=0).to(tl.int32)
    off = tl.load(OFF + rows64, mask=rmask, other=0)
    s = tl.load(SROW + rows64, mask=rmask, other=0)
    nb = (D * b + 7) // 8
    ks = tl.arange(0, BLOCK_B)
    kmask = rmask[:, None] & (ks[None, :] < nb[:, None]) & (b[:, None] > 0) & (b[:, None] < 16)
    bsafe = tl.maximum(b, 1)[:, None]
    top = ((1 << tl.minimum(b, 15)) - 1).to(tl.float32)[:, None]
    acc = tl.zeros([BLOCK_R, BLOCK_B], dtype=tl.int32)
    for j in tl.static_range(8):
        g = ks[None, :] * 8 + j
        e = g // bsafe
        i = g - e * bsafe
        em = kmask & (e < D)
        xv = tl.load(X + rows64[:, None] * D + e, mask=em, other=0.0).to(tl.float32)
        sidx = s[:, None] * NG + e // GSZ
        z = tl.load(ZERO + sidx, mask=em, other=0.0).to(tl.float32)
        d = tl.load(DELTA + sidx, mask=em, other=0.0).to(tl.float32)
        pos = d > 0
        c = tl.floor(tl.math.div_rn(xv - z, tl.where(pos, d, 1.0)))
        c = tl.where(pos, c, 0.0)
        c = tl.minimum(tl.maximum(c, 0.0), top)
        bit = (c.to(tl.int32) >> i) & 1
        acc = acc | tl.where(em, bit << j, 0)
    tl.store(OUT + off[:, None] + ks[None, :], acc.to(tl.uint8), mask=kmask)


@triton.jit
def _dequant_kernel(BUF, L, OFF, BITS, SROW, ZERO, DELTA, OSTART, OCNT, OCOL, OVAL, XVAL, OUT, M, D, NG, GSZ,
                    OMAX, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    rows = (pid * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    rmask = rows < M
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    x = _dequant_tile(BUF, L, OFF, BITS, SROW, ZERO, DELTA, OSTART, OCNT, OCOL, OVAL, XVAL,
                      rows, rmask, cols, cmask, NG, GSZ, OMAX)
    tl.store(OUT + rows[:, None] * D + cols[None, :], x.to(OUT.dtype.element_ty),
             mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _online(s, v, m_i, l_i, acc):
    """One block of the online softmax: logits s [BLOCK_G, BLOCK_N], values v [BLOCK_N, BLOCK_D]."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_safe)
    p = tl.exp(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
    return m_new, l_i, acc


@triton.jit
def _decode_kernel(Q, KPOS, TK, TV, TPOS, QPOS, PM, PL, PACC, LOGITS,
                   KBUF, KL, KOFF, KBITS, KSROW, KZERO, KDELTA, KOSTART, KOCNT, KOCOL, KOVAL, KXVAL, KNG, KGSZ,
                   VBUF, VL, VOFF, VBITS, VSROW, VZERO, VDELTA, VOSTART, VOCNT, VOCOL, VOVAL, VXVAL, VNG, VGSZ,
                   scaling, HKV, NQ, NT, D, S, SPLIT_LEN, KOMAX, VOMAX,
                   G: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   WRITE_LOGITS: tl.constexpr):
    pid = tl.program_id(0)
    sp = tl.program_id(1)
    bi = pid // HKV
    h = pid % HKV
    offs_g = tl.arange(0, BLOCK_G)
    g_ok = offs_g < G
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    hq = h * G + offs_g
    q_off = (bi * HKV * G + hq).to(tl.int64)
    q = tl.load(Q + q_off[:, None] * D + cols[None, :], mask=g_ok[:, None] & cmask[None, :], other=0.0)
    q = q.to(tl.float32) * scaling
    qp = tl.load(QPOS + bi)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    NTOT = NQ + NT
    start = sp * SPLIT_LEN
    end = tl.minimum(start + SPLIT_LEN, NTOT)
    lrow = q_off * NTOT
    # packed rows of this split ------------------------------------------------------------------------------------
    for n0 in range(start, tl.minimum(end, NQ), BLOCK_N):
        slots = n0 + tl.arange(0, BLOCK_N)
        smask = slots < tl.minimum(end, NQ)
        rows = pid.to(tl.int64) * NQ + slots
        kp = tl.load(KPOS + rows, mask=smask, other=-1)
        ok = smask & (((kp >= 0) & (kp <= qp)) | (qp < 0))
        k = _dequant_tile(KBUF, KL, KOFF, KBITS, KSROW, KZERO, KDELTA, KOSTART, KOCNT, KOCOL, KOVAL, KXVAL,
                          rows, smask, cols, cmask, KNG, KGSZ, KOMAX)
        v = _dequant_tile(VBUF, VL, VOFF, VBITS, VSROW, VZERO, VDELTA, VOSTART, VOCNT, VOCOL, VOVAL, VXVAL,
                          rows, smask, cols, cmask, VNG, VGSZ, VOMAX)
        s = tl.sum(q[:, None, :] * k[None, :, :], axis=2)  # [BLOCK_G, BLOCK_N]
        s = tl.where(ok[None, :], s, float("-inf"))
        if WRITE_LOGITS:
            tl.store(LOGITS + lrow[:, None] + slots[None, :], s, mask=g_ok[:, None] & smask[None, :])
        m_i, l_i, acc = _online(s, v, m_i, l_i, acc)
    # full-precision tail (residual window + new token) of this split ------------------------------------------------
    for n0 in range(tl.maximum(start, NQ), end, BLOCK_N):
        slots = n0 - NQ + tl.arange(0, BLOCK_N)
        smask = slots < end - NQ
        rows = pid.to(tl.int64) * NT + slots
        tp = tl.load(TPOS + rows, mask=smask, other=-1)
        ok = smask & (((tp >= 0) & (tp <= qp)) | (qp < 0))
        m2 = smask[:, None] & cmask[None, :]
        k = tl.load(TK + rows[:, None] * D + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        v = tl.load(TV + rows[:, None] * D + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        s = tl.sum(q[:, None, :] * k[None, :, :], axis=2)
        s = tl.where(ok[None, :], s, float("-inf"))
        if WRITE_LOGITS:
            tl.store(LOGITS + lrow[:, None] + NQ + slots[None, :], s, mask=g_ok[:, None] & smask[None, :])
        m_i, l_i, acc = _online(s, v, m_i, l_i, acc)
    prow = (pid * S + sp).to(tl.int64) * G + offs_g
    tl.store(PM + prow, m_i, mask=g_ok)
    tl.store(PL + prow, l_i, mask=g_ok)
    tl.store(PACC + prow[:, None] * D + cols[None, :], acc, mask=g_ok[:, None] & cmask[None, :])


def _rows_args(p: PackedRows) -> list:
    return [_nonempty(p.buf), p.buf.numel(), _nonempty(p.off.contiguous()), _nonempty(p.bits.contiguous()),
            _nonempty(p.srow.contiguous()), _nonempty(p.zero.contiguous()), _nonempty(p.delta.contiguous()),
            _nonempty(p.ostart.contiguous()), _nonempty(p.ocnt.contiguous()), _nonempty(p.ocol), _nonempty(p.oval),
            _nonempty(p.xval)]


def pack_rows_triton(x, bits, off, zero, delta, srow, gsz: int, nbytes: int, block_r: int = 16) -> torch.Tensor:
    M, D = x.shape
    out = torch.zeros(max(nbytes, 1), dtype=torch.uint8, device=x.device)
    if M and nbytes:
        maxb = int(bits.long().clamp(max=15).max())
        block_b = _p2((D * maxb + 7) // 8)
        grid = (triton.cdiv(M, block_r),)
        _pack_kernel[grid](x.contiguous(), bits.contiguous(), off.contiguous(), srow.contiguous(),
                           _nonempty(zero.contiguous()), _nonempty(delta.contiguous()), out, M, D, zero.shape[-1],
                           gsz, BLOCK_R=block_r, BLOCK_B=block_b)
    return out[:nbytes]


def dequant_rows_triton(p: PackedRows, out_dtype: torch.dtype, block_r: int = 16) -> torch.Tensor:
    M, D = p.n_rows, p.D
    out = torch.empty(M, D, dtype=out_dtype, device=p.off.device)
    if M:
        grid = (triton.cdiv(M, block_r),)
        _dequant_kernel[grid](*_rows_args(p), out, M, D, p.n_groups, p.gsz, p.omax(), BLOCK_R=block_r,
                              BLOCK_D=_p2(D))
    return out


def _num_splits(B: int, Hkv: int, n_blocks: int, device: torch.device) -> int:
    """Enough programs to fill the GPU (about 4 per SM), no more splits than blocks of slots."""
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        target = 4 * torch.cuda.get_device_properties(idx).multi_processor_count
    else:
        target = 4
    return max(1, min(n_blocks, triton.cdiv(target, B * Hkv)))


def decode_attention_quant_triton(q, kp: PackedRows, vp: PackedRows, kpos, tk, tv, tpos, qpos, scaling: float,
                                  return_logits: bool = False, block_n: int = 16, num_splits: int | None = None):
    """Split-K twin of decode_attention_quant_ref: `num_splits` programs per (sequence, KV head) (default: fill the
    device), each over a contiguous range of slots, merged by a log-sum-exp reduction."""
    B, Hq, D = q.shape
    Hkv, NQ = kpos.shape[1], kpos.shape[2]
    NT = tk.shape[2]
    g = Hq // Hkv
    dev = q.device
    q = q.contiguous()
    NTOT = NQ + NT
    n_blocks = max(1, triton.cdiv(NTOT, block_n))
    S = num_splits if num_splits is not None else _num_splits(B, Hkv, n_blocks, dev)
    S = max(1, min(int(S), n_blocks))
    split_len = triton.cdiv(n_blocks, S) * block_n
    S = max(1, triton.cdiv(max(NTOT, 1), split_len))
    pm = torch.empty(B * Hkv * S * g, dtype=torch.float32, device=dev)
    pl = torch.empty_like(pm)
    pacc = torch.empty(B * Hkv * S * g * D, dtype=torch.float32, device=dev)
    logits = torch.empty(B, Hq, NTOT, dtype=torch.float32, device=dev) if return_logits else pm
    _decode_kernel[(B * Hkv, S)](
        q, _nonempty(kpos.contiguous()), _nonempty(tk.contiguous()), _nonempty(tv.contiguous()),
        _nonempty(tpos.contiguous()), qpos.contiguous(), pm, pl, pacc, logits,
        *_rows_args(kp), kp.n_groups, kp.gsz,
        *_rows_args(vp), vp.n_groups, vp.gsz,
        float(scaling), Hkv, NQ, NT, D, S, split_len, kp.omax(), vp.omax(),
        G=g, BLOCK_G=_p2(g), BLOCK_N=block_n, BLOCK_D=_p2(D), WRITE_LOGITS=return_logits,
    )
    # reduction over the splits: out = sum_s acc_s e^(m_s - M) / sum_s l_s e^(m_s - M), lse = M + log(den)
    pm = pm.view(B, Hkv, S, g)
    mx = pm.amax(2, keepdim=True)
    w = torch.exp(pm - torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx)))
    w = torch.where(torch.isfinite(pm), w, torch.zeros_like(w))
    den = (pl.view(B, Hkv, S, g) * w).sum(2)  # [B, Hkv, g]
    num = (pacc.view(B, Hkv, S, g, D) * w[..., None]).sum(2)
    out = (num / den[..., None]).reshape(B, Hq, D).to(q.dtype)
    lse = (mx.squeeze(2) + torch.log(den)).reshape(B, Hq)
    return out, (logits if return_logits else None), lse
