"""notebooks/analysis.ipynb runs top to bottom on the committed results (it reads results/, never a model)."""

import json

import nbformat
from nbclient import NotebookClient

from .helpers import REPO


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
