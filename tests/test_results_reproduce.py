"""Committed results come from the committed code: one run of every committed table is made again from this checkout
(same config, one thread) and must give the committed metrics and per-window outputs exactly. Minutes: make test-slow.
"""

import importlib.util
import json
import sys

import pytest
import torch

from .helpers import REPO, compose_cfg

spec = importlib.util.spec_from_file_location("aggregate", REPO / "scripts" / "aggregate.py")
A = importlib.util.module_from_spec(spec)
sys.modules.setdefault("aggregate", A)
spec.loader.exec_module(A)

RESULTS = REPO / "results"
TABLES = sorted(p.stem for p in (RESULTS / "tables").glob("*.md") if p.stem != "pareto")


def _pick(runs):
    """A compressing method's run where there is one (they exercise the most code), masked first (cheapest)."""
    methods = [r for r in runs if r.method != "full"] or runs
    return next((r for r in methods if r.mode == "masked"), methods[0])


def _scale(name: str) -> str:
    text = (RESULTS / "tables" / f"{name}.md").read_text()
    return "cpu" if "## scale=cpu" in text else "gpu"


@pytest.mark.slow
@pytest.mark.parametrize("name", TABLES)
def test_one_committed_run_per_table_reproduces(name, tmp_path):
    from kvx.runner import run

    scale = _scale(name)
    if scale != "cpu":
        pytest.skip("gpu-scale runs need a GPU")
    plan = A.plan(name, scale, RESULTS)
    committed = _pick(plan.done)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the committed runs were made (env.json torch_threads)
    try:
        res = run(compose_cfg([f"experiment={name}", f"scale={scale}", *committed.cell, f"results_dir={tmp_path}",
                               "progress=false"]))
    finally:
        torch.set_num_threads(threads)
    assert res.run_dir.name == committed.run_dir.name  # the same config hash
    ours = json.loads((res.run_dir / "metrics.json").read_text())
    theirs = json.loads((committed.run_dir / "metrics.json").read_text())
    drop = set(A.VOLATILE)
    assert {k: v for k, v in ours.items() if k not in drop} == {k: v for k, v in theirs.items() if k not in drop}
    assert (res.run_dir / "outputs.jsonl").read_text() == committed.outputs_path.read_text()
