"""Decode attention: the torch twin against independent formulas, the Triton kernel (interpreted) against the twin,
and the DenseStore / engine wiring against the reference path."""

import os

os.environ["TRITON_INTERPRET"] = "1"

import itertools  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from kvx import kernels  # noqa: E402
from kvx.kernels import reference  # noqa: E402
from kvx.kernels.decode import decode_attention, decode_attention_ref  # noqa: E402
from kvx.kernels.decode_triton import decode_attention_triton  # noqa: E402


@pytest.fixture(autouse=True)
def _restore_backend():
    saved = kernels.backend()
    yield
    kernels.set_backend(saved)


def make_inputs(B, Hq, Hkv, N, D, R=0, dtype=torch.float32, seed=0, lengths=None, logit_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, Hq, D, generator=g) * logit_scale).to(dtype)
    k = torch.randn(B, Hkv, N, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, N, D, generator=g).to(dtype)
    if lengths is None:
        lengths = torch.randint(1, N + 1, (B, Hkv), generator=g)
    lr = {}
    if R:
        lr = dict(
            phi_q=torch.rand(B, Hq, R, generator=g).to(dtype),
            H=torch.randn(B, Hkv, R, D, generator=g).to(dtype),
            z=(torch.rand(B, Hkv, R, generator=g) + 0.1).to(dtype),
        )
    return q, k, v, lengths, lr


def naive(q, k, v, lengths, scaling, phi_q=None, H=None, z=None, kpos=None, qpos=None):
    """Float64, unshifted, one (sequence, query head) at a time: the formula as written."""
    B, Hq, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    g = Hq // Hkv
    out = torch.zeros(B, Hq, D, dtype=torch.float64)
    scores = torch.zeros(B, Hkv, N, dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            kh = h // g
            n = int(lengths[b, kh]) if lengths is not None else N
            idx = list(range(n))
            if kpos is not None:
                qp = int(qpos[b])
                idx = [j for j in idx if qp < 0 or 0 <= int(kpos[b, kh, j]) <= qp]
            w = torch.exp(scaling * (k[b, kh, idx].double() @ q[b, h].double()))
            num = w @ v[b, kh, idx].double()
            den = w.sum()
            if phi_q is not None:
                num = num + phi_q[b, h].double() @ H[b, kh].double()
                den = den + phi_q[b, h].double() @ z[b, kh].double()
            out[b, h] = num / den
            scores[b, kh, idx] += w / den
    return out, scores


# --- the twin against independent computations ------------------------------------------------------------------
@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("R", [0, 8])
def test_ref_matches_naive_formula(group, R):
    q, k, v, lengths, lr = make_inputs(2, 2 * group, 2, 37, 16, R=R, seed=group + R)
    lengths[0, 0] = 1
    out, sc = decode_attention_ref(q, k, v, lengths, 0.3, return_scores=True, **lr)
    want, want_sc = naive(q, k, v, lengths, 0.3, **lr)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sc.double(), want_sc, atol=1e-6, rtol=1e-5)
    if not R:  # without the low-rank term the weights of each query head sum to one
        torch.testing.assert_close(sc.sum(-1), torch.full((2, 2), float(group)), atol=1e-5, rtol=0)


def test_ref_matches_reference_attention_with_positions():
    """kpos/qpos follow kvx.kernels.reference: padding slots (-1) are skipped, as in the prefill path."""
    B, Hq, Hkv, N, D = 3, 8, 2, 29, 32
    q, k, v, _, _ = make_inputs(B, Hq, Hkv, N, D, seed=3)
    kpos = torch.arange(N, dtype=torch.int32).expand(B, Hkv, N).clone()
    kpos[1, :, :5] = -1  # left padding of sequence 1
    kpos[2, 1, 7] = -1
    qpos = torch.tensor([N - 1, N - 1, N - 1])
    out, sc = decode_attention_ref(q, k, v, None, D**-0.5, kpos=kpos, qpos=qpos, return_scores=True)
    ref_out, probs = reference.attention(q[:, :, None], k, v, kpos, qpos[:, None], D**-0.5, return_probs=True)
    torch.testing.assert_close(out, ref_out[:, :, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sc, reference.group_sum(probs, Hkv)[:, :, 0], atol=1e-6, rtol=1e-5)
    sdpa, _ = reference.attention(q[:, :, None], k, v, kpos, qpos[:, None], D**-0.5)
    torch.testing.assert_close(out, sdpa[:, :, 0], atol=1e-5, rtol=1e-5)
    want, want_sc = naive(q, k, v, None, D**-0.5, kpos=kpos, qpos=qpos)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)


