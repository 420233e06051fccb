"""Stages of the roar projection for one graph, compiled kernel against the batched torch version
(docs/BENCHMARKS.md, session 9): i.i.d. Gaussian keys stored as bfloat16 and training queries, exact kNN, owners,
then ``kernels.project`` on the host's threads and ``projection_torch`` (candidates, then pruning) on ``DEVICE``,
then the reverse edges (kernels against ``add_reverse_edges_torch``), each timed twice; prints the share of rows
the two agree on, and the kNN's matmul / top-k / sort times.
``--ops`` (CUDA): the device operators of one torch projection, by total time.
Usage: ``python docs/bench/scripts/projection_profile.py DEVICE [N_KEYS] [N_QUERIES] [--ops]``."""
import sys
import time

import numpy as np

from retrieval_attention.threads import configure_threads

configure_threads()
import torch  # noqa: E402

from retrieval_attention.index import kernels as K  # noqa: E402
from retrieval_attention.index import projection_torch as PT  # noqa: E402
from retrieval_attention.index.bf16 import f32_to_bf16_bits  # noqa: E402
from retrieval_attention.index.roar import keys_for_knn, knn_ip  # noqa: E402

dev = next((a for a in sys.argv[1:] if not a.startswith("--")), "cpu")
pos = [a for a in sys.argv[1:] if not a.startswith("--")]
n = int(pos[1]) if len(pos) > 1 else 32768
m = int(pos[2]) if len(pos) > 2 else 8192
M, KQ, R, CAND = 24, 64, 8, 128


def sync():
    if dev != "cpu":
        torch.cuda.synchronize()


rng = np.random.default_rng(0)
keys = f32_to_bf16_bits(rng.standard_normal((1, n, 128)).astype(np.float32))
q = rng.standard_normal((m, 128)).astype(np.float32)
kh = keys_for_knn(keys[0], dev)
for rep in range(2):
    sync()
    t = time.perf_counter()
    ids, sc = knn_ip(q, kh if dev != "cpu" else keys[0], KQ)
    print(f"knn_ip {time.perf_counter() - t:.3f} s")
if dev != "cpu":
    Qt = torch.from_numpy(q).to(dev)
    rows = max(1, (1 << 30) // (4 * n))
    for rep in range(2):
        tm = tk = ts = 0.0
        for r0 in range(0, m, rows):
            sync(); t0 = time.perf_counter()
            S = Qt[r0:r0 + rows] @ kh.T
            sync(); t1 = time.perf_counter()
            v, i = torch.topk(S, KQ, dim=1)
            sync(); t2 = time.perf_counter()
            i, o = torch.sort(i, dim=1)
            v, o = torch.sort(torch.gather(v, 1, o), dim=1, descending=True, stable=True)
            v.cpu(), i.cpu()
            sync(); t3 = time.perf_counter()
            tm, tk, ts = tm + t1 - t0, tk + t2 - t1, ts + t3 - t2
        print(f"knn stages: matmul {tm:.3f} topk {tk:.3f} sort+copy {ts:.3f} s ({rows} rows per chunk)")
knn_ids, knn_sc = ids[None], sc[None]
own = K.owners(knn_ids, knn_sc, n, R)
kvg = np.zeros(1, np.int64)
for rep in range(2):
    t = time.perf_counter()
    want = K.project(knn_ids, own, keys, kvg, n, M, 1.0, False, True, CAND, torch.get_num_threads())
    print(f"kernel projection {time.perf_counter() - t:.3f} s ({torch.get_num_threads()} threads)")
for rep in range(2):
    tm = {}
    got = PT.project_torch(knn_ids, own, keys, kvg, n, M, 1.0, True, CAND, dev, timings=tm)
    print(f"torch projection: candidates {tm['candidates_s']:.3f} s, pruning {tm['prune_s']:.3f} s, "
          f"{int((own[0, :, 0] >= 0).sum())} pivots")
print(f"pivot rows equal to the kernel's: {(got[0] == want[0]).all(1).mean():.5f}")
if dev != "cpu" and "--ops" in sys.argv:  # where the device time of one torch projection goes
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        PT.project_torch(knn_ids, own, keys, kvg, n, M, 1.0, True, CAND, dev)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))
for rep in range(2):
    a = want.copy()
    t = time.perf_counter()
    src, dst, cnt = K.reverse_edges(a, n)
    K.merge_edges(a, src, dst, cnt, keys, kvg, n, 1.0, False, CAND, torch.get_num_threads())
    print(f"kernel reverse edges {time.perf_counter() - t:.3f} s")
for rep in range(2):
    b, tm = want.copy(), {}
    PT.add_reverse_edges_torch(b, keys, kvg, n, 1.0, CAND, dev, timings=tm)
    print(f"torch reverse edges {tm['reverse_s']:.3f} s")
print(f"rows equal to the kernel's after reverse edges: {(a[0] == b[0]).all(1).mean():.5f}")
