"""Experiment (docs/BENCHMARKS.md, sessions 11-12): the same roar graphs in the two key layouts, ``layout="token"``
(rows in the order the keys were given, the default) and ``layout="bfs"`` (rows renumbered breadth-first from the
entry points, built in session 12), timed on the same searches. Checks that the result sets (mapped to positions) are
the same. Synthetic out-of-distribution keys, Llama-3-8B attention shape, bfloat16 keys, ef 128, top-100,
``layers`` independent indexes searched in turn, each layer call's 32 heads over ``threads`` threads.
Usage: ``python docs/bench/scripts/graph_reorder.py [keys=131072] [layers=4] [threads=1]``."""
import sys
import time

import numpy as np

from retrieval_attention.threads import configure_threads

T = int(sys.argv[3]) if len(sys.argv) > 3 else 1
configure_threads(T)
from retrieval_attention.index import decode_kernels as DK  # noqa: E402
from retrieval_attention.index import kernels as K  # noqa: E402
from retrieval_attention.index import make_index  # noqa: E402
from retrieval_attention.index.reference import make_ood_data  # noqa: E402

n = int(sys.argv[1]) if len(sys.argv) > 1 else 131072
nlayers = int(sys.argv[2]) if len(sys.argv) > 2 else 4
k, L = 100, 128
LAYOUTS = ("token", "bfs")
layers = []
for layer in range(nlayers):
    keys, tq, test = make_ood_data(n_kv_heads=8, group=4, n_keys=n, n_train=256, n_test=1, d=128, seed=layer)
    q = np.ascontiguousarray(np.random.default_rng(layer).standard_normal((32, 1, 128)).astype(np.float32) + tq[:, -1:])
    t0 = time.perf_counter()
    ix = {lay: make_index("roar", storage="bfloat16", layout=lay).build(keys, tq) for lay in LAYOUTS}
    print(f"layer {layer}: built both layouts in {time.perf_counter() - t0:.1f} s "
          f"(layout step {ix['bfs'].build_stats['layout_s']:.2f} s)", flush=True)
    layers.append((ix, q))
    del keys, tq


def run(ix, q):
    goh, koh = ix._graph_maps(32)
    ids = np.empty((32, 1, k), np.int64)
    ns = np.empty((32, 1), np.int64)
    w = DK.SearchScratch(T, ix.n_graph, 4096)
    K.search_batch(ix._adj, ix._keys, ix.n_graph, ix.n_keys, q, goh, koh, ix._entries, k, L, w.visited, w.cand_s,
                   w.cand_i, ids, np.empty((32, 1, k), np.float32), ns)
    return ix.positions(ids), ns


for rep in range(3):
    out = {}
    for lay in LAYOUTS:
        ts = []
        for it in range(4):
            t0 = time.perf_counter()
            res = [run(ix[lay], q) for ix, q in layers]
            ts.append(time.perf_counter() - t0)
        tot = sum(r[1].sum() for r in res)
        out[lay] = res
        print(f"{lay:5s} layout: {1e3 * min(ts) / nlayers:.2f} ms per layer "
              f"({1e9 * T * min(ts) / tot:.0f} ns per key and thread), keys/search {tot / (nlayers * 32):.0f}",
              flush=True)
    same = all(np.array_equal(np.sort(a[0], -1), np.sort(b[0], -1)) for a, b in zip(out["token"], out["bfs"]))
    print("  same result sets:", same, flush=True)
