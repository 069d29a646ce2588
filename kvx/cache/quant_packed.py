"""Packed quantized rows of one tensor (keys or values of one layer): the quantizer's parameters, outlier selection,
encoding and the `PackedTensor` that holds them. Bit layout and kernels: kvx/kernels/quant.py.

A row is one token of one KV head (D elements). Each tensor has a `QuantSpec`: `axis="token"` groups `group`
consecutive channels of one token (one zero/scale per group, KIVI's value layout); `axis="channel"` groups one channel
over a block of `group` consecutive tokens (KIVI's key layout). With `heads_unit` (QAQ's layer/token granularity),
one token's rows across all KV heads form one unit: one zero/scale for the whole token (held once, not per head) and
one outlier selection.

Outliers: a fraction `outliers` of the elements held, both ends together, kept exactly beside the codes and
excluded from their group's range. The fraction holds for the whole cache: unit u (the u-th unit in token order,
m elements) keeps c_u = floor(a m (u + 1)) - floor(a m u) outliers, so any run of units keeps floor(a m N) over N
units; within a unit, the c_u kept from the two ends are the split that leaves the smallest range. A row is
re-quantized (QAQ) with the same unit index, so with the same count.

Bytes held (`nbytes`, everything needed to read the rows): codes, packed in row order without gaps; per-row widths
(uint8, variable widths only) and outlier counts (uint8, only where outliers or exact rows can occur), from which
each read derives the byte offsets and outlier starts (prefix sums, not held); zero and scale (16 bits each) per
group; outlier values (model dtype) and column indices (uint8 up to 256 channels); channel blocks of each row
(int32, only once eviction has moved rows between blocks). Re-quantized or evicted rows leave no dead bytes: the
arrays are rebuilt from the live rows at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvx.cache.dense import _nbytes
from kvx.kernels.quant import EXACT_BITS, PackedRows, dequant_rows, pack_rows, row_nbytes
from kvx.kernels.quant_codes import CodeView, plane_perm, unpack_rows


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor (keys or values) is quantized. bits: 1..15 packed, 16 = held exactly (QAQ sets bits per row)."""

    bits: int = 4
    axis: str = "token"  # token: groups of `group` channels; channel: one channel over `group` tokens
    group: int = 0  # channels per group (token axis; 0 = head_dim) or tokens per block (channel axis)
    outliers: float = 0.0  # fraction of the elements held exactly (both ends together)

    def channels_per_group(self, D: int) -> int:
        return (self.group or D) if self.axis == "token" else 1


# quantization parameters and encoding ---------------------------------------------------------------------------------
def meta_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """zero/delta are held at 16 bits: bfloat16 for bfloat16 models (range), float16 otherwise."""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float16


def round_meta(x: torch.Tensor, dtype: torch.dtype, down: bool) -> torch.Tensor:
    """x (fp32) rounded to dtype toward -inf (down) or +inf, so that the rounded cells still cover the range."""
    y = x.to(dtype)
    yf = y.float()
    bad = (yf > x) if down else (yf < x)
    if bool(bad.any()):
        y = torch.where(bad, torch.nextafter(y, torch.full_like(y, float("-inf") if down else float("inf"))), y)
    if not bool(torch.isfinite(y).all()):
        raise ValueError(f"key/value magnitudes beyond the range of {dtype} quantization metadata")
    return y


def outlier_counts(useq: torch.Tensor, m: int, ratio: float) -> torch.Tensor:
    """c_u = floor(ratio m (u + 1)) - floor(ratio m u) for unit indices u >= 0 (int64): a running total of
    ratio * m per unit, so the fraction holds over any run of units, not only rounded up per unit."""
    u = useq.clamp(min=0).double()
    a = ratio * m
    return (torch.floor(a * (u + 1) + 1e-9) - torch.floor(a * u + 1e-9)).long()


