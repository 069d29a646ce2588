"""InfiniPot: the pot bound, equality with `full` under the pot, CR-RoPE re-rotation, NuC and CaP against plain
transformers forwards, the catalyst prompt leaving no trace, each scorer's selection rule, and the pot_ppl task."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from transformers import DynamicCache, LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from kvx.config import build_method
from kvx.engine import Engine
from kvx.errors import ConfigError
from kvx.methods.full import Full
from kvx.methods.infinipot import SCORERS, InfiniPot
from kvx.rope import find_rotary_embedding, rerotate
from kvx.tasks.pot_ppl import PotPerplexity

SHORT = "Summarize the story."  # 13 tokens with stories260k's 512-token vocabulary
CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.fixture(scope="module")
def story(stories, assets):
    """One TinyStories story of more than 400 tokens (BOS first)."""
    _, tok = stories
    with open(assets / "tinystories" / "validation_head.jsonl") as fh:
        for line in fh:
            ids = [tok.bos_token_id] + tok(json.loads(line)["text"], add_special_tokens=False).input_ids
            if len(ids) > 400:
                return torch.tensor([ids[:400]])
    raise AssertionError("no story longer than 400 tokens")


def pot(**kw):
    kw.setdefault("cap_prompt", SHORT)
    kw.setdefault("window", 8)
    m = InfiniPot(**kw)
    m.validate()
    return m


def token_bytes(eng, B=1):
    a = eng.arch
    return a.n_layers * B * a.n_kv_heads * 2 * a.head_dim * a.dtype_bytes


def feed(eng, cache, ids, check=None):
    """Feed ids through the pot one forward at a time (the pot's own chunks); check(cache) after each forward."""
    outs, s = [], 0
    while s < ids.shape[1]:
        step = eng.method.max_chunk(cache)
        outs.append(eng.forward(cache, ids[:, s : s + step]))
        s += step
        if check is not None:
            check(cache)
    return torch.cat(outs, dim=1)


def hf_cache(model, kv):
    dc = DynamicCache(config=model.config)
    for i, (k, v) in enumerate(kv):
        dc.update(k.clone(), v.clone(), i)
    return dc


# 1. the pot bound ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cr_rope", [True, False])
@pytest.mark.parametrize("scorer", SCORERS)
def test_cache_never_exceeds_the_pot(stories, story, scorer, cr_rope):
    model, tok = stories
    M = 64
    eng = Engine(model, tok, pot(budget=M, scorer=scorer, cr_rope=cr_rope))
    limit = M * token_bytes(eng)
    checks = []

    def check(cache):
        assert max(cache.lengths()) <= M
        assert cache.peak_bytes <= limit and cache.nbytes() <= limit
        if cr_rope:  # rotary positions stay inside the pot: the next token's, and so every stored key's
            assert int((cache.seen - cache.rope_offset).max()) <= M
            if cache.pot.distillations:  # slots appended since the last distillation hold token indices in rpos
                synced, off = cache.rope_synced[:, None, None], cache.rope_offset[:, None, None]
                for layer in cache.layers:
                    pos = layer.store.pos
                    assert int(torch.where(pos >= synced, pos - off, layer.store.rpos).max()) < M
        checks.append(1)

    cache = eng.new_cache(1)
    feed(eng, cache, story, check)
    assert cache.pot.distillations >= 10 and max(cache.pot.sizes) <= M
    assert cache.peak_bytes == limit  # the pot is used to the brim, never beyond
    assert cache.get_seq_length() == story.shape[1]
    out = eng.generate(story[:, :150], max_new_tokens=60, eos_token_id=[], on_step=check)
    assert len(out.tokens[0]) == 60 and out.cache.pot.distillations >= 3
    assert out.stats["cache_bytes_peak"] <= limit
    assert len(checks) >= 60 + 6


@pytest.mark.parametrize("scorer", SCORERS)
def test_input_under_the_pot_equals_full(stories, story, scorer):
    model, tok = stories
    M = 128
    method = pot(budget=M, scorer=scorer)
    eng, ref = Engine(model, tok, method), Engine(model, tok, Full())
    L = M - len(method.catalyst())  # all the pot's context room (a cap scorer reserves room for its prompt)
    ids = story[:, :L]
    got, want = eng.prefill(eng.new_cache(1), ids), ref.prefill(ref.new_cache(1), ids)
    if scorer in ("h2o", "tova", "snapkv"):  # these read attention probabilities (a different attention path)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    else:
        assert torch.equal(got, want)
    short = story[:, : L - 20]
    a = eng.generate(short, max_new_tokens=20, eos_token_id=[])
    b = ref.generate(short, max_new_tokens=20, eos_token_id=[])
    assert a.tokens == b.tokens and a.cache.pot.distillations == 0


# 2. CR-RoPE ---------------------------------------------------------------------------------------------------------
def rope_complex(x, pos, inv_freq):
    """Independent fp64 RoPE: channel pairs (i, i + D/2) as complex numbers times exp(i * pos * theta_i)."""
    h = x.shape[-1] // 2
    z = torch.complex(x[..., :h].double(), x[..., h:].double())
    z = z * torch.polar(torch.ones_like(inv_freq.double()), pos.double()[..., None] * inv_freq.double())
    return torch.cat([z.real, z.imag], dim=-1)


@pytest.mark.parametrize("rope", [
    {"rope_type": "default"},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 1024},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048},  # scales cos/sin by ~1.14
])
def test_rerotate_equals_rope_at_new_position(rope):
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=512, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                      rope_parameters={"rope_theta": 10000.0, **rope})
    rot = LlamaRotaryEmbedding(cfg)
    k0 = torch.randn(2, 2, 50, 128)  # pre-RoPE keys [B, Hkv, n, D]
    old = torch.randint(0, 500, (2, 2, 50))
    new = torch.randint(0, 500, (2, 2, 50))

    def hf_rope(pos):  # transformers' own RoPE, one (batch, head) row of positions at a time
        out = torch.empty_like(k0)
        for b in range(2):
            for h in range(2):
                cos, sin = rot(k0, pos[b, h][None])
                out[b, h] = apply_rotary_pos_emb(k0[b, h][None, None], k0[b, h][None, None], cos, sin)[1][0, 0]
        return out

    got = rerotate(hf_rope(old), new - old, rot)
    # transformers rounds its angles (position * inv_freq) to fp32: ~3e-5 rad at position 500
    torch.testing.assert_close(got, hf_rope(new), atol=1e-4, rtol=0)
    # a whole 4K pot re-indexed, against an independent fp64 RoPE (fp32 angles: ~2.5e-4 rad at 4096)
    old, new = torch.randint(0, 4096, (2, 2, 50)), torch.randint(0, 2048, (2, 2, 50))
    got = rerotate(rope_complex(k0, old, rot.inv_freq).float(), new - old, rot).double()
    want = rope_complex(k0, new, rot.inv_freq)
    assert float((got - want).abs().max()) < 1e-3 * float(k0.abs().max())