def test_ref_is_stable_where_unshifted_overflows():
    """Logits far beyond exp's range, in fp16: the shifted twin stays finite and equals the float64 formula."""
    q, k, v, lengths, lr = make_inputs(1, 4, 2, 40, 16, R=4, dtype=torch.float16, seed=5, logit_scale=40.0)
    out, _ = decode_attention_ref(q, k, v, lengths, 1.0, **lr)
    assert torch.isfinite(out).all()
    s = torch.matmul(q.float().view(1, 2, 2, 16), k.float().transpose(-1, -2))
    assert s.abs().max() > 200  # e^s would overflow fp32 (and fp16 long before)
    # float64 reference shifted by hand (e^{±200} still fits a double, e^{±800} might not)
    want = torch.zeros(1, 4, 16, dtype=torch.float64)
    for h in range(4):
        kh = h // 2
        n = int(lengths[0, kh])
        sh = s[0, kh, h % 2, :n].double()
        c = max(float(sh.max()), 0.0)
        w = torch.exp(sh - c)
        num = w @ v[0, kh, :n].double() + (lr["phi_q"][0, h].double() @ lr["H"][0, kh].double()) * torch.exp(
            torch.tensor(-c, dtype=torch.float64))
        den = w.sum() + (lr["phi_q"][0, h].double() @ lr["z"][0, kh].double()) * torch.exp(
            torch.tensor(-c, dtype=torch.float64))
        want[0, h] = num / den
    torch.testing.assert_close(out.double(), want, atol=2e-3, rtol=2e-3)


def test_low_rank_dominates_when_logits_are_very_negative():
    """All kept logits near -1000: the sparse part vanishes and out = phi·H / phi·z, with no 0/0."""
    q, k, v, lengths, lr = make_inputs(1, 2, 1, 20, 16, R=4, seed=9)
    k = -q[:, :1, None, :].expand(1, 1, 20, 16) * 1000 / (q[0, 0] @ q[0, 0])
    q[0, 1] = q[0, 0]
    out, _ = decode_attention_ref(q, k.contiguous(), v, lengths, 1.0, **lr)
    want = (lr["phi_q"][0] @ lr["H"][0, 0]) / (lr["phi_q"][0] @ lr["z"][0, 0])[:, None]
    torch.testing.assert_close(out[0], want, atol=1e-5, rtol=1e-5)


def test_argument_checks():
    q, k, v, lengths, lr = make_inputs(1, 4, 2, 8, 16, R=4)
    with pytest.raises(ValueError, match="together"):
        decode_attention_ref(q, k, v, lengths, 1.0, phi_q=lr["phi_q"])
    with pytest.raises(ValueError, match="lengths"):
        decode_attention_ref(q, k, v, lengths[:, :1], 1.0)
    with pytest.raises(ValueError, match="multiple"):
        decode_attention_ref(q[:, :3], k, v, lengths, 1.0)


# --- Triton (interpreted) against the twin ----------------------------------------------------------------------
CASES = list(itertools.product([1, 2, 4], [torch.float32, torch.float16], [False, True], [False, True]))


@pytest.mark.parametrize("group,dtype,low_rank,scores", CASES)
def test_triton_matches_twin(group, dtype, low_rank, scores):
    B, Hkv, N, D = 2, 2, 83, 32
    lengths = torch.tensor([[1, 83], [50, 17]])  # 1, full, not multiples of the block
    q, k, v, lengths, lr = make_inputs(B, Hkv * group, Hkv, N, D, R=6 if low_rank else 0, dtype=dtype,
                                       seed=group, lengths=lengths)
    want, want_sc = decode_attention_ref(q, k, v, lengths, D**-0.5, return_scores=scores, **lr)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-3, rtol=1e-2)
    for splits, block in [(1, 32), (3, 16)]:
        out, sc = decode_attention_triton(q, k, v, lengths, D**-0.5, return_scores=scores, num_splits=splits,
                                          block_n=block, **lr)
        assert out.dtype == dtype and out.shape == q.shape
        torch.testing.assert_close(out.float(), want.float(), **tol)
        if scores:
            torch.testing.assert_close(sc, want_sc, atol=1e-5 if dtype == torch.float32 else 2e-3, rtol=1e-3)
            assert (sc[0, 0, 1:] == 0).all() and (sc[1, 1, 17:] == 0).all()
        else:
            assert sc is None


