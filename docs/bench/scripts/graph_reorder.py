"""Experiment (docs/BENCHMARKS.md, session 11): renumber each graph's keys in breadth-first order from its entry
points (a node's neighbours get nearby ids, so their key rows and adjacency rows sit close in memory), remap the
adjacency and entries, and time the same searches against the token order. Checks that the result sets (mapped
back to the original ids) are the same. Synthetic out-of-distribution keys, Llama-3-8B attention shape, ef 128,
top-100, ``layers`` independent indexes searched in turn, each layer call's 32 heads over ``threads`` threads.
Session 12 built this layout into the index, measured it on model keys and removed it again (docs/BENCHMARKS.md).
Usage: ``python docs/bench/scripts/graph_reorder.py [keys=131072] [layers=4] [threads=1]``."""
import sys, time, numpy as np
from retrieval_attention.threads import configure_threads
T = int(sys.argv[3]) if len(sys.argv) > 3 else 1
configure_threads(T)
from retrieval_attention.index import kernels as K
from retrieval_attention.index import decode_kernels as DK
from retrieval_attention.index import make_index
from retrieval_attention.index.reference import make_ood_data
from retrieval_attention.hostmem import huge_empty, huge_full

def bfs_order(adj, g, n, entries_g):
    """Graph ``g``'s nodes in breadth-first order from its entries (the index's own BFS), then any unreached."""
    reached = np.zeros(n, np.bool_); queue = np.empty(n, np.int32)
    t = K._bfs(adj, g, n, entries_g, len(entries_g), reached, queue)
    return np.concatenate([queue[:t].astype(np.int64), np.nonzero(~reached)[0]])

n = int(sys.argv[1]) if len(sys.argv) > 1 else 131072
nlayers = int(sys.argv[2]) if len(sys.argv) > 2 else 4
k, L = 100, 128
layers = []
for layer in range(nlayers):
    keys, tq, test = make_ood_data(n_kv_heads=8, group=4, n_keys=n, n_train=256, n_test=1, d=128, seed=layer)
    ix = make_index("roar", storage="bfloat16").build(keys, tq)
    q = np.ascontiguousarray(np.random.default_rng(layer).standard_normal((32, 1, 128)).astype(np.float32) + tq[:, -1:])
    G, cap, M = ix._adj.shape
    keys_p = huge_empty(ix._keys.shape, ix._keys.dtype); adj_p = huge_full(ix._adj.shape, -1, np.int32)
    ent_p = ix._entries.copy(); inv_all = []
    for g in range(G):  # kv_head graphs: graph g = KV head g
        order = bfs_order(ix._adj, g, n, ix._entries[g])
        inv = np.empty(n, np.int64); inv[order] = np.arange(n)
        keys_p[g, :n] = ix._keys[g, order]
        a = ix._adj[g, order]  # rows in new order, old ids
        adj_p[g, :n] = np.where(a >= 0, inv[np.maximum(a, 0)], -1)
        ent_p[g] = np.where(ix._entries[g] >= 0, inv[np.maximum(ix._entries[g], 0)], -1)
        inv_all.append(order)
    layers.append((ix, q, keys_p, adj_p, ent_p, inv_all))

def run(ix, q, keys_, adj_, ent_):
    goh, koh = ix._graph_maps(32)
    ids = np.empty((32, 1, k), np.int64); ns = np.empty((32, 1), np.int64)
    w = DK.SearchScratch(T, ix.n_graph, 4096)
    K.search_batch(adj_, keys_, ix.n_graph, ix.n_keys, q, goh, koh, ent_, k, L, w.visited, w.cand_s, w.cand_i,
                   ids, np.empty((32, 1, k), np.float32), ns)
    return ids, ns

for rep in range(3):
    for mode in ("token order", "BFS order"):
        ts = []
        for it in range(4):
            t0 = time.perf_counter(); out = []
            for ix, q, kp, ap, ep, inv in layers:
                if mode == "token order":
                    out.append(run(ix, q, ix._keys, ix._adj, ix._entries))
                else:
                    ids, ns = run(ix, q, kp, ap, ep)
                    out.append((np.stack([inv[h // 4][np.maximum(ids[h], 0)] for h in range(32)]), ns))
            ts.append(time.perf_counter() - t0)
        tot = sum(o[1].sum() for o in out)
        print(f"{mode:12s} {1e3 * min(ts) / nlayers:.2f} ms per layer ({1e9 * T * min(ts) / tot:.0f} ns per key and thread), keys/search {tot / (nlayers * 32):.0f}")
        if mode == "token order":
            ref = out
        else:
            same = all(np.array_equal(np.sort(a[0], -1), np.sort(b[0], -1)) for a, b in zip(ref, out))
            print("  same result sets:", same)
