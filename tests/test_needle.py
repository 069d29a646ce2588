"""Needle in a haystack: prompt construction (length, needle placement), scoring, the heatmap and context checks."""

import io

import pytest
from rouge_score import rouge_scorer

from kvx.engine import Engine
from kvx.errors import ConfigError, DataError
from kvx.methods.full import Full
from kvx.methods.streaming_llm import StreamingLLM
from kvx.tasks.base import RunContext
from kvx.tasks.needle import ESSAY_NEEDLE, Needle

SHORT = "{context}\n\n{question}\nAnswer:"


def _find(seq, sub):
    for i in range(len(seq) - len(sub) + 1):
        if seq[i : i + len(sub)] == sub:
            return i
    return -1


def test_prompts_place_the_needle(stories, assets):
    _, tok = stories
    task = Needle(template=SHORT, context_lengths=[200, 400], depths=[0, 50, 100])
    needle = tok(ESSAY_NEEDLE, add_special_tokens=False).input_ids
    pre = tok("", add_special_tokens=True).input_ids
    post = tok("\n\nWhat is the best thing to do in San Francisco?\nAnswer:", add_special_tokens=False).input_ids
    prompts = task.prompts(tok)
    assert [(n, d) for n, d, _, _ in prompts] == [(200, 0.0), (200, 50.0), (200, 100.0), (400, 0.0), (400, 50.0),
                                                 (400, 100.0)]
    for n, depth, want, ids in prompts:
        assert len(ids) == n and want == "eat a sandwich and sit in Dolores Park on a sunny day"
        at = _find(ids, needle)
        assert ids[: len(pre)] == pre and ids[len(ids) - len(post) :] == post
        if depth == 0:
            assert at == len(pre)
        elif depth == 100:
            assert at == len(ids) - len(post) - len(needle)
        else:  # right after the last sentence end at or before the middle of the haystack (or at its start)
            hay_ids = ids[len(pre) : at] + ids[at + len(needle) : len(ids) - len(post)]
            point, mid = at - len(pre), int(len(hay_ids) * depth / 100)
            ends = [tok.decode(hay_ids[j - 1 : j]).rstrip().endswith(".") for j in range(1, mid + 1)]
            assert point <= mid and (point == 0 or ends[point - 1]) and not any(ends[point:])
    # the haystack starts with the first essay (files in name order)
    first = sorted((assets / "niah" / "PaulGrahamEssays").glob("*.txt"))[0].read_text(encoding="utf-8")
    assert prompts[2][3][len(pre) : len(pre) + 50] == tok(first, add_special_tokens=False).input_ids[:50]


def test_passkey_prompts(stories):
    _, tok = stories
    task = Needle(variant="passkey", context_lengths=[256], depths=[0, 50, 100], seed=5)
    for _, _, key, ids in task.prompts(tok):
        assert key.isdigit() and len(key) == 5 and len(ids) == 256
        text = tok.decode(ids, skip_special_tokens=True)
        assert f"The pass key is {key}. Remember it. {key} is the pass key." in text
        assert text.endswith("What is the pass key? The pass key is")


@pytest.mark.parametrize("method", [Full(), StreamingLLM(budget=48, sink=4)], ids=["full", "streaming_llm"])
def test_run_scores_and_heatmap(stories, method):
    import matplotlib.image as mpimg

    model, tok = stories
    # the model's favourite continuation: a correct "retrieval" that checks exact inclusion end to end
    task = Needle(needle=" Once upon a time, there was a little girl named Lily. ", question="", answer="Lily",
                  template="{context}\nOnce upon a time, there was a little girl named", context_lengths=[96, 160],
                  depths=[0, 50, 100], max_new_tokens=4, limit=5)
    task.validate()
    res = task.run(Engine(model, tok, method), RunContext())
    n = len(res.outputs)  # depths whose needle lands at the same place run once
    assert n + res.metrics["merged_points"] == 5 and res.metrics["points"] == n
    direct = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    for out in res.outputs:
        want = direct.score("Lily", out["prediction"])
        assert out["rouge1"] == want["rouge1"].fmeasure and out["rougeL"] == want["rougeL"].fmeasure
        assert out["exact"] == float("lily" in out["prediction"].lower())
    assert res.metrics["exact"] == sum(o["exact"] for o in res.outputs) / n
    assert res.metrics["exact"] == 1.0
    png = res.artifacts["heatmap.png"]
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and mpimg.imread(io.BytesIO(png)).ndim == 3


