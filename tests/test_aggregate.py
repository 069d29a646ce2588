"""scripts/aggregate.py on synthetic run folders: tables hold the numbers written, missing runs are named, output is
byte-for-byte repeatable."""

import csv
import importlib.util
import json
import math
import sys

import pytest

from .helpers import REPO

spec = importlib.util.spec_from_file_location("aggregate", REPO / "scripts" / "aggregate.py")
A = importlib.util.module_from_spec(spec)
sys.modules["aggregate"] = A
spec.loader.exec_module(A)

FULL_BYTES = 655360


def _write(run, metrics, outputs=()):
    run.run_dir.mkdir(parents=True, exist_ok=True)
    base = {"task": run.cfg["task"]["name"], "model": run.model, "method": run.method, "mode": run.mode,
            "wall_time": 1.0 + len(str(run.run_dir)) % 7}  # a timing: must never reach a table
    (run.run_dir / "metrics.json").write_text(json.dumps({**base, **metrics}))
    (run.run_dir / "outputs.jsonl").write_text("".join(json.dumps(o) + "\n" for o in outputs))
    (run.run_dir / "env.json").write_text(json.dumps({"kvx_source_digest": A.checkout_digest()}))


def _eviction_ppl(method, budget, mode):
    """A made-up perplexity per cell, distinct everywhere."""
    if method == "full":
        return 3.75
    rank = ["streaming_llm", "h2o", "tova", "snapkv", "scissorhands", "sirllm"].index(method)
    return 3.75 + 64.0 / budget + 0.01 * rank + (0.001 if mode == "stream" else 0.0)


@pytest.fixture(scope="module")
def eviction(tmp_path_factory):
    root = tmp_path_factory.mktemp("res")
    plan = A.plan("eviction_ppl", "cpu", root)
    assert len(plan.runs) == 2 + 5 * 3 * 2 + 3
    for r in plan.runs:
        b = r.get("method.budget")
        _write(r, {"ppl": _eviction_ppl(r.method, b, r.mode),
                   "cache_bytes_peak": FULL_BYTES if r.method == "full" else b * 1280, "acc": 0.5})
    return root


def _csv(path):
    with path.open() as fh:
        return list(csv.DictReader(fh))


def test_eviction_table_holds_the_numbers(eviction, tmp_path):
    out = A.aggregate(["eviction_ppl"], ["cpu"], eviction, tmp_path / "tables", tmp_path / "figures")
    rows = {r["method"]: r for r in _csv(tmp_path / "tables" / "eviction_ppl.csv")}
    assert list(rows) == ["full", "streaming_llm", "h2o", "tova", "scissorhands", "snapkv", "sirllm"]
    for meth, row in rows.items():
        assert row["scale"] == "cpu" and row["model"] == "stories260k"
        for b in (32, 64, 128):
            for mode in ("masked", "stream"):
                cell = row[f"{b} {mode}"]
                if meth == "sirllm" and mode == "masked":
                    assert cell == "–"
                else:  # no outputs.jsonl rows here: no interval, the best of each column starred
                    assert cell.rstrip("*") == f"{_eviction_ppl(meth, b, mode):.3f}"
                    assert cell.endswith("*") == (meth == "streaming_llm")
    md = (tmp_path / "tables" / "eviction_ppl.md").read_text()
    assert "## scale=cpu · model stories260k" in md and "python run.py experiment=eviction_ppl scale=cpu" in md
    assert "| h2o | 40.0 | 80.0 | 160.0 |" in md  # measured KiB per budget
    assert "largest |ppl difference| 1.00e-03 over 16 pairs" in md
    assert "wall" not in md
    pngs = [p for p in out["eviction_ppl"] if p.suffix == ".png"]
    assert len(pngs) == 3 and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert all(f"(../figures/{p.name})" in md for p in pngs)


def test_output_is_repeatable(eviction, tmp_path):
    a = A.aggregate(["eviction_ppl"], ["cpu"], eviction, tmp_path / "a" / "tables", tmp_path / "a" / "figures")
    b = A.aggregate(["eviction_ppl"], ["cpu"], eviction, tmp_path / "b" / "tables", tmp_path / "b" / "figures")
    for pa, pb in zip(a["eviction_ppl"], b["eviction_ppl"]):
        assert pa.name == pb.name and pa.read_bytes() == pb.read_bytes(), pa.name


