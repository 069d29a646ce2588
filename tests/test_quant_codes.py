"""Attention over the codes (kvx/kernels/quant_codes.py) against dequantize-then-attend: one packed tensor's scores
and weighted sums against q @ x^T and p @ x over the twin-dequantized rows, and whole stores (uniform, KIVI, QAQ,
GQA, padding, eviction) decoding token by token against the reference path over dequantized rows."""

import pytest
import torch

from kvx.cache.quantized import PackedTensor, QAQConfig, QuantizedStore, QuantSpec, encode
from kvx.kernels import reference
from kvx.kernels.quant import dequant_rows_ref
from kvx.kernels.quant_codes import plane_perm, unpack_planes
from kvx.methods.quantization import QuantPolicy
from tests.test_quant_methods import qkv, run_stream

pytestmark = pytest.mark.usefixtures("ref_backend")  # tests/conftest.py


def packed(spec, bits, B=2, H=2, n=32, D=16, seed=0, fixed=True, heads_unit=False, dtype=torch.float32):
    """A PackedTensor of n random rows per head; bits: one width (fixed) or a list to draw per-row widths from."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(B, H, n, D, generator=g) * (torch.rand(D, generator=g) * 3 + 0.2)).to(dtype)
    if isinstance(bits, int):
        b = torch.full((B, H, n), bits, dtype=torch.long)
    else:
        b = torch.tensor(bits)[torch.randint(len(bits), (B, 1 if heads_unit else H, n), generator=g)]
        b = b.expand(B, H, n)
        fixed = False
    br = spec.group if spec.axis == "channel" else 1
    pt = PackedTensor(spec, B, H, D, x.device, dtype, bits if fixed else None,
                      spec.outliers > 0 or not fixed, br)
    valid = torch.ones(B, H, n, dtype=torch.bool)
    useq = torch.arange(n).view(1, 1, n).expand(B, H, n)
    if spec.axis == "channel":
        useq = useq // br
    pt.append(encode(x, valid, b, spec, heads_unit, br, useq, fixed))
    return pt, x


def dequantized(pt):
    return dequant_rows_ref(pt.rows(), torch.float32).view(pt.B * pt.H, pt.nq, pt.D)


CASES = [  # spec, bits, D
    (QuantSpec(4, "token", 0), 4, 16),  # uniform 4-bit: one group per head
    (QuantSpec(2, "token", 4), 2, 16),  # KIVI values: groups of 4 channels
    (QuantSpec(1, "token", 8), 1, 16),
    (QuantSpec(8, "token", 0), 8, 16),
    (QuantSpec(3, "token", 0), 3, 16),  # a width that straddles bytes
    (QuantSpec(5, "token", 8), 5, 16),
    (QuantSpec(10, "token", 0), 10, 16),  # above 8 bits: the reference unpacker
    (QuantSpec(3, "token", 0), 3, 12),  # D not a multiple of 8
    (QuantSpec(2, "channel", 8), 2, 16),  # KIVI keys: channel groups over blocks of 8 tokens
    (QuantSpec(6, "channel", 4), 6, 16),
    (QuantSpec(4, "token", 0, 0.1), 4, 16),  # outliers
    (QuantSpec(2, "channel", 8, 0.05), 2, 16),
    (QuantSpec(8, "token", 0, 0.05), [2, 3, 4, 5, 8, 16], 16),  # QAQ: per-row widths, exact rows, outliers
    (QuantSpec(8, "token", 0, 0.05), [2, 4, 16], 16),
    (QuantSpec(8, "token", 0), [1, 2, 4, 7, 8], 24),
    (QuantSpec(8, "token", 0, 0.1), [2, 3, 12, 16], 16),
]


HEADS_UNIT = [(s, b, D, True) for s, b, D in CASES if not isinstance(b, int)]  # QAQ: one zero/scale per token


@pytest.mark.parametrize("spec,bits,D,heads_unit", [(*c, False) for c in CASES] + HEADS_UNIT, ids=lambda c: str(c))
def test_scores_and_sums_equal_dequantized(spec, bits, D, heads_unit):
    pt, _ = packed(spec, bits, D=D, seed=D + len(str(bits)), heads_unit=heads_unit)
    x = dequantized(pt)
    cv = pt.code_view()
    g = torch.Generator().manual_seed(1)
    q = torch.randn(pt.B * pt.H, 3, D, generator=g)
    p = torch.softmax(torch.randn(pt.B * pt.H, 3, pt.nq, generator=g) * 3, -1)
    torch.testing.assert_close(cv.scores(q), q @ x.transpose(1, 2), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(cv.weighted_sum(p), p @ x, rtol=1e-5, atol=1e-5)


def test_plane_order_hand_example():
    # two bytes of 4-bit codes: 0x21 holds elements 0 (1) and 1 (2), 0x43 elements 2 (3) and 3 (4)
    c, F = unpack_planes(torch.tensor([[0x21, 0x43]], dtype=torch.uint8), 4, 4)
    assert F == 2 and c.tolist() == [[1.0, 3.0, 2.0, 4.0]]
    assert plane_perm(2, 4, "cpu").tolist() == [0, 2, 1, 3]
    # 3-bit codes 1, 2, 3, 4, 5, 6, 7, 0: 24 bits, element e at bits 3e..3e+2 (little-endian)
    v = sum(e << (3 * i) for i, e in enumerate([1, 2, 3, 4, 5, 6, 7, 0]))
    c, F = unpack_planes(torch.tensor([list(v.to_bytes(3, "little"))], dtype=torch.uint8), 3, 8)
    assert F == 8 and c.tolist() == [[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 0.0]]


def test_channel_blocks_after_eviction():
    """Channel groups whose rows eviction moved out of block order (blk held): the irregular path."""
    pt, _ = packed(QuantSpec(3, "channel", 4, 0.05), 3, n=16)
    pt.take(torch.tensor([[[0, 1, 5, 6, 7, 9, 12, 15]] * 2] * 2))
    assert pt.blk is not None
    x = dequantized(pt)
    g = torch.Generator().manual_seed(2)
    q = torch.randn(4, 2, 16, generator=g)
    p = torch.softmax(torch.randn(4, 2, 8, generator=g), -1)
    cv = pt.code_view()
    torch.testing.assert_close(cv.scores(q), q @ x.transpose(1, 2), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(cv.weighted_sum(p), p @ x, rtol=1e-5, atol=1e-5)


STORES = [  # kspec, vspec, residual, qaq, residual_rule
    (QuantSpec(4), QuantSpec(4), 0, None, "grouped"),  # uniform 4-bit
    (QuantSpec(2, "token", 4), QuantSpec(2, "token", 4), 3, None, "grouped"),
    (QuantSpec(2, "channel", 4), QuantSpec(2, "token", 4), 8, None, "kivi"),  # KIVI: nq_k != nq_v
    (QuantSpec(2, "channel", 4), QuantSpec(3, "token", 8), 4, None, "grouped"),
    (QuantSpec(8, "token", 0, 0.1), QuantSpec(8, "token", 0, 0.1), 2,
     QAQConfig(key_error=0.03, value_error=3e-4, min_bits=2, max_bits=16), "grouped"),
    (QuantSpec(8, "token", 0, 0.1), QuantSpec(8, "token", 0, 0.1), 1,
     QAQConfig(key_error=0.03, value_error=0.03, min_bits=2, max_bits=8, granularity="head", attn_window=2), "grouped"),
]


def decode(store_args, q, k, v, forced_reference: bool, monkeypatch):
    if forced_reference:
        monkeypatch.setattr(reference, "BLOCK_ELEMENTS", 0)  # the store falls back to dequantize-then-attend
    st = QuantizedStore(*store_args[:4], residual_rule=store_args[4])
    out = run_stream(st, QuantPolicy(), q, k, v)
    monkeypatch.undo()
    return out, st


@pytest.mark.parametrize("args", STORES, ids=lambda a: f"{a[0].bits}{a[0].axis}-{a[1].bits}-{a[3] is not None}")
def test_store_decode_equals_dequantize_then_attend(args, monkeypatch):
    q, k, v = qkv(B=2, Hq=4, H=2, T=28, D=16, seed=3)  # GQA 2:1
    fast, st = decode(args, q, k, v, False, monkeypatch)
    ref, st_ref = decode(args, q, k, v, True, monkeypatch)
    assert st.nq > 0 and st.nq_v > 0
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    if st.qaq is not None:  # QAQ chose the same widths from the probabilities it computed
        for a, b in ((st.kq, st_ref.kq), (st.vq, st_ref.vq)):
            assert torch.equal(a.row_bits(), b.row_bits()) and a.row_bits().unique().numel() > 1


def test_store_decode_padding_and_bfloat16(monkeypatch):
    """Left padding (slots at position -1 are never read) and a bfloat16 cache: the codes path computes in fp32, the
    reference over bfloat16 dequantized rows, so they agree to bfloat16's rounding."""
    q, k, v = qkv(B=2, Hq=4, H=1, T=20, D=16, seed=4)
    q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    outs = []
    for forced in (False, True):
        if forced:
            monkeypatch.setattr(reference, "BLOCK_ELEMENTS", 0)
        st = QuantizedStore(QuantSpec(4), QuantSpec(2, "token", 8), residual=0)
        pos = torch.tensor([[-1, -1, -1] + list(range(17)), list(range(20))])
        res = []
        for i in range(20):
            qpos = pos[:, i : i + 1]
            pn = qpos[:, None, :]
            st.flush()
            res.append(st.attend(q[:, :, i : i + 1], k[:, :, i : i + 1], v[:, :, i : i + 1], pn, qpos, 0.5)[0])
            st.append(k[:, :, i : i + 1], v[:, :, i : i + 1], pn)
        outs.append(torch.cat(res, 2).float())
        monkeypatch.undo()
    torch.testing.assert_close(outs[0][0, :, 3:], outs[1][0, :, 3:], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("unit", [1, 3, 16, 32])
def test_segments_gather_in_chunks_as_bytewise(unit):
    """_segments (the rebuild after re-quantization or eviction) gathers whole chunks where every start and count
    allows it; the result equals slicing segment by segment."""
    from kvx.cache.quant_packed import _segments

    g = torch.Generator().manual_seed(unit)
    count = torch.randint(0, 5, (40,), generator=g) * unit
    start = torch.randint(0, 30, (40,), generator=g) * unit
    src = torch.randint(0, 256, (40 * unit + 5 * unit,), generator=g, dtype=torch.uint8)
    want = torch.cat([src[a : a + c] for a, c in zip(start.tolist(), count.tolist())])
    assert torch.equal(_segments(src, start, count), want)
