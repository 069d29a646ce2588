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

    def check(self) -> None:
        """Check the task's local inputs (paths exist, rows parse and carry the fields the task reads) before the
        model loads: a typo then costs seconds, not a model load. The base checks that every data file exists;
        tasks that read files override it (and reuse the readers their `run` uses)."""
        for p in data_paths(self.data_files):
            if not p.exists():
                raise DataError(f"task.data_files: {p} does not exist")

    @abstractmethod
    def run(self, engine, ctx: RunContext) -> TaskResult:
        """Read the examples, run them through the engine, score them."""

    def describe(self) -> dict:
        return dataclasses.asdict(self)


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number")


def not_utf8(path: Path, data: bytes, err: UnicodeDecodeError) -> DataError:
    row = data[: err.start].count(b"\n") + 1
    return DataError(f"{path}, row {row}: not UTF-8 text (byte 0x{data[err.start]:02x}); expected a UTF-8 text file")


def read_text(path: str | Path) -> str:
    """A UTF-8 text file; a missing file or bytes that are not UTF-8 (a binary file) name the file and the row."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise not_utf8(path, data, e) from None


def parse_rows(lines: Iterable[str], where: str, required: Iterable[str] = (), text: Iterable[str] = ()) -> list[dict]:
    """Rows of jsonl lines; each must be a JSON object with the `required` fields (not null), and the `text` fields
    must be strings. A bad row names `where`, the row and what is expected."""
    required, text = tuple(required), tuple(text)
    rows = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}, row {i}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{where}, row {i}: expected a JSON object ({{...}}) per line, got {_kind(row)}")
        missing = [k for k in required if k not in row]
        if missing:
            raise DataError(f"{where}, row {i}: missing field(s) {', '.join(missing)}")
        for k in required:
            if row[k] is None:
                raise DataError(f"{where}, row {i}: field {k} is null")
        for k in text:
            if not isinstance(row.get(k), str):
                raise DataError(f"{where}, row {i}: field {k} must be a string, got {_kind(row.get(k))}")
        rows.append(row)
    return rows


def read_jsonl(path: str | Path, required: Iterable[str] = (), text: Iterable[str] = ()) -> list[dict]:
    """Rows of a jsonl file (see parse_rows); a missing, empty or non-UTF-8 file names the file (and the row)."""
    path = Path(path)
    rows = parse_rows(read_text(path).split("\n"), str(path), required, text)
    if not rows:
        raise DataError(f"data file {path} is empty")
    return rows


def data_paths(data_files: Any) -> list[Path]:
    if data_files is None:
        return []
    if isinstance(data_files, (str, Path)):
        return [Path(str(data_files)).expanduser()]
    return [Path(str(p)).expanduser() for p in data_files]
