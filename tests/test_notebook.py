"""notebooks/analysis.ipynb runs top to bottom on the committed results (it reads results/, never a model), and its
plots come out as images."""

import json
import subprocess

import nbformat
from nbclient import NotebookClient

from .helpers import REPO


def _images(cell) -> int:
    return sum("image/png" in o.get("data", {}) for o in cell.get("outputs", []))


def test_analysis_notebook_runs_on_committed_results():
    nb = nbformat.read(REPO / "notebooks" / "analysis.ipynb", as_version=4)
    NotebookClient(nb, timeout=120, kernel_name="python3",
                   resources={"metadata": {"path": str(REPO / "notebooks")}}).execute()
    text = json.dumps([c.get("outputs", []) for c in nb.cells])
    assert "Traceback" not in text
    n_runs = len(list((REPO / "results" / "runs").glob("*/*/*/*/metrics.json")))
    assert f"{n_runs} runs" in text and n_runs > 0
    n_figs = len(list((REPO / "results" / "figures").glob("*.png")))
    assert f"{n_figs} figures" in text

    # "Quality against memory": one image per (task, model, mode) with at least 3 methods, counted from the runs
    quality = next(c for c in nb.cells if c.cell_type == "code" and "ax.set_xscale" in c.source)
    groups: dict = {}
    for m in (REPO / "results" / "runs").glob("*/*/*/*/metrics.json"):
        d = json.loads(m.read_text())
        if d.get("ppl") is not None:
            groups.setdefault((d["task"], d["model"], d["mode"]), set()).add(d["method"])
    expected = sum(len(methods) >= 3 for methods in groups.values())
    assert expected > 0 and _images(quality) == expected
    text_only = [o for o in quality.outputs if "<Figure" in str(o.get("data", {}).get("text/plain", ""))
                 and "image/png" not in o.get("data", {})]
    assert not text_only  # a figure shown as its repr only: a non-inline backend
    shown = next(c for c in nb.cells if c.cell_type == "code" and "Image(filename" in c.source)
    assert _images(shown) == n_figs


def test_make_notebook_target_executes_headless():
    out = subprocess.run(["make", "-n", "notebook"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0 and "jupyter-execute" in out.stdout and "notebooks/analysis.ipynb" in out.stdout
