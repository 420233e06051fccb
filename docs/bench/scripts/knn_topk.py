"""GPU kNN of the roar build (exact top-k inner products of training queries among keys): where one graph's time
goes, and ``torch.topk`` over whole rows against a blocked top-k (top-k of each column block, then of the
survivors) and against ``roar.topk_rows`` (group maxima, session 18: one ``amax`` pass, then two small top-k). Random float32 data; the same top-k sets are checked. Usage:
``python docs/bench/scripts/knn_topk.py [m n ...]`` (pairs of query and key counts; default one graph of the
Llama-3-8B shape runs: 16,384 training queries x 131,072 keys at 128K, 8,192 x 524,288 at 512K with
``--max-train-queries 8192``). The times per score chunk do not depend on m, only the number of chunks."""
import sys
import time

import torch

from retrieval_attention.index.roar import topk_rows

K, D = 64, 128  # n_query_neighbors, head_dim
CHUNK_BYTES = 1 << 30  # roar._CUDA_CHUNK_BYTES


def timed(fn, reps=3):
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return min(ts)


def topk_blocked(S, k, block):
    r, n = S.shape
    nb = n // block
    v, i = S[:, :nb * block].view(r, nb, block).topk(k, dim=2)
    i = i + (torch.arange(nb, device=S.device) * block).view(1, nb, 1)
    v, i = v.reshape(r, -1), i.reshape(r, -1)
    if nb * block < n:
        vt, it = S[:, nb * block:].topk(min(k, n - nb * block), dim=1)
        v, i = torch.cat([v, vt], 1), torch.cat([i, it + nb * block], 1)
    v2, j = v.topk(k, dim=1)
    return v2, i.gather(1, j)


def main():
    args = [int(x) for x in sys.argv[1:]] or [16384, 131072, 8192, 524288]
    dev = "cuda"
    for m, n in zip(args[::2], args[1::2]):
        g = torch.Generator(device=dev).manual_seed(0)
        Q = torch.randn(m, D, device=dev, generator=g)
        Kt = torch.randn(n, D, device=dev, generator=g)
        rows = max(1, CHUNK_BYTES // (4 * n))
        S = Q[:rows] @ Kt.T
        t_mm = timed(lambda: Q[:rows] @ Kt.T)
        t_topk = timed(lambda: torch.topk(S, K, dim=1))
        res = {"matmul": t_mm, "topk": t_topk}
        ref = torch.topk(S, K, dim=1)[1].sort(1)[0]
        for block in (2048, 4096, 8192, 16384):
            res[f"blocked {block}"] = timed(lambda: topk_blocked(S, K, block))
            same = torch.equal(topk_blocked(S, K, block)[1].sort(1)[0], ref)
            res[f"blocked {block}"] = (res[f"blocked {block}"], same)
        res["topk_rows (group maxima)"] = (timed(lambda: topk_rows(S, K)),
                                           torch.equal(topk_rows(S, K)[1].sort(1)[0], ref))
        chunks = -(-m // rows)
        print(f"m {m} x n {n}: {chunks} chunks of {rows} rows; per chunk: " +
              ", ".join(f"{k} {v[0] * 1e3:.1f} ms (same {v[1]})" if isinstance(v, tuple) else f"{k} {v * 1e3:.1f} ms"
                        for k, v in res.items()), flush=True)
        print(f"  per graph: matmul + topk {chunks * (t_mm + t_topk):.3f} s; matmul + best blocked "
              f"{chunks * (t_mm + min(v[0] for k, v in res.items() if k.startswith('blocked'))):.3f} s; matmul + topk_rows "
              f"{chunks * (t_mm + res['topk_rows (group maxima)'][0]):.3f} s", flush=True)
        del S, Q, Kt
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
