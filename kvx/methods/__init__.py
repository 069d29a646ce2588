"""Compression methods, one file each, registered by name in kvx.registry.METHODS."""

from kvx.methods import full, streaming_llm  # noqa: F401  (registration)
from kvx.methods import h2o, scissorhands, sirllm, snapkv, tova  # noqa: F401  (registration)
from kvx.methods import less  # noqa: F401  (registration)
from kvx.methods import kivi, qaq, uniform  # noqa: F401  (registration)
from kvx.methods.base import ArchInfo, LayerPolicy, Method, ScoredPolicy

__all__ = ["ArchInfo", "LayerPolicy", "Method", "ScoredPolicy"]
