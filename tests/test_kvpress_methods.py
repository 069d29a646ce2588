"""Knorm, ObservedAttention and AdaKV against from-scratch computations of their kept sets (kvpress's definitions:
KnormPress scores -||k||, ObservedAttentionPress divides summed attention by the queries that saw each token,
AdaKVPress shares a layer's budget among its heads after a per-head safeguard)."""

import pytest
import torch
from transformers import DynamicCache

from kvx.engine import Engine
from kvx.errors import ConfigError
from kvx.methods.adakv import AdaKV
from kvx.methods.h2o import H2O
from kvx.methods.knorm import Knorm
from kvx.methods.observed_attention import ObservedAttention


def plain_keys(model, ids):
    """Post-RoPE keys of every layer from a plain transformers forward: [Hkv, T, D] each."""
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids, cache=cache, use_cache=True)
    return [layer.keys[0].float() for layer in cache.layers]


def kept_sets(cache):
    """Per layer and KV head, the set of real token indices held."""
    return [[set(p for p in row.tolist() if p >= 0) for row in layer.store.pos[0]] for layer in cache.layers]


def one_shot(model, tok, method, ids):
    """Prefill ids in one forward (longer than the budget: the method selects once, at the end of the step)."""
    eng = Engine(model, tok, method)
    cache = eng.new_cache(1, ids.shape[1])
    eng.prefill(cache, ids)
    return eng, cache


@pytest.fixture(scope="module")
def distinct_ids():
    g = torch.Generator().manual_seed(0)
    return torch.randperm(500, generator=g)[:48][None] + 3  # no token twice: no two keys of equal norm


def test_knorm_keeps_lowest_key_norms(random_gqa, distinct_ids):
    model, tok = random_gqa
    b = 12
    _, cache = one_shot(model, tok, Knorm(budget=b), distinct_ids)
    for keys, kept in zip(plain_keys(model, distinct_ids), kept_sets(cache)):
        ref = keys.norm(dim=-1).argsort(dim=-1)[:, :b]  # [Hkv, b] the lowest norms
        assert kept == [set(r.tolist()) for r in ref]


def test_knorm_streaming_matches_a_simulation(random_gqa, distinct_ids):
    """Token by token, layer 0 (its keys do not depend on eviction): before each new token, if the store is full,
    keep the budget - 1 stored tokens of lowest key norm."""
    model, tok = random_gqa
    b = 10
    eng = Engine(model, tok, Knorm(budget=b))
    cache = eng.new_cache(1, distinct_ids.shape[1])
    eng.prefill(cache, distinct_ids, chunk_size=1)
    norms = plain_keys(model, distinct_ids)[0].norm(dim=-1)  # [Hkv, T]
    for h in range(norms.shape[0]):
        held: list[int] = []
        for t in range(distinct_ids.shape[1]):
            if len(held) + 1 > b:
                held = sorted(held, key=lambda i: float(norms[h, i]))[: b - 1]
            held.append(t)
        assert kept_sets(cache)[0][h] == set(held)


def test_observed_attention_equals_kvpress_scores(stories, tiny_ids):
    model, tok = stories
    ids = torch.tensor([tiny_ids[:50]])
    T, b = ids.shape[1], 16
    model.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            attns = model(input_ids=ids, output_attentions=True).attentions  # per layer [1, Hq, T, T]
    finally:
        model.config._attn_implementation = "sdpa"
    _, cache = one_shot(model, tok, ObservedAttention(budget=b), ids)
    _, h2o = one_shot(model, tok, H2O(budget=b, recent=0), ids)
    differs = False
    for attn, kept, plain in zip(attns, kept_sets(cache), kept_sets(h2o)):
        score = attn[0].float().sum(1) / torch.arange(T, 0, -1)  # [Hq, T]: kvpress's n_tokens_in_sum
        score = score.view(4, 2, T).mean(1)  # the query heads of each KV head
        assert kept == [set(r.tolist()) for r in score.topk(b, dim=-1).indices]
        differs |= kept != plain
    assert differs  # dividing by the count changes the choice of plain H2O


