"""The decode hot path of ``roar`` in one compiled call: graph search + attention over the retrieved keys.

:func:`search_attend_batch` runs, for every (query head, query) pair of a layer in parallel, exactly the
beam search of :func:`.kernels.search_batch` (the same :func:`.kernels.search_pair`, so the same ids,
scores and scanned counts), then the softmax attention over the ``k`` keys it found:

    p_j = exp(scaling * s_j - m),  m = max_j scaling * s_j,  lse = m + log(sum_j p_j),
    out = sum_j p_j v_j / sum_j p_j

in float64 accumulators, written as float32 (``lse = -inf`` and ``out = 0`` where nothing was found).
Keys and values are float32 or uint16 arrays holding bfloat16 bits (read through
:func:`.kernels.elem`). Plain numpy references: :func:`retrieved_attention_ref` (attention over given
ids/scores, also the generic ``KVIndex.search_attend``) and :func:`.reference.beam_search_ref`.

Per-worker scratch (visited bitsets, O(n_keys / 64) words, and candidate heaps) is not allocated per call: it
comes from a process-wide pool (:func:`scratch`) shared by every index, grown to the largest index and
kept, so an index per layer does not each hold a copy.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import numpy as np
from numba import njit, prange

from .bf16 import as_float32
from .kernels import (CYCLE_COUNTER, _dot, _test_and_set, atomic_fetch_add, clear_visited, cycle_counter,  # noqa: F401 (CYCLE_COUNTER: re-exported)
                      cycles_per_second, elem, emit_results, prefetch_rows_ahead, search_pair, search_two,
                      visited_words)
from ..attention.residual_kernels import _finish, _row, draw_ids

#: initial capacity of a worker's candidate heap (entries); a search that needs more grows a private copy
CAND_INIT = 4096


@njit(parallel=True, nogil=True, cache=True)
def search_attend_batch(adj, keys, values, n_graph, n_total, queries, graph_of_head, kv_of_head, entries, k, L,
                        scaling, visited, cand_s, cand_i, out, out_lse, out_ns, out_ids, out_sc, order,
                        res_keys, res_n, res_m, res_seed, taken, out_worker, dynamic, partner, res_lo=-1,
                        L_of_head=None, out_cycles=None):
    """Fused top-``k`` search + attention of every (query head, query) pair of a layer.

    Inputs as :func:`.kernels.search_batch` (adj, keys, n_graph, n_total, queries [Hq, nq, d] float32,
    graph_of_head / kv_of_head [Hq] int64, entries, k, L = beam width ``ef``, worker scratch visited /
    cand_s / cand_i), plus values [Hkv, >= n_total, dv] float32 or uint16 (bfloat16 bits), row
    ``j`` = value of key id ``j``, and ``scaling`` (scores are ``scaling * q.key``).
    Writes out [Hq, nq, dv] float32, out_lse [Hq, nq] float32, out_ns [Hq, nq] int64, and the search
    results out_ids [Hq, nq, k] int64 / out_sc [Hq, nq, k] float32 exactly as ``search_batch`` would.

    ``order [Hq * nq]`` int64: the pairs (``h * nq + i``) from the most to the least expensive expected (see
    :func:`balanced_order`). ``dynamic`` False: worker ``t`` takes ranks ``t, 2T-1-t, 2T+t, ...`` (a snake:
    the costliest pair goes with the cheapest), so the slowest worker, which the call waits for, has less to
    do; True: workers take the next rank from a shared atomic counter as they become free (longest expected
    first, then whoever finishes first takes the next). ``out_worker [Hq * nq]`` int64 receives the worker
    that ran each pair. Any order and any assignment give the same results.

    Residual estimate (``res_m > 0``): each pair then merges the estimate of the attention over its
    non-retrieved keys into its result, exactly as :func:`~retrieval_attention.attention.residual.add_residual_into`
    does afterwards (same draws from ``(res_seed, res_n, KV head, query)``, same float64 sums: bit-identical
    results), in the same parallel call: no second thread launch per layer, and the draws spread over all
    pairs instead of one task per KV head. res_keys [Hkv, >= res_n, d] (float32 or bfloat16 bits) are the
    keys drawn from (ids ``0..res_n-1``), taken [T, >= ceil(res_n / 64)] uint64 per-worker bitsets, all
    zero on entry (left zero). ``res_m <= 0``: no estimate (res_keys / taken are not read). ``res_lo >= 0``:
    instead of draws, the exact attention over the non-retrieved ids ``res_lo..res_n-1`` (weight 1): the keys a
    device sample drawn at ``n = res_lo`` does not cover (:mod:`~retrieval_attention.attention.residual_device`).

    Shared passes (``partner [Hq]`` int64, -1 = none): a head ``h`` with ``partner[h] = b >= 0`` searches together
    with head ``b`` of the same graph in one pass (:func:`.kernels.search_two`, needs ``L >= k``); ``order`` then
    lists only the tasks, i.e. the pairs of heads without a partner or whose partner is a higher head, and the
    task of ``(h, i)`` also fills ``(b, i)`` (both report the pass's keys scanned). All -1 and ``order`` over
    every pair: separate searches.

    ``L_of_head [Hq]`` int64 (optional): a beam width per query head (each ``<= L``, which sizes the scratch;
    a shared pass uses the larger of its two heads').

    ``out_cycles [T, 3]`` int64 (optional, only where :data:`.kernels.CYCLE_COUNTER`): per worker the
    :func:`.kernels.cycle_counter` readings when it entered and left the parallel loop, and the cycles it spent
    in its tasks (search, attention, residual), for :func:`call_timing`.
    """
    Hq, nq, d = queries.shape
    dv = values.shape[2]
    P = Hq * nq
    T = visited.shape[0]
    M = adj.shape[2]
    next_pair = np.zeros(1, np.int64)  # rank in ``order`` of the next pair to hand out
    pairs = 0
    for h in range(Hq):
        if partner[h] >= 0:
            pairs += 1
    for t in prange(T):
        if out_cycles is not None:
            out_cycles[t, 0] = cycle_counter()
            busy = 0
        c_s = cand_s[t]
        c_i = cand_i[t]
        w_s = np.empty(L + 1, np.float64)
        w_i = np.empty(L + 1, np.int64)
        beam = np.empty(L + 1, np.uint64)
        r_s = np.empty(k + 1, np.float64)
        r_i = np.empty(k + 1, np.int64)
        qv = np.empty(d, np.float32)
        nbuf = np.empty(M, np.int64)
        sbuf = np.empty(M, np.float64)
        pw = np.empty(k, np.float64)
        acc = np.empty(dv, np.float64)
        vis = visited[t]
        if res_lo >= 0:  # the exact residual over ids res_lo..res_n-1
            r_exact, r_cnt, r_lo = True, max(0, res_n - res_lo), res_lo
        else:
            r_exact = res_n <= k + res_m
            r_cnt = max(0, res_n if r_exact else res_m) if res_m > 0 else 0
            r_lo = 0
        r_ids = np.empty(r_cnt, np.int64)
        r_sc = np.empty(r_cnt, np.float64)
        r_keep = np.empty(r_cnt, np.bool_)
        r_row = np.empty(dv, np.float32)
        ps = 1 if pairs == 0 else 0  # the partner's beam, result heap, scores and query (shared passes only)
        bb = np.empty(1 if ps else L + 1, np.uint64)
        rb_s = np.empty(1 if ps else k + 1, np.float64)
        rb_i = np.empty(1 if ps else k + 1, np.int64)
        sb = np.empty(1 if ps else M, np.float64)
        qb = np.empty(1 if ps else d, np.float32)
        r = 0
        while True:
            if dynamic:
                j = atomic_fetch_add(next_pair, 0, 1)
            else:
                j = r * T + (np.int64(t) if r % 2 == 0 else T - 1 - np.int64(t))
                r += 1
            if j >= order.shape[0]:
                break
            if out_cycles is not None:
                c_task = cycle_counter()
            p = order[j]
            out_worker[p] = t
            h = p // nq
            i = p - h * nq
            kv = kv_of_head[h]
            hb = partner[h]
            clear_visited(vis, n_graph)
            for c in range(d):
                qv[c] = queries[h, i, c]
            Lh = L if L_of_head is None else L_of_head[h]
            if hb < 0:
                nr, ns, c_s, c_i = search_pair(adj, keys, n_graph, n_total, qv, graph_of_head[h], kv, entries, k, Lh,
                                               vis, c_s, c_i, w_s, w_i, r_s, r_i, nbuf, sbuf, beam)
            else:
                for c in range(d):
                    qb[c] = queries[hb, i, c]
                if L_of_head is not None:
                    Lh = max(Lh, L_of_head[hb])
                nr, nrb, ns = search_two(adj, keys, n_graph, n_total, qv, qb, graph_of_head[h], kv, entries, k, Lh,
                                         vis, beam, bb, r_s, r_i, rb_s, rb_i, nbuf, sbuf, sb)
                out_worker[hb * nq + i] = t
                emit_results(rb_s, rb_i, nrb, k, out_ids, out_sc, hb, i)
                out_ns[hb, i] = ns
                _attend_one(values, kv, rb_s, rb_i, nrb, scaling, pw, acc, out, out_lse, hb, i)
                if r_cnt > 0:
                    _residual_one(res_keys, values, qb, kv, hb, i, rb_i, nrb, res_n, r_exact, r_cnt, scaling,
                                  res_seed, taken[t], r_ids, r_sc, r_keep, r_row, acc, out, out_lse, r_lo)
            emit_results(r_s, r_i, nr, k, out_ids, out_sc, h, i)
            out_ns[h, i] = ns
            _attend_one(values, kv, r_s, r_i, nr, scaling, pw, acc, out, out_lse, h, i)
            if r_cnt > 0:
                _residual_one(res_keys, values, qv, kv, h, i, r_i, nr, res_n, r_exact, r_cnt, scaling, res_seed,
                              taken[t], r_ids, r_sc, r_keep, r_row, acc, out, out_lse, r_lo)
            if out_cycles is not None:
                busy += cycle_counter() - c_task
        if out_cycles is not None:
            out_cycles[t, 1] = cycle_counter()
            out_cycles[t, 2] = busy


@njit(nogil=True, cache=True)
def _residual_one(keys, values, qv, kv, h, i, r_i, nr, n, exact, cnt, scaling, seed, taken, ids, sc, keep, row, acc,
                  out, out_lse, lo=0):
    """Residual estimate of pair (h, i) merged into ``out[h, i]`` / ``out_lse[h, i]``: the per-pair form of
    :func:`~retrieval_attention.attention.residual.residual_attention` (the same draws and float64 sums, in the
    same order). ``r_i[:nr]`` are the retrieved ids (excluded); ``taken`` a zeroed bitset, left zeroed.
    ``exact``: the ``cnt`` ids ``lo, lo + 1, ...`` with weight 1 instead of draws."""
    dv = values.shape[2]
    for r in range(nr):
        _test_and_set(taken, r_i[r])
    if exact:
        for t in range(cnt):
            ids[t] = lo + t
    else:
        draw_ids(seed, n, kv, i, cnt, ids)
    mx = -np.inf
    for t in range(cnt):
        prefetch_rows_ahead(keys, kv, ids, t, cnt)  # the draws are random rows
        j = ids[t]
        w = j >> 6
        keep[t] = ((taken[w] >> np.uint64(j & 63)) & np.uint64(1)) == np.uint64(0)
        if keep[t]:
            sc[t] = _dot(qv, keys, kv, j) * scaling
            if sc[t] > mx:
                mx = sc[t]
    for c in range(dv):
        acc[c] = 0.0
    z = 0.0
    for t in range(cnt):
        prefetch_rows_ahead(values, kv, ids, t, cnt)
        if not keep[t]:
            continue
        _row(values, kv, ids[t], row)
        wt = np.exp(sc[t] - mx)
        z += wt
        for c in range(dv):
            acc[c] += wt * row[c]
    for r in range(nr):  # leave the bitset zeroed for the next pair
        j = r_i[r]
        taken[j >> 6] = np.uint64(0)
    _finish(out, out_lse, h, i, mx, z, acc, 1.0 if exact else n / cnt, True)


def call_timing(before: int, after: int, cycles: np.ndarray) -> dict:
    """Where a fused call's time went, from :func:`.kernels.cycle_counter` readings ``before`` and ``after`` the
    call (taken by the caller) and the workers' ``cycles [T, 3]`` (see :func:`search_attend_batch`), in seconds:

    ``kernel_s``   the call, from before to after;
    ``start_s``    until the last worker entered the parallel loop (thread launch / wake-up);
    ``busy_max_s`` / ``busy_mean_s``  the busiest / the average worker's time in its tasks;
    ``join_s``     from the last worker leaving the loop to the call's return;
    ``idle_s``     ``kernel_s - start_s - busy_max_s - join_s``: the rest (per-worker setup, the busiest worker's
                   wait before it started, scheduling)."""
    rate = cycles_per_second()
    if rate <= 0 or cycles.shape[0] == 0:
        return {}
    sec = 1.0 / rate
    enter, leave, busy = zip(*cycles.tolist())  # plain ints: a few workers, once per layer call (numpy costs more)
    out = {"kernel_s": (after - before) * sec, "start_s": max(0.0, (max(enter) - before) * sec),
           "busy_max_s": max(busy) * sec, "busy_mean_s": sum(busy) / len(busy) * sec,
           "join_s": max(0.0, (after - max(leave)) * sec)}
    out["idle_s"] = max(0.0, out["kernel_s"] - out["start_s"] - out["busy_max_s"] - out["join_s"])
    return out


def balanced_order(cost: np.ndarray | None, P: int) -> np.ndarray:
    """Pair order for :func:`search_attend_batch`: ``cost [P]`` (e.g. each pair's keys scanned at the previous
    decode step, which stays similar from step to step) sorted high to low; ``None``: natural order."""
    if cost is None or len(cost) != P:
        return np.arange(P, dtype=np.int64)
    return np.argsort(-np.asarray(cost, np.float64), kind="stable").astype(np.int64)


def pair_partners(graph_of_head: np.ndarray) -> np.ndarray:
    """Partners for shared passes (:func:`search_attend_batch`): consecutive query heads searching the same graph
    are paired (heads 0-1, 2-3, ... of a GQA group; an odd one out keeps -1) -> ``partner [Hq]`` int64, symmetric."""
    goh = np.asarray(graph_of_head, np.int64)
    partner = np.full(len(goh), -1, np.int64)
    h = 0
    while h + 1 < len(goh):
        if goh[h] == goh[h + 1]:
            partner[h], partner[h + 1] = h + 1, h
            h += 2
        else:
            h += 1
    return partner


def task_plan(partner: np.ndarray, nq: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The tasks of a layer call with shared passes (fixed for a layer's heads: callers cache it):
    ``tasks [n]`` int64, the pairs ``h * nq + i`` of heads without a partner or paired with a higher head;
    ``mates [n]`` int64, the pair a task also fills (-1: none); ``filled_by_other [Hq * nq]`` bool, the pairs a
    task of their partner fills (their rows are loaded by that task's worker)."""
    partner = np.asarray(partner, np.int64)
    head = np.arange(len(partner))
    lead = np.nonzero((partner < 0) | (partner > head))[0]
    tasks = (lead[:, None] * nq + np.arange(nq)[None, :]).reshape(-1).astype(np.int64)
    mates = np.where(partner[tasks // nq] >= 0, partner[tasks // nq] * nq + tasks % nq, -1).astype(np.int64)
    filled_by_other = np.repeat((partner >= 0) & (partner < head), nq)
    return tasks, mates, filled_by_other


@njit(nogil=True, cache=True)
def order_tasks(tasks, mates, cost):
    """``tasks [n]`` int64 sorted by expected cost, high to low (stable): a task's cost is ``cost [P]`` (e.g.
    the previous call's keys scanned per pair) of its pair plus of its mate's (``mates [n]``, -1: none)."""
    n = tasks.shape[0]
    neg = np.empty(n, np.float64)
    for j in range(n):
        c = np.float64(cost[tasks[j]])
        if mates[j] >= 0:
            c += cost[mates[j]]
        neg[j] = -c
    return tasks[np.argsort(neg, kind="mergesort")]


def task_order(partner: np.ndarray, nq: int, cost: np.ndarray | None) -> np.ndarray:
    """The tasks of a layer call with shared passes, costliest first (as :func:`balanced_order`): the pairs
    ``h * nq + i`` of heads without a partner or paired with a higher head; a task's cost is its pairs' summed
    ``cost [Hq * nq]`` (previous call's keys scanned) -> ``order`` int64. (:func:`task_plan` +
    :func:`order_tasks`, for callers that cache the plan.)"""
    tasks, mates, _ = task_plan(partner, nq)
    if cost is None or len(cost) != len(partner) * nq:
        return tasks
    return order_tasks(tasks, mates, np.ascontiguousarray(cost))


def worker_loads(cost: np.ndarray, worker: np.ndarray, T: int) -> np.ndarray:
    """Per-worker sums of ``cost [P]`` (e.g. keys scanned per pair) given the worker that ran each pair
    (``worker [P]``, as :func:`search_attend_batch` reports it) -> ``[T]`` float64. A layer call lasts about as
    long as its most loaded worker: ``max / mean`` of this is the call's imbalance (1 = perfect)."""
    return np.bincount(np.asarray(worker, np.int64).reshape(-1), weights=np.asarray(cost, np.float64).reshape(-1),
                       minlength=T)[:T]


@njit(nogil=True, cache=True)
def worker_load_extremes(cost, skip, worker, T):
    """``(max, mean)`` over workers of :func:`worker_loads` with the pairs where ``skip [P]`` (bool) is set
    counted as 0 (a shared pass's second head: its rows were loaded by its task), in one compiled pass."""
    loads = np.zeros(T, np.float64)
    for j in range(cost.shape[0]):
        if not skip[j]:
            loads[worker[j]] += cost[j]
    return loads.max(), loads.sum() / T


@njit(fastmath={"reassoc", "contract", "nsz", "arcp"}, nogil=True, cache=True)
def _attend_one(values, kv, r_s, r_i, nr, scaling, pw, acc, out, out_lse, h, i):
    """Softmax attention of one query over the ``nr`` retrieved keys (scores r_s, ids r_i) of KV head kv."""
    dv = values.shape[2]
    if nr == 0:
        for c in range(dv):
            out[h, i, c] = 0.0
        out_lse[h, i] = -np.inf
        return
    m = scaling * r_s[0]
    for r in range(1, nr):
        m = max(m, scaling * r_s[r])
    tot = 0.0
    for r in range(nr):
        pw[r] = np.exp(scaling * r_s[r] - m)
        tot += pw[r]
    for c in range(dv):
        acc[c] = 0.0
    for r in range(nr):
        prefetch_rows_ahead(values, kv, r_i, r, nr)  # value rows are random reads
        row = r_i[r]
        w = pw[r]
        for c in range(dv):
            acc[c] += w * elem(values, kv, row, c)
    inv = 1.0 / tot
    for c in range(dv):
        out[h, i, c] = np.float32(acc[c] * inv)
    out_lse[h, i] = np.float32(m + np.log(tot))


@njit(parallel=True, nogil=True, cache=True)
def bf16_to_f32_kernel(bits):
    """uint16 bfloat16 bits [n] -> float32 [n] through the kernels' element reader (tests the bit cast)."""
    n = bits.shape[0]
    b3 = bits.reshape((1, 1, n))
    out = np.empty(n, np.float32)
    for j in prange(n):
        out[j] = elem(b3, 0, 0, j)
    return out


# ---------------------------------------------------------------------------------------------------
# numpy reference / generic path
# ---------------------------------------------------------------------------------------------------
def retrieved_attention_ref(scores: np.ndarray, ids: np.ndarray, values: np.ndarray, kv_of_head: np.ndarray,
                            scaling: float) -> tuple[np.ndarray, np.ndarray]:
    """Softmax attention over retrieved keys, plain numpy (float64 math), one query head at a time.

    scores [Hq, L, k] raw inner products (-inf pads), ids [Hq, L, k] int64 (-1 pads), values
    [Hkv, >= max id + 1, dv] float32/float16 or uint16 bfloat16 bits, kv_of_head [Hq] int.
    Returns out [Hq, L, dv] float32 (0 where nothing was retrieved) and lse [Hq, L] float32 (-inf there).
    """
    Hq, L, k = ids.shape
    dv = values.shape[2]
    out = np.zeros((Hq, L, dv), np.float32)
    lse = np.full((Hq, L), -np.inf, np.float32)
    for h in range(Hq):
        ok = ids[h] >= 0
        s = np.where(ok, scaling * scores[h].astype(np.float64), -np.inf)  # [L, k]
        m = s.max(axis=-1, initial=-np.inf)
        found = np.isfinite(m)
        p = np.exp(s - np.where(found, m, 0.0)[:, None])  # 0 at pads
        tot = p.sum(-1)
        v = as_float32(values[kv_of_head[h]][np.where(ok, ids[h], 0)]).astype(np.float64)  # [L, k, dv]
        o = np.einsum("lk,lkd->ld", p, v) / np.where(found, tot, 1.0)[:, None]
        out[h] = np.where(found[:, None], o, 0.0)
        lse[h] = np.where(found, m + np.log(np.where(found, tot, 1.0)), -np.inf)
    return out, lse


# ---------------------------------------------------------------------------------------------------
# per-worker scratch pool
# ---------------------------------------------------------------------------------------------------
class SearchScratch:
    """Scratch of ``T`` search workers: visited [T, ceil(n_vis / 64)] uint64 bitsets (one bit per graph node),
    taken [T, ceil(n_vis / 64)] uint64 bitsets (the residual's retrieved ids; kept all zero between uses)
    and candidate heaps cand_s [T, n_cand] float64 / cand_i [T, n_cand] int64."""

    def __init__(self, T: int, n_vis: int, n_cand: int) -> None:
        self.n_vis = n_vis
        self.visited = np.zeros((T, visited_words(n_vis)), np.uint64)
        self.taken = np.zeros((T, visited_words(n_vis)), np.uint64)
        self.cand_s = np.empty((T, n_cand), np.float64)
        self.cand_i = np.empty((T, n_cand), np.int64)

    def fits(self, T: int, n_vis: int, n_cand: int) -> bool:
        return self.visited.shape[0] >= T and self.n_vis >= n_vis and self.cand_s.shape[1] >= n_cand

    @property
    def nbytes(self) -> int:
        return self.visited.nbytes + self.taken.nbytes + self.cand_s.nbytes + self.cand_i.nbytes


_POOL: list[SearchScratch] = []
_POOL_LOCK = threading.Lock()


def borrow_scratch(T: int, n_vis: int, n_cand: int = CAND_INIT) -> SearchScratch:
    """Take scratch for ``T`` workers over ``n_vis`` graph nodes from the process-wide pool (one entry per
    concurrent search; an entry too small is replaced by one grown to cover both sizes); hand it back with
    :func:`return_scratch`. Slice ``[:T]`` before passing it to a kernel. (:func:`scratch` pairs the two.)"""
    with _POOL_LOCK:
        s = _POOL.pop() if _POOL else None
    if s is None or not s.fits(T, n_vis, n_cand):
        if s is not None:
            T, n_vis = max(T, s.visited.shape[0]), max(n_vis, s.n_vis)
            n_cand = max(n_cand, s.cand_s.shape[1])
        s = SearchScratch(T, max(1, n_vis), max(1, n_cand))
    return s


def return_scratch(s: SearchScratch) -> None:
    with _POOL_LOCK:
        _POOL.append(s)


@contextmanager
def scratch(T: int, n_vis: int, n_cand: int = CAND_INIT):
    """:func:`borrow_scratch` for the ``with`` block; yields a :class:`SearchScratch`."""
    s = borrow_scratch(T, n_vis, n_cand)
    try:
        yield s
    finally:
        return_scratch(s)


def pool_nbytes() -> int:
    """Bytes held by the idle scratch pool (for reporting)."""
    with _POOL_LOCK:
        return sum(s.nbytes for s in _POOL)
