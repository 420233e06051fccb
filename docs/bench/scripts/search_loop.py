"""One-thread search time on synthetic 128K keys (docs/BENCHMARKS.md, session 5: visited bitset, adjacency
prefetch). Usage: ``python docs/bench/scripts/search_loop.py [n_keys]``; prints the median over 3 rounds of
256 searches (32 query heads x 8 queries)."""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from retrieval_attention.threads import configure_threads  # noqa: E402

configure_threads(1)
from synthetic_index import synthetic_index  # noqa: E402

idx, te = synthetic_index(int(sys.argv[1]) if len(sys.argv) > 1 else 131072)
q = te[:, :8].copy()
idx.search(q, 100)
rounds = []
for _ in range(3):
    t0, k = time.perf_counter(), 0
    while time.perf_counter() - t0 < 3:
        idx.search(q, 100)
        k += 1
    rounds.append((time.perf_counter() - t0) / k * 1e3)
print(f"{sorted(rounds)[1]:.1f} ms per 256 searches (median of 3 rounds)")
