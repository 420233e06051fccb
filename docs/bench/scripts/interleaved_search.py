"""Experiment (docs/BENCHMARKS.md, session 11): two beam searches interleaved on one thread. Each step scores one
search's prefetched neighbour rows, picks its next node and gathers + prefetches that node's neighbours, then the
other search takes a step, so one search's row loads are in flight while the other computes. Each search expands
the same nodes in the same order as ``kernels._search_sorted``: results and keys scanned are identical (checked).
Synthetic out-of-distribution keys (``make_ood_data``), Llama-3-8B attention shape (8 KV heads, 32 query heads, d
128), ef 128, top-100, one thread, ``layers`` independent indexes searched in turn (cold rows).
Usage: ``NUMBA_NUM_THREADS=1 python docs/bench/scripts/interleaved_search.py [keys=131072] [layers=4]
[storage=bfloat16|float32]``."""
import sys, time, numpy as np
from numba import njit
from retrieval_attention.threads import configure_threads
configure_threads(1)
from retrieval_attention.index import kernels as K
from retrieval_attention.index import make_index
from retrieval_attention.index.reference import make_ood_data
from retrieval_attention.index.kernels import (_EXPANDED, _beam_results, _dot, clear_visited, entry_id,
                                               gather_neighbours, insert_expansion, seed_beam)


@njit(nogil=True)
def _gather_next(adj, keys, g, kv, beam, nw, cur, vis, nbuf):
    """Mark the beam entry at ``cur`` expanded and gather + prefetch its neighbours; -1 when the search is done."""
    if cur >= nw:
        return -1
    beam[cur] |= _EXPANDED
    return gather_neighbours(adj, keys, g, kv, entry_id(beam[cur]), vis, nbuf)


@njit(nogil=True)
def _step(adj, keys, g, kv, qv, L, beam, nw, cur, vis, nbuf, sbuf, nn):
    """One step of a search: score its pending neighbours (rows prefetched during the other search's step),
    insert them (:func:`kernels.insert_expansion`), then gather the next node's neighbours. Returns (pending
    count or -1 when done, beam size, cursor)."""
    for m in range(nn):
        sbuf[m] = _dot(qv, keys, kv, nbuf[m])
    nw, cur = insert_expansion(adj, g, beam, nw, L, cur, nbuf, sbuf, nn)
    return _gather_next(adj, keys, g, kv, beam, nw, cur, vis, nbuf), nw, cur


@njit(nogil=True)
def search_two_interleaved(adj, keys, n_graph, n_total, qa, ga, kva, qb, gb, kvb, entries, k, L,
                           visa, visb, ba, bb, nba, nbb, sba, sbb, ra_s, ra_i, rb_s, rb_i):
    nwa, nsa = seed_beam(keys, n_graph, qa, ga, kva, entries, L, visa, ba)
    nwb, nsb = seed_beam(keys, n_graph, qb, gb, kvb, entries, L, visb, bb)
    ca = 0
    cb = 0
    nna = _gather_next(adj, keys, ga, kva, ba, nwa, ca, visa, nba)
    nnb = _gather_next(adj, keys, gb, kvb, bb, nwb, cb, visb, nbb)
    while nna >= 0 or nnb >= 0:
        if nna >= 0:
            nsa += nna
            nna, nwa, ca = _step(adj, keys, ga, kva, qa, L, ba, nwa, ca, visa, nba, sba, nna)
        if nnb >= 0:
            nsb += nnb
            nnb, nwb, cb = _step(adj, keys, gb, kvb, qb, L, bb, nwb, cb, visb, nbb, sbb, nnb)
    nra = _beam_results(ba, nwa, keys, kva, qa, n_graph, n_total, k, ra_s, ra_i)
    nrb = _beam_results(bb, nwb, keys, kvb, qb, n_graph, n_total, k, rb_s, rb_i)
    return nra, nrb, nsa + (n_total - n_graph), nsb + (n_total - n_graph)


