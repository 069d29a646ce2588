"""Storage: what bytes each layer holds and how attention reads them."""

from kvx.cache.dense import DenseStore, IndexStore, Store
from kvx.cache.kvcache import KVXCache

__all__ = ["DenseStore", "IndexStore", "KVXCache", "Store"]
