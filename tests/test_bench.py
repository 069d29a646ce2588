"""scripts/bench.py: the ratios and the report from measurements given here (no timing is asserted)."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("kvx_bench_script", ROOT / "scripts" / "bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def row(system, B, T, dec, cache, prefill=1.0):
    return {"system": system, "batch": B, "context": T, "prefill_s": prefill, "decode_s_tok": dec, "tok_s": B / dec,
            "cache_bytes": cache, "cache_peak": None, "peak_mem": None}


def fake_results():
    rows = []
    for B in (1, 8):
        for T in (1024, 4096):
            rows.append(row("transformers", B, T, 0.010 * B * T / 1024, 1000 * B * T, prefill=2.0))
            rows.append(row("full", B, T, 0.011 * B * T / 1024, 1000 * B * T, prefill=3.0))
            rows.append(row("streaming_llm@512", B, T, 0.004 * B, 1000 * B * 512))
    return {"rows": rows, "systems": ["transformers", "full", "streaming_llm@512"], "skipped": ["h2o"],
            "grid": {"new_tokens": 8, "warmup": 1, "repeats": 3, "prefill_chunk": 1024},
            "model": {"random": True, "hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
                      "dtype": "float32", "name_or_path": ""},
            "budget": 512,
            "env": {"device": "cpu", "device_type": "cpu", "torch": "x", "threads": 1, "kernels": "auto",
                    "triton_decode": False, "wall_s": 1.0}}


def test_ratios_from_given_measurements(bench):
    rat = bench.ratios(fake_results())
    vt = {(r["batch"], r["context"]): r for r in rat["vs_transformers"]}
    assert vt[(8, 4096)]["decode"] == pytest.approx(1.1) and vt[(1, 1024)]["prefill"] == pytest.approx(1.5)
    vf = {(r["batch"], r["context"]): r for r in rat["vs_full"]}
    # full at B=8, 4096: 0.011 * 32 = 0.352 s; streaming: 0.032 s -> 11x faster, cache 512/4096
    assert vf[(8, 4096)]["speedup"] == pytest.approx(0.352 / 0.032)
    assert vf[(8, 4096)]["cache_bytes"] == pytest.approx(512 / 4096)
    flat = {(r["batch"], r["system"]): r for r in rat["flat"]}
    assert flat[(1, "full")]["decode"] == pytest.approx(4.0) and flat[(1, "full")]["cache_bytes"] == pytest.approx(4.0)
    assert flat[(8, "streaming_llm@512")]["decode"] == pytest.approx(1.0)
    text = "\n".join(rat["targets"])
    assert "worst 1.10 (target <= 1.10: met)" in text
    assert "streaming_llm@512 vs full, B=8, 4096 tokens: decode 11.00x faster" in text


def test_report_files(bench, tmp_path):
    res = fake_results()
    bench.write_report(res, bench.ratios(res), tmp_path, "python scripts/bench.py budget=512")
    md = (tmp_path / "bench.md").read_text()
    assert md.splitlines()[2] == "Command: `python scripts/bench.py budget=512`"
    assert "| 8 | 4096 | streaming_llm@512 |" in md and "Not registered, skipped: h2o." in md
    for name in ("bench.json", "time_per_token.png", "cache_bytes.png"):
        assert (tmp_path / name).stat().st_size > 0
