"""scripts/bench.py: the bytes each method promises against the bytes its cache holds, the geometry arithmetic, the
goal verdicts and the report from given numbers, and one small measured point. No timing is asserted."""

import importlib.util
import inspect
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from kvx.config import build_method
from kvx.engine import Engine
from kvx.models import ModelConfig, load_model

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(name="tiny", random=True, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
            intermediate_size=96, vocab_size=512, dtype="float32", device="cpu")


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"kvx_{name}_script", ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def bench():
    return load_script("bench")


@pytest.fixture(scope="module")
def tiny():
    return load_model(ModelConfig(**TINY))


def bench_cfg(overrides=()):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose(config_name="bench", overrides=list(overrides))


# --- geometry -----------------------------------------------------------------------------------------------------------
LLAMA3_8B = dict(num_layers=32, hidden_size=4096, num_heads=32, num_kv_heads=8, intermediate_size=14336,
                 vocab_size=128256)


def test_llama_params_hand_values(bench, tiny):
    assert bench.llama_params(LLAMA3_8B) == 8_030_261_248  # Llama-3-8B's published parameter count
    assert bench.kv_bytes_per_token(LLAMA3_8B, 2) == 131072  # 32 layers x 8 heads x 2 x 128 x 2 bytes
    model, _ = tiny
    assert bench.llama_params(TINY) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("key", ["gqa", "mha"])
def test_grid_models_match_their_reference_ratio(bench, key):
    """The configured models: head_dim 128, the GQA ratio of their reference, and a cache / weight ratio within 2x
    of the reference's (Llama-3-8B for gqa, Llama-2-7B for mha)."""
    cfg = bench_cfg()
    m = dict(cfg.models[key])
    ref = dict(cfg.references[cfg.compare[key]])
    assert m["hidden_size"] // m["num_heads"] == 128
    assert m["num_heads"] // m["num_kv_heads"] == ref["num_heads"] // ref["num_kv_heads"]
    r = bench.cache_weight_ratio(m, 4096, 8) / bench.cache_weight_ratio(ref, 4096, 8)
    assert 0.5 <= r <= 2.0
    # the ratio scales with B x T alike for both: Llama-3-8B's at 16k tokens and batch 8, by hand
    assert bench.cache_weight_ratio(LLAMA3_8B, 16384, 8) == pytest.approx(8 * 16384 * 65536 / 8_030_261_248)


# --- bytes against the promise --------------------------------------------------------------------------------------------
METHODS = {
    "full": {"name": "full"},
    "streaming_llm": {"name": "streaming_llm", "budget": 24, "sink": 4},
    "h2o": {"name": "h2o", "budget": 24},
    "tova": {"name": "tova", "budget": 24},
    "snapkv": {"name": "snapkv", "budget": 24, "window": 4, "kernel_size": 3},
    "scissorhands": {"name": "scissorhands", "budget": 24, "history": 8},
    "infinipot": {"name": "infinipot", "budget": 32, "cap_prompt": "Summarize."},
    "uniform4": {"name": "uniform", "bits": 4},
    "uniform3-groups": {"name": "uniform", "bits": 3, "group_size": 8, "residual": 5},
    "kivi2": {"name": "kivi", "bits": 2, "group_size": 8, "residual": 16},
    "kivi2-grouped": {"name": "kivi", "bits": 2, "group_size": 8, "residual": 12, "residual_rule": "grouped"},
    "qaq": {"name": "qaq", "residual": 4},
}


def hand_promise(name, n, B, L=2, H=2, D=16, db=4):
    """Bytes by hand for the tiny geometry (n tokens fed, forwards of 40, 40, 20, then 1 each)."""
    tok = L * H * 2 * D * db * B
    if name == "full":
        return n * tok
    if name in ("streaming_llm", "h2o", "tova", "snapkv", "scissorhands"):
        return 24 * tok
    if name == "uniform4":  # residual 0: the last token is still in full precision (it moves before the next forward)
        return L * H * B * ((n - 1) * 2 * (8 + 4) + 1 * 2 * D * db)  # codes, zero/scale (fixed width)
    if name == "uniform3-groups":  # groups of 8 channels: 2 zero/scale pairs per row; 5 + 1 rows in full precision
        return L * H * B * ((n - 6) * 2 * (6 + 2 * 4) + 6 * 2 * D * db)
    return None


