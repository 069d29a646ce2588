"""lm-eval through the kvx engine: with the full cache, our LM gives what lm-eval's own HF model gives (HellaSwag
accuracy on local items, loglikelihoods, rolling loglikelihoods, greedy generations); compression, model_args,
the `python -m kvx.tasks.harness_cli` command line, sampling and bad input."""

import json
import random
import subprocess
import sys

import pytest
from lm_eval import simple_evaluate
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model
from lm_eval.models.huggingface import HFLM

from kvx.engine import Engine
from kvx.errors import ConfigError, DataError
from kvx.methods.full import Full
from kvx.methods.streaming_llm import StreamingLLM
from kvx.tasks.base import RunContext
from kvx.tasks.harness import KVXLM, Harness, local_task_config, task_manager


@pytest.fixture(scope="module")
def hellaswag(assets):
    return str(assets / "hellaswag" / "validation_first1000.jsonl")


def _hf_hellaswag(stories, path, limit):
    model, tok = stories
    cfg = local_task_config("hellaswag", {"eval": [path]})
    return simple_evaluate(model=HFLM(pretrained=model, tokenizer=tok, batch_size=16), tasks=[cfg], limit=limit,
                           log_samples=True, bootstrap_iters=0, task_manager=task_manager(defaults=False))


def _compare_with_hflm(stories, path, limit):
    model, tok = stories
    ours = Harness(tasks=["hellaswag"], data_files=path, limit=limit, bootstrap_iters=0)
    ours.validate()
    res = ours.run(Engine(model, tok, Full()), RunContext())
    ref = _hf_hellaswag(stories, path, limit)
    assert res.metrics["hellaswag/acc"] == ref["results"]["hellaswag"]["acc,none"]
    assert res.metrics["hellaswag/acc_norm"] == ref["results"]["hellaswag"]["acc_norm,none"]
    ref_ll = {s["doc_id"]: [r[0] for r in s["filtered_resps"]] for s in ref["samples"]["hellaswag"]}
    assert len(res.outputs) == limit
    for out in res.outputs:
        assert [r[0] for r in out["responses"]] == pytest.approx(ref_ll[out["doc_id"]], abs=2e-3)
    return res


def test_hellaswag_equals_lm_eval_hf_20(stories, hellaswag):
    res = _compare_with_hflm(stories, hellaswag, 20)
    # acc and acc_norm as lm-eval defines them: argmax of loglikelihood, and of loglikelihood per character
    items = [json.loads(line) for line in open(hellaswag)][:20]
    from lm_eval.tasks.hellaswag.utils import preprocess

    acc = acc_norm = 0
    for out, item in zip(sorted(res.outputs, key=lambda o: o["doc_id"]), items):
        lls = [r[0] for r in out["responses"]]
        lens = [len(preprocess(e)) for e in item["endings"]]  # characters of the choice
        acc += max(range(4), key=lambda i: lls[i]) == item["label"]
        acc_norm += max(range(4), key=lambda i: lls[i] / lens[i]) == item["label"]
    assert res.metrics["hellaswag/acc"] == acc / 20 and res.metrics["hellaswag/acc_norm"] == acc_norm / 20


@pytest.mark.slow
def test_hellaswag_equals_lm_eval_hf_200(stories, hellaswag):
    _compare_with_hflm(stories, hellaswag, 200)


