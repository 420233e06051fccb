"""Experiment (docs/BENCHMARKS.md, session 8): how far any early-termination rule could take roar at 8K.

The beam search expands the best unexpanded node it has scored; a narrower beam (ef) only stops earlier on the same
expansion order (the node a wide beam expands next is one a narrow beam holds, or the narrow search has ended). So
one unbounded best-first trace per query gives recall as a function of keys scanned for every stopping rule: the
ef rule stops at the first expansion of a node ranked >= ef among the scored keys; an oracle stops each query where
it best trades recall for scans (Lagrangian over all queries at a mean budget). Options: ``--seeds S`` scores the
previous decode step's top-S results first (warm start; those of an ef = ``--seed-ef`` search, default 80), ``--positional R`` also scores ids within R of an expanded
node (neighbouring tokens). Python reference search (slow: ~40 s per run on the cached capture).
Usage: ``python docs/bench/scripts/termination_bound.py [--seeds S [--seed-ef L]] [--positional R] [--spec roar-params]
[--stats]``."""
import argparse
import heapq
import bisect

import numpy as np

from retrieval_attention.bench.capture import captures_dir, load_capture
from retrieval_attention.bench.common import parse_index_spec
from retrieval_attention.index import make_index

SINK, WINDOW, K = 128, 512, 100


