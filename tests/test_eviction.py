"""Eviction methods (h2o, streaming_llm, snapkv, tova, scissorhands, sirllm) against independent references.

References are plain transformers forwards (eager attention, explicit float 4D masks, `output_attentions=True`)
and simple loops over their attention matrices; budgets and schedules against hand-computed numbers.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F
import yaml

from kvx.config import build_method
from kvx.engine import Engine
from kvx.errors import ConfigError
from kvx.methods.base import ArchInfo
from kvx.methods.common import layer_budgets, score_nbytes
from kvx.methods.full import Full
from kvx.models import ModelConfig, load_model
from kvx.registry import METHODS

from .helpers import CONFIGS

EVICTION = ["h2o", "streaming_llm", "snapkv", "tova", "scissorhands", "sirllm"]


def make(name: str, **fields):
    method = METHODS.get(name)(**fields)
    method.validate()
    return method


def small(name: str, budget=16, **fields):
    """A method with fields that suit short test sequences."""
    extra = {"snapkv": {"window": 4, "kernel_size": 3}, "scissorhands": {"history": 8}}.get(name, {})
    return make(name, budget=budget, **{**extra, **fields})


# plain transformers references -----------------------------------------------------------------------------------
class eager:
    """Switch a model to eager attention for a plain forward (restored on exit)."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.saved = self.model.config._attn_implementation
        self.model.config._attn_implementation = "eager"
        return self.model

    def __exit__(self, *exc):
        self.model.config._attn_implementation = self.saved


def additive(allowed: torch.Tensor) -> torch.Tensor:
    """Boolean mask -> float 4D additive mask (0 where allowed, the most negative float elsewhere)."""
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)


@torch.no_grad()
def forward_with_layer_masks(model, ids, masks):
    """A plain eager forward in which layer l reads with its own boolean mask masks[l] [B, 1 or Hq, T, T]
    (None or missing: causal). Returns the outputs, with every layer's attention probabilities."""
    T = ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool).tril()[None, None]
    hooks = []
    for i, layer in enumerate(model.model.layers):
        m = masks[i] if i < len(masks) and masks[i] is not None else causal
        add = additive(m)

        def pre(mod, args, kwargs, add=add):
            kwargs["attention_mask"] = add
            return args, kwargs

        hooks.append(layer.self_attn.register_forward_pre_hook(pre, with_kwargs=True))
    try:
        with eager(model):
            return model(input_ids=ids, attention_mask=additive(causal), output_attentions=True)
    finally:
        for h in hooks:
            h.remove()


def stream(engine, ids, record=False):
    """Token-by-token forwards through a fresh cache; logits [1, T, V] and, with record, the kept token indices of
    every layer after each step (sets of [Hkv] lists)."""
    cache = engine.new_cache(ids.shape[0], seq_len=ids.shape[1])
    outs, kept = [], []
    for i in range(ids.shape[1]):
        outs.append(engine.forward(cache, ids[:, i : i + 1]))
        if record:
            kept.append([[sorted(h) for h in layer.store.pos[0].tolist()] for layer in cache.layers])
    return torch.cat(outs, dim=1), cache, kept


def sets(store) -> list[list[int]]:
    return [sorted(h) for h in store.pos[0].tolist()]


# configs and validation ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", EVICTION)
def test_yaml_keys_are_the_dataclass_fields(name):
    path = CONFIGS / "method" / f"{name}.yaml"
    text = yaml.safe_load(path.read_text())
    assert list(text)[0] == "name" and text["name"] == name
    assert list(text) == [f.name for f in dataclasses.fields(METHODS.get(name))]
    method = build_method(text)
    assert method.compresses and method.describe() == text


@pytest.mark.parametrize("name", EVICTION)
@pytest.mark.parametrize("field,value", [("budget", 0), ("budget", -3), ("budget", 1.5), ("schedule", "cone"),
                                         ("budget_of", "doc"), ("pyramid_beta", 0.5)])
def test_bad_common_fields_name_the_field(name, field, value):
    with pytest.raises(ConfigError, match=f"method.{field}"):
        build_method({"name": name, field: value})


@pytest.mark.parametrize("values,field", [
    ({"name": "h2o", "budget": 16, "recent": 17}, "method.recent"),
    ({"name": "h2o", "budget": 16, "recent": 1.5}, "method.recent"),
    ({"name": "h2o", "budget": 16, "heavy": 8}, "method.heavy"),
    ({"name": "h2o", "budget": None}, "method.budget"),
    ({"name": "h2o", "budget": None, "heavy": -1, "recent": 8}, "method.heavy"),
    ({"name": "scissorhands", "budget": 16, "recent": 20}, "method.recent"),
    ({"name": "scissorhands", "budget": 16, "history": 0}, "method.history"),
    ({"name": "scissorhands", "budget": 16, "drop": 16}, "method.drop"),
    ({"name": "sirllm", "budget": 16, "recent": 14}, "method.recent"),
    ({"name": "sirllm", "budget": 16, "decay": 0.0}, "method.decay"),
    ({"name": "snapkv", "budget": 16, "window": 16}, "method.window"),
    ({"name": "snapkv", "budget": 16, "kernel_size": 4}, "method.kernel_size"),
    ({"name": "snapkv", "budget": 16, "pooling": "median"}, "method.pooling"),
    ({"name": "streaming_llm", "budget": 16, "sink": 16}, "method.sink"),
])
def test_bad_method_fields_name_the_field(values, field):
    with pytest.raises(ConfigError, match=field):
        build_method(values)


