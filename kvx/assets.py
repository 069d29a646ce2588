"""Where the offline assets live: one setting, the KVX_ASSETS environment variable."""

from __future__ import annotations

import os
from pathlib import Path

from kvx.errors import DataError

REPO_ROOT = Path(__file__).resolve().parent.parent
ENV_VAR = "KVX_ASSETS"


def assets_dir(check: bool = True) -> Path:
    """The assets folder: $KVX_ASSETS, or ../shared/assets beside the repository."""
    path = Path(os.environ.get(ENV_VAR, REPO_ROOT.parent / "shared" / "assets")).expanduser().resolve()
    if check and not path.is_dir():
        raise DataError(
            f"assets folder {path} does not exist; set the environment variable {ENV_VAR} to the folder holding "
            "models/stories260k, tinystories/, wikitext2/ ..."
        )
    return path


def asset(relpath: str) -> Path:
    path = assets_dir() / relpath
    if not path.exists():
        raise DataError(f"asset {path} is missing (assets folder from ${ENV_VAR}: {assets_dir()})")
    return path
