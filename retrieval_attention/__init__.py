"""RetrievalAttention for Hugging Face transformers: exact attention over sink + window tokens on the
device, attention-aware vector retrieval over the offloaded KV cache on the CPU, merged exactly."""

__version__ = "0.1.0"

from .config import RetrievalConfig  # noqa: E402

__all__ = ["RetrievalConfig", "RetrievalCache", "enable", "make_cache", "generate", "generate_batch", "generate_many",
           "load_model"]


def __getattr__(name):  # lazy: keep `import retrieval_attention` light (no transformers import)
    if name == "RetrievalCache":
        from .cache import RetrievalCache

        return RetrievalCache
    if name in ("enable", "make_cache", "register"):
        from . import integration

        return getattr(integration, name)
    if name in ("generate", "generate_batch", "generate_many"):
        from . import generation

        return getattr(generation, name)
    if name == "load_model":
        from .models import load_model

        return load_model
    raise AttributeError(name)
