"""Estimate of the attention over the CPU keys that retrieval did *not* return (the "residual").

Retrieval attention computes softmax attention over the static tokens and the top-k retrieved keys only;
the probability mass of every other key is dropped. On models whose attention is diffuse in some layers
this drop shifts the output (SmolLM2-135M at 4K: exact top-100, top-400 too, loses needles that full
attention finds; keeping layers 15-22 dense, or this estimate, recovers them — docs/RESULTS.md).

The estimate: draw ``m`` key ids from the ``n`` keys of the store, one uniformly inside each of ``m`` equal
strata of positions (stratified sampling: every key is drawn with probability ``m / n``, and the draws cover
the whole context, which lowers the variance where neighbouring tokens have similar scores); a draw that hits
a retrieved id contributes nothing, any other contributes ``exp(s) v`` with weight ``n / m``. That is an
unbiased estimate of the numerator and of the denominator of the residual's softmax (each sum over the
non-retrieved keys), returned as a partial attention ``(out, lse)`` whose ``lse`` carries the weight, so
:func:`retrieval_attention.attention.merge.merge_partial` merges it with the other parts exactly like a real
partial result. When ``n <= k + m`` the residual is small enough to be computed exactly (weight 1, no draw).

Draws are deterministic: a splitmix64 stream seeded from ``(seed, n, KV head, query)``, so greedy decoding
stays reproducible and independent of thread scheduling. The query heads of one KV head share its draws (each
head's estimate stays unbiased; the kernel reads every drawn key and value row once for the whole GQA group:
the residual's random reads, its whole cost, shrink by the group size). Give each layer its own ``seed`` (the cache does:
the configured seed mixed with the layer index): with one seed for all layers every layer would draw the same
positions, and a region they all miss would be missed everywhere at once.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..index.kernels import _dot, prefetch_rows_ahead
from .residual_kernels import _draw, _finish, _row, _seed, draw_ids  # noqa: F401 (draw_ids: API)


@njit(parallel=True, nogil=True, cache=True)
def residual_attention(keys, values, queries, kv_of_head, topk_ids, n, m, scaling, seed, out, lse, n_split, merge,
                       lo=-1):
    """Residual estimate for every (query head, query).

    keys / values ``[Hkv, >= n, D]`` float32 or uint16 (bfloat16 bits); queries ``[Hq, L, D]`` float32;
    kv_of_head ``[Hq]`` int64; topk_ids ``[Hq, L, k]`` int64 (the retrieved ids, -1 padding, any order).
    Writes out ``[Hq, L, Dv]`` float32 and lse ``[Hq, L]`` float32 (-inf and 0 when nothing contributes);
    with ``merge`` they hold the retrieved partial on entry and the residual is merged into it (the
    log-sum-exp merge of :func:`~retrieval_attention.attention.merge.merge_partial`, float64 here).

    Parallel over (KV head, query, split): the query heads of one KV head share its draws, so every drawn key
    and value row is read from memory once for the whole group (the loop is bound by those random reads);
    ``n_split`` cuts each (KV head, query)'s draws into that many contiguous ranges (more tasks than KV heads),
    whose partial sums are combined exactly (max-subtracted) in a second pass; the decode path passes
    :data:`RESIDUAL_SPLIT` (1: measured not to pay on a 16-core host). ``lo >= 0``: no draws, the exact
    attention over the non-retrieved ids ``lo..n-1`` instead (the keys a device sample drawn at ``n = lo``
    does not cover, :mod:`.residual_device`).
    """
    Hq, L, D = queries.shape
    Hkv = keys.shape[0]
    Dv = values.shape[2]
    k = topk_ids.shape[2]
    exact = n <= k + m or lo >= 0
    base = max(lo, 0)
    cnt = (n - base) if exact else m
    weight = 1.0 if exact else n / m
    S = max(1, min(n_split, cnt))
    P = Hkv * L
    SP = S if S > 1 else 0  # partial sums are only kept when the draws are split
    p_mx = np.full((SP, Hq, L), -np.inf)
    p_z = np.zeros((SP, Hq, L))
    p_acc = np.empty((SP, Hq, L, Dv))
    for task in prange(P * S):
        p = task // S
        sp = task - p * S
        kv = p // L
        i = p - kv * L
        heads = np.nonzero(kv_of_head == kv)[0]  # the query heads sharing this KV head's draws
        G = heads.shape[0]
        if G == 0:
            continue
        t0 = sp * cnt // S
        nt = (sp + 1) * cnt // S - t0
        taken = np.empty((G, k), np.int64)
        for g in range(G):
            taken[g] = np.sort(topk_ids[heads[g], i])
        ids = np.empty(nt, np.int64)
        if exact:
            for t in range(nt):
                ids[t] = base + t0 + t
        else:
            st0 = _seed(seed, n, kv, i)
            for t in range(nt):
                ids[t] = _draw(st0, t0 + t, n, m)
        vb = np.empty(Dv, np.float32)
        s = np.empty((G, nt), np.float64)
        keep = np.zeros((G, nt), np.bool_)
        any_keep = np.zeros(nt, np.bool_)
        mx = np.full(G, -np.inf)
        for t in range(nt):
            prefetch_rows_ahead(keys, kv, ids, t, nt)  # the draws are random rows (bound by DRAM latency)
            j = ids[t]
            for g in range(G):
                pos = np.searchsorted(taken[g], j)
                if pos < k and taken[g, pos] == j:
                    continue
                # the search's dot: float32 sums, vectorised (a float64 chain made this loop compute-bound)
                s[g, t] = _dot(queries[heads[g], i], keys, kv, j) * scaling
                keep[g, t] = True
                any_keep[t] = True
                if s[g, t] > mx[g]:
                    mx[g] = s[g, t]
        acc = np.zeros((G, Dv), np.float64)
        z = np.zeros(G, np.float64)
        for t in range(nt):
            prefetch_rows_ahead(values, kv, ids, t, nt)
            if not any_keep[t]:
                continue
            _row(values, kv, ids[t], vb)
            for g in range(G):
                if not keep[g, t]:
                    continue
                w = np.exp(s[g, t] - mx[g])
                z[g] += w
                for c in range(Dv):
                    acc[g, c] += w * vb[c]
        for g in range(G):
            h = heads[g]
            if S == 1:  # the whole estimate is here: write it (no second pass)
                _finish(out, lse, h, i, mx[g], z[g], acc[g], weight, merge)
                continue
            p_mx[sp, h, i] = mx[g]
            p_z[sp, h, i] = z[g]
            for c in range(Dv):
                p_acc[sp, h, i, c] = acc[g, c]
    if S > 1:
        for p in prange(Hq * L):
            h = p // L
            i = p - h * L
            mx = -np.inf
            for sp in range(S):
                mx = max(mx, p_mx[sp, h, i])
            z = 0.0
            acc = np.zeros(Dv)
            if mx > -np.inf:
                for sp in range(S):
                    if p_mx[sp, h, i] == -np.inf:
                        continue
                    f = np.exp(p_mx[sp, h, i] - mx)
                    z += f * p_z[sp, h, i]
                    for c in range(Dv):
                        acc[c] += f * p_acc[sp, h, i, c]
            _finish(out, lse, h, i, mx, z, acc, weight, merge)


def residual_attention_ref(keys, values, queries, kv_of_head, topk_ids, n, m, scaling, seed, lo=None):
    """Plain numpy version of :func:`residual_attention` (same draws; ``lo``: the exact residual over ids
    ``lo..n-1``). Arrays as there (float32 keys/values)."""
    from ..index.bf16 import as_float32

    keys, values = as_float32(keys), as_float32(values)
    Hq, L, D = queries.shape
    k = topk_ids.shape[2]
    exact = n <= k + m or lo is not None
    out = np.zeros((Hq, L, values.shape[2]), np.float32)
    lse = np.full((Hq, L), -np.inf, np.float32)
    buf = np.empty(max(m, 1), np.int64)
    for h in range(Hq):
        for i in range(L):
            if exact:
                ids = np.arange(0 if lo is None else lo, n)
            else:
                draw_ids(seed, n, kv_of_head[h], i, m, buf)  # the heads of a KV head share its draws
                ids = buf[:m].copy()
            ids = ids[~np.isin(ids, topk_ids[h, i])]
            if len(ids) == 0:
                continue
            s = keys[kv_of_head[h], ids].astype(np.float64) @ queries[h, i].astype(np.float64) * scaling
            mx = s.max()
            w = np.exp(s - mx)
            out[h, i] = (w @ values[kv_of_head[h], ids].astype(np.float64)) / w.sum()
            lse[h, i] = mx + np.log(w.sum() * (1.0 if exact else n / m))
    return out, lse


#: splits of each (KV head, query)'s draws in the decode path. Splitting to one task per thread (16 tasks
#: instead of 8 for an 8B model on 16 cores) measured slower on the H200 host (0.32 vs 0.28 ms per layer:
#: the combine pass and per-task setup cost more than the idle threads), so the draws stay whole
RESIDUAL_SPLIT = 1


def _kernel_rows(a: np.ndarray) -> np.ndarray:
    """Key / value rows as the compiled kernels read them: float32 or uint16 bfloat16 bits (float16 is widened)."""
    return a.astype(np.float32) if a.dtype == np.float16 else a


def _run_kernel(keys, values, queries, kv_of_head, topk_ids, n, m, scaling, seed, out, lse, merge: bool,
                lo: int | None = None) -> None:
    """:func:`residual_attention` with its inputs made contiguous and typed (float16 keys / values widened to
    float32), :data:`RESIDUAL_SPLIT` splits."""
    keys, values = _kernel_rows(keys), _kernel_rows(values)
    residual_attention(keys, values, np.ascontiguousarray(queries, np.float32), np.ascontiguousarray(kv_of_head, np.int64),
                       np.ascontiguousarray(topk_ids, np.int64), int(n), int(m), float(scaling), int(seed), out, lse,
                       RESIDUAL_SPLIT, merge, -1 if lo is None else int(lo))


def _nothing_to_estimate(n: int, m: int, lo: int | None) -> bool:
    return n <= (0 if lo is None else lo) or (lo is None and m <= 0)


def estimate_residual(keys, values, queries, kv_of_head, topk_ids, n: int, m: int, scaling: float, seed: int = 0,
                      lo: int | None = None):
    """Compiled residual estimate (see the module docstring); returns ``out [Hq, L, Dv] float32, lse [Hq, L]``.
    ``lo``: the exact attention over the non-retrieved ids ``lo..n-1`` instead of draws."""
    Hq, L, _ = queries.shape
    out = np.empty((Hq, L, values.shape[2]), np.float32)
    lse = np.empty((Hq, L), np.float32)
    if _nothing_to_estimate(n, m, lo):
        out[:] = 0
        lse[:] = -np.inf
        return out, lse
    _run_kernel(keys, values, queries, kv_of_head, topk_ids, n, m, scaling, seed, out, lse, merge=False, lo=lo)
    return out, lse


def add_residual_into(out, lse, keys, values, queries, kv_of_head, topk_ids, n: int, m: int, scaling: float,
                      seed: int = 0, lo: int | None = None) -> None:
    """Merge the residual estimate into a retrieved partial in place: ``out [Hq, L, Dv]`` / ``lse [Hq, L]``
    float32 C-contiguous (the attention over the retrieved ``topk_ids``) become the attention over retrieved +
    residual, as ``merge_partial(out, lse, *estimate_residual(...))`` but in the same compiled call."""
    if _nothing_to_estimate(n, m, lo):
        return
    if out.dtype != np.float32 or lse.dtype != np.float32 or not (out.flags.c_contiguous and lse.flags.c_contiguous):
        raise ValueError("add_residual_into: out and lse must be C-contiguous float32 arrays")
    _run_kernel(keys, values, queries, kv_of_head, topk_ids, n, m, scaling, seed, out, lse, merge=True, lo=lo)
