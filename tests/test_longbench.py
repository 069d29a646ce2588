"""LongBench: the official metrics against hand-computed values, prompts and truncation as pred.py builds them, and
end-to-end runs on small fixtures in LongBench's jsonl format."""

import json
import random
import zipfile
from pathlib import Path

import pytest
import torch

from kvx.engine import Engine
from kvx.errors import ConfigError, DataError
from kvx.methods.full import Full
from kvx.methods.streaming_llm import StreamingLLM
from kvx.tasks import longbench_metrics as lbm
from kvx.tasks.base import RunContext
from kvx.tasks.longbench import ALL_SUBTASKS, LongBench, build_chat

FIXTURES = Path(__file__).parent / "fixtures" / "longbench"
FIXTURE_SUBTASKS = sorted(p.stem for p in FIXTURES.glob("*.jsonl"))


def _f(p, r):
    return 2.0 * (p * r) / (p + r + 1e-8)


# metrics ------------------------------------------------------------------------------------------------------------
def test_qa_f1_by_hand():
    # normalised: "cat sat" vs "cat sat on mat" -> precision 1, recall 1/2
    assert lbm.qa_f1_score("The cat sat.", "a cat sat on the mat") == pytest.approx(2 / 3)
    assert lbm.qa_f1_score("Paris", "paris!") == 1.0
    assert lbm.qa_f1_score("London", "Paris") == 0.0
    assert lbm.qa_f1_score("", "Paris") == 0.0


def test_qa_f1_zh_by_hand():
    import jieba

    pred, gold = "他的名字叫雪球。", "雪球"
    p_tok = [t for t in jieba.cut(pred) if t not in ("。",)]
    common = sum(1 for t in p_tok if t == "雪球")
    expected = 2 * (common / len(p_tok)) * 1.0 / (common / len(p_tok) + 1.0)
    assert lbm.qa_f1_zh_score(pred, gold) == pytest.approx(expected)
    assert lbm.qa_f1_zh_score("雪球", "雪球！") == 1.0


def test_rouge_l_by_hand():
    # one sentence each; words as sets: ref {the,cat,was,on,mat}, hyp {the,cat,sat,on,mat}; LCS {the,cat,on,mat}
    assert lbm.rouge_l_f("the cat sat on the mat", "the cat was on the mat") == pytest.approx(_f(4 / 5, 4 / 5))
    # the union-LCS example of the ROUGE paper: r = w1..w5, c1 = w1 w2 w6 w7 w8, c2 = w1 w3 w8 w9 w5 -> 4 words
    hyp = "w1 w2 w6 w7 w8. w1 w3 w8 w9 w5"
    assert lbm.rouge_l_f(hyp, "w1 w2 w3 w4 w5") == pytest.approx(_f(4 / 8, 4 / 5))
    assert lbm.rouge_score("", "anything") == 0.0
    assert lbm.rouge_score("...", "anything") == 0.0
    assert lbm.rouge_zh_score("会议讨论了预算。", "会议讨论了预算。") == pytest.approx(_f(1.0, 1.0))


def test_rouge_l_matches_the_rouge_package():
    rouge = pytest.importorskip("rouge")
    r = rouge.Rouge()
    rng = random.Random(0)
    vocab = ["a", "b", "c", "the", "cat", ".", ". ", "  ", "x", "y", "z"]
    for _ in range(300):
        hyp = " ".join(rng.choice(vocab) for _ in range(rng.randint(0, 20)))
        ref = " ".join(rng.choice(vocab) for _ in range(rng.randint(0, 20)))
        try:
            want = r.get_scores([hyp], [ref], avg=True)["rouge-l"]["f"]
        except Exception:
            want = 0.0
        assert lbm.rouge_score(hyp, ref) == pytest.approx(want, abs=1e-12)


def test_classification_by_hand():
    classes = ["City", "Number of something", "Individual"]
    assert lbm.classification_score("City", "City", all_classes=classes) == 1.0
    assert lbm.classification_score("City or Individual", "City", all_classes=classes) == 0.5
    assert lbm.classification_score("no idea", "City", all_classes=classes) == 0.0
    # a class name inside the ground truth is dropped: only "abc" is left
    assert lbm.classification_score("abc b", "abc", all_classes=["abc", "b"]) == 1.0
    # the reference removes while iterating, so "ab" (right after the removed "a") survives: 1/2
    assert lbm.classification_score("abc", "abc", all_classes=["a", "ab", "abc"]) == 0.5


