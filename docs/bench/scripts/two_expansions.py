"""Experiment (docs/BENCHMARKS.md, session 16): a shared-pass search that expands both heads' best unexpanded nodes in
one round (the union of their unvisited neighbours gathered and prefetched together, then scored for both queries:
twice the rows in flight per memory round trip), against ``kernels.search_two`` (one head's node per round, in
turn). Synthetic out-of-distribution keys, Llama-3-8B attention shape, bfloat16 keys, top-100, one thread,
``layers`` independent indexes searched in turn; prints time per layer step, recall@100, keys scanned and ns per
loaded key for ef 96 / 128 / 160, each twice. Session 16, dev VM, 65536 keys x 3 layers: 104.7-114.3 ns per key
for ``search_two``, 104.7-115.8 for two expansions per round (no gain, as session 11's interleaved searches).
Usage: ``NUMBA_NUM_THREADS=1 python docs/bench/scripts/two_expansions.py [keys=65536] [layers=3]``."""
import sys
import time

import numpy as np
from numba import njit

from retrieval_attention.index import make_index
from retrieval_attention.index.reference import make_ood_data
from retrieval_attention.index.kernels import (_test_and_set, _prefetch_row, _dot, _beam_insert, pack_entry, entry_id,
    _EXPANDED, _insert_at_cursor, _beam_results, search_two, clear_visited)

@njit(nogil=True)
def search_two_rounds(adj, keys, n_graph, n_total, qa, qb, g, kv, entries, k, L, vis, ba, bb, ra_s, ra_i, rb_s, rb_i,
                      nbuf, sa, sb):
    """Each round expands the best unexpanded entry of both beams at once (one node if the same): the union of
    their unvisited neighbours is gathered and prefetched, then scored for both queries, then inserted."""
    nwa = 0; nwb = 0; ns = 0
    for e in range(entries.shape[1]):
        nid = entries[g, e]
        if nid < 0 or nid >= n_graph or _test_and_set(vis, nid):
            continue
        ns += 1
        pos, nwa = _beam_insert(ba, nwa, L, pack_entry(np.float32(_dot(qa, keys, kv, nid)), nid))
        pos, nwb = _beam_insert(bb, nwb, L, pack_entry(np.float32(_dot(qb, keys, kv, nid)), nid))
    ca = 0; cb = 0
    M = adj.shape[2]
    while ca < nwa or cb < nwb:
        nn = 0
        na = -1
        if ca < nwa:
            na = entry_id(ba[ca]); ba[ca] |= _EXPANDED
            for m in range(M):
                nb = adj[g, na, m]
                if nb < 0:
                    break
                if not _test_and_set(vis, nb):
                    nbuf[nn] = nb; nn += 1
                    _prefetch_row(keys, kv, nb)
        if cb < nwb:
            nbn = entry_id(bb[cb]); bb[cb] |= _EXPANDED
            if nbn != na:
                for m in range(M):
                    nb = adj[g, nbn, m]
                    if nb < 0:
                        break
                    if not _test_and_set(vis, nb):
                        nbuf[nn] = nb; nn += 1
                        _prefetch_row(keys, kv, nb)
        for m in range(nn):
            sa[m] = _dot(qa, keys, kv, nbuf[m])
            sb[m] = _dot(qb, keys, kv, nbuf[m])
        ns += nn
        for m in range(nn):
            nwa, ca = _insert_at_cursor(ba, nwa, L, ca, pack_entry(np.float32(sa[m]), nbuf[m]), adj, g, nbuf[m])
            nwb, cb = _insert_at_cursor(bb, nwb, L, cb, pack_entry(np.float32(sb[m]), nbuf[m]), adj, g, nbuf[m])
        while ca < nwa and (ba[ca] & _EXPANDED) != 0:
            ca += 1
        while cb < nwb and (bb[cb] & _EXPANDED) != 0:
            cb += 1
    nra = _beam_results(ba, nwa, keys, kv, qa, n_graph, n_total, k, ra_s, ra_i)
    nrb = _beam_results(bb, nwb, keys, kv, qb, n_graph, n_total, k, rb_s, rb_i)
    return nra, nrb, ns + (n_total - n_graph)

