"""Model families on tiny random configs: the full cache equals a plain transformers forward, greedy decoding equals
`model.generate`, budgets hold, masked mode equals stream mode; sliding-window layers hold the model's own window
and Gemma 2's attention-logit softcapping is applied (kvx/cache/sliding.py)."""

import pytest
import torch
import transformers as T

from kvx.cache.sliding import WindowPolicy
from kvx.engine import Engine, arch_info
from kvx.errors import UnsupportedModelError
from kvx.methods.full import Full
from kvx.methods.h2o import H2O
from kvx.methods.streaming_llm import StreamingLLM

COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
              vocab_size=256, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)
TWO = ["sliding_attention", "full_attention"]
WINDOW = 8
FAMILIES = {
    "llama": (T.LlamaConfig, T.LlamaForCausalLM, {}),
    "mistral": (T.MistralConfig, T.MistralForCausalLM, dict(sliding_window=None)),
    "mistral_window": (T.MistralConfig, T.MistralForCausalLM, dict(sliding_window=WINDOW)),  # v0.1: every layer
    "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM, {}),  # q/k/v projections with bias
    "qwen2_window": (T.Qwen2Config, T.Qwen2ForCausalLM, dict(use_sliding_window=True, sliding_window=WINDOW,
                                                             max_window_layers=1)),
    "qwen3": (T.Qwen3Config, T.Qwen3ForCausalLM, dict(head_dim=16)),  # RMSNorm on q and k
    # a small cap so that it changes the logits of a random model (Gemma 2 uses 50)
    "gemma2": (T.Gemma2Config, T.Gemma2ForCausalLM, dict(head_dim=16, sliding_window=WINDOW, layer_types=TWO,
                                                         attn_logit_softcapping=0.05, query_pre_attn_scalar=16)),
    "gemma3": (T.Gemma3TextConfig, T.Gemma3ForCausalLM, dict(head_dim=16, sliding_window=WINDOW, layer_types=TWO,
                                                             rope_local_base_freq=100.0)),
    "phi3": (T.Phi3Config, T.Phi3ForCausalLM, {}),  # fused qkv projection
    "opt": (T.OPTConfig, T.OPTForCausalLM, dict(ffn_dim=128, word_embed_proj_dim=64, num_key_value_heads=None)),
}
T_LEN = 40


def build(name):
    cls_cfg, cls_model, extra = FAMILIES[name]
    kw = {k: v for k, v in {**COMMON, **extra}.items() if v is not None or k == "sliding_window"}
    cfg = cls_cfg(**kw)
    cfg._attn_implementation = "eager"  # the plain reference: transformers' own eager attention (softcap included)
    torch.manual_seed(0)
    return cls_model(cfg).eval()


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    torch.manual_seed(1)
    return request.param, build(request.param), torch.randint(3, 256, (1, T_LEN))


