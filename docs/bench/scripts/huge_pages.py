"""One-thread search time over the synthetic 128K index with its keys and graph on 4 KiB pages vs 2 MiB pages,
cache-warm (the same 8 queries again) and cache-cold (a 256 MiB buffer written between calls). Usage:
``RA_BENCH_CACHE=<dir> python docs/bench/scripts/huge_pages.py`` (docs/BENCHMARKS.md, session 7)."""
import ctypes
import mmap
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from retrieval_attention.threads import configure_threads  # noqa: E402

configure_threads(1)
import numpy as np  # noqa: E402
from synthetic_index import synthetic_index  # noqa: E402

MADV_HUGEPAGE, MADV_NOHUGEPAGE = 14, 15
libc = ctypes.CDLL("libc.so.6", use_errno=True)


def advised_copy(a, huge):
    """A copy of ``a`` in fresh anonymous memory advised for (or against) huge pages before its first touch."""
    buf = mmap.mmap(-1, a.nbytes + (2 << 20), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    assert libc.madvise(ctypes.c_void_p(addr), ctypes.c_size_t(len(buf)), MADV_HUGEPAGE if huge else MADV_NOHUGEPAGE) == 0
    off = (-addr) % (2 << 20)
    out = np.frombuffer(buf, dtype=np.uint8, count=a.nbytes, offset=off).view(a.dtype).reshape(a.shape)
    out[...] = a
    return out, buf


idx, te = synthetic_index(131072)
keys0, adj0 = idx._keys, idx._adj
flush = np.ones(256 << 20, np.uint8)


def median_ms(cold, reps=12):
    ts = []
    for _ in range(reps):
        for s in range(8):
            q = np.ascontiguousarray(te[:, s:s + 1])
            if cold:
                np.add(flush, 1, out=flush)
            t = time.perf_counter()
            idx.search(q, 100)
            ts.append(time.perf_counter() - t)
    return np.median(ts) * 1e3


for huge in (True, False) * 4:
    k, kb = advised_copy(keys0, huge)
    a, ab = advised_copy(adj0, huge)
    idx._keys, idx._adj = k, a
    idx.search(np.ascontiguousarray(te[:, :1]), 100)
    print(f"{'2 MiB' if huge else '4 KiB'} pages: warm {median_ms(False):.2f} ms, cold {median_ms(True):.2f} ms "
          f"per call of 32 searches", flush=True)
    del k, a, kb, ab
