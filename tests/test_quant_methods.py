"""Quantized caches (uniform, KIVI, QAQ): exactness at 16 bits, QAQ's bit choice and error bound, outliers, byte and
bit accounting, masked/stream agreement, eviction composition, per-head rebalancing, re-quantization and the Triton
path of the store, each against an independent computation."""

import os

os.environ["TRITON_INTERPRET"] = "1"

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from kvx import kernels  # noqa: E402
from kvx.cache.quantized import (  # noqa: E402
    BitBoard,
    QAQConfig,
    QuantizedStore,
    QuantSpec,
    compression_stats,
)
from kvx.config import build_method  # noqa: E402
from kvx.engine import Engine  # noqa: E402
from kvx.errors import ConfigError  # noqa: E402
from kvx.kernels import reference  # noqa: E402
from kvx.methods.quantization import QuantPolicy  # noqa: E402

SQ3 = math.sqrt(3.0)


pytestmark = pytest.mark.usefixtures("ref_backend")  # tests/conftest.py


def engine_for(model_tok, cfg):
    model, tok = model_tok
    return Engine(model, tok, build_method(cfg))


def logits_of(engine, ids, mode):
    chunk = 1 if mode == "stream" else None  # token by token for every method alike
    _, st = engine.score_window(torch.tensor([ids]), mode=mode, chunk_size=chunk, return_logits=True)
    return st["logits"]


def run_stream(store, policy, q, k, v, scaling=0.5):
    """Token-by-token decoding through one store, the hooks in KVXLayer.attend's order."""
    B, Hq, T, D = q.shape
    H = k.shape[1]
    outs = []
    for i in range(T):
        qpos = torch.full((B, 1), i, dtype=torch.long)
        pos_new = qpos[:, None, :].expand(B, H, 1)
        policy.before_attend(store, 1)
        out, probs = store.attend(q[:, :, i : i + 1], k[:, :, i : i + 1], v[:, :, i : i + 1], pos_new, qpos, scaling,
                                  return_probs=policy.needs_probs)
        policy.observe(store, q[:, :, i : i + 1], probs)
        store.append(k[:, :, i : i + 1], v[:, :, i : i + 1], pos_new)
        policy.on_append(store, 1)
        policy.end_step(store)
        outs.append(out)
    return torch.cat(outs, 2)


