"""Index recall vs scanned keys on real model vectors (``retrieval-attention bench recall``).

For each layer of a captured model run (see :mod:`.capture`), the keys the method offloads (all prompt keys
except the first ``--sink`` and the last ``--window``; ids are relative to that set) are indexed per layer by
every requested index, trained with the prefill queries (evenly subsampled to ``--max-train-queries`` per
head, as retrieval decoding does) and searched with the decode queries, which are out-of-distribution for
the keys. Each index is swept over its search budget (``ef`` for roar/hnsw, ``nprobe`` for ivf) and compared
with exact top-k (``flat``'s oracle):

* ``recall_at_100`` / ``recall_at_10``: overlap of the returned top-100 (its first 10) with the exact top-100
  (top-10), averaged over layers, query heads and decode queries; ``worst_recall_at_100`` is the lowest
  (layer, query head) average
* ``scanned_fraction``: inner products computed / keys indexed, as the index reports them (``ivf`` does not
  count its ``nlist`` coarse-centroid products; ``scanned_fraction_with_centroids`` adds them)
* ``search_us_per_head``: wall time of the batched per-layer ``search`` call / (query heads x queries)
* ``build_s`` / ``memory_bytes``: per layer (all KV heads of the layer), averaged
* ``attn_rel_error`` (when values were captured): ``|o - o_full| / |o_full|`` of the attention output over
  sink + window (+ decoded tokens) + the retrieved keys vs full attention over all tokens
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TOP_K = 100
TOP_K_SMALL = 10
SECTION = "Index recall"
DEFAULT_INDEXES = "roar,hnsw,ivf,flat"
# sweeps by budget parameter name; roar's beam ``ef`` may be smaller than k
DEFAULT_BUDGETS = {
    "ef": [16, 24, 32, 48, 64, 100, 128, 160, 200, 256, 384, 512, 768, 1024],
    "nprobe": [1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128],
}
QUICK_BUDGETS = {
    "ef": [32, 64, 100, 200, 512],
    "nprobe": [4, 8, 16, 32, 64],
}
# per index name, overriding the above: faiss hnsw searches with efSearch = max(ef, k), so ef < k = 100 repeats ef = k
INDEX_BUDGETS = {"hnsw": {"ef": [100, 128, 160, 200, 256, 384, 512, 768, 1024]}}
QUICK_INDEX_BUDGETS = {"hnsw": {"ef": [100, 128, 256, 512]}}
QUICK_CONTEXT = 4096
QUICK_LAYERS = 6
QUICK_N_DECODE = 16
SUMMARY_FRACTIONS = (0.08, 0.10)


# ---------------------------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------------------------
def recall_per_query(approx_ids, exact_ids, n_keys: int):
    """Recall of ``approx_ids [..., k]`` against ``exact_ids [..., k]`` per query row (``-1`` ids ignored).

    Duplicate ids in ``approx_ids`` count once. The denominator is the number of valid exact ids.
    """
    import numpy as np

    a = np.asarray(approx_ids).reshape(-1, np.shape(approx_ids)[-1])
    e = np.asarray(exact_ids).reshape(-1, np.shape(exact_ids)[-1])
    rows = a.shape[0]
    if e.shape[0] != rows:
        raise ValueError(f"approx ids have {rows} rows, exact ids {e.shape[0]}")
    if (a >= n_keys).any() or (e >= n_keys).any():
        raise ValueError(f"ids out of range for {n_keys} keys")
    hit = np.zeros((rows, n_keys + 1), dtype=bool)  # column n_keys absorbs the -1 pads
    r = np.arange(rows)[:, None]
    hit[r, np.where(a < 0, n_keys, a)] = True
    ev = e >= 0
    found = hit[r, np.where(ev, e, n_keys)] & ev
    denom = np.maximum(ev.sum(-1), 1)
    return (found.sum(-1) / denom).reshape(np.shape(exact_ids)[:-1])


class AttentionReference:
    """Full attention of the decode queries of one layer, and the error of attention over a key subset.

    Decode step ``t`` attends to positions ``0 .. n+t`` (prompt keys, then the decoded keys). The retrieval
    method keeps ``[0, sink)`` and ``[n - window, n + t]`` on the device and retrieves from ``[sink, n - window)``.
    """

    def __init__(self, lv, sink: int, window: int) -> None:
        import torch

        if lv.values is None:
            raise ValueError("the capture has no values")
        Hkv, n, d = lv.keys.shape
        Hq, T, _ = lv.decode_queries.shape
        self.G = Hq // Hkv
        self.n, self.T, self.sink, self.lo, self.hi = n, T, sink, sink, n - window
        nk = lv.new_keys if lv.new_keys is not None and lv.new_keys.shape[1] >= T else None
        K = lv.keys if nk is None else _cat(lv.keys, nk[:, :T])
        V = lv.values if nk is None else _cat(lv.values, lv.new_values[:, :T])
        self.N = K.shape[1]
        scale = lv.scaling if lv.scaling is not None else d**-0.5
        self.K = torch.from_numpy(K).double()
        self.V = torch.from_numpy(V).double()
        q = torch.from_numpy(lv.decode_queries).double().reshape(Hkv, self.G * T, d)
        self.S = torch.bmm(q, self.K.transpose(1, 2)).mul_(scale).reshape(Hq, T, self.N)
        pos = torch.arange(self.N)
        t = torch.arange(T)[:, None]
        causal = pos[None, :] <= (n + t)  # [T, N]; all prompt keys, decoded keys up to step t
        self.causal = causal
        self.static = causal & ((pos[None, :] < sink) | (pos[None, :] >= self.hi))
        self.full = self._attend(causal.expand(Hq, T, self.N))
        self.full_norm = self.full.norm(dim=-1).clamp_min(1e-30)

    def _attend(self, mask):
        import torch

        Hq, T = mask.shape[:2]
        s = self.S.masked_fill(~mask, -math.inf)
        p = torch.softmax(s, dim=-1).reshape(-1, self.G * T, self.N)
        return torch.bmm(p, self.V).reshape(Hq, T, -1)

    def rel_error(self, ids):
        """Relative error per (query head, step) of attention over static + ``ids`` (relative to the indexed set)."""
        import numpy as np
        import torch

        ids = np.asarray(ids)
        Hq, T, k = ids.shape
        mask = self.static.expand(Hq, T, self.N).clone()
        pos = torch.from_numpy(np.where(ids >= 0, ids + self.lo, self.N)).long()
        ext = torch.cat([mask, torch.zeros(Hq, T, 1, dtype=torch.bool)], -1)
        ext.scatter_(-1, pos, True)
        mask = ext[..., : self.N] & self.causal
        out = self._attend(mask)
        return ((out - self.full).norm(dim=-1) / self.full_norm).numpy()


def _cat(a, b):
    import numpy as np

    return np.ascontiguousarray(np.concatenate([a, b], axis=1))


def subsample_rows(x, m: int):
    """``x [H, n, d]`` evenly subsampled to at most ``m`` positions along axis 1."""
    import numpy as np

    return np.ascontiguousarray(x[:, subsample_positions(x.shape[1], m)])


def subsample_positions(n: int, m: int):
    """The positions :func:`subsample_rows` keeps of ``n`` (all when ``m <= 0`` or ``n <= m``): the cache's own
    :func:`~retrieval_attention.cache.train_positions`, as int64 numpy."""
    import numpy as np

    from ..cache import train_positions

    if m <= 0 or n <= m:
        return np.arange(n)
    return train_positions(n, m).numpy()


def capture_rope(capture) -> dict:
    """Layer -> RoPE inverse frequencies of a capture's model: from its metadata, or for captures made before it
    recorded them, from the configuration of the model it names (no weights loaded); {} when neither works."""
    import torch

    got = capture.meta.get("rope_inv_freq")
    if got:
        return {int(k): torch.tensor(v, dtype=torch.float32) for k, v in got.items()}
    name = capture.meta.get("model")
    if not name:
        return {}
    try:
        import transformers as tf

        from ..models import resolve_model_source
        from ..rope import rope_inv_freq_from_config

        src, gguf = resolve_model_source(name)
        cfg = tf.AutoConfig.from_pretrained(src, **({"gguf_file": gguf} if gguf else {}))
        return {i: f for i, f in rope_inv_freq_from_config(cfg).items() if f is not None}
    except Exception as e:  # noqa: BLE001 - an unreadable model: the training queries stay as captured
        _log(f"recall: no RoPE frequencies for {name} ({type(e).__name__}: {e}); training queries not aligned")
        return {}


# ---------------------------------------------------------------------------------------------------------------
# benchmark
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class IndexSpec:
    label: str
    name: str
    params: dict[str, Any]
    budget_param: str | None
    budgets: list[Any]  # values of budget_param; [None] = the index's default


@dataclass
class _Acc:
    recall100: list = field(default_factory=list)  # per layer: [Hq] mean over queries
    recall10: list = field(default_factory=list)
    scanned: list = field(default_factory=list)  # per layer: mean fraction
    search_s: list = field(default_factory=list)  # per layer: seconds of the batched call
    build_s: list = field(default_factory=list)
    memory: list = field(default_factory=list)
    attn_err: list = field(default_factory=list)  # per layer: [Hq]
    n_indexed: list = field(default_factory=list)
    layers: list = field(default_factory=list)
    centroids: list = field(default_factory=list)  # coarse-quantizer products per query (ivf), else None


def resolve_specs(index_arg: str, budget_args: list[str] | None, quick: bool, strict: bool, warn=print):
    """Index specs with their budget sweeps. Unknown index names raise (``strict``) or are skipped with a warning."""
    from ..index import INDEX_REGISTRY, available_indexes, make_index
    from .common import parse_index_spec, parse_value

    sweeps = {k: list(v) for k, v in (QUICK_BUDGETS if quick else DEFAULT_BUDGETS).items()}
    per_index: dict[str, dict[str, list]] = {}
    sweep_given: dict[str, bool] = {}  # a --budget PARAM=... sweep applies to every index, over INDEX_BUDGETS
    for b in budget_args or []:
        if "=" not in b:
            raise ValueError(f"--budget {b!r}: expected [index:]param=v1,v2,...")
        lhs, vals = b.split("=", 1)
        values = [parse_value(v) for v in vals.split(",") if v.strip()]
        if not values:
            raise ValueError(f"--budget {b!r}: no values")
        if ":" in lhs:
            iname, param = lhs.split(":", 1)
            per_index.setdefault(iname.strip(), {})[param.strip()] = values
        else:
            sweeps[lhs.strip()] = values
            sweep_given[lhs.strip()] = True
    specs = []
    for raw in [s for s in index_arg.split(",") if s.strip()]:
        name, params = parse_index_spec(raw)
        if name not in INDEX_REGISTRY:
            msg = f"index {name!r} is not registered (available: {', '.join(available_indexes())})"
            if strict:
                raise ValueError(msg)
            warn(f"warning: skipping {msg}")
            continue
        try:  # fail early, with the spec in the message, on unknown or invalid parameters
            make_index(name, **params)
        except (TypeError, ValueError) as e:
            raise ValueError(f"index spec {raw.strip()!r}: {e}") from e
        bp = tuple(INDEX_REGISTRY[name].budget_params)
        param = bp[0] if bp else None
        if param is None or (params.get("target_recall") is not None and not per_index.get(raw.strip())):
            budgets = [None]  # (roar:target_recall=...: its calibrated per-head widths; sweep by listing targets)
        else:
            defaults = (QUICK_INDEX_BUDGETS if quick else INDEX_BUDGETS).get(name, {})
            budgets = (per_index.get(raw.strip(), {}).get(param) or per_index.get(name, {}).get(param)
                       or (None if sweep_given.get(param) else defaults.get(param)) or sweeps.get(param))
            if not budgets:
                warn(f"warning: no sweep known for {name}'s budget {param!r}; using its default (pass --budget {param}=...)")
                budgets = [None]
        specs.append(IndexSpec(raw.strip(), name, params, param, list(budgets)))
    if not specs:
        raise ValueError(f"no registered index among {index_arg!r} (available: {', '.join(available_indexes())})")
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"duplicate index specs in {index_arg!r}")
    return specs


def _budget_kw(spec: IndexSpec, b) -> dict:
    return {} if (spec.budget_param is None or b is None) else {spec.budget_param: b}


def coarse_centroids(idx) -> int | None:
    """Centroid inner products per query of a faiss IVF-based index (its ``nlist``), ``None`` for other indexes.

    ``ivf``'s ``n_scanned`` counts only the keys of the probed lists; the coarse quantizer's ``nlist`` products
    are extra work per query (a few % of the keys at 8K tokens), needed for a fair comparison.
    """
    subs = getattr(idx, "_indexes", None)
    if not subs:
        return None
    nl = [int(ix.nlist) for ix in subs if hasattr(ix, "nlist")]
    return max(nl) if nl and len(nl) == len(subs) else None


def _warm_up(spec: IndexSpec, keys, train, queries) -> None:
    """Build + search once on a small slice so JIT compilation does not land in the first layer's timings."""
    from ..index import make_index

    n = min(keys.shape[1], 2048)
    idx = make_index(spec.name, **spec.params).build(keys[:, :n], None if train is None else train[:, :512])
    for b in spec.budgets:
        idx.search(queries[:, :2], min(TOP_K, n), **_budget_kw(spec, b))