@njit(nogil=True)
def run_all(fn_id, adj, keys, n_graph, queries, graph_of_head, kv_of_head, partner, entries, k, L, out_ids, out_ns):
    Hq, nq, d = queries.shape
    M = adj.shape[2]
    vis = np.zeros((n_graph + 63) // 64 + 1, np.uint64)
    ba = np.empty(L + 1, np.uint64); bb = np.empty(L + 1, np.uint64)
    ra_s = np.empty(k + 1); ra_i = np.empty(k + 1, np.int64); rb_s = np.empty(k + 1); rb_i = np.empty(k + 1, np.int64)
    nbuf = np.empty(2 * M, np.int64); sa = np.empty(2 * M); sb = np.empty(2 * M)
    qa = np.empty(d, np.float32); qb = np.empty(d, np.float32)
    for i in range(nq):
        for h in range(Hq):
            hb = partner[h]
            if hb < h:
                continue
            clear_visited(vis, n_graph)
            qa[:] = queries[h, i]; qb[:] = queries[hb, i]
            if fn_id == 0:
                nra, nrb, ns = search_two(adj, keys, n_graph, n_graph, qa, qb, graph_of_head[h], kv_of_head[h], entries, k, L,
                                          vis, ba, bb, ra_s, ra_i, rb_s, rb_i, nbuf, sa, sb)
            else:
                nra, nrb, ns = search_two_rounds(adj, keys, n_graph, n_graph, qa, qb, graph_of_head[h], kv_of_head[h], entries, k, L,
                                          vis, ba, bb, ra_s, ra_i, rb_s, rb_i, nbuf, sa, sb)
            for r in range(nra):
                out_ids[h, i, r] = ra_i[r]
            for r in range(nrb):
                out_ids[hb, i, r] = rb_i[r]
            out_ns[h, i] = ns; out_ns[hb, i] = ns
n, layers = (int(a) for a in (sys.argv[1:3] + ["65536", "3"][len(sys.argv) - 1:]))
Hkv, group, d = 8, 4, 128
data = []
for l in range(layers):
    keys, tq, te = make_ood_data(n_kv_heads=Hkv, group=group, n_keys=n, n_train=1024, n_test=16, d=d, seed=l * 1000)
    idx = make_index("roar", storage="bfloat16").build(keys, tq)
    true_ids, _, _ = make_index("flat").build(keys).search(te, 100)
    data.append((idx, te, true_ids))
idx = data[0][0]
gmap, kvmap = idx._graph_maps(Hkv * group)
partner = np.arange(Hkv * group) ^ 1
print("partner check", kvmap[:8], gmap[:8])
for ef in (96, 128, 160):
    for fn in (0, 1, 0, 1):
        tt = 0; rec = []; scn = []
        for idx, te, true_ids in data:
            out = np.full((Hkv*group, te.shape[1], 100), -1, np.int64); ns = np.zeros((Hkv*group, te.shape[1]), np.int64)
            args = (fn, idx._adj, idx._keys, idx.n_graph, np.ascontiguousarray(te, np.float32), gmap.astype(np.int64), kvmap.astype(np.int64), partner.astype(np.int64), idx._entries, 100, ef, out, ns)
            run_all(*args)
            t = time.perf_counter(); run_all(*args); tt += time.perf_counter() - t
            rec.append(np.mean([len(set(out[h, i]) & set(true_ids[h, i])) / 100 for h in range(Hkv*group) for i in range(te.shape[1])]))
            scn.append(ns.mean() / n)
        calls = layers * te.shape[1]
        print(f"ef {ef} {'rounds' if fn else 'search_two'}: {tt / calls * 1e3:.3f} ms per layer-step (1 thread), recall {np.mean(rec):.4f}, scanned {100*np.mean(scn):.2f}%, ns/key {tt*1e9/(np.mean(scn)*n*calls*16):.1f}")
