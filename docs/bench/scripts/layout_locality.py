"""Experiment (docs/BENCHMARKS.md, session 12): how close in memory are the two ends of a graph edge, in token order
and in breadth-first order from the entry points (the layout session 12 built as ``roar:layout=bfs``, measured and
removed; the order comes from the index's own BFS, ``kernels._bfs``, as in ``graph_reorder.py``)? For every edge
u -> v of every graph, the row gap |row(u) - row(v)|: the fraction of edges within 16 and 256 rows (4 KiB and 64 KiB of 256-byte key rows) and the median gap. Real SmolLM2 keys from a
cached ``bench recall`` capture (default: 32K, layers 2, 14, 26) against ``bench kernels``' i.i.d. synthetic keys.
Usage: ``python docs/bench/scripts/layout_locality.py [capture.npz]``."""
import sys

import numpy as np

from retrieval_attention.threads import configure_threads

configure_threads(None)
from retrieval_attention.bench.capture import captures_dir, load_capture  # noqa: E402
from retrieval_attention.bench.recall import subsample_rows  # noqa: E402
from retrieval_attention.index import kernels as K  # noqa: E402
from retrieval_attention.index import make_index  # noqa: E402
from retrieval_attention.index.reference import make_ood_data  # noqa: E402


def bfs_rows(ix, g, n):
    """Row of each node when graph ``g``'s nodes are stored in breadth-first order from its entries (then the rest)."""
    reached = np.zeros(n, np.bool_)
    queue = np.empty(n, np.int32)
    t = K._bfs(ix._adj, g, n, ix._entries[g], ix._entries.shape[1], reached, queue)
    order = np.concatenate([queue[:t].astype(np.int64), np.nonzero(~reached)[0]])
    rows = np.empty(n, np.int64)
    rows[order] = np.arange(n)
    return rows


def gaps(ix, rows_of_node):
    """Row gaps of all edges: rows_of_node [Hkv, n] maps a node id of ``ix``'s graphs to a row."""
    out = []
    for g in range(ix._adj.shape[0]):
        kv = ix._kv_of_graph[g]
        a = ix._adj[g, : ix.n_graph]
        u = np.repeat(np.arange(a.shape[0]), a.shape[1])
        v = a.reshape(-1)
        ok = v >= 0
        out.append(np.abs(rows_of_node[kv][u[ok]] - rows_of_node[kv][v[ok]]))
    return np.concatenate(out)


def report(label, keys, tq):
    ix = make_index("roar").build(keys, tq)  # one graph per KV head; node id = token position = row
    n = keys.shape[1]
    token_rows = np.tile(np.arange(n), (keys.shape[0], 1))
    bfs = np.stack([bfs_rows(ix, g, n) for g in range(ix._adj.shape[0])])
    for name, rows in (("token", token_rows), ("bfs", bfs)):
        g = gaps(ix, rows)
        print(f"{label:28s} {name:5s}: edges within 16 rows {100 * (g < 16).mean():5.1f}%, within 256 rows "
              f"{100 * (g < 256).mean():5.1f}%, median gap {np.median(g):8.0f} (of {n} rows)", flush=True)


path = sys.argv[1] if len(sys.argv) > 1 else str(captures_dir() / "smollm2_ctx32768_dec32.npz")
cap = load_capture(path)
for L in (2, 14, 26):
    lv = cap.layer(L)
    keys = np.ascontiguousarray(lv.keys[:, 128: lv.keys.shape[1] - 512], np.float32)
    report(f"SmolLM2 layer {L}", keys, subsample_rows(lv.prefill_queries, 8192))
keys, tq, _ = make_ood_data(n_kv_heads=3, group=3, n_keys=keys.shape[1], n_train=2048, n_test=1, d=64, seed=0)
report("i.i.d. synthetic", keys, tq)
