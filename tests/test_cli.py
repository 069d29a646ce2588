"""The command line: run.py, -m sweeps that resume, W&B offline files, the submitit launcher."""

import json
import os
import time

import pytest

from kvx.runner import run

from .helpers import compose_cfg, run_cli

TINY = ["task.max_tokens=600", "progress=false"]


def _metrics(root):
    return sorted(root.rglob("metrics.json"))


def test_run_py_prints_metrics_and_folder(tmp_path):
    out = run_cli([f"results_dir={tmp_path}", *TINY])
    assert out.returncode == 0, out.stderr
    assert '"ppl"' in out.stdout and "[kvx] results:" in out.stdout
    assert len(_metrics(tmp_path)) == 1


def test_run_py_clear_error(tmp_path):
    out = run_cli([f"results_dir={tmp_path}", "method.name=fulll", *TINY])
    assert out.returncode != 0
    assert "kvx: error: method.name: unknown method 'fulll'. Did you mean 'full'?" in out.stderr
    out = run_cli([f"results_dir={tmp_path}", "method=nosuch", *TINY])
    assert out.returncode != 0 and "nosuch" in out.stderr


def test_multirun_sweep_resumes(tmp_path):
    args = ["-m", f"results_dir={tmp_path}", "method=streaming_llm", "method.budget=16,32", *TINY]
    out = run_cli(args)
    assert out.returncode == 0, out.stderr
    done = _metrics(tmp_path)
    assert len(done) == 2
    first = {p: p.stat().st_mtime_ns for p in done}
    # a sweep started again finishes only what is missing
    done[0].parent.rename(done[0].parent.with_name("gone"))
    import shutil

    shutil.rmtree(done[0].parent.with_name("gone"))
    out = run_cli(args)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("[kvx] skipped") == 1
    again = _metrics(tmp_path)
    assert len(again) == 2
    assert first[done[1]] == done[1].stat().st_mtime_ns


def test_wandb_offline_files(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    res = run(compose_cfg([f"results_dir={tmp_path}", "logger=wandb", *TINY]))
    runs = list((res.run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list(res.run_dir.rglob("*"))
    files = {p.name for p in runs[0].rglob("*")}
    assert any(f.endswith(".wandb") for f in files)
    tables = list((runs[0] / "files" / "media" / "table").glob("outputs_*.table.json"))
    assert len(tables) == 1  # the per-window outputs table
    table = json.loads(tables[0].read_text())
    assert len(table["data"]) == res.metrics["windows"] and "nll" in table["columns"]
    path = runs[0] / next(f for f in files if f.endswith(".wandb"))
    for _ in range(100):  # the W&B service may still be flushing its record file after finish() on a loaded machine
        record = path.read_bytes()
        if b"cache_bytes_peak" in record:
            break
        time.sleep(0.1)
    assert b"ppl" in record and b"cache_bytes_peak" in record


@pytest.mark.skipif(os.environ.get("CI_NO_SUBMITIT") == "1", reason="submitit disabled")
def test_submitit_local_launcher(tmp_path):
    out = run_cli(["-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5",
                   f"results_dir={tmp_path}", "method.budget=16", "method=streaming_llm", *TINY])
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(_metrics(tmp_path)) == 1


def test_wandb_logs_existing_results_with_steps_and_a_readable_name(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    import wandb
    from wandb.sdk.wandb_run import Run

    logged, inits = [], []
    real_log, real_init = Run.log, wandb.init

    def spy_log(self, data, step=None, **kw):
        logged.append((step, dict(data)))
        return real_log(self, data, step=step, **kw)

    def spy_init(*a, **kw):
        inits.append(kw)
        return real_init(*a, **kw)

    monkeypatch.setattr(Run, "log", spy_log)
    monkeypatch.setattr(wandb, "init", spy_init)
    args = [f"results_dir={tmp_path}", "method=streaming_llm", "method.budget=32", *TINY]
    first = run(compose_cfg(args))  # no logger
    assert not inits
    capsys.readouterr()
    again = run(compose_cfg([*args, "logger=wandb"]))  # done already: its results go to W&B from the folder
    assert again.skipped and '"ppl"' in capsys.readouterr().out
    assert [kw["name"] for kw in inits] == ["streaming_llm budget=32 · tinystories"]
    steps = [(s, d) for s, d in logged if s is not None]
    assert [s for s, _ in steps] == list(range(first.metrics["windows"]))  # one step per window
    assert all("nll" in d and "acc" in d for _, d in steps)
    assert again.wandb_dir is not None and again.wandb_dir.parent == first.run_dir / "wandb"
    run(compose_cfg([*args, "logger=wandb"]))  # logged once only
    assert len(inits) == 1