def test_missing_runs_are_named(eviction, tmp_path):
    plan = A.plan("eviction_ppl", "cpu", eviction)
    victim = next(r for r in plan.runs if r.method == "tova" and r.get("method.budget") == 64 and r.mode == "stream")
    moved = victim.run_dir.with_name("elsewhere")
    victim.run_dir.rename(moved)
    try:
        with pytest.raises(A.MissingRuns) as e:
            A.aggregate(["eviction_ppl"], None, eviction, tmp_path / "t", tmp_path / "f")
        msg = str(e.value)
        assert "eviction_ppl (scale=cpu): 1 of 35 runs missing" in msg
        assert "task.mode=stream method=tova method.budget=64" in msg and str(victim.run_dir) in msg
        assert "python run.py experiment=eviction_ppl scale=cpu" in msg
        assert not (tmp_path / "t" / "eviction_ppl.md").exists()
    finally:
        moved.rename(victim.run_dir)
    # a scale with no runs at all is skipped (gpu here), unless asked for by name
    assert list(A.aggregate(["eviction_ppl"], None, eviction, tmp_path / "t", tmp_path / "f")) == ["eviction_ppl"]
    assert "scale=gpu" not in (tmp_path / "t" / "eviction_ppl.md").read_text()
    with pytest.raises(A.MissingRuns, match=r"eviction_ppl \(scale=gpu\): 35 of 35 runs missing"):
        A.aggregate(["eviction_ppl"], ["gpu"], eviction, tmp_path / "t", tmp_path / "f")
    with pytest.raises(A.MissingRuns, match="no runs at any scale"):
        A.aggregate(["eviction_ppl"], None, tmp_path / "empty", tmp_path / "t", tmp_path / "f")


def _hits(n_ok: int, n: int = 200) -> list[dict]:
    """Per-token next-token hits of one 200-token window: the first n_ok right."""
    return [{"begin": 0, "end": n, "tokens": n, "hits": "1" * n_ok + "0" * (n - n_ok)}]


def test_qaq_table_max_compression_under_one_percent(tmp_path):
    plan = A.plan("qaq_table1", "cpu", tmp_path)
    assert {r.model for r in plan.runs} == {"stories260k", "random"}
    for r in plan.runs:
        if r.method == "full":
            ok, nbytes = 130, FULL_BYTES
        elif r.method == "qaq":
            e = float(r.get("method.key_error"))
            ok, nbytes = 130 - (1 if e < 1 else 6), int(FULL_BYTES / (4 + 2 * e + r.get("method.min_bits")))
        else:
            bits = r.get("method.bits")
            ok, nbytes = 130 - (4 if bits == 2 else 0), FULL_BYTES * bits // 16 + (64 if r.get("method.outliers") else 0)
        _write(r, {"acc": ok / 200, "ppl": 4.0 - ok / 200, "cache_bytes_peak": nbytes, "cache_offload_bytes": 0,
                   "compression_bytes": FULL_BYTES / nbytes, "compression_bits": 1.5 * FULL_BYTES / nbytes},
               _hits(ok))
    A.aggregate(["qaq_table1"], ["cpu"], tmp_path, tmp_path / "tables", tmp_path / "figures")
    rows = {r["method"]: r for r in _csv(tmp_path / "tables" / "qaq_table1.csv")}
    assert set(rows) == {"uniform", "kivi", "qaq"} and rows["qaq"]["acc (full)"] == "0.6500"
    # qaq: 1 token of 200 fewer (< 1% relative) only for e = 0.5; of those, min_bits 2 compresses most: 4 + 1 + 2
    assert rows["qaq"]["best setting"] == "key_error=0.5 value_error=0.5"
    assert rows["qaq"]["compression (bytes)"] == f"{4 + 1 + 2:.2f}×"
    assert rows["qaq"]["compression (bits)"] == f"{1.5 * (4 + 1 + 2):.2f}×"
    assert rows["qaq"]["Δacc (points) [95%]"].startswith("-0.50 [")
    # uniform/kivi: 2 bits drop 2 points -> the 4-bit point wins (uniform's 8 bits compress less)
    assert rows["uniform"]["best setting"] == "bits=4" and rows["kivi"]["best setting"] == "bits=4"
    # the paper reports no TinyStories value: "–", not a number (its Table 1 tasks would say "not transcribed")
    assert rows["qaq"]["QAQ paper (LLaMA-2-7B)"] == "–" and rows["kivi"]["QAQ paper (LLaMA-2-7B)"] == "–"
    md = (tmp_path / "tables" / "qaq_table1.md").read_text()
    assert "Bytes at head_dim 128 (random, random weights)" in md  # the byte columns of the random model
    assert "| qaq | min_bits=0 max_bits=2 key_error=0.5 value_error=0.5 |" in md


