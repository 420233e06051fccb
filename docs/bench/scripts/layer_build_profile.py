"""Where one layer's roar build spends its time on the host and on the device (session 18's "left undone"): the
Llama-3-8B shape's layer (8 KV heads x N keys of d 128, 4 query heads per KV head, ``make_ood_data`` keys and
training queries as ``bench kernels`` makes them; bfloat16 storage, the automatic training-query count), built
twice to warm up, then once under ``cProfile`` (host: the 25 functions with the most own time) and, on CUDA, once
under ``torch.profiler`` (device: the 20 operators with the most CUDA time). In session 18 a whole layer took
2.40 s standalone on the H100 host (kNN 0.62 / graph 1.23 / repair 0.38 s) while its GPU work was estimated at a
fraction of that. Usage: ``python docs/bench/scripts/layer_build_profile.py [N_KEYS] [TRAIN_PER_QUERY_HEAD]
[INDEX_PARAMS]`` (defaults 131072 and 2048 = 8,192 per graph; INDEX_PARAMS: roar options as in an index spec,
e.g. ``prune=torch``)."""
import cProfile
import pstats
import sys
import time

from retrieval_attention.threads import configure_threads

configure_threads()
import torch  # noqa: E402

from retrieval_attention.bench.common import parse_index_spec  # noqa: E402
from retrieval_attention.index import make_index  # noqa: E402
from retrieval_attention.index.reference import make_ood_data  # noqa: E402

n = int(sys.argv[1]) if len(sys.argv) > 1 else 131072
m = int(sys.argv[2]) if len(sys.argv) > 2 else 2048
params = parse_index_spec("roar:" + sys.argv[3])[1] if len(sys.argv) > 3 else {}
print("roar", params, flush=True)
keys, tq, _ = make_ood_data(n_kv_heads=8, group=4, n_keys=n, n_train=m, n_test=8, d=128, seed=0)


def build():
    t = time.perf_counter()
    idx = make_index("roar", **{"storage": "bfloat16", **params}).build(keys, tq)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    stats = {k: round(v, 3) for k, v in idx.build_stats.items() if k.endswith("_s")}
    print(f"build {time.perf_counter() - t:.2f} s {stats}", flush=True)


build()
build()
prof = cProfile.Profile()
prof.enable()
build()
prof.disable()
pstats.Stats(prof).sort_stats("tottime").print_stats(25)
if torch.cuda.is_available():
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as tp:
        build()
    print(tp.key_averages().table(sort_by="cuda_time_total", row_limit=20))
