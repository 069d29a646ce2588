"""Metric sinks (W&B or none) and the atomic results writer."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any


class NullLogger:
    def log_metrics(self, metrics: dict) -> None:
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

    def log_metrics(self, metrics: dict) -> None:
        self.run.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        for k, v in metrics.items():
            self.run.summary[k] = v

    def log_outputs(self, outputs: list[dict]) -> None:
        if not outputs:
            return
        cols = sorted({k for row in outputs for k in row})
        table = self.wandb.Table(columns=cols)
        for row in outputs:
            table.add_data(*[_cell(row.get(c)) for c in cols])
        self.run.log({"outputs": table})

    def log_image(self, name: str, path: Path) -> None:
        self.run.log({name: self.wandb.Image(str(path))})

    def finish(self) -> None:
        self.run.finish()


def _cell(v: Any) -> Any:
    return v if isinstance(v, (int, float, str, bool)) or v is None else json.dumps(v, default=str)


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


@contextlib.contextmanager
def staging_dir(final: Path):
    """A temporary folder beside `final`; moved into place only if the block succeeds (a crash leaves nothing)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
