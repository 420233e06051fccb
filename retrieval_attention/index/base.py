"""The index interface: one base class, a registry by name.

An index covers **one layer of one sequence**: the CPU-resident post-RoPE keys of every KV head of that
layer. Query heads map to KV heads as in grouped-query attention: query head ``h`` searches the keys of
KV head ``h // (n_query_heads // n_kv_heads)``. A single-head index is the special case
``n_kv_heads = n_query_heads = 1``.

Shapes and dtypes (numpy arrays, C-contiguous, float32 unless stated):

* keys           ``[n_kv_heads, n_keys, head_dim]``
* train_queries  ``[n_query_heads, n_train, head_dim]`` (prefill queries; optional, used by ``roar``)
* queries        ``[n_query_heads, n_queries, head_dim]``
* search returns ``ids [n_query_heads, n_queries, k] int64`` (positions in insertion order; ``-1`` pads
  when the index holds fewer than ``k`` keys), ``scores [n_query_heads, n_queries, k] float32`` (the raw
  inner products ``q . key``, ``-inf`` where ``ids == -1``, sorted descending) and
  ``n_scanned [n_query_heads, n_queries] int64`` (inner products computed for that query).

Key ids are stable: the keys given to ``build`` get ids ``0..n-1`` and each later ``add`` continues the
numbering, so the caller can keep values in a parallel array.
"""

from __future__ import annotations

from dataclasses import dataclass

import json
import os
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np

from .kernels import all_finite

INDEX_REGISTRY: dict[str, type["KVIndex"]] = {}


class IndexError_(ValueError):
    """Bad input to an index (shape, dtype, non-finite values, empty index, bad budget)."""


def register_index(name: str):
    """Class decorator: make an index constructible by ``make_index(name, **params)``."""

    def deco(cls):
        if name in INDEX_REGISTRY and INDEX_REGISTRY[name] is not cls:
            raise ValueError(f"index name {name!r} is already registered by {INDEX_REGISTRY[name].__name__}")
        cls.name = name
        INDEX_REGISTRY[name] = cls
        return cls

    return deco


def available_indexes() -> list[str]:
    return sorted(INDEX_REGISTRY)


def make_index(name: str, **params) -> "KVIndex":
    """Instantiate a registered index by name, e.g. ``make_index("roar", M=32)``."""
    if name not in INDEX_REGISTRY:
        raise ValueError(f"unknown index {name!r}; available: {', '.join(available_indexes())}")
    return INDEX_REGISTRY[name](**params)


_FLOAT32 = np.dtype(np.float32)


def as_f32_3d(x, what: str, head_dim: int | None = None) -> np.ndarray:
    """Validate and convert a ``[heads, n, head_dim]`` array (numpy or torch) to C-contiguous float32 (a
    C-contiguous float32 numpy array, e.g. a decode step's queries, is checked and returned as it is)."""
    if type(x) is not np.ndarray:
        if hasattr(x, "detach"):  # torch tensor
            x = x.detach().to("cpu").float().numpy()
        x = np.asarray(x)
    if x.ndim != 3:
        raise IndexError_(f"{what} must have shape [heads, n, head_dim], got shape {tuple(x.shape)}")
    if x.dtype.kind != "f":
        raise IndexError_(f"{what} must be a floating-point array, got dtype {x.dtype}")
    if head_dim is not None and x.shape[2] != head_dim:
        raise IndexError_(f"{what} has head_dim {x.shape[2]}, but the index was built with head_dim {head_dim}")
    if x.dtype != _FLOAT32 or not x.flags.c_contiguous:
        x = np.ascontiguousarray(x, dtype=np.float32)
    if not _all_finite(x):
        bad = int((~np.isfinite(x)).any(axis=-1).sum())
        raise IndexError_(f"{what} contains NaN or inf in {bad} vector(s); check the model's dtype/overflow")
    return x


#: spare rows allocated past a store's current size in host key/value arrays (a fraction of it, within
#: bounds), so the first tokens appended do not copy a whole layer's keys into a doubled array
SPARE_FRACTION = 1 / 16
SPARE_MIN, SPARE_MAX = 1024, 16384


def spare_rows(n: int) -> int:
    """Spare rows for a host array sized for ``n`` rows (see ``SPARE_FRACTION``)."""
    return int(min(SPARE_MAX, max(SPARE_MIN, n * SPARE_FRACTION)))


#: arrays at least this large are checked for NaN/inf by torch (multi-threaded) instead of the compiled
#: single-threaded pass (:func:`.kernels.all_finite`)
_TORCH_CHECK_MIN = 1 << 20


