"""run(cfg): validate, build model + method + task, run with progress, score, persist, log.

A config already in the results folder is skipped (its metrics printed); one being computed by another process is
waited for; a run folder that does not validate is moved aside and made again (kvx/results.py)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import platform
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from kvx.assets import REPO_ROOT
from kvx.config import build_method, build_model_config, build_task, config_hash
from kvx.errors import ConfigError
from kvx.results import Incomplete, claim, move_aside, prune_empty, read_metrics, remove_leftovers, staging_dir
from kvx.tasks.base import RunContext
from kvx.tracking import make_logger, run_name, write_json, write_jsonl


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict = field(default_factory=dict)
    skipped: bool = False
    wandb_dir: Path | None = None  # the offline W&B run folder, to `wandb sync`


def run_dir_for(cfg: DictConfig, model_name: str, method_name: str, task_name: str) -> Path:
    root = Path(str(cfg.results_dir)).expanduser()
    return root / "runs" / task_name / model_name / method_name / config_hash(cfg)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # pragma: no cover
        pass


def environment(device: str) -> dict:
    import transformers

    import kvx
    from kvx.provenance import source_digest

    env = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "kvx": kvx.__version__,
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "kvx_source_digest": source_digest(),  # sha256 of kvx/**/*.py as run (scripts/aggregate.py checks it)
    }
    try:
        env["git_commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        env["git_dirty"] = bool(
            # results/ is where runs are written: a sweep rewriting its own earlier runs does not dirty the code
            subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!results"], cwd=REPO_ROOT,
                           capture_output=True, text=True, check=True).stdout.strip()
        )
    except (OSError, subprocess.CalledProcessError):
        env["git_commit"] = None
    return env


def _check_writable(root: Path) -> None:
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write-probe-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError("results_dir", f"cannot write to {root}: {e.strerror or e}") from e


def _progress(enabled: bool):
    from tqdm.auto import tqdm

    def wrap(it, **kw):
        return tqdm(it, disable=not enabled, dynamic_ncols=True, **kw)

    return wrap


@dataclass
class Plan:
    """A validated run: what it builds and where its results go (nothing loaded yet)."""

    model_cfg: Any
    method: Any
    task: Any
    run_dir: Path
    root: Path


def plan(cfg: DictConfig) -> Plan:
    """Validate every field of model, method and task (before any model loads) and name the run folder."""
    model_cfg = build_model_config(cfg.model)
    method = build_method(cfg.method)
    task = build_task(cfg.task)
    if task.mode == "masked" and not method.has_mask_form:
        raise ConfigError("task.mode", f"method {method.name!r} has no mask form; use task.mode=stream")
    from kvx.assets import assets_dir

    used = {k: cfg[k] for k in cfg if k != "hydra"}
    if str(assets_dir(check=False)) in json.dumps(OmegaConf.to_container(OmegaConf.create(used), resolve=True),
                                                  default=str):
        assets_dir(check=True)  # the config reads the offline assets: name the setting if the folder is missing
    root = Path(str(cfg.results_dir)).expanduser()
    return Plan(model_cfg, method, task, run_dir_for(cfg, model_cfg.name, method.name, task.name), root)


def existing_metrics(run_dir: Path) -> dict | None:
    """The metrics of a finished run in `run_dir`, or None. A folder whose files do not validate (a truncated or
    empty metrics.json, a missing file) is reported and moved aside, so that the run is made again."""
    if not run_dir.exists():
        return None
    try:
        return read_metrics(run_dir)
    except Incomplete as e:
        aside = move_aside(run_dir)
        print(f"[kvx] incomplete results ({e}) in {run_dir}: moved aside to {aside.name}; running again")
        return None


def run(cfg: DictConfig) -> RunResult:
    # 1. validate everything before any model loads
    p = plan(cfg)
    from kvx import kernels

    kernels.set_backend(str(cfg.get("kernels", "auto")))
    force = bool(cfg.get("force", False))
    if not force and (metrics := _done_quietly(p.run_dir)) is not None:
        return _skip(cfg, p, metrics)
    _check_writable(p.run_dir.parent)
    try:
        waiting = lambda: print(f"[kvx] waiting: another process is running this config ({p.run_dir})")  # noqa: E731
        with claim(p.run_dir, on_wait=waiting):
            if not force and (metrics := existing_metrics(p.run_dir)) is not None:
                return _skip(cfg, p, metrics, held=True)  # the other process finished it while we waited
            if removed := remove_leftovers(p.run_dir):
                print(f"[kvx] removed {removed} staging folder(s) left by killed runs of this config")
            p.task.check()  # data paths and fields, before the model loads
            return _compute(cfg, p)
    except BaseException:
        prune_empty(p.run_dir.parent, p.root)  # a failed run leaves no empty folders
        raise


def _done_quietly(run_dir: Path) -> dict | None:
    try:
        return read_metrics(run_dir) if run_dir.is_dir() else None
    except Incomplete:
        return None  # reported and moved aside under the claim


def _skip(cfg: DictConfig, p: Plan, metrics: dict, held: bool = False) -> RunResult:
    print(json.dumps(metrics, indent=2, default=str))
    print(f"[kvx] skipped: already done (force=true to run again): {p.run_dir}")
    res = RunResult(p.run_dir, metrics, skipped=True)
    logger_cfg = OmegaConf.to_container(cfg.logger, resolve=True) if cfg.get("logger") is not None else {}
    if (logger_cfg or {}).get("name", "none") != "none":
        with contextlib.nullcontext() if held else claim(p.run_dir):  # one process writes W&B files into the folder
            res.wandb_dir = _log_existing(logger_cfg, p, metrics)
    return res


def _log_existing(logger_cfg: dict, p: Plan, metrics: dict) -> Path | None:
    """Log a finished run's results (read from its folder) to W&B, once: a folder that has W&B files already was
    logged when it was made or skipped before."""
    import yaml

    d = p.run_dir
    if (d / "wandb").exists():
        print(f"[kvx] already logged to W&B: {d / 'wandb'}")
        return _offline_dir(d)
    config = yaml.safe_load((d / "config.yaml").read_text(encoding="utf-8"))
    outputs = [json.loads(line) for line in (d / "outputs.jsonl").read_text(encoding="utf-8").splitlines() if line]
    logger = make_logger(logger_cfg, d, config, name=run_name(config.get("method") or {}, p.task.name))
    try:
        logger.log_outputs(outputs)
        logger.log_summary(metrics)
        for png in sorted(d.glob("*.png")):
            logger.log_image(png.stem, png)
    finally:
        logger.finish()
    print(f"[kvx] logged the existing results to W&B ({logger_cfg.get('project', 'kvx')})")
    return _offline_dir(d) if getattr(logger, "offline", False) else None


def _offline_dir(run_dir: Path) -> Path | None:
    found = sorted(run_dir.glob("wandb/offline-run-*"))
    return found[-1] if found else None


def _compute(cfg: DictConfig, p: Plan) -> RunResult:
    seed = int(cfg.get("seed", 0))
    seed_everything(seed)
    from kvx.engine import Engine
    from kvx.models import load_model

    task, method, model_cfg, run_dir = p.task, p.method, p.model_cfg, p.run_dir
    t0 = time.perf_counter()
    model, tok = load_model(model_cfg)
    engine = Engine(model, tok, method, allow_beyond_context=bool(getattr(task, "allow_beyond_context", False)))
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved.pop("hydra", None)
    logger_cfg = resolved.get("logger") or {"name": "none"}
    try:
        with staging_dir(run_dir) as tmp:
            logger = make_logger(logger_cfg, tmp, resolved, name=run_name(resolved.get("method") or {}, task.name))
            try:
                ctx = RunContext(progress=_progress(bool(cfg.get("progress", True))), seed=seed)
                result = task.run(engine, ctx)
                metrics = {
                    "task": task.name,
                    "model": model_cfg.name,
                    "method": method.name,
                    "mode": task.mode,
                    **result.metrics,
                    "wall_time": time.perf_counter() - t0,
                    "peak_process_memory_bytes": _peak_rss(),
                }
                if torch.cuda.is_available() and str(engine.device).startswith("cuda"):
                    metrics["peak_gpu_memory_bytes"] = torch.cuda.max_memory_allocated()
                (tmp / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(resolved)), encoding="utf-8")
                write_json(tmp / "metrics.json", metrics)
                write_jsonl(tmp / "outputs.jsonl", result.outputs)
                write_json(tmp / "env.json", environment(str(engine.device)))
                for name, data in result.artifacts.items():
                    (tmp / name).write_bytes(data)
                logger.log_outputs(result.outputs)
                logger.log_summary(metrics)
                for name in result.artifacts:
                    if name.endswith(".png"):
                        logger.log_image(name[:-4], tmp / name)
            finally:
                logger.finish()
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ConfigError("results_dir", f"no space left on the device of {p.root} ({e.strerror}); "
                                             "the run was not recorded") from None
        raise
    print(json.dumps(metrics, indent=2, default=str))
    print(f"[kvx] results: {run_dir}")
    res = RunResult(run_dir, metrics)
    if getattr(logger, "offline", False):
        res.wandb_dir = _offline_dir(run_dir)
    return res


def _peak_rss() -> int:
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    except (ImportError, OSError):  # pragma: no cover
        return 0