@pytest.mark.parametrize("name", list(METHODS))
def test_promise_matches_the_bytes_held(bench, tiny, name):
    model, tok = tiny
    engine = Engine(model, tok, build_method(METHODS[name]))
    B, new = 2, 5
    ids = torch.randint(3, 500, (B, 100), generator=torch.Generator().manual_seed(1))
    res = bench.run_kvx(engine, ids, new, 40, torch.device("cpu"))
    promised, kind = res["promise"], res["promise_kind"]
    assert promised > 0 and bench.promise_met(res["cache_bytes"], promised, kind), (res["cache_bytes"], promised)
    assert kind == {"full": "exact", "infinipot": "bound"}.get(name, "quant" if name[:3] in "uniqaqkiv" else "exact")
    by_hand = hand_promise(name, 100 + new, B)
    if by_hand is not None:
        assert promised == by_hand
    if kind == "exact":
        assert res["cache_bytes"] == promised  # eviction holds exactly its budget
    assert len(res["steps"]) == new and res["decode_peak"] is not None


def test_promise_of_less_adds_its_state(bench, tiny):
    model, tok = tiny
    entry = {"method": {"name": "less", "base": {"name": "h2o"}, "rank": 4}, "random_maps": True, "hidden": 8}
    engine = bench.build_system(entry, 24, model, tok, seed=0)
    ids = torch.randint(3, 500, (1, 60), generator=torch.Generator().manual_seed(2))
    res = bench.run_kvx(engine, ids, 4, 30, torch.device("cpu"))
    state = 2 * 2 * (4 * 16 + 4) * 4  # layers x KV heads x (R x D + R) float32
    assert res["promise"] == 24 * 2 * 2 * 2 * 16 * 4 + state == res["cache_bytes"]


def test_residual_after_follows_the_flush_rule(bench):
    assert bench.residual_after([40, 40, 20, 1, 1], residual=0, block=1) == 1
    assert bench.residual_after([40, 40], residual=12, block=8) == 12 + 4 + 40  # 40 -> 16 + 4 after a flush
    assert bench.residual_after([10], residual=12, block=8) == 10


def test_transformers_cache_bytes(bench, tiny):
    """generate's DynamicCache: every token but the last generated one, K and V per layer and KV head."""
    model, _ = tiny
    ids = torch.randint(3, 500, (2, 50), generator=torch.Generator().manual_seed(3))
    res = bench.run_generate(model, {"kind": "generate"}, ids, 4, torch.device("cpu"))
    assert res["cache_bytes"] == (50 + 3) * 2 * 2 * 2 * 16 * 4 * 2
    assert len(res["steps"]) == 3 and res["prefill_s"] > 0


# --- goals and report from given numbers ------------------------------------------------------------------------------------
def row(system, B, T, dec, prefill_peak=100.0, cache=1000, promise=1000, kind="exact"):
    r = {"model": "gqa", "system": system, "batch": B, "context": T, "status": "ok", "prefill_s": 1.0,
         "decode_s_tok": dec, "tok_s": B / dec, "prefill_peak": prefill_peak, "decode_peak": 50.0,
         "prefill_wall_s": 2.0, "decode_wall_s_tok": 2 * dec,
         "cache_bytes": cache, "cache_aux": 0, "promise": promise, "promise_kind": kind}
    r["promise_ratio"] = cache / promise if promise else None
    return r


