"""Decode steps of one layer across a bulk insertion (docs/BENCHMARKS.md, session 5): each step appends one
key per KV head (bfloat16 bits) and runs the fused search + attention, starting with a tail just under
``insert_threshold``. Usage: ``python docs/bench/scripts/insert_stall.py INSERT_LAG [n_keys]`` (0 = synchronous)."""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from retrieval_attention.threads import configure_threads  # noqa: E402

configure_threads(int(os.environ.get("RA_NUM_THREADS", 2)))
import numpy as np  # noqa: E402

from retrieval_attention.index.bf16 import f32_to_bf16_bits  # noqa: E402
from synthetic_index import synthetic_index  # noqa: E402

lag = int(sys.argv[1])
n = int(sys.argv[2]) if len(sys.argv) > 2 else 131072
idx, te = synthetic_index(n)
idx.insert_lag = lag
rng = np.random.default_rng(0)
idx.add(rng.standard_normal((8, idx.insert_threshold - 6, 128)).astype(np.float32))
vals = rng.integers(0, 2**14, (8, n + 2 * idx.insert_threshold, 128)).astype(np.uint16)
q = te[:, :1].copy()
ts = []
t_all = time.perf_counter()
for step in range(lag + 20):
    t0 = time.perf_counter()
    idx.add_stored(f32_to_bf16_bits(rng.standard_normal((8, 1, 128)).astype(np.float32)))
    idx.search_attend(q, 100, vals, 128 ** -0.5)
    ts.append(time.perf_counter() - t0)
ts = np.array(ts) * 1e3
print(f"insert_lag {lag}: {len(ts)} steps, median {np.median(ts):.1f} ms, longest {ts.max():.0f} ms (step {ts.argmax()}), "
      f"total {time.perf_counter() - t_all:.1f} s, graph nodes {idx.n_graph}")
