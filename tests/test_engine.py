"""The engine with method=full reproduces plain transformers: logits, greedy decoding, padding, chunking."""

import pytest
import torch

from kvx.engine import Engine
from kvx.methods.full import Full


def plain_logits(model, ids, attention_mask=None, chunk=None):
    """A plain transformers forward; in chunks through transformers' own DynamicCache when chunk is given."""
    from transformers import DynamicCache

    with torch.no_grad():
        if not chunk:
            return model(input_ids=ids, attention_mask=attention_mask).logits.float()
        cache = DynamicCache(config=model.config)
        outs = [model(input_ids=ids[:, s : s + chunk], cache=cache, use_cache=True).logits.float()
                for s in range(0, ids.shape[1], chunk)]
        return torch.cat(outs, dim=1)


@pytest.mark.parametrize("which", ["stories", "random_gqa"])
@pytest.mark.parametrize("chunk", [None, 1, 7, 64])
def test_full_logits_equal_plain_forward(request, which, chunk, tiny_ids):
    model, tok = request.getfixturevalue(which)
    ids = torch.tensor([tiny_ids[:200]])
    eng = Engine(model, tok, Full())
    cache = eng.new_cache(1)
    got = eng.prefill(cache, ids, chunk_size=chunk)
    # chunked: the same chunks through transformers' own cache (a chunked forward reorders float sums in the MLPs
    # too, so it differs from one full forward by ~5e-5 in transformers itself)
    ref = plain_logits(model, ids, chunk=chunk)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    assert cache.get_seq_length() == 200
    assert cache.lengths() == [200] * eng.arch.n_layers


@pytest.mark.parametrize("which", ["stories", "random_gqa"])
@pytest.mark.parametrize("chunk", [None, 3])
def test_greedy_equals_hf_generate(request, which, chunk):
    model, tok = request.getfixturevalue(which)
    ids = tok("Once upon a time, there was a", return_tensors="pt").input_ids
    eng = Engine(model, tok, Full())
    ours = eng.generate(ids, max_new_tokens=40, chunk_size=chunk, eos_token_id=[])
    ref = model.generate(ids, max_new_tokens=40, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert ours.tokens[0] == ref[0, ids.shape[1]:].tolist()


def test_stories_greedy_text(stories):
    model, tok = stories
    ids = tok("Once upon a time", return_tensors="pt").input_ids
    out = Engine(model, tok, Full()).generate(ids, max_new_tokens=30)
    text = tok.decode(out.tokens[0])
    assert text.startswith(", there was a little girl named Lily. She loved to play outside")


def test_left_padded_batch_equals_single(stories):
    model, tok = stories
    prompts = ["Once upon a time", "The little dog ran to the park and saw a big red ball"]
    eng = Engine(model, tok, Full())
    batch = tok(prompts, return_tensors="pt", padding=True)
    assert batch.attention_mask[0, 0] == 0  # left padding
    out_b = eng.generate(batch.input_ids, batch.attention_mask, max_new_tokens=24, eos_token_id=[])
    cache = eng.new_cache(2)
    logits_b = eng.prefill(cache, batch.input_ids, batch.attention_mask)
    for i, p in enumerate(prompts):
        single = tok(p, return_tensors="pt").input_ids
        out_s = eng.generate(single, max_new_tokens=24, eos_token_id=[])
        assert out_b.tokens[i] == out_s.tokens[0]
        n = single.shape[1]
        ref = plain_logits(model, single)[0]
        torch.testing.assert_close(logits_b[i, -n:], ref, atol=1e-5, rtol=0)


def test_sampling_is_seeded(stories):
    model, tok = stories
    ids = tok("Once upon a time", return_tensors="pt").input_ids
    eng = Engine(model, tok, Full())
    a = eng.generate(ids, max_new_tokens=20, do_sample=True, temperature=1.0, top_p=0.9, seed=3).tokens
    b = eng.generate(ids, max_new_tokens=20, do_sample=True, temperature=1.0, top_p=0.9, seed=3).tokens
    c = eng.generate(ids, max_new_tokens=20, do_sample=True, temperature=1.0, top_p=0.9, seed=4).tokens
    assert a == b and a != c


def test_stop_strings_and_eos(stories):
    model, tok = stories
    ids = tok("Once upon a time", return_tensors="pt").input_ids
    eng = Engine(model, tok, Full())
    out = eng.generate(ids, max_new_tokens=40, stop_strings=["Lily"])
    text = tok.decode(out.tokens[0])
    assert "Lily" not in text and text.startswith(", there was a little girl named")
    assert out.finished == [True]


def test_loglikelihood_matches_plain_forward(stories, tiny_ids):
    model, tok = stories
    eng = Engine(model, tok, Full())
    ctx, cont = tiny_ids[:50], tiny_ids[50:60]
    lp, greedy = eng.loglikelihood(ctx, cont)
    logits = plain_logits(model, torch.tensor([ctx + cont]))[0]
    ref = torch.log_softmax(logits[49:59], -1).gather(-1, torch.tensor(cont)[:, None]).sum()
    assert abs(lp - float(ref)) < 1e-4
    lp_m, greedy_m = eng.loglikelihood(ctx, cont, mode="masked")
    assert abs(lp_m - float(ref)) < 1e-4 and greedy == greedy_m


def test_rolling_loglikelihood(stories, tiny_ids):
    model, tok = stories
    eng = Engine(model, tok, Full())
    ids = tiny_ids[1:120]
    total = eng.loglikelihood_rolling(ids, window=512)
    seq = torch.tensor([[tok.bos_token_id] + ids])
    logits = plain_logits(model, seq)[0, :-1]
    ref = torch.log_softmax(logits, -1).gather(-1, seq[0, 1:, None]).sum()
    assert abs(total - float(ref)) < 1e-3


def test_position_beyond_context_is_refused(stories):
    model, tok = stories
    eng = Engine(model, tok, Full())
    with pytest.raises(ValueError, match="max_position_embeddings"):
        eng.prefill(eng.new_cache(1), torch.ones(1, 513, dtype=torch.long))


def test_unsupported_architecture_is_named():
    from transformers import FalconConfig, FalconForCausalLM

    from kvx.errors import UnsupportedModelError

    model = FalconForCausalLM(FalconConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, vocab_size=64))
    with pytest.raises(UnsupportedModelError, match="FalconForCausalLM"):
        Engine(model, None, Full())


def test_plain_transformers_still_works_after_engine(stories):
    model, tok = stories
    Engine(model, tok, Full())
    ids = tok("Once upon a time", return_tensors="pt").input_ids
    assert model.config._attn_implementation != "kvx"
    model(input_ids=ids)  # no kvx cache active: plain transformers attention
