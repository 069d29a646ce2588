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
    assert [p.parent.parent.name for p in _done(tmp_path)] == ["full"]
    # a grid value selects its own entry: key and value error targets move together
    out = run_cli(["experiment=qaq_table1", "scale=cpu", "method.key_error=0.2", "task.max_tokens=100",
                   "progress=false", f"results_dir={tmp_path}"], threads=1)
    assert out.returncode == 0, out.stderr[-3000:]
    (qaq,) = [p for p in _done(tmp_path) if p.parent.parent.name == "qaq"]
    cfg = (qaq.parent / "config.yaml").read_text()
    assert "key_error: 0.2" in cfg and "value_error: 0.2" in cfg
