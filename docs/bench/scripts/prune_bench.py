"""Time the roar projection's occlusion pruning on one GPU: the Triton kernel (``index/prune_triton.py``) at its
default warps per program (``prune_triton.warps_for``: one at the default ``M`` and ``d``) and at 1, 2, 4 and 8
warps, against the torch ops (``projection_torch._prune_torch``), on random keys of the Llama-3-8B shape's head
size. Session 19's profile: 10.7 ms per Triton call (then at 4 warps) of ~50K pivots in a 128K-key layer build.
Prints the median of ``--repeat`` timed calls each and whether the outputs agree; ``--json`` writes them.
Usage: ``python docs/bench/scripts/prune_bench.py [--keys 131072] [--pivots 32768] [--cand 128] [--M 24]``."""
import argparse
import json
import time

import torch

from retrieval_attention.index import prune_triton as PT
from retrieval_attention.index.projection_torch import _prune_torch

ap = argparse.ArgumentParser()
ap.add_argument("--keys", type=int, default=131072)
ap.add_argument("--pivots", type=int, default=32768)
ap.add_argument("--cand", type=int, default=128)
ap.add_argument("--M", type=int, default=24)
ap.add_argument("--d", type=int, default=128)
ap.add_argument("--repeat", type=int, default=7)
ap.add_argument("--json", default=None)
ap.add_argument("--device", default="cuda", help="cuda; cpu only under TRITON_INTERPRET=1 (a check of the script)")
a = ap.parse_args()
dev = torch.device(a.device)
g = torch.Generator(device=dev).manual_seed(0)
keys = torch.randn(a.keys, a.d, device=dev, generator=g)
piv = torch.randint(0, a.keys, (a.pivots,), device=dev, generator=g)
cand = torch.randint(0, a.keys, (a.pivots, a.cand), device=dev, generator=g)
dpc = ((keys[cand] - keys[piv][:, None]) ** 2).sum(-1)
dpc, order = dpc.sort(dim=1)  # ranked: nearest first
cand = cand.gather(1, order)


def sync():
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn):
    fn()  # compile / warm up
    sync()
    ts = []
    for _ in range(a.repeat):
        t = time.perf_counter()
        out = fn()
        sync()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2] * 1e3, out


res = {"args": vars(a), "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (interpreted)"}
ref_ms, ref = timed(lambda: _prune_torch(cand, dpc, keys, a.M, 1.0))
res["torch_ms"] = ref_ms
variants = {"triton": {}}
for w in (1, 2, 4, 8):
    variants[f"triton_{w}_warps"] = {"num_warps": w}
for name, kw in variants.items():
    ms, out = timed(lambda: PT.prune(cand, dpc, keys, a.M, 1.0, **kw))
    res[f"{name}_ms"] = ms
    res[f"{name}_rows_equal"] = float((out == ref).all(1).float().mean())
print(json.dumps(res, indent=1))
if a.json:
    with open(a.json, "w") as f:
        json.dump(res, f, indent=1)
