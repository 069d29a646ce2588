"""Property test: no eviction method ever holds or reads more than its budget.

Over random methods, budgets (tokens and fractions), schedules, GQA ratios, batch sizes with left padding, prefill
chunk sizes and decoding lengths, in stream mode (prefill + generate) and masked mode.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvx.engine import Engine
from kvx.models import ModelConfig, load_model
from kvx.registry import METHODS

EVICTION = ["h2o", "streaming_llm", "snapkv", "tova", "scissorhands", "sirllm"]
GQA = [(4, 4), (4, 2), (4, 1), (6, 3), (8, 2)]
_MODELS: dict = {}


def model_for(hq: int, hkv: int):
    if (hq, hkv) not in _MODELS:
        _MODELS[(hq, hkv)] = load_model(ModelConfig(
            random=True, hidden_size=8 * hq, num_layers=2, num_heads=hq, num_kv_heads=hkv, intermediate_size=64,
            vocab_size=128, max_position_embeddings=256, seed=hq * 10 + hkv))
    return _MODELS[(hq, hkv)]


def method_for(name: str, budget, schedule: str, reindex: bool):
    fields = {"budget": budget, "schedule": schedule}
    fields.update({
        "h2o": {"recent": 0.5},
        "streaming_llm": {"sink": 2, "reindex": reindex},
        "snapkv": {"window": 2, "kernel_size": 3},
        "tova": {},
        "scissorhands": {"recent": 0.25, "history": 4, "drop": 0.25},
        "sirllm": {"sink": 1, "recent": 0.25},
    }[name])
    method = METHODS.get(name)(**fields)
    method.validate()
    return method


@st.composite
def cases(draw):
    name = draw(st.sampled_from(EVICTION))
    B = draw(st.integers(1, 3))
    lengths = [draw(st.integers(1, 40)) for _ in range(B)]
    new = draw(st.integers(0, 12))
    total = max(lengths) + new
    if total >= 24 and draw(st.booleans()):
        budget = draw(st.sampled_from([0.4, 0.5, 0.7]))  # a fraction of the sequence: at least 9 tokens here
    else:
        budget = draw(st.integers(3, 24))
    return {
        "name": name, "budget": budget, "schedule": draw(st.sampled_from(["uniform", "pyramid"])),
        "gqa": draw(st.sampled_from(GQA)), "lengths": lengths, "new": new,
        "chunk": draw(st.sampled_from([None, 1, 3, 8])), "reindex": draw(st.booleans()),
        "seed": draw(st.integers(0, 10_000)),
    }


def left_padded(lengths, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(3, vocab, (len(lengths), T), generator=g)
    am = torch.zeros(len(lengths), T, dtype=torch.long)
    for b, n in enumerate(lengths):
        am[b, T - n :] = 1
    return ids, am


def watch_reads(cache, reads):
    """Record, per layer, (tokens read by the widest query, new tokens) of every attend call."""
    for layer in cache.layers:
        real = layer.store.attend

        def attend(q, k_new, v_new, pos_new, qpos, scaling, real=real, layer=layer, **kw):
            reads.append((layer.layer_idx, layer.store.n + q.shape[2], q.shape[2]))
            return real(q, k_new, v_new, pos_new, qpos, scaling, **kw)

        layer.store.attend = attend


@settings(max_examples=100, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=cases())
def test_budget_is_never_exceeded(case):
    model, tok = model_for(*case["gqa"])
    method = method_for(case["name"], case["budget"], case["schedule"], case["reindex"])
    eng = Engine(model, tok, method)
    ids, am = left_padded(case["lengths"], 128, case["seed"])
    B, T = ids.shape
    cache = eng.new_cache(B, seq_len=T + case["new"])
    budgets = [layer.policy.budget for layer in cache.layers]
    reads = []
    watch_reads(cache, reads)

    def check(c):
        for layer, budget in zip(c.layers, budgets):
            assert layer.store.n <= budget
            real = (layer.store.pos >= 0).sum(dim=-1)  # [B, Hkv]
            # padding goes first: a row holds padding only while it has fewer real tokens than slots
            assert bool((real == torch.minimum(c.seen[:, None], torch.full_like(real, layer.store.n))).all())

    if case["new"]:
        eng.generate(ids, am, max_new_tokens=case["new"], chunk_size=case["chunk"], eos_token_id=[], cache=cache,
                     on_step=check)
    else:
        eng.prefill(cache, ids, am, chunk_size=case["chunk"])
    check(cache)
    for layer_idx, n_read, t in reads:
        if t < budgets[layer_idx]:
            assert n_read <= budgets[layer_idx]  # no query reads more than the budget, its own token included

    if method.has_mask_form:
        masked = eng.new_cache(B, seq_len=T, mode="masked")
        eng.forward(masked, ids, am)
        for peak, layer in zip(masked.masked_peak, masked.layers):
            # one query at a time: it reads at most the budget (a budget of 1 still lets it read itself + 1 held)
            assert peak <= max(layer.policy.budget, 2)


@pytest.mark.parametrize("hq,hkv", GQA)
def test_stores_hold_kv_heads_not_query_heads(hq, hkv):
    model, tok = model_for(hq, hkv)
    eng = Engine(model, tok, method_for("h2o", 6, "uniform", False))
    ids, am = left_padded([20, 13], 128, 0)
    cache = eng.new_cache(2, seq_len=20)
    eng.prefill(cache, ids, am)
    for layer in cache.layers:
        assert layer.store.k.shape == (2, hkv, 6, 8) and layer.policy.scores.shape == (2, hkv, 6)