def test_pot_uses_the_models_rotary_embedding(stories):
    model, tok = stories
    method = pot(budget=128)
    Engine(model, tok, method)
    assert method._rotary is find_rotary_embedding(model) is model.model.rotary_emb


# 3. NuC and CaP against plain transformers -----------------------------------------------------------------------
def fill_until_full(eng, cache, ids):
    """Feed the pot until the next chunk would need a distillation; returns the number of tokens fed."""
    s, m = 0, eng.method
    while True:
        step = m.max_chunk(cache)
        if cache.layers[0].store.n + step + len(m.catalyst()) > m.budget and cache.pot.distillations >= 1:
            return s
        eng.forward(cache, ids[:, s : s + step])
        s += step


@pytest.mark.parametrize("cr_rope", [True, False])
def test_nuc_equals_cross_entropy_over_the_compressed_pot(stories, story, cr_rope):
    model, tok = stories
    eng = Engine(model, tok, pot(budget=128, cr_rope=cr_rope))
    cache = eng.new_cache(1)
    s = fill_until_full(eng, cache, story)
    eng.method.distill(eng, cache)
    C = eng.method.kept
    kv = [(layer.store.keys(), layer.store.v) for layer in cache.layers]
    assert cache.lengths() == [C] * 5
    if cr_rope:
        assert all(torch.equal(layer.store.rpos[0, 0], torch.arange(C, dtype=torch.int32)) for layer in cache.layers)
    t = eng.method.max_chunk(cache)
    chunk = story[:, s : s + t]
    rope_start = int(cache.seen[0] - cache.rope_offset[0])
    assert rope_start == (C if cr_rope else s)
    got = eng.forward(cache, chunk)
    with torch.no_grad():
        ref = model(input_ids=chunk, position_ids=torch.arange(rope_start, rope_start + t)[None],
                    cache=hf_cache(model, kv), use_cache=True).logits.float()
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    ce = F.cross_entropy(ref[0, :-1], chunk[0, 1:], reduction="none")  # -log p given the compressed pot
    for layer in cache.layers:
        nuc = layer.policy.nuc  # [B, Hkv, n]: the same token-level score in every head and layer
        torch.testing.assert_close(nuc[0, :, C + 1 : C + t], ce.expand(nuc.shape[1], -1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("share", [0.0, 0.5, 1.0])
def test_cap_scores_selection_and_no_trace(stories, story, share):
    model, tok = stories
    method = pot(budget=128, nuc_share=share)
    eng = Engine(model, tok, method)
    cache = eng.new_cache(1)
    fill_until_full(eng, cache, story)
    synced, off = cache.rope_synced[:, None, None], cache.rope_offset[:, None, None]
    # rotary position of each stored key: re-indexed by the last distillation (rpos) or appended since then
    before = [(layer.store.keys().clone(), layer.store.v.clone(), layer.store.pos.clone(),
               torch.where(layer.store.pos >= synced, layer.store.pos - off, layer.store.rpos).long(),
               layer.policy.nuc.clone()) for layer in cache.layers]
    seen, last = cache.seen.clone(), cache.last_logits.clone()
    rope0 = int(seen[0] - cache.rope_offset[0])  # rotary position of the prompt's first token
    n_ctx = cache.layers[0].store.n
    method.distill(eng, cache)
    C, P, G = method.kept, method.catalyst(), eng.arch.group
    inv = model.model.rotary_emb.inv_freq
    assert int(cache.seen[0] - cache.rope_offset[0]) == C  # the next token continues at C

    # CaP: the prompt's attention onto each context slot, from transformers' eager attention over the same pot
    impl = model.config._attn_implementation
    try:
        model.set_attn_implementation("eager")
        with torch.no_grad():
            out = model(input_ids=torch.tensor([P]), position_ids=torch.arange(rope0, rope0 + len(P))[None],
                        cache=hf_cache(model, [b[:2] for b in before]), use_cache=True, output_attentions=True)
    finally:
        model.set_attn_implementation(impl)
    n_nuc = round(share * C)
    for li, layer in enumerate(cache.layers):
        k, v, pos, rot, nuc = before[li]
        att = out.attentions[li][:, :, :, :n_ctx].sum(2)  # [B, Hq, n_ctx]
        cap = att.reshape(1, -1, G, n_ctx).sum(2)  # summed over each KV group's query heads
        torch.testing.assert_close(layer.policy.cap, cap, atol=1e-5, rtol=0)
        kept = layer.store.pos[0]  # [Hkv, C]
        for h in range(kept.shape[0]):
            # selection: round(share * C) by NuC (the same tokens in every head), the rest by CaP per head
            want = set(pos[0, h][torch.argsort(nuc[0, h], descending=True)][:n_nuc].tolist())
            by_cap = [p for p in pos[0, h][torch.argsort(cap[0, h], descending=True)].tolist() if p not in want]
            want |= set(by_cap[: C - n_nuc])
            assert set(kept[h].tolist()) == want
            # no trace of the prompt: only context slots remain, values untouched, keys re-rotated to 0..C-1
            idx = torch.searchsorted(pos[0, h].contiguous(), kept[h].contiguous())
            assert torch.equal(pos[0, h][idx], kept[h])
            assert torch.equal(layer.store.v[0, h], v[0, h][idx])
            want_k = rope_complex(rope_complex(k[0, h][idx], -rot[0, h][idx], inv), torch.arange(C), inv)
            torch.testing.assert_close(layer.store.keys()[0, h].double(), want_k, atol=1e-4, rtol=0)
            assert torch.equal(layer.store.rpos[0, h], torch.arange(C, dtype=torch.int32))
            torch.testing.assert_close(layer.policy.nuc[0, h], nuc[0, h][idx])  # retained tokens keep their NuC
        assert int(layer.store.pos.max()) < int(seen[0])
    assert cache.lengths() == [C] * eng.arch.n_layers
    assert torch.equal(cache.seen, seen) and torch.equal(cache.last_logits, last)
    assert cache.pot.probe_tokens == len(P) * cache.pot.distillations


# 4. the baselines' selection rules ---------------------------------------------------------------------------------
@pytest.mark.parametrize("scorer", ["streaming", "truncation", "h2o", "snapkv", "tova"])
def test_baseline_selection_rules(stories, story, scorer):
    model, tok = stories
    method = pot(budget=64, scorer=scorer)
    eng = Engine(model, tok, method)
    cache = eng.new_cache(1)
    feed(eng, cache, story[:, :200])
    C = method.kept
    eng.method.distill(eng, cache)
    seen = int(cache.seen[0])
    for layer in cache.layers:
        kept = layer.store.pos[0]  # [Hkv, C]
        for h in range(kept.shape[0]):
            got = set(kept[h].tolist())
            recent = set(range(seen - 1, seen - 1 - C, -1))
            if scorer == "streaming":
                assert got == set(range(4)) | set(range(seen - 1, seen - 1 - (C - 4), -1))
            elif scorer == "truncation":
                assert got == set(range(C // 2)) | set(range(seen - 1, seen - 1 - (C - C // 2), -1))
            elif scorer == "h2o":
                assert set(range(seen - 1, seen - 1 - C // 2, -1)) <= got and got != recent
            elif scorer == "snapkv":
                assert set(range(seen - 1, seen - 9, -1)) <= got and got != recent
        if scorer == "tova":  # one choice per layer: every KV head keeps the same tokens
            assert all(torch.equal(kept[0], kept[h]) for h in range(kept.shape[0]))


# 5. configuration ----------------------------------------------------------------------------------------------------
def test_validation_names_the_field(stories):
    model, tok = stories
    for kw, field in [({"budget": 64, "keep": 64}, "method.keep"), ({"scorer": "sink"}, "method.scorer"),
                      ({"nuc_share": 1.5}, "method.nuc_share"), ({"budget": 1}, "method.budget"),
                      ({"scorer": "snapkv", "budget": 64, "window": 32}, "method.window"),
                      ({"scorer": "snapkv", "kernel": 4}, "method.kernel")]:
        with pytest.raises(ConfigError, match=field):
            InfiniPot(**kw).validate()
    with pytest.raises(ConfigError, match="method.cap_prompt"):  # 45 tokens do not fit beside keep=32 in 64
        Engine(model, tok, InfiniPot(budget=64))
    with pytest.raises(ConfigError, match="method.budget"):  # rotary positions beyond the 512-token context
        Engine(model, tok, InfiniPot(budget=1024))
    Engine(model, tok, InfiniPot(budget=1024, cr_rope=False))
    with pytest.raises(ConfigError, match="task.mode"):
        Engine(model, tok, pot(budget=64)).new_cache(1, mode="masked")


def test_input_beyond_the_models_context(stories, tiny_ids):
    model, tok = stories
    ids = torch.tensor([tiny_ids[:1200]])  # more than twice the 512-token context
    eng = Engine(model, tok, pot(budget=128))
    assert eng.allow_beyond_context  # CR-RoPE: any input length, rotary positions stay inside the pot
    cache = eng.new_cache(1)
    logits = eng.prefill(cache, ids)
    assert logits.shape[1] == 1200 and max(cache.pot.sizes) <= 128
    assert int((cache.seen - cache.rope_offset).max()) <= 128
    off = Engine(model, tok, pot(budget=128, cr_rope=False))
    assert not off.allow_beyond_context
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        off.prefill(off.new_cache(1), ids)
    abl = Engine(model, tok, pot(budget=128, cr_rope=False, allow_beyond_context=True))
    assert abl.prefill(abl.new_cache(1), ids).shape[1] == 1200


def test_cap_question_is_the_catalyst(stories, story):
    model, tok = stories
    method = pot(budget=128, cap_question=True)
    eng = Engine(model, tok, method)
    q = tok("Where did the girl go?", add_special_tokens=False).input_ids
    method.set_question(q)
    assert method.catalyst() == q and method.max_chunk(eng.new_cache(1)) == 128 - len(q)
    cache = eng.new_cache(1)
    feed(eng, cache, story[:, :300], lambda c: None)
    assert cache.pot.probe_tokens == len(q) * cache.pot.distillations > 0
    method.set_question(None)
    assert method.catalyst() == method._prompt_ids


def test_experiment_configs_validate():
    base = OmegaConf.load(CONFIGS / "method" / "infinipot.yaml")
    files = sorted((CONFIGS / "experiment").glob("infinipot_*.yaml"))
    assert len(files) >= 10
    rows = {}
    for f in files:
        exp = OmegaConf.load(f)
        assert f.read_text().startswith("# @package _global_")
        m = build_method(OmegaConf.merge(base, exp.get("method", {})))
        rows[f.stem] = m
    t3 = {k: v for k, v in rows.items() if k.startswith("infinipot_table3_")}
    assert {(m.scorer, m.nuc_share, m.cr_rope) for m in t3.values()} >= {
        ("snapkv", 0.5, True), ("cap", 0.5, True), ("nuc", 0.5, True), ("cap_nuc", 0.25, True),
        ("cap_nuc", 0.5, True), ("cap_nuc", 0.75, True), ("cap_nuc", 0.5, False)}
    assert {rows[f"infinipot_{t}_{k}k"].budget for t in ("longbench", "needle") for k in (2, 4)} == {2048, 4096}


# 6. the pot_ppl task ------------------------------------------------------------------------------------------------
def test_pot_ppl_task(stories, assets):
    model, tok = stories
    task = PotPerplexity(data_files=str(assets / "tinystories" / "validation_head.jsonl"), limit=3, min_tokens=256)
    task.validate()
    full = task.run(Engine(model, tok, Full()), None or _ctx())
    # independent: one plain transformers forward per story, loss of its last 25% of tokens
    total, n = 0.0, 0
    for _, ids in task.stories(tok):
        x = torch.tensor([ids])
        with torch.no_grad():
            logits = model(input_ids=x[:, :-1]).logits[0].float()
        k = math.ceil(0.25 * len(ids))
        total += float(F.cross_entropy(logits[-k:], x[0, -k:], reduction="sum"))
        n += k
    assert full.metrics["tokens"] == n and full.metrics["stories"] == 3
    assert full.metrics["ppl"] == pytest.approx(math.exp(total / n), rel=1e-5)
    ip = task.run(Engine(model, tok, pot(budget=128)), _ctx())
    assert ip.metrics["cache_tokens_peak"] == 128 < full.metrics["cache_tokens_peak"]
    assert all(o["distillations"] > 0 for o in ip.outputs)
    assert 1.0 < ip.metrics["ppl"] < 3 * full.metrics["ppl"]
    with pytest.raises(ConfigError, match="task.tail"):
        PotPerplexity(tail=1.0).validate()


def _ctx():
    from kvx.tasks.base import RunContext

    return RunContext()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_keys_moved_500_times_are_rounded_once(dtype):
    """CR-RoPE moves kept keys at every distillation. The pot's store (MovableStore) rotates on read from the key the
    model produced, so after 500 moves through compact_positions an fp16/bf16 key is as close to the fp32 key as a
    single rounding; re-rotating the stored keys in place (a DenseStore) lets the error grow with the moves."""
    from types import SimpleNamespace

    from kvx.cache.dense import DenseStore
    from kvx.cache.rotated import MovableStore
    from kvx.rope import compact_positions

    cfg = LlamaConfig(hidden_size=4096, num_attention_heads=32, max_position_embeddings=4096,
                      rope_parameters={"rope_theta": 10000.0, "rope_type": "default"})
    rot = LlamaRotaryEmbedding(cfg)
    g = torch.Generator().manual_seed(0)
    B, H, n, D = 1, 2, 16, 128
    pos = torch.arange(n, dtype=torch.int32).expand(B, H, n)
    k32 = rerotate(torch.randn(B, H, n, D, generator=g), pos, rot)  # keys after RoPE at rotary positions 0..n-1
    v = torch.zeros(B, H, n, D)
    stores = {"fp32": MovableStore(rot), "moved": MovableStore(rot), "in_place": DenseStore()}
    for name, st in stores.items():
        st.append(k32 if name == "fp32" else k32.to(dtype), v, pos)
    cache = SimpleNamespace(seen=torch.tensor([10**6]), rope_offset=torch.zeros(1, dtype=torch.long))
    for _ in range(500):  # a first layer holding between n and n + 300 tokens moves the others' positions
        m = int(torch.randint(n, n + 300, (1,), generator=g))
        driver = DenseStore()
        driver.append(torch.zeros(B, H, m, D), torch.zeros(B, H, m, D), torch.arange(m).expand(B, H, m))
        layers = [SimpleNamespace(store=driver)] + [SimpleNamespace(store=st) for st in stores.values()]
        compact_positions(cache, rot, layers)
    final = stores["fp32"].rpos
    assert torch.equal(stores["moved"].rpos, final) and int((final - pos).abs().max()) > 0
    want = rerotate(k32, (final - pos).to(torch.int32), rot)  # fp32, one step from the original keys
    torch.testing.assert_close(stores["fp32"].keys(), want, atol=1e-5, rtol=0)

    def rel(x):
        return float(((x.float() - want).norm(dim=-1) / want.norm(dim=-1)).mean())

    once = rel(want.to(dtype))  # the error of storing the exact keys in this dtype
    assert rel(stores["moved"].keys()) <= 2 * once
    assert rel(stores["in_place"].keys()) > 5 * rel(stores["moved"].keys())  # what repeated rounding does