def plain(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def windows_of(name):
    return {"mistral_window": (WINDOW, WINDOW), "qwen2_window": (None, WINDOW), "gemma2": (WINDOW, None),
            "gemma3": (WINDOW, None)}.get(name, (None, None))


def test_arch_reads_windows_and_softcap(family):
    name, model, _ = family
    arch = arch_info(model)
    assert arch.windows == windows_of(name)
    assert arch.softcap == (0.05 if name == "gemma2" else None)


@pytest.mark.parametrize("chunk", [None, 1, 5])
def test_full_cache_equals_plain_forward(family, chunk):
    name, model, ids = family
    eng = Engine(model, None, Full())
    cache = eng.new_cache(1, T_LEN)
    got = eng.prefill(cache, ids, chunk_size=chunk)
    torch.testing.assert_close(got, plain(model, ids), atol=1e-5, rtol=0)
    # a sliding layer holds the model's own window (its last W - 1 tokens), a global layer everything
    assert cache.lengths() == [T_LEN if w is None else w - 1 for w in windows_of(name)]


def test_masked_full_equals_plain_forward(family):
    _, model, ids = family
    eng = Engine(model, None, Full())
    got = eng.forward(eng.new_cache(1, T_LEN, mode="masked"), ids)
    torch.testing.assert_close(got, plain(model, ids), atol=1e-5, rtol=0)


def test_greedy_equals_generate(family):
    _, model, ids = family
    prompt = ids[:, :10]
    ours = Engine(model, None, Full()).generate(prompt, max_new_tokens=20, eos_token_id=[])
    with torch.no_grad():
        ref = model.generate(prompt, max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert ours.tokens[0] == ref[0, 10:].tolist()


def test_budgets_hold_and_masked_equals_stream(family):
    name, model, ids = family
    budget = 12
    eng = Engine(model, None, H2O(budget=budget))
    cache = eng.new_cache(1, T_LEN)
    most = [0] * eng.arch.n_layers
    for i in range(T_LEN):
        eng.forward(cache, ids[:, i : i + 1])
        most = [max(a, b) for a, b in zip(most, cache.lengths())]
    windows = windows_of(name)
    assert most == [budget if w is None else w - 1 for w in windows]
    for layer, w in zip(cache.layers, windows):
        assert isinstance(layer.policy, WindowPolicy) == (w is not None)
    per_token = 2 * eng.arch.n_kv_heads * eng.arch.head_dim * 4
    assert cache.nbytes() == sum(cache.lengths()) * per_token
    sl = Engine(model, None, StreamingLLM(budget=budget, sink=2))
    nll_s, st = sl.score_window(ids, mode="stream")
    nll_m, sm = sl.score_window(ids, mode="masked")
    torch.testing.assert_close(nll_s, nll_m, atol=1e-5, rtol=0)
    assert st["cache_bytes_peak"] == sm["cache_bytes_peak"]


def test_window_that_cannot_bind_is_compressed():
    """A sliding layer whose window covers the whole sequence is an ordinary layer for the method."""
    cls_cfg, cls_model, _ = FAMILIES["mistral"]
    model = cls_model(cls_cfg(**{**COMMON, "sliding_window": 64})).eval()
    eng = Engine(model, None, H2O(budget=12))
    cache = eng.new_cache(1, T_LEN)
    eng.prefill(cache, torch.randint(3, 256, (1, T_LEN)), chunk_size=1)
    assert cache.lengths() == [12, 12]
    assert not any(isinstance(layer.policy, WindowPolicy) for layer in cache.layers)


def test_softcap_changes_gemma2_logits():
    """The cap is really applied: without it the logits of this tiny Gemma 2 differ from the model's."""
    model = build("gemma2")
    ids = torch.randint(3, 256, (1, 16))
    ref = plain(model, ids)
    model.config.attn_logit_softcapping = None
    for m in model.modules():
        if hasattr(m, "attn_logit_softcapping"):
            m.attn_logit_softcapping = None
    uncapped = plain(model, ids)
    assert (ref - uncapped).abs().max() > 1e-3
    model = build("gemma2")
    eng = Engine(model, None, Full())
    torch.testing.assert_close(eng.prefill(eng.new_cache(1, 16), ids), ref, atol=1e-5, rtol=0)


def test_softcap_refuses_non_dense_store():
    from kvx.methods.uniform import Uniform

    eng = Engine(build("gemma2"), None, Uniform(bits=4))
    with pytest.raises(UnsupportedModelError, match="softcapping"):
        eng.new_cache(1, T_LEN)


def test_falcon_is_refused():
    cfg = T.FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=256)
    with pytest.raises(UnsupportedModelError, match="AttentionInterface"):
        arch_info(T.FalconForCausalLM(cfg))


def test_softcap_scores_masked_equals_stream():
    """Attention-scored eviction on a softcapping model: the scores come from the capped probabilities in both modes."""
    model = build("gemma2")
    cap = 1.0
    model.config.attn_logit_softcapping = cap
    for m in model.modules():  # larger logits, so that the cap reshapes the probabilities the scores sum
        if hasattr(m, "attn_logit_softcapping"):
            m.attn_logit_softcapping = cap
            m.q_proj.weight.data *= 10
            m.k_proj.weight.data *= 10
    torch.manual_seed(1)
    ids = torch.randint(3, 256, (1, T_LEN))
    eng = Engine(model, None, H2O(budget=12, recent=2))
    nll_s, _ = eng.score_window(ids, mode="stream")
    nll_m, _ = eng.score_window(ids, mode="masked")
    torch.testing.assert_close(nll_s, nll_m, atol=1e-5, rtol=0)


def test_gemma3_refuses_rerotation():
    """Gemma 3 rotates local and global layers with different RoPE bases: methods that re-rotate keys are refused."""
    with pytest.raises(UnsupportedModelError, match="per layer type"):
        Engine(build("gemma3"), None, StreamingLLM(budget=12, sink=2, reindex=True))


@pytest.mark.parametrize("name", ["mistral_window", "gemma2"])
def test_left_padded_batch_equals_single_with_windows(name):
    model = build(name)
    eng = Engine(model, None, Full())
    torch.manual_seed(0)
    a, b = torch.randint(3, 256, (1, 30)), torch.randint(3, 256, (1, 18))
    ids = torch.cat([a, torch.cat([torch.zeros(1, 12, dtype=torch.long), b], 1)])
    mask = torch.ones_like(ids)
    mask[1, :12] = 0
    out = eng.generate(ids, mask, max_new_tokens=15, eos_token_id=[])
    assert out.tokens[0] == eng.generate(a, max_new_tokens=15, eos_token_id=[]).tokens[0]
    assert out.tokens[1] == eng.generate(b, max_new_tokens=15, eos_token_id=[]).tokens[0]