def test_fraction_checked_once_the_length_is_known():
    arch = ArchInfo(2, 4, 2, 8, 512)
    method = make("h2o", budget=0.1, recent=20)  # 20 recent tokens fit 10% of some lengths, not of 100
    assert method.make_policy(0, arch, 400).budget == 40
    with pytest.raises(ConfigError, match="method.recent"):
        method.make_policy(0, arch, 100)


# budgets and schedules -------------------------------------------------------------------------------------------
def test_pyramid_schedule_by_hand():
    # PyramidKV: free part s = 64 - 8 = 56, top layer s/20 = 2.8, bottom 2s - 2.8 = 109.2, linear in between:
    # 109.2, 82.6, 56, 29.4, 2.8 -> largest remainders to integers summing to 5 * 56 = 280: 109, 83, 56, 29, 3
    assert layer_budgets(64, 5, "pyramid", reserved=8, beta=20) == [117, 91, 64, 37, 11]
    assert layer_budgets(64, 5, "uniform", reserved=8) == [64] * 5
    b = layer_budgets(32, 7, "pyramid", reserved=0, beta=20)
    assert sum(b) == 7 * 32 and b == sorted(b, reverse=True) and min(b) >= 1
    assert layer_budgets(10, 6, "pyramid", reserved=0, beta=1000)[-1] >= 1


def test_h2o_five_percent_of_llama2_context():
    """"5% H2O" on Llama-2-7B: 2.5% heavy + 2.5% recent of 4096 positions = 102 + 102 tokens, in both spellings."""
    arch = ArchInfo(32, 32, 32, 128, 4096)
    paper = make("h2o", budget=None, heavy=0.025, recent=0.025, budget_of="max_positions")
    total = make("h2o", budget=0.05, recent=0.5, budget_of="max_positions")
    for method in (paper, total):
        pol = method.make_policy(0, arch, seq_len=1000)  # the sequence length does not matter here
        assert (pol.budget, pol.recent) == (204, 102)
    pol = make("h2o", budget=0.1, recent=0.25).make_policy(3, arch, seq_len=1000)  # fraction of the sequence
    assert (pol.budget, pol.recent) == (100, 25)


@pytest.mark.parametrize("name", EVICTION)
def test_pyramid_budgets_sum_to_the_uniform_total(name):
    arch = ArchInfo(5, 8, 4, 8, 512)
    method = small(name, budget=32, schedule="pyramid")
    got = [method.make_policy(i, arch, 400).budget for i in range(5)]
    assert sum(got) == 5 * 32 and got[0] > got[-1]


# real memory -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", EVICTION)
@pytest.mark.parametrize("chunk", [None, 16])
def test_store_holds_only_the_budget(stories, tiny_ids, name, chunk):
    model, tok = stories
    budget = 24
    eng = Engine(model, tok, small(name, budget=budget))
    a = eng.arch
    ids = torch.tensor([tiny_ids[:150]])
    cache = eng.new_cache(1, seq_len=150)
    eng.prefill(cache, ids, chunk_size=chunk)
    per_token = a.n_kv_heads * 2 * a.head_dim * a.dtype_bytes  # one token of one layer: K and V of every KV head
    for layer in cache.layers:
        assert layer.store.k.shape == (1, a.n_kv_heads, budget, a.head_dim)  # per KV head, never repeated for GQA
    assert cache.nbytes() == pytest.approx(a.n_layers * budget * per_token, rel=0.02)
    if chunk:  # no query read more than the budget, so the peak is the budget too
        assert cache.peak_bytes == pytest.approx(a.n_layers * budget * per_token, rel=0.02)
    # the score buffers are reported apart from the payload
    scores = score_nbytes(cache)
    assert (scores > 0) == (name not in ("streaming_llm",))
    assert cache.nbytes() == sum(layer.store.k.numel() * 4 * 2 for layer in cache.layers)


@pytest.mark.parametrize("name", EVICTION)
def test_score_window_peak_is_the_budget(stories, tiny_ids, name):
    model, tok = stories
    eng = Engine(model, tok, small(name, budget=32))
    a = eng.arch
    _, stats = eng.score_window(torch.tensor([tiny_ids[:121]]), mode="stream")
    assert stats["cache_bytes_peak"] == pytest.approx(a.n_layers * 32 * a.n_kv_heads * 2 * a.head_dim * 4, rel=0.02)


# both phases: decode within budget; a budget covering everything equals full ---------------------------------------
@pytest.mark.parametrize("name", EVICTION)
def test_decode_stays_within_budget(stories, tiny_ids, name):
    model, tok = stories
    eng = Engine(model, tok, small(name, budget=20))
    ids = torch.tensor([tiny_ids[:50]])
    sizes = []

    def check(cache):
        for layer in cache.layers:
            assert layer.store.n <= layer.policy.budget
        sizes.append(cache.lengths())

    out = eng.generate(ids, max_new_tokens=30, eos_token_id=[], on_step=check, chunk_size=5)
    assert len(sizes) == 30 and all(s == [20] * 5 for s in sizes)
    assert len(out.tokens[0]) == 30