def test_retrieval_count_code_by_hand():
    assert lbm.retrieval_score("Paragraph 2", "Paragraph 2") == 1.0
    assert lbm.retrieval_score("It is Paragraph 2, not 3", "Paragraph 2") == 0.5
    assert lbm.retrieval_score("none", "Paragraph 2") == 0.0
    assert lbm.retrieval_zh_score("答案是段落2", "段落2") == 1.0
    assert lbm.count_score("There are 2 unique paragraphs", 2) == 1.0
    assert lbm.count_score("2 or 3", "2") == 0.5
    assert lbm.code_sim_score("```python\n# add\n    return a * b\n", "    return a * b") == 1.0
    # difflib ratio: 2 * 3 matches / 8 characters
    assert lbm.code_sim_score("abcd", "abce") == 0.75


def test_score_example_and_aggregates():
    # trec keeps the first non-empty line only
    assert lbm.score_example("trec", "\nCity\nIndividual", ["City"], ["City", "Individual"]) == 1.0
    assert lbm.score_example("narrativeqa", "cloth and glue", ["a piece of cloth and some glue", "cloth and glue"],
                             None) == 1.0
    assert lbm.score_example("qasper_e", "seagulls", ["the seagulls"], None) == 1.0
    assert lbm.subtask_score([1.0, 0.5, 0.0]) == 50.0
    assert lbm.subtask_score([1 / 3]) == 33.33
    assert lbm.subtask_score_e([1.0, 0.0, 0.5], [100, 5000, 9000]) == {"0-4k": 100.0, "4-8k": 0.0, "8k+": 50.0}
    assert lbm.subtask_score_e([1.0], [3999]) == {"0-4k": 100.0}


# prompts --------------------------------------------------------------------------------------------------------------
def _rows(name):
    return [json.loads(line) for line in (FIXTURES / f"{name}.jsonl").read_text().splitlines() if line.strip()]


def test_middle_truncation_as_pred_py(stories, assets):
    _, tok = stories
    prompts = json.loads((assets / "longbench" / "dataset2prompt.json").read_text())
    row = _rows("narrativeqa")[0]
    task = LongBench(subtasks=["narrativeqa"])
    ids, truncated = task.build_input(tok, row, prompts["narrativeqa"], "narrativeqa", 40, "none")
    # pred.py: tokenise, keep the first and last max_length/2 tokens, decode both halves, join, tokenise again
    full = tok(prompts["narrativeqa"].format(**row)).input_ids
    text = tok.decode(full[:20], skip_special_tokens=True) + tok.decode(full[-20:], skip_special_tokens=True)
    assert truncated and ids == tok(text).input_ids
    ids2, truncated2 = task.build_input(tok, row, prompts["narrativeqa"], "narrativeqa", 10_000, "none")
    assert not truncated2 and ids2 == full


def test_chat_wrapping_skips_few_shot_and_code(stories, assets):
    _, tok = stories
    prompts = json.loads((assets / "longbench" / "dataset2prompt.json").read_text())
    task = LongBench(subtasks=["narrativeqa", "trec"])
    qa, _ = task.build_input(tok, _rows("narrativeqa")[0], prompts["narrativeqa"], "narrativeqa", 10_000, "llama2")
    trec, _ = task.build_input(tok, _rows("trec")[0], prompts["trec"], "trec", 10_000, "llama2")
    assert tok.decode(qa, skip_special_tokens=True).startswith("[INST]You are given a story")
    assert tok.decode(qa, skip_special_tokens=True).endswith("Answer:[/INST]")
    assert "[INST]" not in tok.decode(trec, skip_special_tokens=True)
    assert build_chat(tok, "hi", "vicuna").endswith("USER: hi ASSISTANT:")