def trace(kh, adj_g, entries, q, seeds, radius, max_scans):
    """Best-first order of scanned ids and, per expansion, (scans so far, rank of the expanded node)."""
    n = kh.shape[0]
    vis = np.zeros(n, bool)
    cand, scored, seq, ranks = [], [], [], []

    def score(ids):
        ids = ids[~vis[ids]]
        _, first = np.unique(ids, return_index=True)
        ids = ids[np.sort(first)]
        vis[ids] = True
        for i, s in zip(ids, kh[ids] @ q):
            heapq.heappush(cand, (-s, i))
            bisect.insort(scored, -s)
            seq.append(i)

    score(np.array(list(seeds) + [e for e in entries if e >= 0], np.int64))
    while cand and len(seq) < max_scans:
        s, node = heapq.heappop(cand)
        ranks.append((len(seq), bisect.bisect_left(scored, s)))
        nb = adj_g[node][adj_g[node] >= 0]
        if radius:
            pos = np.arange(node - radius, node + radius + 1)
            nb = np.concatenate([pos[(pos >= 0) & (pos < n) & (pos != node)], nb])
        score(nb.astype(np.int64))
    return np.array(seq), np.array(ranks)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, default=0)
    p.add_argument("--seed-ef", type=int, default=80, help="beam width of the search whose results seed the next step")
    p.add_argument("--positional", type=int, default=0)
    p.add_argument("--spec", default="roar")
    p.add_argument("--layers", default="2,8,14,20,26")
    p.add_argument("--max-scanned", type=float, default=0.3)
    p.add_argument("--capture", default="smollm2_ctx8192_dec32.npz", help="capture file in the captures directory")
    p.add_argument("--stats", action="store_true", help="also print where the scans go (first hit, hit rate, misses)")
    a = p.parse_args()
    name, params = parse_index_spec(a.spec)
    cap = load_capture(str(captures_dir() / a.capture))
    runs = []  # (n, hits per scan prefix, ranks) per query
    where = []  # (layer, head, true rank of each scanned key) per query, for --stats
    neighbours = {}  # layer -> per query: share of top-K keys with a neighbouring token in the top-K
    for L in (int(x) for x in a.layers.split(",")):
        lv = cap.layer(L)
        keys = np.ascontiguousarray(lv.keys[:, SINK:-WINDOW])
        dq = lv.decode_queries
        Hq, T, _ = dq.shape
        group = Hq // keys.shape[0]
        idx = make_index(name, **params).build(keys, lv.prefill_queries)
        adj, ent = idx._adj, idx._entries
        for h in range(Hq):
            kh, gi = keys[h // group], (h if adj.shape[0] == Hq else h // group)
            prev = []
            for t in range(T):
                allsc = kh @ dq[h, t]
                true_rank = {int(j): r for r, j in enumerate(np.argsort(-allsc, kind="stable")[:K])}
                # share of the top-K keys whose neighbouring token (id +-1) is in the top-K too
                neighbours.setdefault(L, []).append(np.mean([(j - 1 in true_rank) or (j + 1 in true_rank)
                                                             for j in true_rank]))
                seq, ranks = trace(kh, adj[gi], ent[gi], dq[h, t], prev[: a.seeds], a.positional,
                                   int(a.max_scanned * kh.shape[0]))
                # the seeds of the next step: this step's top results as an ef = --seed-ef search returns them
                # (the prefix of the trace up to that rule's stop), not the whole (near exact) trace
                stop = next((sc for sc, rk in ranks if rk >= a.seed_ef), len(seq))
                found = seq[:stop]
                prev = found[np.argsort(-(kh[found] @ dq[h, t]), kind="stable")][: max(a.seeds, 1)].tolist()
                rank_of_scan = np.array([true_rank.get(int(i), -1) for i in seq])  # -1: not in the top-K
                runs.append((kh.shape[0], np.cumsum(rank_of_scan >= 0), ranks))
                where.append((L, h, rank_of_scan))
        print(f"layer {L} traced", flush=True)
    for ef in (64, 80, 100, 128, 160):
        rec, scan = [], []
        for n, hits, ranks in runs:
            s = next((sc for sc, rk in ranks if rk >= ef), len(hits))
            rec.append(hits[s - 1] / K)
            scan.append(s / n)
        print(f"ef rule {ef:4d}: recall@100 {np.mean(rec):.3f} at {100 * np.mean(scan):.2f}% scanned")
    for budget in (0.06, 0.08, 0.10):
        lo, hi = 0.0, 100.0
        for _ in range(50):
            lam = (lo + hi) / 2
            picks = [int(np.argmax(hits / K - lam * np.arange(1, len(hits) + 1) / n)) for n, hits, _ in runs]
            scan = np.mean([(s + 1) / n for s, (n, _, _) in zip(picks, runs)])
            lo, hi = (lam, hi) if scan > budget else (lo, lam)
        rec = np.mean([hits[s] / K for s, (_, hits, _) in zip(picks, runs)])
        print(f"oracle stop at {100 * budget:.0f}% mean scanned: recall@100 {rec:.3f}")
    if a.stats:
        print_stats(runs, where)
        print(f"top-{K} keys with a neighbouring token (id +-1) in the top-{K}, per layer: " +
              ", ".join(f"L{L} {np.mean(v):.3f}" for L, v in neighbours.items()))


def print_stats(runs, where, ef=80, budget=0.08):
    """Where the scans go: first hit, hit rate per window of scans, misses by true rank at the ef rule, recall per
    (layer, head) at a fixed share of keys scanned."""
    first = [int(np.argmax(hits > 0)) + 1 if hits[-1] else len(hits) for _, hits, _ in runs]
    to50 = [int(np.searchsorted(hits, K // 2)) + 1 for _, hits, _ in runs]
    print(f"scans to the first top-{K} key: median {np.median(first):.0f}; to {K // 2} of them: median "
          f"{np.median(to50):.0f}")
    for lo, hi in ((0, 100), (100, 200), (200, 400), (400, 600), (600, 800)):
        got = [(hits[min(hi, len(hits)) - 1] - (hits[min(lo, len(hits)) - 1] if lo else 0)) / (hi - lo)
               for _, hits, _ in runs]
        print(f"scans {lo}-{hi}: {np.mean(got):.3f} top-{K} keys found per scan")
    missed = np.zeros(K)
    for (n, hits, ranks), (_, _, rk) in zip(runs, where):
        stop = next((sc for sc, r in ranks if r >= ef), len(hits))
        seen = np.zeros(K, bool)
        seen[rk[:stop][rk[:stop] >= 0]] = True
        missed += ~seen
    print(f"missed at ef {ef}, by true rank decile: " + " ".join(f"{m:.3f}" for m in
          (missed.reshape(10, -1).sum(1) / (K // 10 * len(runs)))))
    per_head = {}
    for (n, hits, _), (L, h, _) in zip(runs, where):
        per_head.setdefault((L, h), []).append(hits[min(len(hits), int(budget * n)) - 1] / K)
    means = sorted(np.mean(v) for v in per_head.values())
    print(f"recall@{K} per (layer, head) at {100 * budget:.0f}% scanned: {means[0]:.2f} to {means[-1]:.2f}")


if __name__ == "__main__":
    main()
