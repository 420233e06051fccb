"""Experiments (docs/BENCHMARKS.md, session 14): can another search rule or graph reach issue 2's 8K target
(recall@100 >= 0.95 at <= 8% of keys scanned)? Cached SmolLM2 capture, decode queries, exact top-100 as truth.

Subcommands:

* ``slots``: hit rate (share of scored keys in the true top-100) by neighbour slot and by the beam rank of the
  expanded node (default graph, ef 100).
* ``policy``: beam search where the expansion of a node at beam rank >= ``a`` scores only its first ``b``
  neighbours (partial expansion), and/or the expansion of a node at beam rank < ``a`` also scores its ``c`` most
  co-occurring keys (keys that share training queries' top-64 lists with it: unpruned "co-occurrence" edges).
  Configurations ``(ef, a, c, b)``; ``(ef, 0, 0, 99)`` is the plain search.
* ``qivf``: a query-space IVF: spherical k-means of the training queries; a list per cluster = the union of its
  members' exact top-K' keys; a decode query scans the lists of its ``probes`` nearest centroids (centroids
  counted as scanned).
* ``pivots``: the projection restricted to keys in the top-``t`` of some training query (RoarGraph's query pivots)
  instead of every covered key: fewer pivots, a cheaper build. Uses the package's index and search kernels.

The beam searches here are plain Python (the kernel's sorted-beam algorithm). Usage:
``python docs/bench/scripts/graph_alternatives.py slots|policy|qivf|pivots [--layers 2,8,14,20,26] [--steps 8]
[--capture smollm2_ctx8192_dec32.npz] [--configs "[(100,0,0,99), ...]"]``.
"""
import argparse
import bisect
import time

import numpy as np

from retrieval_attention.bench.capture import captures_dir, load_capture
from retrieval_attention.bench.common import parse_index_spec
from retrieval_attention.index import make_index

SINK, WINDOW, K = 128, 512, 100
KQ = 64  # training-query list length (roar's n_query_neighbors)


def beam_search(kh, adj, cooc, entries, q, ef, a=0, c=0, b=99, stats=None, true=None):
    """Sorted-beam best-first search; returns (top-K ids of all keys scored, keys scored): with ef < K the beam
    steers and every scored key competes for the results, as the kernel's heap mode. ``stats`` collects (slot,
    rank, hit)."""
    vis = np.zeros(kh.shape[0], bool)
    beam, expanded, ns, scored = [], set(), 0, []

    def score(ids):
        nonlocal ns
        ids = [i for i in dict.fromkeys(ids) if not vis[i]]
        if not ids:
            return set()
        vis[ids] = True
        ns += len(ids)
        for i, v in zip(ids, kh[ids] @ q):
            bisect.insort(beam, (-float(v), int(i)))
            scored.append((-float(v), int(i)))
        del beam[ef:]
        return set(ids)

    score([int(e) for e in entries if e >= 0])
    while True:
        pos = next((p for p, (_, i) in enumerate(beam) if i not in expanded), None)
        if pos is None:
            break
        node = beam[pos][1]
        expanded.add(node)
        nb = adj[node]
        nb = [int(x) for x in nb[nb >= 0]]
        ids = nb + [int(x) for x in cooc[node][:c]] if pos < a else nb[:b]
        got = score(ids)
        if stats is not None:
            stats.extend((j, pos, x in true) for j, x in enumerate(ids) if x in got)
    return [i for _, i in sorted(scored)[:K]], ns


def training_queries(pq, kvh, group, d, m=4096):
    tq = pq[kvh * group:(kvh + 1) * group].reshape(-1, d)
    return tq[np.linspace(0, len(tq) - 1, m).astype(np.int64)]


def cooccurrence(tq, kh, top=32):
    """Per key: the ``top`` keys that most often share a training query's top-KQ list with it."""
    n = kh.shape[0]
    knn = np.argpartition(-(tq @ kh.T), KQ, axis=1)[:, :KQ].astype(np.int64)
    u = np.repeat(knn, KQ, axis=1).ravel()
    v = np.tile(knn, (1, KQ)).ravel()
    keep = u != v
    pair, cnt = np.unique(u[keep] * n + v[keep], return_counts=True)
    pu, pv = pair // n, pair % n
    order = np.lexsort((-cnt, pu))
    pu, pv = pu[order], pv[order]
    starts = np.searchsorted(pu, np.arange(n + 1))
    return [pv[starts[i]:starts[i] + top] for i in range(n)]