def test_delta_interval_bootstrap():
    """Paired bootstrap over tokens: 100 of 1000 tokens lost -> -10 points, 95% half-width 1.96 sqrt(.09/1000)."""
    cfg = {"method": {"name": "x"}, "task": {}, "model": {"name": "m"}}
    runs = []
    for name, ok in (("full", 1000), ("run", 900)):
        r = A.Run([], cfg, REPO / "nowhere" / name, {"acc": ok / 1000}, REPO / "nowhere" / name / "outputs.jsonl")
        r.outputs = (lambda ok=ok: _hits(ok, 1000))
        runs.append(r)
    lo, hi = A.delta_interval(runs[1], runs[0])
    half = 100 * 1.96 * (0.09 / 1000) ** 0.5
    assert abs(lo - (-10 - half)) < 0.3 and abs(hi - (-10 + half)) < 0.3
    assert A.delta_interval(runs[0], runs[0]) is None


def test_qaq_compression_reads_the_bytes():
    run = A.Run([], {"method": {"name": "qaq"}, "task": {}, "model": {"name": "m"}}, REPO,
                {"compression_bytes": 5.0, "compression_bits": 7.5, "cache_bytes_peak": 10}, REPO)
    assert A.compression(run, None) == 5.0 and A.compression_bits(run) == 7.5


def _pot_run(method, **fields):
    cfg = {"method": {"name": method, **{k: v for k, v in fields.items() if k != "prefill"}},
           "task": {"name": "tinystories_pot", "prefill": fields.get("prefill")}, "model": {"name": "m"}}
    return A.Run([], cfg, REPO / "nowhere", {}, REPO / "nowhere" / "outputs.jsonl")


def test_infinipot_paper_column_only_where_the_paper_reports_a_value(monkeypatch):
    """Each pot-table row gets the paper's number for its own scorer (CR-RoPE on, alpha 50% for CaP + NuC); rows the
    paper has no number for say so. (No value is transcribed: the test fills two of its own.)"""
    monkeypatch.setattr(A, "INFINIPOT_PAPER", {"cap_nuc": ("1.00", "Table 3"), "snapkv, unbounded": ("2.00", "§4.2")})

    def cell(run):
        return A.infinipot_paper(A._paper_key(run))

    assert cell(_pot_run("infinipot", scorer="cap_nuc", nuc_share=0.5, cr_rope=True)) == "1.00 (Table 3)"
    assert cell(_pot_run("snapkv", budget=128, prefill="full")) == "2.00 (§4.2)"
    for missing in (_pot_run("infinipot", scorer="cap_nuc", nuc_share=0.5, cr_rope=False),  # CR-RoPE off
                    _pot_run("infinipot", scorer="cap_nuc", nuc_share=0.25, cr_rope=True),  # another alpha
                    _pot_run("infinipot", scorer="cap", nuc_share=0.5, cr_rope=True),
                    _pot_run("infinipot", scorer="h2o", cr_rope=True), _pot_run("full")):
        assert cell(missing) == A.PAPER_MISSING


def test_paper_columns_hold_no_unsourced_numbers():
    """LESS, QAQ and InfiniPot values were found in no retrieved text of the papers: their columns and notes carry no
    number of theirs."""
    assert not hasattr(A, "QAQ_PAPER") and not A.INFINIPOT_PAPER
    for note in (A.LESS_PAPER_NOTE, A.QAQ_PAPER_NOTE, A.INFINIPOT_NOTE):
        assert A.PAPER_MISSING in note
    assert "Table 1 of arXiv 2403.04643" in A.QAQ_PAPER_NOTE and "2402.09398" in A.LESS_PAPER_NOTE
    assert "2410.01518" in A.INFINIPOT_NOTE


