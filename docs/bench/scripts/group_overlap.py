"""Experiment (docs/BENCHMARKS.md, session 9): how much the searches of one GQA group's query heads overlap.

Issue 5 lists "searches of a GQA group's query heads sharing one pass over the KV head's graph" as a way to fewer
bytes per token. With one graph per KV head (the default), every query head of a group searches the same graph from
the same entry points. This script runs the best-first beam search (ef ``--ef``, Python, the kernel's algorithm)
for every query head and decode step of a cached SmolLM2 capture and reports, per (KV head, step), how many distinct
keys the group's searches score together against the sum of their separate scans: the key rows a shared pass would
load once. Also the same for pairs of heads (two heads per worker), and the top-100 overlap of the exact results.
Usage: ``python docs/bench/scripts/group_overlap.py [--capture smollm2_ctx32768_dec32.npz] [--layers 2,8,14,20,26]
[--ef 128] [--steps 32]``."""
import argparse
import heapq
import itertools

import numpy as np

from retrieval_attention.bench.capture import captures_dir, load_capture
from retrieval_attention.index import make_index
from retrieval_attention.index.roar import auto_train_queries
from retrieval_attention.bench.recall import subsample_rows

SINK, WINDOW, K = 128, 512, 100


def visited_set(kh, adj_g, entries, q, ef):
    """Keys scored by a best-first beam search of width ``ef`` (stops when the best unexpanded candidate ranks
    below the ef-th best scored key)."""
    seen = set()
    cand, beam = [], []  # cand: (-s, id) best first; beam: (s, id) worst first, size <= ef

    def score(ids):
        for i in ids:
            i = int(i)
            if i < 0 or i in seen:
                continue
            seen.add(i)
            s = float(kh[i] @ q)
            if len(beam) < ef or s > beam[0][0]:
                heapq.heappush(cand, (-s, i))
                if len(beam) < ef:
                    heapq.heappush(beam, (s, i))
                else:
                    heapq.heapreplace(beam, (s, i))

    score(entries)
    while cand:
        s, node = heapq.heappop(cand)
        if len(beam) == ef and -s < beam[0][0]:
            break
        score(adj_g[node])
    return seen


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--capture", default="smollm2_ctx32768_dec32.npz")
    p.add_argument("--layers", default="2,8,14,20,26")
    p.add_argument("--ef", type=int, default=128)
    p.add_argument("--steps", type=int, default=32)
    a = p.parse_args()
    cap = load_capture(str(captures_dir() / a.capture))
    rows = []
    for layer in (int(x) for x in a.layers.split(",")):
        lv = cap.layer(layer)
        keys = np.ascontiguousarray(lv.keys[:, SINK:-WINDOW])
        Hkv, n, _ = keys.shape
        tq = subsample_rows(lv.prefill_queries, auto_train_queries(n))
        ix = make_index("roar").build(keys, tq)
        Q = lv.decode_queries[:, :a.steps]
        Hq = Q.shape[0]
        g = Hq // Hkv
        group_ratio, pair_ratio, top_overlap, scans = [], [], [], []
        for h in range(Hkv):
            kh = ix._f32(ix._keys[h, :n])
            adj = ix._adj[h]
            ent = ix._entries[h]
            for t in range(Q.shape[1]):
                vs = [visited_set(kh, adj, ent, Q[h * g + j, t].astype(np.float64), a.ef) for j in range(g)]
                tops = [set(np.argsort(-(kh @ Q[h * g + j, t]))[:K].tolist()) for j in range(g)]
                total = sum(len(v) for v in vs)
                scans.append(total / g)
                group_ratio.append(len(set().union(*vs)) / total)
                for x, y in itertools.combinations(range(g), 2):
                    pair_ratio.append(len(vs[x] | vs[y]) / (len(vs[x]) + len(vs[y])))
                    top_overlap.append(len(tops[x] & tops[y]) / K)
        rows.append((layer, np.mean(scans), np.mean(group_ratio), np.mean(pair_ratio), np.mean(top_overlap)))
        print(f"layer {layer:2d}: keys scored per search {rows[-1][1]:.0f} ({100 * rows[-1][1] / n:.2f}%), "
              f"group union / sum {rows[-1][2]:.3f} ({g} heads), pair union / sum {rows[-1][3]:.3f}, "
              f"top-100 overlap of a pair {rows[-1][4]:.3f}", flush=True)
    r = np.array([x[1:] for x in rows])
    print(f"mean: keys per search {r[:, 0].mean():.0f}, group union / sum {r[:, 1].mean():.3f}, "
          f"pair union / sum {r[:, 2].mean():.3f}, top-100 pair overlap {r[:, 3].mean():.3f}")


if __name__ == "__main__":
    main()
