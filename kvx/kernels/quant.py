"""Bit-packed quantized rows: packing, dequantization and fused dequantize + decode attention (torch twins).

Layout (one tensor, keys or values, of one layer). A *row* is one token of one KV head: D elements.
    buf    uint8 [L]      bit-packed codes of every row, each row byte-aligned: ceil(D * b / 8) bytes at off[r];
                          element e of a row is the b-bit field at bit e * b, little-endian within the stream
                          (bit i of byte k is stream bit 8 k + i).
    off    int32 [M]      first byte of each row in buf
    bits   uint8 [M]      code width b of each row: 0..15 packed codes; 16 means the row is held exactly (in xval)
    srow   int64 [M]      row of zero/delta holding this row's quantization parameters
    zero, delta [S, NG]   per-group offset and cell width (float16, or bfloat16 for bfloat16 models); element e of
                          row r uses column e // gsz of row srow[r]
    ostart int32 [M]      start of the row's sparse data: its outliers in ocol/oval, or its D exact values in xval
    ocnt   int16 [M]      number of outliers of the row (0 for exact rows)
    ocol   int16 [No], oval [No]   outlier column and exact value (model dtype)
    xval   [Nx]           exact rows, D values each

Quantizer (mid-rise uniform, QAQ's error model): a group with range [lo, hi] and b bits has 2^b cells of width
delta = (hi - lo) / 2^b; code = clamp(floor((x - zero) / delta), 0, 2^b - 1) and x^ = zero + (code + 1/2) delta, so
|x - x^| <= delta / 2 and the error is uniform with standard deviation delta / sqrt(12) (Dong et al., 2024, QAQ,
arXiv:2403.04643, section 3). zero is lo rounded down and delta is rounded up to the metadata dtype, so the cells
always cover [lo, hi]. Outliers (and exact rows) override the dequantized value with the value held.

Every function here has a Triton twin in `kvx.kernels.quant_triton` with the same arguments; the public functions
`pack_rows`, `dequant_rows` and `decode_attention_quant` pick one with `kvx.kernels.use_triton`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvx.kernels import use_triton

EXACT_BITS = 16  # a row with bits >= 16 is held exactly
MAX_CODE_BITS = 15


@dataclass
class PackedRows:
    """The quantized rows one kernel call reads (see the module docstring for the layout)."""

    buf: torch.Tensor
    off: torch.Tensor
    bits: torch.Tensor
    srow: torch.Tensor
    zero: torch.Tensor
    delta: torch.Tensor
    gsz: int
    ostart: torch.Tensor
    ocnt: torch.Tensor
    ocol: torch.Tensor
    oval: torch.Tensor
    xval: torch.Tensor
    D: int

    @property
    def n_rows(self) -> int:
        return self.off.numel()

    @property
    def n_groups(self) -> int:
        return self.zero.shape[-1]

    def omax(self) -> int:
        """Most outliers on one packed row (the unrolled patch loop of the Triton kernels)."""
        if self.ocnt.numel() == 0:
            return 0
        return int(torch.where(self.bits.long() >= EXACT_BITS, 0, self.ocnt.long()).max())


def row_nbytes(bits: torch.Tensor, D: int) -> torch.Tensor:
    """Bytes of each packed row: ceil(D * b / 8) for 0 <= b <= 15; 0 for exact rows (held in xval)."""
    b = bits.long()
    return torch.where(b >= EXACT_BITS, 0, (D * b + 7) // 8)


def codes_of(x: torch.Tensor, zero: torch.Tensor, delta: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Integer codes (int64) of x under (zero, delta) with b-bit cells; all arguments broadcast together."""
    x = x.float()
    z = zero.float()
    d = delta.float()
    pos = d > 0
    c = torch.floor((x - z) / torch.where(pos, d, torch.ones_like(d)))
    c = torch.where(pos, c, torch.zeros_like(c))
    top = ((1 << bits.long().clamp(max=MAX_CODE_BITS)) - 1).to(c.dtype)
    return torch.minimum(torch.clamp(c, min=0.0), top).long()