def test_needle_heatmaps(tmp_path):
    plan = A.plan("needle_grid", "cpu", tmp_path)
    lengths, depths = plan.runs[0].cfg["task"]["context_lengths"], plan.runs[0].cfg["task"]["depths"]
    for i, r in enumerate(plan.runs):
        outs = [{"context_length": n, "depth": float(d), "rougeL": (i + n / 1000 + d / 100) % 1.0, "exact": 0.0}
                for n in lengths for d in depths]
        mean = sum(o["rougeL"] for o in outs) / len(outs)
        _write(r, {"rougeL": mean, "exact": 0.0, "cache_bytes_peak": 1024 * (i + 1)}, outs)
    out = A.aggregate(["needle_grid"], ["cpu"], tmp_path, tmp_path / "tables", tmp_path / "figures")
    rows = _csv(tmp_path / "tables" / "needle_grid.csv")
    assert [r["method"] for r in rows] == ["full", "streaming_llm", "h2o", "tova", "snapkv", "scissorhands"]
    assert rows[0]["budget"] == "–" and rows[1]["budget"] == "64"
    assert [p.name for p in out["needle_grid"] if p.suffix == ".png"] == ["needle_grid-cpu-heatmaps.png"]


def test_generic_layout_lists_every_run(eviction, tmp_path):
    sec = A.generic(A.plan("eviction_ppl", "cpu", eviction), tmp_path)
    assert sec.main.columns[:3] == ["model", "method", "mode"]
    assert "wall_time" not in sec.main.columns and "ppl" in sec.main.columns
    assert len(sec.main.rows) == 35


def test_pareto_front():
    pts = [(1, 5.0), (2, 4.0), (2, 4.5), (4, 4.2), (8, 3.0)]
    assert A.pareto_front(pts) == [(1, 5.0), (2, 4.0), (8, 3.0)]


def test_cross_experiment_pareto(tmp_path):
    """Runs of two experiments that evaluate the same thing (scale, model, task, seed, mode) share one plane."""
    task = {"type": "perplexity", "name": "tinystories", "max_tokens": 20000, "window": 512}

    def run(method, kib, ppl, mode="masked", **fields):
        cfg = {"model": {"name": "stories260k"}, "method": {"name": method, **fields}, "task": {**task, "mode": mode},
               "seed": 0}
        d = tmp_path / "runs" / f"{method}-{kib}-{mode}-{len(fields)}"
        cell = [f"method.{k}={v}" for k, v in fields.items()]
        return A.Run(cell, cfg, d, {"ppl": ppl, "cache_bytes_peak": int(kib * 1024), "mode": mode}, d / "o.jsonl")

    a = A.Plan("exp_a", "cpu", [run("full", 640, 3.75), run("h2o", 40, 5.0, budget=32), run("h2o", 80, 4.4, budget=64),
                                run("h2o", 80, 3.9, mode="stream", budget=64)], "")
    b = A.Plan("exp_b", "cpu", [run("full", 640, 3.75), run("kivi", 80, 3.95, bits=2), run("kivi", 160, 3.8, bits=4),
                                run("uniform", 160, 4.2, bits=4), run("qaq", 45.7, 4.6, key_error=0.5)], "")
    out = A.cross_pareto([a, b], tmp_path / "tables", tmp_path / "figures")
    # one plane (masked); the stream run is alone in its plane (one experiment): no figure for it
    assert [p.name for p in out] == ["pareto.md", "pareto-cpu-stories260k-tinystories-masked.png"]
    md = out[0].read_text()
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in md.splitlines()
            if line.startswith("| ") and not line.startswith("| method")]
    assert [(r[0], r[1], r[2], r[3]) for r in rows] == [
        ("h2o", "budget=32", "exp_a", "40.0"), ("qaq", "key_error=0.5", "exp_b", "45.7"),
        ("kivi", "bits=2", "exp_b", "80.0"), ("kivi", "bits=4", "exp_b", "160.0"), ("full", "–", "exp_a, exp_b", "640.0")]


def test_committed_tables_regenerate_byte_for_byte(tmp_path):
    """`make tables` on the committed results/runs gives back every committed table and figure, byte for byte."""
    tables, figures = REPO / "results" / "tables", REPO / "results" / "figures"
    names = sorted(p.stem for p in tables.glob("*.md") if p.stem != "pareto")
    if not names:
        pytest.skip("no committed tables")
    out = A.aggregate(names, None, REPO / "results", tmp_path / "tables", tmp_path / "figures", pareto=True)
    made = {p.relative_to(tmp_path).as_posix(): p for paths in out.values() for p in paths}
    committed = {f"tables/{p.name}": p for p in tables.iterdir()} | {f"figures/{p.name}": p for p in figures.iterdir()}
    assert sorted(made) == sorted(committed)
    for rel, path in made.items():
        assert path.read_bytes() == committed[rel].read_bytes(), rel


