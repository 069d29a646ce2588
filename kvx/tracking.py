"""Metric sinks (W&B or none) and the JSON writers of a run folder (kvx/results.py stages and publishes it)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class NullLogger:
    offline_dir: Path | None = None

    def log_metrics(self, metrics: dict) -> None:
        pass

    def log_summary(self, metrics: dict) -> None:
        pass

    def log_outputs(self, outputs: list[dict]) -> None:
        pass

    def log_image(self, name: str, path: Path) -> None:
        pass

    def finish(self) -> None:
        pass


class WandbLogger:
    """Weights & Biases: online with an API key, offline otherwise (files under the run folder)."""

    def __init__(self, cfg: dict, run_dir: Path, config: dict, name: str):
        import wandb

        mode = cfg.get("mode", "auto")
        if mode == "auto":
            mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
        self.wandb = wandb
        self.run = wandb.init(
            project=cfg.get("project", "kvx"),
            entity=cfg.get("entity"),
            group=cfg.get("group"),
            tags=list(cfg.get("tags") or []),
            name=name,
            config=config,
            dir=str(run_dir),
            mode=mode,
            reinit="finish_previous",
            settings=wandb.Settings(silent=True, console="off", x_disable_stats=True),
        )
        self.offline = mode == "offline"

    def log_metrics(self, metrics: dict) -> None:
        """One step (training curves)."""
        self.run.log(_numeric(metrics))

    def log_summary(self, metrics: dict) -> None:
        """A finished run's metrics: the run's summary (what W&B tables and comparisons show)."""
        for k, v in metrics.items():
            self.run.summary[k] = v

    def log_outputs(self, outputs: list[dict]) -> None:
        """Each window or example as one step (its numeric fields: nll, acc, score ...), and the whole as a table."""
        if not outputs:
            return
        for i, row in enumerate(outputs):
            values = _numeric(row)
            if values:
                self.run.log(values, step=i)
        cols = sorted({k for row in outputs for k in row})
        table = self.wandb.Table(columns=cols)
        for row in outputs:
            table.add_data(*[_cell(row.get(c)) for c in cols])
        self.run.log({"outputs": table})

    def log_image(self, name: str, path: Path) -> None:
        self.run.log({name: self.wandb.Image(str(path))})

    def finish(self) -> None:
        self.run.finish()


def _numeric(d: dict) -> dict:
    return {k: v for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _cell(v: Any) -> Any:
    return v if isinstance(v, (int, float, str, bool)) or v is None else json.dumps(v, default=str)


def run_name(method: dict, task: str) -> str:
    """A readable W&B run name: the method, its budget (or bits) and any inner method's, then the task,
    e.g. `h2o budget=64 · tinystories`, `kivi bits=2 + h2o budget=64 · hellaswag`."""

    def part(m: dict) -> str:
        words = [str(m.get("name", "?"))]
        words += [f"{k}={m[k]}" for k in ("budget", "bits", "key_bits", "value_bits") if m.get(k) is not None]
        for inner in ("base", "evict"):
            if isinstance(m.get(inner), dict):
                words.append("+ " + part(m[inner]))
        return " ".join(words)

    return f"{part(method)} · {task}"


def make_logger(cfg: dict, run_dir: Path, config: dict, name: str):
    kind = (cfg or {}).get("name", "none")
    if kind == "none":
        return NullLogger()
    if kind == "wandb":
        return WandbLogger(cfg, run_dir, config, name)
    from kvx.errors import ConfigError

    raise ConfigError("logger.name", f"unknown logger {kind!r}; allowed: none, wandb")


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, default=str, ensure_ascii=False) + "\n")
