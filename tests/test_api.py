"""The Python API (kvx.load -> Pipeline) against plain transformers and by-hand counts; the README example runs."""

import math
import re
import subprocess
import sys

import pytest
import torch

import kvx
from kvx.errors import ConfigError
from kvx.methods.h2o import H2O
from tests.helpers import REPO

TEXT = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the sun. "
        "One day, she saw a big red ball in the park.")


@pytest.fixture(scope="module")
def full(stories):
    model, tok = stories
    return kvx.load(model, "full", tokenizer=tok)


def test_readme_example_runs_as_written():
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 3 and lines[0].strip()
    assert lines[1].startswith(str(5 * 2 * 4 * 32 * 8 * 4))  # 5 layers x 32 tokens x 4 KV heads x (k, v) x 8 dims x fp32


def test_import_stays_light():
    out = subprocess.run([sys.executable, "-c", "import sys, kvx; print('torch' in sys.modules, kvx.load.__module__)"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["False", "kvx.api"]


def test_generate_full_equals_model_generate(full, stories):
    model, tok = stories
    ctx, question = TEXT[:60], " Then she"
    ids = torch.tensor([tok(ctx).input_ids + tok(question, add_special_tokens=False).input_ids])
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=25, do_sample=False, eos_token_id=None, pad_token_id=0)
    got = full.generate(ctx, question=question, max_new_tokens=25, eos_token_id=[])
    assert got == tok.decode(ref[0, ids.shape[1]:], skip_special_tokens=True)
    assert full.stats["question_tokens"] == ids.shape[1] - len(tok(ctx).input_ids)
    # the whole sequence is held: every position, in every layer and KV head
    n = ids.shape[1] + 25  # the engine feeds the last generated token too
    assert all(torch.equal(p, torch.arange(n).expand(4, n)) for p in full.kept_positions())
    assert full.cache_bytes == 5 * n * 4 * 2 * 8 * 4


def test_perplexity_and_loglikelihood_equal_plain_forward(full, stories):
    model, tok = stories
    ids = tok(TEXT).input_ids
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    lp = torch.log_softmax(logits, -1)
    nll = -lp[:-1].gather(-1, torch.tensor(ids[1:])[:, None])
    assert abs(full.perplexity(TEXT) - math.exp(float(nll.mean()))) < 1e-4
    ctx, cont = "Once upon a time, there was a", " little girl"
    c, w = tok(ctx).input_ids, tok(ctx + cont).input_ids
    with torch.no_grad():
        lw = torch.log_softmax(model(input_ids=torch.tensor([w])).logits[0].float(), -1)
    ref = float(lw[len(c) - 1 : -1].gather(-1, torch.tensor(w[len(c):])[:, None]).sum())
    assert abs(full.loglikelihood(ctx, cont) - ref) < 1e-4
    assert full.stats["continuation_tokens"] == len(w) - len(c)


def test_method_object_and_name_agree_and_budget_holds(stories):
    model, tok = stories
    by_name = kvx.load("stories260k", "h2o", budget=16)
    by_obj = kvx.load(model, H2O(budget=16), tokenizer=tok)
    a = by_name.generate(TEXT, max_new_tokens=10, eos_token_id=[])
    b = by_obj.generate(TEXT, max_new_tokens=10, eos_token_id=[])
    assert a == b
    kept = by_obj.kept_positions()
    assert all(p.shape == (4, 16) for p in kept)
    seen = len(tok(TEXT).input_ids) + by_obj.stats["new_tokens"]
    for p in kept:  # distinct real tokens, and H2O's recent half: the 8 latest tokens in every head
        assert all(len(set(row.tolist())) == 16 and row.max() < seen for row in p)
        assert all(set(range(seen - 8, seen)) <= set(row.tolist()) for row in p)
    assert by_obj.cache_bytes == 5 * 16 * 4 * 2 * 8 * 4
    assert by_obj.peak_bytes >= by_obj.cache_bytes
    assert by_name.perplexity(TEXT) == pytest.approx(by_obj.perplexity(TEXT))
    masked = kvx.load(model, H2O(budget=16), tokenizer=tok, mode="masked")
    assert masked.perplexity(TEXT) == pytest.approx(by_obj.perplexity(TEXT), rel=1e-5)


def test_local_folder_and_model_args(assets, stories):
    pipe = kvx.load(str(assets / "models" / "stories260k"), "full", model_args={"dtype": "float32"})
    assert pipe.engine.arch.model_id.endswith("stories260k")
    _, tok = stories
    ids = tok(TEXT).input_ids
    assert pipe.encode(TEXT) == ids
    assert pipe.perplexity(TEXT) == pytest.approx(kvx.load(stories[0], "full", tokenizer=tok).perplexity(TEXT))


def test_bad_input_names_the_field(stories):
    model, tok = stories
    with pytest.raises(ConfigError, match="method.budgt"):
        kvx.load(model, "h2o", tokenizer=tok, budgt=3)
    with pytest.raises(ConfigError, match="method.name.*h2o"):
        kvx.load(model, "h20", tokenizer=tok)
    with pytest.raises(ConfigError, match="tokenizer"):
        kvx.load(model, "full")
    with pytest.raises(ConfigError, match="mode"):
        kvx.load(model, "full", tokenizer=tok, mode="fast")
    with pytest.raises(RuntimeError, match="no cache held"):
        _ = kvx.load(model, "full", tokenizer=tok).cache_bytes