def run_benchmark(
    capture,
    specs: list[IndexSpec],
    layers: list[int],
    sink: int = 128,
    window: int = 512,
    max_train_queries: int | None = None,
    attn_error: bool = True,
    progress: bool = True,
    extra: dict | None = None,
    search_repeats: int = 1,
    align_spread: int | None = None,
) -> list[dict]:
    """Evaluate every index spec x budget on every layer of ``capture``; returns one record per spec x budget.

    ``align_spread``: rotate the training queries to the decode position with targets spread over this many
    positions, as the retrieval cache does (:func:`retrieval_attention.rope.align_to_decode`); None: as captured."""
    import numpy as np
    from tqdm.auto import tqdm

    from ..index import make_index
    from ..index.flat import exact_topk
    from ..index.roar import auto_train_queries

    import torch

    meta = capture.meta
    attn_error = attn_error and capture.has_values
    rope = capture_rope(capture) if align_spread is not None else {}
    accs = {(s.label, b): _Acc() for s in specs for b in s.budgets}
    warmed: set[str] = set()
    n_train = n_queries = None
    bar = tqdm(total=len(layers) * len(specs), desc="recall", unit="index", disable=not progress)
    for L in layers:
        lv = capture.layer(L)
        Hkv, n, d = lv.keys.shape
        Hq, T, _ = lv.decode_queries.shape
        lo, hi = sink, n - window
        if hi - lo < 1:
            raise ValueError(f"context {n} leaves no keys to index with sink {sink} + window {window}")
        if T == 0:
            raise ValueError("the capture has no decode queries")
        keys = np.ascontiguousarray(lv.keys[:, lo:hi])
        mtq = auto_train_queries(lv.prefill_queries.shape[1]) if max_train_queries is None else max_train_queries
        where = subsample_positions(lv.prefill_queries.shape[1], mtq)
        train = np.ascontiguousarray(lv.prefill_queries[:, where])
        if align_spread is not None and L in rope:
            from ..rope import align_to_decode

            train = align_to_decode(torch.from_numpy(train), torch.from_numpy(where), n, rope[L], align_spread,
                                    seed=L).numpy()
        queries = lv.decode_queries
        n_idx = keys.shape[1]
        k = min(TOP_K, n_idx)
        exact_ids, _ = exact_topk(keys, queries, k, Hq // Hkv)
        ref = AttentionReference(lv, sink, window) if attn_error else None
        n_train, n_queries = train.shape[1], T
        for spec in specs:
            bar.set_postfix_str(f"layer {L} {spec.label}")
            if spec.label not in warmed:
                _warm_up(spec, keys, train, queries)
                warmed.add(spec.label)
            t0 = time.perf_counter()
            idx = make_index(spec.name, **spec.params).build(keys, train)
            build_s = time.perf_counter() - t0
            mem = int(idx.memory_bytes())
            ncent = coarse_centroids(idx)
            for b in spec.budgets:
                search_s = math.inf
                for _ in range(max(1, search_repeats)):  # the fastest of the repeats (shared machines are noisy)
                    t0 = time.perf_counter()
                    ids, _scores, n_scanned = idx.search(queries, k, **_budget_kw(spec, b))
                    search_s = min(search_s, time.perf_counter() - t0)
                ids = np.asarray(ids)
                if ids.shape != (Hq, T, k):
                    raise RuntimeError(f"{spec.label} returned ids of shape {ids.shape}, expected {(Hq, T, k)}")
                a = accs[(spec.label, b)]
                a.recall100.append(recall_per_query(ids, exact_ids, n_idx).mean(-1))
                kk = min(TOP_K_SMALL, k)
                a.recall10.append(recall_per_query(ids[..., :kk], exact_ids[..., :kk], n_idx).mean(-1))
                a.scanned.append(float(np.asarray(n_scanned).mean()) / n_idx)
                a.search_s.append(search_s)
                a.build_s.append(build_s)
                a.memory.append(mem)
                a.n_indexed.append(n_idx)
                a.layers.append(L)
                a.centroids.append(None if ncent is None else ncent / n_idx)
                if ref is not None:
                    a.attn_err.append(ref.rel_error(ids).mean(-1))
            del idx
            bar.update(1)
    bar.close()

    records = []
    for spec in specs:
        for b in spec.budgets:
            a = accs[(spec.label, b)]
            r100 = np.stack(a.recall100)  # [L, Hq]
            worst = np.unravel_index(int(np.argmin(r100)), r100.shape)
            Hq = r100.shape[1]
            rec = {
                "index": spec.label,
                "budget": b,
                "recall_at_100": float(r100.mean()),
                "recall_at_10": float(np.stack(a.recall10).mean()),
                "scanned_fraction": float(np.mean(a.scanned)),
                "scanned_fraction_with_centroids": (
                    float(np.mean(np.add(a.scanned, a.centroids))) if all(c is not None for c in a.centroids) else None
                ),
                "search_us_per_head": float(np.mean(a.search_s) * 1e6 / (Hq * n_queries)),
                "build_s": float(np.mean(a.build_s)),
                "memory_bytes": int(round(float(np.mean(a.memory)))),
                "worst_recall_at_100": float(r100[worst]),
                "worst_layer": int(a.layers[worst[0]]),
                "worst_head": int(worst[1]),
                "attn_rel_error": float(np.stack(a.attn_err).mean()) if a.attn_err else None,
                "attn_rel_error_worst": float(np.stack(a.attn_err).mean(-1).max()) if a.attn_err else None,
                "index_name": spec.name,
                "index_params": spec.params,
                "budget_param": spec.budget_param,
                "build_s_total": float(np.sum(a.build_s)),
                "per_layer_recall_at_100": {str(l): float(v) for l, v in zip(a.layers, r100.mean(-1))},
                "n_indexed": int(round(float(np.mean(a.n_indexed)))),
                "model": meta.get("model"),
                "context": int(meta.get("context", 0)),
                "layers": list(layers),
                "n_query_heads": int(Hq),
                "n_kv_heads": int(meta.get("n_kv_heads", 0)),
                "head_dim": int(meta.get("head_dim", 0)),
                "n_decode_queries": int(n_queries),
                "n_train_queries": int(n_train),
                "k": TOP_K,
                "sink": sink,
                "window": window,
                "search_repeats": max(1, search_repeats),
            }
            rec.update(extra or {})
            records.append(rec)
    return records


# ---------------------------------------------------------------------------------------------------------------
# reporting
# ---------------------------------------------------------------------------------------------------------------
def recall_at_scanned(records: list[dict], index: str, fraction: float, key: str = "scanned_fraction"):
    """recall@100 of ``index`` at ``fraction`` keys scanned, interpolated linearly in log(scanned) between the
    measured budgets; ``None`` when ``fraction`` is outside the measured range. ``key``: the scanned measure."""
    pts = sorted((r[key], r["recall_at_100"]) for r in records if r["index"] == index and r.get(key) is not None)
    pts = [p for p in pts if p[0] > 0]
    if not pts:
        return None
    if len(pts) == 1 or fraction < pts[0][0] * (1 - 1e-9) or fraction > pts[-1][0] * (1 + 1e-9):
        if len(pts) == 1 and abs(pts[0][0] - fraction) <= 1e-9 * fraction:
            return pts[0][1]
        return None
    import numpy as np

    xs = np.log([p[0] for p in pts])
    ys = np.array([p[1] for p in pts])
    # scanned fraction is not strictly monotone in the budget for every index: keep the best recall per x
    order = np.argsort(xs, kind="stable")
    xs, ys = xs[order], np.maximum.accumulate(ys[order])
    return float(np.interp(math.log(fraction), xs, ys))


def summary_rows(records: list[dict], fractions=SUMMARY_FRACTIONS) -> list[list]:
    """Per index: recall@100 at each scanned fraction, the worst head at the first budget scanning >= the last
    fraction, the best recall, build time and memory. Indexes whose records carry
    ``scanned_fraction_with_centroids`` get a second row, ``"<index> (+centroids)"``, on that measure."""
    from .common import fmt_float

    rows = []
    for label in dict.fromkeys(r["index"] for r in records):
        rs = [r for r in records if r["index"] == label]
        keys = ["scanned_fraction"]
        if all(r.get("scanned_fraction_with_centroids") is not None for r in rs):
            keys.append("scanned_fraction_with_centroids")
        for key in keys:
            cells = [label if key == "scanned_fraction" else f"{label} (+centroids)"]
            for f in fractions:
                v = recall_at_scanned(records, label, f, key)
                if v is not None:
                    cells.append(fmt_float(v))
                    continue
                # outside the measured range: show the nearest measured point instead
                lo = min(rs, key=lambda r: r[key])
                hi = max(rs, key=lambda r: r[key])
                if f < lo[key]:
                    cells.append(f"n/a; lowest: {fmt_float(lo['recall_at_100'])} @ {100 * lo[key]:.2f}%")
                else:
                    cells.append(f"n/a; highest: {fmt_float(hi['recall_at_100'])} @ {100 * hi[key]:.2f}%")
            above = sorted((r for r in rs if r[key] >= fractions[-1] * (1 - 1e-9)), key=lambda r: r[key])
            if above:
                w = above[0]
                b = "" if w["budget"] is None else f" {w['budget_param']}={w['budget']},"
                cells.append(f"{fmt_float(w['worst_recall_at_100'])} (L{w['worst_layer']} h{w['worst_head']};{b} "
                             f"{100 * w[key]:.1f}%)")
            else:
                cells.append("—")
            best = max(rs, key=lambda r: (r["recall_at_100"], -r[key]))
            cells += [
                f"{fmt_float(best['recall_at_100'])} @ {100 * best[key]:.1f}%",
                fmt_float(rs[0]["build_s"], 2),
                f"{rs[0]['memory_bytes'] / 2**20:.1f}",
            ]
            rows.append(cells)
    return rows


def markdown_report(records: list[dict]) -> str:
    from .common import fmt_float, markdown_table

    has_err = any(r.get("attn_rel_error") is not None for r in records)
    head = ["index", "budget", "recall@100", "recall@10", "worst r@100 (layer, head)", "scanned %", "µs / q-head",
            "build s / layer", "MiB / layer"]
    if has_err:
        head.append("attn rel. error")
    rows = []
    for r in records:
        b = "—" if r["budget"] is None else f"{r['budget_param']}={r['budget']}"
        row = [
            r["index"], b, fmt_float(r["recall_at_100"]), fmt_float(r["recall_at_10"]),
            f"{fmt_float(r['worst_recall_at_100'])} (L{r['worst_layer']}, h{r['worst_head']})",
            f"{100 * r['scanned_fraction']:.2f}", f"{r['search_us_per_head']:.1f}", fmt_float(r["build_s"], 2),
            f"{r['memory_bytes'] / 2**20:.2f}",
        ]
        if has_err:
            row.append(fmt_float(r.get("attn_rel_error"), 4))
        rows.append(row)
    pct = " / ".join(f"{100 * f:g}%" for f in SUMMARY_FRACTIONS)
    summary = markdown_table(
        ["index"] + [f"recall@100 at {100 * f:g}% scanned" for f in SUMMARY_FRACTIONS]
        + [f"worst head, first budget >= {100 * SUMMARY_FRACTIONS[-1]:g}%", "best recall@100", "build s / layer",
           "MiB / layer"],
        summary_rows(records),
    )
    return (
        f"Recall@100 at {pct} keys scanned (interpolated in log(scanned) between budgets; n/a = outside the "
        f"measured range, with the nearest measured point; '+centroids' also counts ivf's coarse-centroid "
        f"products as scanned):\n\n{summary}\n\nAll budgets:\n\n{markdown_table(head, rows)}\n"
    )


def plot_recall(records: list[dict], path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for label in dict.fromkeys(r["index"] for r in records):
        rs = sorted((r for r in records if r["index"] == label), key=lambda r: r["scanned_fraction"])
        x = [100 * r["scanned_fraction"] for r in rs]
        y = [r["recall_at_100"] for r in rs]
        (line,) = ax.plot(x, y, marker="o", ms=4, label=label)
        last_x = None
        for j, (r, xi, yi) in enumerate(zip(rs, x, y)):
            # label budgets sparsely (log-spaced along x, plus the last point) so overlapping curves stay legible
            if r["budget"] is None or not (last_x is None or xi >= 1.6 * last_x or j == len(rs) - 1):
                continue
            ax.annotate(str(r["budget"]), (xi, yi), textcoords="offset points", xytext=(3, -9), fontsize=6,
                        color=line.get_color())
            last_x = xi
        if all(r.get("scanned_fraction_with_centroids") is not None for r in rs):
            xc = [100 * r["scanned_fraction_with_centroids"] for r in rs]
            ax.plot(xc, y, ls="--", marker=".", ms=3, color=line.get_color(), alpha=0.7, label=f"{label} (+centroids)")
    for f in SUMMARY_FRACTIONS:
        ax.axvline(100 * f, color="0.85", lw=0.8, zorder=0)
    ax.set_xscale("log")
    ax.set_xlabel("keys scanned (% of indexed keys, log scale)")
    ax.set_ylabel("recall@100 vs exact top-100")
    ax.set_ylim(0, 1.02)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def docs_body(records: list[dict], command: str, machine: str, date: str) -> str:
    r0 = records[0]
    elapsed_s = r0.get("elapsed_s")
    layers = r0["layers"]
    lay = f"{len(layers)} layers ({', '.join(map(str, layers))})" if len(layers) <= 12 else f"{len(layers)} layers ({layers[0]}–{layers[-1]})"
    gen = r0.get("generated_text")
    lines = [
        f"Measured {date} on {machine}.",
        "",
        "```",
        command,
        "```",
        "",
        f"Model `{r0['model']}`, {r0['context']} prompt tokens (Paul Graham essays), {lay}; "
        f"{r0['n_query_heads']} query heads / {r0['n_kv_heads']} KV heads, head_dim {r0['head_dim']}. "
        f"Indexed per layer: the {r0['n_indexed']} keys between the {r0['sink']} sink and the last {r0['window']} "
        f"window tokens (all KV heads of the layer in one index). Training queries: {r0['n_train_queries']} prefill "
        f"queries per query head (evenly subsampled). Test queries: the {r0['n_decode_queries']} greedy decode steps "
        "after the prompt, every query head.",
        "",
        "Recall is measured against exact top-100 (`flat`), averaged over layers, query heads and decode queries; "
        "'worst' is the lowest (layer, query head) average. Scanned % = inner products computed / indexed keys, as "
        "each index counts them (roar/hnsw: distance computations of the beam search; ivf: keys of the probed "
        "lists, without the coarse-centroid products, which the '+centroids' rows add). "
        f"µs / q-head = wall time of the batched per-layer search / (query heads × decode queries), fastest of "
        f"{r0.get('search_repeats', 1)} run(s); the machine may be shared (see the load average above), so compare "
        "timings within one run. "
        "Build s and MiB are per layer (all KV heads). Attention relative error = ‖o − o_full‖ / ‖o_full‖ of "
        "attention over sink + window + decoded tokens + the 100 retrieved keys, vs full attention. "
        "Retrieval decoding keeps `RetrievalConfig.dense_layers` (layers 0 and 1 by default) exact; they are "
        "included here all the same (per-layer recall is in the JSON, `per_layer_recall_at_100`).",
        "",
        markdown_report(records).rstrip(),
    ]
    if elapsed_s is not None:
        cap = "cached" if r0.get("capture_cached") else "included"
        lines += ["", f"Total run time {elapsed_s:.0f} s (model capture {cap})."]
    if gen:
        lines += ["", f"Decoded continuation (greedy): `{gen.strip()[:120]!s}`".replace("\n", " ")]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2", help="embedded model name, .gguf file, local dir or hub id (default smollm2)")
    p.add_argument("--context", type=int, default=None, help=f"prompt tokens (default 8192; {QUICK_CONTEXT} with --quick)")
    p.add_argument("--n-decode", type=int, default=None,
                   help=f"greedy decode steps whose queries are the test queries (32; {QUICK_N_DECODE} with --quick)")
    p.add_argument("--device", default=None, help="device for the model capture (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default=None, help="model dtype for the capture (default float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--capture", default=None, metavar="PATH",
                   help="use this capture .npz instead of running the model (see retrieval_attention.bench.capture)")
    p.add_argument("--refresh-capture", action="store_true", help="re-run the model even if a cached capture exists")
    p.add_argument("--indexes", default=None,
                   help=f"comma-separated index specs, name[:param=value[:...]], e.g. 'roar:graph_per=kv_head' "
                        f"(default {DEFAULT_INDEXES}; unregistered defaults are skipped)")
    p.add_argument("--budget", action="append", default=None, metavar="[INDEX:]PARAM=V1,V2,...",
                   help="budget sweep, e.g. 'ef=16,32,64' or 'hnsw:ef=64,128' (repeatable; defaults: "
                        + "; ".join(f"{k}={','.join(map(str, v))}" for k, v in DEFAULT_BUDGETS.items())
                        + "; hnsw: ef from 100, since faiss uses max(ef, k))")
    p.add_argument("--layers", default=None, help="layers, e.g. '0,4,8-11' (default all; 6 evenly spaced with --quick)")
    p.add_argument("--sink", type=int, default=128, help="initial tokens kept on the device, not indexed (128)")
    p.add_argument("--window", type=int, default=512, help="recent tokens kept on the device, not indexed (512)")
    p.add_argument("--max-train-queries", type=int, default=None,
                   help="prefill queries per query head given to build() (default: RetrievalConfig's, 4,096 up to 32K "
                        "tokens, 8,192 at 128K: roar.auto_train_queries; 0 = all)")
    p.add_argument("--no-align", action="store_true",
                   help="train the indexes on the prefill queries as captured, not rotated to the decode position "
                        "(RetrievalConfig.align_train_queries=False)")
    p.add_argument("--align-spread", type=int, default=None,
                   help="positions the decode-phase targets of the training queries spread over (default: "
                        "RetrievalConfig's, 64)")
    p.add_argument("--search-repeats", type=int, default=None,
                   help="time each batched search this many times and keep the fastest (default 2; 1 with --quick)")
    p.add_argument("--no-attn-error", action="store_true", help="skip the attention-output error column")
    p.add_argument("--quick", action="store_true",
                   help=f"small subset: context {QUICK_CONTEXT}, {QUICK_N_DECODE} decode steps, {QUICK_LAYERS} layers, "
                        "fewer budgets")
    p.add_argument("--json", default=None, metavar="PATH", help="write the records as JSON")
    p.add_argument("--plot", default=None, metavar="PATH", help="write recall@100 vs %% scanned as PNG")
    p.add_argument("--markdown", default=None, metavar="PATH", help="write the markdown tables")
    p.add_argument("--update-docs", action="store_true", help=f"rewrite the '{SECTION}' section of docs/BENCHMARKS.md")
    p.add_argument("--docs", default=None, metavar="PATH", help="markdown file for --update-docs (default docs/BENCHMARKS.md)")
    p.add_argument("--from-json", default=None, metavar="PATH",
                   help="re-render the tables / plot / docs from a previous --json file instead of measuring")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _log(*a):
    print(*a, file=sys.stderr, flush=True)


REQUIRED_KEYS = ("index", "budget", "recall_at_100", "recall_at_10", "scanned_fraction", "search_us_per_head",
                 "build_s", "memory_bytes")


def load_records(path) -> list[dict]:
    """Records written by ``--json`` (validated), to re-render tables, plot and docs without measuring again."""
    import json

    recs = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(recs, list) or not recs or not all(isinstance(r, dict) for r in recs):
        raise ValueError(f"{path}: expected a non-empty JSON list of records")
    for r in recs:
        missing = [k for k in REQUIRED_KEYS + ("worst_recall_at_100", "layers", "context") if k not in r]
        if missing:
            raise ValueError(f"{path}: a record lacks {missing}; not written by 'bench recall --json'?")
    return recs


def _write_outputs(records: list[dict], args) -> None:
    """Print the markdown report and write --json / --plot / --markdown / --update-docs."""
    from .common import machine_info, machine_line, update_doc_section, write_json

    report = markdown_report(records)
    print(report)
    r0 = records[0]
    if args.json:
        write_json(args.json, records)
        _log(f"wrote {args.json}")
    if args.plot:
        plot_recall(records, args.plot, title=f"{r0.get('model')}, {r0['context']} tokens, {len(r0['layers'])} layers")
        _log(f"wrote {args.plot}")
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(report, encoding="utf-8")
        _log(f"wrote {args.markdown}")
    if args.update_docs:
        from .common import default_docs_path

        info = r0.get("machine") or machine_info()
        docs = Path(args.docs) if args.docs else default_docs_path()
        command = r0.get("command") or "(command not recorded)"
        update_doc_section(docs, SECTION, docs_body(records, command, machine_line(info), info.get("date", "?")))
        _log(f"updated the '{SECTION}' section of {docs}")


def run(args) -> int:
    from ..threads import configure_threads

    configure_threads()
    t_start = time.perf_counter()
    from ..config import RetrievalConfig
    from .capture import capture_model, load_capture
    from .common import command_line, evenly_spaced, machine_info, parse_int_list

    if args.from_json:
        try:
            records = load_records(args.from_json)
        except (OSError, ValueError) as e:
            _log(f"error: {e}")
            return 2
        _write_outputs(records, args)
        return 0
    progress = not args.no_progress
    context = args.context or (QUICK_CONTEXT if args.quick else 8192)
    n_decode = args.n_decode or (QUICK_N_DECODE if args.quick else 32)
    try:
        specs = resolve_specs(args.indexes or DEFAULT_INDEXES, args.budget, args.quick,
                              strict=args.indexes is not None, warn=_log)
    except ValueError as e:
        _log(f"error: {e}")
        return 2
    cached = False
    if args.capture:
        path = Path(args.capture)
        cached = True
    else:
        from .capture import capture_cache_path, effective_dtype

        # --quick records only the layers it evaluates; other runs record every layer (reusable by any --layers)
        cap_layers = None
        if args.quick:
            cap_layers = parse_int_list(args.layers) if args.layers else QUICK_LAYERS
        cpath = capture_cache_path(args.model, context, n_decode, effective_dtype(args.device, args.dtype), cap_layers)
        cached = cpath.exists() and not args.refresh_capture
        try:
            path = capture_model(args.model, context, n_decode, device=args.device, dtype=args.dtype,
                                 refresh=args.refresh_capture, progress=progress, log=_log, layers=cap_layers)
        except ValueError as e:
            _log(f"error: {e}")
            return 2
    try:
        cap = load_capture(path)
    except (ValueError, FileNotFoundError) as e:
        _log(f"error: {e}")
        return 2
    with cap:
        meta = dict(cap.meta)
        meta.setdefault("model", args.model if not args.capture else Path(args.capture).stem)
        if args.layers:
            layers = parse_int_list(args.layers)
            missing = [i for i in layers if i not in cap.layers]
            if missing:
                _log(f"error: layers {missing} are not in the capture (it has {cap.layers[0]}..{cap.layers[-1]})")
                return 2
        else:
            layers = list(cap.layers)
            types = meta.get("layer_types")
            if types:  # sliding-window layers keep only local keys: nothing is offloaded or retrieved there
                full = [i for i in layers if i < len(types) and types[i] != "sliding_attention"]
                if full and len(full) < len(layers):
                    _log(f"recall: skipping {len(layers) - len(full)} sliding-window layers (pass --layers to force)")
                    layers = full
            if args.quick:
                layers = evenly_spaced(layers, QUICK_LAYERS)
        mtq = args.max_train_queries if args.max_train_queries is not None else RetrievalConfig.max_train_queries
        spread = RetrievalConfig.align_spread if args.align_spread is None else args.align_spread
        n = int(meta["context"])
        if n - args.sink - args.window < 1:
            _log(f"error: context {n} leaves no keys to index with --sink {args.sink} + --window {args.window}")
            return 2
        _log(f"recall: {meta.get('model')} context {n}, layers {layers}, indexes "
             + ", ".join(f"{s.label}[{s.budget_param}={s.budgets}]" if s.budget_param else s.label for s in specs))
        try:
            records = run_benchmark(
                cap, specs, layers, sink=args.sink, window=args.window, max_train_queries=mtq,
                attn_error=not args.no_attn_error, progress=progress,
                extra={"model": meta.get("model"), "quick": bool(args.quick), "capture_file": str(path),
                       "capture": {k: meta[k] for k in ("load_s", "prefill_s", "decode_s", "dtype", "device") if k in meta}},
                search_repeats=args.search_repeats or (1 if args.quick else 2),
                align_spread=None if args.no_align else spread,
            )
        except ValueError as e:  # bad index parameters / budgets (IndexError_ is a ValueError)
            _log(f"error: {e}")
            return 2
    elapsed = time.perf_counter() - t_start
    info = machine_info()
    for r in records:
        r.update(elapsed_s=elapsed, capture_cached=cached, generated_text=meta.get("generated_text"), machine=info,
                 command=command_line(["bench", "recall"]))
    _write_outputs(records, args)
    _log(f"recall: done in {elapsed:.1f} s")
    return 0
