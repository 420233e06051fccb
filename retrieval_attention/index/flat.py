"""``flat``: exact maximum-inner-product top-k by chunked matmul, the oracle for every other index."""

from __future__ import annotations

import numpy as np
import torch

from .base import KVIndex, register_index

#: keys per matmul chunk: bounds the temporary score matrix to queries x FLAT_CHUNK floats per head
FLAT_CHUNK = 65536


def exact_topk(keys: np.ndarray, queries: np.ndarray, k: int, group: int):
    """Exact top-k. keys [Hkv, n, d], queries [Hq, q, d] (Hq = Hkv * group) -> ids, scores [Hq, q, k]."""
    Hq, nq, d = queries.shape
    n = keys.shape[1]
    kk = min(k, n)
    K = torch.from_numpy(keys)
    Q = torch.from_numpy(queries).view(keys.shape[0], group * nq, d)
    best_s = best_i = None
    for start in range(0, n, FLAT_CHUNK):
        s = torch.bmm(Q, K[:, start : start + FLAT_CHUNK].transpose(1, 2))  # [Hkv, G*q, chunk]
        cs, ci = torch.topk(s, min(kk, s.shape[-1]), dim=-1)
        ci = ci + start
        if best_s is None:
            best_s, best_i = cs, ci
        else:
            best_s, sel = torch.topk(torch.cat([best_s, cs], -1), kk, dim=-1)
            best_i = torch.gather(torch.cat([best_i, ci], -1), -1, sel)
    ids = np.full((Hq, nq, k), -1, dtype=np.int64)
    scores = np.full((Hq, nq, k), -np.inf, dtype=np.float32)
    ids[:, :, :kk] = best_i.reshape(Hq, nq, kk).numpy()
    scores[:, :, :kk] = best_s.reshape(Hq, nq, kk).numpy()
    return ids, scores


@register_index("flat")
class FlatIndex(KVIndex):
    """Exact search: scans every key (``n_scanned == n_keys``)."""

    def _build(self, keys, train_queries):
        self._cap = keys.shape[1]
        self._keys = keys

    def _search(self, queries, k):
        group = queries.shape[0] // self.n_kv_heads
        ids, scores = exact_topk(self._keys[:, : self.n_keys], queries, k, group)
        n_scanned = np.full(queries.shape[:2], self.n_keys, dtype=np.int64)
        return ids, scores, n_scanned

    def _add(self, new_keys):
        n, m = self.n_keys, new_keys.shape[1]
        if n + m > self._cap:  # amortised growth: no O(N) copy per decode step
            self._cap = max(n + m, 2 * self._cap)
            grown = np.empty((self.n_kv_heads, self._cap, self.head_dim), dtype=np.float32)
            grown[:, :n] = self._keys[:, :n]
            self._keys = grown
        self._keys[:, n : n + m] = new_keys

    def memory_bytes(self) -> int:
        return int(self.n_kv_heads * self.n_keys * self.head_dim * 4)

    def state(self):
        return {"keys": np.ascontiguousarray(self._keys[:, : self.n_keys])}

    def load_state(self, arrays):
        self._keys = np.ascontiguousarray(arrays["keys"], dtype=np.float32)
        self._cap = self._keys.shape[1]