def _extremes(u: torch.Tensor, vm: torch.Tensor, cnt: torch.Tensor) -> torch.Tensor:
    """True on cnt (per unit, [...]) valid elements of u [..., m] taken from the two ends: i smallest and cnt - i
    largest, with i chosen so that the range of the rest is smallest."""
    cnt = torch.minimum(cnt, vm.sum(-1))
    cmax = int(cnt.max()) if cnt.numel() else 0
    if cmax == 0:
        return torch.zeros_like(vm)
    big = torch.finfo(torch.float32).max
    xs = torch.where(vm, u.float(), big)
    srt, order = xs.sort(dim=-1, stable=True)
    rank = order.argsort(dim=-1)  # ascending rank of each element (invalid ones last)
    nv = vm.sum(-1)
    best_i = torch.zeros_like(cnt)
    best_r = torch.full(cnt.shape, float("inf"), device=u.device)
    for i in range(cmax + 1):
        lo = torch.full_like(cnt, i)
        hi = nv - 1 - (cnt - i)
        ok = (i <= cnt) & (hi >= lo)
        top = u.shape[-1] - 1
        r = (srt.gather(-1, hi.clamp(0, top)[..., None]) - srt.gather(-1, lo.clamp(0, top)[..., None]))[..., 0]
        better = ok & (r < best_r)
        best_r = torch.where(better, r, best_r)
        best_i = torch.where(better, lo, best_i)
    low = rank < best_i[..., None]
    high = (rank >= (nv - (cnt - best_i))[..., None]) & (rank < nv[..., None])
    return (low | high) & vm