def _ppl_run(tmp_path, name, nlls, tokens=512):
    d = tmp_path / name
    d.mkdir()
    (d / "outputs.jsonl").write_text("".join(json.dumps({"nll": x, "tokens": tokens}) + "\n" for x in nlls))
    ppl = math.exp(sum(nlls) / len(nlls))
    return A.Run([], {"method": {"name": name}, "task": {}, "model": {"name": "m"}}, d, {"ppl": ppl}, d / "outputs.jsonl")


def test_intervals_and_paired_differences(tmp_path):
    flat = _ppl_run(tmp_path, "flat", [1.3] * 8)
    assert A.ppl_interval(flat) == pytest.approx((math.exp(1.3), math.exp(1.3)))  # no spread: no width
    a = _ppl_run(tmp_path, "a", [1.0, 1.4, 1.2, 1.1, 1.6, 0.9, 1.3, 1.5])
    b = _ppl_run(tmp_path, "b", [x + 0.05 for x in [1.0, 1.4, 1.2, 1.1, 1.6, 0.9, 1.3, 1.5]])
    lo, hi = A.ppl_interval(a)
    assert math.exp(0.9) < lo < a.metrics["ppl"] < hi < math.exp(1.6)
    assert A.overlaps(A.ppl_interval(a), A.ppl_interval(b))  # unpaired: the spread between windows hides the shift
    d, (dlo, dhi) = A.paired_diff(b, a)  # paired: every window is worse by the same factor, so 0 is excluded
    assert d == pytest.approx(b.metrics["ppl"] - a.metrics["ppl"]) and 0 < dlo <= d <= dhi
    assert A.paired_diff(a, _ppl_run(tmp_path, "c", [1.0] * 7)) is None  # other windows: not paired
    assert A.mean_interval([0.0, 1.0] * 10)[0] < 0.5 < A.mean_interval([0.0, 1.0] * 10)[1]
    assert A.with_ci(4.0, (3.9, 4.1)) == "4.000 (3.900–4.100)" and A.with_ci(4.0, None) == "4.000"


def _needle_runs(root):
    plan = A.plan("needle_grid", "cpu", root)
    for i, r in enumerate(plan.runs):
        _write(r, {"rougeL": 0.1 * i, "exact": 0.0, "cache_bytes_peak": 1024},
               [{"context_length": 256, "depth": 0.0, "rougeL": 0.1 * i, "exact": 0.0}])
    return A.plan("needle_grid", "cpu", root)  # with the metrics written


def test_stale_runs_are_marked_or_refused(tmp_path):
    plan = _needle_runs(tmp_path)
    (plan.runs[2].run_dir / "env.json").write_text(json.dumps({"kvx_source_digest": "0" * 64}))
    (plan.runs[3].run_dir / "env.json").unlink()  # made before the digest was recorded: stale too
    A.aggregate(["needle_grid"], ["cpu"], tmp_path, tmp_path / "t", tmp_path / "f")
    md = (tmp_path / "t" / "needle_grid.md").read_text()
    assert "‡ 2 of 6 runs were made from a kvx source other than this checkout's" in md
    marked = [line.split("|")[1].strip() for line in md.splitlines() if line.startswith("| ") and "‡" in line]
    assert marked == [f"{plan.runs[2].method} ‡", f"{plan.runs[3].method} ‡"]
    with pytest.raises(A.StaleRuns, match="needle_grid \\(scale=cpu\\): 2 runs made from another kvx source"):
        A.aggregate(["needle_grid"], ["cpu"], tmp_path, tmp_path / "t2", tmp_path / "f2", strict=True)


def test_a_title_may_name_only_the_models_and_data_its_rows_use(tmp_path):
    plan = _needle_runs(tmp_path)
    assert A.title_problems("Llama-2-7B perplexity on WikiText-2 and PG-19 (4096-token windows)", plan.done) == [
        "llama-2-7b", "pg-19", "wikitext-2"]
    assert A.title_problems("CPU analog of the needle grid: stories260k, Paul Graham essays", plan.done) == []


