"""The fused decode path: compiled search + attention vs the plain search kernel and numpy/torch references,
bfloat16 bit handling, ``KVIndex.search_attend`` and ``store.attend``."""

from __future__ import annotations

import numba
import numpy as np
import pytest
import torch

from retrieval_attention.attention.cpu import retrieved_attention
from retrieval_attention.index import decode_kernels as DK
from retrieval_attention.index import kernels as K
from retrieval_attention.index import make_index
from retrieval_attention.index.base import IndexError_
from retrieval_attention.index import reference as R
from retrieval_attention.index.bf16 import bf16_bits_to_f32, f32_to_bf16_bits, f32_to_bf16_bits_np, tensor_as_numpy

ATOL = 2e-5


def _random_graph(rng, G, n, M, cap):
    adj = np.full((G, cap, M), -1, np.int32)
    for g in range(G):
        for v in range(n):
            deg = rng.integers(0, M + 1)
            adj[g, v, :deg] = rng.choice(n, size=deg, replace=False)
    return adj


def _bits(x):
    return tensor_as_numpy(torch.from_numpy(x).to(torch.bfloat16))


# ---------------------------------------------------------------------------------------------------
# bfloat16 bits
# ---------------------------------------------------------------------------------------------------
def test_bf16_conversion_exact():
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    want = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).float().numpy()
    from retrieval_attention.index.bf16 import bf16_bits_to_f32_np

    got_np = bf16_bits_to_f32_np(bits)
    got_nb = DK.bf16_to_f32_kernel(bits)
    finite = np.isfinite(want) | np.isinf(want)
    np.testing.assert_array_equal(got_np.view(np.uint32), want.view(np.uint32))
    got_t = bf16_bits_to_f32(bits.reshape(256, 256)[:, ::2])  # strided input
    np.testing.assert_array_equal(got_t.view(np.uint32)[finite.reshape(256, 256)[:, ::2]],
                                  want.reshape(256, 256)[:, ::2][finite.reshape(256, 256)[:, ::2]].view(np.uint32))
    np.testing.assert_array_equal(got_nb[finite].view(np.uint32), want[finite].view(np.uint32))
    assert np.isnan(got_nb[~finite]).all()


@pytest.mark.parametrize("seed", [1, 2])
def test_f32_to_bf16_rounds_like_torch(seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(100_000) * np.exp(rng.uniform(-20, 20, 100_000))).astype(np.float32)
    # exact ties (the 16 dropped bits are 0x8000): round to even
    ties = (rng.integers(0, 0x7F00, 1000).astype(np.uint32) << 16 | 0x8000).view(np.float32)
    x = np.concatenate([x, ties, np.float32([0.0, -0.0, 1.0, -3.5])])
    want = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(f32_to_bf16_bits_np(x), want)  # the bit-level reference
    np.testing.assert_array_equal(f32_to_bf16_bits(x), f32_to_bf16_bits_np(x))
    np.testing.assert_array_equal(f32_to_bf16_bits(x[:101000].reshape(4, -1, 10)[:, ::2]), f32_to_bf16_bits_np(x[:101000].reshape(4, -1, 10)[:, ::2]))
    # bf16 -> f32 -> bf16 is the identity
    y = bf16_bits_to_f32(want)
    np.testing.assert_array_equal(f32_to_bf16_bits(y), want)


# ---------------------------------------------------------------------------------------------------
# the fused kernel
# ---------------------------------------------------------------------------------------------------
def _kernel_inputs(rng, graph_per, Hkv=2, group=3, n_graph=400, n_tail=17, d=16, dv=12, M=8, nq=5):
    n_total = n_graph + n_tail
    cap = n_total + 9  # capacity > n_total, like a grown store
    keys = np.zeros((Hkv, cap, d), np.float32)
    keys[:, :n_total] = rng.standard_normal((Hkv, n_total, d))
    values = np.zeros((Hkv, cap, dv), np.float32)
    values[:, :n_total] = rng.standard_normal((Hkv, n_total, dv))
    queries = rng.standard_normal((Hkv * group, nq, d)).astype(np.float32)
    G = Hkv * group if graph_per == "query_head" else Hkv
    adj = _random_graph(rng, G, n_graph, M, cap)
    entries = np.stack([rng.choice(n_graph, 2, replace=False) for _ in range(G)]).astype(np.int32)
    entries[0, 1] = -1
    kv_of_head = np.arange(Hkv * group) // group
    graph_of_head = np.arange(Hkv * group) if G == Hkv * group else kv_of_head
    return adj, keys, values, queries, entries, graph_of_head, kv_of_head, n_graph, n_total


def _run_search(adj, keys, n_graph, n_total, queries, goh, koh, entries, k, L, T=2):
    Hq, nq = queries.shape[:2]
    ids = np.empty((Hq, nq, k), np.int64)
    sc = np.empty((Hq, nq, k), np.float32)
    ns = np.empty((Hq, nq), np.int64)
    w = DK.SearchScratch(T, keys.shape[1], 4)
    K.search_batch(adj, keys, n_graph, n_total, queries, goh, koh, entries, k, L, w.visited, w.cand_s,
                   w.cand_i, ids, sc, ns)
    return ids, sc, ns


