"""Quantized storage: a `QuantizedStore` holds one layer's keys and values as bit-packed codes with a full-precision
residual window, for the quantized methods (uniform, kivi, qaq: kvx/methods/). Three parts, one module each:

- kvx/cache/quant_packed.py: `QuantSpec`, outlier selection, `encode` and `PackedTensor` (the packed rows of one
  tensor, with the bytes that address them);
- kvx/cache/quant_qaq.py: QAQ's bit rules (`QAQConfig`, paper or official), `BitBoard` and `QAQState`;
- this module: the store (slots, residual window, flush, re-quantization, eviction, masked mode, byte counters).

Slots of a `QuantizedStore` (per sequence and KV head, oldest first):

    [ quantized rows: nq ][ residual: r full-precision rows ]          pos / rpos cover all nq + r slots

- The residual holds the most recent tokens in full precision. When it reaches `residual + block` tokens
  (block = the channel-group size, 1 for token groups), its oldest `block`-multiples move into the quantized part.
  This happens at the start of the next forward (`flush`, called by the method's policy before attention), so a
  query at window index i reads token j quantized exactly when j < nq(i) = max(0, floor((i - R) / block)) * block.
- QAQ (Dong et al., 2024, arXiv:2403.04643) chooses bits per token from separate key and value bounds; with
  `requant`, a full-precision copy of the quantized rows is held off the fast path and a row whose required width
  changes (up or down) is re-quantized from it.
- Bytes: `nbytes()` is everything the store holds on the compute device (codes, widths and offsets, zero/scale,
  outliers with their indices, the residual window); `offload_nbytes()` is QAQ's full-precision copy;
  `bit_accounting()` counts bits per element as the QAQ paper does (its compression ratio).

Attention reads the store, for one query token with the Triton backend, through the fused dequantize + decode-attention
kernel (kvx/kernels/quant_triton.py); otherwise, for decode-sized queries (CODES_QUERIES), straight from the codes
(kvx/kernels/quant_codes.py: no dequantized rows, fp32 arithmetic), and for longer chunks through the torch reference
(dequantize, then attend).

Masked mode (`masked_attention`): one parallel forward quantizes-dequantizes the window as the store would (same
groups, blocks, outliers and bits) and lets query i read token j quantized exactly when j < nq(i), full precision
otherwise. For fixed bits (uniform, KIVI) this equals token-by-token stream decoding for the same keys, values and
queries (up to float rounding), alone or under an eviction policy that decides from positions only (StreamingLLM)
and never evicts a token still in the residual window. What differs: on a model, the parallel and token-by-token
forwards compute K/V along different float paths, so a code can flip at a cell boundary; an attention-scored policy
(H2O, TOVA, ...) scores full-precision attention in masked mode but the attention over the partly quantized cache in
stream; QAQ chooses bits from full-precision attention in masked mode (stream: from the attention it computed), and
re-quantization exists only in stream; QAQ's `token` granularity has no masked form. The masked-mode byte counters
(`bit_accounting`, `masked_nbytes`) describe the window as the stream store would hold it at its last query.
"""

from __future__ import annotations

import torch

from kvx.cache.dense import ConcatStore, Store, _nbytes
from kvx.cache.quant_packed import (  # noqa: F401  (re-exported: the quantized storage's public names)
    Encoded,
    PackedTensor,
    QuantSpec,
    encode,
    meta_dtype_for,
    outlier_counts,
    outlier_mask,
    round_meta,
    unit_range,
)
from kvx.cache.quant_qaq import (  # noqa: F401
    BitBoard,
    QAQConfig,
    QAQState,
    key_sigma,
    official_bits,
    official_bounds,
    qaq_bits,
    rule_bits,
    value_sigma,
)
from kvx.kernels import reference, use_triton
from kvx.kernels.quant import EXACT_BITS, decode_attention_quant

CODES_QUERIES = 16  # query rows per KV head (GQA group x new tokens) up to which attention reads the codes