def _requests(kind, args):
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def test_lm_requests_equal_hflm(stories, assets):
    model, tok = stories
    ours = KVXLM(engine=Engine(model, tok, Full()))
    hf = HFLM(pretrained=model, tokenizer=tok, batch_size=1)
    ll = [("Once upon a time, there was", " a little girl"), ("", "Lily went to the park."), ("The sky is ", "blue")]
    a = ours.loglikelihood(_requests("loglikelihood", ll))
    b = hf.loglikelihood(_requests("loglikelihood", ll))
    for (x, gx), (y, gy) in zip(a, b):
        assert x == pytest.approx(y, abs=1e-3) and gx == gy
    text = " ".join(json.loads(line)["text"] for line in open(assets / "tinystories" / "validation_head.jsonl"))[:3000]
    assert len(tok(text).input_ids) > 600  # more than one rolling window of 512
    r_ours = ours.loglikelihood_rolling(_requests("loglikelihood_rolling", [(text,)]))
    r_hf = hf.loglikelihood_rolling(_requests("loglikelihood_rolling", [(text,)]))
    assert r_ours[0] == pytest.approx(r_hf[0], rel=1e-4)
    gen = [("Once upon a time", {"until": ["\n"], "max_gen_toks": 24, "do_sample": False}),
           ("Tom had a red ball. He", {"until": ["."], "max_gen_toks": 16})]
    assert ours.generate_until(_requests("generate_until", gen)) == hf.generate_until(_requests("generate_until", gen))


def test_compression_applies(stories, hellaswag):
    model, tok = stories
    full = Harness(tasks=["hellaswag"], data_files=hellaswag, limit=4, bootstrap_iters=0).run(
        Engine(model, tok, Full()), RunContext())
    for mode in ("stream", "masked"):
        task = Harness(tasks=["hellaswag"], data_files=hellaswag, limit=4, mode=mode, bootstrap_iters=0)
        res = task.run(Engine(model, tok, StreamingLLM(budget=16, sink=4)), RunContext())
        assert {"hellaswag/acc", "hellaswag/acc_norm"} <= set(res.metrics)
        assert res.metrics["cache_bytes_peak"] < full.metrics["cache_bytes_peak"]
        diffs = [abs(a[0] - b[0]) for o, p in zip(res.outputs, full.outputs) for a, b in
                 zip(o["responses"], p["responses"])]
        assert max(diffs) > 1e-2  # contexts longer than 16 tokens lose tokens


def test_score_through_the_cache(stories):
    model, tok = stories
    ctx = tok("Once upon a time, there was a little girl named Lily. She loved to play").input_ids
    cont = tok(" outside in the park.", add_special_tokens=False).input_ids
    full_eng = Engine(model, tok, Full())
    full = KVXLM(engine=full_eng).score(ctx, cont)[0]
    assert full == pytest.approx(full_eng.loglikelihood(ctx, cont)[0], abs=1e-4)
    for mode in ("stream", "masked"):
        roomy = KVXLM(engine=Engine(model, tok, StreamingLLM(budget=64, sink=4)), mode=mode).score(ctx, cont)[0]
        tight = KVXLM(engine=Engine(model, tok, StreamingLLM(budget=6, sink=2)), mode=mode).score(ctx, cont)[0]
        assert roomy == pytest.approx(full, abs=1e-4)  # nothing evicted: the full cache's number
        assert abs(tight - full) > 1e-2


def test_model_args_and_registry(stories, assets):
    assert get_model("kvx") is KVXLM
    path = assets / "models" / "stories260k"
    lm = KVXLM.create_from_arg_string(f"model={path},method=streaming_llm,budget=32,sink=2,mode=masked",
                                      {"batch_size": 1, "device": "cpu"})
    assert lm.engine.method.budget == 32 and lm.engine.method.sink == 2 and lm.mode == "masked"
    assert lm.max_length == 512
    lm = KVXLM.create_from_arg_string("model=stories260k,method=full,model.dtype=float32")  # a configs/model name
    assert lm.engine.method.name == "full" and lm.tokenizer.bos_token_id == 1
    with pytest.raises(ConfigError, match="model_args.colour"):
        KVXLM.create_from_arg_string(f"model={path},colour=red")
    with pytest.raises(ConfigError, match="unknown method 'h3o'"):
        KVXLM.create_from_arg_string(f"model={path},method=h3o")
    with pytest.raises(ConfigError, match="method.budget"):
        KVXLM.create_from_arg_string(f"model={path},method=streaming_llm,budget=-3")


