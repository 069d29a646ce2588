"""The task interface: a task reads its examples, runs them through the engine and scores the predictions.

A task is a dataclass registered with `@TASKS.register(type)`; configs/task/<name>.yaml gives `type` (the
registry key), `name` (the label used in results paths) and the fields. Shared fields below; keep these keys
stable: `task.mode`, `task.limit`, `task.data_files`, `task.max_tokens` (perplexity).
"""

from __future__ import annotations

import dataclasses
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvx.errors import ConfigError, DataError


@dataclass
class TaskResult:
    metrics: dict[str, Any]
    outputs: list[dict[str, Any]] = field(default_factory=list)  # per window / per example, saved as outputs.jsonl
    artifacts: dict[str, bytes] = field(default_factory=dict)  # extra files for the run folder (e.g. heatmap.png)


@dataclass
class RunContext:
    """What the runner hands a task: a progress-bar factory and the seed."""

    progress: Callable[..., Iterable] = lambda it, **kw: it
    seed: int = 0


@dataclass
class Task(ABC):
    type: str = ""
    name: str = ""
    mode: str = "stream"  # stream: real decoding through the cache; masked: one parallel forward with the policy's mask
    limit: int | None = None  # number of examples (example-based tasks)
    data_files: Any = None  # local file(s) used instead of the hub
    seed: int = 0

    def validate(self) -> None:
        if self.mode not in ("stream", "masked"):
            raise ConfigError("task.mode", f"must be 'stream' or 'masked', got {self.mode!r}")
        if self.limit is not None and self.limit <= 0:
            raise ConfigError("task.limit", f"must be a positive number of examples or null, got {self.limit}")

    @abstractmethod
    def run(self, engine, ctx: RunContext) -> TaskResult:
        """Read the examples, run them through the engine, score them."""

    def describe(self) -> dict:
        return dataclasses.asdict(self)


def read_jsonl(path: str | Path, required: Iterable[str] = ()) -> list[dict]:
    """Rows of a jsonl file; a missing file, an empty file, bad JSON or a missing field names the file and row."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    rows = []
    with path.open(encoding="utf-8") as fh:
        for i, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, row {i}: not valid JSON ({e.msg})") from e
            missing = [k for k in required if k not in row]
            if missing:
                raise DataError(f"{path}, row {i}: missing field(s) {', '.join(missing)}")
            rows.append(row)
    if not rows:
        raise DataError(f"data file {path} is empty")
    return rows


def data_paths(data_files: Any) -> list[Path]:
    if data_files is None:
        return []
    if isinstance(data_files, (str, Path)):
        return [Path(str(data_files)).expanduser()]
    return [Path(str(p)).expanduser() for p in data_files]
