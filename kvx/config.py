"""Config validation: every field of model, method and task is checked against its dataclass before a model loads.

Also registers the OmegaConf resolvers the YAML files use: `${kvx.assets:}` (the assets folder, from $KVX_ASSETS),
`${kvx.repo:}` (the repository root) and `${kvx.model_name:...}` (a model's label from its path, kvx/models.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from kvx.errors import ConfigError
from kvx.registry import METHODS, TASKS


def register_resolvers() -> None:
    import kvx.assets

    if not OmegaConf.has_resolver("kvx.assets"):
        OmegaConf.register_new_resolver("kvx.assets", lambda: str(kvx.assets.assets_dir(check=False)))
    if not OmegaConf.has_resolver("kvx.repo"):
        OmegaConf.register_new_resolver("kvx.repo", lambda: str(kvx.assets.REPO_ROOT))
    if not OmegaConf.has_resolver("kvx.model_name"):
        from kvx.models import model_name

        OmegaConf.register_new_resolver("kvx.model_name", model_name)


register_resolvers()


def register_hydra_plugins() -> None:
    """Make kvx's Hydra plugins (the `grid` sweeper) discoverable: Hydra scans the `hydra_plugins` namespace package,
    whose search path gets kvx/_plugins/hydra_plugins added here (run.py and the tests import this module first)."""
    from pathlib import Path

    import hydra_plugins

    path = str(Path(__file__).resolve().parent / "_plugins" / "hydra_plugins")
    if path not in list(hydra_plugins.__path__):
        hydra_plugins.__path__.append(path)


register_hydra_plugins()


def _load_plugins() -> None:
    import kvx.methods  # noqa: F401  (registers methods)
    import kvx.tasks  # noqa: F401  (registers tasks)


def build_dataclass(cls: type, values: dict[str, Any], group: str):
    """Instantiate cls from a plain dict, naming the field on an unknown key or a wrong type."""
    names = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in names:
            raise ConfigError(f"{group}.{key}", f"unknown field for {cls.__name__}; allowed: {', '.join(sorted(names))}")
    try:
        schema = OmegaConf.structured(cls)
        merged = OmegaConf.merge(schema, values)
        obj = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or getattr(e, "key", None) or "?"
        raise ConfigError(f"{group}.{key}", str(e).splitlines()[0]) from e
    return obj


def _plain(node) -> dict:
    if node is None:
        return {}
    if isinstance(node, DictConfig):
        return OmegaConf.to_container(node, resolve=True)
    return dict(node)


def build_method(node):
    _load_plugins()
    values = _plain(node)
    if "name" not in values:
        raise ConfigError("method.name", f"missing; known methods: {', '.join(METHODS.names())}")
    cls = METHODS.get(values["name"])
    method = build_dataclass(cls, values, "method")
    method.validate()
    return method


def build_nested_method(values, field_name: str, refuse: str | None = None, expected: str = "an eviction method's config",
                        evicts_nothing: str = "evicts nothing; give an eviction method"):
    """Build and validate an eviction method configured inside another method (LESS's `base`, a quantized method's
    `evict`); errors name `<field_name>.<field>`. `refuse(name)` returns why a method name is not allowed there."""
    from kvx.methods.base import Method

    if isinstance(values, DictConfig):
        values = OmegaConf.to_container(values, resolve=True)
    if isinstance(values, Method):
        return values
    if not isinstance(values, dict) or "name" not in values:
        raise ConfigError(field_name, f"must be {expected} with a name, e.g. "
                                      f"{{name: streaming_llm, budget: 64, sink: 4}}; got {values!r}")
    _load_plugins()
    name = values["name"]
    why = refuse(name) if refuse is not None else None
    if why:
        raise ConfigError(f"{field_name}.name", why)
    try:
        cls = METHODS.get(name)
    except ConfigError as e:
        raise ConfigError(f"{field_name}.name", str(e).split(": ", 1)[-1]) from e
    method = build_dataclass(cls, dict(values), field_name)
    try:
        method.validate()
    except ConfigError as e:
        sub = e.field[len("method."):] if e.field.startswith("method.") else e.field
        raise ConfigError(f"{field_name}.{sub}", str(e).split(": ", 1)[-1]) from e
    if not method.compresses:
        raise ConfigError(f"{field_name}.name", f"{name!r} {evicts_nothing}")
    return method


def build_task(node):
    _load_plugins()
    values = _plain(node)
    if "type" not in values:
        raise ConfigError("task.type", f"missing; known task types: {', '.join(TASKS.names())}")
    cls = TASKS.get(values["type"])
    task = build_dataclass(cls, values, "task")
    task.validate()
    return task


def build_model_config(node):
    from kvx.models import ModelConfig

    cfg = build_dataclass(ModelConfig, _plain(node), "model")
    cfg.validate()
    return cfg


SEMANTIC_KEYS = ("model", "method", "task", "seed", "kernels")


def _normalize(x: Any) -> Any:
    """Numbers as they mean: a float with an integral value is that int (budget=1e3 is budget=1000)."""
    if isinstance(x, float) and x.is_integer():
        return int(x)
    if isinstance(x, dict):
        return {k: _normalize(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_normalize(v) for v in x]
    return x


def input_paths(node: Any) -> list[str]:
    """Local files and folders a config names (task.data_files, LESS kernel folders, prompt files ...): every string
    value that looks like a path and exists."""
    from pathlib import Path

    out: list[str] = []
    if isinstance(node, dict):
        for v in node.values():
            out += input_paths(v)
    elif isinstance(node, list):
        for v in node:
            out += input_paths(v)
    elif isinstance(node, str) and ("/" in node or node.startswith("~")) and "\n" not in node and len(node) < 4096:
        try:
            if Path(node).expanduser().exists():
                out.append(node)
        except OSError:
            pass
    return out


def config_blob(cfg: DictConfig) -> str:
    """The text `config_hash` hashes: the semantic config as sorted JSON, input digests under "inputs", and the
    machine's asset and checkout folders written as ${kvx.assets:} and ${kvx.repo:}."""
    from kvx.digests import path_digest

    data = {k: OmegaConf.to_container(cfg[k], resolve=True) if isinstance(cfg.get(k), DictConfig) else cfg.get(k)
            for k in SEMANTIC_KEYS if k in cfg}
    data = _normalize(data)
    inputs = {p: path_digest(p) for k in ("method", "task") for p in input_paths(data.get(k))}
    if inputs:
        data["inputs"] = inputs
    # local asset locations differ between machines without changing the numbers; files inside the checkout (trained
    # kernels) likewise. Keys are sorted after the folders are replaced: the order of the input paths must not depend
    # on where the checkout and the assets sit
    blob = json.dumps(data, sort_keys=True, default=str)
    import kvx.assets

    blob = blob.replace(str(kvx.assets.assets_dir(check=False)), "${kvx.assets:}")
    blob = blob.replace(str(kvx.assets.REPO_ROOT), "${kvx.repo:}")
    return json.dumps(json.loads(blob), sort_keys=True)


def config_hash(cfg: DictConfig) -> str:
    """Short hash of what determines a run's numbers (not where it is written or logged): model, method, task, seed
    and kernels with numbers normalised, and the content digest (sha256) of every local input file the method and
    task name, so that editing a data file or retraining LESS kernels in place makes a new run."""
    blob = config_blob(cfg)
    return hashlib.sha1(blob.encode()).hexdigest()[:10]
