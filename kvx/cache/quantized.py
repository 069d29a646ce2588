"""Quantized storage: bit-packed integer codes, per-group scales and zero points, a full-precision residual window
and a sparse side store of outliers kept exact.

Slots of a `QuantizedStore` (per sequence and KV head, oldest first):

    [ quantized rows: nq ][ residual: r full-precision rows ]          pos / rpos cover all nq + r slots

- A quantized row is one token of one KV head, packed at b bits per element (b in 0..15; 16 = held exactly) in
  `PackedTensor` (layout and quantizer: kvx/kernels/quant.py). Keys and values each have a `QuantSpec`:
  `axis="token"` groups `group` consecutive channels of one token (one zero/delta per group, KIVI's value layout);
  `axis="channel"` groups one channel over a block of `group` consecutive tokens (KIVI's key layout, Liu et al.,
  2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache", ICML 2024). Outliers: the ceil(a/2 * m)
  smallest and largest elements of each unit of m elements (a = `outliers`, both ends together, as QAQ's official
  code counts them) are held exactly beside the codes and excluded from the group's range.
- The residual holds the most recent tokens in full precision. When it reaches `residual + block` tokens
  (block = the channel-group size, 1 for token groups), its oldest `block`-multiples move into the quantized part.
  This happens at the start of the next forward (`flush`, called by the method's policy before attention), so a
  query at window index i reads token j quantized exactly when j < nq(i) = max(0, floor((i - R) / block)) * block.
- QAQ (Dong et al., 2024, "QAQ: Quality Adaptive Quantization for LLM KV Cache", arXiv:2403.04643) chooses bits per
  token from separate key and value bounds (`QAQConfig`): importance S_t = max of the last n attention weights the
  token received; with `requant`, a full-precision copy of the quantized rows is held off the fast path (CPU) and
  a row whose required bits rise is re-quantized from it.

Attention reads the store through the torch reference (dequantize, then attend) or, for one query token with the
Triton backend, the fused dequantize + decode-attention kernel (kvx/kernels/quant_triton.py).

Masked mode (`masked_attention`): one parallel forward quantizes-dequantizes the window as the store would (same
groups, blocks, outliers and bits) and lets query i read token j quantized exactly when j < nq(i), full precision
otherwise. For fixed bits (uniform, KIVI) this equals token-by-token stream decoding for the same keys, values and
queries (up to float rounding), alone or under an eviction policy that decides from positions only (StreamingLLM)
and never evicts a token still in the residual window. What differs: on a model, the parallel and token-by-token
forwards compute K/V along different float paths, so a code can flip at a cell boundary; an attention-scored policy
(H2O, TOVA, ...) scores full-precision attention in masked mode but the attention over the partly quantized cache in
stream; QAQ chooses bits from full-precision attention in masked mode (stream: from the attention it computed), and
re-quantization on rising importance exists only in stream; QAQ's `token` granularity has no masked form. The
masked-mode byte accounting (`bit_accounting`) describes the window as held when its last query attended, before
any eviction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvx.cache.dense import ConcatStore, Store, _nbytes
from kvx.kernels import reference, use_triton
from kvx.kernels.quant import EXACT_BITS, PackedRows, decode_attention_quant, dequant_rows, pack_rows, row_nbytes

SQRT12 = 2.0 * math.sqrt(3.0)


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor (keys or values) is quantized. bits: 1..15 packed, 16 = held exactly (QAQ sets bits per row)."""

    bits: int = 4
    axis: str = "token"  # token: groups of `group` channels; channel: one channel over `group` tokens
    group: int = 0  # channels per group (token axis; 0 = head_dim) or tokens per block (channel axis)
    outliers: float = 0.0  # fraction of each unit held exactly (both ends together)

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


def _extremes(u: torch.Tensor, vm: torch.Tensor, ratio: float) -> torch.Tensor:
    """True on the ceil(ratio/2 * m) smallest and largest valid elements along the last dim (m = valid count)."""
    cnt = vm.sum(-1, keepdim=True)
    k = torch.ceil(cnt.double() * (ratio / 2.0) - 1e-9).long()
    big = torch.finfo(torch.float32).max
    lo = torch.where(vm, u.float(), big).argsort(dim=-1, stable=True).argsort(dim=-1)
    hi = torch.where(vm, -u.float(), big).argsort(dim=-1, stable=True).argsort(dim=-1)
    return ((lo < k) | (hi < k)) & vm


