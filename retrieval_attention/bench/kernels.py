"""``bench kernels``: index build time (kNN / projection / repair) and the per-layer decode call (search +
attention over the retrieved keys, all query heads of one layer, then the residual estimate as decoding does it) on synthetic out-of-distribution keys of a
model's shape, at sizes no real capture of this machine reaches (128K+ keys per head).

The data is :func:`retrieval_attention.index.reference.make_ood_data` (queries decided by directions in
which keys barely differ, as decode queries are); recall@k is measured against exact top-k of the same
queries. Timings are medians over ``--steps`` decode steps x ``--layers`` layers (one query per head per
step, as in decoding; each step calls every layer in turn, so with several layers a call finds its layer's
data out of the caches, as a decode step's 32 layer calls do).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from ..config import DEFAULT_RESIDUAL_REFRESH

#: decode steps used to warm up the compiled kernels before timing
WARMUP_STEPS = 2


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--keys", default="8K,32K,128K", help="comma-separated keys per KV head (K = 1024)")
    p.add_argument("--shape", default="llama3-8b", help="model shape for heads and head_dim (see bench decode)")
    p.add_argument("--index", default="roar", help="index spec, e.g. roar or roar:M=16 (see bench recall)")
    p.add_argument("--ef", default="64,100,128", help="comma-separated search budgets (ef; nprobe for ivf)")
    p.add_argument("--top-k", type=int, default=100)
    p.add_argument("--storage", default="bfloat16", choices=["bfloat16", "float32"],
                   help="key and value precision on the host (roar key storage; bfloat16 as for bf16 models)")
    p.add_argument("--train-queries", type=int, default=4096, help="training queries per query head")
    p.add_argument("--residual-samples", type=int, default=None,
                   help="residual draws per query head timed after the search as decoding does (default: the "
                        "library's; 0 = none)")
    p.add_argument("--residual-on", default="cpu", choices=["cpu", "device"],
                   help="the residual part of the CPU call: cpu = the draws (default), device = what the CPU still "
                        "does when the draws are scored on the GPU: the exact residual over the last "
                        "--residual-refresh keys (the keys added since the device sample's draw, at most that many)")
    p.add_argument("--residual-refresh", type=int, default=DEFAULT_RESIDUAL_REFRESH,
                   help="with --residual-on device: keys in that exact part (default %(default)s, the most between redraws)")
    p.add_argument("--steps", type=int, default=20, help="timed decode steps (median reported)")
    p.add_argument("--layers", type=int, default=1,
                   help="independent layers (own data and index) called in turn at every step, as decoding does: "
                        "with enough of them each call finds its layer's keys, values and graph out of the CPU "
                        "caches (8 at 128K keys exceed a 300 MiB L3); 1 = the same layer every step (cache-warm)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", default=None,
                   help="CPU threads, or a comma-separated list to time the layer call at each count (thread "
                        "scaling; the index is built with the largest); default: all available cores")
    p.add_argument("--json", default=None, help="write the records here")
    p.add_argument("--markdown", default=None, help="write the table here")


#: ``call_parts_ms``: the fused call's Python share and its kernel's parts (``RoarIndex.last_call_timing``)
CALL_PARTS = ("python", "start", "busy_max", "busy_mean", "join", "idle")


def _median_stat(stats: list[dict], key: str) -> float | None:
    vals = [s[key] for s in stats if s.get(key) is not None]
    return float(np.median(vals)) if vals else None


def run(args) -> int:
    from ..threads import configure_threads

    try:
        thread_counts = [int(x) for x in str(args.threads).split(",") if x.strip()] if args.threads else []
    except ValueError:
        thread_counts = [0]
    if any(t < 1 for t in thread_counts):
        print(f"error: --threads takes positive integers (e.g. 16 or 1,4,16), got {args.threads!r}", file=sys.stderr)
        return 2
    threads = configure_threads(max(thread_counts) if thread_counts else None)
    thread_counts = thread_counts or [threads]
    import numba
    import torch

    from ..hostmem import anon_huge_page_bytes, huge_copy, huge_pages_enabled
    from ..index import make_index
    from ..index.bf16 import tensor_as_numpy
    from ..index.base import Residual
    from ..config import DEFAULT_RESIDUAL_SAMPLES
    from ..index.reference import make_ood_data, recall_at_k
    from .common import command_line, machine_info, machine_line, markdown_table, parse_index_spec, write_json
    from .decode import SHAPES, parse_contexts

    if args.shape not in SHAPES:
        print(f"error: unknown --shape {args.shape!r}; choose from {', '.join(sorted(SHAPES))}", file=sys.stderr)
        return 2
    try:
        sizes = parse_contexts(args.keys)
        efs = [int(x) for x in args.ef.split(",") if x.strip()]
        name, params = parse_index_spec(args.index)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not efs or min(efs) < 1 or args.steps < 1 or args.top_k < 1 or args.layers < 1:
        print("error: --ef, --steps, --layers and --top-k must be positive", file=sys.stderr)
        return 2
    if args.residual_samples is not None and args.residual_samples < 0:
        print(f"error: --residual-samples must be >= 0 (0 = no residual estimate), got {args.residual_samples}",
              file=sys.stderr)
        return 2
    if args.residual_refresh < 1:
        print(f"error: --residual-refresh must be >= 1 (keys in the device mode's exact part), got "
              f"{args.residual_refresh}", file=sys.stderr)
        return 2
    shape = SHAPES[args.shape]
    Hkv = shape["num_key_value_heads"]
    group = shape["num_attention_heads"] // Hkv
    d = shape.get("head_dim") or shape["hidden_size"] // shape["num_attention_heads"]
    scaling = d ** -0.5
    budget_key = "nprobe" if name == "ivf" else "ef"
    if name == "flat":  # exact: no budget to sweep
        efs = [None]
    if name == "roar":
        params.setdefault("storage", args.storage)
    m_res = DEFAULT_RESIDUAL_SAMPLES if args.residual_samples is None else args.residual_samples
    records = []
    for n in sizes:
        if n < args.top_k:
            print(f"error: {n} keys < --top-k {args.top_k}", file=sys.stderr)
            return 2
        layers = []  # per layer: (index, values, residual keys, test queries, exact top-k ids)
        build_s, stats = [], []
        for layer in range(args.layers):
            seed = args.seed + 1000 * layer
            t0 = time.perf_counter()
            keys, tq, te = make_ood_data(n_kv_heads=Hkv, group=group, n_keys=n, n_train=min(args.train_queries, n),
                                         n_test=args.steps + WARMUP_STEPS, d=d, seed=seed)
            values = np.random.default_rng(seed + 1).standard_normal((Hkv, n, d)).astype(np.float32)
            if args.storage == "bfloat16":
                values = tensor_as_numpy(torch.from_numpy(values).bfloat16())
            values = huge_copy(values)  # as the decode store keeps them
            print(f"{n} keys x {Hkv} KV heads (d {d}, {group} query heads each), layer {layer + 1}/{args.layers}: "
                  f"data in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            idx = make_index(name, **params).build(keys, tq)
            build_s.append(time.perf_counter() - t0)
            stats.append(dict(getattr(idx, "build_stats", {}) or {}))
            res_keys = idx.stored_keys() if hasattr(idx, "stored_keys") else keys
            true_ids, _, _ = make_index("flat").build(keys).search(te, args.top_k)
            layers.append((idx, values, res_keys, te, true_ids))
            del keys, tq
        n_steps = args.steps + WARMUP_STEPS
        for T in thread_counts:
            numba.set_num_threads(T)
            torch.set_num_threads(T)
            for ef in efs:
                budget = {} if ef is None else {budget_key: ef}

                def decode_pass(with_residual):
                    """Every step calls every layer in turn, as decoding does (with several layers, each
                    call finds its layer's data out of the caches); per timed call: (s, scanned frac, recall,
                    worker imbalance)."""
                    out = []
                    for step in range(n_steps):
                        for idx, values, res_keys, te, true_ids in layers:
                            q = np.ascontiguousarray(te[:, step : step + 1])
                            res = None
                            if with_residual and args.residual_on == "device":  # the keys since the device draw
                                res = Residual(res_keys, n, 0, lo=max(0, n - args.residual_refresh))
                            elif with_residual:
                                res = Residual(res_keys, n, m_res, seed=step)
                            t1 = time.perf_counter()
                            _, _, ns, ids = idx.search_attend(q, args.top_k, values, scaling, return_ids=True,
                                                              residual=res, **budget)
                            dt = time.perf_counter() - t1
                            if step < WARMUP_STEPS:
                                continue
                            loads = getattr(idx, "last_call_loads", None)
                            bal = loads[0] / loads[1] if loads is not None and loads[1] > 0 else None
                            rec = float(recall_at_k(ids, true_ids[:, step : step + 1]).mean())
                            out.append((dt, float(ns.mean()) / n, rec, bal, dict(getattr(idx, "last_call_timing", {}))))
                    return out

                calls = decode_pass(m_res > 0)
                times = [c[0] for c in calls]
                plain = [c[0] for c in decode_pass(False)] if m_res > 0 else times
                balance = [c[3] for c in calls if c[3] is not None]
                scanned = float(np.mean([c[1] for c in calls]))
                rec = {
                    "index": args.index, "keys": n, "shape": args.shape, "kv_heads": Hkv, "query_heads": Hkv * group,
                    "head_dim": d, "storage": args.storage, budget_key: ef, "top_k": args.top_k, "threads": T,
                    "layers": args.layers,
                    "build_s": float(np.median(build_s)), "knn_s": _median_stat(stats, "knn_s"),
                    "graph_s": _median_stat(stats, "graph_s"), "repair_s": _median_stat(stats, "repair_s"),
                    "memory_bytes": layers[0][0].memory_bytes(),
                    "residual_samples": m_res, "residual_on": args.residual_on,
                    "residual_refresh": args.residual_refresh if args.residual_on == "device" else None,
                    "residual_ms": (max(0.0, 1e3 * (float(np.median(times)) - float(np.median(plain))))
                                    if m_res > 0 else 0.0),
                    "layer_ms": 1e3 * float(np.median(times)), "layer_ms_p90": 1e3 * float(np.quantile(times, 0.9)),
                    "scanned_fraction": scanned, "recall_at_k": float(np.mean([c[2] for c in calls])),
                    "timed_calls": len(calls),
                    "anon_huge_page_bytes": anon_huge_page_bytes(), "huge_pages_advised": huge_pages_enabled(),
                }
                # thread time per scanned key of the search + attention part (residual excluded): flat when the
                # call scales with threads, rising when memory or synchronisation limits it
                scanned_keys = scanned * n * Hkv * group
                rec["ns_per_key_thread"] = (rec["layer_ms"] - rec["residual_ms"]) * 1e6 * T / max(scanned_keys, 1.0)
                # keys scanned by the call's most loaded worker / the average worker (median over calls)
                rec["worker_imbalance"] = float(np.median(balance)) if balance else None
                # where a call's time goes (roar's fused call, x86-64: decode_kernels.call_timing), ms, medians
                parts = [c[4] for c in calls if "kernel_s" in c[4]]
                rec["call_parts_ms"] = ({p: 1e3 * float(np.median([c[p + "_s"] for c in parts])) for p in CALL_PARTS}
                                        if parts else None)
                records.append(rec)
                print(f"  {budget_key}={ef}, {T} threads, {args.layers} layer(s): {rec['layer_ms']:.2f} ms per layer call, "
                      f"scanned {100 * rec['scanned_fraction']:.2f}%, recall@{args.top_k} {rec['recall_at_k']:.3f}, "
                      f"imbalance {rec['worker_imbalance'] or float('nan'):.2f}"
                      + (" (call ms: " + ", ".join(f"{k} {v:.3f}" for k, v in rec["call_parts_ms"].items()) + ")"
                         if rec["call_parts_ms"] else ""), file=sys.stderr, flush=True)
        del layers
    headers = ["keys / KV head", "budget", "threads", "layers", "layer call ms (median / p90)", "of it residual ms", "scanned %", f"recall@{args.top_k}",
               "ns per key x thread", "build s (kNN / graph / repair)", "index MiB"]
    rows = []
    for r in records:
        parts = "/".join(f"{r[k]:.2f}" if r[k] is not None else "-" for k in ("knn_s", "graph_s", "repair_s"))
        rows.append([r["keys"], "exact" if r[budget_key] is None else f"{budget_key}={r[budget_key]}", r["threads"], r["layers"],
                     f"{r['layer_ms']:.2f} / {r['layer_ms_p90']:.2f}",
                     (f"{r['residual_ms']:.2f} (exact, last {r['residual_refresh']} keys)" if r["residual_on"] == "device"
                      else f"{r['residual_ms']:.2f} ({r['residual_samples']} draws)") if r["residual_samples"] else "—",
                     f"{100 * r['scanned_fraction']:.2f}", f"{r['recall_at_k']:.3f}", f"{r['ns_per_key_thread']:.0f}",
                     f"{r['build_s']:.2f} ({parts})",
                     f"{r['memory_bytes'] / 2**20:.0f}"])
    table = markdown_table(headers, rows)
    info = machine_info()
    text = (f"Command: `{command_line(['bench', 'kernels'])}`  \nMachine: {machine_line(info)}; threads: {', '.join(map(str, thread_counts))}.\n\n"
            f"One layer call = search + attention of all {Hkv * group} query heads ({Hkv} KV heads, d {d}) for one "
            f"decode step; {args.layers} layer(s) called in turn at every step" + (f", with the residual estimate ({m_res} draws per head) in the same call; 'of it residual' = "
                              f"the median extra time over the same call without it" if m_res else "") + f".\n\n{table}\n")
    print(text)
    if args.json:
        write_json(args.json, {"machine": info, "command": command_line(["bench", "kernels"]), "records": records})
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(text)
    return 0
