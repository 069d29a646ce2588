"""Summarization: ROUGE against rouge-score called directly and by hand, HELM prompts, truncation, and end-to-end
runs on the assets' XSum and CNN/DailyMail copies (checked against transformers' own greedy generation)."""

import json

import pytest
import torch
from rouge_score import rouge_scorer

from kvx.engine import Engine
from kvx.errors import ConfigError, DataError
from kvx.methods.full import Full
from kvx.methods.streaming_llm import StreamingLLM
from kvx.tasks.base import RunContext
from kvx.tasks.summarization import (
    Summarization,
    cut_stop,
    format_prompt,
    mean_rouge,
    rouge_scores,
    stop_reason,
    water_fill,
)

PAIRS = [
    ("the cat sat on the mat", "the cat was on the mat"),
    ("the dogs were running", "the dog runs"),
    ("A man has appeared in court after firearms were seized.", "Police seized firearms; a man is in court."),
    ("", "something"),
]


def test_rouge_matches_rouge_score_directly():
    direct = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    for pred, ref in PAIRS:
        want = direct.score(ref, pred)
        got = rouge_scores(pred, ref)
        assert got == {k: want[k].fmeasure for k in ("rouge1", "rouge2", "rougeL")}


def test_rouge_by_hand():
    # unigrams overlap 5 of 6 each way; bigrams 3 of 5; LCS "the cat on the mat" = 5
    got = rouge_scores(*PAIRS[0])
    assert got["rouge1"] == pytest.approx(5 / 6) and got["rouge2"] == pytest.approx(3 / 5)
    assert got["rougeL"] == pytest.approx(5 / 6)
    # stemming: dogs -> dog, running/runs -> run; unigrams 3/4 vs 3/3, bigrams 1/3 vs 1/2
    got = rouge_scores(*PAIRS[1])
    assert got["rouge1"] == pytest.approx(2 * 0.75 / 1.75) and got["rouge2"] == pytest.approx(0.4)
    mean = mean_rouge([p for p, _ in PAIRS], [r for _, r in PAIRS])
    assert mean["rouge1"] == pytest.approx(sum(rouge_scores(p, r)["rouge1"] for p, r in PAIRS) / len(PAIRS))


def test_helm_prompt_and_helpers():
    text = format_prompt(["Doc one.", "Doc two."], ["Sum one."], "Summarize the above article in 1 sentence.")
    assert text == (
        "###\nArticle: Doc one.\n\nSummarize the above article in 1 sentence.\nSum one.\n"
        "\n###\nArticle: Doc two.\n\nSummarize the above article in 1 sentence.\n"
    )
    assert water_fill([10, 100, 50], 1000) == [10, 100, 50]
    assert water_fill([10, 100, 50], 90) == [10, 40, 40]
    assert sum(water_fill([7, 7, 7], 10)) <= 10
    assert cut_stop("a summary.\n\nArticle: next", ["\n\n", "###"]) == "a summary."


def test_truncation_keeps_prompt_within_budget(stories, assets):
    _, tok = stories
    rows = [json.loads(line) for line in open(assets / "xsum" / "test_first300.jsonl")][:4]
    task = Summarization(shots=2, num_sentences=1, min_article_tokens=64)
    ids, fit = task.build_prompt(tok, rows[0]["document"], rows[1:3], 300)
    text = tok.decode(ids, skip_special_tokens=True)
    assert len(ids) <= 300 and fit.truncated and ids[0] == tok.bos_token_id
    assert text.endswith("Summarize the above article in 1 sentence.\n")
    assert text.count("###\nArticle: ") == fit.shots + 1 and 0 <= fit.shots <= 2
    # the article kept: its first article_kept tokens are in the prompt, and no more
    doc_ids = tok(rows[0]["document"], add_special_tokens=False).input_ids
    assert fit.article_tokens == len(doc_ids) and fit.article_cut and fit.article_kept >= 64
    article = text.split("###\nArticle: ")[-1].split("\n\nSummarize")[0]
    assert article == tok.decode(doc_ids[: fit.article_kept], skip_special_tokens=True)
    # a short article: nothing is cut and every shot stays
    short = [{"document": "Tom had a kite.", "summary": "Tom's kite."}] * 2
    ids, fit = task.build_prompt(tok, "Lily fixed a boat.", short, 300)
    assert not fit.truncated and fit.shots == 2 and not fit.article_cut
    assert tok.decode(ids, skip_special_tokens=True) == format_prompt(
        ["Tom had a kite.", "Tom had a kite.", "Lily fixed a boat."], ["Tom's kite."] * 2,
        "Summarize the above article in 1 sentence.")


