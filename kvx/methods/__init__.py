"""Compression methods, one file each, registered by name in kvx.registry.METHODS."""

# the imports register each method
from kvx.methods import (  # noqa: F401
    adakv,
    full,
    h2o,
    infinipot,
    kivi,
    knorm,
    less,
    observed_attention,
    qaq,
    scissorhands,
    sirllm,
    snapkv,
    streaming_llm,
    tova,
    uniform,
)
from kvx.methods.base import ArchInfo, LayerPolicy, Method, RankedPolicy, ScoredPolicy

__all__ = ["ArchInfo", "LayerPolicy", "Method", "RankedPolicy", "ScoredPolicy"]
