"""Each committed cpu-scale table reproduces: its experiment runs again from scratch (scale=cpu, into a temporary
results folder) and scripts/aggregate.py makes the same CSV as the one in results/tables/. Minutes each: make test-slow.
"""

import importlib.util
import sys

import pytest

from .helpers import REPO, run_cli

spec = importlib.util.spec_from_file_location("aggregate", REPO / "scripts" / "aggregate.py")
A = importlib.util.module_from_spec(spec)
sys.modules.setdefault("aggregate", A)
spec.loader.exec_module(A)

COMMITTED = REPO / "results" / "tables"


def _committed_cpu(name: str) -> bool:
    csv = COMMITTED / f"{name}.csv"
    return csv.is_file() and any(line.startswith("cpu,") for line in csv.read_text().splitlines())


def _reproduce(name: str, tmp_path, timeout: int):
    if not _committed_cpu(name):
        pytest.skip(f"no committed cpu-scale table for {name}")
    out = run_cli([f"experiment={name}", "scale=cpu", "progress=false", f"results_dir={tmp_path}"], timeout=timeout,
                  threads=1)
    assert out.returncode == 0, out.stderr[-3000:]
    A.aggregate([name], ["cpu"], tmp_path, tmp_path / "tables", tmp_path / "figures")
    ours = (tmp_path / "tables" / f"{name}.csv").read_text().splitlines()
    theirs = [line for line in (COMMITTED / f"{name}.csv").read_text().splitlines()
              if line.startswith("cpu,") or line.startswith("scale,")]
    assert ours == theirs


@pytest.mark.slow
def test_eviction_ppl_cpu(tmp_path):
    _reproduce("eviction_ppl", tmp_path, timeout=3600)


@pytest.mark.slow
def test_qaq_table1_cpu(tmp_path):
    _reproduce("qaq_table1", tmp_path, timeout=3600)


@pytest.mark.slow
def test_qaq_table2_cpu(tmp_path):
    _reproduce("qaq_table2", tmp_path, timeout=3600)


@pytest.mark.slow
def test_qaq_hellaswag_cpu(tmp_path):
    _reproduce("qaq_hellaswag", tmp_path, timeout=3600)


@pytest.mark.slow
def test_needle_grid_cpu(tmp_path):
    _reproduce("needle_grid", tmp_path, timeout=1800)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["less_llama2_7b", "infinipot_tinystories_pot", "infinipot_long_pot",
                                  "infinipot_needle_2k", "infinipot_needle_4k", "infinipot_longbench_2k",
                                  "infinipot_longbench_4k"])
def test_other_experiments_cpu(name, tmp_path):
    _reproduce(name, tmp_path, timeout=3600)
