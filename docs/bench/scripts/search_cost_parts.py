"""Experiment (docs/BENCHMARKS.md, session 16, "Where a scanned key's time goes"): the cost of one loaded key row
in the shared-pass search (``kernels.search_two``), and what two extra dot products or two extra sorted-beam
insertions per row add. ``search_two_x`` is ``search_two`` with that optional extra work (results unchanged: the
extra dots feed a sum scaled by 1e-30 that is dropped, the extra insertions go to a scratch beam). Synthetic
out-of-distribution keys (``make_ood_data``), Llama-3-8B attention shape (8 KV heads, 32 query heads, d 128),
bfloat16 keys, ef 128, top-100, one thread; ``layers`` independent indexes searched in turn.
Usage: ``NUMBA_NUM_THREADS=1 python docs/bench/scripts/search_cost_parts.py [keys=65536] [layers=3] [reps=2]``
(session 16, dev VM: 4096 1 30 -> 63 ns per row in cache; 65536 3 2 -> 107 ns)."""
import sys
import time

import numpy as np
from numba import njit

from retrieval_attention.index import make_index
from retrieval_attention.index.reference import make_ood_data
from retrieval_attention.index.kernels import (_test_and_set, _prefetch_row, _dot, _beam_insert, pack_entry, entry_id,
    _EXPANDED, _insert_at_cursor, _beam_results)

@njit(nogil=True)
def search_two_x(adj, keys, n_graph, n_total, qa, qb, g, kv, entries, k, L, vis, ba, bb, ra_s, ra_i, rb_s, rb_i,
                 nbuf, sa, sb, extra_dot, extra_ins, bx):
    nwa = 0; nwb = 0; ns = 0; nwx = 0; cx = 0
    for e in range(entries.shape[1]):
        nid = entries[g, e]
        if nid < 0 or nid >= n_graph or _test_and_set(vis, nid):
            continue
        ns += 1
        pos, nwa = _beam_insert(ba, nwa, L, pack_entry(np.float32(_dot(qa, keys, kv, nid)), nid))
        pos, nwb = _beam_insert(bb, nwb, L, pack_entry(np.float32(_dot(qb, keys, kv, nid)), nid))
    ca = 0; cb = 0; turn = 0
    acc = 0.0
    while ca < nwa or cb < nwb:
        use_a = (turn == 0 and ca < nwa) or cb >= nwb
        turn ^= 1
        if use_a:
            node = entry_id(ba[ca]); ba[ca] |= _EXPANDED
        else:
            node = entry_id(bb[cb]); bb[cb] |= _EXPANDED
        nn = 0
        for m in range(adj.shape[2]):
            nb = adj[g, node, m]
            if nb < 0:
                break
            if not _test_and_set(vis, nb):
                nbuf[nn] = nb; nn += 1
                _prefetch_row(keys, kv, nb)
        for m in range(nn):
            sa[m] = _dot(qa, keys, kv, nbuf[m])
            sb[m] = _dot(qb, keys, kv, nbuf[m])
            if extra_dot:
                acc += _dot(qa, keys, kv, nbuf[m]) * 1e-30 + _dot(qb, keys, kv, nbuf[m]) * 1e-30
        ns += nn
        for m in range(nn):
            nwa, ca = _insert_at_cursor(ba, nwa, L, ca, pack_entry(np.float32(sa[m]), nbuf[m]), adj, g, nbuf[m])
            nwb, cb = _insert_at_cursor(bb, nwb, L, cb, pack_entry(np.float32(sb[m]), nbuf[m]), adj, g, nbuf[m])
            if extra_ins:
                nwx, cx = _insert_at_cursor(bx, nwx, L, cx, pack_entry(np.float32(sa[m] + acc), nbuf[m]), adj, g, nbuf[m])
                nwx, cx = _insert_at_cursor(bx, nwx, L, cx, pack_entry(np.float32(sb[m] * 0.999), nbuf[m] ), adj, g, nbuf[m])
        while ca < nwa and (ba[ca] & _EXPANDED) != 0:
            ca += 1
        while cb < nwb and (bb[cb] & _EXPANDED) != 0:
            cb += 1
    nra = _beam_results(ba, nwa, keys, kv, qa, n_graph, n_total, k, ra_s, ra_i)
    nrb = _beam_results(bb, nwb, keys, kv, qb, n_graph, n_total, k, rb_s, rb_i)
    return nra, nrb, ns + (n_total - n_graph) + int(acc * 0) + nwx * 0

@njit(nogil=True)
def run_x(adj, keys, n_graph, queries, graph_of_head, kv_of_head, partner, entries, k, L, out_ids, out_ns, extra_dot, extra_ins):
    Hq, nq, d = queries.shape
    M = adj.shape[2]
    vis = np.zeros((n_graph + 63) // 64 + 1, np.uint64)
    ba = np.empty(L + 1, np.uint64); bb = np.empty(L + 1, np.uint64); bx = np.empty(L + 1, np.uint64)
    ra_s = np.empty(k + 1); ra_i = np.empty(k + 1, np.int64); rb_s = np.empty(k + 1); rb_i = np.empty(k + 1, np.int64)
    nbuf = np.empty(2 * M, np.int64); sa = np.empty(2 * M); sb = np.empty(2 * M)
    qa = np.empty(d, np.float32); qb = np.empty(d, np.float32)
    for i in range(nq):
        for h in range(Hq):
            hb = partner[h]
            if hb < h:
                continue
            for w in range(vis.shape[0]):
                vis[w] = 0
            qa[:] = queries[h, i]; qb[:] = queries[hb, i]
            nra, nrb, ns = search_two_x(adj, keys, n_graph, n_graph, qa, qb, graph_of_head[h], kv_of_head[h], entries, k, L,
                                        vis, ba, bb, ra_s, ra_i, rb_s, rb_i, nbuf, sa, sb, extra_dot, extra_ins, bx)
            out_ns[h, i] = ns; out_ns[hb, i] = ns
n, layers, reps = (int(a) for a in (sys.argv[1:4] + ["65536", "3", "2"][len(sys.argv) - 1:]))
Hkv, group, d = 8, 4, 128
data = []
for l in range(layers):
    keys, tq, te = make_ood_data(n_kv_heads=Hkv, group=group, n_keys=n, n_train=1024, n_test=16, d=d, seed=l * 1000)
    idx = make_index("roar", storage="bfloat16").build(keys, tq)
    data.append((idx, te))
gmap, kvmap = data[0][0]._graph_maps(Hkv * group)
partner = (np.arange(Hkv * group) ^ 1).astype(np.int64)
for trial in range(2):
    for ed, ei in ((False, False), (True, False), (False, True)):
        tt = 0; tot = 0
        for r in range(reps):
            for idx, te in data:
                ns = np.zeros((Hkv*group, te.shape[1]), np.int64); out = None
                a = (idx._adj, idx._keys, idx.n_graph, np.ascontiguousarray(te, np.float32), gmap.astype(np.int64), kvmap.astype(np.int64), partner, idx._entries, 100, 128, out, ns, ed, ei)
                if trial == 0 and r == 0: run_x(*a)
                t = time.perf_counter(); run_x(*a); tt += time.perf_counter() - t
                tot += ns.sum() / 2
        print(f"n {n} extra_dot {ed} extra_ins {ei}: ns per loaded row {tt * 1e9 / tot:.1f}")