def qkv(B=2, Hq=4, H=2, T=24, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    chan = torch.rand(D, generator=g) * 3 + 0.2  # channels of different magnitudes, as real keys have
    q = torch.randn(B, Hq, T, D, generator=g)
    k = torch.randn(B, H, T, D, generator=g) * chan
    v = torch.randn(B, H, T, D, generator=g)
    return q, k, v


# 1. exactness at 16 bits -------------------------------------------------------------------------------------------
SIXTEEN = [
    {"name": "uniform", "bits": 16},
    {"name": "uniform", "bits": 16, "key_axis": "channel", "value_axis": "channel", "group_size": 4, "residual": 3},
    {"name": "kivi", "bits": 16, "group_size": 8, "residual": 8},
    {"name": "qaq", "min_bits": 16, "max_bits": 16},
    # bits chosen once, when a token is quantized (with requant, a token whose weights fall to ~1e-8 gets fewer)
    {"name": "qaq", "min_bits": 2, "max_bits": 16, "key_error": 1e-12, "value_error": 1e-12, "granularity": "head",
     "requant": False},
]


@pytest.mark.parametrize("cfg", SIXTEEN, ids=lambda c: "-".join(f"{v}" for v in c.values()))
@pytest.mark.parametrize("mode", ["stream", "masked"])
def test_sixteen_bits_equal_full(stories, tiny_ids, cfg, mode):
    ids = tiny_ids[:41]
    want = logits_of(engine_for(stories, {"name": "full"}), ids, mode)
    got = logits_of(engine_for(stories, cfg), ids, mode)
    assert torch.equal(got, want)


def test_sixteen_bits_token_granularity_and_composition(stories, tiny_ids):
    ids = tiny_ids[:41]
    full = logits_of(engine_for(stories, {"name": "full"}), ids, "stream")
    qaq = {"name": "qaq", "min_bits": 16, "max_bits": 16, "granularity": "token"}
    assert torch.equal(logits_of(engine_for(stories, qaq), ids, "stream"), full)
    for evict in ({"name": "streaming_llm", "budget": 16, "sink": 2}, {"name": "h2o", "budget": 16}):
        alone = logits_of(engine_for(stories, evict), ids, "stream")
        for cfg in ({"name": "uniform", "bits": 16}, {"name": "qaq", "min_bits": 16, "max_bits": 16}):
            assert torch.equal(logits_of(engine_for(stories, {**cfg, "evict": evict}), ids, "stream"), alone)


# 2. QAQ's bits: a hand-computed example ----------------------------------------------------------------------------
def test_qaq_bits_hand_example():
    """T = 3 tokens, one KV head read by 2 query heads, n = 2, head granularity, no outliers.

    Attention (max over the two query heads): rows 1 and 2 (the last n = 2) give S = [0.9, 0.5, 0.8].
    Values: value_error = 0.1 sqrt(3) -> sigma_V = 0.1 sqrt(3) / (sqrt(3) S) = 0.1 / S = [0.1111, 0.2, 0.125];
      ranges [3, 2, 1.2] -> range / (2 sqrt(3) sigma) = [7.794, 2.887, 2.771] -> log2 [2.96, 1.53, 1.47] -> [3, 2, 2].
    Keys: key_error^2 = (e - 1) / 13.5 so that log(T^3/(T-1) key_error^2 + 1) = log(e) = 1; ||q||^2 (quantile 1:
      the largest squared norm) = 16 -> sigma_K = 1/4; ranges [4, 0.5, 8] -> [4.619, 0.577, 9.238] ->
      log2 [2.21, -0.79, 3.21] -> [3, 0, 4] (min_bits 0)."""
    cfg = QAQConfig(key_error=math.sqrt((math.e - 1) / 13.5), value_error=0.1 * SQ3, min_bits=0, max_bits=8,
                    attn_window=2, granularity="head", query_quantile=1.0, requant=False)
    spec = QuantSpec(8, "token", 0, 0.0)
    st = QuantizedStore(spec, spec, residual=0, qaq=cfg)
    k = torch.tensor([[0.0, 4.0, 1.0, 2.0], [1.0, 1.5, 1.2, 1.1], [-4.0, 4.0, 0.0, 1.0]])[None, None]
    v = torch.tensor([[0.0, 1.0, 2.0, 3.0], [0.0, 2.0, 1.0, 0.5], [0.3, 1.5, 0.9, 1.0]])[None, None]
    q = torch.zeros(1, 2, 3, 4)
    q[0, 0, 0, 0], q[0, 0, 1, 1], q[0, 0, 2, 2] = 2.0, 1.0, 1.0  # squared norms 4, 1, 1
    q[0, 1, :, 3] = torch.tensor([1.0, 4.0, 2.0])  # 1, 16, 4
    probs = torch.tensor([[[1, 0, 0], [0.5, 0.5, 0], [0.2, 0.3, 0.5]],
                          [[1, 0, 0], [0.9, 0.1, 0], [0.1, 0.1, 0.8]]])[None]
    pos = torch.arange(3, dtype=torch.int32).view(1, 1, 3)
    st.qaq.observe(q, probs, 1.0, pos[:, 0].long(), n_kv=1)
    st.append(k, v, pos)
    st.plan()
    assert st.qaq.req_v[0, 0].tolist() == [3, 2, 2]
    assert st.qaq.req_k[0, 0].tolist() == [3, 0, 4]
    assert torch.allclose(st.qaq.sig_v[0, 0].float(), torch.tensor([0.1 / 0.9, 0.2, 0.125]))
    st.flush()  # residual 0: all three quantized with those bits
    assert st.kq.bits[0, 0].tolist() == [3, 0, 4] and st.vq.bits[0, 0].tolist() == [3, 2, 2]
    # a 0-bit token is its range's midpoint
    assert torch.allclose(st.kq.dequant()[0, 0, 1], torch.full((4,), 1.25), atol=1e-3)


def test_qaq_layer_and_token_granularity_share_bits():
    """layer: one width for all KV heads of a token (max importance over heads, range over heads);
    token: one width for all layers too (the board's maximum)."""
    cfg = QAQConfig(key_error=0.05, value_error=0.05, min_bits=1, max_bits=8, attn_window=3, granularity="token",
                    query_quantile=0.9, requant=False)
    spec = QuantSpec(8, "token", 0, 0.0)
    board = BitBoard(2)
    stores = [QuantizedStore(spec, spec, 1, cfg, board, layer_idx=i) for i in range(2)]
    pols = [QuantPolicy() for _ in stores]
    qpos = torch.arange(10).view(1, 10)
    pn = qpos[:, None, :].expand(1, 2, 10)
    for i, (st, pol) in enumerate(zip(stores, pols)):  # one forward of 10 tokens through both layers
        q, k, v = qkv(B=1, Hq=4, H=2, T=10, D=8, seed=i)
        k = k * (1 + 3 * i)  # layer 1 has wider keys: it asks for more key bits
        pol.before_attend(st, 10)
        _, probs = st.attend(q, k, v, pn, qpos, 0.5, True)
        pol.observe(st, q, probs)
        st.append(k, v, pn)
    for st, pol in zip(stores, pols):
        pol.end_step(st)
    for st, pol in zip(stores, pols):
        pol.before_attend(st, 1)  # the next forward quantizes all but the residual token
    for which in ("k", "v"):
        b0, b1 = (getattr(st, which + "q").bits.long() for st in stores)
        assert b0.shape[2] == 9
        assert torch.equal(b0, b1) and torch.equal(b0, b0[:, :1].expand_as(b0))
        reqs = [getattr(st.qaq, "req_" + which) for st in stores]
        want = torch.maximum(*reqs)[:, :, :9].amax(1, keepdim=True)
        assert torch.equal(b0, want.expand_as(b0))
    assert not torch.equal(stores[0].qaq.req_k, stores[1].qaq.req_k)


def test_qaq_token_granularity_has_no_mask_form(stories):
    m = build_method({"name": "qaq", "granularity": "token"})
    assert not m.has_mask_form
    e = Engine(*stories, m)
    with pytest.raises(ConfigError, match="task.mode"):
        e.new_cache(1, 8, mode="masked")


# 3. the per-token error stays within the promised bound ---------------------------------------------------------------
def test_qaq_error_within_promised_bound(stories, tiny_ids):
    cfg = {"name": "qaq", "key_error": 0.5, "value_error": 0.5, "min_bits": 1, "max_bits": 8, "outliers": 0.02}
    e = engine_for(stories, cfg)
    cache = e.new_cache(1, 64)
    e.prefill(cache, torch.tensor([tiny_ids[:64]]), chunk_size=1)
    checked = 0
    for layer in cache.layers:
        st = layer.store
        st.flush()
        for pt, fp, sig in ((st.kq, st.fp_k, st.qaq.qsig_k), (st.vq, st.fp_v, st.qaq.qsig_v)):
            x, xh = fp.float(), pt.dequant().float()
            bits = pt.bits.long()
            err = (x - xh).abs()
            outl = torch.zeros_like(err, dtype=torch.bool)
            rows = pt.rows()
            for r in torch.nonzero(rows.ocnt.reshape(-1) > 0).flatten().tolist():
                s, c = int(rows.ostart[r]), int(rows.ocnt[r])
                b, h, t = r // (pt.nq * x.shape[1]), (r // pt.nq) % x.shape[1], r % pt.nq
                cols = rows.ocol[s : s + c].long()
                assert torch.equal(xh[b, h, t, cols], x[b, h, t, cols])  # outliers are exact
                outl[b, h, t, cols] = True
            sig = sig[:, :, : pt.nq]
            ok_rows = (bits < 8) & torch.isfinite(sig)  # not clamped at max_bits: the formula's promise holds
            slack = x.abs().amax(-1) * 2.0**-10 / 2.0 ** (bits.float() + 1)  # float16 metadata rounding
            bound = (SQ3 * sig.float() * 1.001 + slack)[..., None]
            assert ((err <= bound) | outl | ~ok_rows[..., None]).all()
            checked += int(ok_rows.sum())
    assert checked > 100


# 4. outliers are restored exactly ------------------------------------------------------------------------------------
def test_outliers_restored_exactly_and_excluded_from_range():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 2, 12, 8, generator=g)
    x[0, 0, 3, 5] = 40.0  # a large outlier
    spec = QuantSpec(3, "token", 4, 0.25)  # groups of 4 channels: 0.25 * 4 = exactly one outlier per group
    st = QuantizedStore(spec, spec, residual=0)
    st.append(x, x.clone(), torch.arange(12, dtype=torch.int32).expand(1, 2, 12))
    st.flush()
    xh = st.kq.dequant()
    grp = x.view(1, 2, 12, 2, 4)
    srt = grp.sort(-1).values
    # the one kept exact: the smallest when dropping it leaves a strictly smaller range, else the largest
    drop_min = (srt[..., 3] - srt[..., 1]) < (srt[..., 2] - srt[..., 0])
    idx = torch.where(drop_min, grp.argmin(-1), grp.argmax(-1))
    got = xh.view(1, 2, 12, 2, 4).gather(-1, idx[..., None])
    assert torch.equal(got, grp.gather(-1, idx[..., None]))
    assert int(st.kq.ocnt.long().sum()) == 2 * 12 * 2  # one per group, no more
    # the rest lies within half a cell of the range left
    lo = torch.where(drop_min, srt[..., 1], srt[..., 0])
    hi = torch.where(drop_min, srt[..., 3], srt[..., 2])
    slack = grp.abs().amax(-1) * 2.0**-10  # the zero point is rounded down to float16
    cell = (hi - lo + slack) / 8 * (1 + 2.0**-10)
    err = (xh - x).abs().view(1, 2, 12, 2, 4)
    assert (err <= cell[..., None] / 2 + 1e-6).all()
    assert xh[0, 0, 3, 5] == 40.0


