"""Persistent contexts: prefill and index a long document once, answer many requests from it.

A :class:`PrefilledContext` holds the cache after the document's tokens. Each request continues on a
private fork (:meth:`RetrievalCache.fork`): the document's KV and indexes are shared read-only, the
request's own tokens go into a per-request window and exact-scanned tail. Contexts can be saved to a
directory (``meta.json`` + ``kv.safetensors``, with a format version, the model/config identity and a
sha256 checksum) and loaded back; a corrupt or mismatched directory raises :class:`ContextFileError`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch

from .cache import CPUStore, RetrievalCache, RetrievalLayer
from .config import RetrievalConfig
from .generation import cache_kwarg, generate_ids
from .index import make_index
from .integration import enable, make_cache

FORMAT_VERSION = 1
#: config fields that shape the stored KV/indexes (others, like top_k, may differ per request)
BUILD_FIELDS = ("method", "n_sink", "window", "index", "index_params", "dense_layers", "max_train_queries",
                "exact_below")


class ContextFileError(ValueError):
    """A saved context is corrupt, of another format version, or made with another model/config."""


def model_fingerprint(model) -> str:
    """Identity of the model's weights and architecture (config + dtype + a hash of the embedding matrix)."""
    h = hashlib.sha256()
    cfg = model.config.to_dict()
    for volatile in ("_name_or_path", "architectures", "dtype", "torch_dtype", "transformers_version", "_attn_implementation"):
        cfg.pop(volatile, None)  # where the weights were loaded from / saved as is not their identity
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    emb = model.get_input_embeddings().weight.detach()
    h.update(str(emb.dtype).encode())
    sample = emb[:: max(1, emb.shape[0] // 64)].float().cpu().numpy()
    h.update(np.ascontiguousarray(sample).tobytes())
    return h.hexdigest()[:32]


def build_identity(config: RetrievalConfig) -> dict:
    d = config.to_dict()
    return {k: d[k] for k in BUILD_FIELDS}


def _effective(build: dict, n_tokens: int) -> dict:
    """``build`` with ``max_train_queries`` as the count a ``n_tokens`` prompt trains on: the automatic count
    (``None``) and the number it stands for are the same build (a context saved when 4,096 was the default)."""
    cfg = RetrievalConfig(max_train_queries=build.get("max_train_queries"))
    return {**build, "max_train_queries": cfg.train_queries(n_tokens)}


def fork_cache(cache):
    """A continuation of ``cache`` that leaves it untouched (RetrievalCache or plain DynamicCache)."""
    if isinstance(cache, RetrievalCache):
        return cache.fork()
    twin = copy.copy(cache)
    twin.layers = [copy.copy(l) for l in cache.layers]
    return twin


class PrefilledContext:
    """The cache state after a document's tokens, reusable by many requests."""

    def __init__(self, token_ids: list[int], config: RetrievalConfig, cache, fingerprint: str, stats: dict):
        self.token_ids = list(token_ids)
        self.config = config
        self.cache = cache
        self.fingerprint = fingerprint
        self.stats = stats

    # ---- building -----------------------------------------------------------------------------------
    @classmethod
    @torch.no_grad()
    def prefill(cls, model, token_ids: list[int], config: RetrievalConfig, progress: bool = False) -> "PrefilledContext":
        if not token_ids:
            raise ValueError("a context needs at least one token")
        cache = make_cache(model, config)
        if progress and hasattr(cache, "set_progress"):
            cache.set_progress(True)
        ids = torch.tensor([token_ids], device=model.device)
        t0 = time.perf_counter()
        with enable(model):
            model(input_ids=ids, use_cache=True, logits_to_keep=1, **{cache_kwarg(model): cache})
        if str(model.device).startswith("cuda"):
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        if hasattr(cache, "set_progress"):
            cache.set_progress(False)
        stats = {"prompt_tokens": len(token_ids), "prefill_s": elapsed}
        stats.update(cache.stats() if hasattr(cache, "stats") else {"index_build_s": 0.0})
        return cls(token_ids, config, cache, model_fingerprint(model), stats)

    def nbytes(self) -> int:
        if hasattr(self.cache, "stats"):
            s = self.cache.stats()
            return int(s["kv_device_bytes"] + s["kv_cpu_bytes"])
        return sum(2 * l.keys.numel() * l.keys.element_size() for l in self.cache.layers if l.keys is not None)

    # ---- using --------------------------------------------------------------------------------------
    def generate(self, model, new_ids: list[int], *, max_new_tokens: int, streamer=None, config=None, **gen_kwargs):
        """Continue after the context with ``new_ids`` (>= 1 token). Returns ``(generated ids, stats)``.

        ``config`` may change per-request settings (``top_k``, ``search_params``) but not how the context
        was built. The context itself is never modified.
        """
        if not new_ids:
            raise ValueError("a request on a context needs at least one new token")
        cfg = self.config
        if config is not None:
            if build_identity(config) != build_identity(self.config):
                raise ValueError("a request can change top_k / search budget only, not how the context was built")
            cfg = config
        cache = fork_cache(self.cache)
        if isinstance(cache, RetrievalCache):
            cache.config = cfg
            for layer in cache.retrieval_layers:
                layer.config = cfg
        ids = torch.tensor([self.token_ids + list(new_ids)])
        seqs, stats = generate_ids(
            model, ids, cfg, max_new_tokens=max_new_tokens, streamer=streamer, cache=cache, **gen_kwargs
        )
        return seqs[0, ids.shape[1] :].tolist(), stats

    # ---- persistence --------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        tensors, layout = cache_state(self.cache)
        tmp = d / "kv.safetensors.tmp"
        save_file(tensors, str(tmp))
        digest = _sha256(tmp)
        tmp.replace(d / "kv.safetensors")
        meta = {
            "format_version": FORMAT_VERSION,
            "model_fingerprint": self.fingerprint,
            "build": build_identity(self.config),
            "config": self.config.to_dict(),
            "token_ids": self.token_ids,
            "stats": {k: v for k, v in self.stats.items() if isinstance(v, (int, float, str))},
            "layout": layout,
            "sha256": {"kv.safetensors": digest},
        }
        (d / "meta.json.tmp").write_text(json.dumps(meta))
        (d / "meta.json.tmp").replace(d / "meta.json")

    @classmethod
    def load(cls, directory: str | Path, model, config: RetrievalConfig | None = None) -> "PrefilledContext":
        from safetensors.torch import load_file

        d = Path(directory)
        try:
            meta = json.loads((d / "meta.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ContextFileError(f"cannot read context metadata {d / 'meta.json'}: {e}") from e
        if meta.get("format_version") != FORMAT_VERSION:
            raise ContextFileError(
                f"context {d} has format version {meta.get('format_version')}, this library reads {FORMAT_VERSION}; "
                "re-create the context"
            )
        fp = model_fingerprint(model)
        if meta.get("model_fingerprint") != fp:
            raise ContextFileError(f"context {d} was made with another model (fingerprint mismatch); re-create it")
        # contexts saved before exact_below existed indexed every store: they read as exact_below=0
        saved_cfg = RetrievalConfig(**{"exact_below": 0, **meta["config"],
                                       "dense_layers": tuple(meta["config"]["dense_layers"])})
        saved_build = {"exact_below": 0, **meta["build"]}
        n_tokens = len(meta["token_ids"])
        if config is not None and _effective(build_identity(config), n_tokens) != _effective(saved_build, n_tokens):
            want = build_identity(config)
            diff = {k: (saved_build.get(k), want[k]) for k in BUILD_FIELDS if saved_build.get(k) != want[k]}
            raise ContextFileError(f"context {d} was built with another configuration (saved vs requested: {diff})")
        f = d / "kv.safetensors"
        try:
            digest = _sha256(f)
        except OSError as e:
            raise ContextFileError(f"cannot read {f}: {e}") from e
        if digest != meta.get("sha256", {}).get("kv.safetensors"):
            raise ContextFileError(f"checksum mismatch for {f}: the file is corrupt or was modified; re-create the context")
        try:
            tensors = load_file(str(f))
            cache = cache_from_state(model, saved_cfg, tensors, meta["layout"])
        except Exception as e:  # noqa: BLE001 - any decoding problem means a bad file
            raise ContextFileError(f"cannot decode context {d}: {e}") from e
        return cls(meta["token_ids"], config or saved_cfg, cache, fp, meta.get("stats", {}))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---- cache <-> flat tensors ---------------------------------------------------------------------------
_LAYER_TENSORS = ("static_k", "static_v", "static_valid")


def cache_state(cache) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Flatten a (Retrieval|Dynamic)Cache into named CPU tensors + a JSON layout."""
    tensors: dict[str, torch.Tensor] = {}
    layout: list[dict] = []

    def put(name, t):
        tensors[name] = t.detach().to("cpu").contiguous().clone()

    for i, layer in enumerate(cache.layers):
        if isinstance(layer, RetrievalLayer) and layer.offloaded:
            entry = {"kind": "retrieval", "total": layer.total, "win_start": layer.win_start,
                     "n_query_heads": layer.n_query_heads, "stores": []}
            for name in _LAYER_TENSORS:
                put(f"L{i}.{name}", getattr(layer, name))
            put(f"L{i}.sink_end", layer.sink_end)
            for b, store in enumerate(layer.stores):
                st = {"n": store.n, "index": None}
                if store.index is not None:
                    idx = store.index
                    st["index"] = {"name": idx.name, "params": idx.params,
                                   "shape": [idx.n_kv_heads, idx.n_query_heads, idx.head_dim, idx.n_keys]}
                    for key, arr in idx.state().items():
                        put(f"L{i}.S{b}.idx.{key}", torch.from_numpy(np.ascontiguousarray(arr)))
                    put(f"L{i}.S{b}.keys", store.keys[:, : store.n])
                    put(f"L{i}.S{b}.values", store.values[:, : store.n])
                entry["stores"].append(st)
        else:
            entry = {"kind": type(layer).__name__, "total": layer.get_seq_length(),
                     "cumulative_length": getattr(layer, "cumulative_length", None)}
            if getattr(layer, "keys", None) is not None and layer.keys.numel():
                put(f"L{i}.keys", layer.keys)
                put(f"L{i}.values", layer.values)
        layout.append(entry)
    return tensors, layout


def cache_from_state(model, config: RetrievalConfig, tensors: dict, layout: list[dict]):
    """Inverse of :func:`cache_state`, placing device tensors on ``model.device``."""
    dev = model.device
    cache = make_cache(model, config)
    if len(layout) != len(cache.layers):
        raise ContextFileError(f"saved context has {len(layout)} layers, the model {len(cache.layers)}")
    for i, entry in enumerate(layout):
        layer = cache.layers[i]
        if entry["kind"] == "retrieval":
            if not isinstance(layer, RetrievalLayer):
                raise ContextFileError(f"layer {i} is a retrieval layer in the file but not for this config")
            for name in _LAYER_TENSORS:
                setattr(layer, name, tensors[f"L{i}.{name}"].to(dev))
            layer.sink_end = tensors[f"L{i}.sink_end"].to(dev)
            layer.total, layer.win_start = entry["total"], entry["win_start"]
            layer.n_query_heads = entry["n_query_heads"]
            layer.offloaded = True
            layer.keys = layer.values = None
            layer.stores = []
            for b, st in enumerate(entry["stores"]):
                store = CPUStore(config, i)
                if st["index"] is not None:
                    spec = st["index"]
                    idx = make_index(spec["name"], **spec["params"])
                    idx.n_kv_heads, idx.n_query_heads, idx.head_dim, idx.n_keys = spec["shape"]
                    prefix = f"L{i}.S{b}.idx."
                    idx.load_state({k[len(prefix):]: v.numpy() for k, v in tensors.items() if k.startswith(prefix)})
                    store.index = idx
                    store._append(tensors[f"L{i}.S{b}.keys"], tensors[f"L{i}.S{b}.values"])
                    store.n = st["n"]
                layer.stores.append(store)
        else:
            if f"L{i}.keys" in tensors:
                k, v = tensors[f"L{i}.keys"].to(dev), tensors[f"L{i}.values"].to(dev)
                if not layer.is_initialized:
                    layer.lazy_initialization(k, v)
                layer.keys, layer.values = k, v
            if isinstance(layer, RetrievalLayer):
                layer.total = entry["total"]
            elif entry.get("cumulative_length") is not None:
                layer.cumulative_length = entry["cumulative_length"]
    return cache