@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 16), (3, 8, 2, 130, 64), (1, 12, 4, 47, 24), (2, 4, 4, 16, 128)])
def test_triton_shapes(shape):
    """Odd head dims (24), one slot, N a multiple of the block, many splits; positions with padding."""
    B, Hq, Hkv, N, D = shape
    q, k, v, lengths, lr = make_inputs(B, Hq, Hkv, N, D, R=16, seed=N)
    kpos = torch.arange(N, dtype=torch.int32).expand(B, Hkv, N).clone()
    kpos[0, :, : N // 3] = -1
    qpos = torch.full((B,), N, dtype=torch.long)
    for extra in [{}, lr]:
        want, want_sc = decode_attention_ref(q, k, v, lengths, 0.125, kpos=kpos, qpos=qpos, return_scores=True,
                                             **extra)
        out, sc = decode_attention_triton(q, k, v, lengths, 0.125, kpos=kpos, qpos=qpos, return_scores=True,
                                          num_splits=4, block_n=16, **extra)
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sc, want_sc, atol=1e-6, rtol=1e-4)


def test_triton_strided_query_and_fp16_large_logits():
    """A query sliced out of [B, Hq, t, D] (not contiguous) and fp16 logits in the hundreds."""
    q4 = torch.randn(2, 8, 3, 32) * 30
    q = q4[:, :, 1].half()
    _, k, v, lengths, lr = make_inputs(2, 8, 2, 70, 32, R=4, dtype=torch.float16, seed=1)
    want, _ = decode_attention_ref(q, k, v, lengths, 1.0, **lr)
    out, _ = decode_attention_triton(q, k, v, lengths, 1.0, num_splits=2, block_n=16, **lr)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), want.float(), atol=3e-3, rtol=1e-2)


def test_dispatch_follows_backend():
    q, k, v, lengths, _ = make_inputs(1, 4, 2, 20, 16)
    want, _ = decode_attention_ref(q, k, v, lengths, 0.25)
    for name in ("ref", "triton", "auto"):
        kernels.set_backend(name)
        out, _ = decode_attention(q, k, v, lengths, 0.25)
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    kernels.set_backend("triton")
    assert kernels.use_triton("cpu")
    kernels.set_backend("auto")
    assert not kernels.use_triton("cpu") and kernels.use_triton("cuda")


# --- wiring: DenseStore.attend and the engine -------------------------------------------------------------------
def tiny_engine(method_name="full", **fields):
    from kvx.engine import Engine
    from kvx.models import ModelConfig, load_model
    from kvx.registry import METHODS

    model, tok = load_model(ModelConfig(random=True, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                                        intermediate_size=128, vocab_size=128, max_position_embeddings=256))
    return Engine(model, tok, METHODS.get(method_name)(**fields))


def spy_kernel(monkeypatch, what) -> list:
    """Record what(args, kwargs) of every call of the Triton decode kernel."""
    from kvx.kernels import decode_triton

    calls = []
    real = decode_triton.decode_attention_triton

    def counted(*a, **kw):
        calls.append(what(a, kw))
        return real(*a, **kw)

    monkeypatch.setattr(decode_triton, "decode_attention_triton", counted)
    return calls


def decode_steps(eng, ids, am, backend: str, n: int):
    """Prefill (left-padded batch) and n greedy decoding steps through `backend`: logits [n, B, V] and the kept token
    indices of every layer after each step."""
    kernels.set_backend(backend)
    try:
        cache = eng.new_cache(ids.shape[0], seq_len=ids.shape[1] + n)
        eng.prefill(cache, ids, am)
        steps, kept = [], []
        tok = cache.last_logits.argmax(-1)
        for _ in range(n):
            logits = eng.forward(cache, tok[:, None])[:, -1]
            steps.append(logits)
            kept.append([layer.store.pos.sort(-1).values.tolist() for layer in cache.layers])
            tok = logits.argmax(-1)
        return torch.stack(steps), kept
    finally:
        kernels.set_backend("auto")


@pytest.mark.parametrize("method,fields", [("full", {}), ("streaming_llm", {"budget": 9, "sink": 2})])
def test_engine_decode_through_triton_matches_reference(method, fields, monkeypatch):
    """Left-padded batch: the kernel must skip padding slots exactly as the reference mask does."""
    calls = spy_kernel(monkeypatch, lambda a, kw: a[1].shape[2])
    eng = tiny_engine(method, **fields)
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    am = torch.ones_like(ids)
    am[1, :4] = 0
    runs = {name: decode_steps(eng, ids, am, name, 5)[0] for name in ("ref", "triton")}
    assert len(calls) == 5 * 2  # every decode step of both layers went through the kernel, the prefill did not
    if method == "streaming_llm":
        assert max(calls) == 9  # the kernel read at most the budget
    torch.testing.assert_close(runs["triton"], runs["ref"], atol=1e-4, rtol=1e-4)
    assert (runs["triton"].argmax(-1) == runs["ref"].argmax(-1)).all()


