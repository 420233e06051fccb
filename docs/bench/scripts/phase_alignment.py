"""Experiment (docs/BENCHMARKS.md, session 14): what rotating the index-training queries to the decode position does
to the keys they select. For a few (layer, query head) pairs of the cached SmolLM2 8K capture: 4,096 evenly spaced
prefill queries as captured, rotated to the first decode position (spread 0) and spread over 64 positions; prints
how many distinct keys are some query's top-1, the share of keys in some query's top-64 (covered), and the share of
the decode queries' top-100 keys that are covered.
Usage: ``python docs/bench/scripts/phase_alignment.py [--pairs 2:1,2:0,8:1,14:0]``."""
import argparse

import numpy as np
import torch

from retrieval_attention.bench.capture import captures_dir, load_capture
from retrieval_attention.bench.recall import capture_rope
from retrieval_attention.rope import align_to_decode

SINK, WINDOW = 128, 512


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--pairs", default="2:1,2:0,8:1,14:0", help="layer:query_head pairs")
    p.add_argument("--capture", default="smollm2_ctx8192_dec32.npz")
    a = p.parse_args()
    cap = load_capture(str(captures_dir() / a.capture))
    rope = capture_rope(cap)
    for pair in a.pairs.split(","):
        L, H = (int(x) for x in pair.split(":"))
        lv = cap.layer(L)
        keys = np.ascontiguousarray(lv.keys[:, SINK:-WINDOW])
        dq, pq = lv.decode_queries, lv.prefill_queries
        Hq, T, d = pq.shape
        kh = keys[H // (Hq // keys.shape[0])]
        where = np.linspace(0, T - 1, 4096).round().astype(np.int64)
        raw = torch.from_numpy(np.ascontiguousarray(pq[H:H + 1, where]))
        top = np.argsort(-(dq[H] @ kh.T), axis=1)[:, :100]
        for name, spread in (("as captured", None), ("spread 0", 0), ("spread 64", 64)):
            tq = raw if spread is None else align_to_decode(raw, torch.from_numpy(where), T, rope[L], spread, seed=L)
            knn = np.argsort(-(tq[0].numpy() @ kh.T), axis=1)[:, :64]
            cov = np.zeros(kh.shape[0], bool)
            cov[knn.ravel()] = True
            print(f"layer {L} head {H} {name:11s}: distinct top-1 keys {len(np.unique(knn[:, 0])):5d}, keys covered "
                  f"{cov.mean():.3f}, decode top-100 covered {cov[top].mean():.3f}")


if __name__ == "__main__":
    main()