def outlier_mask(x, valid, spec: QuantSpec, heads_unit: bool = False, block_rows: int = 1,
                 useq: torch.Tensor | None = None) -> torch.Tensor:
    """[B, H, m, D] True on outliers. Units: one group (token axis), one channel of a block (channel axis), or all
    KV heads of a token (`heads_unit`; token axis only). useq [B, H, m]: each row's token index (token axis) or its
    block's index (channel axis), numbering the units (module docstring); default 0, 1, ... in slot order."""
    B, H, m, D = x.shape
    if spec.outliers <= 0 or m == 0:
        return torch.zeros(B, H, m, D, dtype=torch.bool, device=x.device)
    if useq is None:
        t = torch.arange(m, device=x.device)
        useq = (t // block_rows if spec.axis == "channel" else t).view(1, 1, m).expand(B, H, m)
    useq = useq.long()
    if spec.axis == "channel":
        nb = m // block_rows
        u = x.view(B, H, nb, block_rows, D).transpose(3, 4)
        vm = valid.view(B, H, nb, 1, block_rows).expand(B, H, nb, D, block_rows)
        ui = useq.view(B, H, nb, block_rows)[..., 0, None] * D + torch.arange(D, device=x.device)
        cnt = outlier_counts(ui, block_rows, spec.outliers)
        return _extremes(u, vm, cnt).transpose(3, 4).reshape(B, H, m, D)
    if heads_unit:
        u = x.permute(0, 2, 1, 3).reshape(B, m, H * D)
        vm = valid.permute(0, 2, 1)[..., None].expand(B, m, H, D).reshape(B, m, H * D)
        cnt = outlier_counts(useq[:, 0], H * D, spec.outliers)
        return _extremes(u, vm, cnt).view(B, m, H, D).permute(0, 2, 1, 3)
    g = spec.channels_per_group(D)
    NG = D // g
    u = x.view(B, H, m, NG, g)
    vm = valid[..., None, None].expand(B, H, m, NG, g)
    cnt = outlier_counts(useq[..., None] * NG + torch.arange(NG, device=x.device), g, spec.outliers)
    return _extremes(u, vm, cnt).view(B, H, m, D)


def unit_range(x, valid, spec: QuantSpec, heads_unit: bool, useq: torch.Tensor | None = None) -> torch.Tensor:
    """[B, H, m] max - min of each token's unit (one head's row, or all heads of the token), outliers excluded."""
    om = outlier_mask(x, valid, QuantSpec(16, "token", 0, spec.outliers), heads_unit, useq=useq)
    keep = ~om
    xf = x.float()
    lo = torch.where(keep, xf, float("inf")).amin(-1)
    hi = torch.where(keep, xf, float("-inf")).amax(-1)
    if heads_unit:
        lo = lo.amin(1, keepdim=True).expand_as(lo)
        hi = hi.amax(1, keepdim=True).expand_as(hi)
    rng = hi - lo
    return torch.where(torch.isfinite(rng), rng, torch.zeros_like(rng))


@dataclass
class Encoded:
    """Quantized rows [B, H, m] before they join a PackedTensor (offsets relative to the segment's own arrays)."""

    off: torch.Tensor
    bits: torch.Tensor
    ostart: torch.Tensor
    ocnt: torch.Tensor
    zero: torch.Tensor  # token axis: [B, H or 1 (heads_unit), m, NG]; channel axis: [B, H, nb, D]
    delta: torch.Tensor
    blk: torch.Tensor | None  # channel axis: [B, H, m] block of each row (0..nb-1)
    buf: torch.Tensor
    ocol: torch.Tensor
    oval: torch.Tensor
    xval: torch.Tensor


def _index_dtype(n: int) -> torch.dtype:
    return torch.uint8 if n <= 256 else torch.int16


def encode(x, valid, bits, spec: QuantSpec, heads_unit: bool = False, block_rows: int = 1,
           useq: torch.Tensor | None = None, fixed: bool = False) -> Encoded:
    """Quantize and pack rows x [B, H, m, D] where `valid` [B, H, m]; bits [B, H, m] (>= 16: held exactly).

    Channel axis: m is a multiple of block_rows; each block of block_rows rows shares one zero/delta per channel
    (computed over its valid rows) and one bit width. heads_unit (token axis): one zero/delta per token over all
    heads ([B, 1, m, 1]). fixed: every row, valid or not, takes ceil(D b / 8) bytes (one width for all rows), so
    row r of the tensor starts at r * row_bytes. useq: unit numbering for the outliers (outlier_mask)."""
    B, H, m, D = x.shape
    dev = x.device
    mdt = meta_dtype_for(x.dtype)
    bits = bits.long().to(dev)
    exact = bits >= EXACT_BITS
    packed = valid & ~exact
    om = outlier_mask(x, packed, spec, heads_unit, block_rows, useq)
    keep = ~om
    xf = x.float()
    inf = float("inf")
    if spec.axis == "token":
        g = spec.channels_per_group(D)
        NG = D // g
        xg = xf.view(B, H, m, NG, g)
        kg = keep.view(B, H, m, NG, g) & packed[..., None, None]
        lo = torch.where(kg, xg, inf).amin(-1)
        hi = torch.where(kg, xg, -inf).amax(-1)
        if heads_unit:  # one zero/delta for the token: the range over all heads and channels
            lo = lo.amin(1, keepdim=True).amin(-1, keepdim=True)
            hi = hi.amax(1, keepdim=True).amax(-1, keepdim=True)
            NG, g = 1, D
        empty = ~torch.isfinite(lo) | ~torch.isfinite(hi)
        bcell = bits.clamp(max=15)[..., None][:, : lo.shape[1]]
        Hz = lo.shape[1]
        srow_all = (torch.arange(B, device=dev).view(B, 1, 1) * Hz
                    + torch.arange(H, device=dev).view(1, H, 1) % Hz) * m + torch.arange(m, device=dev)
        blk = None
        gsz = g
    else:
        nb = m // block_rows
        xb = xf.view(B, H, nb, block_rows, D)
        kb = (keep & packed[..., None]).view(B, H, nb, block_rows, D)
        lo = torch.where(kb, xb, inf).amin(3)
        hi = torch.where(kb, xb, -inf).amax(3)
        empty = ~kb.any(3)
        bcell = torch.where(packed, bits, 0).view(B, H, nb, block_rows).amax(-1, keepdim=True).clamp(max=15)
        blk = (torch.arange(m, device=dev) // block_rows).view(1, 1, m).expand(B, H, m).contiguous()
        srow_all = (torch.arange(B * H, device=dev).view(B, H, 1) * nb + blk)
        gsz = 1
    lo = torch.where(empty, torch.zeros_like(lo), lo)
    hi = torch.where(empty, torch.zeros_like(hi), hi)
    zero = round_meta(lo, mdt, down=True)
    delta = round_meta((hi - zero.float()).clamp(min=0.0) / (2.0 ** bcell.float()), mdt, down=False)
    # pack the codes of packed rows (fixed: of every row), in (b, h, slot) order
    pr = torch.ones_like(packed).reshape(-1) if fixed else packed.reshape(-1)
    pb = bits.clamp(max=15) if fixed else bits
    nbytes = row_nbytes(pb.reshape(-1)[pr], D)
    roff = torch.cumsum(nbytes, 0) - nbytes
    total = int(nbytes.sum()) if nbytes.numel() else 0
    buf = pack_rows(x.reshape(-1, D)[pr], pb.reshape(-1)[pr].to(torch.uint8), roff,
                    zero.reshape(-1, zero.shape[-1]), delta.reshape(-1, delta.shape[-1]),
                    srow_all.reshape(-1)[pr], gsz, total)
    off = torch.zeros(B * H * m, dtype=torch.int32, device=dev)
    off[pr] = roff.to(torch.int32)
    # outliers of packed rows (ordered by row, then column) and exact rows
    om = om & packed[..., None]
    ocnt = om.sum(-1)  # [B, H, m]
    ocol = om.nonzero()[:, 3].to(_index_dtype(D))
    oval = x[om]
    ostart_o = torch.cumsum(ocnt.reshape(-1), 0) - ocnt.reshape(-1)
    ex = (valid & exact).reshape(-1)
    xval = x.reshape(-1, D)[ex].reshape(-1)
    xcount = ex.long() * D
    ostart_x = torch.cumsum(xcount, 0) - xcount
    ostart = torch.where(exact.reshape(-1), ostart_x, ostart_o).view(B, H, m).to(torch.int32)
    ocnt = torch.where(exact, 0, ocnt).to(_index_dtype(D + 1))
    bits = torch.where(valid, bits.clamp(max=EXACT_BITS), 0).to(torch.uint8)
    return Encoded(off.view(B, H, m), bits, ostart, ocnt, zero, delta, blk, buf, ocol, oval, xval)


def _expand_heads(t: torch.Tensor, H: int) -> torch.Tensor:
    return t if t.shape[1] == H else t.expand(t.shape[0], H, *t.shape[2:]).contiguous()


def _same_over_heads(t: torch.Tensor) -> bool:
    return t.shape[1] <= 1 or bool((t == t[:, :1]).all())


def _starts(cnt: torch.Tensor) -> torch.Tensor:
    """Exclusive prefix sums (int64) of per-row counts in flat row order."""
    c = cnt.reshape(-1).long()
    return torch.cumsum(c, 0) - c


def _segments(src: torch.Tensor, start: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """src[start[i] : start[i] + count[i]] for every row i, concatenated; gathered in chunks of the largest power of
    two (up to 64 elements) dividing every start, count and src's length (packed rows: D b / 8 bytes each)."""
    total = int(count.sum()) if count.numel() else 0
    if total == 0:
        return src[:0]
    for u in (64, 32, 16, 8, 4, 2) if src.dim() == 1 else ():
        if src.numel() % u == 0 and not bool(((start % u) | (count % u)).any()):
            return _segments(src.view(-1, u), start // u, count // u).reshape(-1)
    new = torch.cumsum(count, 0) - count
    return src[start.repeat_interleave(count) + (torch.arange(total, device=src.device) - new.repeat_interleave(count))]


class PackedTensor:
    """The quantized rows of one tensor (keys or values): [B, H, nq] rows of D elements (module docstring).

    The codes, outliers and exact rows are held in flat row order ((b, h, slot)), packed without gaps, so a row's
    byte offset and outlier start are prefix sums of the widths and counts: computed per read (`rows`), never held.
    Held per row: the width (uint8; not held at fixed width, fixed_bits) and, where outliers or exact rows can occur
    (sparse), the outlier count (uint8 up to 255 channels). Token-axis metadata may be held once per token for all
    heads (zero [B, 1, nq, 1], QAQ's layer granularity). Every change (append, re-quantization, eviction) rebuilds
    the arrays from the live rows: no dead bytes."""

    def __init__(self, spec: QuantSpec, B: int, H: int, D: int, device, dtype: torch.dtype,
                 fixed_bits: int | None = None, sparse: bool = True, block_rows: int = 1):
        self.spec, self.B, self.H, self.D, self.dtype = spec, B, H, D, dtype
        self.fixed_bits = fixed_bits
        self.rb = (D * fixed_bits + 7) // 8 if fixed_bits is not None else 0
        self.sparse = sparse
        self.block_rows = spec.group if spec.axis == "channel" else block_rows
        self.blocks_seen = 0  # channel axis: blocks appended so far (numbers the outlier units)
        mdt = meta_dtype_for(dtype)
        NG = D // spec.channels_per_group(D) if spec.axis == "token" else D
        z = dict(device=device)
        self._nq = 0
        self.buf = torch.zeros(0, dtype=torch.uint8, **z)
        self.bits = torch.zeros(B, H, 0, dtype=torch.uint8, **z) if fixed_bits is None else None
        self.ocnt = torch.zeros(B, H, 0, dtype=_index_dtype(D + 1), **z) if sparse else None
        self.zero = torch.zeros(B, H, 0, NG, dtype=mdt, **z)
        self.delta = torch.zeros(B, H, 0, NG, dtype=mdt, **z)
        self.blk = None  # channel axis: None while row t belongs to block t // block_rows
        self.ocol = torch.zeros(0, dtype=_index_dtype(D), **z)
        self.oval = torch.zeros(0, dtype=dtype, **z)
        self.xval = torch.zeros(0, dtype=dtype, **z)

    @property
    def nq(self) -> int:
        return self._nq

    def row_bits(self) -> torch.Tensor:
        """[B, H, nq] code width of each row (uint8; 16 = exact)."""
        if self.fixed_bits is None:
            return self.bits
        return torch.full((self.B, self.H, self._nq), self.fixed_bits, dtype=torch.uint8, device=self.buf.device)

    @property
    def exact(self) -> torch.Tensor:
        return self.row_bits().long() >= EXACT_BITS

    # the row table: per flat row its width, outlier count, and where its bytes start ---------------------------------
    def _counts(self, bits: torch.Tensor, ocnt: torch.Tensor | None):
        """Per flat row: code bytes, outliers, exact values."""
        b = bits.reshape(-1).long()
        ex = b >= EXACT_BITS
        nb = torch.full_like(b, self.rb) if self.fixed_bits is not None else row_nbytes(b, self.D)
        no = torch.zeros_like(b) if ocnt is None else torch.where(ex, 0, ocnt.reshape(-1).long())
        return nb, no, ex.long() * self.D

    def _table(self) -> dict:
        nb, no, nx = self._counts(self.row_bits(), self.ocnt)
        return {"bits": self.row_bits().reshape(-1), "ocnt": None if self.ocnt is None else self.ocnt.reshape(-1),
                "nb": nb, "no": no, "nx": nx, "off": _starts(nb), "os": _starts(no), "xs": _starts(nx)}

    def _new_table(self, e: Encoded) -> dict:
        """The encoded rows as a table whose starts point past this tensor's own arrays (sources concatenated)."""
        ocnt = e.ocnt if self.sparse else None
        nb, no, nx = self._counts(e.bits, ocnt)
        ex = e.bits.reshape(-1).long() >= EXACT_BITS
        st = e.ostart.reshape(-1).long()
        off = (torch.arange(nb.numel(), device=nb.device) * self.rb if self.fixed_bits is not None
               else e.off.reshape(-1).long())
        return {"bits": e.bits.reshape(-1), "ocnt": None if ocnt is None else ocnt.reshape(-1).to(self.ocnt.dtype),
                "nb": nb, "no": no, "nx": nx, "off": off + self.buf.numel(),
                "os": torch.where(ex, 0, st) + self.oval.numel(), "xs": torch.where(ex, st, 0) + self.xval.numel()}

    def _rebuild(self, ix: torch.Tensor, shape: tuple, e: Encoded | None) -> None:
        """Rows of the new tensor = rows ix [R] of (own rows, then e's rows), in flat order of `shape` [B, H, n]."""
        t = self._table()
        buf, ocol, oval, xval = self.buf, self.ocol, self.oval, self.xval
        if e is not None:
            if e.oval.numel() + oval.numel() >= 2**31 or e.buf.numel() + buf.numel() >= 2**31:
                raise RuntimeError("a layer's packed cache outgrew int32 offsets (2 GiB of codes per tensor)")
            n = self._new_table(e)
            t = {k: (None if t[k] is None else torch.cat([t[k], n[k]])) for k in t}
            buf, ocol = torch.cat([buf, e.buf]), torch.cat([ocol, e.ocol.to(ocol.dtype)])
            oval, xval = torch.cat([oval, e.oval.to(self.dtype)]), torch.cat([xval, e.xval.to(self.dtype)])
        g = {k: (None if v is None else v[ix]) for k, v in t.items()}
        self.buf = _segments(buf, g["off"], g["nb"])
        if self.sparse:
            self.ocol, self.oval = _segments(ocol, g["os"], g["no"]), _segments(oval, g["os"], g["no"])
            self.xval = _segments(xval, g["xs"], g["nx"])
            self.ocnt = g["ocnt"].view(shape)
        if self.fixed_bits is None:
            self.bits = g["bits"].view(shape)
        self._nq = shape[2]

    def _flat(self, idx: torch.Tensor, n: int, base: int = 0) -> torch.Tensor:
        """Flat row index of rows idx [B, H, m] of a [B, H, n] table that starts at `base`."""
        bh = torch.arange(self.B * self.H, device=idx.device).view(self.B, self.H, 1)
        return base + bh * n + idx.long()

    # changes ------------------------------------------------------------------------------------------------------
    def append(self, e: Encoded) -> None:
        m = e.bits.shape[2]
        nq = self._nq
        dev = self.zero.device
        if not self._append_in_place(e):
            t = torch.arange(nq + m, device=dev).view(1, 1, -1).expand(self.B, self.H, nq + m)
            old = self._flat(t.clamp(max=max(nq - 1, 0)), nq)
            new = self._flat((t - nq).clamp(min=0), m, self.B * self.H * nq)
            self._rebuild(torch.where(t < nq, old, new).reshape(-1), (self.B, self.H, nq + m), e)
        if self.spec.axis == "token":
            if nq == 0:  # an empty tensor takes the new rows' metadata layout
                self.zero, self.delta = self.zero[:, : e.zero.shape[1]], self.delta[:, : e.delta.shape[1]]
            self._meta_cat(e)
        else:
            nb_old = self.zero.shape[2]
            if self.blk is not None or nb_old * self.block_rows != nq or m % self.block_rows:
                self._materialize_blk(nq)
                self.blk = torch.cat([self.blk, (e.blk + nb_old).to(torch.int32)], 2)
            self.blocks_seen += e.zero.shape[2]
            self._meta_cat(e)

    def _append_in_place(self, e: Encoded) -> bool:
        """Append e's rows after the held ones by concatenation when that is the flat row order: one sequence and
        KV head (every array in row order), or fixed-width codes without sparse data (each head's bytes one
        stretch). The same arrays as _rebuild, without its per-byte gather; False: _rebuild must do it."""
        BH, nq, m = self.B * self.H, self._nq, e.bits.shape[2]
        if BH != 1 and (self.fixed_bits is None or self.sparse):
            return False
        if e.oval.numel() + self.oval.numel() >= 2**31 or e.buf.numel() + self.buf.numel() >= 2**31:
            raise RuntimeError("a layer's packed cache outgrew int32 offsets (2 GiB of codes per tensor)")
        if BH == 1:
            self.buf = torch.cat([self.buf, e.buf])
        else:
            self.buf = torch.cat([self.buf.view(BH, nq * self.rb), e.buf.view(BH, m * self.rb)], 1).reshape(-1)
        if self.sparse:
            self.ocnt = torch.cat([self.ocnt, e.ocnt.to(self.ocnt.dtype)], 2)
            self.ocol = torch.cat([self.ocol, e.ocol.to(self.ocol.dtype)])
            self.oval = torch.cat([self.oval, e.oval.to(self.dtype)])
            self.xval = torch.cat([self.xval, e.xval.to(self.dtype)])
        if self.fixed_bits is None:
            self.bits = torch.cat([self.bits, e.bits], 2)
        self._nq = nq + m
        return True

    def _meta_cat(self, e: Encoded) -> None:
        if self.zero.shape[1] != e.zero.shape[1]:
            self.zero, self.delta = _expand_heads(self.zero, self.H), _expand_heads(self.delta, self.H)
            e.zero, e.delta = _expand_heads(e.zero, self.H), _expand_heads(e.delta, self.H)
        self.zero = torch.cat([self.zero, e.zero], 2)
        self.delta = torch.cat([self.delta, e.delta], 2)

    def _materialize_blk(self, n: int | None = None) -> None:
        if self.blk is None:
            n = self._nq if n is None else n
            t = torch.arange(n, device=self.zero.device, dtype=torch.int32) // self.block_rows
            self.blk = t.view(1, 1, -1).expand(self.B, self.H, n).contiguous()

    def assign(self, cols: torch.Tensor | None, valid: torch.Tensor, e: Encoded) -> None:
        """Replace rows [:, :, cols][valid] (all columns when cols is None) by the encoded rows [B, H, len(cols)]."""
        nq = self._nq
        dev = self.zero.device
        c = torch.arange(nq, device=dev) if cols is None else cols.to(dev).long()
        mc = c.numel()
        pos_in = torch.full((nq,), -1, dtype=torch.long, device=dev)
        pos_in[c] = torch.arange(mc, device=dev)
        t = torch.arange(nq, device=dev).view(1, 1, nq).expand(self.B, self.H, nq)
        j = pos_in.view(1, 1, nq).expand_as(t)
        rep = torch.zeros_like(t, dtype=torch.bool)
        rep[:, :, c] = valid
        ix = torch.where(rep, self._flat(j.clamp(min=0), mc, self.B * self.H * nq), self._flat(t, nq))
        self._rebuild(ix.reshape(-1), (self.B, self.H, nq), e)
        cs = slice(None) if cols is None else c

        def put(t_, new, mask):
            t_ = t_.clone()
            t_[:, :, cs] = torch.where(mask, new, t_[:, :, cs])
            return t_

        if self.spec.axis == "token":
            if self.zero.shape[1] == 1 and e.zero.shape[1] == 1 and _same_over_heads(valid):
                vz = valid[:, :1]
            else:
                self.zero, self.delta = _expand_heads(self.zero, self.H), _expand_heads(self.delta, self.H)
                e.zero, e.delta = _expand_heads(e.zero, self.H), _expand_heads(e.delta, self.H)
                vz = valid
            self.zero = put(self.zero, e.zero, vz[..., None])
            self.delta = put(self.delta, e.delta, vz[..., None])
        else:
            self._materialize_blk()
            nb_old = self.zero.shape[2]
            self.zero = torch.cat([self.zero, e.zero], 2)
            self.delta = torch.cat([self.delta, e.delta], 2)
            self.blocks_seen += e.zero.shape[2]
            self.blk = put(self.blk, (e.blk + nb_old).to(torch.int32), valid)
            self._drop_dead_blocks()

    def take(self, idx: torch.Tensor) -> None:
        """Keep rows idx [B, H, m] (in that order)."""
        m = idx.shape[2]
        self._rebuild(self._flat(idx, self._nq).reshape(-1), (self.B, self.H, m), None)
        if self.spec.axis == "token":
            if self.zero.shape[1] == 1 and not _same_over_heads(idx):
                self.zero, self.delta = _expand_heads(self.zero, self.H), _expand_heads(self.delta, self.H)
            iz = idx[:, : self.zero.shape[1]]
            ie = iz[..., None].expand(*iz.shape, self.zero.shape[-1])
            self.zero = self.zero.gather(2, ie)
            self.delta = self.delta.gather(2, ie)
        else:
            if self.blk is None:
                self._materialize_blk(self.zero.shape[2] * self.block_rows)
            self.blk = self.blk.gather(2, idx)
            self._drop_dead_blocks()

    def _drop_dead_blocks(self) -> None:
        """Pack each (sequence, head)'s referenced channel blocks to the front of its table; the table keeps as many
        rows as the head with the most live blocks."""
        B, H, nblk = self.zero.shape[:3]
        alive = torch.zeros(B, H, max(nblk, 1), dtype=torch.bool, device=self.blk.device)
        alive.scatter_(2, self.blk.long(), True)
        alive = alive[:, :, :nblk]
        keep = int(alive.sum(-1).max()) if alive.numel() else 0
        if keep == nblk and bool(alive.all()):
            return
        remap = torch.cumsum(alive.long(), -1) - 1
        self.blk = remap.gather(2, self.blk.long()).to(torch.int32)
        src = (~alive).to(torch.int8).argsort(dim=-1, stable=True)[:, :, :keep]  # live blocks first, in order
        ie = src[..., None].expand(B, H, keep, self.zero.shape[-1])
        self.zero = self.zero.gather(2, ie)
        self.delta = self.delta.gather(2, ie)

    # bytes --------------------------------------------------------------------------------------------------------
    def nbytes(self) -> int:
        """Everything held to read the rows: codes, widths, outlier counts, zero/scale, channel blocks, outliers
        with their column indices, exact rows."""
        return _nbytes(self.buf, self.bits, self.ocnt, self.zero, self.delta, self.blk, self.ocol, self.oval,
                       self.xval)

    def addressing_nbytes(self) -> int:
        """The part of nbytes() that only locates rows: per-row widths and outlier counts, channel blocks."""
        return _nbytes(self.bits, self.ocnt, self.blk)

    def accounting(self) -> dict:
        """Bits per element as the QAQ paper counts them, plus each outlier's column index: codes at b bits,
        outliers at 16 bits + index bits, exact rows at 16 bits per element, and 16-bit zero and scale per group of
        packed rows (exact rows need none; a group shared by all heads counts once)."""
        D = self.D
        b = self.row_bits().long()
        ex = b >= EXACT_BITS
        o = torch.zeros_like(b) if self.ocnt is None else torch.where(ex, 0, self.ocnt.long())
        obits = 16 + 8 * self.ocol.element_size()
        code = torch.where(ex, 16 * D, (D - o) * b + obits * o)
        if self.spec.axis == "token":
            Hz = self.zero.shape[1]
            exz = ex[:, :Hz]
            meta = 32 * self.zero.shape[-1] * int((~exz).sum())
        else:
            nblk = self.zero.shape[2]
            blk = self.blk.long() if self.blk is not None else (torch.arange(self._nq, device=b.device)
                                                                 // self.block_rows).expand_as(b)
            used = torch.zeros(self.B, self.H, nblk + 1, dtype=torch.bool, device=self.zero.device)
            used.scatter_(2, torch.where(ex, nblk, blk), True)  # exact rows mark a spare column
            meta = 32 * D * int(used[:, :, :nblk].sum())
        return {"elements": b.numel() * D, "bits": int(code.sum()) + meta, "meta_bits": meta,
                "code_bits": int(torch.where(ex, 0, b).sum()) * D, "rows": b.numel(), "outliers": int(o.sum()),
                "exact_rows": int(ex.sum())}

    # reading ------------------------------------------------------------------------------------------------------
    def rows(self, idx: torch.Tensor | None = None) -> PackedRows:
        """Kernel view of all rows (flattened [B, H, nq]) or of rows idx [B, H, m]: the byte offsets and outlier
        starts are prefix sums of the held widths and counts, made here per call (O(rows) integers)."""
        B, H, nq = self.B, self.H, self._nq
        dev = self.zero.device
        t = self._table()
        ix = torch.arange(B * H * nq, device=dev) if idx is None else self._flat(idx, nq).reshape(-1)
        ex = t["bits"].long()[ix] >= EXACT_BITS
        off = t["off"][ix].to(torch.int32)
        ostart = torch.where(ex, t["xs"][ix], t["os"][ix]).to(torch.int32)
        ocnt = t["no"][ix].to(torch.int16)
        loc = torch.arange(nq, device=dev).view(1, 1, nq).expand(B, H, nq) if idx is None else idx
        if self.spec.axis == "token":
            Hz = self.zero.shape[1]
        else:
            loc = (loc // self.block_rows) if self.blk is None else self.blk.gather(2, loc).long()
            Hz = H
        bz = torch.arange(B, device=dev).view(B, 1, 1) * Hz + torch.arange(H, device=dev).view(1, H, 1) % Hz
        srow = (bz * self.zero.shape[2] + loc).reshape(-1)
        gsz = self.spec.channels_per_group(self.D) if self.spec.axis == "token" else 1
        if self.spec.axis == "token" and Hz == 1 and self.zero.shape[-1] == 1:
            gsz = self.D
        return PackedRows(self.buf, off, t["bits"][ix].to(torch.uint8), srow,
                          self.zero.reshape(-1, self.zero.shape[-1]), self.delta.reshape(-1, self.delta.shape[-1]),
                          gsz, ostart, ocnt, self.ocol, self.oval, self.xval, self.D)

    def code_view(self) -> CodeView:
        """All rows as codes and parameters for attention without dequantization (kvx/kernels/quant_codes.py): the
        codes unpacked into a transient fp32 matrix, the outliers and exact rows as sparse corrections."""
        B, H, nq, D = self.B, self.H, self._nq, self.D
        BH, M = B * H, B * H * nq
        dev = self.zero.device
        t = self._table() if (self.fixed_bits is None or self.sparse) else None
        bits = None if self.fixed_bits is not None else self.bits.reshape(-1)
        codes, F = unpack_rows(self.buf, bits, self.fixed_bits, None if t is None else t["off"], M, D)
        perm = plane_perm(F, D, dev)
        if self.spec.axis == "token":
            NG = self.zero.shape[-1]
            zero = self.zero.expand(B, H, nq, NG).reshape(BH, nq, NG).float()
            delta = self.delta.expand(B, H, nq, NG).reshape(BH, nq, NG).float()
            gp, blk = perm // (D // NG), None
        else:
            nblk = self.zero.shape[2]
            zero = self.zero.reshape(BH, nblk, D)[..., perm].float()
            delta = self.delta.reshape(BH, nblk, D)[..., perm].float()
            gp, blk = None, None if self.blk is None else self.blk.reshape(BH, nq)
        fr = fc = fv = None
        if self.sparse and M and (self.ocol.numel() or self.xval.numel()):
            # outliers and exact rows are held in row order without gaps: entry i belongs to the i-th of them
            ar = torch.arange(M, device=dev)
            ex = ar[t["nx"] > 0]
            fr = torch.cat([ar.repeat_interleave(t["no"]), ex.repeat_interleave(D)])
            fc = torch.cat([self.ocol.long(), torch.arange(D, device=dev).repeat(ex.numel())])
            fv = torch.cat([self.oval.float(), self.xval.float()])
        return CodeView(codes.view(BH, nq, D), perm, zero, delta, self.spec.axis, gp, self.block_rows, blk,
                        fr, fc, fv)

    def dequant(self, idx: torch.Tensor | None = None) -> torch.Tensor:
        m = self._nq if idx is None else idx.shape[2]
        return dequant_rows(self.rows(idx), self.dtype).view(self.B, self.H, m, self.D)
