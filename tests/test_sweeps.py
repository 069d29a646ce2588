"""Sweeps from the command line: an experiment's grid, W&B groups, the SLURM launcher config."""

from kvx.runner import run

from .helpers import REPO, compose_cfg, run_cli


def _done(root):
    """Finished runs (a run still being written lives in a hidden staging folder beside its final one)."""
    return sorted(p for p in root.rglob("metrics.json") if not p.parent.name.startswith("."))


def test_experiment_runs_are_grouped_in_wandb(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = compose_cfg(["experiment=eviction_ppl", "scale=cpu", "logger=wandb", "method=streaming_llm",
                       "method.budget=32", "task.mode=masked", "task.max_tokens=600", "progress=false",
                       f"results_dir={tmp_path}"])
    assert cfg.logger.name == "wandb" and cfg.logger.group == "eviction_ppl-cpu"
    import wandb

    calls = []
    real_init = wandb.init

    def spy(*a, **kw):
        calls.append(kw)
        return real_init(*a, **kw)

    monkeypatch.setattr(wandb, "init", spy)
    res = run(cfg)
    assert [c["group"] for c in calls] == ["eviction_ppl-cpu"]
    assert len(list(res.run_dir.glob("wandb/offline-run-*/*.wandb"))) == 1
    assert compose_cfg(["sweep=eviction_budgets", "logger=wandb"]).logger.group == "sweep-eviction_budgets"


def test_slurm_launcher_config():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose(config_name="config", return_hydra_config=True,
                      overrides=["experiment=eviction_ppl", "hydra/launcher=slurm", "hydra.launcher.partition=gpu"])
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher.gpus_per_node == 1 and launcher.partition == "gpu" and launcher.timeout_min > 0
    assert cfg.hydra.sweeper._target_.endswith("GridSweeper")  # the experiment's grid, one SLURM job per run


def test_experiment_is_a_multirun_and_takes_sweeps(tmp_path):
    # hydra.mode: MULTIRUN in the experiment; -m is needed only because a sweep value is on the command line
    out = run_cli(["-m", "experiment=eviction_ppl", "scale=cpu", "method=streaming_llm,h2o", "method.budget=32",
                   "task.mode=masked", "task.max_tokens=600", "progress=false", f"results_dir={tmp_path}"], threads=1)
    assert out.returncode == 0, out.stderr[-3000:]
    names = sorted(p.parent.parent.name for p in _done(tmp_path))
    assert names == ["h2o", "streaming_llm"]


def test_qaq_experiment_launches_and_selects(tmp_path):
    # the whole grid is instantiated (the sweeper config resolves) even when only the full cache is selected
    out = run_cli(["experiment=qaq_table1", "scale=cpu", "method=full", "task.max_tokens=100", "progress=false",
                   f"results_dir={tmp_path}"], threads=1)
    assert out.returncode == 0, out.stderr[-3000:]
    done = _done(tmp_path)  # the full cache of stories260k and of the random head_dim-128 model (byte columns)
    assert [p.parent.parent.name for p in done] == ["full", "full"]
    assert sorted(p.parent.parent.parent.name for p in done) == ["random", "stories260k"]
    # a grid value selects its own entry: key and value error targets move together
    out = run_cli(["experiment=qaq_table1", "scale=cpu", "method.key_error=2.0", "task.max_tokens=100",
                   "progress=false", f"results_dir={tmp_path}"], threads=1)
    assert out.returncode == 0, out.stderr[-3000:]
    qaqs = [p for p in _done(tmp_path) if p.parent.parent.name == "qaq"]  # the grid's entries with key error 2.0
    assert qaqs
    for qaq in qaqs:
        cfg = (qaq.parent / "config.yaml").read_text()
        assert "key_error: 2.0" in cfg and "value_error: 2.0" in cfg


def test_bad_point_does_not_abort_the_sweep_and_the_sweep_reports(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    import json

    args = ["-m", "method=streaming_llm", "method.budget=8,16", "method.sink=8", "task.max_tokens=300", "progress=false",
            f"results_dir={tmp_path}", "logger=wandb"]
    out = run_cli(args, threads=1)
    assert out.returncode == 1, out.stderr[-3000:]  # one point failed
    assert "Traceback" not in out.stderr
    assert out.stderr.count("kvx: error: method.sink: must be smaller than method.budget=8") == 1
    assert "kvx: 1 of 2 sweep points failed" in out.stderr
    assert "[kvx] sweep: 2 runs, 0 already done, 2 to run" in out.stdout
    (budget16,) = _done(tmp_path)
    assert "budget: 16" in (budget16.parent / "config.yaml").read_text()
    (sweep,) = (tmp_path / ".sweeps").iterdir()
    rows = {r["status"]: r for r in (json.loads(p.read_text()) for p in sweep.glob("*/status.json"))}
    assert set(rows) == {"failed", "done"} and "method.sink" in rows["failed"]["error"]
    assert rows["done"]["folder"] == str(budget16.parent) and rows["done"]["metric"] == "ppl"
    table = out.stdout[out.stdout.index(f"[kvx] sweep {sweep}"):]
    assert "1 done, 0 skipped, 1 failed" in table and "method.budget=8" in table and "method.budget=16" in table
    # W&B: grouped by sweep, a readable name, one sync command for the offline runs
    (offline,) = budget16.parent.glob("wandb/offline-run-*")
    assert f"[kvx] W&B offline runs: wandb sync {offline}" in out.stdout
    record = next(offline.glob("*.wandb")).read_bytes()
    assert f"sweep-{sweep.name}".encode() in record and "streaming_llm budget=16 · tinystories".encode() in record
    # started again: the done point is announced and skipped (its metrics printed), the bad one fails again
    out = run_cli(args, threads=1)
    assert out.returncode == 1 and "[kvx] sweep: 2 runs, 1 already done, 1 to run" in out.stdout
    assert "[kvx]   done: " in out.stdout and '"ppl"' in out.stdout and "[kvx] skipped" in out.stdout


def test_empty_sweep_folders_are_not_left(tmp_path):
    out = run_cli(["-m", "method.name=full", "task.max_tokens=300", "progress=false", f"results_dir={tmp_path}"],
                  threads=1)
    assert out.returncode == 0, out.stderr[-3000:]
    folders = [p for p in (tmp_path / ".sweeps").rglob("*") if p.is_dir()]
    assert folders and all(any(p.iterdir()) for p in folders)