@njit(nogil=True)
def run_interleaved(adj, keys, n_graph, n_total, queries, goh, koh, entries, k, L, out_ids, out_ns):
    Hq, nq, d = queries.shape
    M = adj.shape[2]
    nwords = (n_graph + 63) >> 6
    visa = np.zeros(nwords, np.uint64); visb = np.zeros(nwords, np.uint64)
    ba = np.empty(L + 1, np.uint64); bb = np.empty(L + 1, np.uint64)
    nba = np.empty(M, np.int64); nbb = np.empty(M, np.int64)
    sba = np.empty(M, np.float64); sbb = np.empty(M, np.float64)
    ra_s = np.empty(k + 1, np.float64); ra_i = np.empty(k + 1, np.int64)
    rb_s = np.empty(k + 1, np.float64); rb_i = np.empty(k + 1, np.int64)
    P = Hq * nq
    for p in range(0, P, 2):
        ha = p // nq; ia = p - ha * nq
        pb = min(p + 1, P - 1)
        hb = pb // nq; ib = pb - hb * nq
        clear_visited(visa, n_graph); clear_visited(visb, n_graph)
        nra, nrb, nsa, nsb = search_two_interleaved(adj, keys, n_graph, n_total, queries[ha, ia], goh[ha], koh[ha],
                                                    queries[hb, ib], goh[hb], koh[hb], entries, k, L, visa, visb,
                                                    ba, bb, nba, nbb, sba, sbb, ra_s, ra_i, rb_s, rb_i)
        K.emit_results(ra_s, ra_i, nra, k, out_ids, np.empty((Hq, nq, k), np.float32), ha, ia)
        out_ns[ha, ia] = nsa
        if pb != p:
            K.emit_results(rb_s, rb_i, nrb, k, out_ids, np.empty((Hq, nq, k), np.float32), hb, ib)
            out_ns[hb, ib] = nsb

n = int(sys.argv[1]) if len(sys.argv) > 1 else 131072
STORAGE = sys.argv[3] if len(sys.argv) > 3 else "bfloat16"
nlayers = int(sys.argv[2]) if len(sys.argv) > 2 else 4
idxs = []
for layer in range(nlayers):
    keys, tq, test = make_ood_data(n_kv_heads=8, group=4, n_keys=n, n_train=256, n_test=1, d=128, seed=layer)
    ix = make_index("roar", storage=STORAGE).build(keys, tq)
    q = np.ascontiguousarray(np.random.default_rng(layer).standard_normal((32, 1, 128)).astype(np.float32) + tq[:, -1:] )
    idxs.append((ix, q))
k, L = 100, 128
from retrieval_attention.index import decode_kernels as DK
for rep in range(3):
    for mode in ("sequential", "interleaved"):
        ts = []
        res = []
        for it in range(4):
            t0 = time.perf_counter()
            for ix, q in idxs:
                goh, koh = ix._graph_maps(32)
                ids = np.empty((32, 1, k), np.int64); ns = np.empty((32, 1), np.int64)
                if mode == "sequential":
                    w = DK.SearchScratch(1, ix.n_graph, 4096)
                    K.search_batch(ix._adj, ix._keys, ix.n_graph, ix.n_keys, q, goh, koh, ix._entries, k, L,
                                   w.visited, w.cand_s, w.cand_i, ids, np.empty((32, 1, k), np.float32), ns)
                else:
                    run_interleaved(ix._adj, ix._keys, ix.n_graph, ix.n_keys, q, goh, koh, ix._entries, k, L, ids, ns)
                res.append((ids.copy(), ns.copy()))
            ts.append(time.perf_counter() - t0)
        tot_ns = sum(r[1].sum() for r in res[:nlayers])
        print(f"{mode:12s} {1e3 * min(ts) / nlayers:.2f} ms per layer ({1e9 * min(ts) / tot_ns:.0f} ns/key), keys/search {tot_ns / (nlayers * 32):.0f}")
        if mode == "sequential":
            ref = res[:nlayers]
        else:
            same = all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(ref, res[:nlayers]))
            print("  identical to sequential:", same)