def _all_finite(x: np.ndarray) -> bool:
    """Whether every element of float array ``x`` is finite. Large arrays: their sum first (one multi-threaded
    pass, no temporary; a NaN or inf element makes it non-finite whatever the order), and only when that is not
    finite (a NaN / inf, or finite values whose sum overflows) the element-wise check. A 128K-key layer's keys
    of the 8B shape (64M float32): 17 ms against 439 ms for ``isfinite().all()`` on the 2-core dev VM; the
    H100 host's profile of a layer build had spent 124 ms in two such checks."""
    if x.size >= _TORCH_CHECK_MIN:
        import torch

        t = torch.from_numpy(x)
        if bool(torch.isfinite(t.sum())):
            return True
        return bool(t.isfinite().all())
    return bool(all_finite(x))  # compiled: no temporary array (a per-layer check while decoding)


@dataclass(frozen=True)
class Residual:
    """What :meth:`KVIndex.search_attend` needs to add the residual estimate (:mod:`..attention.residual`):
    ``keys [n_kv_heads, >= n, D]`` float32 or uint16 bfloat16 bits, the keys drawn from (ids ``0..n-1``; the
    index's own stored keys or the cache's copy), ``m`` draws per (KV head, query) (``<= 0``: none) and the
    layer's ``seed``. ``lo`` (not None): no draws; the exact attention over the non-retrieved ids ``lo..n-1``,
    the keys that a device sample drawn at ``n = lo`` does not cover (:mod:`..attention.residual_device`)."""

    keys: np.ndarray
    n: int
    m: int
    seed: int = 0
    lo: int | None = None

    @property
    def active(self) -> bool:
        if self.lo is not None:
            return self.n > self.lo
        return self.m > 0 and self.n > 0


