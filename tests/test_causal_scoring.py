"""Scoring a continuation over a compressed cache is causal: a token's log-probability does not change when tokens
are appended after it, for every method, in stream and masked mode (Engine.continuation_logprobs)."""

import pytest
import torch

from kvx.config import build_method
from kvx.engine import Engine
from kvx.methods.full import Full
from kvx.methods.less import LESS
from tests.test_less import random_maps

BUDGET = 16
METHODS = {
    "full": {"name": "full"},
    "h2o": {"name": "h2o", "budget": BUDGET},
    "streaming_llm": {"name": "streaming_llm", "budget": BUDGET, "sink": 4},
    "streaming_llm_reindex": {"name": "streaming_llm", "budget": BUDGET, "sink": 4, "reindex": True},
    "snapkv": {"name": "snapkv", "budget": BUDGET, "window": 4, "kernel_size": 3},
    "tova": {"name": "tova", "budget": BUDGET},
    "scissorhands": {"name": "scissorhands", "budget": BUDGET, "history": 8},
    "sirllm": {"name": "sirllm", "budget": BUDGET},
    "infinipot": {"name": "infinipot", "budget": 24, "keep": 8, "cap_prompt": "Summarize the story."},
    "infinipot_snapkv": {"name": "infinipot", "budget": 24, "scorer": "snapkv", "window": 4},
    "uniform": {"name": "uniform", "bits": 4},
    "kivi": {"name": "kivi", "bits": 2, "group_size": 8, "residual": 8},
    "qaq": {"name": "qaq", "residual": 4},
    "qaq_evict": {"name": "qaq", "residual": 4, "evict": {"name": "h2o", "budget": BUDGET}},
    "less": "less",
    "knorm": {"name": "knorm", "budget": BUDGET},
    "observed_attention": {"name": "observed_attention", "budget": BUDGET},
    "adakv": {"name": "adakv", "base": {"name": "snapkv", "budget": BUDGET, "window": 4, "kernel_size": 3}},
}


def test_every_registered_method_is_covered():
    import kvx.config

    kvx.config._load_plugins()
    from kvx.registry import METHODS as REGISTRY

    names = {("less" if spec == "less" else spec["name"]) for spec in METHODS.values()}
    assert set(REGISTRY.names()) <= names


def engine_for(model, tok, key):
    spec = METHODS[key]
    if spec == "less":
        method = LESS(base={"name": "h2o", "budget": BUDGET})
        method.set_feature_maps(random_maps(Engine(model, tok, Full()).arch))
    else:
        method = build_method(dict(spec))
    return Engine(model, tok, method)


@pytest.mark.parametrize("key", list(METHODS))
def test_appending_tokens_never_changes_earlier_scores(stories, tiny_ids, key):
    model, tok = stories
    eng = engine_for(model, tok, key)
    ctx, cont = tiny_ids[:40], tiny_ids[40:70]  # continuations shorter and longer than the budget
    modes = ["stream"] + (["masked"] if eng.method.has_mask_form else [])
    for mode in modes:
        full_lp, _ = eng.continuation_logprobs(ctx, cont, mode=mode)
        for n in (1, 5, BUDGET - 1, BUDGET, BUDGET + 3):
            lp, _ = eng.continuation_logprobs(ctx, cont[:n], mode=mode)
            assert torch.allclose(lp, full_lp[:n], atol=2e-5, rtol=0), (mode, n, (lp - full_lp[:n]).abs().max())
        total, _ = eng.loglikelihood(ctx, cont[:7], mode=mode)
        assert total == pytest.approx(float(full_lp[:7].sum()), abs=1e-4)


def lambda_mask(T: int, c: int, budget: int, sink: int, per_query_context: bool) -> torch.Tensor:
    """[T, T] allowed: the continuation rows (>= c) read sink + recent of the first c tokens and every later token;
    context rows read everything before them (a one-shot prefill) or their own sink + recent window (token by
    token, as masked mode and stream with chunk_size=1 compress the context)."""
    allowed = torch.tril(torch.ones(T, T, dtype=torch.bool))
    for i in range(T):
        if i < c and not per_query_context:
            continue
        last = min(i, c - 1)  # the newest token the policy has compressed with
        cut = last + 1 - (budget - sink)
        allowed[i, :c] = False
        allowed[i, [j for j in range(min(c, last + 1)) if j < sink or j >= cut]] = True
    return allowed


def test_continuation_reads_the_compressed_context_plus_itself(stories, tiny_ids):
    """StreamingLLM keeps sink + recent: a continuation token reads exactly those context tokens and every token
    of the continuation before it (an explicit mask over a plain transformers forward)."""
    model, tok = stories
    budget, sink = 12, 4
    eng = Engine(model, tok, build_method({"name": "streaming_llm", "budget": budget, "sink": sink}))
    ctx, cont = tiny_ids[:40], tiny_ids[40:60]
    seq = torch.tensor([ctx + cont])
    c = len(ctx) - 1  # the compressed part; the last context token is read beside the continuation
    T = seq.shape[1] - 1
    for mode, chunk, per_query in (("stream", None, False), ("stream", 1, True), ("masked", None, True)):
        allowed = lambda_mask(T, c, budget, sink, per_query)
        with torch.no_grad():  # a plain transformers forward with an explicit 4D mask
            logits = model(input_ids=seq[:, :-1], attention_mask=allowed[None, None]).logits.float()[0, c:]
        ref = torch.log_softmax(logits, -1).gather(-1, torch.tensor(cont)[:, None])[:, 0]
        lp, _ = eng.continuation_logprobs(ctx, cont, mode=mode, chunk_size=chunk)
        assert torch.allclose(lp, ref, atol=1e-4), (mode, chunk, (lp - ref).abs().max())


@pytest.mark.parametrize("spec", [{"name": "uniform", "bits": 2, "residual": 4},
                                  {"name": "kivi", "bits": 2, "group_size": 8, "residual": 8},
                                  {"name": "qaq", "residual": 4, "min_bits": 2, "max_bits": 2}])
def test_quantized_context_is_read_quantized(stories, tiny_ids, spec):
    """A quantized method scores a continuation over its quantized context. Fed token by token (chunk_size 1), the
    first continuation token's log-probability equals the prediction a token-by-token perplexity pass
    (Engine.score_window) makes of the same token, where every context token older than the residual window is
    read from its codes; prefilled in larger chunks (the context's K/V then come from full-precision attention
    inside a chunk) it still reads the codes, so it differs from the full cache's (2-bit codes)."""
    model, tok = stories
    eng = Engine(model, tok, build_method(dict(spec)))
    ctx, cont = tiny_ids[:40], tiny_ids[40:41]
    nll, _ = eng.score_window(torch.tensor([ctx + cont]), mode="stream", chunk_size=1)
    lp, _ = eng.continuation_logprobs(ctx, cont, mode="stream", chunk_size=1)
    assert float(lp[0]) == pytest.approx(-float(nll[0, -1]), abs=1e-4)
    full_lp, _ = Engine(model, tok, Full()).continuation_logprobs(ctx, cont)
    for chunk in (None, 7):
        lp, _ = eng.continuation_logprobs(ctx, cont, mode="stream", chunk_size=chunk)
        assert abs(float(lp[0]) - float(full_lp[0])) > 1e-3, chunk
