"""Bit-packed quantized rows: the torch twins against hand computations and independent formulas, and each Triton
kernel (interpreted) against its twin over shapes, bit widths, dtypes and GQA ratios."""

import os

os.environ["TRITON_INTERPRET"] = "1"

import inspect  # noqa: E402
import itertools  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from kvx import kernels  # noqa: E402
from kvx.cache.quantized import PackedTensor, QuantSpec, encode  # noqa: E402
from kvx.kernels import reference  # noqa: E402
from kvx.kernels.quant import (  # noqa: E402
    PackedRows,
    codes_of,
    decode_attention_quant_ref,
    dequant_rows_ref,
    pack_rows_ref,
    row_nbytes,
    unpack_codes_ref,
)
from kvx.kernels.quant_triton import (  # noqa: E402
    _decode_kernel,
    _dequant_kernel,
    decode_attention_quant_triton,
    dequant_rows_triton,
    pack_rows_triton,
)

pytestmark = pytest.mark.usefixtures("ref_backend")  # tests/conftest.py


def packed_codes(codes: torch.Tensor, bits: torch.Tensor):
    """Pack known integer codes: x = code + 1/2 with zero 0 and delta 1 quantizes to exactly `code`."""
    M, D = codes.shape
    x = codes.float() + 0.5
    zero = torch.zeros(M, 1, dtype=torch.float16)
    delta = torch.ones(M, 1, dtype=torch.float16)
    nb = row_nbytes(bits, D)
    off = (torch.cumsum(nb, 0) - nb).to(torch.int32)
    return x, zero, delta, off, int(nb.sum())


def test_pack_hand_example():
    # D = 4 codes of 3 bits: 1, 2, 3, 4 -> stream bits (little-endian) 001 010 11|0 100 ->
    # byte 0 = 1 + (2 << 3) + ((3 & 3) << 6) = 209; byte 1 = (3 >> 2) + (4 << 1) = 8
    codes = torch.tensor([[1, 2, 3, 4]])
    bits = torch.tensor([3], dtype=torch.uint8)
    x, zero, delta, off, nbytes = packed_codes(codes, bits)
    assert nbytes == 2
    buf = pack_rows_ref(x, bits, off, zero, delta, torch.zeros(1, dtype=torch.long), 4, nbytes)
    assert buf.tolist() == [209, 8]
    assert torch.equal(pack_rows_triton(x, bits, off, zero, delta, torch.zeros(1, dtype=torch.long), 4, nbytes), buf)
    assert unpack_codes_ref(buf, off, bits, 4).tolist() == [[1, 2, 3, 4]]


