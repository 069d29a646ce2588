"""Triton kernels for bit-packed quantized rows; twins of `kvx.kernels.quant` (same arguments, same results).

    pack_rows_triton               grid (ceil(M / BLOCK_R),): each program quantizes and packs BLOCK_R rows; every
                                   output byte gathers its 8 bits from the elements that cover them.
    dequant_rows_triton            grid (ceil(M / BLOCK_R),): unpack + dequantize + restore outliers/exact rows.
    decode_attention_quant_triton  grid (B * Hkv,): one query token per sequence; each program reads one KV head's
                                   packed rows (dequantized in registers, never written back) and then its
                                   full-precision tail, for all g query heads of the group, with an online softmax
                                   in fp32. Optionally writes the scaled logits (for policies that need attention
                                   weights) and always the log-sum-exp.
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
                  rows, rmask, cols, cmask, NG, GSZ, OMAX: tl.constexpr):
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
    for j in tl.static_range(OMAX):
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
                    OMAX: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
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
def _decode_kernel(Q, KPOS, TK, TV, TPOS, QPOS, OUTP, LOGITS, LSE,
                   KBUF, KL, KOFF, KBITS, KSROW, KZERO, KDELTA, KOSTART, KOCNT, KOCOL, KOVAL, KXVAL, KNG, KGSZ,
                   VBUF, VL, VOFF, VBITS, VSROW, VZERO, VDELTA, VOSTART, VOCNT, VOCOL, VOVAL, VXVAL, VNG, VGSZ,
                   scaling, HKV, NQ, NT, D,
                   G: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   KOMAX: tl.constexpr, VOMAX: tl.constexpr, WRITE_LOGITS: tl.constexpr):
    pid = tl.program_id(0)
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
    m_i = tl.full([BLOCK_G], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    NTOT = NQ + NT
    # packed rows ------------------------------------------------------------------------------------------------
    for start in range(0, NQ, BLOCK_N):
        slots = start + tl.arange(0, BLOCK_N)
        smask = slots < NQ
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
            lrow = (bi * HKV * G + hq).to(tl.int64) * NTOT
            tl.store(LOGITS + lrow[:, None] + slots[None, :], s, mask=g_ok[:, None] & smask[None, :])
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m_i = m_new
    # full-precision tail (residual window + new token) ----------------------------------------------------------------
    for start in range(0, NT, BLOCK_N):
        slots = start + tl.arange(0, BLOCK_N)
        smask = slots < NT
        rows = pid.to(tl.int64) * NT + slots
        tp = tl.load(TPOS + rows, mask=smask, other=-1)
        ok = smask & (((tp >= 0) & (tp <= qp)) | (qp < 0))
        m2 = smask[:, None] & cmask[None, :]
        k = tl.load(TK + rows[:, None] * D + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        v = tl.load(TV + rows[:, None] * D + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        s = tl.sum(q[:, None, :] * k[None, :, :], axis=2)
        s = tl.where(ok[None, :], s, float("-inf"))
        if WRITE_LOGITS:
            lrow = (bi * HKV * G + hq).to(tl.int64) * NTOT
            tl.store(LOGITS + lrow[:, None] + NQ + slots[None, :], s, mask=g_ok[:, None] & smask[None, :])
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m_i = m_new
    out = acc / l_i[:, None]
    o_off = (bi * HKV * G + hq).to(tl.int64)
    tl.store(OUTP + o_off[:, None] * D + cols[None, :], out.to(OUTP.dtype.element_ty),
             mask=g_ok[:, None] & cmask[None, :])
    tl.store(LSE + o_off, m_i + tl.log(l_i), mask=g_ok)


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
        _dequant_kernel[grid](*_rows_args(p), out, M, D, p.n_groups, p.gsz, OMAX=p.omax(), BLOCK_R=block_r,
                              BLOCK_D=_p2(D))
    return out


def decode_attention_quant_triton(q, kp: PackedRows, vp: PackedRows, kpos, tk, tv, tpos, qpos, scaling: float,
                                  return_logits: bool = False, block_n: int = 16):
    B, Hq, D = q.shape
    Hkv, NQ = kpos.shape[1], kpos.shape[2]
    NT = tk.shape[2]
    g = Hq // Hkv
    q = q.contiguous()
    out = torch.empty_like(q)
    lse = torch.empty(B, Hq, dtype=torch.float32, device=q.device)
    logits = torch.empty(B, Hq, NQ + NT, dtype=torch.float32, device=q.device) if return_logits else lse
    _decode_kernel[(B * Hkv,)](
        q, _nonempty(kpos.contiguous()), _nonempty(tk.contiguous()), _nonempty(tv.contiguous()),
        _nonempty(tpos.contiguous()), qpos.contiguous(), out, logits, lse,
        *_rows_args(kp), kp.n_groups, kp.gsz,
        *_rows_args(vp), vp.n_groups, vp.gsz,
        float(scaling), Hkv, NQ, NT, D,
        G=g, BLOCK_G=_p2(g), BLOCK_N=block_n, BLOCK_D=_p2(D), KOMAX=kp.omax(), VOMAX=vp.omax(),
        WRITE_LOGITS=return_logits,
    )
    return out, (logits if return_logits else None), lse