@pytest.mark.parametrize("spec,heads_unit", [(QuantSpec(2, "token", 0, 0.01), False),
                                             (QuantSpec(2, "token", 4, 0.03), False),
                                             (QuantSpec(2, "channel", 4, 0.01), False),
                                             (QuantSpec(8, "token", 0, 0.01), True)])
def test_outlier_fraction_holds_for_the_whole_cache(spec, heads_unit):
    """1% of the elements held, not 1% rounded up per unit (ceil(0.005 * 8) = 1 at each end would keep 25%):
    over N elements, floor(a N) within one unit's share; flushed a few tokens at a time as in decoding."""
    B, H, T, D = 1, 2, 400, 8
    q, k, v = qkv(B=B, Hq=2, H=H, T=T, D=D, seed=3)
    qaq = QAQConfig(min_bits=4, max_bits=4, granularity="layer" if heads_unit else "head", requant=False)
    st = QuantizedStore(spec, spec, residual=0, qaq=qaq if heads_unit else None)
    pos = torch.arange(T, dtype=torch.int32).expand(B, H, T)
    for a in range(0, T, 40):  # 10 flushes of 40 tokens
        st.append(k[:, :, a : a + 40], v[:, :, a : a + 40], pos[:, :, a : a + 40])
        if heads_unit:
            st.plan()
        st.flush()
    assert st.nq == T
    n_el = B * H * T * D
    unit = D * H if heads_unit else (spec.group if spec.axis == "channel" else spec.channels_per_group(D))
    for pt in (st.kq, st.vq):
        held = int(pt.ocnt.long().sum())
        assert abs(held - spec.outliers * n_el) <= max(1, spec.outliers * unit) * (H if not heads_unit else 1)
    # outliers are exact: compare the dequantized cache with the input at the outlier columns
    rows = st.vq.rows()
    r = torch.nonzero(rows.ocnt.reshape(-1) > 0).flatten()
    first = rows.ostart[r].long()
    cols = rows.ocol[first].long()
    assert torch.equal(st.vq.dequant().reshape(-1, D)[r, cols], v.reshape(-1, D)[r, cols])


# 5. measured bytes match the bit accounting --------------------------------------------------------------------------
def test_measured_bytes_match_accounting():
    """Fixed width (uniform): 3 bytes of codes per row, no per-row width or offset; outliers with their value
    (fp32 here) and uint8 column, and a per-row count (uint8) from which their starts are derived."""
    B, H, D = 2, 3, 8
    spec = QuantSpec(3, "token", 4, 0.25)  # 2 groups per row, 0.25 * 4 = 1 outlier per group -> 2 per row
    st = QuantizedStore(spec, spec, residual=2)
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(B, H, 10, D, generator=g), torch.randn(B, H, 10, D, generator=g)
    st.append(k, v, torch.arange(10, dtype=torch.int32).expand(B, H, 10))
    st.flush()
    rows = B * H * 8  # 8 quantized tokens, 2 in the residual
    per_row = 3 + 1 + 2 * 2 * 2 + 2 * (4 + 1)  # codes, outlier count, zero+delta, outliers + columns
    residual = 2 * B * H * 2 * D * 4
    assert st.nbytes() == 2 * rows * per_row + residual
    assert st.aux_nbytes() == 2 * B * H * 10 * 4  # pos, rpos
    acct = st.bit_accounting()
    bits_row = (D - 2) * 3 + (16 + 8) * 2 + 32 * 2  # codes, outliers at 16 bits + index, 16-bit zero and scale
    assert acct["elements"] == 2 * (rows + B * H * 2) * D
    assert acct["bits"] == 2 * rows * bits_row + 16 * 2 * B * H * 2 * D
    assert acct["addressing_bytes"] == 2 * rows * 1


