"""Measurement (docs/BENCHMARKS.md, session 16): the cost of one key row's dot product, in cache and from random rows
of a 1M x 128 array (uint16 bfloat16 bits and float32), in batches of 1 / 8 / 32 rows with and without software
prefetching; then the same with a huge-page-advised array. Session 16, dev VM: 6.1 ns per in-cache bf16 row, 47-61 ns
per random row, 48 ns with prefetching in batches of 8 (99 ns when each row is prefetched just before its read).
Usage: ``NUMBA_NUM_THREADS=1 python docs/bench/scripts/random_rows.py``."""
import time

import numpy as np
from numba import njit
from retrieval_attention.index import kernels as K

@njit(nogil=True)
def dots_cached(q, keys, reps):
    s = 0.0
    for r in range(reps):
        for j in range(16):
            s += K._dot(q, keys, 0, j)
    return s

@njit(nogil=True)
def dots_random(q, keys, ids, batch, pf):
    s = 0.0
    n = ids.shape[0]
    for b0 in range(0, n, batch):
        b1 = min(n, b0 + batch)
        if pf:
            for t in range(b0, b1):
                K._prefetch_row(keys, 0, ids[t])
        for t in range(b0, b1):
            s += K._dot(q, keys, 0, ids[t])
    return s

d = 128
rng = np.random.default_rng(0)
q = rng.standard_normal(d).astype(np.float32)
for dt in (np.uint16, np.float32):
    keys = (rng.integers(0, 2**15, (1, 1 << 20, d)).astype(np.uint16) if dt == np.uint16 else rng.standard_normal((1, 1 << 20, d)).astype(np.float32))
    dots_cached(q, keys, 10)
    t = time.perf_counter(); dots_cached(q, keys, 200000); el = time.perf_counter() - t
    print(dt.__name__, "in-cache dot ns", el / (200000 * 16) * 1e9)
    ids = rng.integers(0, 1 << 20, 2_000_000)
    for batch in (1, 8, 32):
        for pf in (False, True):
            dots_random(q, keys, ids[:1000], batch, pf)
            t = time.perf_counter(); dots_random(q, keys, ids, batch, pf); el = time.perf_counter() - t
            print(dt.__name__, f"random rows batch {batch} prefetch {pf}: ns/row", round(el / len(ids) * 1e9, 1))
from retrieval_attention.hostmem import huge_empty
for dt in (np.uint16,):
    keys = huge_empty((1, 1 << 20, d), dt)
    keys[:] = rng.integers(0, 2**15, (1, 1 << 20, d)).astype(np.uint16)
    for batch in (1, 8, 32):
        for pf in (False, True):
            dots_random(q, keys, ids[:1000], batch, pf)
            t = time.perf_counter(); dots_random(q, keys, ids, batch, pf); el = time.perf_counter() - t
            print("HUGE", dt.__name__, f"random rows batch {batch} prefetch {pf}: ns/row", round(el / len(ids) * 1e9, 1))