@pytest.mark.parametrize("D", [8, 12, 64])
def test_pack_roundtrip_all_widths(D):
    g = torch.Generator().manual_seed(D)
    bits = torch.tensor(list(range(16)) * 3, dtype=torch.uint8)  # 0..15 packed, 16 never packs
    M = bits.numel()
    top = (1 << bits.long().clamp(max=15)) - 1
    codes = (torch.rand(M, D, generator=g) * (top[:, None] + 1).float()).long().clamp(max=top[:, None])
    x, zero, delta, off, nbytes = packed_codes(codes, bits)
    srow = torch.arange(M)
    buf = pack_rows_ref(x, bits, off, zero, delta, srow, D, nbytes)
    assert buf.numel() == sum((D * b + 7) // 8 for b in bits.tolist())
    assert torch.equal(unpack_codes_ref(buf, off, bits, D), codes)
    assert torch.equal(pack_rows_triton(x, bits, off, zero, delta, srow, D, nbytes), buf)


def test_quantizer_formula_and_error_bound():
    # hand example: group [0, 1, 2, 3] at 2 bits -> 4 cells of width 3/4: codes 0, 1, 2, 3 (3 is the top cell)
    x = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    z = torch.tensor([[0.0]])
    d = torch.tensor([[0.75]])
    assert codes_of(x, z, d, torch.tensor([[2]])).tolist() == [[0, 1, 2, 3]]
    g = torch.Generator().manual_seed(0)
    for b in range(0, 9):
        xs = torch.randn(50, 16, generator=g) * 3
        spec = QuantSpec(b, "token", 16)
        pt = PackedTensor(spec, 1, 1, 16, "cpu", torch.float32)
        pt.append(encode(xs[None, None], torch.ones(1, 1, 50, dtype=torch.bool), torch.full((1, 1, 50), b), spec))
        xh = pt.dequant()[0, 0]
        # the codes' reconstruction is zero + (code + 1/2) delta, within delta / 2 of x
        dz = pt.delta[0, 0, :, 0].float()[:, None]
        assert ((xs - xh).abs() <= dz / 2 * (1 + 1e-6) + 1e-6).all()
        # and delta is the range over 2^b cells, rounded up at float16 (never below)
        rng = xs.amax(1) - xs.amin(1)
        assert (dz[:, 0] >= rng / 2**b * (1 - 1e-6)).all() and (dz[:, 0] <= rng / 2**b * (1 + 2e-3) + 1e-3).all()


def random_rows(M, D, bits_choices, seed, dtype=torch.float32, groups=1, n_outliers=2, exact_frac=0.1):
    """A PackedRows with random codes, per-group zero/delta, outliers on some rows and exact rows."""
    g = torch.Generator().manual_seed(seed)
    bits = torch.tensor(bits_choices)[torch.randint(len(bits_choices), (M,), generator=g)].to(torch.uint8)
    exact = torch.rand(M, generator=g) < exact_frac
    bits[exact] = 16
    x = torch.randn(M, D, generator=g).to(dtype)
    NG = groups
    gsz = D // NG
    xf = x.float().view(M, NG, gsz)
    zero = xf.amin(-1).to(torch.float16)
    delta = ((xf.amax(-1) - zero.float()) / 2.0 ** bits.long().clamp(max=15)[:, None].float()).to(torch.float16)
    nb = row_nbytes(bits, D)
    off = (torch.cumsum(nb, 0) - nb).to(torch.int32)
    srow = torch.arange(M)
    buf = pack_rows_ref(x, bits, off, zero, delta, srow, gsz, int(nb.sum()))
    ocnt = torch.where(exact, 0, torch.randint(0, n_outliers + 1, (M,), generator=g)).to(torch.int16)
    ocols, ovals = [], []
    for r in range(M):
        c = torch.randperm(D, generator=g)[: int(ocnt[r])].sort().values
        ocols.append(c)
        ovals.append(torch.randn(len(c), generator=g) * 10)
    ocol = torch.cat(ocols + [torch.zeros(0, dtype=torch.long)]).to(torch.int16)
    oval = torch.cat(ovals + [torch.zeros(0)]).to(dtype)
    ostart_o = torch.cumsum(ocnt.long(), 0) - ocnt.long()
    xval = x[exact].reshape(-1)
    xc = exact.long() * D
    ostart = torch.where(exact, torch.cumsum(xc, 0) - xc, ostart_o).to(torch.int32)
    return PackedRows(buf, off, bits, srow, zero, delta, gsz, ostart, ocnt, ocol, oval, xval, D), x


def test_dequant_twin_restores_outliers_and_exact_rows():
    p, x = random_rows(40, 8, [1, 2, 3, 4, 8], seed=1)
    out = dequant_rows_ref(p, torch.float32)
    exact = p.bits.long() >= 16
    assert torch.equal(out[exact], x[exact])
    for r in range(40):
        s, c = int(p.ostart[r]), int(p.ocnt[r])
        for j in range(c):
            assert out[r, int(p.ocol[s + j])] == p.oval[s + j]
    # everything else: zero + (code + 1/2) delta from the unpacked codes (independent of the kernel's unpacking)
    code = codes_of(x, p.zero.float().repeat_interleave(8, 1), p.delta.float().repeat_interleave(8, 1),
                    p.bits.long()[:, None])
    want = p.zero.float() + (code.float() + 0.5) * p.delta.float()
    plain = ~exact[:, None] & torch.ones(40, 8, dtype=torch.bool)
    for r in range(40):
        s, c = int(p.ostart[r]), int(p.ocnt[r])
        plain[r, p.ocol[s : s + c].long()] = False
    assert torch.equal(out[plain], want[plain])


@pytest.mark.parametrize("D,groups,dtype,bits", [
    (8, 1, torch.float32, [0, 1, 2, 3, 4]),
    (16, 4, torch.float32, [2, 5, 7, 8]),
    (64, 2, torch.float16, [1, 4, 8, 11, 15]),
    (12, 3, torch.float16, [3, 6]),
])
def test_dequant_triton_matches_twin(D, groups, dtype, bits):
    p, _ = random_rows(37, D, bits, seed=D + groups, dtype=dtype, groups=groups)
    ref = dequant_rows_ref(p, dtype)
    tri = dequant_rows_triton(p, dtype)
    assert torch.equal(tri, ref)


def test_pack_triton_matches_twin_real_params():
    g = torch.Generator().manual_seed(3)
    for D, NG in ((8, 1), (32, 4), (48, 3)):
        x = torch.randn(29, D, generator=g) * 4
        bits = torch.randint(0, 16, (29,), generator=g).to(torch.uint8)
        xf = x.view(29, NG, D // NG)
        zero = xf.amin(-1).to(torch.float16)
        delta = ((xf.amax(-1) - zero.float()) / 2.0 ** bits.long()[:, None].float()).to(torch.float16)
        nb = row_nbytes(bits, D)
        off = (torch.cumsum(nb, 0) - nb).to(torch.int32)
        srow = torch.arange(29)
        a = pack_rows_ref(x, bits, off, zero, delta, srow, D // NG, int(nb.sum()))
        b = pack_rows_triton(x, bits, off, zero, delta, srow, D // NG, int(nb.sum()))
        assert torch.equal(a, b)


def make_decode_inputs(B, Hq, Hkv, NQ, NT, D, dtype, seed, pad=False):
    g = torch.Generator().manual_seed(seed)
    kp, kx = random_rows(B * Hkv * NQ, D, [1, 2, 4, 8], seed, dtype=dtype, groups=1)
    vp, vx = random_rows(B * Hkv * NQ, D, [2, 3, 4], seed + 1, dtype=dtype, groups=1)
    q = torch.randn(B, Hq, D, generator=g).to(dtype)
    tk = torch.randn(B, Hkv, NT, D, generator=g).to(dtype)
    tv = torch.randn(B, Hkv, NT, D, generator=g).to(dtype)
    kpos = torch.arange(NQ, dtype=torch.int32).expand(B, Hkv, NQ).contiguous()
    tpos = (NQ + torch.arange(NT, dtype=torch.int32)).expand(B, Hkv, NT).contiguous()
    qpos = torch.full((B,), NQ + NT - 1, dtype=torch.long)
    if pad and NQ > 2:
        kpos[0, :, :2] = -1  # left padding of the first sequence
        kpos[-1, -1, NQ - 1] = NQ + NT + 5  # a slot beyond the query: not read
    return q, kp, vp, kpos, tk, tv, tpos, qpos


@pytest.mark.parametrize("B,Hq,Hkv,NQ,NT,D,dtype", [
    (1, 4, 4, 5, 1, 8, torch.float32),
    (2, 8, 4, 23, 3, 8, torch.float32),
    (2, 8, 2, 37, 2, 16, torch.float16),
    (1, 8, 1, 17, 1, 64, torch.float32),
    (2, 6, 2, 0, 4, 8, torch.float32),
])
def test_decode_twin_matches_reference_attention(B, Hq, Hkv, NQ, NT, D, dtype):
    q, kp, vp, kpos, tk, tv, tpos, qpos = make_decode_inputs(B, Hq, Hkv, NQ, NT, D, dtype, seed=NQ + D, pad=True)
    out, logits, lse = decode_attention_quant_ref(q, kp, vp, kpos, tk, tv, tpos, qpos, 0.3, return_logits=True)
    # independent path: dequantize, concatenate, and the dense reference attention of kvx.kernels.reference
    k = torch.cat([dequant_rows_ref(kp, dtype).view(B, Hkv, NQ, D), tk], 2)
    v = torch.cat([dequant_rows_ref(vp, dtype).view(B, Hkv, NQ, D), tv], 2)
    pos = torch.cat([kpos, tpos], 2)
    ref, probs = reference.attention(q.float()[:, :, None], k.float(), v.float(), pos, qpos[:, None], 0.3,
                                     return_probs=True)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    assert torch.allclose(out.float(), ref[:, :, 0], atol=tol, rtol=tol)
    assert torch.allclose(torch.exp(logits - lse[..., None]), probs[:, :, 0], atol=1e-6 if dtype == torch.float32 else 1e-3)


@pytest.mark.parametrize("B,Hq,Hkv,NQ,NT,D,dtype,logits", [
    (1, 4, 4, 5, 1, 8, torch.float32, False),
    (2, 8, 4, 23, 3, 8, torch.float32, True),
    (2, 8, 2, 37, 2, 16, torch.float16, True),
    (1, 8, 1, 17, 1, 64, torch.float32, False),
    (2, 6, 2, 0, 4, 8, torch.float32, True),
    (1, 3, 1, 40, 1, 12, torch.float16, False),
])
def test_decode_triton_matches_twin(B, Hq, Hkv, NQ, NT, D, dtype, logits):
    q, kp, vp, kpos, tk, tv, tpos, qpos = make_decode_inputs(B, Hq, Hkv, NQ, NT, D, dtype, seed=B + NQ, pad=True)
    ref = decode_attention_quant_ref(q, kp, vp, kpos, tk, tv, tpos, qpos, 0.25, return_logits=logits)
    tri = decode_attention_quant_triton(q, kp, vp, kpos, tk, tv, tpos, qpos, 0.25, return_logits=logits)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    assert torch.allclose(tri[0].float(), ref[0].float(), atol=tol, rtol=tol)
    assert torch.allclose(tri[2], ref[2], atol=1e-5, rtol=1e-5)
    if logits:
        fin = torch.isfinite(ref[1])
        assert torch.equal(fin, torch.isfinite(tri[1]))
        assert torch.allclose(tri[1][fin], ref[1][fin], atol=1e-5, rtol=1e-5)


def test_decode_padding_query_reads_everything():
    q, kp, vp, kpos, tk, tv, tpos, qpos = make_decode_inputs(2, 4, 2, 9, 2, 8, torch.float32, seed=5)
    qpos[0] = -1
    kpos[0, :, 3] = 50  # beyond any real query: read only by the padding query
    ref = decode_attention_quant_ref(q, kp, vp, kpos, tk, tv, tpos, qpos, 0.5, return_logits=True)
    tri = decode_attention_quant_triton(q, kp, vp, kpos, tk, tv, tpos, qpos, 0.5, return_logits=True)
    assert torch.isfinite(ref[1][0]).all()
    assert torch.allclose(tri[0], ref[0], atol=1e-5)


@pytest.mark.parametrize("axis,group,bits,outliers", [
    ("token", 8, 2, 0.0), ("token", 4, 4, 0.25), ("channel", 4, 3, 0.0), ("channel", 8, 2, 0.3),
])
def test_encode_with_triton_backend_matches_ref(axis, group, bits, outliers):
    """The store's encode path (parameters in torch, packing by the backend) gives identical bytes either way."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, 16, 8, generator=g)
    valid = torch.ones(2, 3, 16, dtype=torch.bool)
    spec = QuantSpec(bits, axis, group, outliers)
    blocks = group if axis == "channel" else 1
    e_ref = encode(x, valid, torch.full((2, 3, 16), bits), spec, False, blocks)
    kernels.set_backend("triton")
    e_tri = encode(x, valid, torch.full((2, 3, 16), bits), spec, False, blocks)
    assert torch.equal(e_ref.buf, e_tri.buf) and torch.equal(e_ref.off, e_tri.off)
    pt = PackedTensor(spec, 2, 3, 8, "cpu", torch.float32)
    pt.append(e_tri)
    a = pt.dequant()
    kernels.set_backend("ref")
    assert torch.equal(a, pt.dequant())


def test_kernel_sweep_gqa_ratios_and_widths():
    """A wider sweep of (group size, head dim, widths) for the fused kernel, still small enough to interpret."""
    for (Hq, Hkv), D in itertools.product([(4, 1), (4, 2), (6, 3)], [8, 32]):
        q, kp, vp, kpos, tk, tv, tpos, qpos = make_decode_inputs(1, Hq, Hkv, 19, 2, D, torch.float32, seed=Hq * D)
        ref = decode_attention_quant_ref(q, kp, vp, kpos, tk, tv, tpos, qpos, D**-0.5)
        tri = decode_attention_quant_triton(q, kp, vp, kpos, tk, tv, tpos, qpos, D**-0.5)
        assert torch.allclose(tri[0], ref[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("splits,block_n", [(1, 16), (2, 16), (3, 16), (7, 16), (2, 32), (3, 64)])
def test_decode_split_k_matches_twin(splits, block_n):
    """Split-K over the packed rows and the tail (splits straddle the boundary NQ), reduced by log-sum-exp; slot
    blocks of 16 (the default), 32 and 64."""
    q, kp, vp, kpos, tk, tv, tpos, qpos = make_decode_inputs(2, 8, 2, 75, 6, 16, torch.float32, seed=11, pad=True)
    ref = decode_attention_quant_ref(q, kp, vp, kpos, tk, tv, tpos, qpos, 0.25, return_logits=True)
    tri = decode_attention_quant_triton(q, kp, vp, kpos, tk, tv, tpos, qpos, 0.25, return_logits=True,
                                        num_splits=splits, block_n=block_n)
    assert torch.allclose(tri[0], ref[0], atol=1e-5, rtol=1e-5)
    assert torch.allclose(tri[2], ref[2], atol=1e-5, rtol=1e-5)
    fin = torch.isfinite(ref[1])
    assert torch.equal(fin, torch.isfinite(tri[1])) and torch.allclose(tri[1][fin], ref[1][fin], atol=1e-5)


def test_outlier_loop_bound_is_a_runtime_argument():
    """The outlier patch loop runs to the largest count as a runtime bound: one compiled kernel for any count."""
    for kern in (_decode_kernel, _dequant_kernel):  # JITFunction or, interpreted, InterpretedFunction: .fn
        params = inspect.signature(kern.fn).parameters
        const = {n for n, p in params.items() if "constexpr" in str(p.annotation)}
        assert "G" in const or "BLOCK_R" in const
        assert not const & {"OMAX", "KOMAX", "VOMAX"} and {"OMAX", "KOMAX", "VOMAX"} & set(params)
    for ratio in (0.1, 0.4):  # different outlier counts per row, same kernel
        x = torch.randn(1, 2, 20, 8, generator=torch.Generator().manual_seed(3))
        spec = QuantSpec(3, "token", 0, ratio)
        e = encode(x, torch.ones(1, 2, 20, dtype=torch.bool), torch.full((1, 2, 20), 3), spec)
        pt = PackedTensor(spec, 1, 2, 8, "cpu", torch.float32)
        pt.append(e)
        assert int(pt.ocnt.long().max()) >= (2 if ratio > 0.2 else 1)
        assert torch.equal(dequant_rows_triton(pt.rows(), torch.float32), dequant_rows_ref(pt.rows(), torch.float32))