@pytest.mark.parametrize("name", EVICTION)
def test_budget_covering_the_sequence_equals_full(stories, tiny_ids, name):
    model, tok = stories
    ids = torch.tensor([tiny_ids[:60]])
    full = Engine(model, tok, Full())
    eng = Engine(model, tok, small(name, budget=80))
    ref = full.generate(ids, max_new_tokens=12, eos_token_id=[])
    got = eng.generate(ids, max_new_tokens=12, eos_token_id=[])
    assert got.tokens == ref.tokens
    for chunk in (None, 7):
        c_full, c_eng = full.new_cache(1, seq_len=72), eng.new_cache(1, seq_len=72)
        lf = full.prefill(c_full, ids, chunk_size=chunk)
        le = eng.prefill(c_eng, ids, chunk_size=chunk)
        assert torch.equal(le, lf)
        for tok_id in ids[0, :5]:
            assert torch.equal(eng.forward(c_eng, tok_id.view(1, 1)), full.forward(c_full, tok_id.view(1, 1)))
    if eng.method.has_mask_form:
        assert torch.equal(eng.score_window(ids, mode="masked")[0], full.score_window(ids, mode="masked")[0])
    # with the length unknown the policy runs, keeping scores, and never evicts: the same logits (exactly, unless
    # the method reads attention probabilities, which go through the explicit softmax instead of SDPA)
    c_full, c_eng = full.new_cache(1), eng.new_cache(1)
    lf, le = full.prefill(c_full, ids, chunk_size=9), eng.prefill(c_eng, ids, chunk_size=9)
    assert c_eng.lengths() == [60] * eng.arch.n_layers
    if c_eng.layers[0].policy.needs_probs:
        torch.testing.assert_close(le, lf, atol=1e-4, rtol=0)
    else:
        assert torch.equal(le, lf)


# stream versus masked --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["streaming_llm", "h2o", "tova", "snapkv", "scissorhands"])
def test_stream_and_masked_agree(stories, tiny_ids, name):
    model, tok = stories
    eng = Engine(model, tok, small(name, budget=32))
    ids = torch.tensor([tiny_ids[:201]])
    ns, _ = eng.score_window(ids, mode="stream")
    nm, _ = eng.score_window(ids, mode="masked")
    gap = (ns - nm).abs()
    # the same policy code runs in both; the only difference is float summation order, which could in principle
    # flip a near-tie between scores: measured max |gap| ~1e-5 on this window for every method
    assert float(gap.max()) < 1e-4, f"{name}: stream/masked nll gap {float(gap.max()):.3g}"


def test_masked_mode_refused_without_mask_form(stories):
    model, tok = stories
    for method in (make("sirllm", budget=16), make("streaming_llm", budget=16, reindex=True)):
        with pytest.raises(ConfigError, match="task.mode"):
            Engine(model, tok, method).new_cache(1, seq_len=10, mode="masked")


# StreamingLLM --------------------------------------------------------------------------------------------------------
def test_streaming_llm_equals_explicit_sink_recent_mask(stories, tiny_ids):
    model, tok = stories
    T, budget, sink = 120, 24, 4
    ids = torch.tensor([tiny_ids[:T]])
    i = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    allowed = (j <= i) & ((j < sink) | (j > i - (budget - sink)))
    with torch.no_grad(), eager(model):
        ref = model(input_ids=ids, attention_mask=additive(allowed[None, None])).logits.float()
    eng = Engine(model, tok, make("streaming_llm", budget=budget, sink=sink))
    got, cache, _ = stream(eng, ids)
    # token-by-token forwards reorder float sums against one parallel forward (~4e-5 here, as for the full cache)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    masked = eng.new_cache(1, seq_len=T, mode="masked")
    torch.testing.assert_close(eng.forward(masked, ids), ref, atol=1e-4, rtol=0)
    assert sets(cache.layers[0].store)[0] == list(range(sink)) + list(range(T - budget + sink, T))


def test_rerotate_equals_rope_at_the_new_position(stories):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from kvx.rope import find_rotary_embedding, rerotate

    model, _ = stories
    rot = find_rotary_embedding(model)
    g = torch.Generator().manual_seed(0)
    k = torch.randn(2, 4, 10, 8, generator=g)
    p = torch.randint(0, 300, (2, 10), generator=g)
    d = torch.randint(-200, 200, (2, 4, 10), generator=g)
    d = torch.maximum(d, -p[:, None])
    cos, sin = rot(k, p)
    _, k_at_p = apply_rotary_pos_emb(k, k, cos, sin)
    got = rerotate(k_at_p, d, rot)
    for h in range(4):
        cos, sin = rot(k, p + d[:, h])
        _, want = apply_rotary_pos_emb(k[:, h : h + 1], k[:, h : h + 1], cos, sin)
        torch.testing.assert_close(got[:, h : h + 1], want, atol=2e-5, rtol=0)