def fake_results():
    rows = []
    for B in (1, 8):
        for T in (1024, 16384):
            s = T / 1024
            rows += [row("generate", B, T, 0.010 * B * s, promise=0, kind="none"),
                     row("full", B, T, 0.011 * B * s, prefill_peak=1000.0),
                     row("h2o", B, T, 0.010 * B * (1.1 if T > 1024 else 1.0), prefill_peak=1200.0),
                     row("tova", B, T, 0.010 * B * (1.5 if T > 1024 else 1.0), prefill_peak=1400.0,
                         cache=1030, promise=1000),
                     row("kivi2", B, T, 0.011 * B * s * 0.5, cache=1040, promise=1000, kind="quant"),
                     row("uniform4", B, T, 0.011 * B * s * 1.2, cache=1000, promise=1000, kind="quant")]
    kinds = {"generate": "generate", "full": "full", "h2o": "h2o", "tova": "tova", "kivi2": "kivi",
             "uniform4": "uniform"}
    entries = {"kivi2": {"method": {"name": "kivi", "bits": 2}}, "uniform4": {"method": {"name": "uniform", "bits": 4}}}
    return {"rows": rows, "systems": list(kinds), "kinds": kinds, "entries": entries, "budget": 512, "name": "test",
            "models": {"gqa": {"config": {**TINY, "num_layers": 1}, "reference": "llama3-8b", "params": 1e6,
                               "head_dim": 16, "kv_bytes_per_token": 256, "ratio_per_token": 1e-5,
                               "reference_ratio_per_token": 8e-6, "ratio_vs_reference": 1.25}},
            "grid": {"new_tokens": 8, "repeats": 1, "prefill_chunk": 1024, "warmup_tokens": 640},
            "env": {"device": "cpu", "device_type": "cpu", "torch": "x", "threads": 1, "kernels": "auto",
                    "triton_decode": False, "isolated": True, "wall_s": 60.0}}


def test_goal_verdicts_from_given_numbers(bench):
    evals = [{"method": "full", "mode": "stream", "status": "ok", "tok_s": 900.0, "vs_full": 1.0},
             {"method": "h2o", "mode": "stream", "status": "ok", "tok_s": 450.0, "vs_full": 0.5},
             {"method": "tova", "mode": "masked", "status": "ok", "tok_s": 10.0, "vs_full": 0.2},
             {"method": "sirllm", "mode": "masked", "status": "n/a (no masked form)"},
             {"method": bench.TOKEN_BY_TOKEN, "mode": "stream", "status": "ok", "tok_s": 90.0, "vs_full": 0.1}]
    goals = {g["goal"]: (g["figure"], g["verdict"]) for g in bench.evaluate_goals(fake_results(), evals)}
    # full at B=8, 16k: 0.011 * 8 * 16 = 1.408 s; h2o 0.088 s -> 16x; tova 0.12 s -> 11.7x
    assert goals["[gqa] h2o decode vs full, B=8, 16384 tokens, budget 512"] == ("16.00x faster", "met")
    assert goals["[gqa] h2o decode 16384 / 1024 tokens, B=1"] == ("x1.10", "met")
    assert goals["[gqa] tova decode 16384 / 1024 tokens, B=8"] == ("x1.50", "NOT met")
    assert goals["[gqa] kivi2 decode 16384 / 1024 tokens, B=1"][1] == "–"  # quantized: the cache grows
    assert goals["[gqa] kvx full / model.generate, decode time per token (median over 4 points)"] == ("1.10", "NOT met")
    assert goals["[gqa] kivi2 decode / full, B=1, 16384 tokens"] == ("0.50", "met")
    assert goals["[gqa] uniform4 decode / full, B=8, 16384 tokens"] == ("1.20", "NOT met")
    assert goals["[gqa] h2o prefill peak memory / full's, B=1, 16384 tokens"] == ("1.20", "met")
    assert goals["[gqa] tova prefill peak memory / full's, B=8, 16384 tokens"] == ("1.40", "NOT met")
    assert goals["[gqa] tova cache bytes / promise, worst of 4 points"] == ("1.0300", "NOT met")  # beyond 2%
    assert goals["[gqa] kivi2 cache bytes / promise, worst of 4 points"] == ("1.0400", "met")  # within 5%
    assert goals["evaluation throughput h2o / full, stream mode"] == ("0.50", "met")
    assert goals["evaluation throughput tova / full, masked mode"] == ("0.20", "NOT met")
    assert goals["evaluation throughput sirllm / full, masked mode"] == ("n/a (no masked form)", "–")
    assert not any("one token per forward" in g for g in goals)