def _slots_mask(ref: torch.Tensor, sl: slice) -> torch.Tensor:
    """[1, 1, n] True on the slots of slice sl (n = ref.shape[2])."""
    i = torch.arange(ref.shape[2], device=ref.device)
    return ((i >= sl.start) & (i < sl.stop)).view(1, 1, -1)


class QuantizedStore(ConcatStore):
    """Packed quantized rows + a full-precision residual window (self.k / self.v) + exact outliers.

    Fixed bits (kspec.bits, vspec.bits) unless `qaq` chooses them per token. `residual`: the recent tokens held
    in full precision, by `residual_rule` (module docstring): `grouped` moves keys and values together; `kivi`
    (official KIVI) holds 0..R-1 full-precision keys (all R quantized at once when they reach R) and exactly R
    full-precision values, so keys and values may have different numbers of quantized rows (nq_k, nq_v)."""

    def __init__(self, kspec: QuantSpec, vspec: QuantSpec, residual: int = 0, qaq: QAQConfig | None = None,
                 board: BitBoard | None = None, layer_idx: int = 0, residual_rule: str = "grouped"):
        super().__init__()
        self.kspec, self.vspec, self.residual = kspec, vspec, int(residual)
        if residual_rule not in ("grouped", "kivi") or (residual_rule == "kivi" and qaq is not None):
            raise ValueError(f"residual_rule must be grouped or kivi (not with QAQ), got {residual_rule!r}")
        self.residual_rule = residual_rule
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
        self._masked_bytes: tuple | None = None  # (bytes held, packed bytes, quantized tokens, bytes/fp token, T)
        self.masked_sigma: tuple[torch.Tensor, torch.Tensor] | None = None  # QAQ's sigma of the last masked window
        self.masked_bits: tuple[torch.Tensor, torch.Tensor] | None = None  # and the bits it chose

    # shape -------------------------------------------------------------------------------------------------------
    @property
    def nq(self) -> int:
        """Quantized key rows (= value rows except under residual_rule kivi)."""
        return 0 if self.kq is None else self.kq.nq

    @property
    def nq_v(self) -> int:
        return 0 if self.vq is None else self.vq.nq

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
        return self.v if self.nq_v == 0 else torch.cat([self.vq.dequant(), self.v], 2)

    # attention ---------------------------------------------------------------------------------------------------
    def attend(self, q, k_new, v_new, pos_new, qpos, scaling, return_probs=False):
        """As ConcatStore.attend, over dequantized rows + the residual + the new tokens. QAQ also needs attention
        weights for its importance: it computes them beside the output (`_own_probs`), so the output takes the
        same path as it would without them."""
        self._scaling, self._qpos, self._n_kv = float(scaling), qpos, k_new.shape[1]
        own = self.qaq is not None and self.quantizes and not return_probs
        self._own_probs = None
        nq, nv = self.nq, self.nq_v
        if nq == 0 and nv == 0:
            out, probs = ConcatStore.attend(self, q, k_new, v_new, pos_new, qpos, scaling, return_probs)
            if own:
                k, v, pos = self._cat(k_new, v_new, pos_new)
                self._own_probs = reference.attention(q, k, v, pos, qpos, scaling, return_probs=True)[1]
            return out, probs
        pos_new = pos_new.to(self.pos.dtype)
        if q.shape[2] == 1 and use_triton(q.device):
            # the kernel reads nc = min(nq, nv) packed rows of each; the other's extra rows join the dense tail
            nc = min(nq, nv)
            B, H = self.pos.shape[:2]
            ix = torch.arange(max(nq, nv), device=q.device).view(1, 1, -1).expand(B, H, -1)
            tk = torch.cat([self.kq.dequant(ix[..., nc:nq]), self.k, k_new], 2)
            tv = torch.cat([self.vq.dequant(ix[..., nc:nv]), self.v, v_new], 2)
            tpos = torch.cat([self.pos[:, :, nc:], pos_new], 2)
            kr = self.kq.rows(ix[..., :nc] if nc < nq else None)
            vr = self.vq.rows(ix[..., :nc] if nc < nv else None)
            out, logits, lse = decode_attention_quant(q[:, :, 0], kr, vr, self.pos[:, :, :nc],
                                                      tk, tv, tpos, qpos[:, 0], scaling, return_probs or own)
            probs = torch.exp(logits - lse[..., None]).to(q.dtype)[:, :, None] if (return_probs or own) else None
            if own:
                self._own_probs = probs
            return out[:, :, None], (probs if return_probs else None)
        B, Hq, t, _ = q.shape
        if self._codes_path(B, Hq, t):
            out, probs = self._attend_codes(q, k_new, v_new, pos_new, qpos, scaling, return_probs or own)
            if own:
                self._own_probs = probs
            return out, (probs if return_probs else None)
        k = torch.cat([self.kq.dequant(), self.k, k_new], 2)
        v = torch.cat([self.vq.dequant(), self.v, v_new], 2)
        pos = torch.cat([self.pos, pos_new], 2)
        out, probs = reference.attention(q, k, v, pos, qpos, scaling, return_probs=return_probs)
        if own:
            self._own_probs = reference.attention(q, k, v, pos, qpos, scaling, return_probs=True)[1]
        return out, probs

    def _codes_path(self, B: int, Hq: int, t: int) -> bool:
        """Decode-sized queries (at most CODES_QUERIES query rows per KV head) whose per-group score matrices stay
        within reference.BLOCK_ELEMENTS, over rows that hold codes (rows held exactly only: dequantizing is a
        copy, and the reference path reproduces the full cache bit for bit)."""
        if (Hq // self.pos.shape[1]) * t > CODES_QUERIES or not (self.kq.buf.numel() or self.vq.buf.numel()):
            return False
        groups = max(pt.zero.shape[-1] if pt.spec.axis == "token" else 1 for pt in (self.kq, self.vq))
        return B * Hq * t * (self.n + t) * groups <= reference.BLOCK_ELEMENTS

    def _attend_codes(self, q, k_new, v_new, pos_new, qpos, scaling, want: bool):
        """Attention of a few queries over the codes (kvx/kernels/quant_codes.py: no dequantized copy of the
        quantized rows), the residual window and the new tokens; fp32 arithmetic. Returns out and, if `want`, the
        probabilities [B, Hq, t, n + t] (q's dtype)."""
        B, Hq, t, D = q.shape
        H = self.pos.shape[1]
        BH, G = B * H, (Hq // H) * t
        qf = (q.float() * scaling).reshape(BH, G, D)
        tk = torch.cat([self.k, k_new], 2).float().reshape(BH, -1, D)
        s = torch.bmm(qf, tk.transpose(1, 2))
        if self.nq:
            s = torch.cat([self.kq.code_view().scores(qf), s], -1)
        ok = reference.allowed_mask(torch.cat([self.pos, pos_new], 2), qpos)  # [B, H, 1, t, N]
        s = s.view(B, H, Hq // H, t, -1).masked_fill(~ok, float("-inf"))
        p = torch.softmax(s, dim=-1).view(BH, G, -1)
        nv = self.nq_v
        tv = torch.cat([self.v, v_new], 2).float().reshape(BH, -1, D)
        out = torch.bmm(p[..., nv:], tv)
        if nv:
            out = out + self.vq.code_view().weighted_sum(p[..., :nv])
        probs = p.view(B, Hq, t, -1).to(q.dtype) if want else None
        return out.view(B, Hq, t, D).to(q.dtype), probs

    def append(self, k_new, v_new, pos_new) -> None:
        ConcatStore.append(self, k_new, v_new, pos_new)
        if self.qaq is not None:
            self.qaq.on_append(k_new, v_new, self.kspec, self.vspec, pos_new)

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

    def _new_packed(self, spec: QuantSpec, B: int, H: int, D: int, device, dtype) -> PackedTensor:
        """Fixed bits below 16 (uniform, KIVI): a fixed-width layout; QAQ: per-row widths and offsets. Outlier and
        exact-row addressing only where outliers or exact rows can occur."""
        if self.qaq is None:
            fixed = spec.bits if spec.bits < EXACT_BITS else None
            sparse = spec.outliers > 0 or fixed is None
        else:
            fixed, sparse = None, spec.outliers > 0 or self.qaq.cfg.max_bits >= EXACT_BITS
        return PackedTensor(spec, B, H, D, device, dtype, fixed, sparse, self.block)

    def _init_packed(self) -> None:
        if self.kq is None:
            B, H, _, D = self.k.shape
            self.kq = self._new_packed(self.kspec, B, H, D, self.k.device, self.k.dtype)
            self.vq = self._new_packed(self.vspec, B, H, D, self.v.device, self.v.dtype)

    def _useq(self, pt: PackedTensor, pos: torch.Tensor, block_rows: int) -> torch.Tensor:
        """Unit numbers of rows about to be encoded (outlier counts): token index, or the channel block's index."""
        if pt.spec.axis == "token":
            return pos.long()
        m = pos.shape[2]
        t = torch.arange(m, device=pos.device) // block_rows + pt.blocks_seen
        return t.view(1, 1, m).expand_as(pos)

    def flush(self) -> None:
        """Move the oldest residual tokens into the quantized part (in blocks), then re-quantize rows whose
        importance rose (QAQ with `requant`)."""
        if self.k is None or not self.quantizes:
            return
        r, R, blk = self.k.shape[2], self.residual, self.block
        if self.residual_rule == "kivi":
            self._flush_kivi()
            return
        nmove = ((r - R) // blk) * blk if r >= R + blk else 0
        if nmove:
            self._init_packed()
            nq = self.nq
            sl = slice(nq, nq + nmove)
            bk, bv = self._bits(sl)
            xk, xv = self.k[:, :, :nmove], self.v[:, :, :nmove]
            valid = self.pos[:, :, sl] >= 0  # padding rows hold no codes and stay out of group statistics
            hu = self._heads_aligned(self.pos[:, :, sl])
            ps = self.pos[:, :, sl]
            for pt, x, b in ((self.kq, xk, bk), (self.vq, xv, bv)):
                pt.append(encode(x, valid, b, pt.spec, hu, blk, self._useq(pt, ps, blk), pt.fixed_bits is not None))
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

    def _flush_kivi(self) -> None:
        """Official KIVI: keys move R at a time when R full-precision keys are held (0..R-1 stay), values move as
        soon as more than R are held (exactly R stay)."""
        R = self.residual
        rk, rv = self.k.shape[2], self.v.shape[2]
        mk = (rk // R) * R if R else (rk // self.block) * self.block
        mv = max(0, rv - R)
        if mk or mv:
            self._init_packed()
        for name, pt, m in (("k", self.kq, mk), ("v", self.vq, mv)):
            if not m:
                continue
            x = getattr(self, name)
            sl = slice(pt.nq, pt.nq + m)
            ps = self.pos[:, :, sl]
            blk = self.block if pt.spec.axis == "channel" else 1
            bits = torch.full(ps.shape, pt.spec.bits, dtype=torch.long, device=ps.device)
            pt.append(encode(x[:, :, :m], ps >= 0, bits, pt.spec, False, blk, self._useq(pt, ps, blk),
                             pt.fixed_bits is not None))
            setattr(self, name, x[:, :, m:])

    def _requant(self) -> None:
        """Re-quantize, from the full-precision copy, every quantized row whose required width changed: up when
        its importance rose, down when it fell (QAQ section 4.2)."""
        nq = self.nq
        bk, bv = self._bits(slice(0, nq))
        for which, want, pt, fp in (("k", bk, self.kq, self.fp_k), ("v", bv, self.vq, self.fp_v)):
            cur = pt.row_bits().long()
            need = (want != cur) & (self.pos[:, :, :nq] >= 0)
            if not bool(need.any()):
                continue
            hu = self.qaq.heads_unit
            if hu:  # a token's heads share bits and outlier unit: re-quantize all its heads
                need = need.any(1, keepdim=True).expand_as(need)
            cols = need.any(0).any(0).nonzero().squeeze(1)
            pos = self.pos[:, :, cols]
            hu = hu and bool((pos == pos[:, :1]).all())
            x = fp[:, :, cols.to(fp.device)].to(self.k.device)
            bits = torch.where(need[:, :, cols], want[:, :, cols], cur[:, :, cols])
            pt.assign(cols, need[:, :, cols], encode(x, need[:, :, cols], bits, pt.spec, hu, 1, pos))
            name = "qsig_" + which
            sig = getattr(self.qaq, "sig_" + which)
            qsig = getattr(self.qaq, name)
            full = torch.zeros_like(qsig, dtype=torch.bool)
            full = torch.cat([need, full[:, :, nq:]], 2)
            setattr(self.qaq, name, torch.where(full, sig, qsig))

    # eviction ----------------------------------------------------------------------------------------------------
    def _rows(self, idx: torch.Tensor) -> dict:
        """Dequantized / residual keys and values of slots idx [B, H, m]."""
        out = {"pos": self.pos.gather(2, idx), "rpos": self.rpos.gather(2, idx)}
        D = self.k.shape[-1]
        for name, pt in (("k", self.kq), ("v", self.vq)):
            nq = 0 if pt is None else pt.nq
            x = getattr(self, name)
            ir = (idx - nq).clamp(min=0)
            val = x.gather(2, ir[..., None].expand(*ir.shape, D)) if x.shape[2] else None
            if nq:
                d = pt.dequant(idx.clamp(max=nq - 1))
                val = d if val is None else torch.where((idx < nq)[..., None], d, val)
            out[name] = val
        return out

    def keep(self, idx: torch.Tensor) -> dict | None:
        """Keep slots idx [B, H, m]; returns the evicted tokens (dequantized). If heads keep different numbers of
        quantized tokens, the oldest kept residual tokens of the others are quantized now so that every head holds
        the same number of quantized rows (one new channel block on the channel axis); keys and values each so."""
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
        for i, name in enumerate(("k", "v")):
            self._keep_lane(i, name, idx)
        return evicted

    def _keep_lane(self, i: int, name: str, idx: torch.Tensor) -> None:
        pt = self.kq if name == "k" else self.vq
        x, fp = getattr(self, name), getattr(self, "fp_" + name)
        D = x.shape[-1]
        nq = 0 if pt is None else pt.nq
        mqx = int((idx < nq).sum(-1).max()) if nq else 0
        qidx, ridx = idx[..., :mqx], idx[..., mqx:] - nq
        if mqx:
            old = qidx < nq
            pt.take(qidx.clamp(max=nq - 1))
            if fp is not None:
                ic = qidx.clamp(max=nq - 1).to(fp.device)
                fp = fp.gather(2, ic[..., None].expand(*ic.shape, D))
            if not bool(old.all()):
                xn = x.gather(2, (qidx - nq).clamp(min=0)[..., None].expand(*qidx.shape, D))
                new = ~old
                b = torch.where(old, pt.row_bits().long(), self._bits(slice(0, mqx))[i])
                pq = self.pos[:, :, :mqx]
                pt.assign(None, new, encode(xn, new, b, pt.spec, False, mqx, self._useq(pt, pq, mqx),
                                            pt.fixed_bits is not None))
                if self.qaq is not None:
                    qsig, sig = getattr(self.qaq, "qsig_" + name), getattr(self.qaq, "sig_" + name)
                    full = torch.cat([new, torch.zeros_like(qsig[:, :, mqx:], dtype=torch.bool)], 2)
                    setattr(self.qaq, "qsig_" + name, torch.where(full, sig, qsig))
                if fp is not None:
                    fp = torch.where(new.to(fp.device)[..., None], xn.to(fp.device), fp)
        elif pt is not None:
            pt.take(torch.zeros(*idx.shape[:2], 0, dtype=torch.long, device=idx.device))
            fp = None if fp is None else fp[:, :, :0]
        setattr(self, "fp_" + name, fp)
        setattr(self, name, x.gather(2, ridx[..., None].expand(*ridx.shape, D)))

    # bytes -------------------------------------------------------------------------------------------------------
    def nbytes(self) -> int:
        """Everything held on the compute device to read the cache: codes, widths and offsets, zero points and
        scales, outliers with their indices and addressing, and the full-precision residual window (token indices
        apart: aux_nbytes)."""
        q = 0 if self.kq is None else self.kq.nbytes() + self.vq.nbytes()
        return q + _nbytes(self.k, self.v)

    def offload_nbytes(self) -> int:
        """Bytes of QAQ's full-precision copy held off the fast path (`offload_device`), not part of nbytes()."""
        return _nbytes(self.fp_k, self.fp_v)

    def bit_accounting(self) -> dict:
        """Elements held and their bits as the QAQ paper counts them (16 / average bits = its compression ratio):
        codes at their width, outliers at 16 bits plus their index, full-precision tokens at 16 bits, 16-bit zero
        and scale per group; beside them the bytes offloaded and the addressing bytes within nbytes()."""
        if self.k is None and self.masked_accounting is not None:
            return dict(self.masked_accounting)
        out = {"elements": 0, "bits": 0, "key_code_bits": 0, "value_code_bits": 0, "quantized_elements": 0,
               "offload_bytes": self.offload_nbytes(), "addressing_bytes": 0}
        if self.kq is not None:
            ak, av = self.kq.accounting(), self.vq.accounting()
            out["elements"] += ak["elements"] + av["elements"]
            out["bits"] += ak["bits"] + av["bits"]
            out["key_code_bits"], out["value_code_bits"] = ak["code_bits"], av["code_bits"]
            out["quantized_elements"] = ak["elements"]
            out["addressing_bytes"] = self.kq.addressing_nbytes() + self.vq.addressing_nbytes()
        if self.k is not None:
            res = self.k.numel() + self.v.numel()
            out["elements"] += res
            out["bits"] += 16 * res
        return out

    def masked_nbytes(self, peak_tokens: int) -> int | None:
        """Masked mode: the bytes the stream store would hold at the window's peak of `peak_tokens` tokens per head.
        Without eviction, exactly the packed window plus its full-precision tail; under eviction, the window's bytes
        per quantized token times the quantized tokens held at the peak, plus the full-precision ones."""
        mb = self._masked_bytes
        if mb is None:
            return None
        exact, q_bytes, nq, fp_tok_bytes, T = mb
        if peak_tokens >= T or nq == 0:
            return exact
        fp = min(peak_tokens, T - nq)
        return round(q_bytes * (peak_tokens - fp) / nq) + round(fp * fp_tok_bytes)

    # masked mode -------------------------------------------------------------------------------------------------
    def masked_attention(self, q, k, v, allowed, scaling, evicted=None):
        """Parallel twin of stream decoding: query i reads key j quantized when j < nq_k(i) and value j when
        j < nq_v(i) (module docstring)."""
        B, Hq, T, D = q.shape
        H = k.shape[1]
        g = Hq // H
        R, blk = self.residual, self.block
        i = torch.arange(T, device=q.device)
        if self.residual_rule == "kivi":
            nq_k = (i // R) * R if R else (i // blk) * blk
            nq_v = (i - R).clamp(min=0)
        else:
            nq_k = nq_v = ((i - R).clamp(min=0) // blk) * blk
        Mk, Mv = (int(nq_k[-1]), int(nq_v[-1])) if T else (0, 0)
        M = max(Mk, Mv)
        fp_tok = 2 * B * H * D * k.element_size()
        self._masked_bytes = (T * fp_tok, 0, 0, fp_tok, T)
        if not self.quantizes or M == 0:
            self.masked_accounting = {"elements": 2 * k.numel(), "bits": 32 * k.numel()}
            return Store.masked_attention(self, q, k, v, allowed, scaling, evicted)
        qg = q.view(B, H, g, T, D)
        lf = torch.matmul(qg, k[:, :, None].transpose(-1, -2)) * scaling  # [B, H, g, T, T]
        if self.qaq is not None:
            pf = torch.softmax(lf.masked_fill(~allowed, float("-inf")).float(), dim=-1)
            bk, bv = self._masked_qaq_bits(q, k, v, pf, allowed, scaling, M)
        else:
            bk = torch.full((B, H, Mk), self.kspec.bits, dtype=torch.long, device=q.device)
            bv = torch.full((B, H, Mv), self.vspec.bits, dtype=torch.long, device=q.device)
        self.masked_bits = (bk, bv)
        if bool((bk >= EXACT_BITS).all()) and bool((bv >= EXACT_BITS).all()):  # every token exact
            self.masked_accounting = {"elements": 2 * k.numel(), "bits": 32 * k.numel()}
            return Store.masked_attention(self, q, k, v, allowed, scaling, evicted)
        hu = self.qaq is not None and self.qaq.heads_unit
        pk = self._new_packed(self.kspec, B, H, D, k.device, k.dtype)
        pv = self._new_packed(self.vspec, B, H, D, v.device, v.dtype)
        for pt, x, b, m in ((pk, k, bk, Mk), (pv, v, bv, Mv)):
            if m:
                pos = torch.arange(m, device=q.device).view(1, 1, m).expand(B, H, m)
                valid = torch.ones(B, H, m, dtype=torch.bool, device=q.device)
                pt.append(encode(x[:, :, :m], valid, b, pt.spec, hu, blk if pt.spec.axis == "channel" else 1,
                                 self._useq(pt, pos, blk), pt.fixed_bits is not None))
        kh = torch.cat([pk.dequant(), k[:, :, Mk:]], 2)
        vh = torch.cat([pv.dequant(), v[:, :, Mv:]], 2)
        lq = torch.matmul(qg, kh[:, :, None].transpose(-1, -2)) * scaling
        sel_k = i[None, :] < nq_k[:, None]  # [T (query), T (key)]: read the key quantized
        sel_v = i[None, :] < nq_v[:, None]
        logits = torch.where(sel_k, lq, lf).masked_fill(~allowed, float("-inf"))
        p = torch.softmax(logits.float(), dim=-1).to(q.dtype)
        zero = torch.zeros((), dtype=p.dtype, device=p.device)
        out = torch.matmul(torch.where(sel_v, p, zero), vh[:, :, None]) + torch.matmul(torch.where(sel_v, zero, p),
                                                                                       v[:, :, None])
        ak, av = pk.accounting(), pv.accounting()
        res = (2 * T - Mk - Mv) * B * H * D
        offload = 2 * Mk * B * H * D * k.element_size() if self.qaq is not None and self.qaq.cfg.requant else 0
        self.masked_accounting = {"elements": ak["elements"] + av["elements"] + res,
                                  "bits": ak["bits"] + av["bits"] + 16 * res,
                                  "key_code_bits": ak["code_bits"], "value_code_bits": av["code_bits"],
                                  "quantized_elements": ak["elements"], "offload_bytes": offload,
                                  "addressing_bytes": pk.addressing_nbytes() + pv.addressing_nbytes()}
        q_bytes = pk.nbytes() + pv.nbytes()
        self._masked_bytes = (q_bytes + (2 * T - Mk - Mv) * fp_tok // 2, q_bytes, (Mk + Mv) / 2, fp_tok, T)
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
        if c.bit_rule == "official":
            sig_k, sig_v = official_bounds(c, Tj, S, D)
        else:
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
        pos = j.view(1, 1, M).expand(B, H, M)
        rk = unit_range(k[:, :, :M], valid, self.kspec, self.qaq.heads_unit, pos)
        rv = unit_range(v[:, :, :M], valid, self.vspec, self.qaq.heads_unit, pos)
        self.masked_sigma = (sig_k, sig_v)
        return rule_bits(c, rk, sig_k), rule_bits(c, rv, sig_v)


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
