"""Indexes over the CPU-resident keys of one layer: ``flat`` (exact), ``ivf``/``hnsw`` (faiss baselines),
``roar`` (the attention-aware graph of RetrievalAttention). See :mod:`.base` for shapes."""

from .base import INDEX_REGISTRY, IndexError_, KVIndex, available_indexes, make_index, register_index
from . import flat  # noqa: F401  (registers "flat")
from . import faiss_baselines  # noqa: F401  (registers "ivf", "hnsw")
from . import roar  # noqa: F401  (registers "roar")

__all__ = ["INDEX_REGISTRY", "IndexError_", "KVIndex", "available_indexes", "make_index", "register_index"]
