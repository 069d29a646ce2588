"""Attention over packed rows without dequantizing them (torch; the path the store takes off the Triton backend).

A packed row of one group reads x = zero + (code + 1/2) delta (kvx/kernels/quant.py), so for a query q and the
probabilities p of the rows

    q . x_r   = delta_r (q . c_r) + (zero_r + delta_r / 2) sum(q)          (per group, summed over the groups)
    sum_r p_r x_r = (p delta) @ c + p @ (zero + delta / 2)

and no full-precision row is built: the codes are unpacked into a transient fp32 matrix in *plane order* (plane f
of a byte holds elements f, F + f, 2F + f, ... for F = 8 / b fields per byte; one shift and mask per plane on
32-bit words), the query is permuted to that order, and matrix products do the rest. Channel groups (KIVI's keys)
scale the query per block of rows instead. Outliers and exact rows (held beside the codes) enter as sparse
corrections: value - dequantized code, times q (keys) or p (values).

`CodeView` is one tensor's codes and parameters in that form (built by PackedTensor.code_view); `scores` and
`weighted_sum` are the two halves of attention over it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvx.kernels.quant import EXACT_BITS, unpack_codes_ref

_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def plane_perm(F: int, D: int, device) -> torch.Tensor:
    """Column j of plane order holds channel perm[j]: j = f * (D / F) + k <-> channel F k + f."""
    return torch.arange(D, device=device).view(D // F, F).t().reshape(-1)


def _byte_mask(b: int, width: int) -> int:
    m = 0
    for i in range(width):
        m |= ((1 << b) - 1) << (8 * i)
    return m if m < 1 << (8 * width - 1) else m - (1 << 8 * width)  # as the signed word type


def unpack_planes(x: torch.Tensor, b: int, D: int, dtype=torch.float32) -> tuple[torch.Tensor, int]:
    """Rows x [M, rb] (uint8, rb = D b / 8 bytes, 1 <= b <= 8, D % (8 / b) == 0 or D % 8 == 0) -> (codes [M, D] in
    plane order, in `dtype`; F). b in 1, 2, 4, 8: F = 8 / b planes, masked out of 32-bit words; other widths: F = 8, one
    field per element of each 8-element chunk (b bytes, widened to a word)."""
    M = x.shape[0]
    if b == 8:
        return x.to(dtype), 1
    if 8 % b == 0:
        F = 8 // b
        rb = x.shape[1]
        out = torch.empty(M, F, rb, dtype=dtype, device=x.device)
        flat = x.reshape(-1)
        wide = flat.numel() % 4 == 0 and flat.storage_offset() % 4 == 0
        w = flat.view(torch.int32) if wide else flat
        m = _byte_mask(b, 4) if wide else (1 << b) - 1
        for f in range(F):
            out[:, f].copy_(((w >> (f * b)) & m).view(torch.uint8).view(M, rb))
        return out.view(M, D), F
    return _planes8(x, b, D).to(dtype), 8


@dataclass
class CodeView:
    """One packed tensor's rows [BH, n] (BH = sequences x KV heads) as codes and parameters (module docstring).

    codes [BH, n, D] fp32 in plane order (column j = channel perm[j]); zero, delta fp32 in plane order: token axis
    [BH, n, NG] per group of gsz channels (gp [D]: group of each plane column), channel axis [BH, nblk, D] per
    block of br rows (blk [BH, n]: block of each row, None while row t is in block t // br). fix: sparse corrections
    (flat row in BH x n, channel, exact value) for outliers and exact rows."""

    codes: torch.Tensor
    perm: torch.Tensor
    zero: torch.Tensor
    delta: torch.Tensor
    axis: str
    gp: torch.Tensor | None
    br: int
    blk: torch.Tensor | None
    fix_row: torch.Tensor | None
    fix_col: torch.Tensor | None
    fix_val: torch.Tensor | None

    @property
    def n(self) -> int:
        return self.codes.shape[1]

    def _dequant_all(self) -> torch.Tensor:
        """[BH, n, D] plane order; only for channel blocks that eviction moved out of row order."""
        BH, n, D = self.codes.shape
        blk = self.blk.long()[..., None].expand(BH, n, D)
        return self.zero.gather(1, blk) + (self.codes + 0.5) * self.delta.gather(1, blk)

    def _regular(self) -> bool:
        return self.axis == "channel" and self.blk is None and self.zero.shape[1] * self.br == self.n

    def deltas(self) -> torch.Tensor | None:
        """exact value - dequantized code at each correction (fp32), None without corrections."""
        if self.fix_row is None:
            return None
        BH, n, D = self.codes.shape
        inv = torch.empty_like(self.perm)
        inv[self.perm] = torch.arange(D, device=self.perm.device)
        r, c = self.fix_row, self.fix_col
        jc = inv[c]
        code = self.codes.reshape(-1).index_select(0, r * D + jc)
        if self.axis == "token":
            NG = self.zero.shape[-1]
            mi = r * NG + self.gp[jc]
        else:
            nblk = self.zero.shape[1]
            bh, slot = r // n, r % n
            blk = slot // self.br if self.blk is None else self.blk.reshape(-1).index_select(0, r).long()
            mi = (bh * nblk + blk) * D + jc
        z, d = self.zero.reshape(-1).index_select(0, mi), self.delta.reshape(-1).index_select(0, mi)
        return self.fix_val - (z + (code + 0.5) * d)

    def scores(self, q: torch.Tensor) -> torch.Tensor:
        """q [BH, G, D] fp32 (true channel order) -> q . x_r [BH, G, n] fp32."""
        BH, G, D = q.shape
        n = self.n
        qp = q[..., self.perm]
        if self.axis == "token":
            NG = self.zero.shape[-1]
            c0 = self.zero + 0.5 * self.delta  # [BH, n, NG]
            if NG == 1:
                s = torch.bmm(qp, self.codes.transpose(1, 2)) * self.delta[..., 0][:, None]
                s = s + qp.sum(-1, keepdim=True) * c0[..., 0][:, None]
            else:
                oh = (self.gp[None, :] == torch.arange(NG, device=q.device)[:, None]).float()  # [NG, D]
                qbd = (qp[:, None] * oh[None, :, None]).reshape(BH, NG * G, D)
                sg = torch.bmm(qbd, self.codes.transpose(1, 2)).view(BH, NG, G, n)
                s = torch.einsum("bgqn,bng->bqn", sg, self.delta)
                s = s + torch.einsum("bgq,bng->bqn", (qbd.view(BH, NG, G, D)).sum(-1), c0)
        elif self._regular():
            nblk = self.zero.shape[1]
            qb = qp[:, None] * self.delta[:, :, None]  # [BH, nblk, G, D]
            sb = torch.bmm(qb.reshape(BH * nblk, G, D), self.codes.reshape(BH * nblk, self.br, D).transpose(1, 2))
            s = sb.view(BH, nblk, G, self.br).permute(0, 2, 1, 3).reshape(BH, G, n)
            c = torch.bmm(qp, (self.zero + 0.5 * self.delta).transpose(1, 2))  # [BH, G, nblk]
            s = s + c.repeat_interleave(self.br, dim=-1)
        else:
            s = torch.bmm(qp, self._dequant_all().transpose(1, 2))
        dl = self.deltas()
        if dl is not None:
            bh = self.fix_row // n
            add = q.transpose(1, 2).reshape(BH * D, G).index_select(0, bh * D + self.fix_col) * dl[:, None]
            fix = torch.zeros(BH * n, G, device=q.device).index_add_(0, self.fix_row, add)
            s = s + fix.view(BH, n, G).transpose(1, 2)
        return s

    def weighted_sum(self, p: torch.Tensor) -> torch.Tensor:
        """p [BH, G, n] fp32 -> sum_r p_r x_r [BH, G, D] fp32 (true channel order)."""
        BH, G, n = p.shape
        D = self.codes.shape[-1]
        if self.axis == "token":
            NG = self.zero.shape[-1]
            c0 = self.zero + 0.5 * self.delta
            if NG == 1:
                o = torch.bmm(p * self.delta[..., 0][:, None], self.codes) + torch.bmm(p, c0)
            else:
                wd = p[:, None] * self.delta.permute(0, 2, 1)[:, :, None]  # [BH, NG, G, n]
                r = torch.bmm(wd.reshape(BH, NG * G, n), self.codes).view(BH, NG, G, D)
                o = r.gather(1, self.gp.view(1, 1, 1, D).expand(BH, 1, G, D))[:, 0]
                o = o + torch.bmm(p, c0)[..., self.gp]
        elif self._regular():
            nblk = self.zero.shape[1]
            pb = p.reshape(BH, G, nblk, self.br).permute(0, 2, 1, 3).reshape(BH * nblk, G, self.br)
            r = torch.bmm(pb, self.codes.reshape(BH * nblk, self.br, D)).view(BH, nblk, G, D)
            o = (r * self.delta[:, :, None]).sum(1)
            psum = p.reshape(BH, G, nblk, self.br).sum(-1)
            o = o + torch.bmm(psum, self.zero + 0.5 * self.delta)
        else:
            o = torch.bmm(p, self._dequant_all())
        out = torch.empty_like(o)
        out[..., self.perm] = o
        dl = self.deltas()
        if dl is not None:
            add = p.transpose(1, 2).reshape(BH * n, G).index_select(0, self.fix_row) * dl[:, None]  # [Nc, G]
            fix = torch.zeros(BH * D, G, device=p.device).index_add_(0, self.fix_row // n * D + self.fix_col, add)
            out = out + fix.view(BH, D, G).transpose(1, 2)
        return out


def unpack_rows(buf: torch.Tensor, bits: torch.Tensor | None, fixed: int | None, off: torch.Tensor | None,
                M: int, D: int) -> tuple[torch.Tensor, int]:
    """Codes [M, D] fp32 in plane order (and F) of M packed rows: fixed width (rows back to back) or per-row widths
    `bits` [M] at byte offsets `off` [M] (rows of each width gathered in chunks of the bytes all widths share).
    Exact rows and 0-bit rows read 0."""
    dev = buf.device
    if M == 0:
        return torch.zeros(0, D, device=dev), 1
    if fixed is None:
        lo, hi = torch.aminmax(bits)
        if int(lo) == int(hi) and 0 < int(lo) < EXACT_BITS:  # one width: the rows lie back to back
            fixed = int(lo)
    if fixed is not None:
        b = fixed
        rb = (D * b + 7) // 8
        if b <= 8 and D * b % 8 == 0 and (8 % b == 0 and D % (8 // b) == 0 or D % 8 == 0):
            return unpack_planes(buf.view(M, rb), b, D)
        bits = torch.full((M,), b, dtype=torch.uint8, device=dev)
        off = torch.arange(M, device=dev) * rb
    bl = bits.long()
    widths = [int(w) for w in torch.unique(bl).tolist() if 0 < int(w) < EXACT_BITS]
    if D % 8 or any(w > 8 for w in widths):  # true channel order through the reference unpacker
        return unpack_codes_ref(buf, off, bits, D).float(), 1
    rbs = [D * w // 8 for w in widths]
    u = math.gcd(buf.numel(), *rbs) if rbs else 1
    u = u & -u  # the largest power of two dividing every row's bytes and offset
    chunks = buf.view(-1, u)
    parts, order = [], []
    for w, rb in zip(widths, rbs):
        rows = (bl == w).nonzero().squeeze(1)
        idx = (off[rows].long() // u)[:, None] + torch.arange(rb // u, device=dev)
        parts.append(_planes8(chunks.index_select(0, idx.reshape(-1)).view(-1, rb), w, D))
        order.append(rows)
    rest = ((bl == 0) | (bl >= EXACT_BITS)).nonzero().squeeze(1)  # no codes: read 0
    parts.append(torch.zeros(rest.numel(), D, device=dev))
    order.append(rest)
    inv = torch.empty(M, dtype=torch.long, device=dev)
    inv[torch.cat(order)] = torch.arange(M, device=dev)
    return torch.cat(parts).index_select(0, inv), 8


def _planes8(x: torch.Tensor, b: int, D: int) -> torch.Tensor:
    """Rows x [M, D b / 8] of b <= 8 bits (D % 8 == 0) -> codes [M, D] fp32 in 8-plane order (element 8 k + f at
    column f D / 8 + k): each 8-element chunk (b bytes) widened to one word, one shift and mask per plane."""
    M = x.shape[0]
    W = 1 << (b - 1).bit_length()
    ch = x.view(M, D // 8, b)
    if W != b:
        ch = torch.cat([ch, ch.new_zeros(M, D // 8, W - b)], -1)
    w = ch.contiguous().view(_INT[W]).view(M, D // 8)
    out = torch.empty(M, 8, D // 8, dtype=torch.float32, device=x.device)
    for f in range(8):
        out[:, f].copy_((w >> (f * b)) & ((1 << b) - 1))
    return out.view(M, D)