def test_committed_cpu_tables_name_only_what_their_rows_use():
    """Every committed table's first line (and each section's heading) names only models and data its runs use."""
    tables = REPO / "results" / "tables"
    files = sorted(p for p in tables.glob("*.md") if p.stem != "pareto")
    if not files:
        pytest.skip("no committed tables")
    for path in files:
        text = path.read_text()
        first = text.splitlines()[0].lstrip("# ")
        plans = [A.plan(path.stem, s, REPO / "results") for s in A.SCALES if f"## scale={s}" in text]
        runs = [r for p in plans for r in p.done]
        assert runs, path.name
        assert A.title_problems(first, runs) == [], (path.name, first)
        if all(p.scale == "cpu" for p in plans):
            assert first.startswith("CPU "), (path.name, first)


def test_duplicate_tables_are_not_written():
    """The cpu variant of less_llama2_13b is less_llama2_7b's grid, and the Table 3 ablations are rows of
    infinipot_tinystories_pot: no table of their own at cpu scale."""
    tables = REPO / "results" / "tables"
    for name in ["less_llama2_13b"] + [f"infinipot_table3_{v}" for v in ("cap", "no_cap_nuc", "no_cr_rope", "nuc",
                                                                          "nuc25", "nuc50", "nuc75")]:
        assert (name, "cpu") in A.COVERED
        assert not (tables / f"{name}.md").exists() and not (tables / f"{name}.csv").exists()


def _docs(n_ok: int, n: int = 200) -> list[dict]:
    """Per-document HellaSwag rows of a harness run (lm-eval's logged samples): the first n_ok right."""
    return [{"task": "hellaswag", "doc_id": i, "acc": float(i < n_ok), "acc_norm": 0.0} for i in range(n)]


def test_qaq_hellaswag_criterion_over_documents(tmp_path):
    """Harness runs: accuracy from `hellaswag/acc`, compression from the peak bytes against the full run's, and the
    interval from a paired bootstrap over the documents."""
    plan = A.plan("qaq_hellaswag", "cpu", tmp_path)
    assert {r.model for r in plan.runs} == {"stories260k"} and {r.cfg["task"]["type"] for r in plan.runs} == {"harness"}
    for r in plan.runs:
        if r.method == "full":
            ok, nbytes = 60, 200 * 1024
        elif r.method == "qaq":
            ok, nbytes = (60 if r.get("method.key_error") == 0.5 else 50), 50 * 1024 * (r.get("method.min_bits") - 1)
        else:
            ok, nbytes = 60 - (5 if r.get("method.bits") == 2 else 0), 100 * 1024 // r.get("method.bits")
        _write(r, {"hellaswag/acc": ok / 200, "hellaswag/acc_norm": 0.0, "cache_bytes_peak": nbytes}, _docs(ok))
    A.aggregate(["qaq_hellaswag"], ["cpu"], tmp_path, tmp_path / "tables", tmp_path / "figures")
    rows = {r["method"]: r for r in _csv(tmp_path / "tables" / "qaq_hellaswag.csv")}
    assert set(rows) == {"uniform", "kivi", "qaq"} and rows["qaq"]["acc (full)"] == "0.3000"
    # qaq: no loss at key_error 0.5; min_bits 1 (the default grid's 2 - 1 = 1 -> 50 KiB) beats min_bits 2 (100 KiB)
    assert rows["qaq"]["best setting"] == "key_error=0.5 value_error=0.5"
    assert rows["qaq"]["compression (bytes)"] == "4.00×" and rows["qaq"]["compression (bits)"] == "–"
    assert rows["qaq"]["Δacc (points) [95%]"] == "+0.00 [+0.00, +0.00]"
    assert rows["uniform"]["best setting"] == "bits=4" and rows["uniform"]["compression (bytes)"] == "8.00×"
    full = next(r for r in plan.runs if r.method == "full")
    two = next(r for r in A.plan("qaq_hellaswag", "cpu", tmp_path).done if r.method == "uniform"
               and r.get("method.bits") == 2)
    lo, hi = A.delta_interval(two, full, "hellaswag/acc")  # 5 of 200 documents lost: -2.5 points
    assert lo < -2.5 < hi and hi <= 0.0 and lo > -6
    md = (tmp_path / "tables" / "qaq_hellaswag.md").read_text()
    assert "paired bootstrap over the documents" in md and "then its endings scored over that cache" in md
