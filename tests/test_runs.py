"""Where runs live (ad-hoc runs in outputs/, git-ignored; paper experiments in results/) and the runs view."""

import subprocess

import pytest

from .helpers import CONFIGS, REPO, compose_cfg

EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))


def test_ad_hoc_runs_default_to_an_ignored_folder(monkeypatch):
    monkeypatch.delenv("KVX_RESULTS_DIR", raising=False)
    assert compose_cfg([]).results_dir == "outputs"
    ignored = subprocess.run(["git", "check-ignore", "-q", "outputs/runs/tinystories/x/metrics.json"], cwd=REPO)
    assert ignored.returncode == 0
    kept = subprocess.run(["git", "check-ignore", "-q", "results/runs/tinystories/x/metrics.json"], cwd=REPO)
    assert kept.returncode == 1


def test_results_dir_from_the_environment_or_the_command_line(monkeypatch, tmp_path):
    monkeypatch.setenv("KVX_RESULTS_DIR", str(tmp_path))
    assert compose_cfg([]).results_dir == str(tmp_path)
    assert compose_cfg(["results_dir=elsewhere"]).results_dir == "elsewhere"


@pytest.mark.parametrize("name", EXPERIMENTS)
@pytest.mark.parametrize("scale", ["gpu", "cpu"])
def test_paper_experiments_write_results(name, scale, monkeypatch):
    monkeypatch.setenv("KVX_RESULTS_DIR", "somewhere")
    assert compose_cfg([f"experiment={name}", f"scale={scale}"]).results_dir == "results"
    assert compose_cfg([f"experiment={name}", f"scale={scale}", "results_dir=X"]).results_dir == "X"


# the runs view (kvx-runs / python -m kvx.runs) over the committed runs ---------------------------------------------
RESULTS = REPO / "results"


def _committed():
    """(folder, metrics, config) of every committed run, read without kvx.runs."""
    import json

    import yaml

    out = []
    for m in sorted((RESULTS / "runs").glob("*/*/*/*/metrics.json")):
        out.append((m.parent, json.loads(m.read_text()), yaml.safe_load((m.parent / "config.yaml").read_text())))
    return out


def test_load_runs_holds_every_run_with_config_and_metrics():
    from kvx.runs import load_runs

    df = load_runs(RESULTS)
    committed = _committed()
    assert len(df) == len(committed) > 0
    row = df.set_index("run").loc[str(committed[0][0])]
    _, metrics, cfg = committed[0]
    assert row["task.mode"] == cfg["task"]["mode"] and row["model.name"] == cfg["model"]["name"]
    assert row["cache_bytes_peak"] == metrics["cache_bytes_peak"]


def test_filters_keep_exactly_the_matching_runs():
    from kvx.runs import load_runs, select

    df = select(load_runs(RESULTS), ["task=tinystories", "method=h2o,tova", "method.budget=64.0", "task.mode=masked"])
    want = {str(d) for d, m, c in _committed() if m["task"] == "tinystories" and m["method"] in ("h2o", "tova")
            and c["method"].get("budget") == 64 and c["task"]["mode"] == "masked"}
    assert set(df["run"]) == want and len(want) >= 2
    no_budget = select(load_runs(RESULTS), ["method.budget=", "task=tinystories"])
    assert set(no_budget["method"]) >= {"full"} and "h2o" not in set(no_budget["method"])


def test_compare_pivots_one_key_against_another():
    from kvx.runs import compare, load_runs, select

    runs = select(load_runs(RESULTS), ["task=tinystories", "task.max_tokens=20000", "task.mode=masked",
                                       "method=full,h2o,snapkv"])
    pivot = compare(runs, ["method"], ["method.budget"], "ppl")
    for folder, m, c in _committed():
        if (m["task"], c["task"].get("max_tokens"), m["mode"]) == ("tinystories", 20000, "masked") and \
                m["method"] in ("full", "h2o", "snapkv"):
            b = c["method"].get("budget")
            assert pivot.loc[m["method"], "-" if b is None else str(b)] == m["ppl"], folder
    assert list(pivot.columns)[-1] == "-" and [int(c) for c in list(pivot.columns)[:-1]] == \
        sorted(int(c) for c in list(pivot.columns)[:-1])


def test_compare_refuses_two_runs_in_one_cell():
    from kvx.runs import RunsError, compare, load_runs, select

    runs = select(load_runs(RESULTS), ["task=tinystories", "method=full"])
    with pytest.raises(RunsError, match="differ in .*task.mode"):
        compare(runs, ["method"], ["method.budget"], "ppl")


def test_cli_table_csv_plot_and_bad_keys(tmp_path, capsys):
    import pandas as pd

    from kvx.runs import main

    csv, png = tmp_path / "t.csv", tmp_path / "p.png"
    rc = main([str(RESULTS), "task=tinystories", "--compare", "method", "method.budget", "task.max_tokens=20000",
               "task.mode=masked", "method=h2o,full", "--metric", "ppl", "--csv", str(csv), "--plot", str(png)])
    assert rc == 0
    back = pd.read_csv(csv, index_col=0)
    ppl = {(m["method"], c["method"].get("budget")): m["ppl"] for _, m, c in _committed()
           if (m["task"], m["mode"], c["task"].get("max_tokens")) == ("tinystories", "masked", 20000)}
    assert back.loc["h2o", "64"] == pytest.approx(ppl[("h2o", 64)], rel=1e-12)
    assert back.loc["full", "-"] == pytest.approx(ppl[("full", None)], rel=1e-12)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    out = capsys.readouterr().out
    assert "method.budget" in out and "h2o" in out
    assert main([str(RESULTS), "-c", "method,method.budgte"]) == 2
    assert "did you mean method.budget" in capsys.readouterr().err
    assert main([str(RESULTS), "method=nosuch"]) == 1


def test_unreadable_run_is_named_and_skipped(tmp_path, capsys):
    import shutil

    from kvx.runs import load_runs

    src = sorted((RESULTS / "runs" / "tinystories").glob("*/full/*"))[:2]
    for d in src:
        shutil.copytree(d, tmp_path / d.relative_to(RESULTS))
    (tmp_path / src[0].relative_to(RESULTS) / "metrics.json").write_text('{"ppl": 3.')
    df = load_runs(tmp_path)
    assert len(df) == 1 and "skipped" in capsys.readouterr().err


def test_module_entry_point(tmp_path):
    import sys

    out = subprocess.run([sys.executable, "-m", "kvx.runs", str(RESULTS), "task=needle", "-c", "method,exact"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "exact" in out.stdout