# end to end -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", [Full(), StreamingLLM(budget=48, sink=4)], ids=["full", "streaming_llm"])
def test_run_fixtures(stories, method):
    model, tok = stories
    task = LongBench(subtasks=FIXTURE_SUBTASKS, data_files=str(FIXTURES), max_new_tokens=8)
    task.validate()
    res = task.run(Engine(model, tok, method), RunContext())
    rows = {s: _rows(s) for s in FIXTURE_SUBTASKS}
    assert len(res.outputs) == sum(len(r) for r in rows.values())
    for out in res.outputs:
        row = next(r for r in rows[out["subtask"]] if r["_id"] == out["_id"])
        assert out["score"] == lbm.score_example(out["subtask"], out["prediction"], row["answers"], row["all_classes"])
    for s in FIXTURE_SUBTASKS:
        scores = [o["score"] for o in res.outputs if o["subtask"] == s]
        assert res.metrics[s] == round(100 * sum(scores) / len(scores), 2)
    plain = [res.metrics[s] for s in FIXTURE_SUBTASKS if not s.endswith("_e")]
    assert res.metrics["average"] == round(sum(plain) / len(plain), 2)
    assert {"qasper_e/0-4k", "qasper_e/4-8k", "qasper_e/8k+", "average_e"} <= set(res.metrics)
    samsum = next(o for o in res.outputs if o["subtask"] == "samsum")
    assert samsum["prediction"].strip() and "\n" not in samsum["prediction"].rstrip("\n")
    # the cache's peak bytes, per example and over the run
    assert res.metrics["cache_bytes_peak"] == max(o["cache_bytes_peak"] for o in res.outputs) > 0
    if isinstance(method, Full):  # the full cache holds the prompt and the answer's tokens: 5 x 4 x 2 x 8 fp32
        per_token = 5 * 4 * 2 * 8 * 4
        for o in res.outputs:
            assert o["prompt_tokens"] * per_token <= o["cache_bytes_peak"] <= (o["prompt_tokens"] + 8) * per_token


def test_samsum_first_token_is_neither_eos_nor_newline(stories):
    model, tok = stories
    eng = Engine(model, tok, Full())
    ids = tok("Dialogue: A: hi\nB: bye\nSummary:\n\n").input_ids
    newline = tok("\n", add_special_tokens=False).input_ids[-1]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
    toks, peak = LongBench(subtasks=["samsum"])._generate(eng, ids, 6, "samsum")
    assert peak == (len(ids) + len(toks)) * 5 * 4 * 2 * 8 * 4  # generate feeds every token it picks; fp32
    logits[[tok.eos_token_id, newline]] = float("-inf")
    assert toks[0] == int(logits.argmax())
    assert all(t not in (tok.eos_token_id, newline) for t in toks[:-1])


def test_zip_layout_and_mapping(stories, tmp_path):
    model, tok = stories
    zpath = tmp_path / "data.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.write(FIXTURES / "qasper_e.jsonl", "data/qasper_e.jsonl")
    task = LongBench(subtasks=["qasper_e"], data_files=str(zpath), max_new_tokens=4, limit=1)
    assert len(task.load_subtask("qasper_e")) == 3
    res = task.run(Engine(model, tok, Full()), RunContext())
    assert len(res.outputs) == 1 and "qasper_e/0-4k" in res.metrics
    mapped = LongBench(subtasks=["lcc"], data_files={"lcc": str(FIXTURES / "lcc.jsonl")})
    assert mapped.load_subtask("lcc")[0]["_id"] == "lcc-0000"


# errors ---------------------------------------------------------------------------------------------------------------
def test_bad_input(stories, tmp_path):
    with pytest.raises(ConfigError, match="task.subtasks: unknown LongBench subtask .qaspr.. Did you mean qasper"):
        LongBench(subtasks=["qaspr"]).validate()
    assert len(ALL_SUBTASKS) == 34
    rows = _rows("lcc")
    del rows[0]["answers"]
    (tmp_path / "lcc.jsonl").write_text(json.dumps(rows[0]) + "\n")
    (tmp_path / "trec.jsonl").write_text("\n")
    task = LongBench(subtasks=["lcc"], data_files=str(tmp_path))
    with pytest.raises(DataError, match=r"lcc.jsonl, row 1: missing field\(s\) answers"):
        task.load_subtask("lcc")
    with pytest.raises(DataError, match=r"trec.jsonl is empty"):
        task.load_subtask("trec")
    with pytest.raises(DataError, match=r"no samsum.jsonl in"):
        task.load_subtask("samsum")
    model, tok = stories
    with pytest.raises(ConfigError, match="task.max_new_tokens"):
        LongBench(subtasks=["gov_report"], data_files=str(FIXTURES)).run(Engine(model, tok, Full()), RunContext())
