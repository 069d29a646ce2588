"""kvx: KV-cache compression for LLM inference."""

__version__ = "0.1.0"