# torch twins ---------------------------------------------------------------------------------------------------------
def pack_rows_ref(x, bits, off, zero, delta, srow, gsz: int, nbytes: int) -> torch.Tensor:
    """Quantize and bit-pack rows. x [M, D]; bits, off, srow [M]; zero, delta [S, NG]. Returns buf uint8 [nbytes].

    Rows with bits >= 16 (exact) or bits == 0 write nothing."""
    M, D = x.shape
    out_bits = torch.zeros(8 * nbytes, dtype=torch.uint8, device=x.device)
    if M == 0 or nbytes == 0:
        return torch.zeros(nbytes, dtype=torch.uint8, device=x.device)
    b, off = bits.long(), off.long()
    cols = torch.arange(D, device=x.device)
    z = zero[srow[:, None], cols[None, :] // gsz]
    d = delta[srow[:, None], cols[None, :] // gsz]
    code = codes_of(x, z, d, b[:, None])  # [M, D]
    i = torch.arange(MAX_CODE_BITS, device=x.device)
    sel = (i[None, None, :] < b[:, None, None]) & (b[:, None, None] < EXACT_BITS)
    sel = sel.expand(M, D, MAX_CODE_BITS)
    val = ((code[:, :, None] >> i) & 1).to(torch.uint8)
    gbit = 8 * off[:, None, None] + cols[None, :, None] * b[:, None, None] + i[None, None, :]
    out_bits[gbit[sel]] = val[sel]
    weights = (1 << torch.arange(8, device=x.device)).to(torch.int32)
    return (out_bits.view(nbytes, 8).to(torch.int32) * weights).sum(-1).to(torch.uint8)


def unpack_codes_ref(buf: torch.Tensor, off: torch.Tensor, bits: torch.Tensor, D: int) -> torch.Tensor:
    """Codes [M, D] (int64) of packed rows; exact rows read as 0."""
    M = off.numel()
    if M == 0:
        return torch.zeros(0, D, dtype=torch.long, device=buf.device)
    b = bits.long()
    cols = torch.arange(D, device=buf.device)
    bp = cols[None, :] * b[:, None]
    byte = off.long()[:, None] + bp // 8
    sh = bp % 8
    L = buf.numel()
    w = torch.zeros(M, D, dtype=torch.long, device=buf.device)
    if L:
        bl = buf.long()
        for j in range(3):
            idx = byte + j
            ok = idx < L
            w |= torch.where(ok, bl[idx.clamp(max=L - 1)], 0) << (8 * j)
    mask = (1 << b.clamp(max=MAX_CODE_BITS)) - 1
    code = (w >> sh) & mask[:, None]
    return torch.where(b[:, None] >= EXACT_BITS, 0, code)


def dequant_rows_ref(p: PackedRows, out_dtype: torch.dtype) -> torch.Tensor:
    """Dequantize every row of p: [M, D] in out_dtype (fp32 arithmetic, outliers and exact rows restored)."""
    M, D = p.n_rows, p.D
    dev = p.off.device
    if M == 0:
        return torch.zeros(0, D, dtype=out_dtype, device=dev)
    code = unpack_codes_ref(p.buf, p.off, p.bits, D)
    cols = torch.arange(D, device=dev)
    z = p.zero[p.srow[:, None], cols[None, :] // p.gsz].float()
    d = p.delta[p.srow[:, None], cols[None, :] // p.gsz].float()
    x = z + (code.float() + 0.5) * d
    exact = p.bits.long() >= EXACT_BITS
    if bool(exact.any()):
        xs = p.xval[(p.ostart[exact, None] + cols[None, :])].float()
        x[exact] = xs
    has = (p.ocnt > 0) & ~exact
    if bool(has.any()):
        rows = has.nonzero().squeeze(1)
        cnt = p.ocnt[rows].long()
        r = rows.repeat_interleave(cnt)
        first = torch.cumsum(cnt, 0) - cnt
        j = torch.arange(int(cnt.sum()), device=dev) - first.repeat_interleave(cnt)
        e = p.ostart[r] + j
        x[r, p.ocol[e].long()] = p.oval[e].float()
    return x.to(out_dtype)


def decode_attention_quant_ref(q, kp: PackedRows, vp: PackedRows, kpos, tk, tv, tpos, qpos, scaling: float,
                               return_logits: bool = False):
    """Attention of one query token per sequence over packed rows followed by a full-precision tail.

    q [B, Hq, D]; kp, vp: rows of [B, Hkv, NQ] flattened; kpos [B, Hkv, NQ]; tk, tv [B, Hkv, NT, D] (the residual
    window and the new token); tpos [B, Hkv, NT]; qpos [B]. A slot is read when 0 <= pos <= qpos (all slots when
    qpos < 0). Returns out [B, Hq, D] (q's dtype), logits [B, Hq, NQ + NT] (fp32, scaled, -inf where not read) or
    None, and lse [B, Hq] (fp32 log-sum-exp of the logits)."""
    B, Hq, D = q.shape
    Hkv, NQ = kpos.shape[1], kpos.shape[2]
    g = Hq // Hkv
    kd = dequant_rows_ref(kp, torch.float32).view(B, Hkv, NQ, D)
    vd = dequant_rows_ref(vp, torch.float32).view(B, Hkv, NQ, D)
    k = torch.cat([kd, tk.float()], dim=2)
    v = torch.cat([vd, tv.float()], dim=2)
    pos = torch.cat([kpos.long(), tpos.long()], dim=2)
    qp = qpos.long()[:, None, None]
    ok = ((pos >= 0) & (pos <= qp)) | (qp < 0)  # [B, Hkv, N]
    qg = q.float().view(B, Hkv, g, D)
    s = torch.einsum("bhgd,bhnd->bhgn", qg, k) * scaling
    s = s.masked_fill(~ok[:, :, None], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None])
    out = torch.einsum("bhgn,bhnd->bhgd", p, v).reshape(B, Hq, D).to(q.dtype)
    logits = s.reshape(B, Hq, -1) if return_logits else None
    return out, logits, lse.reshape(B, Hq)


# dispatch ------------------------------------------------------------------------------------------------------------
def pack_rows(x, bits, off, zero, delta, srow, gsz: int, nbytes: int) -> torch.Tensor:
    if use_triton(x.device) and x.shape[0] and nbytes:
        from kvx.kernels.quant_triton import pack_rows_triton

        return pack_rows_triton(x, bits, off, zero, delta, srow, gsz, nbytes)
    return pack_rows_ref(x, bits, off, zero, delta, srow, gsz, nbytes)


def dequant_rows(p: PackedRows, out_dtype: torch.dtype) -> torch.Tensor:
    if use_triton(p.off.device) and p.n_rows:
        from kvx.kernels.quant_triton import dequant_rows_triton

        return dequant_rows_triton(p, out_dtype)
    return dequant_rows_ref(p, out_dtype)


def decode_attention_quant(q, kp, vp, kpos, tk, tv, tpos, qpos, scaling, return_logits=False):
    if use_triton(q.device):
        from kvx.kernels.quant_triton import decode_attention_quant_triton

        return decode_attention_quant_triton(q, kp, vp, kpos, tk, tv, tpos, qpos, scaling, return_logits)
    return decode_attention_quant_ref(q, kp, vp, kpos, tk, tv, tpos, qpos, scaling, return_logits)
