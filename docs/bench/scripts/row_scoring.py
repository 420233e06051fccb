"""Cost per scored key of the search's row loads, by row format (docs/BENCHMARKS.md, session 11): random rows of
d = 128 scored against one query in batches of 16, each batch prefetched first as ``kernels._expand`` does.
bfloat16 bits (256-byte rows, the decode store's format) through ``kernels._dot``; float32 (512 bytes); int8 codes
(128 bytes, a per-channel quantised copy that does not exist in the package). One thread.
Usage: ``python docs/bench/scripts/row_scoring.py [rows]`` (default 4M rows: 1 GiB of bfloat16, far beyond the
caches; 4096 rows: cache-resident, the arithmetic alone)."""
import sys
import time

import numba
import numpy as np
from numba import njit

from retrieval_attention.index.kernels import _dot, _prefetch_row

numba.set_num_threads(1)
_FM = {"reassoc", "contract", "nsz", "arcp"}
BATCH = 16


@njit(nogil=True, fastmath=_FM)
def dot_i8(q, keys, h, j):
    s = np.float32(0.0)
    for t in range(q.shape[0]):
        s += q[t] * np.float32(keys[h, j, t])
    return np.float64(s)


def scorer(dotf):
    @njit(nogil=True)
    def run(keys, q, ids):
        tot = 0.0
        buf = np.empty(BATCH, np.int64)
        for b in range(0, ids.shape[0] - BATCH, BATCH):
            for m in range(BATCH):
                buf[m] = ids[b + m]
                _prefetch_row(keys, 0, ids[b + m])
            for m in range(BATCH):
                tot += dotf(q, keys, 0, buf[m])
        return tot
    return run


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 4 << 20
    rng = np.random.default_rng(0)
    kf = rng.standard_normal((1, n, 128)).astype(np.float32)
    kb = (kf.view(np.uint32) >> 16).astype(np.uint16)
    ki = np.clip(np.rint(kf * 127 / np.abs(kf).max(1, keepdims=True)), -127, 127).astype(np.int8)
    q = rng.standard_normal(128).astype(np.float32)
    ids = rng.integers(0, n, size=1_000_000).astype(np.int64)
    for name, k, f in (("bfloat16 (256 B)", kb, scorer(_dot)), ("float32 (512 B)", kf, scorer(_dot)),
                       ("int8 (128 B)", ki, scorer(dot_i8))):
        f(k, q, ids[:1000])
        ts = []
        for _ in range(5):
            t = time.perf_counter()
            f(k, q, ids)
            ts.append(time.perf_counter() - t)
        print(f"{n} rows, {name:17s}: {1e9 * min(ts) / len(ids):6.1f} ns per key (best of 5)")


if __name__ == "__main__":
    main()
