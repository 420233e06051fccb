"""Build stages of one roar graph over synthetic keys (docs/BENCHMARKS.md, session 8): 128K keys of d 128 stored as
bfloat16, 4 query heads x 4,096 training queries (16,384 per graph, the automatic count at 128K).
``--iid`` draws keys and training queries i.i.d. Gaussian (they cover ~96% of the keys, as a random-weight model's
do) instead of ``make_ood_data``'s out-of-distribution set (~51%). ``--capture FILE --layer L``: a cached SmolLM2
capture's keys (sink 128 and window 512 excluded, float32 storage) and its automatic count of prefill queries instead.
Extra args: roar parameters, e.g. ``n_owners=4``.
Usage: ``python docs/bench/scripts/build_profile.py [--iid | --capture FILE --layer L] [--keys N] [param=value ...]``."""
import argparse
import time

import numpy as np

from retrieval_attention.threads import configure_threads

configure_threads()
from retrieval_attention.bench.common import parse_value  # noqa: E402
from retrieval_attention.index import make_index  # noqa: E402
from retrieval_attention.index.reference import make_ood_data  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--iid", action="store_true")
p.add_argument("--keys", type=int, default=131072)
p.add_argument("--capture", default=None, help="capture file in the captures directory")
p.add_argument("--layer", type=int, default=14)
p.add_argument("params", nargs="*")
a = p.parse_args()
params = {k: parse_value(v) for k, v in (x.split("=", 1) for x in a.params)}
storage = "bfloat16"
if a.capture:
    from retrieval_attention.bench.capture import captures_dir, load_capture
    from retrieval_attention.bench.recall import subsample_rows
    from retrieval_attention.index.roar import auto_train_queries

    lv = load_capture(str(captures_dir() / a.capture)).layer(a.layer)
    keys = np.ascontiguousarray(lv.keys[:, 128:-512])
    tq = subsample_rows(lv.prefill_queries, auto_train_queries(lv.prefill_queries.shape[1]))
    storage = "float32"
else:
    keys, tq, _ = make_ood_data(n_kv_heads=1, group=4, n_keys=a.keys, n_train=4096, n_test=8, d=128, seed=0)
if a.iid and not a.capture:
    tq = np.random.default_rng(1).standard_normal(tq.shape).astype(np.float32)
    keys = np.random.default_rng(2).standard_normal(keys.shape).astype(np.float32)
make_index("roar", storage=storage, **params).build(keys[:, :4096], tq[:, :512])  # compile the kernels
for _ in range(2):
    t = time.perf_counter()
    ix = make_index("roar", storage=storage, **params).build(keys, tq)
    st = ix.build_stats
    print(f"build {time.perf_counter() - t:.2f} s: " + ", ".join(f"{k} {st[k]:.3f}" for k in
          ("knn_s", "projection_s", "reverse_s", "repair_s", "n_train", "covered_frac")))
