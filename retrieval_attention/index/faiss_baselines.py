"""``ivf`` and ``hnsw``: faiss-cpu baselines (maximum inner product), one faiss index per KV head.

They are built over the keys only (the train queries are ignored): exactly the out-of-distribution
setting RetrievalAttention's attention-aware index is designed to fix.

``n_scanned``:

* ``ivf`` -- the number of keys in the lists probed for that query (the ``nprobe`` nearest centroids,
  found by the coarse quantizer; the ``nlist`` centroid products are not counted);
* ``hnsw`` -- faiss's distance counter (``faiss.cvar.hnsw_stats.ndis``) of one search call for a query
  head, averaged over that head's queries (faiss only reports the total).
"""

from __future__ import annotations

import math
import threading

import faiss
import numpy as np

from .base import IndexError_, KVIndex, register_index

_FAISS_LOCK = threading.Lock()  # hnsw_stats is a process-global counter


def _pos_int(name, v, who, minimum=1):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
        raise IndexError_(f"{who}: {name} must be an integer >= {minimum}, got {v!r}")
    return int(v)


def _serialize(index) -> np.ndarray:
    return np.asarray(faiss.serialize_index(index), dtype=np.uint8)


def _deserialize(arr) -> faiss.Index:
    return faiss.deserialize_index(np.ascontiguousarray(arr, dtype=np.uint8))


class _FaissPerHead(KVIndex):
    def _heads_map(self, Hq):
        return np.arange(Hq) // (Hq // self.n_kv_heads)

    def _pad(self, D, I, k):
        # faiss pads with -1 ids and -inf (IP metric) / -3.4e38 scores; normalise to our convention
        I = I.astype(np.int64, copy=False)
        D = np.where(I >= 0, D, -np.inf).astype(np.float32)
        return D, I

    def _add(self, new_keys):
        for h, ix in enumerate(self._indexes):
            ix.add(np.ascontiguousarray(new_keys[h]))

    def memory_bytes(self) -> int:
        # serialised size == the codes/vectors + lists/graph held in memory (faiss keeps no other copies)
        return int(sum(faiss.serialize_index(ix).size for ix in self._indexes))

    def state(self):
        return {f"head{h}": _serialize(ix) for h, ix in enumerate(self._indexes)}

    def load_state(self, arrays):
        self._indexes = [_deserialize(arrays[f"head{h}"]) for h in range(self.n_kv_heads)]
        self._after_load()

    def _after_load(self):
        pass


@register_index("ivf")
class IVFIndex(_FaissPerHead):
    """faiss ``IndexIVFFlat`` (inner product). ``nlist`` default: ``round(4 * sqrt(n))`` clipped to
    [1, n / 32] (at least 1); budget ``nprobe`` (default 16)."""

    budget_params = ("nprobe",)

    def __init__(self, nlist: int | None = None, nprobe: int = 16, seed: int = 1234) -> None:
        super().__init__(nlist=nlist, nprobe=nprobe, seed=seed)
        self.nlist = None if nlist is None else _pos_int("nlist", nlist, "ivf")
        self.nprobe = _pos_int("nprobe", nprobe, "ivf")
        self.seed = int(seed)

    def _build(self, keys, train_queries):
        n, d = keys.shape[1], keys.shape[2]
        nlist = self.nlist or max(1, min(int(round(4 * math.sqrt(n))), n // 32))
        nlist = min(nlist, n)
        self._indexes = []
        for h in range(keys.shape[0]):
            quant = faiss.IndexFlatIP(d)
            ix = faiss.IndexIVFFlat(quant, d, nlist, faiss.METRIC_INNER_PRODUCT)
            ix.own_fields = True
            quant.this.disown()
            ix.cp.seed = self.seed
            ix.cp.min_points_per_centroid = 1  # silence warnings for small n; clustering still fine
            ix.train(keys[h])
            ix.add(keys[h])
            self._indexes.append(ix)

    def _search(self, queries, k, nprobe=None):
        nprobe = self.nprobe if nprobe is None else _pos_int("nprobe", nprobe, "ivf")
        Hq, nq, _ = queries.shape
        kv = self._heads_map(Hq)
        ids = np.empty((Hq, nq, k), np.int64)
        sc = np.empty((Hq, nq, k), np.float32)
        ns = np.empty((Hq, nq), np.int64)
        for h in range(Hq):
            ix = self._indexes[kv[h]]
            p = min(nprobe, ix.nlist)
            params = faiss.SearchParametersIVF(nprobe=p)
            D, I = ix.search(queries[h], k, params=params)
            sc[h], ids[h] = self._pad(D, I, k)
            # keys scanned = sizes of the probed lists (the quantizer picks the same lists as search)
            _, lists = ix.quantizer.search(queries[h], p)
            sizes = np.array([ix.invlists.list_size(i) for i in range(ix.nlist)], np.int64)
            ns[h] = np.where(lists >= 0, sizes[np.maximum(lists, 0)], 0).sum(1)
        return ids, sc, ns


@register_index("hnsw")
class HNSWIndex(_FaissPerHead):
    """faiss ``IndexHNSWFlat`` (inner product), ``M`` links per node (default 32), ``ef_construction``
    (default 128); budget ``ef`` = efSearch (default 128; faiss uses ``max(ef, k)``)."""

    budget_params = ("ef",)

    def __init__(self, M: int = 32, ef_construction: int = 128, ef: int = 128) -> None:
        super().__init__(M=M, ef_construction=ef_construction, ef=ef)
        self.M = _pos_int("M", M, "hnsw", 2)
        self.ef_construction = _pos_int("ef_construction", ef_construction, "hnsw")
        self.ef = _pos_int("ef", ef, "hnsw")

    def _build(self, keys, train_queries):
        d = keys.shape[2]
        self._indexes = []
        for h in range(keys.shape[0]):
            ix = faiss.IndexHNSWFlat(d, self.M, faiss.METRIC_INNER_PRODUCT)
            ix.hnsw.efConstruction = self.ef_construction
            ix.add(keys[h])
            self._indexes.append(ix)

    def _search(self, queries, k, ef=None):
        ef = self.ef if ef is None else _pos_int("ef", ef, "hnsw")
        Hq, nq, _ = queries.shape
        kv = self._heads_map(Hq)
        ids = np.empty((Hq, nq, k), np.int64)
        sc = np.empty((Hq, nq, k), np.float32)
        ns = np.empty((Hq, nq), np.int64)
        params = faiss.SearchParametersHNSW(efSearch=max(ef, k))
        for h in range(Hq):
            with _FAISS_LOCK:
                faiss.cvar.hnsw_stats.reset()
                D, I = self._indexes[kv[h]].search(queries[h], k, params=params)
                ndis = int(faiss.cvar.hnsw_stats.ndis)
            sc[h], ids[h] = self._pad(D, I, k)
            ns[h] = int(round(ndis / max(1, nq)))
        return ids, sc, ns
