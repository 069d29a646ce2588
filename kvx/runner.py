"""run(cfg): validate, build model + method + task, run with progress, score, persist, log."""

from __future__ import annotations

import json
import os
import platform
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from kvx.assets import REPO_ROOT
from kvx.config import build_method, build_model_config, build_task, config_hash
from kvx.errors import ConfigError
from kvx.tasks.base import RunContext
from kvx.tracking import make_logger, staging_dir, write_json, write_jsonl


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict = field(default_factory=dict)
    skipped: bool = False


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

    env = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "kvx": kvx.__version__,
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
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


def run(cfg: DictConfig) -> RunResult:
    # 1. validate everything before any model loads
    model_cfg = build_model_config(cfg.model)
    method = build_method(cfg.method)
    task = build_task(cfg.task)
    if task.mode == "masked" and not method.has_mask_form:
        raise ConfigError("task.mode", f"method {method.name!r} has no mask form; use task.mode=stream")
    from kvx import kernels
    from kvx.assets import assets_dir

    if str(assets_dir(check=False)) in json.dumps(OmegaConf.to_container(cfg, resolve=True), default=str):
        assets_dir(check=True)  # the config reads the offline assets: name the setting if the folder is missing

    kernels.set_backend(str(cfg.get("kernels", "auto")))
    run_dir = run_dir_for(cfg, model_cfg.name, method.name, task.name)
    if (run_dir / "metrics.json").is_file() and not cfg.get("force", False):
        metrics = json.loads((run_dir / "metrics.json").read_text())
        print(f"[kvx] skipped: already done (force=true to run again): {run_dir}")
        return RunResult(run_dir, metrics, skipped=True)
    _check_writable(run_dir.parent)

    # 2. build and run
    seed = int(cfg.get("seed", 0))
    seed_everything(seed)
    from kvx.engine import Engine
    from kvx.models import load_model

    t0 = time.perf_counter()
    model, tok = load_model(model_cfg)
    engine = Engine(model, tok, method, allow_beyond_context=bool(getattr(task, "allow_beyond_context", False)))
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved.pop("hydra", None)
    logger_cfg = resolved.get("logger") or {"name": "none"}
    with staging_dir(run_dir) as tmp:
        logger = make_logger(logger_cfg, tmp, resolved, name=f"{task.name}/{model_cfg.name}/{method.name}/{run_dir.name}")
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
            logger.log_metrics(metrics)
            logger.log_outputs(result.outputs)
            for name in result.artifacts:
                if name.endswith(".png"):
                    logger.log_image(name[:-4], tmp / name)
        finally:
            logger.finish()
    print(json.dumps(metrics, indent=2, default=str))
    print(f"[kvx] results: {run_dir}")
    return RunResult(run_dir, metrics)


def _peak_rss() -> int:
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    except (ImportError, OSError):  # pragma: no cover
        return 0
