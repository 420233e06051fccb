"""Measurement (docs/BENCHMARKS.md, session 17): how an idle background thread that once ran a parallel numba
kernel slows the main thread's fused search calls, and that its exit undoes it. libgomp counts the threads of
every OpenMP team; with more than the cores it spin-waits only briefly between parallel regions, so the workers
sleep between calls and each call waits for their wake-up. Llama-3-8B attention shape (8 KV heads, 32 query
heads, d 128), 32,768 synthetic bfloat16 keys, device-residual mode, all cores; a 0.5 ms busy gap between calls
(the device part of a decode step). Per row, medians of 250 calls: the first worker's start after the call
(dispatch), the last worker's lag behind the first (wake-up), the whole kernel, and the method's Python around
the kernel (``last_call_timing["python_s"]``).
Usage: ``python docs/bench/scripts/idle_team_wakeup.py``."""
import time
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
import torch

from retrieval_attention.threads import TransientWorkers, configure_threads

configure_threads()
from retrieval_attention.index import decode_kernels as DK  # noqa: E402
from retrieval_attention.index import make_index  # noqa: E402
from retrieval_attention.index.base import Residual  # noqa: E402
from retrieval_attention.index.bf16 import tensor_as_numpy  # noqa: E402
from retrieval_attention.index.reference import make_ood_data  # noqa: E402

Hkv, group, d, n = 8, 4, 128, 32768
keys, tq, te = make_ood_data(n_kv_heads=Hkv, group=group, n_keys=n, n_train=1024, n_test=64, d=d, seed=0)
idx = make_index("roar", storage="bfloat16").build(keys, tq)
values = tensor_as_numpy(torch.from_numpy(np.random.default_rng(1).standard_normal((Hkv, n, d), np.float32)).bfloat16())
rk = idx.stored_keys()
qs = [np.ascontiguousarray(te[:, i: i + 1]) for i in range(64)]
seen = {}
_timing = DK.call_timing


def recording_timing(before, after, cycles):
    seen["before"], seen["cycles"] = before, cycles.copy()
    return _timing(before, after, cycles)


DK.call_timing = recording_timing
rate = DK.cycles_per_second()


def call():
    idx.search_attend(qs[call.i % 64], 100, values, d ** -0.5, return_ids=True, residual=Residual(rk, n, 0, lo=n - 32))
    call.i += 1


call.i = 0


def measure(label, gap_s=0.0005, reps=300, skip=50):
    first, lag, kernel, python = [], [], [], []
    for _ in range(reps):
        t = time.perf_counter()
        while time.perf_counter() - t < gap_s:
            pass
        call()
        enter = seen["cycles"][:, 0]
        first.append((enter.min() - seen["before"]) / rate)
        lag.append((enter.max() - enter.min()) / rate)
        kernel.append(idx.last_call_timing["kernel_s"])
        python.append(idx.last_call_timing["python_s"])
    med = lambda x: np.median(x[skip:]) * 1e6  # noqa: E731
    print(f"| {label} | {med(first):.1f} | {med(lag):.1f} | {med(kernel):.0f} | {med(python):.1f} |", flush=True)


print(f"{numba.get_num_threads()} threads\n\n| background thread | first worker starts, us | last worker's lag, us | "
      "kernel, us | Python, us |\n|:--|--:|--:|--:|--:|")
measure("none")
ex = ThreadPoolExecutor(1)
ex.submit(call).result()
measure("idle ThreadPoolExecutor thread that ran one call")
ex.shutdown(wait=True)
measure("that thread exited")
tw = TransientWorkers(1, "probe")
tw.submit(call).result()
while tw.alive:
    time.sleep(0.001)
measure("TransientWorkers after the same job")