def _run_fused(adj, keys, values, n_graph, n_total, queries, goh, koh, entries, k, L, scaling, T=2, order=None,
               res_m=0, res_seed=0, dynamic=False, partner=None, res_lo=-1):
    Hq, nq = queries.shape[:2]
    if partner is None:
        partner = np.full(Hq, -1, np.int64)
    elif order is None:
        order = DK.task_order(partner, nq, None)
    out = np.empty((Hq, nq, values.shape[2]), np.float32)
    lse = np.empty((Hq, nq), np.float32)
    ids = np.empty((Hq, nq, k), np.int64)
    sc = np.empty((Hq, nq, k), np.float32)
    ns = np.empty((Hq, nq), np.int64)
    w = DK.SearchScratch(T, keys.shape[1], 3)  # tiny candidate heaps: grown inside
    w.visited[1] = np.uint64(2**64 - 1)  # dirty bits: the kernel clears them before each search
    for _ in range(2):  # reused scratch must not leak state between calls
        worker = np.full(Hq * nq, -1, np.int64)
        DK.search_attend_batch(adj, keys, values, n_graph, n_total, queries, goh, koh, entries, k, L, scaling,
                               w.visited, w.cand_s, w.cand_i, out, lse, ns, ids, sc,
                               DK.balanced_order(None, Hq * nq) if order is None else order,
                               keys, n_total, res_m, res_seed, w.taken, worker, dynamic, partner, res_lo)
        assert not w.taken.any()  # the residual's bitsets are left zeroed
        assert ((worker >= 0) & (worker < T)).all()  # every pair was run, by one of the T workers
    return out, lse, ns, ids, sc


