"""Where the fused roar call's host time outside the compiled kernel goes (session 22's open lead): a roar layer of
8 KV heads x 4 query heads over N keys (``make_ood_data``, bfloat16 storage, the residual estimate on), one query
per head as in decode. Prints the median over 2,000 calls of the whole ``RoarIndex.search_attend`` and of the
numba call inside it (both by ``time.perf_counter``), the call's own ``python_s``, the wrapper's parts timed
alone in a loop (``timeit``), and a few calls timed right after a fused call ("in place": the first call after the
kernel pays for what the kernel evicted; a second one does not). On the 2-core dev VM: ~100 us outside the kernel
per call, ~11 us for the parts alone; in place, one numba dispatch 8.6 us and a second right after it 1.3 us more,
``np.argsort`` of 32 numbers 14.6 us.
Usage: ``python docs/bench/scripts/search_call_overhead.py [N_KEYS=4096] [THREADS=all cores]``."""
import statistics
import sys
import time
import timeit

from retrieval_attention.threads import configure_threads

configure_threads(int(sys.argv[2]) if len(sys.argv) > 2 else None)
import numba  # noqa: E402
import numpy as np  # noqa: E402

from retrieval_attention.index import decode_kernels as DK  # noqa: E402
from retrieval_attention.index import make_index  # noqa: E402
from retrieval_attention.index.base import Residual  # noqa: E402
from retrieval_attention.index.reference import make_ood_data  # noqa: E402

n = int(sys.argv[1]) if len(sys.argv) > 1 else 4096
keys, tq, test = make_ood_data(n_kv_heads=8, group=4, n_keys=n, n_train=256, n_test=8, d=128, seed=0)
idx = make_index("roar", storage="bfloat16").build(keys, tq)
vals = np.random.default_rng(0).standard_normal((8, 2 * n, 128)).astype(np.float32)
q = np.ascontiguousarray(test[:, :1], np.float32)
res = Residual(idx.stored_keys(), n, 256, 0)
for _ in range(50):
    idx.search_attend(q, 100, vals, 0.088, residual=res)

orig, inner = DK.search_attend_batch, []


def timed_kernel(*args):
    t = time.perf_counter()
    out = orig(*args)
    inner.append(time.perf_counter() - t)
    return out


DK.search_attend_batch = timed_kernel
walls, py = [], []
for _ in range(2000):
    t = time.perf_counter()
    idx.search_attend(q, 100, vals, 0.088, residual=res)
    walls.append(time.perf_counter() - t)
    py.append(idx.last_call_timing.get("python_s", float("nan")))
DK.search_attend_batch = orig
med = statistics.median
print(f"{n} keys, {numba.get_num_threads()} threads: whole call {1e6 * med(walls):.1f} us, numba call "
      f"{1e6 * med(inner):.1f} us, outside it {1e6 * med([w - i for w, i in zip(walls, inner)]):.1f} us "
      f"(python_s {1e6 * med(py):.1f} us)")

goh, _ = idx._graph_maps(32)
partner = idx._partners(goh, 100, idx.ef)[0]
tasks, mates, filled = idx._plan(partner, 1)
last, worker, cycles = idx._last_scanned, np.zeros(32, np.int64), np.zeros((2, 3), np.int64)
parts = {"numba.get_num_threads()": "numba.get_num_threads()", "input checks": "idx._check_search(q, 100, {})",
         "values check": "idx._check_values(vals)", "partners": "idx._partners(goh, 100, idx.ef)",
         "task order": "DK.order_tasks(tasks, mates, last)",
         "worker loads": "DK.worker_load_extremes(last, filled, worker, 2)",
         "timing readout": "DK.call_timing(0, 100, cycles)",
         "scratch pool": "DK.return_scratch(DK.borrow_scratch(2, 2 * n))",
         "output arrays": "[np.empty((32, 1, 128), np.float32), np.empty((32, 1), np.float32), "
                          "np.empty((32, 1, 100), np.int64), np.empty((32, 1, 100), np.float32), "
                          "np.empty((32, 1), np.int64), np.empty(32, np.int64)]"}
total = 0.0
for name, stmt in parts.items():
    us = 1e6 * min(timeit.repeat(stmt, globals=globals(), number=20000, repeat=3)) / 20000
    total += us
    print(f"  {name}: {us:.2f} us")
print(f"  parts alone: {total:.1f} us")


def in_place(fn):
    """Median microseconds of ``fn()`` run right after a fused call."""
    ts = []
    for _ in range(500):
        idx.search_attend(q, 100, vals, 0.088, residual=res)
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return 1e6 * med(ts)


print("in place, right after a fused call:")
for name, fn in {"nothing": lambda: None, "task order (one numba dispatch)": lambda: DK.order_tasks(tasks, mates, last),
                 "task order twice": lambda: (DK.order_tasks(tasks, mates, last), DK.order_tasks(tasks, mates, last)),
                 "np.argsort of the last counts": lambda: np.argsort(last),
                 "numba.get_num_threads()": numba.get_num_threads}.items():
    print(f"  {name}: {in_place(fn):.2f} us")