def test_bytes_bound_hand_value(bench):
    """(1 + B T r) / (1 + B b r): r = 1e-5 per token, B = 8, T = 16384, b = 512 -> 2.31072 / 1.04096 = 2.22."""
    info = {"ratio_per_token": 1e-5, "reference_ratio_per_token": 2e-5, "reference": "ref"}
    assert bench.bytes_bound(info, 8, 16384, 512) == "; bytes-read bound 2.22x (ref: 3.35x)"  # 3.62144 / 1.08192
    assert bench.bytes_bound({}, 8, 16384, 512) == ""


def test_goals_not_in_the_grid_are_listed(bench):
    res = fake_results()
    res["rows"] = [r for r in res["rows"] if r["context"] == 1024]
    goals = {g["goal"]: g for g in bench.evaluate_goals(res, [])}
    g = goals["[gqa] eviction decode vs full, B=8, 16384 tokens"]
    assert (g["figure"], g["verdict"]) == ("–", "–")


def test_report_files(bench, tmp_path):
    res = fake_results()
    goals = bench.evaluate_goals(res, [])
    bench.write_report(res, [], goals, tmp_path, "python scripts/bench.py bench=scale")
    md = (tmp_path / "bench.md").read_text()
    assert md.splitlines()[2] == "Command: `python scripts/bench.py bench=scale`"
    assert "| gqa | 8 | 16384 | h2o |" in md and "| [gqa] h2o decode vs full, B=8, 16384 tokens, budget 512 |" in md
    for name in ("bench.json", "decode_time.png", "peak_memory.png"):
        assert (tmp_path / name).stat().st_size > 0


# --- one measured point, through the grid code ----------------------------------------------------------------------------
def test_small_grid_runs_in_forked_processes(bench, tmp_path):
    tiny = ", ".join(f"{k}: {v}" for k, v in TINY.items())
    cfg = bench_cfg([f"models.gqa={{{tiny}}}", "grid.models=[gqa]", "grid.new_tokens=3", "grid.warmup_tokens=20",
                     "grid.points=[{batch: 1, contexts: [40], systems: [generate, full, h2o]}]", "budget=16",
                     "isolate=fork", "eval.enabled=false", f"out={tmp_path}"])
    res = bench.measure(cfg)
    rows = {r["system"]: r for r in res["rows"]}
    assert set(rows) == {"generate", "full", "h2o"} and all(r["status"] == "ok" for r in rows.values())
    assert rows["full"]["cache_bytes"] == (40 + 3) * 2 * 2 * 2 * 16 * 4 and rows["full"]["promise_met"]
    assert rows["h2o"]["cache_bytes"] == 16 * 2 * 2 * 2 * 16 * 4
    assert rows["full"]["prefill_peak"] is not None and rows["full"]["decode_peak"] is not None


# --- the GPU check, as far as a CPU goes -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gpu_check():
    return load_script("gpu_check")


def test_gpu_check_peak_table(gpu_check):
    assert gpu_check.peak_bandwidth("NVIDIA H200") == 4.8e12
    assert gpu_check.peak_bandwidth("NVIDIA H100 80GB HBM3") == 3.35e12
    assert gpu_check.peak_bandwidth("NVIDIA H100 PCIe") == 2.0e12
    assert gpu_check.peak_bandwidth("NVIDIA A100-SXM4-80GB") == 2.039e12
    assert gpu_check.peak_bandwidth("NVIDIA A100-SXM4-40GB") == 1.555e12
    assert gpu_check.peak_bandwidth("Tesla T4") is None
    # one Llama-3-8B layer at batch 8 and 16k tokens, bf16: K and V are 8 x 8 x 16384 x 128 x 2 bytes each
    assert gpu_check.dense_bytes(8, 32, 8, 16384, 128, 2) == 2 * 8 * 8 * 16384 * 128 * 2 + 2 * 8 * 32 * 128 * 2