def test_streaming_llm_reindex_equals_hf_cache_at_in_cache_positions(stories, tiny_ids):
    """After a one-shot prefill of T tokens and one more token, the cache holds sink + recent tokens re-rotated to
    0..n-1, and the next token at position n gives the logits of a plain transformers forward over a DynamicCache
    holding exactly those tokens' keys (RoPE at their in-cache positions) and values."""
    from transformers import DynamicCache
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model, tok = stories
    T, budget, sink = 90, 24, 4
    ids = torch.tensor([tiny_ids[: T + 1]])
    eng = Engine(model, tok, make("streaming_llm", budget=budget, sink=sink, reindex=True))
    cache = eng.new_cache(1, seq_len=T + 1)
    eng.prefill(cache, ids[:, :T])
    got = eng.forward(cache, ids[:, T:])[0, -1]
    kept = list(range(sink)) + list(range(T - (budget - 1 - sink), T))  # budget - 1 kept + the new token
    assert sets(cache.layers[0].store)[0] == kept + [T]
    assert cache.layers[0].store.rpos[0, 0, :-1].tolist() == list(range(budget - 1))
    assert int(cache.seen - cache.rope_offset) == budget  # the next token continues at position n

    # pre-RoPE keys and values of every layer from a plain full forward over the T tokens
    raw = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        hooks.append(attn.k_proj.register_forward_hook(lambda m, a, o, i=i: raw.__setitem__(("k", i), o)))
        hooks.append(attn.v_proj.register_forward_hook(lambda m, a, o, i=i: raw.__setitem__(("v", i), o)))
    with torch.no_grad():
        model(input_ids=ids[:, :T])
    for h in hooks:
        h.remove()
    a = eng.arch
    dc = DynamicCache(config=model.config)
    new_pos = torch.arange(budget - 1)[None]
    cos, sin = model.model.rotary_emb(torch.zeros(1), new_pos)
    for i in range(a.n_layers):
        k = raw[("k", i)].view(1, T, a.n_kv_heads, a.head_dim).transpose(1, 2)[:, :, kept]
        v = raw[("v", i)].view(1, T, a.n_kv_heads, a.head_dim).transpose(1, 2)[:, :, kept]
        _, k = apply_rotary_pos_emb(k, k, cos, sin)
        torch.testing.assert_close(cache.layers[i].store.keys()[:, :, : budget - 1], k, atol=2e-5, rtol=0)
        dc.update(k, v, i)
    with torch.no_grad():
        ref = model(input_ids=ids[:, T:], position_ids=torch.tensor([[budget - 1]]), cache=dc).logits[0, -1].float()
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


def test_streaming_llm_reindex_streams_past_the_context(stories, tiny_ids):
    model, tok = stories
    eng = Engine(model, tok, make("streaming_llm", budget=64, sink=4, reindex=True))
    ids = torch.tensor([tiny_ids[:460]])
    nxt = []  # the rotary position the next token gets
    out = eng.generate(ids, max_new_tokens=80, eos_token_id=[], chunk_size=100,
                       on_step=lambda c: nxt.append(int((c.seen - c.rope_offset).max())))
    assert len(out.tokens[0]) == 80  # 540 tokens > the model's 512 positions
    assert max(nxt) <= 64
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        Engine(model, tok, Full()).generate(ids, max_new_tokens=80, eos_token_id=[])


# H2O -----------------------------------------------------------------------------------------------------------------
def h2o_reference(model, ids, budget, recent, n_kv):
    """H2O by hand: layer by layer, each layer's attention from a plain forward in which the layers below read with
    the reference masks found so far; scores accumulate only over the keys each query actually read."""
    T = ids.shape[1]
    masks, kept = [], []
    for layer_idx in range(len(model.model.layers)):
        att = forward_with_layer_masks(model, ids, masks).attentions[layer_idx][0].double()  # [Hq, T, T], causal
        Hq = att.shape[0]
        g = Hq // n_kv
        mask = torch.zeros(1, Hq, T, T, dtype=torch.bool)
        finals = []
        for h in range(n_kv):
            held, score = [], defaultdict(float)
            for i in range(T):
                if len(held) + 1 > budget:  # make room for token i: keep the recent ones, then the heaviest
                    m = budget - 1
                    rec = sorted(held, reverse=True)[: min(recent, m)]
                    rest = sorted((j for j in held if j not in rec), key=lambda j: -score[j])[: m - len(rec)]
                    held = sorted(rec + rest)
                read = held + [i]
                for qh in range(h * g, (h + 1) * g):
                    p = att[qh, i, read] / att[qh, i, read].sum()  # the softmax over what was read
                    for j, pj in zip(read, p.tolist()):
                        score[j] += pj
                    mask[0, qh, i, read] = True
                held = read
            finals.append(held)
        masks.append(mask)
        kept.append(finals)
    return kept, masks


@pytest.mark.parametrize("which", ["stories", "random_gqa"])
def test_h2o_kept_set_equals_hand_recomputation(request, tiny_ids, which):
    model, tok = request.getfixturevalue(which)
    T, budget, recent = 40, 12, 4
    ids = torch.tensor([tiny_ids[:T]])
    eng = Engine(model, tok, make("h2o", budget=budget, recent=recent))
    got, cache, _ = stream(eng, ids)
    kept, masks = h2o_reference(model, ids, budget, recent, eng.arch.n_kv_heads)
    for layer, want in zip(cache.layers, kept):
        assert sets(layer.store) == want
    ref = forward_with_layer_masks(model, ids, masks).logits.float()
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    if which == "stories":  # different KV heads keep different tokens (per-head selection)
        assert any(len({tuple(h) for h in layer}) > 1 for layer in kept)


def test_h2o_one_shot_prefill_keeps_recent_and_heaviest(stories, tiny_ids):
    """A one-shot prefill attends in full, then keeps the recent tokens + the heaviest by accumulated causal
    attention (summed over the query heads of each KV head's group)."""
    model, tok = stories
    T, budget, recent = 100, 30, 10
    ids = torch.tensor([tiny_ids[:T]])
    eng = Engine(model, tok, make("h2o", budget=budget, recent=recent))
    cache = eng.new_cache(1, seq_len=T)
    eng.prefill(cache, ids)
    att = forward_with_layer_masks(model, ids, []).attentions
    g = eng.arch.group
    for layer, a in zip(cache.layers, att):
        acc = a[0].sum(dim=1)  # [Hq, T]: attention received over all queries
        acc = acc.view(-1, g, T).sum(dim=1)  # [Hkv, T]
        for h, got in enumerate(sets(layer.store)):
            heavy = acc[h, : T - recent].topk(budget - recent).indices.tolist()
            assert got == sorted(heavy + list(range(T - recent, T)))