def test_passkey_run(stories):
    model, tok = stories
    res = Needle(variant="passkey", context_lengths=[256], depths=[50], max_new_tokens=6).run(
        Engine(model, tok, StreamingLLM(budget=32, sink=4)), RunContext())
    out = res.outputs[0]
    assert out["exact"] == float(out["answer"] in out["prediction"]) and out["prompt_tokens"] == 256


def test_beyond_context(stories):
    model, tok = stories
    eng = Engine(model, tok, Full())
    kw = dict(template=SHORT, context_lengths=[600], depths=[50], max_new_tokens=2)
    with pytest.raises(ConfigError, match=r"task.context_lengths: \[600\].*beyond the model's context of 512"):
        Needle(**kw).run(eng, RunContext())
    res = Needle(**kw, allow_beyond_context=True).run(eng, RunContext())
    assert res.outputs[0]["prompt_tokens"] == 600 and eng.allow_beyond_context is False


def test_bad_input(stories, tmp_path):
    model, tok = stories
    eng = Engine(model, tok, Full())
    with pytest.raises(DataError, match="no .txt essays"):
        Needle(data_files=str(tmp_path), template=SHORT, context_lengths=[128], depths=[0]).run(eng, RunContext())
    (tmp_path / "a.txt").write_text("  \n")
    with pytest.raises(DataError, match=r"a.txt is empty"):
        Needle(data_files=str(tmp_path), template=SHORT, context_lengths=[128], depths=[0]).run(eng, RunContext())
    with pytest.raises(DataError, match="does not exist"):
        Needle(data_files=str(tmp_path / "nope"), template=SHORT, context_lengths=[128]).run(eng, RunContext())
    with pytest.raises(ConfigError, match="cannot hold the template"):
        Needle(context_lengths=[20], depths=[0]).run(eng, RunContext())
    with pytest.raises(ConfigError, match="task.depths"):
        Needle(depths=[120]).validate()
    with pytest.raises(ConfigError, match="task.heatmap_metric"):
        Needle(heatmap_metric="f1").validate()
    with pytest.raises(ConfigError, match="task.variant"):
        Needle(variant="haystack").validate()


def test_depths_with_the_same_needle_place_are_one_test(stories):
    """At 256 tokens the first sentence end lies past 50% of the haystack: depths 0, 25 and 50 give one prompt."""
    model, tok = stories
    task = Needle(template="{context}\n{question}", context_lengths=[256], depths=[0, 25, 50, 75, 100],
                  max_new_tokens=2)
    prompts = {d: ids for _, d, _, ids in task.prompts(tok)}
    same = [d for d in (25.0, 50.0, 75.0) if prompts[d] == prompts[0.0]]
    assert same  # the case this test is about
    res = task.run(Engine(model, tok, Full()), RunContext())
    ran = [o["depth"] for o in res.outputs]
    assert ran == [d for d in sorted(prompts) if d == 0.0 or d not in same]
    assert len(set(tuple(prompts[d]) for d in ran)) == len(ran)  # every test that ran is a different prompt
    assert res.outputs[0]["merged_depths"] == same and res.outputs[0]["real_depth"] == 0.0
    assert res.metrics["points"] == len(ran) and res.metrics["merged_points"] == len(same)
    assert res.metrics["retrieval"] == res.metrics["exact"] == sum(o["exact"] for o in res.outputs) / len(ran)
    assert task.heatmap_metric == "exact" and "exact@256" in res.metrics