def test_gpu_check_runs_split_k_natively(gpu_check):
    """make gpu-check runs the quantized decode kernel split-K on CUDA: several explicit split counts and the default,
    slot blocks of at least 16 (tests/test_quant_kernels.py runs the same under TRITON_INTERPRET)."""
    assert "quant_split_checks(dtype, g)" in inspect.getsource(gpu_check.kernel_checks)
    splits = [s for s, _ in gpu_check.SPLITS]
    assert None in splits and len({s for s in splits if s and s > 1}) >= 2
    assert min(b for _, b in gpu_check.SPLITS) >= 16 and len({b for _, b in gpu_check.SPLITS}) >= 3


def test_gpu_check_dry_run_says_unmeasured(gpu_check, tmp_path):
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path)]) == 0
    md = (tmp_path / "cuda.md").read_text()
    assert md.splitlines()[2] == f"Command: `python scripts/gpu_check.py --dry-run --out {tmp_path}`"
    assert "**Unmeasured**" in md and "make gpu-check" in md and "| unmeasured |" in md and "GB/s" in md


def test_eval_throughput_through_the_runner(bench):
    cfg = bench_cfg(["eval.max_tokens=80", "eval.methods=[streaming_llm, sirllm]", "eval.modes=[stream, masked]",
                     "eval.overrides=['task.window=32']"])
    rows = {(r["mode"], r["method"]): r for r in bench.eval_throughput(cfg)}
    assert rows[("stream", "full")]["vs_full"] == 1.0 and rows[("stream", "full")]["tokens"] == 79
    assert rows[("masked", "streaming_llm")]["tok_s"] > 0 and rows[("stream", "sirllm")]["status"] == "ok"
    assert rows[("masked", "sirllm")]["status"] == "n/a (no masked form)"
    # the full cache one token per forward: the same numbers as full in one forward, as a reference row only
    tbt = rows[("stream", bench.TOKEN_BY_TOKEN)]
    assert abs(tbt["ppl"] - rows[("stream", "full")]["ppl"]) < 1e-4 and ("masked", bench.TOKEN_BY_TOKEN) not in rows


def test_a_point_past_its_timeout_is_stopped(bench, tiny):
    model, tok = tiny
    job = {"model": model, "tokenizer": tok, "entry": {"method": {"name": "full"}}, "budget": 16, "batch": 1,
           "context": 400, "seed": 0, "threads": 1,
           "grid": {"warmup_tokens": 400, "new_tokens": 50, "prefill_chunk": 64}}
    r = bench.run_isolated(job, isolate=True, timeout=0.01)
    assert r["status"].startswith("error: stopped after 0 s")


def test_grids_compose_and_a_point_may_name_its_models(bench):
    for grid in ("default", "scale", "scale_b8", "cuda"):
        cfg = bench_cfg([f"bench={grid}"])
        pts = bench.grid_points(cfg)
        assert pts and cfg.name == grid
    pts = bench.grid_points(bench_cfg())
    assert ("gqa", 8, 1024) in {p[:3] for p in pts} and ("mha", 8, 1024) not in {p[:3] for p in pts}
    scale: dict = {}
    for p in bench.grid_points(bench_cfg(["bench=scale"])):
        scale.setdefault(p[:3], []).extend(p[3])
    assert sorted(scale[("gqa", 1, 16384)]) == sorted(bench.system_label(e, 512) for e in bench_cfg().systems)


def test_points_past_the_time_budget_are_listed_not_run(bench, tmp_path):
    tiny = ", ".join(f"{k}: {v}" for k, v in TINY.items())
    cfg = bench_cfg([f"models.gqa={{{tiny}}}", "grid.models=[gqa]", "grid.new_tokens=2", "grid.warmup_tokens=10",
                     "grid.points=[{batch: 1, contexts: [20], systems: [full, h2o]}]", "budget=8", "isolate=none",
                     "+grid.max_minutes=0", "eval.enabled=false", f"out={tmp_path}"])
    rows = bench.measure(cfg)["rows"]
    assert [r["status"] for r in rows] == ["not run: past the grid's time budget (grid.max_minutes=0)"] * 2
