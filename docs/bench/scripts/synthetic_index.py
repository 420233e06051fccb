"""Shared by the scripts here: a roar index over synthetic out-of-distribution keys of the Llama-3-8B KV shape
(8 KV heads x 4 query heads, d 128, bfloat16 storage; 1,024 training queries per query head), cached on disk."""
import os

import numpy as np

from retrieval_attention.index import make_index
from retrieval_attention.index.base import KVIndex
from retrieval_attention.index.reference import make_ood_data


def synthetic_index(n: int, n_test: int = 42, cache_dir: str | None = None):
    """(index, test queries [32, n_test, 128] float32) for ``n`` keys per KV head; cached in ``cache_dir``
    (default ``$RA_BENCH_CACHE`` or /tmp; use a separate one per code version, index files record parameters)."""
    cache_dir = cache_dir or os.environ.get("RA_BENCH_CACHE", "/tmp")
    keys, tq, te = make_ood_data(n_kv_heads=8, group=4, n_keys=n, n_train=1024, n_test=n_test, d=128, seed=0)
    path = os.path.join(cache_dir, f"roar_synthetic_{n}.npz")
    if not os.path.exists(path):
        make_index("roar", storage="bfloat16").build(keys, tq).save(path)
    return KVIndex.load(path), np.ascontiguousarray(te)