def test_observed_attention_masked_equals_stream(stories, tiny_ids):
    model, tok = stories
    eng = Engine(model, tok, ObservedAttention(budget=24, recent=4))
    ids = torch.tensor([tiny_ids[:97]])
    nll_s, st = eng.score_window(ids, mode="stream")
    nll_m, sm = eng.score_window(ids, mode="masked")
    torch.testing.assert_close(nll_s, nll_m, atol=1e-4, rtol=0)


def adakv_reference(scores, b, alpha):
    """kvpress's AdaKVPress selection on scores [Hkv, T]: each head's top int(b * alpha), then the top Hkv * b."""
    H, T = scores.shape
    s = scores.double().clone()
    safe = int(b * alpha)
    if safe:
        s.scatter_(1, s.topk(safe, dim=-1).indices, float("inf"))
    flat = s.reshape(-1).topk(H * b).indices
    return [set((flat[flat // T == h] % T).tolist()) for h in range(H)]


@pytest.mark.parametrize("alpha", [0.0, 0.2, 1.0])
def test_adakv_over_knorm_equals_reference_and_bytes_are_held(random_gqa, distinct_ids, alpha):
    model, tok = random_gqa
    b = 8
    eng, cache = one_shot(model, tok, AdaKV(base={"name": "knorm", "budget": b}, alpha_safeguard=alpha), distinct_ids)
    arch = eng.arch
    expect_bytes = 0
    for layer, keys, kept in zip(cache.layers, plain_keys(model, distinct_ids), kept_sets(cache)):
        assert kept == adakv_reference(-keys.norm(dim=-1), b, alpha)
        counts = [len(k) for k in kept]
        assert sum(counts) == arch.n_kv_heads * b  # the layer's budget, shared
        if alpha == 1.0:
            assert counts == [b] * arch.n_kv_heads  # the safeguard takes the whole budget: plain Knorm
        assert layer.store.n == max(counts)  # padded to the largest head
        expect_bytes += arch.n_kv_heads * max(counts) * 2 * arch.head_dim * 4
    assert cache.nbytes() == expect_bytes


def test_adakv_streams_within_the_layer_budget_and_masked_equals_stream(stories, tiny_ids):
    model, tok = stories
    method = AdaKV(base={"name": "h2o", "budget": 20})
    eng = Engine(model, tok, method)
    ids = torch.tensor([tiny_ids[:81]])
    cache = eng.new_cache(1, 80)
    for i in range(80):
        eng.forward(cache, ids[:, i : i + 1])
        for layer in cache.layers:
            real = (layer.store.pos >= 0).sum(dim=-1)  # [1, Hkv]
            assert int(real.sum()) <= 4 * 20 and layer.store.n == int(real.max())
    heads = [sorted(int(c) for c in (layer.store.pos[0] >= 0).sum(-1)) for layer in cache.layers]
    assert any(h[0] != h[-1] for h in heads)  # the heads of some layer hold different numbers of tokens
    nll_s, _ = eng.score_window(ids, mode="stream")
    nll_m, _ = eng.score_window(ids, mode="masked")
    torch.testing.assert_close(nll_s, nll_m, atol=1e-4, rtol=0)


def test_adakv_full_budget_is_the_full_cache(stories, tiny_ids):
    model, tok = stories
    ids = torch.tensor([tiny_ids[:41]])
    full, _ = Engine(model, tok, H2O(budget=64)).score_window(ids)
    ada, _ = Engine(model, tok, AdaKV(base={"name": "h2o", "budget": 64})).score_window(ids)
    assert torch.equal(full, ada)


def test_adakv_refuses_bad_fields(stories):
    model, tok = stories
    with pytest.raises(ConfigError, match="method.base.name.*per-slot score"):  # positions only: nothing to share
        Engine(model, tok, AdaKV(base={"name": "streaming_llm", "budget": 16})).new_cache(1, 64)
    with pytest.raises(ConfigError, match="method.base.name.*evicts nothing"):
        AdaKV(base={"name": "full"}).validate()
    with pytest.raises(ConfigError, match="method.base.name"):
        AdaKV(base={"name": "adakv", "base": {"name": "h2o"}}).validate()
    with pytest.raises(ConfigError, match="method.alpha_safeguard"):
        AdaKV(base={"name": "h2o"}, alpha_safeguard=2).validate()
