"""Experiment (docs/BENCHMARKS.md, session 9): two query heads of a GQA group searched in one shared pass.

``kernels.search_two`` (``RoarIndex(share="pairs")``): two best-first searches of the same KV-head graph run interleaved on one thread
and share the visited set: a key row is loaded once and scored for both queries, and each head keeps its own sorted
beam (the kernel's packed entries) and takes the other's scored keys into its beam. Compared with the two searches
run one after the other (``kernels.search_pair``): recall@100 against exact top-100, keys loaded, and one-thread
time, on a cached SmolLM2 capture (heads 0 and 1 of every group, all decode steps).
Usage: ``python docs/bench/scripts/pair_search.py [--capture smollm2_ctx32768_dec32.npz] [--layers 2,8,14,20,26]
[--ef 128] [--reps 5]``."""
import argparse
import time

import numba
import numpy as np
from numba import njit

from retrieval_attention.bench.capture import captures_dir, load_capture
from retrieval_attention.bench.recall import subsample_rows
from retrieval_attention.index import kernels as K
from retrieval_attention.index import make_index
from retrieval_attention.index.roar import auto_train_queries

SINK, WINDOW, TOP = 128, 512, 100


@njit(nogil=True)
def run_pairs(adj, keys, n_graph, Q, pairs, entries, L, k, out_ids, out_loads):
    """Q [Hq, nq, d]; pairs [P, 3] (head a, head b, KV head); out_ids [P, 2, nq, k] (``kernels.search_two``)."""
    vis = np.zeros(max(1, (n_graph + 63) // 64), np.uint64)
    ba = np.empty(L + 1, np.uint64)
    bb = np.empty(L + 1, np.uint64)
    ra_s = np.empty(k + 1, np.float64)
    ra_i = np.empty(k + 1, np.int64)
    rb_s = np.empty(k + 1, np.float64)
    rb_i = np.empty(k + 1, np.int64)
    M = adj.shape[2]
    nbuf = np.empty(M, np.int64)
    sa = np.empty(M, np.float64)
    sb = np.empty(M, np.float64)
    for p in range(pairs.shape[0]):
        a, b, kv = pairs[p, 0], pairs[p, 1], pairs[p, 2]
        for i in range(Q.shape[1]):
            K.clear_visited(vis, n_graph)
            nra, nrb, loads = K.search_two(adj, keys, n_graph, n_graph, Q[a, i], Q[b, i], kv, kv, entries, k, L, vis,
                                           ba, bb, ra_s, ra_i, rb_s, rb_i, nbuf, sa, sb)
            out_loads[p, i] = loads
            for r in range(nra):
                out_ids[p, 0, i, r] = ra_i[r]
            for r in range(nrb):
                out_ids[p, 1, i, r] = rb_i[r]


@njit(nogil=True)
def run_solo(adj, keys, n_graph, Q, pairs, entries, L, k, out_ids, out_loads):
    """The two heads of each pair searched one after the other with ``kernels.search_pair``."""
    vis = np.zeros(max(1, (n_graph + 63) // 64), np.uint64)
    M = adj.shape[2]
    c_s = np.empty(4096, np.float64)
    c_i = np.empty(4096, np.int64)
    w_s = np.empty(L + 1, np.float64)
    w_i = np.empty(L + 1, np.int64)
    r_s = np.empty(k + 1, np.float64)
    r_i = np.empty(k + 1, np.int64)
    nbuf = np.empty(M, np.int64)
    sbuf = np.empty(M, np.float64)
    beam = np.empty(L + 1, np.uint64)
    for p in range(pairs.shape[0]):
        kv = pairs[p, 2]
        for i in range(Q.shape[1]):
            tot = 0
            for j in range(2):
                K.clear_visited(vis, n_graph)
                nr, ns, c_s, c_i = K.search_pair(adj, keys, n_graph, n_graph, Q[pairs[p, j], i], kv, kv, entries, k,
                                                 L, vis, c_s, c_i, w_s, w_i, r_s, r_i, nbuf, sbuf, beam)
                tot += ns
                for r in range(nr):
                    out_ids[p, j, i, r] = r_i[r]
            out_loads[p, i] = tot


def recall(ids, exact):
    return np.mean([len(set(a) & set(b)) / TOP for a, b in zip(ids.reshape(-1, TOP), exact.reshape(-1, TOP))])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--capture", default="smollm2_ctx32768_dec32.npz")
    p.add_argument("--layers", default="2,8,14,20,26")
    p.add_argument("--ef", type=int, default=128)
    p.add_argument("--reps", type=int, default=5)
    a = p.parse_args()
    numba.set_num_threads(1)
    cap = load_capture(str(captures_dir() / a.capture))
    tot = {"solo": [0.0, 0, []], "pair": [0.0, 0, []]}
    for layer in (int(x) for x in a.layers.split(",")):
        lv = cap.layer(layer)
        keys = np.ascontiguousarray(lv.keys[:, SINK:-WINDOW])
        Hkv, n, _ = keys.shape
        ix = make_index("roar").build(keys, subsample_rows(lv.prefill_queries, auto_train_queries(n)))
        Q = np.ascontiguousarray(lv.decode_queries, np.float32)
        g = Q.shape[0] // Hkv
        pairs = np.array([[h * g, h * g + 1, h] for h in range(Hkv)], np.int64)
        exact = np.stack([np.stack([np.argsort(-(ix._f32(ix._keys[h, :n]) @ Q[h * g + j].T), axis=0)[:TOP].T
                                    for j in range(2)]) for h in range(Hkv)])  # [P, 2, nq, TOP]
        for name, fn in (("solo", run_solo), ("pair", run_pairs)):
            ids = np.full((len(pairs), 2, Q.shape[1], TOP), -1, np.int64)
            loads = np.zeros((len(pairs), Q.shape[1]), np.int64)
            fn(ix._adj, ix._keys, n, Q, pairs, ix._entries, a.ef, TOP, ids, loads)  # compile / warm
            ts = []
            for _ in range(a.reps):
                t = time.perf_counter()
                fn(ix._adj, ix._keys, n, Q, pairs, ix._entries, a.ef, TOP, ids, loads)
                ts.append(time.perf_counter() - t)
            r = recall(ids, exact)
            tot[name][0] += float(np.median(ts))
            tot[name][1] += int(loads.sum())
            tot[name][2].append(r)
            print(f"layer {layer:2d} {name}: {1e3 * np.median(ts):7.2f} ms for {ids.shape[0] * ids.shape[2]} pairs of "
                  f"searches, key rows loaded {loads.sum() / loads.size:7.0f} per pair, recall@100 {r:.3f}",
                  flush=True)
    for name, (t, ld, r) in tot.items():
        print(f"{name}: {1e3 * t:.2f} ms in all, {ld} key rows loaded, recall@100 {np.mean(r):.3f}")


if __name__ == "__main__":
    main()