def run_searches(a, mode):
    cap = load_capture(str(captures_dir() / a.capture))
    configs = eval(a.configs) if mode == "policy" else [(100, 0, 0, 99)]
    res = {cfg: ([], [], {}) for cfg in configs}
    stats = []
    for L in (int(x) for x in a.layers.split(",")):
        lv = cap.layer(L)
        keys = np.ascontiguousarray(lv.keys[:, SINK:-WINDOW])
        dq, pq = lv.decode_queries, lv.prefill_queries
        idx = make_index("roar").build(keys, pq)
        Hq, group = dq.shape[0], dq.shape[0] // keys.shape[0]
        for kvh in range(keys.shape[0]):
            kh = keys[kvh]
            need_cooc = mode == "policy" and any(cfg[2] for cfg in configs)
            cooc = cooccurrence(training_queries(pq, kvh, group, kh.shape[1]), kh) if need_cooc else None
            for h in range(kvh * group, (kvh + 1) * group):
                for t in range(0, dq.shape[1], max(1, dq.shape[1] // a.steps)):
                    true = set(np.argsort(-(kh @ dq[h, t]), kind="stable")[:K].tolist())
                    for cfg in configs:
                        ids, ns = beam_search(kh, idx._adj[kvh], cooc, idx._entries[kvh], dq[h, t], *cfg,
                                              stats=stats if mode == "slots" else None, true=true)
                        r = len(true & set(ids)) / K
                        res[cfg][0].append(r)
                        res[cfg][1].append(ns / kh.shape[0])
                        res[cfg][2].setdefault((L, h), []).append(r)
        print(f"layer {L} done", flush=True)
    if mode == "slots":
        st = np.array(stats)
        M = int(st[:, 0].max()) + 1
        print("hit rate by neighbour slot: " + " ".join(f"{st[st[:, 0] == j, 2].mean():.3f}" for j in range(M)))
        for lo, hi in ((0, 10), (10, 30), (30, 60), (60, 80), (80, 100)):
            m = (st[:, 1] >= lo) & (st[:, 1] < hi)
            print(f"expanded node at beam rank {lo}-{hi}: hit rate {st[m, 2].mean():.3f}, share of scans {m.mean():.3f}")
        return
    for (ef, a_, c, b), (r, s, ph) in res.items():
        print(f"ef {ef:4d}, top-{a_} expansions +{c} co-occurring keys, others first {b}: recall@100 {np.mean(r):.3f} "
              f"at {100 * np.mean(s):.2f}% scanned, worst head {min(np.mean(v) for v in ph.values()):.3f}")


def kmeans_sphere(x, C, iters=20, seed=0):
    rng = np.random.default_rng(seed)
    cen = x[rng.choice(len(x), C, replace=False)].copy()
    for _ in range(iters):
        asg = (x @ cen.T).argmax(1)
        new = np.zeros_like(cen)
        np.add.at(new, asg, x)
        nrm = np.linalg.norm(new, axis=1, keepdims=True)
        cen = np.where(nrm > 0, new / np.maximum(nrm, 1e-9), cen)
    return cen, (x @ cen.T).argmax(1)


def run_qivf(a):
    cap = load_capture(str(captures_dir() / a.capture))
    res = {}
    for L in (int(x) for x in a.layers.split(",")):
        lv = cap.layer(L)
        keys = np.ascontiguousarray(lv.keys[:, SINK:-WINDOW])
        dq, pq = lv.decode_queries, lv.prefill_queries
        group = dq.shape[0] // keys.shape[0]
        for kvh in range(keys.shape[0]):
            kh = keys[kvh]
            tq = training_queries(pq, kvh, group, kh.shape[1])
            knn = np.argsort(-(tq @ kh.T), axis=1)[:, :100]
            tn = tq / np.linalg.norm(tq, axis=1, keepdims=True)
            for C in (64, 256):
                cen, asg = kmeans_sphere(tn, C)
                for kp in (64, 100):
                    lists = [np.unique(knn[asg == c, :kp]) for c in range(C)]
                    for h in range(kvh * group, (kvh + 1) * group):
                        for t in range(0, dq.shape[1], max(1, dq.shape[1] // a.steps)):
                            q = dq[h, t]
                            true = set(np.argsort(-(kh @ q))[:K].tolist())
                            order = np.argsort(-(cen @ q))
                            for P in (1, 2, 4, 8):
                                u = np.unique(np.concatenate([lists[c] for c in order[:P]]))
                                top = u[np.argsort(-(kh[u] @ q))[:K]]
                                r = res.setdefault((C, kp, P), ([], [], {}))
                                rec = len(true & set(top.tolist())) / K
                                r[0].append(rec)
                                r[1].append((len(u) + C) / kh.shape[0])
                                r[2].setdefault((L, h), []).append(rec)
        print(f"layer {L} done", flush=True)
    for (C, kp, P), (r, s, ph) in sorted(res.items()):
        print(f"{C:4d} query clusters, lists of the members' top-{kp}, {P} probes: recall@100 {np.mean(r):.3f} at "
              f"{100 * np.mean(s):.2f}% scanned (centroids included), worst head {min(np.mean(v) for v in ph.values()):.3f}")


def run_pivots(a):
    import retrieval_attention.index.roar as roar

    orig = roar.K.owners
    top = {"t": 0}

    def owners(knn_ids, knn_sc, n, R):
        own = orig(knn_ids, knn_sc, n, R)
        if top["t"]:
            for g in range(knn_ids.shape[0]):
                piv = np.zeros(n, bool)
                piv[knn_ids[g, :, :top["t"]].ravel()] = True
                own[g, ~piv] = -1  # not a pivot: no projected out-edges (reverse edges and repair still apply)
        return own

    roar.K.owners = owners
    try:
        cap = load_capture(str(captures_dir() / a.capture))
        name, params = parse_index_spec("roar")
        res = {}
        for L in (int(x) for x in a.layers.split(",")):
            lv = cap.layer(L)
            keys = np.ascontiguousarray(lv.keys[:, SINK:-WINDOW])
            dq, pq = lv.decode_queries, lv.prefill_queries
            Hq, group = dq.shape[0], dq.shape[0] // keys.shape[0]
            exact = np.stack([np.argsort(-(dq[h] @ keys[h // group].T), axis=1, kind="stable")[:, :K] for h in range(Hq)])
            for t in (0, 1, 4, 16):
                top["t"] = t
                t0 = time.perf_counter()
                idx = make_index(name, **params).build(keys, pq)
                build = time.perf_counter() - t0
                for ef in (64, 100, 128, 160):
                    ids, _, ns = idx.search(dq, K, ef=ef)
                    rec = np.array([[len(set(ids[h, i]) & set(exact[h, i])) / K for i in range(dq.shape[1])]
                                    for h in range(Hq)])
                    r = res.setdefault((t, ef), ([], [], [], [], []))
                    r[0].append(rec.mean())
                    r[1].append(ns.mean() / keys.shape[1])
                    r[2].append(rec.mean(1).min())
                    r[3].append(idx.build_stats["projection_s"] + idx.build_stats["reverse_s"])
                    r[4].append(build)
            print(f"layer {L} done", flush=True)
        for (t, ef), r in sorted(res.items()):
            print(f"pivots: {'every covered key' if t == 0 else f'top-{t} of a training query'}, ef {ef}: recall@100 "
                  f"{np.mean(r[0]):.3f} at {100 * np.mean(r[1]):.2f}% scanned, worst head {min(r[2]):.3f}; projection + "
                  f"reverse edges {np.mean(r[3]):.2f} s, build {np.mean(r[4]):.2f} s per layer")
    finally:
        roar.K.owners = orig


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("mode", choices=("slots", "policy", "qivf", "pivots"))
    p.add_argument("--layers", default="2,8,14,20,26")
    p.add_argument("--steps", type=int, default=8, help="decode steps per head (evenly spaced among the 32)")
    p.add_argument("--capture", default="smollm2_ctx8192_dec32.npz", help="capture file in the captures directory")
    p.add_argument("--configs", default="[(64,0,0,99),(80,0,0,99),(100,0,0,99),(128,0,0,99),(160,0,0,99),(128,30,0,8),(160,30,0,8),"
                                        "(200,30,0,12),(100,10,16,99),(100,20,16,99),(128,20,16,8)]",
                   help="policy: list of (ef, a, c, b)")
    a = p.parse_args()
    if a.mode in ("slots", "policy"):
        run_searches(a, a.mode)
    elif a.mode == "qivf":
        run_qivf(a)
    else:
        run_pivots(a)


if __name__ == "__main__":
    main()