def _store_inputs(B=2, Hq=8, Hkv=2, n=21, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(B, Hkv, n, D, generator=g)
    v = torch.randn(B, Hkv, n, D, generator=g)
    pos = torch.arange(n, dtype=torch.int32).expand(B, Hkv, n).contiguous()
    return g, k, v, pos


@pytest.mark.parametrize("padded", [False, True])
def test_dense_store_decode_steps_match_reference(padded):
    """Decode steps through DenseStore (reference backend) against reference.attention over tensors concatenated here,
    with and without padding slots; the stored tensors equal a plain concatenation after every append and eviction."""
    from kvx.cache.dense import DenseStore

    kernels.set_backend("ref")
    B, Hq, Hkv, n, D = 2, 8, 2, 21, 16
    g, k, v, pos = _store_inputs(B, Hq, Hkv, n, D)
    if padded:
        pos[1, :, :6] = -1
    st = DenseStore()
    st.append(k, v, pos)
    K, V, P = k.clone(), v.clone(), pos.clone()
    for step in range(6):
        q = torch.randn(B, Hq, 1, D, generator=g)
        kn, vn = torch.randn(B, Hkv, 1, D, generator=g), torch.randn(B, Hkv, 1, D, generator=g)
        qpos = torch.full((B, 1), n + step)
        pn = qpos[:, None, :].expand(B, Hkv, 1)
        out, probs = st.attend(q, kn, vn, pn, qpos, D**-0.5)
        assert probs is None
        K, V, P = torch.cat([K, kn], 2), torch.cat([V, vn], 2), torch.cat([P, pn.to(torch.int32)], 2)
        want, _ = reference.attention(q, K, V, P, qpos, D**-0.5)
        assert torch.equal(out, want)  # bit for bit: the reference path stays the reference
        if padded and step <= 2:  # the padding slots (until evicted) really are skipped
            unmasked, _ = reference.attention(q, K, V, None, None, D**-0.5)
            assert not torch.allclose(out[1], unmasked[1])
        st.append(kn, vn, pn)
        assert torch.equal(st.k, K) and torch.equal(st.v, V) and torch.equal(st.pos, P) and torch.equal(st.rpos, P)
        if step == 2:  # evict: keep the last 15 slots of every head
            idx = torch.arange(K.shape[2] - 15, K.shape[2]).expand(B, Hkv, 15)
            st.keep(idx)
            K, V, P = K[:, :, -15:], V[:, :, -15:], P[:, :, -15:]
            assert torch.equal(st.k, K) and torch.equal(st.pos, P)


def test_dense_store_append_after_outside_change_does_not_reuse():
    """If the stored tensors change between attend and append, append concatenates afresh."""
    from kvx.cache.dense import DenseStore

    B, Hq, Hkv, n, D = 1, 4, 2, 9, 16
    g, k, v, pos = _store_inputs(B, Hq, Hkv, n, D, seed=1)
    st = DenseStore()
    st.append(k, v, pos)
    q = torch.randn(B, Hq, 1, D, generator=g)
    kn, vn = torch.randn(B, Hkv, 1, D, generator=g), torch.randn(B, Hkv, 1, D, generator=g)
    qpos = torch.full((B, 1), n)
    pn = qpos[:, None, :].expand(B, Hkv, 1)
    st.attend(q, kn, vn, pn, qpos, 0.25)
    st.k = st.k * 2  # e.g. keys re-rotated by a method between the two calls
    st.append(kn, vn, pn)
    assert torch.equal(st.k, torch.cat([k * 2, kn], 2)) and torch.equal(st.v, torch.cat([v, vn], 2))


@pytest.mark.parametrize("method,fields", [("h2o", {"budget": 8}), ("tova", {"budget": 8})])
def test_fused_score_accumulation_through_triton_matches_reference(method, fields, monkeypatch):
    """Decoding with h2o/tova through the Triton kernel: the kernel returns the attention summed over each group
    beside the output (one pass, no probabilities), and the kept sets and logits equal the reference backend's."""
    calls = spy_kernel(monkeypatch, lambda a, kw: a[10] if len(a) > 10 else kw.get("return_scores", False))
    eng = tiny_engine(method, **fields)
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    am = torch.ones_like(ids)
    am[1, :3] = 0
    runs = {name: decode_steps(eng, ids, am, name, 6) for name in ("ref", "triton")}
    assert len(calls) == 6 * 2 and all(calls)  # every decode step asked the kernel for the group sums
    assert runs["triton"][1] == runs["ref"][1]
    torch.testing.assert_close(runs["triton"][0], runs["ref"][0], atol=1e-4, rtol=1e-4)
