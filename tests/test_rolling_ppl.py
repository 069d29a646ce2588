"""Word-level rolling document perplexity (the LESS paper's WikiText metric) equals lm-eval's own `wikitext` task,
and its log-likelihoods equal plain transformers forwards over lm-eval's rolling windows."""

import json
import math

import pytest
import torch

from kvx.engine import Engine
from kvx.errors import ConfigError
from kvx.methods.full import Full
from kvx.methods.streaming_llm import StreamingLLM
from kvx.tasks.base import RunContext
from kvx.tasks.harness import KVXLM, local_task_config
from kvx.tasks.rolling_ppl import RollingPerplexity, detokenize, word_count

WINDOW = 128


@pytest.fixture(scope="module")
def pages(assets, tmp_path_factory):
    """Three WikiText-2 test articles (split at their top-level headings, cut short), as lm-eval's `page` rows."""
    docs, cur = [], []
    for line in (assets / "wikitext2" / "wiki.test.raw").read_text(encoding="utf-8").splitlines(keepends=True):
        if line.startswith(" = ") and not line.startswith(" = = ") and cur:
            docs.append(cur)
            cur = []
        cur.append(line)
        if len(docs) == 3:
            break
    path = tmp_path_factory.mktemp("wikitext") / "pages.jsonl"
    path.write_text("".join(json.dumps({"page": "".join(d[:4])[:600]}) + "\n" for d in docs), encoding="utf-8")
    return path


def lm_eval_wikitext(engine, path, mode):
    from lm_eval import simple_evaluate

    lm = KVXLM(engine=engine, mode=mode, max_length=WINDOW)
    res = simple_evaluate(model=lm, tasks=[local_task_config("wikitext", {"eval": [str(path)]})], bootstrap_iters=0)
    return res["results"]["wikitext"]


@pytest.mark.parametrize("method,mode", [
    (StreamingLLM(budget=32, sink=4), "masked"),
    pytest.param(Full(), "stream", marks=pytest.mark.slow),
    pytest.param(StreamingLLM(budget=32, sink=4), "stream", marks=pytest.mark.slow),  # token by token: ~1 min
])
def test_equals_lm_eval_wikitext_task(stories, pages, method, mode):
    model, tok = stories
    eng = Engine(model, tok, method)
    ours = RollingPerplexity(data_files=str(pages), window=WINDOW, mode=mode).run(eng, RunContext())
    theirs = lm_eval_wikitext(eng, pages, mode)
    for key in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert ours.metrics[key] == pytest.approx(theirs[f"{key},none"], rel=1e-9), key
    assert ours.metrics["documents"] == 3 and all(o["tokens"] > WINDOW for o in ours.outputs)  # several windows


def test_loglikelihoods_equal_plain_forwards(stories, pages):
    """Full cache: each document's log-likelihood is the sum over lm-eval's disjoint rolling windows of a plain
    transformers forward; words are counted in the original page."""
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    model, tok = stories
    res = RollingPerplexity(data_files=str(pages), window=WINDOW).run(Engine(model, tok, Full()), RunContext())
    rows = [json.loads(line) for line in pages.read_text().splitlines()]
    total_ll, total_words = 0.0, 0
    for row, out in zip(rows, res.outputs):
        ids = tok.encode(detokenize(row["page"], "wikitext"))
        ll = 0.0
        for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(ids, tok.bos_token_id, WINDOW, 1)):
            seq = torch.tensor([ctx + cont])
            with torch.no_grad():
                logits = model(input_ids=seq[:, :-1]).logits[0, -len(cont):].float()
            ll += float(torch.log_softmax(logits, -1).gather(-1, torch.tensor(cont)[:, None]).sum())
        assert out["loglikelihood"] == pytest.approx(ll, abs=1e-3)
        assert out["words"] == word_count(row["page"])
        total_ll, total_words = total_ll + ll, total_words + word_count(row["page"])
    assert res.metrics["word_perplexity"] == pytest.approx(math.exp(-total_ll / total_words), rel=1e-5)


def test_compression_raises_word_perplexity_and_fields_are_checked(stories, pages):
    model, tok = stories
    full = RollingPerplexity(data_files=str(pages), window=WINDOW, mode="masked").run(
        Engine(model, tok, Full()), RunContext()).metrics
    tight = RollingPerplexity(data_files=str(pages), window=WINDOW, mode="masked").run(
        Engine(model, tok, StreamingLLM(budget=16, sink=4)), RunContext()).metrics
    assert tight["word_perplexity"] > full["word_perplexity"] and tight["cache_bytes_peak"] < full["cache_bytes_peak"]
    one = RollingPerplexity(data_files=str(pages), window=WINDOW, max_tokens=1).run(
        Engine(model, tok, Full()), RunContext()).metrics
    assert one["documents"] == 1  # whole documents until max_tokens is reached
    with pytest.raises(ConfigError, match="task.detokenizer"):
        RollingPerplexity(detokenizer="moses").validate()
    with pytest.raises(ConfigError, match="task.window"):
        RollingPerplexity(data_files=str(pages), window=4096).run(Engine(model, tok, Full()), RunContext())


def test_less_gpu_experiments_report_the_papers_wikitext_metric():
    from kvx.config import build_task
    from tests.test_less import grid_runs

    for exp in ("less_llama2_7b", "less_llama2_13b"):
        tasks = {(t.type, t.name, t.mode, t.window) for t in (build_task(r["task"]) for r in grid_runs(exp, "gpu"))}
        assert tasks == {("rolling_perplexity", "wikitext2_words", "masked", 4096), ("perplexity", "pg19", "masked", 4096)}
