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
