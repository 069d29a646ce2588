"""Sweeps that report: what a `-m` sweep will run, a record per point, and a table at the end.

- Before launching (grid and basic sweepers) it prints how many runs the sweep makes and which are done already.
- Each point writes `<sweep dir>/<n>/status.json` (overrides, status done | skipped | failed, metric, cache bytes,
  folder, the one-line error of a failed point); a bad point is reported and recorded, and the sweep goes on.
- At the end (`SweepReport`, a Hydra callback) a table of every point, one `wandb sync` command for offline W&B runs,
  and run.py exits with the number of failed points (0: all good).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

METRICS = ("ppl", "acc", "score", "rougeL", "exact", "accuracy")  # the first present is the table's metric column
_FAILED: list[int] = []  # failed points of the last sweep in this process (read by run.py for its exit status)


def in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def sweep_group() -> str:
    """A W&B group for the runs of this sweep: `sweep-<sweep folder name>`."""
    from hydra.core.hydra_config import HydraConfig

    return f"sweep-{Path(HydraConfig.get().sweep.dir).name}"


def main_metric(cfg: DictConfig | None, metrics: dict) -> tuple[str | None, Any]:
    objective = cfg.get("objective") if cfg is not None else None
    if isinstance(objective, str) and objective in metrics:
        return objective, metrics[objective]
    for key in METRICS:
        if isinstance(metrics.get(key), (int, float)):
            return key, metrics[key]
    return None, None


def record(cfg: DictConfig, result=None, error: str | None = None) -> None:
    """Write this point's status.json into its sweep folder (`<sweep dir>/<n>/`, which Hydra creates)."""
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    row: dict[str, Any] = {"num": hc.job.num, "overrides": " ".join(hc.overrides.task)}
    if error is not None:
        row.update(status="failed", error=error)
    else:
        name, value = main_metric(cfg, result.metrics)
        row.update(status="skipped" if result.skipped else "done", metric=name, value=value,
                   cache_bytes=result.metrics.get("cache_bytes_peak"), folder=str(result.run_dir))
        if result.wandb_dir is not None:
            row["wandb_offline"] = str(result.wandb_dir)
    out = Path(hc.runtime.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "status.json").write_text(json.dumps(row, indent=2, default=str) + "\n", encoding="utf-8")


def read_records(sweep_dir: Path) -> list[dict]:
    rows = []
    for p in sorted(Path(sweep_dir).glob("*/status.json"), key=lambda q: int(q.parent.name) if q.parent.name.isdigit()
                    else 0):
        try:
            rows.append(json.loads(p.read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError):
            rows.append({"num": p.parent.name, "status": "failed", "error": f"unreadable {p}"})
    return rows


def table(rows: list[dict]) -> str:
    """One line per point: the overrides that differ between points, status, metric, cache bytes, folder or error."""
    import pandas as pd

    words = [r.get("overrides", "").split() for r in rows]
    common = set.intersection(*map(set, words)) if len(rows) > 1 else set()
    df = pd.DataFrame([{"#": r.get("num"), "point": " ".join(w for w in ws if w not in common), "status": r.get("status"),
                        "metric": "" if r.get("metric") is None else f"{r['metric']}={_fmt(r.get('value'))}",
                        "cache bytes": r.get("cache_bytes") if r.get("cache_bytes") is not None else "",
                        "folder / error": r.get("error") or r.get("folder", "")} for r, ws in zip(rows, words)])
    return df.to_string(index=False, justify="left")


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def report(sweep_dir: Path) -> int:
    """Print the table of the sweep's points and the `wandb sync` command; returns the number of failed points."""
    rows = read_records(sweep_dir)
    if not rows:
        return 0
    failed = sum(r.get("status") == "failed" for r in rows)
    counts = {s: sum(r.get("status") == s for r in rows) for s in ("done", "skipped", "failed")}
    print(f"\n[kvx] sweep {sweep_dir}: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    print(table(rows))
    offline = [r["wandb_offline"] for r in rows if r.get("wandb_offline")]
    if offline:
        print(f"[kvx] W&B offline runs: wandb sync {' '.join(offline)}")
    if failed:
        import sys

        print(f"kvx: {failed} of {len(rows)} sweep points failed (listed above)", file=sys.stderr)
    return failed


class SweepReport(Callback):
    """Hydra callback (configs/config.yaml, hydra.callbacks): the plan before a multirun, the table at its end."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        target = str(config.hydra.sweeper.get("_target_", ""))
        if not target.endswith(("BasicSweeper", "GridSweeper")):
            return  # an optimiser (Optuna) chooses its points as it goes
        from hydra.core.global_hydra import GlobalHydra

        from kvx.grid import expand

        params = config.hydra.sweeper.get("params")
        grids = config.hydra.sweeper.get("grids") if target.endswith("GridSweeper") else None
        loader = GlobalHydra.instance().config_loader()
        jobs = expand(_plain(params), [_plain(g) for g in grids or []], list(config.hydra.overrides.task),
                      config_loader=loader)
        announce(loader, config, jobs)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        _FAILED.append(report(Path(str(config.hydra.sweep.dir))))


def _plain(node: Any) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node) if OmegaConf.is_config(node) else (dict(node) if node else {})


def exit_status() -> int:
    """run.py's exit status after a sweep: the number of failed points (capped at 125), 0 otherwise."""
    return min(_FAILED[-1], 125) if _FAILED else 0


def announce(config_loader: Any, config: DictConfig, jobs: list[list[str]]) -> None:
    """Print how many runs a sweep makes and which of them are done already (each point's config composed as the
    launcher will compose it; a point that does not validate is left for its run to report)."""
    from kvx.errors import KVXError
    from kvx.results import Incomplete, read_metrics
    from kvx.runner import plan

    done: list[tuple[list[str], Path]] = []
    for job in jobs:
        try:
            run_dir = plan(config_loader.load_sweep_config(config, list(job))).run_dir
            if run_dir.is_dir():
                read_metrics(run_dir)
                done.append((job, run_dir))
        except (KVXError, Incomplete, Exception):  # noqa: BLE001  the point's own run reports what is wrong
            continue
    print(f"[kvx] sweep: {len(jobs)} runs, {len(done)} already done, {len(jobs) - len(done)} to run")
    for job, run_dir in done:
        print(f"[kvx]   done: {' '.join(job) or '(base config)'} -> {run_dir}")