@pytest.mark.parametrize("method", [Full(), StreamingLLM(budget=64, sink=4)], ids=["full", "streaming_llm"])
def test_xsum_end_to_end(stories, assets, method):
    model, tok = stories
    task = Summarization(name="xsum", data_files=str(assets / "xsum" / "test_first300.jsonl"), shots=1, limit=2,
                         max_new_tokens=16)
    task.validate()
    res = task.run(Engine(model, tok, method), RunContext())
    assert len(res.outputs) == 2 and res.metrics["examples"] == 2
    for key in ("rouge1", "rouge2", "rougeL"):
        assert res.metrics[key] == pytest.approx(sum(o[key] for o in res.outputs) / 2)
    for i, out in enumerate(res.outputs):
        assert out == {**out, **rouge_scores(out["prediction"], out["reference"])}
        assert i not in out["shot_ids"] and out["prompt_tokens"] <= 512 - 16
    if isinstance(method, Full):
        # the same prompt through transformers' own greedy generation gives the same summary
        ex = [json.loads(line) for line in open(assets / "xsum" / "test_first300.jsonl")][0]
        pool = [json.loads(line) for line in open(assets / "xsum" / "test_first300.jsonl")]
        ids, _ = task.build_prompt(tok, ex["document"], [pool[j] for j in res.outputs[0]["shot_ids"]], 512 - 16)
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)
        hf = cut_stop(tok.decode(out[0, len(ids):], skip_special_tokens=True), task.stop).strip()
        assert res.outputs[0]["prediction"] == hf


def test_cnn_shots_and_sampling(stories, assets):
    model, tok = stories
    eng = Engine(model, tok, StreamingLLM(budget=64, sink=4))
    path = str(assets / "cnn_dailymail" / "test_100_lowercased.jsonl")
    kw = dict(name="cnn_dailymail", data_files=path, document_field="article", summary_field="highlights", shots=2,
              num_sentences=3, limit=2, max_new_tokens=8, max_prompt_tokens=400, temperature=0.8, seed=3)
    a = Summarization(**kw).run(eng, RunContext())
    b = Summarization(**kw).run(eng, RunContext())
    assert [o["prediction"] for o in a.outputs] == [o["prediction"] for o in b.outputs]  # seeded sampling
    for i, out in enumerate(a.outputs):
        assert i not in out["shot_ids"] and out["prompt_tokens"] <= 400 and out["id"] == i


def test_fitting_decisions_in_metrics_and_warnings(stories, assets, caplog):
    """Shots dropped and articles cut are counted in the metrics, logged once, and refused when asked."""
    model, tok = stories
    eng = Engine(model, tok, Full())
    kw = dict(name="xsum", data_files=str(assets / "xsum" / "test_first300.jsonl"), shots=5, limit=3,
              max_new_tokens=8)
    with caplog.at_level("WARNING", logger="kvx.tasks.summarization"):
        res = Summarization(**kw).run(eng, RunContext())
    out, m = res.outputs, res.metrics
    assert m["shots_asked"] == 5 and m["shots_mean"] == pytest.approx(sum(o["shots"] for o in out) / 3)
    assert m["shots_mean"] < 5
    assert m["shots_min"] == min(o["shots"] for o in out)
    assert m["prompt_tokens_max"] == max(o["prompt_tokens"] for o in out) <= 512 - 8
    assert m["articles_cut"] == sum(o["article_kept"] < o["article_tokens"] for o in out) >= 1
    assert m["article_kept_mean"] == pytest.approx(sum(o["article_kept"] for o in out) / 3)
    for o in out:  # why each generation stopped
        assert o["stop_reason"] in ("eos", "stop", "max_new_tokens")
        assert (o["new_tokens"] == 8) >= (o["stop_reason"] == "max_new_tokens")
    assert m["stop_eos"] + m["stop_stop"] + m["stop_max_new_tokens"] == 3
    assert sum("shots to fit" in r.getMessage() for r in caplog.records) == 1  # once per run
    assert sum("ARTICLE CUT" in r.getMessage() for r in caplog.records) == 1
    with pytest.raises(DataError, match="the evaluated article keeps"):
        Summarization(**kw, article_cut="refuse").run(eng, RunContext())
    with pytest.raises(ConfigError, match="task.article_cut"):
        Summarization(article_cut="drop").validate()


def test_bad_input(stories, tmp_path, assets):
    model, tok = stories
    eng = Engine(model, tok, Full())
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"document": "a", "summary": "b"}) + "\n" + json.dumps({"document": "c"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl, row 2: missing field\(s\) summary"):
        Summarization(data_files=str(bad)).run(eng, RunContext())
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="empty.jsonl is empty"):
        Summarization(data_files=str(empty)).run(eng, RunContext())
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"document": "a", "summary": "b"}) + "\n")
    with pytest.raises(DataError, match="3 shots asked for but only 1"):
        Summarization(data_files=str(one), shots=3).run(eng, RunContext())
    with pytest.raises(ConfigError, match="task.max_new_tokens"):
        Summarization(data_files=str(one), max_new_tokens=600).run(eng, RunContext())
    with pytest.raises(ConfigError, match="task.mode"):
        Summarization(mode="masked").validate()
    with pytest.raises(ConfigError, match="task.shots"):
        Summarization(shots=-1).validate()


def test_stop_reason_of_a_generation(stories):
    from kvx.engine import Generation

    assert stop_reason(Generation([[5, 2]], [True]), 2) == "eos"
    assert stop_reason(Generation([[5]], [True]), 2) == "stop"  # a stop string (trimmed from the tokens)
    assert stop_reason(Generation([[5, 6]], [False]), 2) == "max_new_tokens"
    model, tok = stories
    gen = Engine(model, tok, Full()).generate(tok("Once upon a time", return_tensors="pt").input_ids,
                                              max_new_tokens=30, stop_strings=["Lily"])
    assert stop_reason(gen, tok.eos_token_id) == "stop"