def test_measured_bytes_channel_groups():
    """KIVI's layout: keys per channel over blocks of 4 tokens, values per token; fixed width, no addressing."""
    st = QuantizedStore(QuantSpec(2, "channel", 4), QuantSpec(2, "token", 4), residual=0)
    g = torch.Generator().manual_seed(1)
    k, v = torch.randn(1, 2, 8, 8, generator=g), torch.randn(1, 2, 8, 8, generator=g)
    st.append(k, v, torch.arange(8, dtype=torch.int32).expand(1, 2, 8))
    st.flush()
    keys = 2 * 2 * 8 * 2 * 2 + 16 * 2  # 2 blocks x 2 heads x 8 channels x (zero, delta) fp16; codes
    vals = 16 * 2 * 2 * 2 + 16 * 2  # 16 rows x 2 groups x (zero, delta); codes
    assert st.nbytes() == keys + vals
    acct = st.bit_accounting()
    assert acct["bits"] == 16 * 8 * 2 + 2 * 2 * 8 * 32 + 16 * 8 * 2 + 16 * 2 * 32
    assert acct["addressing_bytes"] == 0


def test_measured_bytes_qaq_layer_metadata():
    """QAQ at layer granularity: a per-row width (uint8), the offsets derived from it; one zero and scale per token
    for all KV heads (the authors' layer-level metadata), not one per head."""
    B, H, T, D = 1, 4, 12, 8
    q, k, v = qkv(B=B, Hq=4, H=H, T=T, D=D, seed=5)
    cfg = QAQConfig(key_error=0.3, value_error=0.3, min_bits=1, max_bits=8, granularity="layer", requant=False)
    st = QuantizedStore(QuantSpec(8, "token", 0, 0.0), QuantSpec(8, "token", 0, 0.0), residual=0, qaq=cfg)
    run_stream(st, QuantPolicy(), q, k, v)
    st.flush()
    assert st.kq.zero.shape == (B, 1, st.nq, 1)
    for pt, x in ((st.kq, k), (st.vq, v)):
        codes = int(((pt.bits.long() * D + 7) // 8).sum())
        assert pt.nbytes() == codes + B * H * st.nq * 1 + B * st.nq * 2 * 2
        # the token's cells span all its heads: every element within half a cell of that range
        xs = x[:, :, : st.nq]
        rng = xs.amax((1, 3)) - xs.amin((1, 3))  # [B, nq]
        cell = rng[:, None] / 2.0 ** pt.bits.float()
        assert ((pt.dequant() - xs).abs() <= cell[..., None] / 2 * 1.002 + 1e-4).all()


def test_compression_ratio_from_the_cache(stories, tiny_ids):
    """uniform 4-bit, one group per 8-channel row, no residual: after T tokens each layer holds T - 1 quantized rows
    (4 * 8 + 32 bits) and the last token in full precision (16 * 8 bits): ratio = 128 T / (64 (T - 1) + 128)."""
    T = 32
    e = engine_for(stories, {"name": "uniform", "bits": 4})
    cache = e.new_cache(1, T)
    e.prefill(cache, torch.tensor([tiny_ids[:T]]), chunk_size=1)
    stats = compression_stats(cache)
    assert stats["ratio"] == pytest.approx(128 * T / (64 * (T - 1) + 128))
    assert stats["avg_key_bits"] == 4 and stats["avg_value_bits"] == 4
    masked = e.new_cache(1, T, mode="masked")  # masked mode accounts for what the stream store would hold
    e.forward(masked, torch.tensor([tiny_ids[:T]]))
    assert compression_stats(masked)["ratio"] == pytest.approx(stats["ratio"])


# 6. masked and stream agree ----------------------------------------------------------------------------------------
STORE_CASES = [
    (QuantSpec(3, "token", 8), QuantSpec(3, "token", 4), 3, None),
    (QuantSpec(2, "channel", 4, 0.2), QuantSpec(4, "token", 8, 0.2), 2, None),
    (QuantSpec(4, "channel", 4), QuantSpec(4, "channel", 4), 0, None),
    (QuantSpec(8, "token", 0, 0.1), QuantSpec(8, "token", 0, 0.1), 4,
     QAQConfig(min_bits=3, max_bits=3, granularity="layer", requant=False)),
]


@pytest.mark.parametrize("kspec,vspec,residual,qaq", STORE_CASES)
def test_masked_equals_stream_store(kspec, vspec, residual, qaq):
    q, k, v = qkv(T=26)
    st = QuantizedStore(kspec, vspec, residual, qaq)
    out_s = run_stream(st, QuantPolicy(), q, k, v)
    pos = torch.arange(26).expand(2, 2, 26)
    allowed = reference.allowed_mask(pos, torch.arange(26).expand(2, 26))
    out_m = QuantizedStore(kspec, vspec, residual, qaq).masked_attention(q, k, v, allowed, 0.5)
    assert torch.allclose(out_s, out_m, atol=1e-5)
    assert st.nq > 0


def test_qaq_fixed_bits_equals_uniform():
    """QAQ with min_bits = max_bits = b is uniform per-token b-bit quantization (no outliers, same residual)."""
    q, k, v = qkv(T=20, seed=3)
    qaq = QAQConfig(min_bits=3, max_bits=3, granularity="head", requant=False)
    a = run_stream(QuantizedStore(QuantSpec(8), QuantSpec(8), 2, qaq), QuantPolicy(), q, k, v)
    b = run_stream(QuantizedStore(QuantSpec(3), QuantSpec(3), 2), QuantPolicy(), q, k, v)
    assert torch.equal(a, b)


def test_qaq_variable_bits_masked_close_to_stream():
    """Variable bits: masked chooses from full-precision attention, stream from what it computed; without requant
    they pick the same widths for most tokens."""
    q, k, v = qkv(T=30, seed=4)
    qaq = QAQConfig(key_error=0.3, value_error=0.3, min_bits=1, max_bits=8, granularity="layer", requant=False)
    st = QuantizedStore(QuantSpec(8), QuantSpec(8), 4, qaq)
    run_stream(st, QuantPolicy(), q, k, v)
    st.flush()
    pos = torch.arange(30).expand(2, 2, 30)
    ms = QuantizedStore(QuantSpec(8), QuantSpec(8), 4, qaq)
    ms.masked_attention(q, k, v, reference.allowed_mask(pos, torch.arange(30).expand(2, 30)), 0.5)
    mk, mv = ms.masked_bits
    M = mk.shape[2]  # tokens read quantized within the window: the stream store quantized them too
    assert M == st.nq - 1
    same_k = (st.kq.bits.long()[:, :, :M] == mk).float().mean()
    same_v = (st.vq.bits.long()[:, :, :M] == mv).float().mean()
    assert same_k > 0.8 and same_v > 0.8


@pytest.mark.parametrize("cfg", [
    {"name": "kivi", "bits": 2, "group_size": 8, "residual": 8},
    {"name": "kivi", "bits": 4, "group_size": 8, "residual": 8, "evict": {"name": "streaming_llm", "budget": 32,
                                                                          "sink": 4}},
    {"name": "uniform", "bits": 3, "residual": 4, "evict": {"name": "streaming_llm", "budget": 24, "sink": 2}},
])
def test_masked_close_to_stream_model(stories, tiny_ids, cfg):
    """On the model, masked and stream see K/V from different float paths (parallel vs token-by-token forwards),
    so a code can flip at a cell boundary; the scores still agree closely."""
    ids = tiny_ids[:65]
    e = engine_for(stories, cfg)
    ns, _ = e.score_window(torch.tensor([ids]), mode="stream")
    nm, _ = e.score_window(torch.tensor([ids]), mode="masked")
    assert abs(float(ns.mean() - nm.mean())) < 2e-3
    full, _ = engine_for(stories, {"name": "full"}).score_window(torch.tensor([ids]), mode="stream")
    assert float((ns - full).abs().max()) > 1e-3  # it does quantize


# 7. composition with eviction --------------------------------------------------------------------------------------
def test_composition_with_eviction_holds_budget_and_quantizes(stories, tiny_ids):
    for evict in ({"name": "streaming_llm", "budget": 24, "sink": 4}, {"name": "h2o", "budget": 24}):
        e = engine_for(stories, {"name": "kivi", "bits": 2, "group_size": 4, "residual": 4, "evict": evict})
        cache = e.new_cache(1, 64)
        e.prefill(cache, torch.tensor([tiny_ids[:64]]), chunk_size=1)
        for layer in cache.layers:
            st = layer.store
            assert st.n <= 24 and st.nq >= 12
            assert int(st.pos.max()) == 63
        dense = engine_for(stories, evict)
        c2 = dense.new_cache(1, 64)
        dense.prefill(c2, torch.tensor([tiny_ids[:64]]), chunk_size=1)
        if evict["name"] == "streaming_llm":  # positions only: the same tokens are kept
            assert torch.equal(cache.layers[0].store.pos, c2.layers[0].store.pos)
        # streaming_llm keeps whole channel blocks; H2O keeps scattered tokens whose key blocks stay alive
        assert cache.nbytes() < (0.6 if evict["name"] == "streaming_llm" else 0.75) * c2.nbytes()


def test_keep_rebalances_per_head():
    """Per-head eviction that keeps different numbers of quantized tokens per head: kept quantized rows are
    unchanged, the oldest kept residual tokens of the other heads are quantized now (within half a cell)."""
    q, k, v = qkv(B=1, Hq=4, H=2, T=20, seed=5)
    for kspec in (QuantSpec(3, "token", 8), QuantSpec(3, "channel", 4)):
        st = QuantizedStore(kspec, QuantSpec(3, "token", 4), residual=4)
        pol = QuantPolicy()
        run_stream(st, pol, q, k, v)
        st.flush()
        nq, n = st.nq, st.n
        before_k = st.keys().clone()
        # head 0 keeps 10 quantized tokens and 2 residual ones (17, 19); head 1 keeps 12 quantized ones
        idx = torch.stack([torch.tensor([0, 1, 2, 5, 6, 7, 8, 9, 10, 11, 17, 19]),
                           torch.tensor([0, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12])])[None]
        assert nq == 16 and n == 20
        ev = st.keep(idx)
        assert torch.equal(ev["pos"][0, 0], torch.tensor([3, 4, 12, 13, 14, 15, 16, 18], dtype=torch.int32))
        assert torch.equal(ev["k"][0, 1, 0], before_k[0, 1, 1])
        assert st.nq == 12 and st.n == 12 and torch.equal(st.pos[0].long(), idx[0])
        after = st.keys()
        for h in range(2):
            for j, s in enumerate(idx[0, h].tolist()):
                if s < nq:
                    assert torch.equal(after[0, h, j], before_k[0, h, s])
        moved = after[0, 0, 10:12] - k[0, 0, [17, 19]]  # quantized now: within half a cell of their group's range
        if kspec.axis == "token":
            rng = (k[0, 0, [17, 19]].amax(-1) - k[0, 0, [17, 19]].amin(-1))[:, None]
        else:  # one new channel block holds the two moved rows
            rng = k[0, 0, [17, 19]].amax(0) - k[0, 0, [17, 19]].amin(0)
        assert (moved.abs() <= rng / 2**3 / 2 * 1.002 + 1e-5).all()
        assert not torch.equal(after[0, 0, 10:12], k[0, 0, [17, 19]])


# 8. re-quantization when importance rises ----------------------------------------------------------------------------
def requant_store(seed, probs):
    """A QAQ store (head granularity, n = 1, residual 0, requant) holding 4 tokens that drew `probs` [4, 4]."""
    cfg = QAQConfig(key_error=10.0, value_error=0.05, min_bits=1, max_bits=8, attn_window=1, granularity="head",
                    query_quantile=1.0, requant=True)
    spec = QuantSpec(8, "token", 0, 0.0)
    st = QuantizedStore(spec, spec, residual=0, qaq=cfg)
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(1, 1, 4, 8, generator=g)
    k = torch.randn(1, 1, 4, 8, generator=g)
    q = torch.ones(1, 1, 4, 8)
    pos = torch.arange(4, dtype=torch.int32).view(1, 1, 4)
    st.qaq.observe(q, torch.tensor(probs)[None, None], 1.0, pos[:, 0].long(), 1)
    st.append(k, v, pos)
    st.plan()
    st.flush()
    return st, q, k, v, pos


def test_requant_when_importance_rises():
    low = [[1.0, 0, 0, 0], [0.99, 0.01, 0, 0], [0.98, 0.01, 0.01, 0], [0.97, 0.01, 0.01, 0.01]]
    st, q, k, v, pos = requant_store(0, low)
    b0 = st.vq.bits[0, 0, 1].item()
    err0 = (st.vq.dequant()[0, 0, 1] - v[0, 0, 1]).abs().max()
    # token 1 now receives most of the attention: its value needs more bits, re-quantized from the CPU copy
    hi = torch.tensor([[0.05, 0.9, 0.025, 0.025]])[None, None]
    st.qaq.observe(q[:, :, :1], torch.cat([hi, torch.zeros(1, 1, 1, 1)], -1), 1.0, torch.tensor([[4]]), 1)
    st.append(k[:, :, :1], v[:, :, :1], torch.full((1, 1, 1), 4, dtype=torch.int32))
    st.plan()
    st.flush()
    b1 = st.vq.bits[0, 0, 1].item()
    err1 = (st.vq.dequant()[0, 0, 1] - v[0, 0, 1]).abs().max()
    assert b1 > b0 and err1 < err0
    assert st.fp_v.device.type == "cpu" and torch.equal(st.fp_v[0, 0, :4], v[0, 0])
    assert st.offload_nbytes() == 2 * 5 * 8 * 4  # counted apart from the payload
    assert st.nbytes() == st.kq.nbytes() + st.vq.nbytes()  # (the residual is empty)


def test_requant_when_importance_falls():
    """QAQ section 4.2 in the other direction: a token that drew most of the attention and then draws almost none
    is re-quantized, from the full-precision copy, at the fewer bits the value bound now asks for."""
    high = [[1.0, 0, 0, 0], [0.1, 0.9, 0, 0], [0.05, 0.9, 0.05, 0], [0.05, 0.9, 0.025, 0.025]]
    st, q, k, v, pos = requant_store(1, high)
    spec = st.vspec
    b_high = int(st.vq.bits[0, 0, 1])
    for step in range(2):  # the next queries look at token 0: token 1's weight falls to 0.001
        n = st.n
        p = torch.full((1, 1, 1, n + 1), 0.001)
        p[..., 0] = 1.0 - 0.001 * n
        st.qaq.observe(q[:, :, :1], p, 1.0, torch.tensor([[4 + step]]), 1)
        st.append(k[:, :, :1], v[:, :, :1], torch.full((1, 1, 1), 4 + step, dtype=torch.int32))
        st.plan()
        st.flush()
    b_low = int(st.vq.bits[0, 0, 1])
    T, S = 6, 0.001
    rng = float(v[0, 0, 1].max() - v[0, 0, 1].min())
    want = min(8, max(1, math.ceil(math.log2(rng / (2 * SQ3 * 0.05 / (math.sqrt(T) * S))))))
    assert b_low == want < b_high
    # the codes are those of the full-precision row at the new width (not a re-rounding of the old codes)
    ref = QuantizedStore(spec, spec, residual=0, qaq=QAQConfig(min_bits=want, max_bits=want, granularity="head",
                                                                requant=False))
    ref.append(k[:, :, 1:2], v[:, :, 1:2], pos[:, :, 1:2])
    ref.plan()
    ref.flush()
    assert torch.equal(st.vq.dequant()[0, 0, 1], ref.vq.dequant()[0, 0, 0])
    # no dead bytes: the codes held are exactly the live rows' codes
    assert st.vq.buf.numel() == int(((st.vq.bits.long() * 8 + 7) // 8).sum())


# 9. the Triton path of the store (interpreted) against the reference path -------------------------------------------
@pytest.mark.parametrize("cfg", [
    {"name": "uniform", "bits": 4, "residual": 2, "outliers": 0.25},
    {"name": "qaq", "key_error": 0.3, "value_error": 0.3, "min_bits": 1, "max_bits": 8, "residual": 2},
    {"name": "kivi", "bits": 2, "group_size": 2, "residual": 2},  # keys and values quantized to different slots
])
def test_store_triton_path_matches_reference(random_gqa, cfg):
    e = engine_for(random_gqa, cfg)
    ids = torch.randint(3, 500, (1, 9), generator=torch.Generator().manual_seed(0))
    a, _ = e.score_window(ids, mode="stream", return_logits=True)
    kernels.set_backend("triton")
    b, _ = e.score_window(ids, mode="stream", return_logits=True)
    assert torch.allclose(a, b, atol=1e-4)


# 10. configuration errors ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg,field", [
    ({"name": "uniform", "bits": 0}, "method.bits"),
    ({"name": "uniform", "bits": 4, "key_axis": "channel"}, "method.group_size"),
    ({"name": "uniform", "bits": 4, "value_axis": "row"}, "method.value_axis"),
    ({"name": "uniform", "bits": 4, "outliers": 1.5}, "method.outliers"),
    ({"name": "kivi", "residual": -1}, "method.residual"),
    ({"name": "qaq", "min_bits": 6, "max_bits": 4}, "method.max_bits"),
    ({"name": "qaq", "granularity": "block"}, "method.granularity"),
    ({"name": "qaq", "value_error": 0}, "method.value_error"),
    ({"name": "qaq", "query_quantile": 0}, "method.query_quantile"),
    ({"name": "kivi", "evict": {"name": "qaq"}}, "method.evict.name"),
    ({"name": "kivi", "evict": {"name": "h2oo", "budget": 8}}, "method.evict.name"),
    ({"name": "kivi", "evict": {"name": "streaming_llm", "budget": -3}}, "method.evict.budget"),
    ({"name": "kivi", "evict": {"budget": 3}}, "method.evict"),
])
def test_config_errors_name_the_field(cfg, field):
    with pytest.raises(ConfigError) as ei:
        build_method(cfg)
    assert ei.value.field == field


def test_arch_errors(stories):
    with pytest.raises(ConfigError, match="method.group_size"):
        engine_for(stories, {"name": "uniform", "bits": 4, "group_size": 3})


# 11. the official bit rule, the residual window against the budget, compression of every method -------------------
def test_official_bit_rule_against_the_formula():
    """bit_rule official (the authors' code): e_V = sqrt(value_error) / T / |S|, e_K = sqrt(key_error / D) / T /
    (max_q_value * J) with J_t = max_j |d_tj S_t - S_t S_j|; B = ceil(log2(range / (2 e) + 1))."""
    cfg = QAQConfig(key_error=0.5, value_error=0.04, min_bits=0, max_bits=8, attn_window=2, granularity="head",
                    requant=False, bit_rule="official", max_q_value=3.0)
    spec = QuantSpec(8, "token", 0, 0.0)
    st = QuantizedStore(spec, spec, residual=0, qaq=cfg)
    k = torch.tensor([[0.0, 4.0, 1.0, 2.0], [1.0, 1.5, 1.2, 1.1], [-4.0, 4.0, 0.0, 1.0]])[None, None]
    v = torch.tensor([[0.0, 1.0, 2.0, 3.0], [0.0, 2.0, 1.0, 0.5], [0.3, 1.5, 0.9, 1.0]])[None, None]
    q = torch.ones(1, 1, 3, 4)
    probs = torch.tensor([[1, 0, 0], [0.5, 0.5, 0], [0.2, 0.3, 0.5]])[None, None]
    pos = torch.arange(3, dtype=torch.int32).view(1, 1, 3)
    st.qaq.observe(q, probs, 1.0, pos[:, 0].long(), n_kv=1)
    st.append(k, v, pos)
    st.plan()
    S = [0.5, 0.5, 0.5]  # max of the last 2 rows: [max(.5, .2), max(.5, .3), max(0, .5)]
    T, D = 3, 4
    for which, x, err in (("v", v, lambda t: math.sqrt(0.04) / T / S[t]),
                          ("k", k, lambda t: math.sqrt(0.5 / D) / T / (3.0 * max(S[t] - S[t] ** 2,
                                                                               S[t] * max(S[:t] + S[t + 1:]))))):
        rng = (x[0, 0].amax(-1) - x[0, 0].amin(-1)).tolist()
        want = [min(8, max(0, math.ceil(math.log2(rng[t] / (2 * err(t)) + 1)))) for t in range(3)]
        assert getattr(st.qaq, "req_" + which)[0, 0].tolist() == want
    paper = QAQConfig(key_error=0.5, value_error=0.04, min_bits=0, max_bits=8, attn_window=2, granularity="head",
                      requant=False)
    assert paper.bit_rule == "paper" and QAQConfig().query_quantile == 0.9  # the paper's quantile by default


def test_residual_window_against_the_eviction_budget():
    """kivi over {h2o, budget: 64} with the default residual 128 would never quantize a token: refused."""
    with pytest.raises(ConfigError) as ei:
        build_method({"name": "kivi", "evict": {"name": "h2o", "budget": 64}})
    assert ei.value.field == "method.residual"
    with pytest.raises(ConfigError):  # residual + one block of 32 beyond 64
        build_method({"name": "kivi", "residual": 40, "evict": {"name": "h2o", "budget": 64}})
    build_method({"name": "kivi", "residual": 32, "evict": {"name": "h2o", "budget": 64}})


def test_compression_bytes_for_every_method(stories, assets):
    """compression_bytes = full-cache bytes for the same tokens / bytes held at the peak, for eviction and
    quantization alike; compression_bits is QAQ's accounting (1.0 for a method that holds full precision)."""
    from kvx.tasks.base import RunContext
    from kvx.tasks.perplexity import Perplexity

    task = Perplexity(max_tokens=129, window=128, mode="stream",
                      data_files=str(assets / "tinystories" / "validation_head.jsonl"))
    task.validate()
    out = {}
    for cfg in ({"name": "full"}, {"name": "streaming_llm", "budget": 16, "sink": 4}, {"name": "uniform", "bits": 4},
                {"name": "qaq", "key_error": 0.5, "value_error": 0.5}):
        e = engine_for(stories, cfg)
        out[cfg["name"]] = task.run(e, RunContext()).metrics
    a = e.arch
    full_bytes = 128 * a.n_layers * a.n_kv_heads * 2 * a.head_dim * a.dtype_bytes
    for m in out.values():
        assert m["full_cache_bytes"] == full_bytes
        assert m["compression_bytes"] == pytest.approx(full_bytes / m["cache_bytes_peak"])
        assert m["cache_total_bytes"] == m["cache_bytes_peak"] + m["cache_offload_bytes"]
    assert out["full"]["compression_bytes"] == 1.0 and out["full"]["compression_bits"] == 1.0
    assert out["streaming_llm"]["compression_bytes"] == pytest.approx(128 / 16)  # 16 of 128 tokens, peak 16
    assert out["streaming_llm"]["compression_bits"] == 1.0
    assert out["uniform"]["cache_offload_bytes"] == 0 and out["qaq"]["cache_offload_bytes"] > 0
    # bits count full precision at 16 bits, bytes at the model's dtype (fp32 here): bytes give less than bits
    # scaled to the dtype (the bytes also count the residual token's fp32, the outlier-free zero/scale at fp16)
    u = out["uniform"]
    assert 1.0 < u["compression_bytes"] <= u["compression_bits"] * a.dtype_bytes / 2


@pytest.mark.parametrize("cfg", [{"name": "uniform", "bits": 4, "residual": 3},
                                 {"name": "kivi", "bits": 2, "group_size": 4, "residual": 4},
                                 {"name": "uniform", "bits": 2, "outliers": 0.05}])
def test_masked_mode_reports_the_quantized_bytes(stories, tiny_ids, cfg):
    """Masked mode reports the bytes the stream store holds at the end of the window, not full-cache bytes."""
    ids = torch.tensor([tiny_ids[:49]])
    e = engine_for(stories, cfg)
    _, sm = e.score_window(ids, mode="masked")
    _, ss = e.score_window(ids, mode="stream")
    assert sm["cache_bytes_peak"] == ss["cache_bytes_peak"]
    full = engine_for(stories, {"name": "full"}).score_window(ids, mode="masked")[1]["cache_bytes_peak"]
    assert sm["cache_bytes_peak"] < 0.7 * full


# 12. KIVI as published ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rule,R,G", [("kivi", 8, 4), ("kivi", 0, 4), ("grouped", 8, 4)])
def test_kivi_residual_rule(rule, R, G):
    """Full-precision tokens read by query i (before it is appended): official KIVI holds i mod R keys (all R
    quantized at once on reaching R) and min(i, R) values; grouped holds both at R..R+G-1 once quantizing."""
    q, k, v = qkv(B=1, Hq=2, H=2, T=40, D=8)
    st = QuantizedStore(QuantSpec(2, "channel", G), QuantSpec(2, "token", 8), R, residual_rule=rule)
    seen = []
    for i in range(40):
        st.flush()
        if i:
            seen.append((st.k.shape[2], st.v.shape[2]))
        st.append(k[:, :, i : i + 1], v[:, :, i : i + 1], torch.full((1, 2, 1), i, dtype=torch.int32))
    for i, (fk, fv) in enumerate(seen, start=1):
        if rule == "kivi":
            want_k = i % R if R else i % G
            assert (fk, fv) == (want_k, min(i, R))
        else:
            nq = max(0, (i - R) // G) * G
            assert fk == fv == i - nq
    assert st.nq != st.nq_v or rule == "grouped"


def test_kivi_rule_masked_equals_stream_store():
    """The masked twin of residual_rule kivi: key j quantized for query i when j < (i // R) R, value j when
    j < i - R; equal to token-by-token decoding through the store."""
    q, k, v = qkv(T=30)
    st = QuantizedStore(QuantSpec(2, "channel", 4), QuantSpec(3, "token", 4), 8, residual_rule="kivi")
    out_s = run_stream(st, QuantPolicy(), q, k, v)
    pos = torch.arange(30).expand(2, 2, 30)
    allowed = reference.allowed_mask(pos, torch.arange(30).expand(2, 30))
    m = QuantizedStore(QuantSpec(2, "channel", 4), QuantSpec(3, "token", 4), 8, residual_rule="kivi")
    out_m = m.masked_attention(q, k, v, allowed, 0.5)
    assert torch.allclose(out_m, out_s, atol=1e-5)
    assert m.masked_nbytes(30) == st.nbytes()  # the bytes the stream store holds after the last token


def test_kivi_default_is_published_and_checks_residual():
    m = build_method({"name": "kivi"})
    assert m.residual_rule == "kivi" and m.residual == 128
    with pytest.raises(ConfigError) as ei:
        build_method({"name": "kivi", "group_size": 32, "residual": 48})
    assert ei.value.field == "method.residual"
    build_method({"name": "kivi", "group_size": 32, "residual": 48, "residual_rule": "grouped"})


def test_uniform_with_and_without_outliers(stories, tiny_ids):
    """The QAQ paper's uniform baseline keeps 1% outliers: `uniform` offers both; with them, 1% of the quantized
    elements (over the whole cache) are held exactly and their bytes (value + uint8 index + per-row count) are
    counted."""
    ids = torch.tensor([tiny_ids[:201]])
    held = {}
    for out in (0.0, 0.01):
        e = engine_for(stories, {"name": "uniform", "bits": 2, "outliers": out})
        cache = e.new_cache(1, 200)
        e.prefill(cache, ids[:, :-1], chunk_size=1)
        n_out = sum(int(pt.ocnt.long().sum()) for layer in cache.layers for pt in (layer.store.kq, layer.store.vq)
                    if pt.ocnt is not None)
        n_el = sum(pt.nq * pt.B * pt.H * pt.D for layer in cache.layers for pt in (layer.store.kq, layer.store.vq))
        held[out] = (n_out, cache.nbytes())
        assert abs(n_out - out * n_el) <= 2 * len(cache.layers) * 2 * 4  # one unit's share per head and tensor
    rows = sum(2 * layer.store.nq * 4 for layer in cache.layers)  # key and value rows (4 KV heads)
    assert held[0.01][1] - held[0.0][1] == held[0.01][0] * (4 + 1) + rows * 1  # fp32 value + index; counts
