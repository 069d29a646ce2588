"""Hot paths: pure-torch reference twins (reference.py) and Triton kernels with the same signatures.

`kernels=ref|triton|auto` chooses; auto means Triton on CUDA and the reference elsewhere.
"""

from __future__ import annotations

import torch

from kvx.errors import ConfigError

_BACKEND = "auto"


def set_backend(name: str) -> None:
    global _BACKEND
    if name not in ("auto", "ref", "triton"):
        raise ConfigError("kernels", f"unknown kernel backend {name!r}; allowed: auto, ref, triton")
    _BACKEND = name


def backend() -> str:
    """The backend set with `set_backend` (auto, ref or triton)."""
    return _BACKEND


def use_triton(device: torch.device | str) -> bool:
    if _BACKEND == "ref":
        return False
    if _BACKEND == "triton":
        return True
    return (device if isinstance(device, torch.device) else torch.device(device)).type == "cuda"
