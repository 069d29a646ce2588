"""Content digests (sha256) of the input files a run reads, hashed once and cached.

The cache maps a file's identity and stat (device, inode, size, mtime, ctime: any write changes ctime) to its digest,
in `$KVX_CACHE/digests.json` (default `$XDG_CACHE_HOME/kvx` or `~/.cache/kvx`); an unwritable cache folder only
costs re-hashing. A folder's digest covers the relative path and digest of every file below it (hidden ones skipped).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from pathlib import Path

_MEMO: dict[str, str] = {}
_LOADED: dict | None = None


def cache_file() -> Path:
    root = os.environ.get("KVX_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kvx"
    return Path(root) / "digests.json"


def _cache() -> dict:
    global _LOADED
    if _LOADED is None:
        try:
            _LOADED = json.loads(cache_file().read_text(encoding="utf-8"))
            if not isinstance(_LOADED, dict):
                _LOADED = {}
        except (OSError, ValueError):
            _LOADED = {}
    return _LOADED


def _save(entries: dict) -> None:
    path = cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(3)}")
        tmp.write_text(json.dumps(entries), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        pass


def file_digest(path: Path) -> str:
    st = path.stat()
    key = f"{path.resolve()}|{st.st_dev}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}"
    if key in _MEMO:
        return _MEMO[key]
    cache = _cache()
    if key not in cache:
        h = hashlib.sha256()
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        cache[key] = h.hexdigest()
        _save(cache)
    _MEMO[key] = cache[key]
    return cache[key]


def path_digest(path: str | Path) -> str:
    """sha256 of a file's bytes, or of a folder's listing of (relative path, file digest)."""
    p = Path(path).expanduser()
    if p.is_file():
        return file_digest(p)
    h = hashlib.sha256()
    for f in sorted(q for q in p.rglob("*") if q.is_file()):
        rel = f.relative_to(p)
        if any(part.startswith(".") for part in rel.parts):
            continue
        h.update(f"{rel.as_posix()}\0{file_digest(f)}\n".encode())
    return h.hexdigest()
