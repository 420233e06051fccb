"""Where one layer's roar build spends its time on the host and on the device (session 18's "left undone"): the
Llama-3-8B shape's layer (8 KV heads x N keys of d 128, 4 query heads per KV head, ``make_ood_data`` keys and
training queries as ``bench kernels`` makes them; bfloat16 storage, the automatic training-query count), built
twice to warm up, then once under ``cProfile`` (host: the 25 functions with the most own time) and, on CUDA, once
under ``torch.profiler`` (device: the 20 operators with the most CUDA time). In session 18 a whole layer took
2.40 s standalone on the H100 host (kNN 0.62 / graph 1.23 / repair 0.38 s) while its GPU work was estimated at a
fraction of that. Usage: ``python docs/bench/scripts/layer_build_profile.py [N_KEYS] [TRAIN_PER_QUERY_HEAD]
[INDEX_PARAMS]`` (defaults 131072 and 2048 = 8,192 per graph; INDEX_PARAMS: roar options as in an index spec,
e.g. ``prune=torch``).

Throughput mode (``--layers L``, session 22: at 128K under the 24 GB budget, two builds at a time after the
prefill took 1.6 s per layer against 1.03 s for one build alone): after one warm-up build, ``L`` builds of the same
layer run ``--workers`` at a time on the background build threads the cache uses (each on a CUDA stream of its
own, the allocator's cache released after each when the budget is tight, as the cache's build job does), under
``--budget-gib`` (the process's CUDA memory fraction, as ``--gpu-memory-budget``) with ``--fill-gib`` held by a
stand-in of the model (the 8B shape's weights and decode state: ~16 GiB). Prints each build's stages, the
chunk divisor its GPU stages used and its out-of-memory retries, then the wall time per layer and the caching
allocator's retries (``num_alloc_retries``: each frees the cached blocks and waits for the whole device)."""
import argparse
import cProfile
import pstats
import time

from retrieval_attention.threads import configure_threads

configure_threads()
import torch  # noqa: E402

from retrieval_attention.bench.common import parse_index_spec  # noqa: E402
from retrieval_attention.index import make_index  # noqa: E402
from retrieval_attention.index.reference import make_ood_data  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("n_keys", nargs="?", type=int, default=131072)
ap.add_argument("train_per_query_head", nargs="?", type=int, default=2048)
ap.add_argument("index_params", nargs="?", default="")
ap.add_argument("--layers", type=int, default=0, help="throughput mode: builds to run (0: the profile)")
ap.add_argument("--workers", type=int, default=2, help="throughput mode: builds at a time")
ap.add_argument("--budget-gib", type=float, default=None, help="throughput mode: the CUDA memory budget")
ap.add_argument("--fill-gib", type=float, default=0.0, help="throughput mode: GiB held by a stand-in of the model")
a = ap.parse_args()
n, m = a.n_keys, a.train_per_query_head
params = parse_index_spec("roar:" + a.index_params)[1] if a.index_params else {}
print("roar", params, flush=True)
keys, tq, _ = make_ood_data(n_kv_heads=8, group=4, n_keys=n, n_train=m, n_test=8, d=128, seed=0)


def build(label="build"):
    t = time.perf_counter()
    idx = make_index("roar", **{"storage": "bfloat16", **params}).build(keys, tq)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    wall = time.perf_counter() - t
    st = idx.build_stats
    stats = {k: round(v, 3) for k, v in st.items() if k.endswith("_s")}
    chunks = f" max_shrink {st['max_shrink']:.0f} oom_retries {st['oom_retries']:.0f}" if "max_shrink" in st else ""
    print(f"{label} {wall:.2f} s {stats}{chunks}", flush=True)
    return wall


def throughput():
    """``a.layers`` builds, ``a.workers`` at a time, as the cache runs them (see the module docstring)."""
    from retrieval_attention.gpumem import cuda_alloc_retries, cuda_headroom, release_if_tight
    from retrieval_attention.threads import TransientWorkers

    build("warm-up")
    filler = None
    if torch.cuda.is_available():
        if a.budget_gib is not None:
            total = torch.cuda.get_device_properties(0).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, a.budget_gib * 2**30 / total))
        if a.fill_gib > 0:
            filler = torch.empty(int(a.fill_gib * 2**30), dtype=torch.uint8, device="cuda")
        torch.cuda.empty_cache()
        print(f"headroom {cuda_headroom(0) / 2**30:.2f} GiB (budget {a.budget_gib} GiB, stand-in {a.fill_gib} GiB)",
              flush=True)

    def job(i):
        w = build(f"layer {i}")
        release_if_tight()
        return w

    pool = TransientWorkers(a.workers, "ra-build")
    r0, t = cuda_alloc_retries(torch.cuda.is_available()), time.perf_counter()
    walls = [f.result() for f in [pool.submit(job, i) for i in range(a.layers)]]
    wall = time.perf_counter() - t
    print(f"{a.layers} builds, {a.workers} at a time: {wall:.2f} s = {wall / a.layers:.2f} s per layer "
          f"(each build {sorted(walls)[len(walls) // 2]:.2f} s median; {cuda_alloc_retries(torch.cuda.is_available()) - r0} allocator retries)",
          flush=True)
    del filler


if a.layers > 0:
    throughput()
    raise SystemExit(0)
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