def test_lm_eval_builds_kvx_from_model_args(assets, hellaswag):
    cfg = local_task_config("hellaswag", {"eval": [hellaswag]})
    res = simple_evaluate(model="kvx", model_args=f"model={assets / 'models' / 'stories260k'},method=streaming_llm,"
                          "budget=32", tasks=[cfg], limit=3, task_manager=task_manager(defaults=False),
                          bootstrap_iters=0)
    assert res["results"]["hellaswag"]["sample_len"] == 3 and "acc,none" in res["results"]["hellaswag"]


@pytest.mark.slow
def test_command_line(tmp_path, assets):
    rows = [{"q": "Once upon a time, there was a little", "choices": [" girl", " table"], "label": 0},
            {"q": "The sun is", "choices": [" hot", " spoon"], "label": 0},
            {"q": "Tom had a red", "choices": [" ball", " sky"], "label": 0}]
    data = tmp_path / "tiny.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "tiny_mc.yaml").write_text(
        "task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: " + str(data) + "\n"
        "output_type: multiple_choice\ntest_split: test\ndoc_to_text: '{{q}}'\ndoc_to_target: label\n"
        "doc_to_choice: choices\nmetric_list:\n  - metric: acc\n")
    args = [sys.executable, "-m", "kvx.tasks.harness_cli", "--model", "kvx", "--model_args",
            f"model={assets / 'models' / 'stories260k'},method=streaming_llm,budget=32", "--tasks", "tiny_mc",
            "--include_path", str(tmp_path), "--device", "cpu", "--output_path", str(tmp_path / "out")]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tiny_mc" in proc.stdout and "acc" in proc.stdout
    results = list((tmp_path / "out").rglob("results*.json"))
    assert results and "tiny_mc" in json.loads(results[0].read_text())["results"]


def test_sample_with_seed(stories, hellaswag):
    model, tok = stories
    task = Harness(tasks=["hellaswag"], data_files=hellaswag, sample=4, seed=7, bootstrap_iters=0)
    task.validate()
    res = task.run(Engine(model, tok, Full()), RunContext())
    assert sorted(o["doc_id"] for o in res.outputs) == sorted(random.Random(7).sample(range(1000), 4))


def test_bad_input(stories, tmp_path, hellaswag):
    model, tok = stories
    eng = Engine(model, tok, Full())
    item = json.loads(open(hellaswag).readline())
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(item) + "\n" + json.dumps({k: v for k, v in item.items() if k != "endings"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl, row 2: missing field\(s\) endings"):
        Harness(tasks=["hellaswag"], data_files=str(bad)).run(eng, RunContext())
    noctx = tmp_path / "noctx.jsonl"
    noctx.write_text(json.dumps({k: v for k, v in item.items() if k != "ctx"}) + "\n")
    with pytest.raises(DataError, match=r"noctx.jsonl, row 1: missing field\(s\) ctx"):
        Harness(tasks=["hellaswag"], data_files=str(noctx)).run(eng, RunContext())
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="empty.jsonl is empty"):
        Harness(tasks=["hellaswag"], data_files=str(empty)).run(eng, RunContext())
    with pytest.raises(ConfigError, match="task.data_files: with several tasks"):
        Harness(tasks=["hellaswag", "piqa"], data_files=str(empty)).validate()
    with pytest.raises(ConfigError, match="task.sample"):
        Harness(sample=10, limit=10).validate()
    with pytest.raises(ConfigError, match="lm-eval knows no task 'hellaswagg'. Did you mean hellaswag"):
        Harness(tasks=["hellaswagg"]).run(eng, RunContext())
    with pytest.raises(DataError, match=r"could not load the data of \['piqa'\].*task.data_files"):
        Harness(tasks=["piqa"]).run(eng, RunContext())  # the tests run with the hub offline
