"""Measurement (docs/BENCHMARKS.md, session 16): the Python around one fused search call of ``RoarIndex.search_attend``
(``last_call_timing``: the method's time minus the kernel's), median of 500 calls, SmolLM2 attention shape (3 KV
heads, 9 query heads, d 64), 8,192 synthetic bfloat16 keys, the device-residual mode (exact residual over the last
32 keys), two threads; then a cProfile of 2,000 calls. Session 16, dev VM: 58 us per call before the bookkeeping
moved to plain Python numbers, 38 us after.
Usage: ``python docs/bench/scripts/fused_call_python.py``."""
import cProfile
import pstats

import numpy as np
import torch
from retrieval_attention.threads import configure_threads
configure_threads(2)
from retrieval_attention.index import make_index
from retrieval_attention.index.reference import make_ood_data
from retrieval_attention.index.base import Residual
from retrieval_attention.index.bf16 import tensor_as_numpy
Hkv, group, d, n = 3, 3, 64, 8192
keys, tq, te = make_ood_data(n_kv_heads=Hkv, group=group, n_keys=n, n_train=1024, n_test=64, d=d, seed=0)
idx = make_index("roar", storage="bfloat16").build(keys, tq)
values = tensor_as_numpy(torch.from_numpy(np.random.default_rng(1).standard_normal((Hkv, n, d)).astype(np.float32)).bfloat16())
rk = idx.stored_keys()
qs = [np.ascontiguousarray(te[:, i: i + 1]) for i in range(64)]
def run(reps):
    py = []
    for i in range(reps):
        idx.search_attend(qs[i % 64], 100, values, 0.125, return_ids=True, residual=Residual(rk, n, 0, lo=n - 32))
        t = idx.last_call_timing
        py.append(t["wall_s"] - t["kernel_s"])
    return np.median(py) * 1e6, np.median([idx.last_call_timing["kernel_s"]]) * 1e6
run(50)
print("python us per call (median), kernel us:", run(500))
pr = cProfile.Profile(); pr.enable(); run(2000); pr.disable()
pstats.Stats(pr).sort_stats("tottime").print_stats(25)
