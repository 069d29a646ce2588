"""`full`: the uncompressed cache, the reference every method is measured against."""

from __future__ import annotations

from dataclasses import dataclass

from kvx.methods.base import Method
from kvx.registry import METHODS


@METHODS.register("full")
@dataclass
class Full(Method):
    name: str = "full"
