"""Compression methods, one file each, registered by name in kvx.registry.METHODS."""

from kvx.methods import (  # registration
    full,  # noqa: F401
    h2o,  # noqa: F401
    infinipot,  # noqa: F401
    less,  # noqa: F401
    scissorhands,  # noqa: F401
    sirllm,  # noqa: F401
    snapkv,  # noqa: F401
    streaming_llm,  # noqa: F401
    tova,  # noqa: F401
)
from kvx.methods import kivi, qaq, uniform  # noqa: F401  (registration)
from kvx.methods.base import ArchInfo, LayerPolicy, Method, ScoredPolicy

__all__ = ["ArchInfo", "LayerPolicy", "Method", "ScoredPolicy"]
