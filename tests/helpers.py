"""Shared test helpers: compose the project's Hydra config like run.py does."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

import kvx.config  # noqa: F401  (resolvers)

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=False)


def run_cli(args: list[str], cwd: Path | None = None, timeout: int | None = None,
            threads: int = 2) -> subprocess.CompletedProcess:
    """run.py in a subprocess. No time limit by default: a slow machine must not fail a test (CI has its own)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads), WANDB_SILENT="true")
    return subprocess.run([sys.executable, str(REPO / "run.py"), *args], cwd=cwd or REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def hf_window_ppl(model, ids: list[int], window: int = 512) -> float:
    """Perplexity with plain transformers forwards over disjoint windows of `window` inputs (assets README recipe)."""
    x = torch.tensor(ids)
    total, n = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(ids) - 1, window):
            w = x[s : s + window + 1]
            logits = model(input_ids=w[None, :-1]).logits[0].float()
            total += float(torch.nn.functional.cross_entropy(logits, w[1:], reduction="sum"))
            n += len(w) - 1
    return math.exp(total / n)
