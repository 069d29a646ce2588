"""The pot_ppl task beyond the context and with an unbounded prefill: concatenated stories, scored from a position,
checked against plain transformers forwards."""

import math

import pytest
import torch
import torch.nn.functional as F

from kvx.engine import Engine
from kvx.errors import ConfigError
from kvx.methods.full import Full
from kvx.methods.snapkv import SnapKV
from kvx.tasks.base import RunContext
from kvx.tasks.pot_ppl import PotPerplexity


def _hf_nll(model, ids: list[int], n: int) -> float:
    """Summed loss of the last n tokens from one plain transformers forward."""
    x = torch.tensor([ids])
    with torch.no_grad():
        logits = model(input_ids=x[:, :-1]).logits[0].float()
    return float(F.cross_entropy(logits[-n:], x[0, -n:], reduction="sum"))


def test_concatenated_sequences_scored_beyond_a_position(stories, assets):
    model, tok = stories
    task = PotPerplexity(data_files=str(assets / "tinystories" / "validation_head.jsonl"), min_tokens=2,
                         max_tokens=None, concat_tokens=700, score_from=512, limit=2)
    task.validate()
    seqs = task.stories(tok)
    assert [len(ids) for _, ids in seqs] == [700, 700]
    # consecutive whole stories, BOS before each: the first sequence starts the file, the second the next story
    first = [tok.bos_token_id] + list(tok(_doc(assets, 0), add_special_tokens=False).input_ids)
    assert seqs[0][1][: len(first)] == first[:700] and seqs[0][0] == 0 and seqs[1][0] > 0
    assert seqs[1][1][0] == tok.bos_token_id
    engine = Engine(model, tok, Full())
    engine.allow_beyond_context = True  # as the runner sets it from task.allow_beyond_context
    res = task.run(engine, RunContext())
    assert res.metrics["tokens"] == 2 * (700 - 512)
    ref = sum(_hf_nll(model, ids, 700 - 512) for _, ids in seqs)
    assert res.metrics["ppl"] == pytest.approx(math.exp(ref / res.metrics["tokens"]), rel=1e-5)


def test_full_prefill_with_a_budget_that_holds_everything_is_the_full_cache(stories, assets):
    model, tok = stories
    task = PotPerplexity(data_files=str(assets / "tinystories" / "validation_head.jsonl"), limit=2, prefill="full")
    task.validate()
    method = SnapKV(budget=512, window=8)
    method.validate()
    res = task.run(Engine(model, tok, method), RunContext())
    ref, n = 0.0, 0
    for _, ids in task.stories(tok):
        k = task.n_scored(len(ids))
        ref += _hf_nll(model, ids, k)
        n += k
    assert res.metrics["tokens"] == n
    assert res.metrics["ppl"] == pytest.approx(math.exp(ref / n), rel=1e-5)
    # a small budget: the context is compressed after its one forward, so the ending is scored worse
    small = SnapKV(budget=32, window=8)
    small.validate()
    worse = task.run(Engine(model, tok, small), RunContext())
    assert worse.metrics["ppl"] > res.metrics["ppl"]
    # the unbounded prefill held the whole context (every token before the scored ones) at once
    per_token = res.metrics["cache_bytes_peak"] / max(len(ids) - 1 for _, ids in task.stories(tok))
    context = max(len(ids) - task.n_scored(len(ids)) for _, ids in task.stories(tok))
    assert worse.metrics["cache_bytes_peak"] == pytest.approx(per_token * context)


def test_bad_settings_name_the_field():
    with pytest.raises(ConfigError, match="task.prefill"):
        PotPerplexity(prefill="chunks").validate()
    with pytest.raises(ConfigError, match="task.prefill"):
        PotPerplexity(prefill="full", mode="masked").validate()
    with pytest.raises(ConfigError, match="task.score_from"):
        PotPerplexity(concat_tokens=600, score_from=600).validate()
    with pytest.raises(ConfigError, match="task.concat_tokens"):
        PotPerplexity(concat_tokens=1).validate()


def _doc(assets, i: int) -> str:
    import json

    lines = (assets / "tinystories" / "validation_head.jsonl").read_text().splitlines()
    return json.loads(lines[i])["text"]