@pytest.mark.parametrize("seed", [3, 4])
@pytest.mark.parametrize("graph_per", ["query_head", "kv_head"])
@pytest.mark.parametrize("storage", ["float32", "bfloat16"])
def test_fused_kernel_matches_search_and_reference(seed, graph_per, storage):
    rng = np.random.default_rng(seed)
    adj, keys, values, queries, entries, goh, koh, n_graph, n_total = _kernel_inputs(rng, graph_per)
    keys32, values32 = keys, values
    if storage == "bfloat16":  # the kernels read the bits; the references get their exact float32 values
        keys, values = _bits(keys), _bits(values)
        keys32, values32 = bf16_bits_to_f32(keys), bf16_bits_to_f32(values)
    scaling = 0.37
    for k, L in ((10, 10), (7, 25), (40, 40), (30, 6), (50, 1), (1000, 8)):  # k > n_total: padded results
        ids, sc, ns = _run_search(adj, keys, n_graph, n_total, queries, goh, koh, entries, k, L)
        out, lse, ns2, ids2, sc2 = _run_fused(adj, keys, values, n_graph, n_total, queries, goh, koh, entries, k, L,
                                              scaling)
        np.testing.assert_array_equal(ids2, ids)
        np.testing.assert_array_equal(sc2, sc)
        np.testing.assert_array_equal(ns2, ns)
        # any work order (the load balancing by last step's cost) gives the same results, odd thread counts too
        P = queries.shape[0] * queries.shape[1]
        for T, order, dyn in ((3, DK.balanced_order(rng.random(P), P), False),
                              (5, rng.permutation(P).astype(np.int64), False),
                              (4, DK.balanced_order(rng.random(P), P), True)):  # the atomic work counter
            o3, l3, ns3, ids3, sc3 = _run_fused(adj, keys, values, n_graph, n_total, queries, goh, koh, entries, k,
                                                L, scaling, T=T, order=order, dynamic=dyn)
            np.testing.assert_array_equal(ids3, ids)
            np.testing.assert_array_equal(ns3, ns)
            np.testing.assert_array_equal(o3, out)
            np.testing.assert_array_equal(l3, lse)
        # the search itself against the Python reference (on the float32 view of the stored keys)
        for h in (0, queries.shape[0] - 1):
            rid, rsc, rns = R.beam_search_ref(adj[goh[h]], keys32[koh[h]], n_graph, n_total, queries[h, 0],
                                              entries[goh[h]], k, L)
            np.testing.assert_array_equal(ids[h, 0], rid)
            assert ns[h, 0] == rns
        # attention against numpy (float64) and the torch path used before
        ro, rl = DK.retrieved_attention_ref(sc, ids, values, koh, scaling)
        np.testing.assert_allclose(out, ro, rtol=1e-5, atol=ATOL)
        np.testing.assert_allclose(lse, rl, rtol=1e-5, atol=ATOL)
        v = torch.from_numpy(values32[koh[:, None, None], np.maximum(ids, 0)])
        to, tl = retrieved_attention(sc, ids, v, scaling)
        np.testing.assert_allclose(out, to.numpy(), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(lse, tl.numpy(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("storage", ["float32", "bfloat16"])
@pytest.mark.parametrize("res_m", [0, 16])
def test_fused_shared_passes_match_reference(storage, res_m):
    """Shared passes (heads 0-1 of each group of 3; head 2 alone): each paired head gets exactly the shared-pass
    reference's results and keys scanned, every other head its separate search's, the attention over them equals
    numpy's, the residual estimate the separate residual's; any task order or worker count gives the same."""
    from retrieval_attention.attention.residual import add_residual_into

    rng = np.random.default_rng(12)
    adj, keys, values, queries, entries, goh, koh, n_graph, n_total = _kernel_inputs(rng, "kv_head")
    keys32 = keys
    if storage == "bfloat16":
        keys, values = _bits(keys), _bits(values)
        keys32 = bf16_bits_to_f32(keys)
    partner = DK.pair_partners(goh)
    np.testing.assert_array_equal(partner, [1, 0, -1, 4, 3, -1])
    Hq, nq = queries.shape[:2]
    for k, L in ((10, 10), (7, 25), (40, 40)):
        out, lse, ns, ids, sc = _run_fused(adj, keys, values, n_graph, n_total, queries, goh, koh, entries, k, L, 0.37,
                                           partner=partner, res_m=res_m, res_seed=5)
        sep_ids, _, sep_ns = _run_search(adj, keys, n_graph, n_total, queries, goh, koh, entries, k, L)
        for h in range(Hq):
            for i in range(nq):
                if partner[h] < 0:
                    np.testing.assert_array_equal(ids[h, i], sep_ids[h, i])
                    assert ns[h, i] == sep_ns[h, i]
                    continue
                a, b = min(h, partner[h]), max(h, partner[h])
                ra, rb, rns = R.beam_search_two_ref(adj[goh[h]], keys32[koh[h]], n_graph, n_total, queries[a, i],
                                                    queries[b, i], entries[goh[h]], k, L)
                np.testing.assert_array_equal(ids[h, i], (ra if h == a else rb)[0])
                assert ns[h, i] == rns
        ro, rl = DK.retrieved_attention_ref(sc, ids, values, koh, 0.37)
        if res_m:
            add_residual_into(ro, rl, keys, values, queries, koh, ids, n_total, res_m, 0.37, seed=5)
        np.testing.assert_allclose(out, ro, rtol=1e-5, atol=ATOL)
        np.testing.assert_allclose(lse, rl, rtol=1e-5, atol=ATOL)
        tasks = DK.task_order(partner, nq, None)
        assert len(tasks) == 4 * nq  # 2 groups x (one pair + one single) per query
        for T, order, dyn in ((3, DK.task_order(partner, nq, rng.random(Hq * nq)), False),
                              (4, rng.permutation(tasks).astype(np.int64), True)):
            o2, l2, ns2, ids2, _ = _run_fused(adj, keys, values, n_graph, n_total, queries, goh, koh, entries, k, L,
                                              0.37, T=T, order=order, dynamic=dyn, partner=partner, res_m=res_m,
                                              res_seed=5)
            np.testing.assert_array_equal(ids2, ids)
            np.testing.assert_array_equal(ns2, ns)
            np.testing.assert_array_equal(o2, out)
            np.testing.assert_array_equal(l2, lse)


@pytest.mark.parametrize("storage", ["float32", "bfloat16"])
@pytest.mark.parametrize("m", [16, 64, 5000])  # 5000: the store is small enough to be summed exactly
def test_fused_residual_equals_separate_residual(storage, m):
    from retrieval_attention.attention.residual import add_residual_into

    rng = np.random.default_rng(8)
    adj, keys, values, queries, entries, goh, koh, n_graph, n_total = _kernel_inputs(rng, "kv_head")
    if storage == "bfloat16":
        keys, values = _bits(keys), _bits(values)
    for k, L, T in ((10, 12, 2), (30, 6, 3), (40, 40, 5)):
        out, lse, ns, ids, _ = _run_fused(adj, keys, values, n_graph, n_total, queries, goh, koh, entries, k, L, 0.37,
                                          T=T)
        add_residual_into(out, lse, keys, values, queries, koh, ids, n_total, m, 0.37, seed=99)
        out2, lse2, ns2, ids2, _ = _run_fused(adj, keys, values, n_graph, n_total, queries, goh, koh, entries, k, L,
                                              0.37, T=T, res_m=m, res_seed=99)
        np.testing.assert_array_equal(ids2, ids)
        np.testing.assert_array_equal(ns2, ns)
        np.testing.assert_array_equal(out2, out)  # same draws, same float64 sums in the same order
        np.testing.assert_array_equal(lse2, lse)
        o0, l0, _, _, _ = _run_fused(adj, keys, values, n_graph, n_total, queries, goh, koh, entries, k, L, 0.37, T=T)
        assert not np.array_equal(o0, out2)  # the estimate did change the result


@pytest.mark.parametrize("storage", ["float32", "bfloat16"])
def test_fused_exact_tail_residual_equals_separate(storage):
    """res_lo (the device residual's CPU part): the exact residual over ids res_lo..n-1, as add_residual_into(lo=)
    merges it afterwards, bit for bit; nothing when res_lo = n."""
    from retrieval_attention.attention.residual import add_residual_into

    rng = np.random.default_rng(9)
    adj, keys, values, queries, entries, goh, koh, n_graph, n_total = _kernel_inputs(rng, "kv_head")
    if storage == "bfloat16":
        keys, values = _bits(keys), _bits(values)
    for k, L, lo in ((10, 12, n_total - 7), (30, 40, n_graph - 20), (10, 12, 0)):
        out, lse, ns, ids, _ = _run_fused(adj, keys, values, n_graph, n_total, queries, goh, koh, entries, k, L, 0.37)
        base = (out.copy(), lse.copy())
        add_residual_into(out, lse, keys, values, queries, koh, ids, n_total, 0, 0.37, lo=lo)
        out2, lse2, _, ids2, _ = _run_fused(adj, keys, values, n_graph, n_total, queries, goh, koh, entries, k, L,
                                            0.37, res_lo=lo)
        np.testing.assert_array_equal(ids2, ids)
        np.testing.assert_array_equal(out2, out)
        np.testing.assert_array_equal(lse2, lse)
        assert (lse2 >= base[1]).all() and (lse2 > base[1]).any()  # exact extra mass, never less
    plain = _run_fused(adj, keys, values, n_graph, n_total, queries, goh, koh, entries, 10, 12, 0.37)
    empty = _run_fused(adj, keys, values, n_graph, n_total, queries, goh, koh, entries, 10, 12, 0.37, res_lo=n_total)
    np.testing.assert_array_equal(empty[0], plain[0])  # res_lo = n: no keys to add
    np.testing.assert_array_equal(empty[1], plain[1])


def test_fused_kernel_empty_graph_gives_no_result():
    rng = np.random.default_rng(5)
    adj, keys, values, queries, entries, goh, koh, _, _ = _kernel_inputs(rng, "kv_head")
    entries[:] = -1  # nothing reachable, no tail
    out, lse, ns, ids, _ = _run_fused(adj, keys, values, 400, 400, queries, goh, koh, entries, 5, 5, 1.0)
    assert (ids == -1).all() and (ns == 0).all()
    assert np.isneginf(lse).all() and (out == 0).all()


def test_retrieved_attention_ref_matches_torch():
    rng = np.random.default_rng(6)
    Hkv, group, L, k, n, dv = 2, 2, 3, 9, 50, 7
    values = rng.standard_normal((Hkv, n, dv)).astype(np.float32)
    ids = rng.integers(0, n, (Hkv * group, L, k)).astype(np.int64)
    sc = rng.standard_normal((Hkv * group, L, k)).astype(np.float32) * 3
    ids[0, 1, 4:] = -1
    sc[0, 1, 4:] = -np.inf
    ids[1, 2, :] = -1
    sc[1, 2, :] = -np.inf
    koh = np.arange(Hkv * group) // group
    ro, rl = DK.retrieved_attention_ref(sc, ids, values, koh, 0.5)
    to, tl = retrieved_attention(sc, ids, torch.from_numpy(values[koh[:, None, None], np.maximum(ids, 0)]), 0.5)
    np.testing.assert_allclose(ro, to.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(rl, tl.numpy(), rtol=1e-6, atol=1e-6)
    assert np.isneginf(rl[1, 2]) and (ro[1, 2] == 0).all()


# ---------------------------------------------------------------------------------------------------
# KVIndex.search_attend
# ---------------------------------------------------------------------------------------------------
def _data(seed, Hkv=2, group=3, n=900, d=16, nq=6):
    rng = np.random.default_rng(seed)
    keys = rng.standard_normal((Hkv, n, d)).astype(np.float32)
    tq = rng.standard_normal((Hkv * group, 300, d)).astype(np.float32)
    q = rng.standard_normal((Hkv * group, nq, d)).astype(np.float32)
    values = rng.standard_normal((Hkv, n + 20, d)).astype(np.float32)  # capacity > n
    return keys, tq, q, values


@pytest.mark.parametrize("name,params", [("roar", {}), ("roar", {"graph_per": "query_head"}), ("flat", {}),
                                         ("hnsw", {})])
@pytest.mark.parametrize("vdtype", ["float32", "bfloat16", "float16"])
def test_search_attend_matches_search_plus_attention(name, params, vdtype):
    keys, tq, q, values = _data(7)
    ix = make_index(name, **params).build(keys, tq)
    ix.add(np.random.default_rng(8).standard_normal((2, 11, 16)).astype(np.float32))  # a tail
    vt = torch.from_numpy(values).to(getattr(torch, vdtype))
    vnp = tensor_as_numpy(vt)
    budget = {"ef": 40} if name == "roar" else {}
    k, scaling = 20, 0.25
    out, lse, ns = ix.search_attend(q, k, vnp, scaling, **budget)
    ids, sc, ns_ref = ix.search(q, k, **budget)
    np.testing.assert_array_equal(ns, ns_ref)
    koh = np.arange(6) // 3
    to, tl = retrieved_attention(sc, ids, vt[koh[:, None, None], torch.from_numpy(np.maximum(ids, 0))], scaling)
    np.testing.assert_allclose(out, to.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(lse, tl.numpy(), rtol=1e-5, atol=1e-4)
    assert out.dtype == np.float32 and lse.dtype == np.float32 and ns.dtype == np.int64


@pytest.mark.skipif(not K.CYCLE_COUNTER, reason="the cycle counter is read on x86-64 only")
def test_fused_call_timing_is_consistent():
    """``RoarIndex.last_call_timing``: the kernel's parts nest (the busiest worker's task time within the call,
    the call within the method), the timed kernel gives the untimed one's results, and the counter's rate
    matches the wall clock."""
    import time

    rate = K.cycles_per_second()
    c0, t0 = K.cycle_counter(), time.perf_counter()
    time.sleep(0.05)
    assert abs((K.cycle_counter() - c0) / rate - (time.perf_counter() - t0)) < 0.01
    keys, tq, q, values = _data(11)
    ix = make_index("roar").build(keys, tq)
    out, lse, ns = ix.search_attend(q, 20, values, 0.25, ef=40)
    t = ix.last_call_timing
    assert set(t) == {"wall_s", "kernel_s", "python_s", "start_s", "busy_max_s", "busy_mean_s", "join_s", "idle_s"}
    out, lse, ns = ix.search_attend(q, 20, values, 0.25, ef=40)  # compiled now: time a plain call
    t = ix.last_call_timing

    def tol(x):  # the counter's rate is measured over 20 ms: allow 1% of drift
        return 1.01 * x + 1e-5

    assert 0 < t["busy_mean_s"] <= t["busy_max_s"] + 1e-12
    assert t["start_s"] + t["busy_max_s"] + t["join_s"] <= tol(t["kernel_s"])
    assert t["kernel_s"] <= tol(t["wall_s"]) and t["python_s"] == t["wall_s"] - t["kernel_s"]
    assert all(v >= 0 for v in t.values())
    ix.search_attend(q, 20, values.astype(np.float16), 0.25, ef=40)  # the generic path: no stale parts left
    assert ix.last_call_timing == {} and ix.last_call_loads is None
    # the per-worker readings themselves: entered before leaving, busy within its own span
    T = max(1, min(numba.get_num_threads(), 6 * 6))
    cycles = np.zeros((T, 3), np.int64)
    w = DK.SearchScratch(T, ix.n_keys, DK.CAND_INIT)
    args = _fused_args(ix, q, values, w, T)
    before = K.cycle_counter()
    DK.search_attend_batch(*args, cycles)
    after = K.cycle_counter()
    used = cycles[:, 1] > 0
    assert used.any() and (cycles[used, 0] >= before).all() and (cycles[used, 1] <= after).all()
    assert (cycles[used, 2] <= cycles[used, 1] - cycles[used, 0]).all() and (cycles[used, 2] > 0).any()
    untimed = _fused_args(ix, q, values, w, T)
    DK.search_attend_batch(*untimed)
    for a in (15, 16, 17, 18):  # out, out_lse, out_ns, out_ids: the timed call's equal the untimed call's
        np.testing.assert_array_equal(untimed[a], args[a])
    np.testing.assert_allclose(args[15], out, rtol=1e-6, atol=1e-6)


def _fused_args(ix, q, values, w, T, k=20, ef=40):
    """Positional arguments of :func:`DK.search_attend_batch` for index ``ix`` up to ``L_of_head`` (no residual,
    separate searches, snake schedule), fresh output arrays (``out`` is argument 15)."""
    Hq, nq, d = q.shape
    gmap, kvmap = ix._graph_maps(Hq)
    P = Hq * nq
    return (ix._adj, ix._keys, values, ix.n_graph, ix.n_keys, np.ascontiguousarray(q), gmap, kvmap, ix._entries, k,
            ef, 0.25, w.visited[:T], w.cand_s[:T], w.cand_i[:T], np.empty((Hq, nq, values.shape[2]), np.float32),
            np.empty((Hq, nq), np.float32), np.empty((Hq, nq), np.int64), np.empty((Hq, nq, k), np.int64),
            np.empty((Hq, nq, k), np.float32), np.arange(P, dtype=np.int64), ix._keys, 0, 0, 0, w.taken[:T],
            np.empty(P, np.int64), False, np.full(Hq, -1, np.int64), -1, None)


def test_search_attend_rejects_bad_values():
    keys, tq, q, values = _data(9)
    ix = make_index("roar").build(keys, tq)
    from retrieval_attention.index import IndexError_

    with pytest.raises(IndexError_):
        ix.search_attend(q, 5, values[:, :100], 1.0)  # fewer rows than keys
    with pytest.raises(IndexError_):
        ix.search_attend(q, 5, values.astype(np.int32), 1.0)


# ---------------------------------------------------------------------------------------------------
# store.attend
# ---------------------------------------------------------------------------------------------------
def _store_data(seed, Hkv=2, group=3, n=700, d=16, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(Hkv, n, d, generator=g).to(dtype)
    v = torch.randn(Hkv, n, d, generator=g).to(dtype)
    tq = torch.randn(Hkv * group, 200, d, generator=g)
    q = torch.randn(Hkv * group, 1, d, generator=g).numpy()
    return k, v, tq, q


def _attend_old_way(store, q, group, scaling, k, **budget):
    ids, sc, ns = store.search(q, k, **budget)
    out, lse = retrieved_attention(sc, ids, store.gather_values(ids, group), scaling)
    return out.numpy(), lse.numpy(), ns


@pytest.mark.parametrize("index", ["roar", "flat"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_store_attend_matches_search_gather_attention(index, dtype):
    from retrieval_attention.cache import CPUStore
    from retrieval_attention.config import RetrievalConfig

    # residual_samples=0: this compares the fused retrieval with the composed one (the residual: test_residual.py)
    cfg = RetrievalConfig(index=index, residual_samples=0, exact_below=0, search_params={"ef": 48} if index == "roar" else {})
    k, v, tq, q = _store_data(10, dtype=dtype)
    store = CPUStore(cfg)
    store.build(k[:, :600], v[:, :600], tq)
    store.add(k[:, 600:], v[:, 600:], n_query_heads=6)  # a tail / grown capacity
    got = store.attend(q, 3, 0.3, 10, **cfg.search_params)
    want = _attend_old_way(store, q, 3, 0.3, 10, **cfg.search_params)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)

    # a fork: base store + its own exactly scanned tail (empty at first: the base's path)
    fork = store.fork()
    for a, b in zip(fork.attend(q, 3, 0.3, 10, **cfg.search_params), want):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    g = torch.Generator().manual_seed(11)
    fork.add(torch.randn(2, 30, 16, generator=g).to(dtype) * 3, torch.randn(2, 30, 16, generator=g).to(dtype), 6)
    got = fork.attend(q, 3, 0.3, 10, **cfg.search_params)
    want = _attend_old_way(fork, q, 3, 0.3, 10, **cfg.search_params)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    assert (got[2] >= 30).all()  # the fork's tail is scanned


# ---------------------------------------------------------------------------------------------------
# bfloat16 key storage
# ---------------------------------------------------------------------------------------------------
def test_bf16_storage_equals_float32_storage_on_bf16_keys(tmp_path):
    from retrieval_attention.index import KVIndex

    keys, tq, q, values = _data(12, n=1500)
    keys = torch.from_numpy(keys).to(torch.bfloat16).float().numpy()  # a bfloat16 model's keys
    a = make_index("roar", insert_threshold=64).build(keys, tq)
    b = make_index("roar", insert_threshold=64, storage="bfloat16").build(keys, tq)
    assert b.stored_keys().dtype == np.uint16
    np.testing.assert_array_equal(bf16_bits_to_f32(b.stored_keys()), a.stored_keys())
    np.testing.assert_array_equal(a._adj, b._adj)
    assert b.memory_bytes() < a.memory_bytes()
    new = torch.randn(2, 100, 16, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16).float().numpy()
    for ix in (a, b):
        ix.add(new[:, :40])  # tail
        ix.add(new[:, 40:])  # crosses insert_threshold: bulk insertion
        ix.finish_insertions()
    assert a.n_graph == b.n_graph == 1600
    np.testing.assert_array_equal(a._adj, b._adj)
    for x, y in zip(a.search(q, 10), b.search(q, 10)):
        np.testing.assert_array_equal(x, y)
    vnp = tensor_as_numpy(torch.from_numpy(values).to(torch.bfloat16))
    vnp = np.concatenate([vnp, vnp[:, :100]], 1)  # capacity for the added keys
    for x, y in zip(a.search_attend(q, 10, vnp, 0.3), b.search_attend(q, 10, vnp, 0.3)):
        np.testing.assert_array_equal(x, y)
    # save / load keeps the storage dtype
    b.save(tmp_path / "b.npz")
    c = KVIndex.load(tmp_path / "b.npz")
    assert c.storage == "bfloat16" and c.stored_keys().dtype == np.uint16
    for x, y in zip(b.search(q, 10), c.search(q, 10)):
        np.testing.assert_array_equal(x, y)


def test_bf16_storage_rounds_float32_keys():
    keys, tq, q, _ = _data(13)
    b = make_index("roar", storage="bfloat16").build(keys, tq)
    np.testing.assert_array_equal(b.stored_keys(), f32_to_bf16_bits(keys))
    ids, sc, _ = b.search(q, 5)
    kv = np.arange(6)[:, None, None] // 3
    want = np.einsum("hld,hlkd->hlk", q.astype(np.float64), bf16_bits_to_f32(b.stored_keys())[kv, ids].astype(np.float64))
    np.testing.assert_allclose(sc, want, rtol=1e-5, atol=1e-5)  # scores of the stored (rounded) keys


def test_storage_param_validated():
    from retrieval_attention.index import IndexError_

    with pytest.raises(IndexError_):
        make_index("roar", storage="float16")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_store_keeps_keys_once(dtype):
    from retrieval_attention.cache import CPUStore
    from retrieval_attention.config import RetrievalConfig

    k, v, tq, q = _store_data(14, dtype=dtype)
    store = CPUStore(RetrievalConfig(index="roar", exact_below=0))
    store.build(k[:, :600], v[:, :600], tq)
    store.add(k[:, 600:], v[:, 600:], n_query_heads=6)
    assert store._keys is None  # no second host copy
    assert store.index.storage == ("bfloat16" if dtype == torch.bfloat16 else "float32")
    assert store.keys.dtype == dtype
    torch.testing.assert_close(store.keys[:, : store.n], k, rtol=0, atol=0)
    # exact attention reads them
    out, lse = store.exact_attention(torch.from_numpy(q), 3, 0.3)
    from retrieval_attention.cache import _exact_attention

    ro, rl = _exact_attention(torch.from_numpy(q), k, v, 3, 0.3)
    torch.testing.assert_close(out, ro)
    torch.testing.assert_close(lse, rl)
    # a user's explicit storage wins; flat keeps its own host copy of the keys
    s2 = CPUStore(RetrievalConfig(index="roar", index_params={"storage": "float32"}, exact_below=0))
    s2.build(k, v, tq)
    assert s2.index.storage == "float32" and s2._keys is None
    s3 = CPUStore(RetrievalConfig(index="flat"))
    s3.build(k, v, tq)
    assert s3._keys is not None
    torch.testing.assert_close(s3.keys[:, : s3.n], k, rtol=0, atol=0)


def test_context_file_roundtrips_bf16_roar_store(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from tiny_models import VOCAB, tiny_model

    from retrieval_attention.config import RetrievalConfig
    from retrieval_attention.context import PrefilledContext

    model = tiny_model("llama", seed=11).to(torch.bfloat16)
    g = torch.Generator().manual_seed(3)
    doc = torch.randint(2, VOCAB - 1, (140,), generator=g).tolist()
    question = torch.randint(2, VOCAB - 1, (5,), generator=g).tolist()
    cfg = RetrievalConfig(index="roar", n_sink=8, window=16, top_k=8, dense_layers=(0,), exact_below=0)
    ctx = PrefilledContext.prefill(model, doc, cfg)
    stores = [s for l in ctx.cache.retrieval_layers for s in l.stores]
    assert stores and all(s.index.storage == "bfloat16" and s._keys is None for s in stores)
    want, _ = ctx.generate(model, question, max_new_tokens=6)
    ctx.save(tmp_path / "c")
    loaded = PrefilledContext.load(tmp_path / "c", model)
    for s, t in zip(stores, [s for l in loaded.cache.retrieval_layers for s in l.stores]):
        assert t.index.storage == "bfloat16" and t.index.stored_keys().dtype == np.uint16 and t._keys is None
        np.testing.assert_array_equal(t.index.stored_keys(), s.index.stored_keys())
        torch.testing.assert_close(t.keys[:, : t.n], s.keys[:, : s.n], rtol=0, atol=0)
    got, _ = loaded.generate(model, question, max_new_tokens=6)
    assert got == want


# ---------------------------------------------------------------------------------------------------
# build: GPU kNN path (run on the CPU device here), candidate cap
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("l2", [False, True])
@pytest.mark.parametrize("k,n", [(7, 60), (60, 60), (80, 60), (7, 3000), (64, 3000)])
def test_knn_torch_path_matches_cpu_path(l2, k, n, ties):
    """Same ids and scores, ties (small-integer vectors: many equal scores) ranked by smaller id on both paths.
    3,000 keys: the top-k goes through group maxima (:func:`topk_rows`)."""
    from retrieval_attention.index.roar import knn_ip, knn_ip_torch

    rng = np.random.default_rng(15)
    if ties:
        q = rng.integers(-2, 3, (33, 8)).astype(np.float32)
        hi = 2 if n < 100 else 9  # wider integers for many keys: ties, but not all of the top-k tied
        keys = rng.integers(-hi + 1, hi, (n, 8)).astype(np.float32)
    else:
        q = rng.standard_normal((33, 8)).astype(np.float32)
        keys = rng.standard_normal((n, 8)).astype(np.float32)
    for excl in (None, rng.integers(-1, n, 33)):
        want = knn_ip(q, keys, k, exclude=excl, l2=l2)
        e = np.full(33, -1, np.int64) if excl is None else excl.astype(np.int64)
        got = knn_ip_torch(q, keys, k, e, l2, np.full((33, k), -1, np.int32), np.full((33, k), -np.inf, np.float32),
                           "cpu")
        np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-5)
        if ties and k < keys.shape[0]:  # which of the keys tied at the k-th score are kept is unspecified
            above = got[1] > got[1][:, -1:]
            np.testing.assert_array_equal(np.where(above, got[0], -2), np.where(above, want[0], -2))
            assert above.mean() > 0.5
        else:
            np.testing.assert_array_equal(got[0], want[0])


@pytest.mark.parametrize("n,k", [(5000, 64), (4099, 7), (4096, 1), (3000, 100), (257, 64), (64, 64)])
@pytest.mark.parametrize("kind", ["normal", "ties", "excluded"])
def test_topk_rows_equals_torch_topk(n, k, kind):
    """The group-maxima selection gives torch.topk's values exactly (also with ties, -inf entries and a column
    count that is no multiple of the group size) and indices that point at those values, each column once."""
    from retrieval_attention.index.roar import topk_rows

    g = torch.Generator().manual_seed(n * 131 + k)
    S = torch.randn(37, n, generator=g)
    if kind == "ties":
        S = torch.randint(-3, 4, (37, n), generator=g).float()
    elif kind == "excluded":
        S[torch.rand(37, n, generator=g) < 0.3] = float("-inf")
    S[3] = S[3].sort().values  # a row that trends with the column (attention-like)
    want = torch.topk(S, k, dim=1)
    v, i = topk_rows(S, k)
    assert torch.equal(v, want.values)
    assert torch.equal(torch.gather(S, 1, i), v)
    assert all(len(set(row.tolist())) == k for row in i)
    if kind == "normal":
        assert torch.equal(i, want.indices)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_knn_cuda_matches_cpu():
    from retrieval_attention.index.roar import knn_ip, knn_ip_torch

    rng = np.random.default_rng(16)
    q = rng.standard_normal((500, 64)).astype(np.float32)
    keys = rng.standard_normal((40000, 64)).astype(np.float32)
    got = knn_ip(q, keys, 32)  # >= the CUDA threshold
    e = np.full(500, -1, np.int64)
    want = knn_ip_torch(q, keys, 32, e, False, np.full((500, 32), -1, np.int32), np.full((500, 32), -np.inf, np.float32),
                        "cpu")
    assert (got[0] == want[0]).mean() > 0.99  # GPU and CPU matmuls round differently


@pytest.mark.parametrize("storage", ["bfloat16", "float32"])
def test_add_stored_equals_add(storage):
    """The decode loop's per-token path (keys already in the storage dtype) stores exactly what ``add`` stores,
    the tail stays searchable, NaN keys raise, and a dtype mismatch is refused (caller falls back to add)."""
    rng = np.random.default_rng(3)
    keys = rng.standard_normal((2, 300, 16)).astype(np.float32)
    new = torch.from_numpy(rng.standard_normal((2, 5, 16)).astype(np.float32))
    if storage == "bfloat16":
        new = new.bfloat16()
    a = make_index("roar", storage=storage, M=8, n_query_neighbors=8).build(keys)
    b = make_index("roar", storage=storage, M=8, n_query_neighbors=8).build(keys)
    a.add(new.float().numpy())
    assert b.add_stored(tensor_as_numpy(new))
    np.testing.assert_array_equal(a.stored_keys(), b.stored_keys())
    assert a.n_keys == b.n_keys == 305
    q = new.float().numpy()[:, :2] * 10  # the new keys score highest for themselves
    ids_a, _, _ = a.search(q, 3)
    ids_b, _, _ = b.search(q, 3)
    np.testing.assert_array_equal(ids_a, ids_b)
    assert set(ids_b[0, 0]) & {300, 301, 302, 303, 304}
    before = b.stored_keys().copy()
    for pos, v in (((0, 0, 0), float("nan")), ((1, 4, 15), float("inf")), ((1, 2, 7), float("-inf"))):
        bad = new.clone()
        bad[pos] = v
        with pytest.raises(IndexError_, match="NaN"):
            b.add_stored(tensor_as_numpy(bad))
        assert b.n_keys == 305
        np.testing.assert_array_equal(b.stored_keys(), before)  # nothing written, not even the good rows
    other = new.float() if storage == "bfloat16" else new.bfloat16()
    assert not b.add_stored(tensor_as_numpy(other))


def test_worker_loads_sum_each_workers_pairs():
    cost = np.array([5.0, 1.0, 7.0, 2.0, 8.0, 3.0])
    worker = np.array([0, 2, 1, 1, 0, 2])
    np.testing.assert_array_equal(DK.worker_loads(cost, worker, 4), [13.0, 9.0, 4.0, 0.0])
    rng = np.random.default_rng(3)
    for P, T in ((32, 16), (32, 14), (7, 3), (3, 5)):
        c = rng.random(P)
        loads = DK.worker_loads(c, rng.integers(0, T, P), T)
        assert loads.shape == (T,) and np.isclose(loads.sum(), c.sum())  # every pair on exactly one worker


def test_atomic_counter_hands_out_each_rank_once():
    """The fused call's work counter: under many threads every rank 0..P-1 is taken exactly once."""
    from numba import njit, prange

    @njit(parallel=True)
    def take_all(P, T):
        counter = np.zeros(1, np.int64)
        times = np.zeros(P, np.int64)
        for t in prange(T):
            while True:
                j = K.atomic_fetch_add(counter, 0, 1)
                if j >= P:
                    break
                times[j] += 1  # no race: rank j goes to one worker only
        return times, counter

    for P, T in ((1000, 8), (5, 16), (0, 3)):
        times, counter = take_all(P, T)
        assert (times == 1).all()
        assert counter[0] == P + T  # each worker's last fetch sees the counter past the end


def test_roar_records_the_call_balance():
    keys, tq, q, values = _data(9)
    idx = make_index("roar").build(keys, tq)
    _, _, ns = idx.search_attend(q, 10, values, 0.3)
    most, mean = idx.last_call_loads
    T = min(numba.get_num_threads(), ns.size)
    assert np.isclose(mean * T, ns.sum()) and most >= mean


def test_roar_schedules_give_the_same_results():
    keys, tq, q, values = _data(10)
    snake = make_index("roar").build(keys, tq)
    dynamic = make_index("roar", schedule="dynamic").build(keys, tq)  # deterministic build: the same graph
    np.testing.assert_array_equal(dynamic._adj, snake._adj)
    for _ in range(2):  # the second call orders the pairs by the first call's cost
        a = snake.search_attend(q, 10, values, 0.3, return_ids=True)
        b = dynamic.search_attend(q, 10, values, 0.3, return_ids=True)
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
    with pytest.raises(IndexError_, match="schedule"):
        make_index("roar", schedule="greedy")


def test_balanced_order_sorts_by_cost():
    order = DK.balanced_order(np.array([3.0, 9.0, 1.0, 9.0]), 4)
    np.testing.assert_array_equal(order, [1, 3, 0, 2])  # costliest first, ties in index order
    np.testing.assert_array_equal(DK.balanced_order(None, 3), [0, 1, 2])
    np.testing.assert_array_equal(DK.balanced_order(np.ones(5), 3), [0, 1, 2])  # stale size: natural order


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_copy_rows_checked_equals_numpy(dtype):
    """The per-token append kernel writes exactly ``dst[:, n:n+m] = rows`` when every value is finite, and leaves
    ``dst`` untouched (returning False) when any is NaN / inf, wherever it is (fresh random inputs; float32 and
    bfloat16 bits)."""
    from retrieval_attention.index import kernels as K

    rng = np.random.default_rng()
    copy = K.copy_rows_checked
    for _ in range(20):
        H, m, d, n = rng.integers(1, 4), rng.integers(1, 4), rng.integers(1, 9), rng.integers(0, 5)
        rows_t = torch.from_numpy(rng.standard_normal((H, m, d)).astype(np.float32))
        dst_t = torch.from_numpy(rng.standard_normal((H, n + m + 2, d)).astype(np.float32))
        if dtype == "bfloat16":
            rows_t, dst_t = rows_t.bfloat16(), dst_t.bfloat16()
        rows, dst = tensor_as_numpy(rows_t), tensor_as_numpy(dst_t)
        want = dst.copy()
        want[:, n:n + m] = rows
        got = dst.copy()
        assert copy(got, n, np.ascontiguousarray(rows))
        np.testing.assert_array_equal(got, want)
        bad_t = rows_t.clone()
        bad_t[tuple(int(rng.integers(0, x)) for x in bad_t.shape)] = float(rng.choice([np.nan, np.inf, -np.inf]))
        got = dst.copy()
        assert not copy(got, n, np.ascontiguousarray(tensor_as_numpy(bad_t)))
        np.testing.assert_array_equal(got, dst)


def _task_order_ref(partner, nq, cost):
    """The plain version of ``task_order``: every lead pair's summed cost with its mate's, sorted high to low."""
    tasks = [h * nq + i for h in range(len(partner)) if partner[h] < 0 or partner[h] > h for i in range(nq)]
    if cost is None:
        return tasks
    def total(t):
        h, i = divmod(t, nq)
        return cost[t] + (cost[partner[h] * nq + i] if partner[h] >= 0 else 0)
    return sorted(tasks, key=lambda t: -total(t))  # sorted() is stable


def test_compiled_task_order_matches_the_plain_one():
    """``task_plan`` + ``order_tasks`` (compiled, cached plan) give the plain ordering on random partners and costs,
    ties (integer costs) kept in task order; ``filled_by_other`` marks exactly the partners' follower pairs."""
    rng = np.random.default_rng(11)
    for _ in range(40):
        Hq, nq = int(rng.integers(1, 40)), int(rng.integers(1, 4))
        goh = np.sort(rng.integers(0, max(1, Hq // 3), Hq))
        partner = DK.pair_partners(goh) if rng.random() < 0.8 else np.full(Hq, -1, np.int64)
        cost = rng.integers(0, 5, Hq * nq).astype(np.int64)  # few values: many ties
        np.testing.assert_array_equal(DK.task_order(partner, nq, cost), _task_order_ref(partner, nq, cost))
        np.testing.assert_array_equal(DK.task_order(partner, nq, None), _task_order_ref(partner, nq, None))
        _, _, filled = DK.task_plan(partner, nq)
        want = [partner[h] >= 0 and partner[h] < h for h in range(Hq) for _ in range(nq)]
        np.testing.assert_array_equal(filled, want)
        if (partner < 0).all():  # without pairs the tasks are the pairs: the balanced order
            np.testing.assert_array_equal(DK.task_order(partner, nq, cost), DK.balanced_order(cost, Hq * nq))


def test_worker_load_extremes_match_worker_loads():
    rng = np.random.default_rng(12)
    for P, T in ((32, 16), (32, 14), (7, 3), (3, 5)):
        c = rng.integers(0, 1000, P).astype(np.int64)
        skip = rng.random(P) < 0.3
        w = rng.integers(0, T, P).astype(np.int64)
        loads = DK.worker_loads(np.where(skip, 0, c), w, T)
        mx, mean = DK.worker_load_extremes(c, skip, w, T)
        assert mx == loads.max() and np.isclose(mean, loads.mean())


def test_all_finite_matches_numpy():
    rng = np.random.default_rng(13)
    for shape in ((3, 1, 8), (32, 2, 128), (0, 1, 4)):
        x = rng.standard_normal(shape).astype(np.float32)
        assert K.all_finite(x) == bool(np.isfinite(x).all())
        if x.size:
            for bad in (np.nan, np.inf, -np.inf):
                y = x.copy()
                y.flat[int(rng.integers(0, y.size))] = bad
                assert not K.all_finite(y)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_large_arrays_finite_check_matches_numpy(dtype):
    """``base._all_finite`` on arrays past its torch threshold (checked through their sum first): a NaN, an inf or
    a -inf anywhere is found; all-finite arrays pass, also when their finite values' sum overflows (float32:
    values near its max; float16: an ordinary array whose sum passes 65504)."""
    from retrieval_attention.index.base import _TORCH_CHECK_MIN, _all_finite

    rng = np.random.default_rng(14)
    x = rng.standard_normal((2, _TORCH_CHECK_MIN // 2 + 3)).astype(dtype)
    assert _all_finite(x)
    for bad in (np.nan, np.inf, -np.inf):
        y = x.copy()
        y.flat[int(rng.integers(0, y.size))] = bad
        assert not _all_finite(y)
    big = np.full_like(x, np.finfo(dtype).max / 4)  # every value finite, the sum not
    assert np.isfinite(big).all() and _all_finite(big)