# SnapKV ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pooling", ["avg", "max"])
def test_snapkv_kept_indices_equal_direct_computation(stories, tiny_ids, pooling):
    model, tok = stories
    T, budget, window, kernel = 120, 32, 8, 5
    ids = torch.tensor([tiny_ids[:T]])
    eng = Engine(model, tok, make("snapkv", budget=budget, window=window, kernel_size=kernel, pooling=pooling))
    cache = eng.new_cache(1, seq_len=T)
    eng.prefill(cache, ids)
    att = forward_with_layer_masks(model, ids, []).attentions
    g = eng.arch.group
    for layer, a in zip(cache.layers, att):
        vote = a[0, :, T - window :, : T - window].sum(dim=1)  # [Hq, T - w]: the window's attention to the prefix
        vote = vote.view(-1, g, T - window).sum(dim=1)  # [Hkv, T - w]
        pool = F.avg_pool1d if pooling == "avg" else F.max_pool1d
        pooled = pool(vote[:, None], kernel, stride=1, padding=kernel // 2)[:, 0]
        for h, got in enumerate(sets(layer.store)):
            assert got[-window:] == list(range(T - window, T))
            chosen = got[:-window]
            want = sorted(pooled[h].topk(budget - window).indices.tolist())
            if pooling == "avg":
                assert chosen == want
            else:  # max pooling makes ties between neighbours: any top-k set is right
                dropped = sorted(set(range(T - window)) - set(chosen))
                assert float(pooled[h, chosen].min()) >= float(pooled[h, dropped].max()) - 1e-6


def test_snapkv_decode_reselects_with_the_window_queries(stories, tiny_ids):
    """Once full, each decoding step evicts the held token (outside the window) that the last `window` queries vote
    for least, their attention renormalised over what is held now (no pooling here: kernel_size 1)."""
    model, tok = stories
    T, budget, window = 50, 16, 4
    ids = torch.tensor([tiny_ids[:T]])
    eng = Engine(model, tok, make("snapkv", budget=budget, window=window, kernel_size=1))
    got, cache, kept = stream(eng, ids, record=True)
    L, Hkv, g = eng.arch.n_layers, eng.arch.n_kv_heads, eng.arch.group
    masks = []
    for layer_idx in range(L):
        m = torch.zeros(1, Hkv * g, T, T, dtype=torch.bool)
        for i in range(T):
            for h, row in enumerate(kept[i][layer_idx]):
                m[0, h * g : (h + 1) * g, i, row] = True
        masks.append(m)
    out = forward_with_layer_masks(model, ids, masks)
    torch.testing.assert_close(got, out.logits.float(), atol=1e-4, rtol=0)
    checked = 0
    for layer_idx in range(L):
        att = out.attentions[layer_idx][0].double()  # [Hq, T, T]: each query over what it read
        for i in range(budget, T):
            for h in range(Hkv):
                held = [j for j in kept[i - 1][layer_idx][h]]  # before step i: what query i - 1 read
                evicted = sorted(set(held) - set(kept[i][layer_idx][h]))
                assert len(evicted) == 1
                vote = defaultdict(float)
                for r in range(i - window, i):
                    now = [j for j in held if j <= r]  # every held token up to r was read by r
                    for qh in range(h * g, (h + 1) * g):
                        p = att[qh, r, now] / att[qh, r, now].sum()
                        for j, pj in zip(now, p.tolist()):
                            vote[j] += pj
                outside = [j for j in held if j < i - window]
                assert evicted[0] == min(outside, key=lambda j: vote[j])
                checked += 1
    assert checked == L * Hkv * (T - budget)


# TOVA ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["stories", "random_gqa"])
def test_tova_evicts_the_argmin_of_head_averaged_attention(request, tiny_ids, which):
    model, tok = request.getfixturevalue(which)
    T, budget = 40, 10
    ids = torch.tensor([tiny_ids[:T]])
    eng = Engine(model, tok, make("tova", budget=budget))
    got, cache, kept = stream(eng, ids, record=True)
    L = eng.arch.n_layers
    masks = []
    for layer_idx in range(L):
        m = torch.zeros(1, 1, T, T, dtype=torch.bool)
        for i in range(T):
            heads = kept[i][layer_idx]
            assert all(h == heads[0] for h in heads)  # the same set for every head of the layer
            m[0, 0, i, heads[0]] = True  # what query i read: the kept set after step i (itself included)
        masks.append(m)
    out = forward_with_layer_masks(model, ids, masks)
    torch.testing.assert_close(got, out.logits.float(), atol=1e-4, rtol=0)
    checked = 0
    for layer_idx in range(L):
        att = out.attentions[layer_idx][0]  # [Hq, T, T]
        for i in range(budget, T):
            before, after = kept[i - 1][layer_idx][0], kept[i][layer_idx][0]
            evicted = sorted(set(before) - set(after))
            assert len(evicted) == 1
            avg = att[:, i - 1, before].mean(dim=0)  # the previous query's attention over what it read
            assert before[int(avg.argmin())] == evicted[0]
            checked += 1
    assert checked == L * (T - budget)


# Scissorhands ----------------------------------------------------------------------------------------------------
def test_scissorhands_one_shot_counts_persistence(stories, tiny_ids):
    """After a one-shot prefill: per KV head, count over the last `history` queries and the query heads of the group
    how often each token got more than 1/n of a query's attention (n = tokens it read); keep recent + most counted
    (ties: the newer token)."""
    model, tok = stories
    T, budget, recent, history = 80, 24, 6, 16
    ids = torch.tensor([tiny_ids[:T]])
    eng = Engine(model, tok, make("scissorhands", budget=budget, recent=recent, history=history))
    cache = eng.new_cache(1, seq_len=T)
    eng.prefill(cache, ids)
    att = forward_with_layer_masks(model, ids, []).attentions
    g = eng.arch.group
    for layer, a in zip(cache.layers, att):
        for h, got in enumerate(sets(layer.store)):
            count = defaultdict(int)
            for i in range(T - history, T):
                for qh in range(h * g, (h + 1) * g):
                    for j in range(i + 1):
                        count[j] += int(float(a[0, qh, i, j]) > 1.0 / (i + 1))
            rest = sorted(range(T - recent), key=lambda j: (-count[j], -j))[: budget - recent]
            assert got == sorted(rest + list(range(T - recent, T)))


# SirLLM ----------------------------------------------------------------------------------------------------------
def test_sirllm_keeps_sinks_recent_and_highest_token_nll(stories, tiny_ids):
    model, tok = stories
    T, budget, sink, recent = 100, 30, 4, 6
    ids = torch.tensor([tiny_ids[:T]])
    eng = Engine(model, tok, make("sirllm", budget=budget, sink=sink, recent=recent))
    cache = eng.new_cache(1, seq_len=T)
    eng.prefill(cache, ids)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    nll = F.cross_entropy(logits[:-1], ids[0, 1:], reduction="none")  # -log p(token j | prefix), j >= 1
    cand = list(range(sink, T - recent))
    top = sorted(cand, key=lambda j: -float(nll[j - 1]))[: budget - sink - recent]
    want = sorted(list(range(sink)) + top + list(range(T - recent, T)))
    for layer in cache.layers:
        assert all(h == want for h in sets(layer.store))  # one token-level score: the same set everywhere


def test_sirllm_decay_fades_old_scores(stories, tiny_ids):
    model, tok = stories
    ids = torch.tensor([tiny_ids[:60]])
    eng = Engine(model, tok, make("sirllm", budget=20, sink=2, recent=4, decay=0.5))
    cache = eng.new_cache(1, seq_len=60)
    eng.prefill(cache, ids[:, :30])
    pol, store = cache.layers[0].policy, cache.layers[0].store
    before = dict(zip(store.pos[0, 0].tolist(), pol.scores[0, 0].tolist()))
    eng.forward(cache, ids[:, 30:31])
    after = dict(zip(store.pos[0, 0].tolist(), pol.scores[0, 0].tolist()))
    assert len(after) == 20 and 30 in after
    for p, s in after.items():
        if p != 30:
            assert s == pytest.approx(before[p] * 0.5)


# scores only when declared -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", EVICTION)
def test_probabilities_only_when_declared_and_never_t_by_t_in_decode(stories, tiny_ids, name, monkeypatch):
    from kvx.cache.dense import DenseStore

    model, tok = stories
    method = small(name, budget=16)
    eng = Engine(model, tok, method)
    calls = []
    real_attend = DenseStore.attend

    def spy(self, q, k_new, v_new, pos_new, qpos, scaling, return_probs=False, probs_fn=None, sums_fn=None):
        shapes = []
        if probs_fn is not None:  # probabilities handed over block by block by the attention pass itself

            def fn(p, row0, inner=probs_fn):
                shapes.append(tuple(p.shape))
                inner(p, row0)
        else:
            fn = None
        out, probs = real_attend(self, q, k_new, v_new, pos_new, qpos, scaling, return_probs, probs_fn=fn,
                                 sums_fn=sums_fn)
        if probs is not None:
            shapes.append(tuple(probs.shape))
        calls.append((q.shape[2], return_probs or probs_fn is not None, shapes[0] if shapes else None))
        return out, probs

    monkeypatch.setattr(DenseStore, "attend", spy)
    ids = torch.tensor([tiny_ids[:40]])
    eng.generate(ids, max_new_tokens=10, eos_token_id=[])
    needs = type(method.make_policy(0, eng.arch, None)).needs_probs
    assert needs == (name in ("h2o", "tova", "scissorhands"))
    decode = [c for c in calls if c[0] == 1]
    assert len(decode) == 10 * eng.arch.n_layers
    for _, asked, shape in calls:
        assert asked == needs
        assert (shape is not None) == needs
    for _, _, shape in decode:
        assert shape is None or shape[2] == 1 and shape[3] <= 16  # one query over at most the budget


# optimised paths against their references ---------------------------------------------------------------------------
SCORED = ["h2o", "tova", "scissorhands", "sirllm", "streaming_llm"]


@pytest.mark.parametrize("name", SCORED)
def test_evict_by_move_keeps_the_same_sets_and_bytes(stories, tiny_ids, name):
    """evict_by: move (kept tail slots fill the freed ones) keeps what evict_by: keep keeps, step by step, with the
    same bytes; the logits differ only by the order of float sums over the slots; stream equals masked under it."""
    model, tok = stories
    ids = torch.tensor([tiny_ids[:70]])
    runs = {}
    for how in ("keep", "move"):
        eng = Engine(model, tok, small(name, budget=16, evict_by=how))
        got, cache, kept = stream(eng, ids, record=True)
        runs[how] = (got, kept, cache.nbytes(), eng)
    assert runs["move"][1] == runs["keep"][1]  # kept sets after every step, every layer and head
    assert runs["move"][2] == runs["keep"][2]
    torch.testing.assert_close(runs["move"][0], runs["keep"][0], atol=1e-4, rtol=0)
    eng = runs["move"][3]
    if eng.method.has_mask_form:
        ns, _ = eng.score_window(ids, mode="stream")
        nm, _ = eng.score_window(ids, mode="masked")
        assert float((ns - nm).abs().max()) < 1e-4


def test_move_slots_moves_only_the_evicted_slots():
    """swap_moves + move_slots against an explicit reference: each dropped slot below n - k receives a kept tail slot;
    every other slot stays where it was."""
    from kvx.cache.dense import DenseStore, swap_moves

    B, H, n, D = 2, 3, 12, 4
    k = torch.randn(B, H, n, D)
    pos = torch.arange(n, dtype=torch.int32).expand(B, H, n).contiguous()
    st = DenseStore(capacity=n)
    st.append(k, k.clone(), pos)
    g = torch.Generator().manual_seed(0)
    drop = torch.stack([torch.stack([torch.randperm(n, generator=g)[:4] for _ in range(H)]) for _ in range(B)])
    dst, src = swap_moves(drop, n)
    st.move_slots(dst, src, n - 4)
    for b in range(B):
        for h in range(H):
            d = set(drop[b, h].tolist())
            tail_kept = [s for s in range(n - 4, n) if s not in d]
            holes = sorted(s for s in d if s < n - 4)
            want = list(range(n - 4))
            for hole, s in zip(holes, tail_kept):
                want[hole] = s
            assert st.pos[b, h].tolist() == want
            torch.testing.assert_close(st.k[b, h], k[b, h, want])
    assert st.nbytes() == 2 * n * D * B * H * 4  # the capacity stays allocated


def test_buffers_are_reserved_once_and_bytes_match_the_promise(stories, tiny_ids):
    """Decoding writes in place: the store's buffers and the score buffer keep their storage from step to step, and
    the bytes held are the budget's (a full cache's: its sequence length)."""
    model, tok = stories
    a_budget = 20
    eng = Engine(model, tok, small("h2o", budget=a_budget))
    a = eng.arch
    per_token = a.n_kv_heads * 2 * a.head_dim * a.dtype_bytes
    ids = torch.tensor([tiny_ids[:40]])
    cache = eng.new_cache(1, seq_len=60)
    eng.prefill(cache, ids, chunk_size=8)
    layer = cache.layers[0]
    ptrs = (layer.store.k.data_ptr(), layer.store.v.data_ptr(), layer.policy.scores.data_ptr())
    tok_id = cache.last_logits.argmax(-1)
    for _ in range(12):
        tok_id = eng.forward(cache, tok_id[:, None])[:, -1].argmax(-1)
        assert (layer.store.k.data_ptr(), layer.store.v.data_ptr(), layer.policy.scores.data_ptr()) == ptrs
    assert cache.nbytes() == a.n_layers * a_budget * per_token
    full = Engine(model, tok, Full())
    c = full.new_cache(1, seq_len=60)
    full.prefill(c, ids)
    assert c.nbytes() == a.n_layers * 60 * per_token  # reserved for the sequence it was built for


@pytest.mark.parametrize("name", ["h2o", "tova", "scissorhands"])
def test_prefill_probabilities_in_blocks_equal_one_block(stories, tiny_ids, name, monkeypatch):
    """A one-shot prefill longer than the budget: the attention pass hands the probabilities over in blocks of a few
    queries (never T x T at once), and the kept sets and logits equal those of a single block."""
    from kvx.kernels import reference
    from kvx.methods.common import AttentionPolicy

    model, tok = stories
    ids = torch.tensor([tiny_ids[:90]])
    T = ids.shape[1]
    real = AttentionPolicy.probs_block
    runs = []
    for limit in (1 << 40, 8 * 4 * T):  # one block; blocks of 4 queries (8 heads x 4 rows x T slots)
        shapes = []

        def spy(self, probs, row0, shapes=shapes):
            shapes.append(tuple(probs.shape))
            real(self, probs, row0)

        monkeypatch.setattr(reference, "BLOCK_ELEMENTS", limit)
        monkeypatch.setattr(AttentionPolicy, "probs_block", spy)
        eng = Engine(model, tok, small(name, budget=24))
        cache = eng.new_cache(1, seq_len=T)
        logits = eng.prefill(cache, ids)
        runs.append((logits, [sets(layer.store) for layer in cache.layers], shapes))
    (l1, s1, sh1), (l4, s4, sh4) = runs
    assert max(s[2] for s in sh1) == T and max(s[2] for s in sh4) == 4
    assert s4 == s1
    torch.testing.assert_close(l4, l1, atol=1e-5, rtol=0)


def test_tova_keep_newest(stories, tiny_ids):
    """keep_newest: true never drops the token just appended; false (the paper's rule) lets it compete, and on this
    text it is dropped at least once."""
    model, tok = stories
    ids = torch.tensor([tiny_ids[:120]])
    dropped = {}
    for keep in (True, False):
        eng = Engine(model, tok, make("tova", budget=6, keep_newest=keep))
        _, _, kept = stream(eng, ids, record=True)
        dropped[keep] = sum(1 for i in range(1, len(kept)) for layer in kept[i] if i - 1 not in layer[0])
    assert dropped[True] == 0
    assert dropped[False] > 0


def test_rpos_is_the_rotary_position_in_use(stories, tiny_ids):
    """With StreamingLLM's in-cache positions, every slot's rpos is the position its key was rotated with: the slots
    appended since the last compaction hold token index minus the rotary offset, not the token index."""
    model, tok = stories
    eng = Engine(model, tok, make("streaming_llm", budget=12, sink=2, reindex=True))
    ids = torch.tensor([tiny_ids[:40]])
    cache = eng.new_cache(1, seq_len=40)
    eng.prefill(cache, ids[:, :30])
    eng.forward(cache, ids[:, 30:33])  # three new tokens after a compaction
    for layer in cache.layers:
        rpos = layer.store.rpos[0, 0].tolist()
        assert rpos == list(range(len(rpos)))  # in-cache positions 0 .. n-1, the three new ones included
        assert layer.store.pos[0, 0, -3:].tolist() == [30, 31, 32]


def test_streaming_llm_closed_mask_equals_the_step_by_step_policy(stories, tiny_ids, monkeypatch):
    """Masked mode takes StreamingLLM's mask in closed form; running the policy step by step gives the same logits."""
    from kvx.methods.streaming_llm import SinkRecentPolicy

    model, tok = stories
    ids = torch.tensor([tiny_ids[:100]])
    eng = Engine(model, tok, make("streaming_llm", budget=20, sink=3))
    fast, stats = eng.score_window(ids, mode="masked")
    monkeypatch.delattr(SinkRecentPolicy, "closed_mask")
    slow, stats_slow = eng.score_window(ids, mode="masked")
    assert torch.equal(fast, slow)
    assert stats["cache_bytes_peak"] == stats_slow["cache_bytes_peak"]


def test_select_drop_is_the_complement_of_select():
    """A policy that only writes `select` drops exactly the slots it does not keep (ScoredPolicy's select_drop), and a
    RankedPolicy drops its lowest priorities."""
    from types import SimpleNamespace

    from kvx.methods.base import RankedPolicy, ScoredPolicy

    keep = torch.tensor([[[0, 3, 4], [1, 2, 5]]])  # [B=1, Hkv=2, m=3]

    class Fixed(ScoredPolicy):
        def select(self, store, m):
            return keep[..., :m]

    class ByPos(RankedPolicy):
        def priority(self, store, m):
            return -store.pos.double()  # the oldest first

    store = SimpleNamespace(n=6, pos=torch.arange(6).expand(1, 2, 6))
    assert Fixed(4).select_drop(store, 3).tolist() == [[[1, 2, 5], [0, 3, 4]]]
    assert sorted(ByPos(4).select_drop(store, 2)[0, 0].tolist()) == [4, 5]
    assert ByPos(4).select(store, 2)[0, 1].sort().values.tolist() == [0, 1]
    with pytest.raises(TypeError):  # neither select nor priority: not a policy
        type("Nothing", (ScoredPolicy,), {})(4)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_streaming_llm_reindex_rounds_each_key_once(dtype):
    """With reindex every kept key but the sinks moves one rotary position per decoded token, up to budget - sink
    times. After 420 tokens at budget 200 (220 moves) the held keys, read at their in-cache positions, are within a few roundings of the model's pre-RoPE key rotated once
    (in fp32) to that position: moving on read (MovableStore) does not round once per step."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from kvx.cache.rotated import MovableStore

    model, tok = load_model(ModelConfig(random=True, hidden_size=256, num_layers=1, num_heads=2, num_kv_heads=2,
                                        intermediate_size=128, vocab_size=64, max_position_embeddings=512, seed=0,
                                        dtype=dtype))
    eng = Engine(model, tok, make("streaming_llm", budget=200, sink=2, reindex=True))
    pre = []  # pre-RoPE keys of each token, as the model produced them
    hook = model.model.layers[0].self_attn.k_proj.register_forward_hook(lambda m, a, o: pre.append(o))
    cache = eng.new_cache(1)
    ids = torch.randint(1, 64, (1, 420), generator=torch.Generator().manual_seed(0))  # 0: padding, a zero key
    for i in range(ids.shape[1]):
        eng.forward(cache, ids[:, i : i + 1])
    hook.remove()
    store = cache.layers[0].store
    assert isinstance(store, MovableStore)
    a = eng.arch
    raw = torch.cat(pre, dim=1).view(1, -1, a.n_kv_heads, a.head_dim).transpose(1, 2)  # [1, H, T, D]
    tok_idx = store.pos.long()  # [1, H, n] token index of each slot
    k = raw.gather(2, tok_idx[..., None].expand(*tok_idx.shape, a.head_dim)).float()
    cos, sin = model.model.rotary_emb(k, store.rpos.long()[0, :1])  # [1, n, D] at the in-cache positions
    want, _ = apply_rotary_pos_emb(k, k, cos.float(), sin.float())

    def rel(x):
        return float(((x.float() - want).norm(dim=-1) / want.norm(dim=-1)).mean())

    once = rel(want.to(store.k.dtype))
    assert rel(store.keys()) <= 4 * once
