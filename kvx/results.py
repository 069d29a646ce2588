"""Run folders on disk: claim a config (one process computes it), stage and publish atomically, validate what is
there, and clean up what killed runs leave behind.

    runs/<task>/<model>/<method>/<hash>/                  a finished run (config.yaml, metrics.json, outputs.jsonl, env.json)
    runs/<task>/<model>/<method>/.<hash>.lock             held (flock) by the process computing <hash>; removed after
    runs/<task>/<model>/<method>/.<hash>.tmp-<pid>-<id>   staging folder of a run in progress
    runs/<task>/<model>/<method>/.<hash>.incomplete-<t>   a run folder that did not validate, moved aside

Folders and files are created with the process's umask (group members on a shared filesystem can read them).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

REQUIRED = ("config.yaml", "metrics.json", "outputs.jsonl", "env.json")
METRICS_KEYS = ("task", "model", "method")
LEFTOVER_TAGS = (".tmp-", ".old-")


class Incomplete(Exception):
    """A run folder whose files do not validate; the message says which file and why."""


def read_metrics(run_dir: Path) -> dict:
    """metrics.json of a finished run; raises Incomplete when a file is missing, truncated or of the wrong shape."""
    import yaml

    for name in REQUIRED:
        if not (run_dir / name).is_file():
            raise Incomplete(f"{name} is missing")
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise Incomplete(f"metrics.json is not valid JSON ({getattr(e, 'msg', None) or e.reason})") from e
    if not isinstance(metrics, dict) or not all(isinstance(metrics.get(k), str) for k in METRICS_KEYS):
        raise Incomplete(f"metrics.json is not an object with {', '.join(METRICS_KEYS)}")
    try:
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise Incomplete("config.yaml is not valid YAML") from e
    if not isinstance(cfg, dict):
        raise Incomplete("config.yaml is not a mapping")
    return metrics


def move_aside(run_dir: Path) -> Path:
    """Rename a run folder that did not validate to a hidden `.<hash>.incomplete-<UTC time>` beside it."""
    target = run_dir.with_name(f".{run_dir.name}.incomplete-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}")
    if target.exists():
        target = target.with_name(f"{target.name}-{secrets.token_hex(2)}")
    os.replace(run_dir, target)
    return target


def lock_path(run_dir: Path) -> Path:
    return run_dir.parent / f".{run_dir.name}.lock"


def _lock(path: Path, wait: bool, on_wait: Callable[[], None] | None) -> int | None:
    """An open, flock-ed descriptor of `path` (created if needed), or None if `wait` is false and another holds it."""
    import fcntl

    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not wait:
                    os.close(fd)
                    return None
                if on_wait is not None:
                    on_wait()
                    on_wait = None
                fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):  # no locks here: go on without
                return fd
            os.close(fd)
            raise
        # the holder before us removes the file when done: make sure we locked the file still at `path`
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def _unlock(path: Path, fd: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    os.close(fd)


@contextlib.contextmanager
def claim(run_dir: Path, wait: bool = True, on_wait: Callable[[], None] | None = None) -> Iterator[bool]:
    """Hold the config's lock file while computing it, so that a second identical run waits (then finds the result)
    instead of computing the same thing. Yields False (holding nothing) if `wait` is false and the lock is taken."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    path = lock_path(run_dir)
    fd = _lock(path, wait, on_wait)
    if fd is None:
        yield False
        return
    try:
        yield True
    finally:
        _unlock(path, fd)


def leftovers(run_dir: Path) -> list[Path]:
    """Staging (`.tmp-`) and replaced (`.old-`) folders of this config left by killed runs."""
    parent = run_dir.parent
    if not parent.is_dir():
        return []
    return sorted(p for p in parent.iterdir()
                  if any(p.name.startswith(f".{run_dir.name}{tag}") for tag in LEFTOVER_TAGS))


def remove_leftovers(run_dir: Path) -> int:
    """Remove this config's leftovers; call it only while holding the config's claim (then none is in use)."""
    found = leftovers(run_dir)
    for p in found:
        shutil.rmtree(p, ignore_errors=True)
    return len(found)


@contextlib.contextmanager
def staging_dir(final: Path) -> Iterator[Path]:
    """A folder beside `final`, published as `final` only if the block succeeds (a crash leaves nothing behind).
    Created with os.mkdir, so it honours the umask (tempfile.mkdtemp would make it 0700)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{secrets.token_hex(3)}"
    tmp.mkdir()
    try:
        yield tmp
        publish(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def publish(tmp: Path, final: Path) -> bool:
    """Move `tmp` to `final`, replacing an earlier result. If another writer's result lands between our two renames,
    theirs stays and ours is dropped: exactly one result, and no folder is left behind. True if ours was published."""
    old: Path | None = final.parent / f".{final.name}.old-{os.getpid()}-{secrets.token_hex(3)}"
    try:
        os.replace(final, old)
    except FileNotFoundError:
        old = None
    try:
        os.replace(tmp, final)
        return True
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        return False
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def prune_empty(start: Path, stop: Path) -> None:
    """Remove `start` and its parents while they are empty, up to (not including) `stop`."""
    start, stop = Path(start), Path(stop)
    p = start
    while p != stop and stop in p.parents:
        try:
            p.rmdir()
        except OSError:
            return
        p = p.parent
