"""Experiment (docs/BENCHMARKS.md, session 5): the previous decode step's top-W results (same head) as extra entry
points of the beam search, on the cached 8K SmolLM2 capture (run `retrieval-attention bench recall` once to make it).
Usage: ``python docs/bench/scripts/warm_start.py [W]``."""
import sys, numpy as np
from retrieval_attention.threads import configure_threads
configure_threads(2)
from retrieval_attention.bench.capture import load_capture
from retrieval_attention.bench.recall import subsample_rows, recall_per_query
from retrieval_attention.index.flat import exact_topk
from retrieval_attention.index import make_index
from retrieval_attention.index import kernels as K
from retrieval_attention.index import decode_kernels as DK
from retrieval_attention.bench.capture import captures_dir
cap = load_capture(str(captures_dir() / "smollm2_ctx8192_dec32.npz"))
W = int(sys.argv[1]) if len(sys.argv) > 1 else 8
res = {}
for L in (2, 8, 14, 20, 26):
    lv = cap.layer(L)
    Hkv, n, d = lv.keys.shape
    Hq, T, _ = lv.decode_queries.shape
    keys = np.ascontiguousarray(lv.keys[:, 128:n - 512]); nk = keys.shape[1]
    train = subsample_rows(lv.prefill_queries, 4096)
    q = np.ascontiguousarray(lv.decode_queries, np.float32)
    exact_ids, _ = exact_topk(keys, q, 100, Hq // Hkv)
    idx = make_index("roar").build(keys, train)
    goh, koh = idx._graph_maps(Hq)
    for ef in (48, 64, 100):
        base_ids, _, base_ns = idx.search(q, 100, ef=ef)
        ids = np.empty((Hq, T, 100), np.int64); ns = np.empty((Hq, T), np.int64)
        for h in range(Hq):
            prev = None
            for t in range(T):
                E0 = idx._entries[goh[h]]
                ent = E0 if prev is None else np.concatenate([prev[:W].astype(np.int32), E0])
                entries = np.full((idx._adj.shape[0], len(ent)), -1, np.int32); entries[goh[h]] = ent
                w = DK.SearchScratch(1, idx.n_graph, 4096)
                oi = np.empty((1, 1, 100), np.int64); osc = np.empty((1, 1, 100), np.float32); ons = np.empty((1, 1), np.int64)
                K.search_batch(idx._adj, idx._keys, idx.n_graph, idx.n_keys, q[h:h+1, t:t+1], goh[h:h+1], koh[h:h+1], entries, 100, ef,
                               w.visited, w.cand_s, w.cand_i, oi, osc, ons)
                ids[h, t] = oi[0, 0]; ns[h, t] = ons[0, 0]; prev = oi[0, 0]
        for name, I, S in (("cold", base_ids, base_ns), ("warm", ids, ns)):
            r = recall_per_query(I, exact_ids, nk).mean(); sc = S.mean() / nk
            res.setdefault((name, ef), []).append((r, sc))
for (name, ef), v in sorted(res.items(), key=lambda x: (x[0][1], x[0][0])):
    v = np.array(v); print(f"ef {ef:4d} {name}: recall@100 {v[:, 0].mean():.3f}  scanned {100 * v[:, 1].mean():.2f}%")
