"""Clean a results folder: `python -m kvx.clean [results_dir] [--rehash] [--dry-run]` (or `kvx-clean`).

- removes staging (`.<hash>.tmp-*`) and replaced (`.<hash>.old-*`) folders of killed runs, unless the run that owns
  them is still going (it holds its config's lock), and stale lock files;
- removes empty folders under runs/ and .sweeps/;
- with --rehash, renames run folders whose name is not their config's hash under the current rules (after a change
  of what the hash covers), so that their configs are found as done again.
Folders moved aside as incomplete (`.<hash>.incomplete-*`) are kept and listed: they hold what was there.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
from pathlib import Path

from kvx.results import LEFTOVER_TAGS, claim

_HIDDEN = re.compile(r"^\.(?P<hash>[^.]+)\.(?P<tag>tmp|old|incomplete|lock)(?:-.*)?$")


def stale(root: Path) -> tuple[list[Path], list[Path]]:
    """(leftover folders whose config nobody holds, incomplete folders) under root/runs."""
    gone, incomplete = [], []
    runs = root / "runs"
    if not runs.is_dir():
        return gone, incomplete
    for p in sorted(runs.rglob(".*")):
        m = _HIDDEN.match(p.name)
        if not m:
            continue
        if m["tag"] == "incomplete":
            incomplete.append(p)
            continue
        if f".{m['tag']}-" not in LEFTOVER_TAGS and m["tag"] != "lock":
            continue
        with claim(p.parent / m["hash"], wait=False) as held:  # a run in progress holds its lock: leave it
            if held and m["tag"] != "lock":
                gone.append(p)
    return gone, incomplete


def rehash(root: Path, dry_run: bool = False, checkout: Path | None = None) -> list[tuple[Path, Path]]:
    """Rename run folders to the hash of their own config.yaml; returns (old, new) pairs (conflicts are skipped).
    `checkout`: the repository the runs were made from, if not this one (its paths then hash as this one's)."""
    import kvx.assets
    import kvx.config  # noqa: F401  (resolvers)
    from kvx.config import config_hash

    repo_root = kvx.assets.REPO_ROOT
    if checkout is not None:
        kvx.assets.REPO_ROOT = Path(checkout).resolve()
    try:
        return _rehash(root, dry_run, config_hash)
    finally:
        kvx.assets.REPO_ROOT = repo_root


def _rehash(root: Path, dry_run: bool, config_hash) -> list[tuple[Path, Path]]:
    from omegaconf import OmegaConf

    moves = []
    for cfg_file in sorted((root / "runs").glob("*/*/*/*/config.yaml")):
        d = cfg_file.parent
        if d.name.startswith("."):
            continue
        new = d.with_name(config_hash(OmegaConf.load(cfg_file)))
        if new == d:
            continue
        if new.exists():
            print(f"[kvx] not renamed: {d} -> {new.name} exists already")
            continue
        if not dry_run:
            os.replace(d, new)
        moves.append((d, new))
    return moves


def prune_tree(top: Path) -> int:
    """Remove empty folders below `top` (bottom-up), except hidden ones (a run's staging folder); returns how many."""
    n = 0
    if not top.is_dir():
        return n
    for dirpath, _, _ in sorted(os.walk(top), key=lambda t: -len(t[0])):
        d = Path(dirpath)
        if d != top and not any(part.startswith(".") for part in d.relative_to(top).parts):
            try:
                d.rmdir()
                n += 1
            except OSError:
                pass
    return n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="kvx-clean", description=__doc__.split("\n\n")[0])
    ap.add_argument("results_dir", nargs="?", default="results")
    ap.add_argument("--rehash", action="store_true", help="rename run folders to their config's current hash")
    ap.add_argument("--checkout", help="with --rehash: the repository the runs were made from (default: this one)")
    ap.add_argument("--dry-run", action="store_true", help="say what would change, change nothing")
    args = ap.parse_args(argv)
    root = Path(args.results_dir).expanduser()
    if not root.is_dir():
        ap.error(f"results_dir: {root} is not a folder")
    gone, incomplete = stale(root)
    for p in gone:
        print(f"[kvx] {'would remove' if args.dry_run else 'removed'} {p}")
        if not args.dry_run:
            shutil.rmtree(p, ignore_errors=True)
    for p in incomplete:
        print(f"[kvx] kept (moved aside as incomplete): {p}")
    if args.rehash:
        for old, new in rehash(root, args.dry_run, args.checkout):
            print(f"[kvx] {'would rename' if args.dry_run else 'renamed'} {old} -> {new.name}")
    if not args.dry_run:
        n = prune_tree(root / "runs") + prune_tree(root / ".sweeps")
        if n:
            print(f"[kvx] removed {n} empty folder(s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
