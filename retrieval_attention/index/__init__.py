"""Indexes over the CPU-resident keys of one layer: ``flat`` (exact), ``ivf``/``hnsw`` (faiss baselines),
``roar`` (the attention-aware graph of RetrievalAttention). See :mod:`.base` for shapes."""

from .base import INDEX_REGISTRY, IndexError_, KVIndex, available_indexes, make_index, register_index
from . import flat  # noqa: F401  (registers "flat")

for _mod in ("faiss_baselines", "roar"):
    try:
        __import__(f"{__name__}.{_mod}")
    except ModuleNotFoundError as _e:  # pragma: no cover - only while a module is being written
        if _e.name != f"{__name__}.{_mod}":
            raise

__all__ = ["INDEX_REGISTRY", "IndexError_", "KVIndex", "available_indexes", "make_index", "register_index"]