def outlier_mask(x, valid, spec: QuantSpec, heads_unit: bool = False, block_rows: int = 1) -> torch.Tensor:
    """[B, H, m, D] True on outliers. Units: one group (token axis), one channel of a block (channel axis), or all
    KV heads of a token (`heads_unit`, QAQ's layer/token granularity; token axis only)."""
    B, H, m, D = x.shape
    if spec.outliers <= 0 or m == 0:
        return torch.zeros(B, H, m, D, dtype=torch.bool, device=x.device)
    if spec.axis == "channel":
        nb = m // block_rows
        u = x.view(B, H, nb, block_rows, D).transpose(3, 4)
        vm = valid.view(B, H, nb, 1, block_rows).expand(B, H, nb, D, block_rows)
        return _extremes(u, vm, spec.outliers).transpose(3, 4).reshape(B, H, m, D)
    if heads_unit:
        u = x.permute(0, 2, 1, 3).reshape(B, m, H * D)
        vm = valid.permute(0, 2, 1)[..., None].expand(B, m, H, D).reshape(B, m, H * D)
        return _extremes(u, vm, spec.outliers).view(B, m, H, D).permute(0, 2, 1, 3)
    g = spec.channels_per_group(D)
    u = x.view(B, H, m, D // g, g)
    vm = valid[..., None, None].expand(B, H, m, D // g, g)
    return _extremes(u, vm, spec.outliers).view(B, H, m, D)


def unit_range(x, valid, spec: QuantSpec, heads_unit: bool) -> torch.Tensor:
    """[B, H, m] max - min of each token's unit (one head's row, or all heads of the token), outliers excluded."""
    om = outlier_mask(x, valid, QuantSpec(16, "token", 0, spec.outliers), heads_unit)
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
    zero: torch.Tensor  # token axis: [B, H, m, NG]; channel axis: [B, H, nb, D] (one row per new block)
    delta: torch.Tensor
    blk: torch.Tensor | None  # channel axis: [B, H, m] block of each row (0..nb-1)
    buf: torch.Tensor
    ocol: torch.Tensor
    oval: torch.Tensor
    xval: torch.Tensor


def encode(x, valid, bits, spec: QuantSpec, heads_unit: bool = False, block_rows: int = 1) -> Encoded:
    """Quantize and pack rows x [B, H, m, D] where `valid` [B, H, m]; bits [B, H, m] (>= 16: held exactly).

    Channel axis: m is a multiple of block_rows; each block of block_rows rows shares one zero/delta per channel
    (computed over its valid rows) and one bit width."""
    B, H, m, D = x.shape
    dev = x.device
    mdt = meta_dtype_for(x.dtype)
    bits = bits.long().to(dev)
    exact = bits >= EXACT_BITS
    packed = valid & ~exact
    om = outlier_mask(x, packed, spec, heads_unit, block_rows)
    keep = ~om
    xf = x.float()
    inf = float("inf")
    if spec.axis == "token":
        g = spec.channels_per_group(D)
        NG = D // g
        xg = xf.view(B, H, m, NG, g)
        kg = keep.view(B, H, m, NG, g)
        lo = torch.where(kg, xg, inf).amin(-1)
        hi = torch.where(kg, xg, -inf).amax(-1)
        empty = ~kg.any(-1)
        bcell = bits.clamp(max=15)[..., None]
        srow_all = torch.arange(B * H * m, device=dev).view(B, H, m)
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
    # pack the codes of packed rows, in (b, h, slot) order
    pr = packed.reshape(-1)
    nbytes = row_nbytes(bits.reshape(-1)[pr], D)
    roff = torch.cumsum(nbytes, 0) - nbytes
    total = int(nbytes.sum()) if nbytes.numel() else 0
    buf = pack_rows(x.reshape(-1, D)[pr], bits.reshape(-1)[pr].to(torch.uint8), roff,
                    zero.reshape(-1, zero.shape[-1]), delta.reshape(-1, delta.shape[-1]),
                    srow_all.reshape(-1)[pr], gsz, total)
    off = torch.zeros(B * H * m, dtype=torch.int32, device=dev)
    off[pr] = roff.to(torch.int32)
    # outliers of packed rows (ordered by row, then column) and exact rows
    om = om & packed[..., None]
    ocnt = om.sum(-1).to(torch.int16)  # [B, H, m]
    ocol = om.nonzero()[:, 3].to(torch.int16)
    oval = x[om]
    ostart_o = torch.cumsum(ocnt.reshape(-1).long(), 0) - ocnt.reshape(-1).long()
    ex = (valid & exact).reshape(-1)
    xval = x.reshape(-1, D)[ex].reshape(-1)
    xcount = ex.long() * D
    ostart_x = torch.cumsum(xcount, 0) - xcount
    ostart = torch.where(exact.reshape(-1), ostart_x, ostart_o).view(B, H, m).to(torch.int32)
    ocnt = torch.where(exact, 0, ocnt).to(torch.int16)
    bits = torch.where(valid, bits.clamp(max=EXACT_BITS), 0).to(torch.uint8)
    return Encoded(off.view(B, H, m), bits, ostart, ocnt, zero, delta, blk, buf, ocol, oval, xval)


class PackedTensor:
    """The quantized rows of one tensor (keys or values): [B, H, nq] rows of D elements (layout: kernels/quant.py)."""

    def __init__(self, spec: QuantSpec, B: int, H: int, D: int, device, dtype: torch.dtype):
        self.spec, self.D, self.dtype = spec, D, dtype
        mdt = meta_dtype_for(dtype)
        NG = D // spec.channels_per_group(D) if spec.axis == "token" else D
        self.buf = torch.zeros(0, dtype=torch.uint8, device=device)
        self.off = torch.zeros(B, H, 0, dtype=torch.int32, device=device)
        self.bits = torch.zeros(B, H, 0, dtype=torch.uint8, device=device)
        self.ostart = torch.zeros(B, H, 0, dtype=torch.int32, device=device)
        self.ocnt = torch.zeros(B, H, 0, dtype=torch.int16, device=device)
        self.zero = torch.zeros(B, H, 0, NG, dtype=mdt, device=device)
        self.delta = torch.zeros(B, H, 0, NG, dtype=mdt, device=device)
        self.blk = torch.zeros(B, H, 0, dtype=torch.long, device=device) if spec.axis == "channel" else None
        self.ocol = torch.zeros(0, dtype=torch.int16, device=device)
        self.oval = torch.zeros(0, dtype=dtype, device=device)
        self.xval = torch.zeros(0, dtype=dtype, device=device)

    @property
    def nq(self) -> int:
        return self.off.shape[2]

    @property
    def exact(self) -> torch.Tensor:
        return self.bits.long() >= EXACT_BITS

    def _shifted(self, e: Encoded) -> Encoded:
        if max(self.buf.numel() + e.buf.numel(), self.oval.numel() + e.oval.numel(),
               self.xval.numel() + e.xval.numel()) >= 2**31:
            raise RuntimeError("a layer's packed cache outgrew int32 offsets (2 GiB of codes per tensor)")
        ex = e.bits.long() >= EXACT_BITS
        blk = None if e.blk is None else e.blk + self.zero.shape[2]
        ostart = e.ostart + torch.where(ex, self.xval.numel(), self.oval.numel()).to(torch.int32)
        return Encoded(e.off + self.buf.numel(), e.bits, ostart, e.ocnt, e.zero, e.delta, blk, e.buf, e.ocol,
                       e.oval, e.xval)

    def _cat_payload(self, e: Encoded) -> None:
        self.buf = torch.cat([self.buf, e.buf])
        self.ocol = torch.cat([self.ocol, e.ocol])
        self.oval = torch.cat([self.oval, e.oval.to(self.dtype)])
        self.xval = torch.cat([self.xval, e.xval.to(self.dtype)])

    def append(self, e: Encoded) -> None:
        e = self._shifted(e)
        self._cat_payload(e)
        self.off = torch.cat([self.off, e.off], 2)
        self.bits = torch.cat([self.bits, e.bits], 2)
        self.ostart = torch.cat([self.ostart, e.ostart], 2)
        self.ocnt = torch.cat([self.ocnt, e.ocnt], 2)
        self.zero = torch.cat([self.zero, e.zero], 2)
        self.delta = torch.cat([self.delta, e.delta], 2)
        if self.blk is not None:
            self.blk = torch.cat([self.blk, e.blk], 2)

    def assign(self, cols: torch.Tensor | None, valid: torch.Tensor, e: Encoded) -> None:
        """Replace rows [:, :, cols][valid] (all columns when cols is None) by the encoded rows."""
        e = self._shifted(e)
        self._cat_payload(e)
        c = slice(None) if cols is None else cols

        def put(t, new, mask):
            t = t.clone()
            t[:, :, c] = torch.where(mask, new, t[:, :, c])
            return t

        self.off = put(self.off, e.off, valid)
        self.bits = put(self.bits, e.bits, valid)
        self.ostart = put(self.ostart, e.ostart, valid)
        self.ocnt = put(self.ocnt, e.ocnt, valid)
        if self.blk is None:
            self.zero = put(self.zero, e.zero, valid[..., None])
            self.delta = put(self.delta, e.delta, valid[..., None])
        else:
            self.zero = torch.cat([self.zero, e.zero], 2)
            self.delta = torch.cat([self.delta, e.delta], 2)
            self.blk = put(self.blk, e.blk, valid)
        self.maybe_compact()

    def take(self, idx: torch.Tensor) -> None:
        """Keep rows idx [B, H, m] (in that order)."""
        self.off = self.off.gather(2, idx)
        self.bits = self.bits.gather(2, idx)
        self.ostart = self.ostart.gather(2, idx)
        self.ocnt = self.ocnt.gather(2, idx)
        if self.blk is None:
            ie = idx[..., None].expand(*idx.shape, self.zero.shape[-1])
            self.zero = self.zero.gather(2, ie)
            self.delta = self.delta.gather(2, ie)
        else:
            self.blk = self.blk.gather(2, idx)
            self._drop_dead_blocks()
        self.maybe_compact(force=True)  # like DenseStore.keep, which gathers everything it keeps

    def _drop_dead_blocks(self) -> None:
        """Pack each (sequence, head)'s referenced channel blocks to the front of its table; the table keeps as many
        rows as the head with the most live blocks."""
        B, H, nblk = self.zero.shape[:3]
        alive = torch.zeros(B, H, max(nblk, 1), dtype=torch.bool, device=self.blk.device)
        alive.scatter_(2, self.blk, True)
        alive = alive[:, :, :nblk]
        keep = int(alive.sum(-1).max()) if alive.numel() else 0
        if keep == nblk and bool(alive.all()):
            return
        remap = torch.cumsum(alive.long(), -1) - 1
        self.blk = remap.gather(2, self.blk)
        src = (~alive).to(torch.int8).argsort(dim=-1, stable=True)[:, :, :keep]  # live blocks first, in order
        ie = src[..., None].expand(B, H, keep, self.zero.shape[-1])
        self.zero = self.zero.gather(2, ie)
        self.delta = self.delta.gather(2, ie)

    # bytes --------------------------------------------------------------------------------------------------------
    def live_counts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per row: bytes in buf, entries in ocol/oval, entries in xval."""
        ex = self.exact
        return row_nbytes(self.bits, self.D), torch.where(ex, 0, self.ocnt.long()), ex.long() * self.D

    def maybe_compact(self, force: bool = False) -> None:
        """Rebuild buf / outliers / exact values from the live rows (re-quantized rows leave their old bytes behind;
        they are reclaimed once they outgrow the live ones, or always with `force`)."""
        nb, no, nx = self.live_counts()
        for name, cnt, start in (("buf", nb, self.off), ("o", no, None), ("xval", nx, None)):
            live = int(cnt.sum())
            held = self.buf.numel() if name == "buf" else (self.oval.numel() if name == "o" else self.xval.numel())
            if held == live or (not force and held - live <= live):
                continue
            ex = self.exact.reshape(-1)
            if start is None:
                start = self.ostart
            flat_c, flat_s = cnt.reshape(-1), start.reshape(-1)
            new_s = torch.cumsum(flat_c, 0) - flat_c
            src = flat_s.repeat_interleave(flat_c) + (torch.arange(live, device=flat_c.device)
                                                       - new_s.repeat_interleave(flat_c))
            new_s = new_s.to(torch.int32)
            if name == "buf":
                self.buf = self.buf[src]
                self.off = new_s.view_as(self.off)
            elif name == "o":
                self.ocol, self.oval = self.ocol[src], self.oval[src]
                self.ostart = torch.where(ex, flat_s, new_s).view_as(self.ostart)
            else:
                self.xval = self.xval[src]
                self.ostart = torch.where(ex, new_s, self.ostart.reshape(-1)).view_as(self.ostart)

    def nbytes(self) -> int:
        return _nbytes(self.buf, self.bits, self.zero, self.delta, self.ocol, self.oval, self.xval)

    def aux_nbytes(self) -> int:
        return _nbytes(self.off, self.ostart, self.ocnt, self.blk)

    def accounting(self) -> dict:
        """Bits as the QAQ paper counts them: codes at b bits, outliers and exact rows at 16 bits per element, and
        16-bit zero and scale per group of packed rows (exact rows need none)."""
        D = self.D
        b = self.bits.long()
        ex = b >= EXACT_BITS
        o = torch.where(ex, 0, self.ocnt.long())
        code = torch.where(ex, 16 * D, (D - o) * b + 16 * o)
        if self.blk is None:
            meta = 32 * self.zero.shape[-1] * int((~ex).sum())
        else:
            nblk = self.zero.shape[2]
            used = torch.zeros(*self.blk.shape[:2], nblk + 1, dtype=torch.bool, device=self.blk.device)
            used.scatter_(2, torch.where(ex, nblk, self.blk), True)  # exact rows mark a spare column
            meta = 32 * D * int(used[:, :, :nblk].sum())
        return {"elements": b.numel() * D, "bits": int(code.sum()) + meta, "meta_bits": meta,
                "code_bits": int(torch.where(ex, 0, b).sum()) * D, "rows": b.numel(), "outliers": int(o.sum()),
                "exact_rows": int(ex.sum())}

    # reading ------------------------------------------------------------------------------------------------------
    def rows(self, idx: torch.Tensor | None = None) -> PackedRows:
        """Kernel view of all rows (flattened [B, H, nq]) or of rows idx [B, H, m]."""
        B, H, nq = self.off.shape
        if idx is None:
            off, bits, ostart, ocnt = self.off, self.bits, self.ostart, self.ocnt
            loc = torch.arange(nq, device=off.device).view(1, 1, nq).expand(B, H, nq) if self.blk is None else self.blk
        else:
            off, bits = self.off.gather(2, idx), self.bits.gather(2, idx)
            ostart, ocnt = self.ostart.gather(2, idx), self.ocnt.gather(2, idx)
            loc = idx if self.blk is None else self.blk.gather(2, idx)
        bh = torch.arange(B * H, device=off.device).view(B, H, 1)
        srow = bh * self.zero.shape[2] + loc
        gsz = self.spec.channels_per_group(self.D) if self.blk is None else 1
        return PackedRows(self.buf, off.reshape(-1), bits.reshape(-1), srow.reshape(-1),
                          self.zero.reshape(-1, self.zero.shape[-1]), self.delta.reshape(-1, self.delta.shape[-1]),
                          gsz, ostart.reshape(-1), ocnt.reshape(-1), self.ocol, self.oval, self.xval, self.D)

    def dequant(self, idx: torch.Tensor | None = None) -> torch.Tensor:
        B, H, nq = self.off.shape
        m = nq if idx is None else idx.shape[2]
        return dequant_rows(self.rows(idx), self.dtype).view(B, H, m, self.D)


# QAQ bit allocation ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class QAQConfig:
    """QAQ's bounds (Dong et al., 2024, arXiv:2403.04643, section 3):
        values: sigma_V,t <= value_error / (sqrt(T) * |S_t|)
        keys:   sigma_K,t^2 <= log(T^3 / (T - 1) * key_error^2 + 1) / ||q||^2
        bits:   B_t = ceil(log2((max_t - min_t) / (2 sqrt(3) sigma_t))), clamped to [min_bits, max_bits]
    T: tokens attended; S_t: max of the last `attn_window` attention weights token t received; ||q||^2: the
    `query_quantile` quantile of the squared norms of the last `query_history` queries, taken after the attention
    scaling (the vector whose dot product with a key is the logit). max_t - min_t spans the token's unit (its
    outliers excluded): all KV heads of the layer (granularity layer/token) or one head (head)."""

    key_error: float = 1.0
    value_error: float = 1.0
    min_bits: int = 2
    max_bits: int = 8
    attn_window: int = 5
    granularity: str = "layer"  # token | layer | head
    query_quantile: float = 0.99
    query_history: int = 1024
    requant: bool = True
    offload_device: str = "cpu"


def qaq_bits(rng: torch.Tensor, sigma: torch.Tensor, min_bits: int, max_bits: int) -> torch.Tensor:
    """B = ceil(log2(rng / (2 sqrt(3) sigma))) clamped to [min_bits, max_bits]; 16 and more means exact."""
    with torch.no_grad():
        b = torch.ceil(torch.log2(rng.double() / (SQRT12 * sigma.double())))
        b = torch.nan_to_num(b, nan=float(min_bits), neginf=float(min_bits), posinf=float(max_bits))
        b = b.clamp(min_bits, max_bits)
        return torch.where(b >= EXACT_BITS, EXACT_BITS, b).long()


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

    def on_append(self, k_new, v_new, spec_k: QuantSpec, spec_v: QuantSpec) -> None:
        B, H, t, _ = k_new.shape
        w = self.cfg.attn_window
        rows = self.stash if self.stash is not None and self.stash.shape[2] == t else k_new.new_zeros(B, H, t, w).float()
        self.stash = None
        valid = torch.ones(B, H, t, dtype=torch.bool, device=k_new.device)
        rk = unit_range(k_new, valid, spec_k, self.heads_unit)
        rv = unit_range(v_new, valid, spec_v, self.heads_unit)
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
        self.sig_v = value_sigma(T, c.value_error, S)
        qn2 = self._query_norm2()
        self.sig_k = key_sigma(T, c.key_error, qn2).expand_as(self.sig_v)
        self.sig_k = torch.where(torch.isnan(self.sig_k), 0.0, self.sig_k)  # no query seen yet: most bits
        self.req_k = qaq_bits(self.rng_k, self.sig_k, c.min_bits, c.max_bits)
        self.req_v = qaq_bits(self.rng_v, self.sig_v, c.min_bits, c.max_bits)
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


# the store ------------------------------------------------------------------------------------------------------------
def _slots_mask(ref: torch.Tensor, sl: slice) -> torch.Tensor:
    """[1, 1, n] True on the slots of slice sl (n = ref.shape[2])."""
    i = torch.arange(ref.shape[2], device=ref.device)
    return ((i >= sl.start) & (i < sl.stop)).view(1, 1, -1)


class QuantizedStore(ConcatStore):
    """Packed quantized rows + a full-precision residual window (self.k / self.v) + exact outliers.

    Fixed bits (kspec.bits, vspec.bits) unless `qaq` chooses them per token. `residual`: the fewest most recent
    tokens held in full precision (see the module docstring for when tokens move)."""

    def __init__(self, kspec: QuantSpec, vspec: QuantSpec, residual: int = 0, qaq: QAQConfig | None = None,
                 board: BitBoard | None = None, layer_idx: int = 0):
        super().__init__()
        self.kspec, self.vspec, self.residual = kspec, vspec, int(residual)
        groups = {s.group for s in (kspec, vspec) if s.axis == "channel"}
        if len(groups) > 1:
            raise ValueError("keys and values grouped along channels must use the same block size")
        self.block = groups.pop() if groups else 1
        self.kq: PackedTensor | None = None
        self.vq: PackedTensor | None = None
        self.qaq = QAQState(qaq, layer_idx, board) if qaq is not None else None
        self.fp_k: torch.Tensor | None = None  # QAQ requant: full-precision copy of the quantized rows, off device
        self.fp_v: torch.Tensor | None = None
        self._scaling = 1.0
        self._qpos: torch.Tensor | None = None
        self._n_kv = 1
        self._own_probs: torch.Tensor | None = None
        self.masked_accounting: dict | None = None
        self.masked_sigma: tuple[torch.Tensor, torch.Tensor] | None = None  # QAQ's sigma of the last masked window
        self.masked_bits: tuple[torch.Tensor, torch.Tensor] | None = None  # and the bits it chose

    # shape -------------------------------------------------------------------------------------------------------
    @property
    def nq(self) -> int:
        return 0 if self.kq is None else self.kq.nq

    @property
    def n(self) -> int:
        return self.nq + (0 if self.k is None else self.k.shape[2])

    @property
    def quantizes(self) -> bool:
        if self.qaq is not None:
            return self.qaq.cfg.min_bits < EXACT_BITS
        return self.kspec.bits < EXACT_BITS or self.vspec.bits < EXACT_BITS

    def keys(self) -> torch.Tensor:
        return self.k if self.nq == 0 else torch.cat([self.kq.dequant(), self.k], 2)

    def values(self) -> torch.Tensor:
        return self.v if self.nq == 0 else torch.cat([self.vq.dequant(), self.v], 2)

    # attention ---------------------------------------------------------------------------------------------------
    def attend(self, q, k_new, v_new, pos_new, qpos, scaling, return_probs=False):
        """As DenseStore.attend, over dequantized rows + the residual + the new tokens. QAQ also needs attention
        weights for its importance: it computes them beside the output (`_own_probs`), so the output takes the
        same path as it would without them."""
        self._scaling, self._qpos, self._n_kv = float(scaling), qpos, k_new.shape[1]
        own = self.qaq is not None and self.quantizes and not return_probs
        self._own_probs = None
        nq = self.nq
        if nq == 0:
            out, probs = ConcatStore.attend(self, q, k_new, v_new, pos_new, qpos, scaling, return_probs)
            if own:
                k, v, pos = self._cat(k_new, v_new, pos_new)
                self._own_probs = reference.attention(q, k, v, pos, qpos, scaling, return_probs=True)[1]
            return out, probs
        pos_new = pos_new.to(self.pos.dtype)
        if q.shape[2] == 1 and use_triton(q.device):
            tk = torch.cat([self.k, k_new], 2)
            tv = torch.cat([self.v, v_new], 2)
            tpos = torch.cat([self.pos[:, :, nq:], pos_new], 2)
            out, logits, lse = decode_attention_quant(q[:, :, 0], self.kq.rows(), self.vq.rows(), self.pos[:, :, :nq],
                                                      tk, tv, tpos, qpos[:, 0], scaling, return_probs or own)
            probs = torch.exp(logits - lse[..., None]).to(q.dtype)[:, :, None] if (return_probs or own) else None
            if own:
                self._own_probs = probs
            return out[:, :, None], (probs if return_probs else None)
        k = torch.cat([self.kq.dequant(), self.k, k_new], 2)
        v = torch.cat([self.vq.dequant(), self.v, v_new], 2)
        pos = torch.cat([self.pos, pos_new], 2)
        out, probs = reference.attention(q, k, v, pos, qpos, scaling, return_probs=return_probs)
        if own:
            self._own_probs = reference.attention(q, k, v, pos, qpos, scaling, return_probs=True)[1]
        return out, probs

    def append(self, k_new, v_new, pos_new) -> None:
        ConcatStore.append(self, k_new, v_new, pos_new)
        if self.qaq is not None:
            self.qaq.on_append(k_new, v_new, self.kspec, self.vspec)

    # policy hooks (called by the method's QuantPolicy) ---------------------------------------------------------------
    def observe(self, q: torch.Tensor, probs: torch.Tensor | None) -> None:
        if self.qaq is not None:
            qpos = self._qpos if self._qpos is not None else torch.zeros(q.shape[0], q.shape[2], device=q.device)
            self.qaq.observe(q, probs if probs is not None else self._own_probs, self._scaling, qpos, self._n_kv)
            self._own_probs = None

    def plan(self) -> None:
        if self.qaq is not None:
            self.qaq.plan(self)

    def _bits(self, sl) -> tuple[torch.Tensor, torch.Tensor]:
        if self.qaq is not None:
            return self.qaq.bits(self, sl)
        ref = self.pos[:, :, sl] if isinstance(sl, slice) else sl
        return torch.full_like(ref, self.kspec.bits, dtype=torch.long), torch.full_like(ref, self.vspec.bits,
                                                                                          dtype=torch.long)

    def _heads_aligned(self, pos: torch.Tensor) -> bool:
        return self.qaq is not None and self.qaq.heads_unit and bool((pos == pos[:, :1]).all())

    def _init_packed(self) -> None:
        if self.kq is None:
            B, H, _, D = self.k.shape
            self.kq = PackedTensor(self.kspec, B, H, D, self.k.device, self.k.dtype)
            self.vq = PackedTensor(self.vspec, B, H, D, self.v.device, self.v.dtype)

    def flush(self) -> None:
        """Move the oldest residual tokens into the quantized part (in blocks), then re-quantize rows whose
        importance rose (QAQ with `requant`)."""
        if self.k is None or not self.quantizes:
            return
        r, R, blk = self.k.shape[2], self.residual, self.block
        nmove = ((r - R) // blk) * blk if r >= R + blk else 0
        if nmove:
            self._init_packed()
            nq = self.nq
            sl = slice(nq, nq + nmove)
            bk, bv = self._bits(sl)
            xk, xv = self.k[:, :, :nmove], self.v[:, :, :nmove]
            valid = self.pos[:, :, sl] >= 0  # padding rows hold no codes and stay out of group statistics
            hu = self._heads_aligned(self.pos[:, :, sl])
            self.kq.append(encode(xk, valid, bk, self.kspec, hu, blk))
            self.vq.append(encode(xv, valid, bv, self.vspec, hu, blk))
            if self.qaq is not None:
                moved = _slots_mask(self.qaq.qsig_k, sl)
                self.qaq.qsig_k = torch.where(moved, self.qaq.sig_k, self.qaq.qsig_k)
                self.qaq.qsig_v = torch.where(moved, self.qaq.sig_v, self.qaq.qsig_v)
                if self.qaq.cfg.requant:
                    dev = self.qaq.cfg.offload_device
                    ck, cv = xk.to(dev), xv.to(dev)
                    self.fp_k = ck if self.fp_k is None else torch.cat([self.fp_k, ck], 2)
                    self.fp_v = cv if self.fp_v is None else torch.cat([self.fp_v, cv], 2)
            self.k, self.v = self.k[:, :, nmove:], self.v[:, :, nmove:]
        if self.qaq is not None and self.qaq.cfg.requant and self.nq:
            self._requant()

    def _requant(self) -> None:
        nq = self.nq
        bk, bv = self._bits(slice(0, nq))
        for which, want, pt, fp in (("k", bk, self.kq, self.fp_k), ("v", bv, self.vq, self.fp_v)):
            cur = pt.bits.long()
            need = want > cur
            if not bool(need.any()):
                continue
            hu = self.qaq.heads_unit
            if hu:  # a token's heads share bits and outlier unit: re-quantize all its heads
                need = need.any(1, keepdim=True).expand_as(need)
            cols = need.any(0).any(0).nonzero().squeeze(1)
            pos = self.pos[:, :, cols]
            hu = hu and bool((pos == pos[:, :1]).all())
            x = fp[:, :, cols.to(fp.device)].to(self.k.device)
            bits = torch.maximum(want[:, :, cols], cur[:, :, cols])
            spec = self.kspec if which == "k" else self.vspec
            pt.assign(cols, need[:, :, cols], encode(x, need[:, :, cols], bits, spec, hu))
            name = "qsig_" + which
            sig = getattr(self.qaq, "sig_" + which)
            qsig = getattr(self.qaq, name)
            full = torch.zeros_like(qsig, dtype=torch.bool)
            full = torch.cat([need, full[:, :, nq:]], 2)
            setattr(self.qaq, name, torch.where(full, sig, qsig))

    # eviction ----------------------------------------------------------------------------------------------------
    def _rows(self, idx: torch.Tensor) -> dict:
        """Dequantized / residual keys and values of slots idx [B, H, m]."""
        nq = self.nq
        D = self.k.shape[-1]
        ir = (idx - nq).clamp(min=0)
        k = self.k.gather(2, ir[..., None].expand(*ir.shape, D)) if self.k.shape[2] else None
        v = self.v.gather(2, ir[..., None].expand(*ir.shape, D)) if self.v.shape[2] else None
        if nq:
            iq = idx.clamp(max=nq - 1)
            isq = (idx < nq)[..., None]
            kd, vd = self.kq.dequant(iq), self.vq.dequant(iq)
            k = kd if k is None else torch.where(isq, kd, k)
            v = vd if v is None else torch.where(isq, vd, v)
        return {"k": k, "v": v, "pos": self.pos.gather(2, idx), "rpos": self.rpos.gather(2, idx)}

    def keep(self, idx: torch.Tensor) -> dict | None:
        """Keep slots idx [B, H, m]; returns the evicted tokens (dequantized). If heads keep different numbers of
        quantized tokens, the oldest kept residual tokens of the others are quantized now so that every head holds
        the same number of quantized rows (one new channel block on the channel axis)."""
        idx = idx.sort(dim=-1).values
        n, m = self.n, idx.shape[-1]
        evicted = None
        if m < n:
            drop = torch.ones(self.pos.shape, dtype=torch.bool, device=idx.device)
            drop.scatter_(2, idx, False)
            evicted = self._rows(drop.nonzero()[:, 2].view(*self.pos.shape[:2], n - m))
        self.pos, self.rpos = self.pos.gather(2, idx), self.rpos.gather(2, idx)
        if self.qaq is not None:
            self.qaq.take(idx)
        nq = self.nq
        mq = (idx < nq).sum(-1)
        mqx = int(mq.max()) if nq else 0
        qidx, ridx = idx[..., :mqx], idx[..., mqx:] - nq
        D = self.k.shape[-1]
        if mqx:
            old = qidx < nq
            self.kq.take(qidx.clamp(max=nq - 1))
            self.vq.take(qidx.clamp(max=nq - 1))
            if self.fp_k is not None:
                ic = qidx.clamp(max=nq - 1).to(self.fp_k.device)
                self.fp_k = self.fp_k.gather(2, ic[..., None].expand(*ic.shape, D))
                self.fp_v = self.fp_v.gather(2, ic[..., None].expand(*ic.shape, D))
            if not bool(old.all()):
                rs = (qidx - nq).clamp(min=0)[..., None].expand(*qidx.shape, D)
                xk, xv = self.k.gather(2, rs), self.v.gather(2, rs)
                bk, bv = self._bits(slice(0, mqx))
                bk = torch.where(old, self.kq.bits.long(), bk)
                bv = torch.where(old, self.vq.bits.long(), bv)
                new = ~old
                self.kq.assign(None, new, encode(xk, new, bk, self.kspec, False, mqx))
                self.vq.assign(None, new, encode(xv, new, bv, self.vspec, False, mqx))
                if self.qaq is not None:
                    full = torch.cat([new, torch.zeros_like(self.qaq.qsig_k[:, :, mqx:], dtype=torch.bool)], 2)
                    self.qaq.qsig_k = torch.where(full, self.qaq.sig_k, self.qaq.qsig_k)
                    self.qaq.qsig_v = torch.where(full, self.qaq.sig_v, self.qaq.qsig_v)
                if self.fp_k is not None:
                    nm = new.to(self.fp_k.device)[..., None]
                    self.fp_k = torch.where(nm, xk.to(self.fp_k.device), self.fp_k)
                    self.fp_v = torch.where(nm, xv.to(self.fp_v.device), self.fp_v)
        elif self.kq is not None:
            empty = torch.zeros(*idx.shape[:2], 0, dtype=torch.long, device=idx.device)
            self.kq.take(empty)
            self.vq.take(empty)
            if self.fp_k is not None:
                self.fp_k, self.fp_v = self.fp_k[:, :, :0], self.fp_v[:, :, :0]
        re = ridx[..., None].expand(*ridx.shape, D)
        self.k, self.v = self.k.gather(2, re), self.v.gather(2, re)
        return evicted

    # bytes -------------------------------------------------------------------------------------------------------
    def nbytes(self) -> int:
        q = 0 if self.kq is None else self.kq.nbytes() + self.vq.nbytes()
        return q + _nbytes(self.k, self.v)

    def aux_nbytes(self) -> int:
        q = 0 if self.kq is None else self.kq.aux_nbytes() + self.vq.aux_nbytes()
        return q + _nbytes(self.pos, self.rpos)

    def offload_nbytes(self) -> int:
        """Bytes of QAQ's full-precision copy held off the fast path (CPU), not part of nbytes()."""
        return _nbytes(self.fp_k, self.fp_v)

    def bit_accounting(self) -> dict:
        """Elements held and their bits as the QAQ paper counts them (16 / average bits = its compression ratio):
        codes at their width, outliers and full-precision tokens at 16 bits, 16-bit zero and scale per group."""
        if self.k is None and self.masked_accounting is not None:
            return dict(self.masked_accounting)
        out = {"elements": 0, "bits": 0, "key_code_bits": 0, "value_code_bits": 0, "quantized_elements": 0}
        if self.kq is not None:
            ak, av = self.kq.accounting(), self.vq.accounting()
            out["elements"] += ak["elements"] + av["elements"]
            out["bits"] += ak["bits"] + av["bits"]
            out["key_code_bits"], out["value_code_bits"] = ak["code_bits"], av["code_bits"]
            out["quantized_elements"] = ak["elements"]
        if self.k is not None:
            res = self.k.numel() + self.v.numel()
            out["elements"] += res
            out["bits"] += 16 * res
        return out

    # masked mode -------------------------------------------------------------------------------------------------
    def masked_attention(self, q, k, v, allowed, scaling, evicted=None):
        """Parallel twin of stream decoding: query i reads token j quantized when j < nq(i) (module docstring)."""
        B, Hq, T, D = q.shape
        H = k.shape[1]
        g = Hq // H
        R, blk = self.residual, self.block
        i = torch.arange(T, device=q.device)
        nq_i = ((i - R).clamp(min=0) // blk) * blk
        M = int(nq_i[-1]) if T else 0
        if not self.quantizes or M == 0:
            self.masked_accounting = {"elements": 2 * k.numel(), "bits": 32 * k.numel()}
            return Store.masked_attention(self, q, k, v, allowed, scaling, evicted)
        qg = q.view(B, H, g, T, D)
        lf = torch.matmul(qg, k[:, :, None].transpose(-1, -2)) * scaling  # [B, H, g, T, T]
        if self.qaq is not None:
            pf = torch.softmax(lf.masked_fill(~allowed, float("-inf")).float(), dim=-1)
            bk, bv = self._masked_qaq_bits(q, k, v, pf, allowed, scaling, M)
        else:
            bk = torch.full((B, H, M), self.kspec.bits, dtype=torch.long, device=q.device)
            bv = torch.full((B, H, M), self.vspec.bits, dtype=torch.long, device=q.device)
        self.masked_bits = (bk, bv)
        if bool((bk >= EXACT_BITS).all()) and bool((bv >= EXACT_BITS).all()):  # every token exact
            self.masked_accounting = {"elements": 2 * k.numel(), "bits": 32 * k.numel()}
            return Store.masked_attention(self, q, k, v, allowed, scaling, evicted)
        valid = torch.ones(B, H, M, dtype=torch.bool, device=q.device)
        hu = self.qaq is not None and self.qaq.heads_unit
        pk = PackedTensor(self.kspec, B, H, D, k.device, k.dtype)
        pv = PackedTensor(self.vspec, B, H, D, v.device, v.dtype)
        pk.append(encode(k[:, :, :M], valid, bk, self.kspec, hu, blk))
        pv.append(encode(v[:, :, :M], valid, bv, self.vspec, hu, blk))
        kh = torch.cat([pk.dequant(), k[:, :, M:]], 2)
        vh = torch.cat([pv.dequant(), v[:, :, M:]], 2)
        lq = torch.matmul(qg, kh[:, :, None].transpose(-1, -2)) * scaling
        sel = i[None, :] < nq_i[:, None]  # [T (query), T (key)]: read quantized
        logits = torch.where(sel, lq, lf).masked_fill(~allowed, float("-inf"))
        p = torch.softmax(logits.float(), dim=-1).to(q.dtype)
        zero = torch.zeros((), dtype=p.dtype, device=p.device)
        out = torch.matmul(torch.where(sel, p, zero), vh[:, :, None]) + torch.matmul(torch.where(sel, zero, p),
                                                                                     v[:, :, None])
        ak, av = pk.accounting(), pv.accounting()
        res = 2 * (T - M) * B * H * D
        self.masked_accounting = {"elements": ak["elements"] + av["elements"] + res,
                                  "bits": ak["bits"] + av["bits"] + 16 * res,
                                  "key_code_bits": ak["code_bits"], "value_code_bits": av["code_bits"],
                                  "quantized_elements": ak["elements"]}
        return out.reshape(B, Hq, T, D)

    def _masked_qaq_bits(self, q, k, v, pf, allowed, scaling, M):
        """The bits the stream store gives tokens 0..M-1, from full-precision attention: token j is quantized after
        step tau_j = j + R with importance from rows tau_j - n + 1 .. tau_j, T = keys read by query tau_j and the
        query-norm quantile over the queries up to tau_j."""
        c = self.qaq.cfg
        B, Hq, T, D = q.shape
        H = k.shape[1]
        dev = q.device
        P = pf.amax(2)  # [B, H, T (query), T (key)]
        j = torch.arange(M, device=dev)
        tau = j + self.residual
        S = torch.zeros(B, H, M, dtype=torch.float32, device=dev)
        for o in range(c.attn_window):
            row = tau - o
            ok = row >= j
            val = P[:, :, row.clamp(min=0), j]
            S = torch.maximum(S, torch.where(ok, val, 0.0))
        if self.qaq.heads_unit:
            S = S.amax(1, keepdim=True).expand_as(S)
        Tj = allowed[:, :, 0, tau, :].sum(-1).double()  # [B, H, M]
        sig_v = value_sigma(Tj, c.value_error, S)
        qn2 = ((q.float() * scaling) ** 2).sum(-1)  # [B, Hq, T]
        L = c.query_history
        ti = torch.arange(T, device=dev)
        win = (ti[None, :] <= tau[:, None]) & (ti[None, :] > tau[:, None] - L)  # [M, T]
        hist = torch.where(win[None, None], qn2[:, :, None, :], float("nan"))  # [B, Hq, M, T]
        if self.qaq.heads_unit:
            x = hist.permute(0, 2, 1, 3).reshape(B, 1, M, Hq * T)
        else:
            x = hist.view(B, H, Hq // H, M, T).permute(0, 1, 3, 2, 4).reshape(B, H, M, (Hq // H) * T)
        qq = torch.nanquantile(x.double(), c.query_quantile, dim=-1)  # [B, 1 or H, M]
        sig_k = key_sigma(Tj, c.key_error, qq)
        valid = torch.ones(B, H, M, dtype=torch.bool, device=dev)
        rk = unit_range(k[:, :, :M], valid, self.kspec, self.qaq.heads_unit)
        rv = unit_range(v[:, :, :M], valid, self.vspec, self.qaq.heads_unit)
        self.masked_sigma = (sig_k, sig_v)
        return qaq_bits(rk, sig_k, c.min_bits, c.max_bits), qaq_bits(rv, sig_v, c.min_bits, c.max_bits)


def compression_stats(cache) -> dict:
    """Sum the layers' bit accounting: {"elements", "bits", "ratio" (= 16 * elements / bits, QAQ's compression
    ratio), "avg_key_bits", "avg_value_bits" (code bits per quantized element)}. Stores without `bit_accounting`
    count their keys and values at 16 bits."""
    el = bits = kcb = vcb = qel = 0
    for layer in cache.layers:
        st = layer.store
        acct = st.bit_accounting() if hasattr(st, "bit_accounting") else None
        if acct is None:
            k = st.keys() if st.n else None
            e = 0 if k is None else 2 * k.numel()
            acct = {"elements": e, "bits": 16 * e}
        el += acct["elements"]
        bits += acct["bits"]
        kcb += acct.get("key_code_bits", 0)
        vcb += acct.get("value_code_bits", 0)
        qel += acct.get("quantized_elements", 0)
    return {"elements": el, "bits": bits, "ratio": 16.0 * el / bits if bits else 1.0,
            "avg_key_bits": kcb / qel if qel else None, "avg_value_bits": vcb / qel if qel else None}
