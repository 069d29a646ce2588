"""The value run.py returns to a Hydra sweeper (Optuna): one metric of the run, optionally against a baseline run.

`objective` in the config is null (return nothing), a metric name (`objective: ppl`) or a mapping:

    objective:
      metric: compression        # a key of metrics.json, or `compression`: baseline cache_bytes_peak / this run's
      baseline:                  # nodes that replace the run's own to give the reference run (e.g. the full cache)
        method: {name: full}
      constraint:                # value - penalty * max(0, drop - max_drop), drop = baseline[metric] - run[metric]
        metric: acc
        max_drop: 0.01           # in the metric's own units (acc 0.01 = one point); relative: true divides by baseline
        relative: false
        higher_is_better: true   # false for a metric such as ppl: the drop is then run - baseline
        penalty: 1000.0

The baseline run goes through kvx.runner.run like any other: done once, read from results/ afterwards.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from kvx.errors import ConfigError


def _metric(metrics: dict, key: str, where: str) -> float:
    if key not in metrics or not isinstance(metrics[key], (int, float)):
        numeric = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
        raise ConfigError(where, f"metric {key!r} is not in the run's metrics; numeric metrics: {', '.join(numeric)}")
    return float(metrics[key])


def baseline_config(cfg: DictConfig, replace: dict) -> DictConfig:
    """The run's config with whole nodes replaced (`{method: {name: full}}` replaces all of `method`)."""
    data = OmegaConf.to_container(cfg, resolve=False)
    data.pop("hydra", None)
    for key, node in replace.items():
        data[key] = node
    data["objective"] = None
    return OmegaConf.create(data)


def objective_value(cfg: DictConfig, metrics: dict, run_fn=None) -> float | None:
    spec = cfg.get("objective")
    if spec is None:
        return None
    if isinstance(spec, str):
        return _metric(metrics, spec, "objective")
    spec = OmegaConf.to_container(spec, resolve=True) if isinstance(spec, DictConfig) else dict(spec)
    unknown = set(spec) - {"metric", "baseline", "constraint"}
    if unknown:
        raise ConfigError(f"objective.{sorted(unknown)[0]}", "unknown key; allowed: metric, baseline, constraint")
    if "metric" not in spec:
        raise ConfigError("objective.metric", "missing")
    base = None
    if spec.get("baseline"):
        if run_fn is None:
            from kvx.runner import run as run_fn
        base = run_fn(baseline_config(cfg, spec["baseline"])).metrics
    elif spec.get("constraint") or spec["metric"] == "compression":
        raise ConfigError("objective.baseline", "a constraint or the compression metric needs a baseline run")
    if spec["metric"] == "compression":
        value = _metric(base, "cache_bytes_peak", "objective.baseline") / max(
            _metric(metrics, "cache_bytes_peak", "objective.metric"), 1.0)
    else:
        value = _metric(metrics, spec["metric"], "objective.metric")
    con = spec.get("constraint")
    if con:
        key = con.get("metric")
        if key is None:
            raise ConfigError("objective.constraint.metric", "missing")
        ref = _metric(base, key, "objective.constraint.metric")
        drop = ref - _metric(metrics, key, "objective.constraint.metric")
        if not con.get("higher_is_better", True):
            drop = -drop
        if con.get("relative", False):
            drop /= abs(ref) if ref else 1.0
        excess = max(0.0, drop - float(con.get("max_drop", 0.01)))
        value -= float(con.get("penalty", 1000.0)) * excess
    return value
