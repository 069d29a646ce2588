"""run.py end to end: perplexity against plain transformers, results folders, skipping, atomic writes, errors."""

import json

import pytest

from kvx.errors import ConfigError, DataError
from kvx.runner import run
from kvx.tasks.perplexity import tokenize_documents

from .helpers import compose_cfg, hf_window_ppl


def _ids(tok, assets, n):
    docs = [json.loads(line)["text"] for line in open(assets / "tinystories" / "validation_head.jsonl")]
    return tokenize_documents(tok, docs, True, n)


def test_default_run_matches_plain_forward(tmp_path, stories, assets):
    cfg = compose_cfg([f"results_dir={tmp_path}", "progress=false"])
    res = run(cfg)
    model, tok = stories
    ref = hf_window_ppl(model, _ids(tok, assets, 60000))
    assert abs(res.metrics["ppl"] - ref) / ref < 1e-4
    assert abs(res.metrics["ppl"] - 3.669) < 5e-4  # the assets README's measured value
    assert res.metrics["tokens"] == 59999 and res.metrics["mode"] == "stream"
    d = res.run_dir
    assert d.parent.parent.parent.name == "tinystories" and d.parent.parent.name == "stories260k"
    assert d.parent.name == "full"
    for f in ("config.yaml", "metrics.json", "outputs.jsonl", "env.json"):
        assert (d / f).is_file(), f
    m = json.loads((d / "metrics.json").read_text())
    for key in ("ppl", "nll", "tokens", "mode", "cache_bytes_peak", "wall_time"):
        assert key in m
    # full cache: 5 layers x 4 KV heads x 512 tokens x (K + V) x 8 dims x 4 bytes
    assert m["cache_bytes_peak"] == 5 * 4 * 512 * 2 * 8 * 4
    env = json.loads((d / "env.json").read_text())
    assert env["torch"] and "git_commit" in env
    rows = [json.loads(line) for line in (d / "outputs.jsonl").read_text().splitlines()]
    assert len(rows) == m["windows"]


def test_masked_and_stream_agree_for_full(tmp_path):
    common = [f"results_dir={tmp_path}", "progress=false", "task.max_tokens=3000"]
    a = run(compose_cfg(common + ["task.mode=stream"])).metrics["ppl"]
    b = run(compose_cfg(common + ["task.mode=masked"])).metrics["ppl"]
    assert abs(a - b) / a < 1e-4


def test_rerun_is_skipped_unless_forced(tmp_path, capsys):
    common = [f"results_dir={tmp_path}", "progress=false", "task.max_tokens=600"]
    first = run(compose_cfg(common))
    assert not first.skipped
    again = run(compose_cfg(common))
    assert again.skipped and again.run_dir == first.run_dir
    assert "skipped" in capsys.readouterr().out
    forced = run(compose_cfg(common + ["force=true"]))
    assert not forced.skipped and forced.run_dir == first.run_dir


def test_crash_leaves_nothing_half_written(tmp_path, monkeypatch):
    from kvx.tasks.perplexity import Perplexity

    def boom(self, engine, ctx):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(Perplexity, "run", boom)
    with pytest.raises(RuntimeError):
        run(compose_cfg([f"results_dir={tmp_path}", "task.max_tokens=600"]))
    leftovers = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert leftovers == []


def test_validation_happens_before_the_model_loads(tmp_path, monkeypatch):
    import kvx.models

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the config was validated")

    monkeypatch.setattr(kvx.models, "load_model", no_load)
    with pytest.raises(ConfigError, match="method.budget"):
        run(compose_cfg([f"results_dir={tmp_path}", "method=streaming_llm", "method.budget=abc"]))
    with pytest.raises(ConfigError, match="method.budget"):
        run(compose_cfg([f"results_dir={tmp_path}", "method=streaming_llm", "method.budget=-3"]))
    with pytest.raises(ConfigError, match="task.mode"):
        run(compose_cfg([f"results_dir={tmp_path}", "task.mode=fast"]))
    with pytest.raises(ConfigError, match="method.bugdet"):
        run(compose_cfg([f"results_dir={tmp_path}", "method=streaming_llm", "+method.bugdet=3"]))
    with pytest.raises(ConfigError, match="model.dtype"):
        run(compose_cfg([f"results_dir={tmp_path}", "model.dtype=float12"]))


def test_unknown_method_suggests(tmp_path):
    with pytest.raises(ConfigError, match="Did you mean 'streaming_llm'"):
        run(compose_cfg([f"results_dir={tmp_path}", "method.name=streaming_lm"]))
    with pytest.raises(ConfigError, match="unknown task 'perplexty'.*Did you mean 'perplexity'"):
        run(compose_cfg([f"results_dir={tmp_path}", "task.type=perplexty"]))


def test_bad_data_and_context_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        run(compose_cfg([f"results_dir={tmp_path}", f"task.data_files={tmp_path}/nope.jsonl"]))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        run(compose_cfg([f"results_dir={tmp_path}", f"task.data_files={empty}"]))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"txt": "b"}\n')
    with pytest.raises(DataError, match="row 2: missing field"):
        run(compose_cfg([f"results_dir={tmp_path}", f"task.data_files={bad}"]))
    with pytest.raises(ConfigError, match="max_position_embeddings=512"):
        run(compose_cfg([f"results_dir={tmp_path}", "task.window=1024"]))
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("metrics.json"))


def test_unwritable_results_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="results_dir"):
        run(compose_cfg([f"results_dir={blocker}/sub", "task.max_tokens=600"]))


def test_missing_assets_folder_names_the_setting(tmp_path, monkeypatch):
    monkeypatch.setenv("KVX_ASSETS", str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="KVX_ASSETS"):
        run(compose_cfg([f"results_dir={tmp_path}", "task.max_tokens=600"]))


def test_other_perplexity_corpora_match_plain_forward(tmp_path, stories, assets):
    model, tok = stories
    for task, path in (("wikitext2", "wikitext2/wiki.test.raw"), ("pg19", "pg19/test_book1.txt")):
        res = run(compose_cfg([f"results_dir={tmp_path}", f"task={task}", "task.max_tokens=3000", "progress=false"]))
        ids = tokenize_documents(tok, [(assets / path).read_text()], True, 3000)
        ref = hf_window_ppl(model, ids)
        assert abs(res.metrics["ppl"] - ref) / ref < 1e-4


def test_random_model_runs(tmp_path):
    res = run(compose_cfg([f"results_dir={tmp_path}", "model=random", "model.num_layers=1", "model.hidden_size=64",
                           "model.num_heads=4", "model.num_kv_heads=2", "model.vocab_size=512",
                           "model.max_position_embeddings=512", "task.max_tokens=1000", "progress=false"]))
    assert res.metrics["ppl"] > 100  # untrained: near-uniform over 512 tokens