class KVIndex(ABC):
    """Maximum-inner-product top-k over the keys of all KV heads of one layer.

    Subclasses implement ``_build`` and ``_search``; the base class validates inputs, keeps the GQA
    mapping and provides ``save``/``load`` via ``state()``/``from_state()``.
    """

    name: ClassVar[str] = "base"
    #: budget parameter names accepted by ``search`` (e.g. ``("ef",)``), for benchmarks and docs
    budget_params: ClassVar[tuple[str, ...]] = ()

    def __init__(self, **params: Any) -> None:
        self.params = dict(params)
        self.n_kv_heads = 0
        self.n_query_heads = 0
        self.head_dim = 0
        self.n_keys = 0

    # ---- public API -------------------------------------------------------------------------------
    def build(self, keys, train_queries=None) -> "KVIndex":
        keys = as_f32_3d(keys, "keys")
        if keys.shape[1] == 0:
            raise IndexError_("cannot build an index over 0 keys")
        tq = None
        if train_queries is not None:
            tq = as_f32_3d(train_queries, "train_queries", keys.shape[2])
            if tq.shape[0] % keys.shape[0] != 0:
                raise IndexError_(
                    f"train_queries has {tq.shape[0]} query heads, not a multiple of the {keys.shape[0]} KV heads"
                )
        self.n_kv_heads, self.n_keys, self.head_dim = keys.shape
        self.n_query_heads = tq.shape[0] if tq is not None else self.n_kv_heads
        self._build(keys, tq)
        return self

    def search(self, queries, k: int, **budget):
        """Top-``k`` keys by inner product for each query; see the module docstring for shapes."""
        q, k = self._check_search(queries, k, budget)
        return self._search(q, k, **budget)

    def _check_search(self, queries, k, budget: dict) -> tuple[np.ndarray, int]:
        """Validated ``(queries [Hq, L, D] float32, k)`` of a search; raises on an empty index, bad shapes,
        a bad ``k`` or budget parameters this index does not take."""
        if self.n_keys == 0:
            raise IndexError_("search on an empty index: call build() first")
        q = as_f32_3d(queries, "queries", self.head_dim)
        if q.shape[0] % self.n_kv_heads != 0:
            raise IndexError_(f"queries have {q.shape[0]} heads, not a multiple of the {self.n_kv_heads} KV heads")
        if not isinstance(k, (int, np.integer)) or k <= 0:
            raise IndexError_(f"k must be a positive integer, got {k!r}")
        unknown = set(budget) - set(self.budget_params) if budget else None
        if unknown:
            raise IndexError_(
                f"{self.name} does not take budget parameter(s) {sorted(unknown)}; it takes {list(self.budget_params)}"
            )
        return q, int(k)

    def search_attend(self, queries, k: int, values: np.ndarray, scaling: float, return_ids: bool = False,
                      residual: "Residual | None" = None, **budget):
        """Top-``k`` search + softmax attention over the retrieved keys' values.

        queries ``[Hq, L, D]`` float32; values ``[n_kv_heads, >= n_keys, Dv]`` numpy, float32/float16 or
        uint16 holding bfloat16 bits (row ``j`` = value of key id ``j``); attention scores are
        ``scaling * q.key``. Returns ``out [Hq, L, Dv] float32`` (0 where nothing was retrieved),
        ``lse [Hq, L] float32`` (-inf there) and ``n_scanned [Hq, L] int64``. This generic version is
        ``search`` + :func:`.decode_kernels.retrieved_attention_ref`; indexes may fuse the two.
        ``return_ids``: also return the retrieved ids ``[Hq, L, k] int64`` (-1 padding) as a 4th item.
        ``residual``: also merge the estimate of the attention over the non-retrieved keys into the result
        (:class:`Residual`, :func:`~retrieval_attention.attention.residual.add_residual_into`).
        """
        from .decode_kernels import retrieved_attention_ref

        values = self._check_values(values)
        ids, scores, n_scanned = self.search(queries, k, **budget)
        kv_of_head = np.arange(ids.shape[0]) // (ids.shape[0] // self.n_kv_heads)
        out, lse = retrieved_attention_ref(scores, ids, values, kv_of_head, float(scaling))
        if residual is not None and residual.active:
            from ..attention.residual import add_residual_into

            add_residual_into(out, lse, np.asarray(residual.keys), values, queries, kv_of_head, ids, residual.n,
                              residual.m, float(scaling), residual.seed, lo=residual.lo)
        return (out, lse, n_scanned, ids) if return_ids else (out, lse, n_scanned)

    def _check_values(self, values) -> np.ndarray:
        values = np.asarray(values)
        if values.ndim != 3 or values.shape[0] != self.n_kv_heads or values.shape[1] < self.n_keys:
            raise IndexError_(
                f"values must have shape [{self.n_kv_heads}, >= {self.n_keys}, Dv], got {tuple(values.shape)}"
            )
        if not (values.dtype.kind == "f" or values.dtype == np.uint16):
            raise IndexError_(f"values must be float or uint16 (bfloat16 bits), got dtype {values.dtype}")
        return values

    def add(self, new_keys) -> None:
        """Append keys ``[n_kv_heads, n_new, head_dim]``; they get the next ids and must be retrievable."""
        if self.n_keys == 0:
            raise IndexError_("add() before build(): build the index first")
        x = as_f32_3d(new_keys, "new_keys", self.head_dim)
        if x.shape[0] != self.n_kv_heads:
            raise IndexError_(f"new_keys has {x.shape[0]} heads, the index has {self.n_kv_heads} KV heads")
        if x.shape[1] == 0:
            return
        self._add(x)
        self.n_keys += x.shape[1]

    def __len__(self) -> int:
        return self.n_keys

    @property
    def group_size(self) -> int:
        return max(1, self.n_query_heads // max(1, self.n_kv_heads))

    # ---- to implement -----------------------------------------------------------------------------
    @abstractmethod
    def _build(self, keys: np.ndarray, train_queries: np.ndarray | None) -> None: ...

    @abstractmethod
    def _search(self, queries: np.ndarray, k: int, **budget): ...

    @abstractmethod
    def _add(self, new_keys: np.ndarray) -> None: ...

    @abstractmethod
    def memory_bytes(self) -> int:
        """Bytes held by the index (keys copies + graph/lists), for reporting."""

    @abstractmethod
    def state(self) -> dict[str, np.ndarray]:
        """Arrays that fully describe the built index (for ``save``)."""

    @abstractmethod
    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        """Inverse of ``state`` (called on a fresh instance with the same params)."""

    # ---- persistence ------------------------------------------------------------------------------
    FORMAT_VERSION: ClassVar[int] = 1

    def save(self, path: str | os.PathLike) -> None:
        meta = {
            "format_version": self.FORMAT_VERSION,
            "index": self.name,
            "params": self.params,
            "shape": [self.n_kv_heads, self.n_query_heads, self.head_dim, self.n_keys],
        }
        arrays = self.state()
        np.savez(path, __meta__=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8), **arrays)

    @staticmethod
    def load(path: str | os.PathLike) -> "KVIndex":
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(bytes(z["__meta__"]).decode())
                arrays = {k: z[k] for k in z.files if k != "__meta__"}
        except Exception as e:  # corrupt / truncated / not an npz
            raise IndexError_(f"cannot read index file {path}: {e}") from e
        if meta.get("format_version") != KVIndex.FORMAT_VERSION:
            raise IndexError_(
                f"index file {path} has format version {meta.get('format_version')}, expected {KVIndex.FORMAT_VERSION}"
            )
        idx = make_index(meta["index"], **meta["params"])
        idx.n_kv_heads, idx.n_query_heads, idx.head_dim, idx.n_keys = meta["shape"]
        idx.load_state(arrays)
        return idx
