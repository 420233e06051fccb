"""Tests of the KV indexes: the oracle, the generic contract of every registered index, the compiled
roar kernels against their plain-Python references, and roar's behaviour on out-of-distribution data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from retrieval_attention.index import IndexError_, KVIndex, available_indexes, make_index
from retrieval_attention.index import kernels as K
from retrieval_attention.index import reference as R
from retrieval_attention.index.flat import exact_topk
from retrieval_attention.index import roar as RO
from retrieval_attention.index.roar import SHRINK_STEPS

ALL = available_indexes()


def test_all_indexes_registered():
    assert {"flat", "ivf", "hnsw", "roar"} <= set(ALL)


def _gauss(seed, hkv=2, group=3, n=600, nq=7, d=16):
    rng = np.random.default_rng(seed)
    keys = rng.standard_normal((hkv, n, d)).astype(np.float32)
    tq = rng.standard_normal((hkv * group, 300, d)).astype(np.float32)
    q = rng.standard_normal((hkv * group, nq, d)).astype(np.float32)
    return keys, tq, q


def _build(name, keys, tq, **params):
    return make_index(name, **params).build(keys, tq)


# ---------------------------------------------------------------------------------------------------
# flat
# ---------------------------------------------------------------------------------------------------
def test_flat_is_exact():
    keys, tq, q = _gauss(101, hkv=2, group=3, n=1000, nq=9)
    ix = _build("flat", keys, tq)
    ids, sc, ns = ix.search(q, 17)
    for h in range(q.shape[0]):
        s = q[h].astype(np.float64) @ keys[h // 3].astype(np.float64).T
        want = np.argsort(-s, axis=1, kind="stable")[:, :17]
        np.testing.assert_array_equal(ids[h], want)
        np.testing.assert_allclose(sc[h], np.take_along_axis(s, want, 1), rtol=1e-5, atol=1e-5)
    assert (ns == 1000).all()


# ---------------------------------------------------------------------------------------------------
# generic contract, every registered index
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_search_contract(name):
    keys, tq, q = _gauss(202, n=700)
    ix = _build(name, keys, tq)
    k = 20
    ids, sc, ns = ix.search(q, k)
    assert ids.shape == (6, 7, k) and ids.dtype == np.int64
    assert sc.shape == (6, 7, k) and sc.dtype == np.float32
    assert ns.shape == (6, 7) and ns.dtype == np.int64
    assert (ids >= 0).all() and (ids < 700).all()
    assert (np.diff(sc, axis=-1) <= 0).all(), "scores must be sorted descending"
    assert (ns > 0).all() and (ns <= 700).all()
    for h in range(6):
        kh = keys[h // 3]
        for i in range(7):
            assert len(set(ids[h, i].tolist())) == k, "ids must be unique per query"
            np.testing.assert_allclose(sc[h, i], kh[ids[h, i]] @ q[h, i], rtol=1e-4, atol=1e-4)
    # an approximate index still finds most of the true top-k on easy isotropic data
    true, _ = exact_topk(keys, q, k, 3)
    assert R.recall_at_k(ids, true).mean() > 0.8


@pytest.mark.parametrize("name", ALL)
def test_k_larger_than_n_pads(name):
    keys, tq, q = _gauss(303, hkv=1, group=2, n=40, nq=3)
    ix = _build(name, keys, tq)
    ids, sc, ns = ix.search(q, 64)
    assert ids.shape == (2, 3, 64)
    assert (ids[..., 40:] == -1).all() and np.isneginf(sc[..., 40:]).all()
    for h in range(2):
        for i in range(3):
            assert sorted(ids[h, i, :40].tolist()) == list(range(40)), "all keys are returned when k > n"


@pytest.mark.parametrize("name", ALL)
def test_add_keeps_new_keys_retrievable(name):
    keys, tq, q = _gauss(404, hkv=2, group=2, n=500, d=32)
    ix = _build(name, keys, tq)
    rng = np.random.default_rng(405)
    added = []
    for step in range(3):
        new = rng.standard_normal((2, 5 + step, 32)).astype(np.float32)
        ix.add(new)
        added.append(new)
    allnew = np.concatenate(added, axis=1)  # ids 500..517
    assert len(ix) == 500 + allnew.shape[1]
    # query head h uses KV head h // 2; a query = a new key x a large scalar must return that key first
    for j in range(allnew.shape[1]):
        qq = np.stack([allnew[h // 2, j] * 50.0 for h in range(4)])[:, None, :]
        ids, sc, _ = ix.search(qq, 10)
        assert (ids[:, 0, 0] == 500 + j).all(), f"{name}: added key {500 + j} not returned first"


@pytest.mark.parametrize("name", ALL)
def test_save_load_roundtrip(name, tmp_path):
    keys, tq, q = _gauss(505, n=400)
    ix = _build(name, keys, tq)
    ix.add(np.random.default_rng(506).standard_normal((2, 9, 16)).astype(np.float32))
    a = ix.search(q, 15)
    path = tmp_path / f"{name}.npz"
    ix.save(path)
    ix2 = KVIndex.load(path)
    assert type(ix2) is type(ix) and len(ix2) == len(ix) == 409
    b = ix2.search(q, 15)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    # a loaded index keeps working with add()
    ix2.add(np.random.default_rng(507).standard_normal((2, 3, 16)).astype(np.float32))
    assert ix2.search(q, 15)[0].max() <= 411
    assert ix.memory_bytes() > keys.nbytes * 0.9


@pytest.mark.parametrize("name", ALL)
def test_bad_inputs_raise(name, tmp_path):
    keys, tq, q = _gauss(606, n=300)
    fresh = make_index(name)
    with pytest.raises(IndexError_, match="empty index"):
        fresh.search(q, 5)
    with pytest.raises(IndexError_, match="before build"):
        fresh.add(keys)
    with pytest.raises(IndexError_, match="0 keys"):
        make_index(name).build(keys[:, :0], tq)
    with pytest.raises(IndexError_, match="shape"):
        make_index(name).build(keys[0], tq)
    with pytest.raises(IndexError_, match="floating"):
        make_index(name).build(keys.astype(np.int32), tq)
    bad = keys.copy()
    bad[1, 5, 3] = np.nan
    with pytest.raises(IndexError_, match="NaN"):
        make_index(name).build(bad, tq)
    ix = _build(name, keys, tq)
    with pytest.raises(IndexError_, match="head_dim"):
        ix.search(q[..., :8], 5)
    with pytest.raises(IndexError_, match="multiple"):
        ix.search(q[:5], 5)
    qi = q.copy()
    qi[0, 0, 0] = np.inf
    with pytest.raises(IndexError_, match="inf"):
        ix.search(qi, 5)
    for badk in (0, -3, 2.5):
        with pytest.raises(IndexError_, match="k must"):
            ix.search(q, badk)
    with pytest.raises(IndexError_, match="budget"):
        ix.search(q, 5, bogus=3)
    with pytest.raises(IndexError_, match="heads"):
        ix.add(keys[:1])
    for bp in ix.budget_params:
        with pytest.raises(IndexError_, match=bp):
            ix.search(q, 5, **{bp: 0})
    # the fused search + attention (roar: a compiled path with its own quick checks) refuses the same inputs
    values = np.ones((keys.shape[0], keys.shape[1], 4), np.float32)
    for bad_q, k, what in ((qi, 5, "inf"), (q[..., :8], 5, "head_dim"), (q[:5], 5, "multiple"), (q, 0, "k must"),
                           (q, 2.5, "k must"), (q.astype(np.int32), 5, "floating")):
        with pytest.raises(IndexError_, match=what):
            ix.search_attend(bad_q, k, values, 0.5)
    with pytest.raises(IndexError_, match="values"):
        ix.search_attend(q, 5, values[:, :3], 0.5)
    with pytest.raises(IndexError_, match="values"):
        ix.search_attend(q, 5, values.astype(np.int32), 0.5)
    want = ix.search_attend(q, 5, values, 0.5)  # a non-contiguous or float64 query equals its float32 copy
    for same_q in (np.asfortranarray(q), q.astype(np.float64), torch.from_numpy(q)):
        for a, b in zip(ix.search_attend(same_q, np.int64(5), values, 0.5), want):
            np.testing.assert_array_equal(a, b)
    p = tmp_path / "junk.npz"
    p.write_bytes(b"not an index")
    with pytest.raises(IndexError_, match="cannot read"):
        KVIndex.load(p)


@pytest.mark.parametrize("params", [dict(M=0), dict(M=-2), dict(alpha=0.5), dict(alpha=float("nan")),
                                    dict(graph_per="layer"), dict(ef=0), dict(n_query_neighbors=1),
                                    dict(max_train_queries=0), dict(M=2.5)])
def test_roar_bad_params(params):
    with pytest.raises(IndexError_):
        make_index("roar", **params)


@pytest.mark.parametrize("name,params", [("ivf", dict(nprobe=0)), ("ivf", dict(nlist=0)), ("hnsw", dict(M=1)),
                                         ("hnsw", dict(ef=-1))])
def test_faiss_bad_params(name, params):
    with pytest.raises(IndexError_):
        make_index(name, **params)


def test_roar_ef_smaller_than_k():
    keys, tq, q = _gauss(707, n=2000)
    ix = _build("roar", keys, tq)
    ids_s, sc_s, ns_s = ix.search(q, 50, ef=8)  # narrow beam: still k results (top-k of all keys scored)
    ids_l, sc_l, ns_l = ix.search(q, 50, ef=200)
    assert (ids_s >= 0).all() and (np.diff(sc_s, axis=-1) <= 0).all()
    assert ns_s.mean() < ns_l.mean()
    true, _ = exact_topk(keys, q, 50, 3)
    assert R.recall_at_k(ids_s, true).mean() <= R.recall_at_k(ids_l, true).mean()


def test_single_key_index():
    keys, tq, q = _gauss(708, hkv=1, group=1, n=1, nq=2)
    for name in ALL:
        ids, sc, _ = _build(name, keys, tq).search(q, 3)
        assert (ids[..., 0] == 0).all() and (ids[..., 1:] == -1).all(), name


@pytest.mark.parametrize("seed", [71, 72])
def test_knn_ip_exact(seed):
    from retrieval_attention.index.roar import knn_ip

    rng = np.random.default_rng(seed)
    Q = rng.standard_normal((70, 12)).astype(np.float32)
    Kk = rng.standard_normal((300, 12)).astype(np.float32)
    ids, sc = knn_ip(Q, Kk, 9)
    S = Q.astype(np.float64) @ Kk.astype(np.float64).T
    np.testing.assert_array_equal(ids, np.argsort(-S, axis=1, kind="stable")[:, :9])
    np.testing.assert_allclose(sc, np.take_along_axis(S, ids.astype(np.int64), 1), rtol=1e-4, atol=1e-4)
    # squared-L2 neighbours among the keys themselves, excluding self
    ids, _ = knn_ip(Kk[:50], Kk, 5, exclude=np.arange(50), l2=True)
    D = ((Kk[:50, None, :].astype(np.float64) - Kk[None, :, :]) ** 2).sum(-1)
    D[np.arange(50), np.arange(50)] = np.inf
    np.testing.assert_array_equal(ids, np.argsort(D, axis=1, kind="stable")[:, :5])


def test_roar_query_head_graphs_need_matching_heads():
    keys, tq, q = _gauss(808, n=400)
    ix = _build("roar", keys, tq, graph_per="query_head")
    assert ix._adj.shape[0] == 6
    ix.search(q, 5)
    with pytest.raises(IndexError_, match="query head"):
        ix.search(np.concatenate([q, q]), 5)


# ---------------------------------------------------------------------------------------------------
# compiled kernels == plain references
# ---------------------------------------------------------------------------------------------------
def _random_graph(rng, G, n, M, cap=None):
    cap = cap or n
    adj = np.full((G, cap, M), -1, np.int32)
    for g in range(G):
        for v in range(n):
            deg = rng.integers(0, M + 1)
            adj[g, v, :deg] = rng.choice(n, size=deg, replace=False)
    return adj


@pytest.mark.parametrize("seed,ties", [(21, False), (22, False), (23, True), (24, True)])
def test_search_two_matches_reference(seed, ties):
    """The shared two-query pass == its plain reference (ids, scores, keys scanned), with a tail, padded entries,
    nodes of degree 0 and (``ties``) many equal scores."""
    rng = np.random.default_rng(seed)
    n_graph, n_tail, d, M = 300, 17, 8, 6
    n_total = n_graph + n_tail
    draw = (lambda *shape: rng.integers(-1, 2, shape) if ties else rng.standard_normal(shape))
    keys = np.zeros((2, n_total + 5, d), np.float32)
    keys[:, :n_total] = draw(2, n_total, d)
    adj = _random_graph(rng, 2, n_graph, M, cap=n_total + 5)
    entries = np.stack([rng.choice(n_graph, 3, replace=False) for _ in range(2)]).astype(np.int32)
    entries[1, 2] = -1
    vis = np.full(K.visited_words(keys.shape[1]), np.uint64(0))
    for k, L in ((10, 10), (7, 25), (40, 64)):
        for trial in range(4):
            qa, qb = draw(2, d).astype(np.float32)
            g = trial % 2
            ba, bb = np.empty(L + 1, np.uint64), np.empty(L + 1, np.uint64)
            ra_s, ra_i, rb_s, rb_i = (np.empty(k + 1, np.float64), np.empty(k + 1, np.int64),
                                      np.empty(k + 1, np.float64), np.empty(k + 1, np.int64))
            K.clear_visited(vis, n_graph)
            nra, nrb, ns = K.search_two(adj, keys, n_graph, n_total, qa, qb, g, g, entries, k, L, vis, ba, bb,
                                        ra_s, ra_i, rb_s, rb_i, np.empty(M, np.int64), np.empty(M, np.float64),
                                        np.empty(M, np.float64))
            (ia, sa), (ib, sb), rns = R.beam_search_two_ref(adj[g], keys[g], n_graph, n_total, qa, qb, entries[g], k, L)
            assert ns == rns
            for nr, r_s, r_i, ids, sc in ((nra, ra_s, ra_i, ia, sa), (nrb, rb_s, rb_i, ib, sb)):
                got_ids = np.full(k, -1, np.int64)  # the result heap holds worst first: rank (score desc, id asc)
                got_ids[:nr] = r_i[:nr][np.lexsort((r_i[:nr], -r_s[:nr]))]
                np.testing.assert_array_equal(got_ids, ids)
                np.testing.assert_allclose(np.sort(r_s[:nr])[::-1], sc[:nr], rtol=1e-5)


@pytest.mark.parametrize("seed,ties", [(11, False), (12, False), (13, False), (14, True), (15, True)])
def test_search_kernel_matches_reference(seed, ties):
    rng = np.random.default_rng(seed)
    Hkv, group, n_graph, n_tail, d, M = 2, 2, 300, 23, 8, 6
    n_total = n_graph + n_tail
    draw = (lambda *shape: rng.integers(-1, 2, shape) if ties else rng.standard_normal(shape))  # ties: equal scores
    keys = np.zeros((Hkv, n_total + 10, d), np.float32)  # capacity > n_total, like a grown store
    keys[:, :n_total] = draw(Hkv, n_total, d)
    queries = draw(Hkv * group, 5, d).astype(np.float32)
    if ties:
        queries[0, 0] = -0.0  # every score -0.0 or 0.0: the ranking is by id alone
    for graph_per in ("query_head", "kv_head"):
        G = Hkv * group if graph_per == "query_head" else Hkv
        adj = _random_graph(rng, G, n_graph, M, cap=n_total + 10)
        entries = np.stack([rng.choice(n_graph, 2, replace=False) for _ in range(G)]).astype(np.int32)
        entries[0, 1] = -1  # padding entry
        kv_of_head = np.arange(Hkv * group) // group
        graph_of_head = np.arange(Hkv * group) if G == Hkv * group else kv_of_head
        for k, L in ((10, 10), (7, 25), (40, 40), (30, 6), (50, 1)):
            Hq, nq = queries.shape[:2]
            ids = np.empty((Hq, nq, k), np.int64)
            sc = np.empty((Hq, nq, k), np.float32)
            ns = np.empty((Hq, nq), np.int64)
            T = 2
            visited = np.full((T, K.visited_words(keys.shape[1])), np.uint64(2**64 - 1))  # dirty on entry:
            # the kernel clears a worker's bits before each search
            cand_s = np.empty((T, 3), np.float64)  # tiny candidate heaps: the kernel must grow them
            cand_i = np.empty((T, 3), np.int64)
            for rep in range(2):  # reused visited arrays must not leak state between calls
                K.search_batch(adj, keys, n_graph, n_total, queries, graph_of_head, kv_of_head, entries, k, L,
                               visited, cand_s, cand_i, ids, sc, ns)
                for h in range(Hq):
                    for i in range(nq):
                        rid, rsc, rns = R.beam_search_ref(adj[graph_of_head[h]], keys[kv_of_head[h]], n_graph,
                                                          n_total, queries[h, i], entries[graph_of_head[h]], k, L)
                        np.testing.assert_array_equal(ids[h, i], rid)
                        np.testing.assert_allclose(sc[h, i], rsc, rtol=1e-6, atol=1e-5)  # float32 sums
                        assert ns[h, i] == rns


def test_packed_beam_entries_rank_as_score_then_id():
    rng = np.random.default_rng(5)
    special = np.array([0.0, -0.0, np.inf, -np.inf, 1e-45, -1e-45, 3.4e38, -3.4e38], np.float32)
    s = np.concatenate([special, rng.standard_normal(200).astype(np.float32), rng.integers(-2, 3, 100)])
    s = s.astype(np.float32)
    ids = rng.integers(0, 2**31 - 1, len(s))
    ids[:20] = [0, 2**31 - 1] * 10
    packed = np.array([K.pack_entry(a, i) for a, i in zip(s, ids)], np.uint64)
    for e, a, i in zip(packed, s, ids):  # round trip
        assert K.entry_id(e) == i and K.entry_score(e) == a
    for x in range(len(s)):  # integer order == ranking (K._worse: lower score, then larger id)
        for y in range(0, len(s), 7):
            if x != y and not (s[x] == s[y] and ids[x] == ids[y]):
                assert (packed[x] < packed[y]) == K._worse(s[x], ids[x], s[y], ids[y])


@pytest.mark.parametrize("seed", [21, 22])
def test_topk_kernel_matches_reference(seed):
    rng = np.random.default_rng(seed)
    S = rng.integers(-5, 5, size=(40, 90)).astype(np.float32)  # many ties
    S[:3] = np.round(rng.standard_normal((3, 90)) * 64) / 64  # exact under the +-1.5 bias below
    S[3, :] = 1.0
    excl = rng.integers(-1, 90, size=40)
    excl[5] = -1
    rid, rsc = R.topk_ref(S, 12, excl)
    for perm in (np.arange(90), rng.permutation(90)):  # any column order gives the same lists
        ids = np.full((40, 12), -1, np.int32)
        sc = np.full((40, 12), -np.inf, np.float32)
        cnt = np.zeros(40, np.int64)
        Sp = S[:, perm]
        for c0 in range(0, 90, 25):  # column chunks, as in knn_ip
            K.topk_merge_rows(np.ascontiguousarray(Sp[:, c0:c0 + 25]) + 1.5, c0, perm.astype(np.int64),
                              np.full(90, 1.5, np.float32), excl.astype(np.int64), ids, sc, cnt)
        K.topk_finalize(ids, sc, cnt)
        np.testing.assert_array_equal(ids, rid)
        np.testing.assert_array_equal(sc, rsc)


@pytest.mark.parametrize("seed", [31, 32])
def test_projection_kernels_match_reference(seed):
    rng = np.random.default_rng(seed)
    Hkv, G, n, m, kq, d, M = 2, 3, 200, 60, 12, 6, 8
    keys = rng.standard_normal((Hkv, n, d)).astype(np.float32)
    kv_of_graph = np.array([0, 1, 1], np.int64)
    knn_ids = np.stack([np.stack([rng.choice(n, kq, replace=False) for _ in range(m)]) for _ in range(G)])
    knn_ids = knn_ids.astype(np.int32)
    knn_ids[0, 3, -2:] = -1
    knn_sc = np.sort(rng.standard_normal((G, m, kq)).astype(np.float32), axis=-1)[..., ::-1].copy()
    knn_sc[1, :, 0] = 1.0  # ties between queries for owners
    knn_ids[2, 5, :] = knn_ids[2, 6, :]  # identical lists: co-occurrence counts > 1
    knn_ids[2, 7, :6] = knn_ids[2, 6, :6]
    for alpha, fill, n_own, by_count, cap in ((1.0, True, 1, False, None), (1.2, False, 3, False, None),
                                              (1.0, False, 4, True, None), (1.0, True, 3, True, None),
                                              (1.0, False, 4, True, 7), (1.0, True, 3, False, 5),
                                              (1.0, False, 3, True, 1)):
        own = K.owners(knn_ids, knn_sc, n, n_own)
        kcap = 1 << 30 if cap is None else cap
        adj = K.project(knn_ids, own, keys, kv_of_graph, n, M, alpha, fill, by_count, kcap, 3)
        for g in range(G):
            np.testing.assert_array_equal(own[g], R.owners_ref(knn_ids[g], knn_sc[g], n, n_own))
            np.testing.assert_array_equal(adj[g], R.project_ref(knn_ids[g], knn_sc[g], keys[kv_of_graph[g]], n, M,
                                                                alpha, fill, n_own, by_count, cap))
        # reverse edges + re-pruning
        src, dst, cnt = K.reverse_edges(adj, n)
        want = [R.merge_edges_ref(adj[g], src[g, :cnt[g]], dst[g, :cnt[g]], keys[kv_of_graph[g]], n, alpha, fill,
                                  cap)
                for g in range(G)]
        K.merge_edges(adj, src, dst, cnt, keys, kv_of_graph, n, alpha, fill, kcap, 2)
        for g in range(G):
            np.testing.assert_array_equal(adj[g], want[g])
            deg = (adj[g] >= 0).sum(1)
            assert deg.max() <= M
            # valid entries form a prefix of each row
            assert ((adj[g] >= 0) == (np.arange(M)[None, :] < deg[:, None])).all()
        reach = K.reachable(adj, n, np.array([[0], [1], [2]], np.int32))
        for g in range(G):
            np.testing.assert_array_equal(reach[g], R.reachable_ref(adj[g], n, [g]))


def test_prune_occludes():
    # pivot at 0, a at 1, b at 2 on a line: b is occluded by a (d(a,b)=1 < d(0,b)=4 in squared L2)
    keys = np.array([[[0.0, 0], [1, 0], [2, 0], [0, 3]]], np.float32)
    assert R.prune_ref(0, [1, 2, 3], keys[0], 3, 1.0, False) == [1, 3]
    assert R.prune_ref(0, [1, 2, 3], keys[0], 3, 1.0, True) == [1, 3, 2]
    out = np.empty(3, np.int32)

    def scratch(P, R=4):
        return (np.zeros(4, np.int32), np.empty(P, np.int64), np.empty(P, np.int64), np.empty(P, np.float32),
                np.empty(P, np.uint64), np.empty(3, np.int32), np.empty(R + 2, np.int64),
                np.empty((P + 1, keys.shape[2]), np.float32), np.empty(3, np.int64))

    K._prune_into(0, np.array([2, 1, 3, 1], np.int32), 4, keys, 0, 3, 1.0, False, False, 1 << 30, out, *scratch(4))
    assert out.tolist() == [1, 3, -1]
    # by co-occurrence count: 2 occurs most and is taken first; it does not occlude 1 (d(2,1) = d(0,1) = 1,
    # not strictly smaller), nor 3
    K._prune_into(0, np.array([2, 2, 1, 3, 2], np.int32), 5, keys, 0, 3, 1.0, False, True, 1 << 30, out, *scratch(5))
    assert out.tolist() == [2, 1, 3] == R.prune_ref(0, [2, 2, 1, 3, 2], keys[0], 3, 1.0, False, True)
    # at most 2 candidates: 2 (count 3), then 1 (closer than 3)
    K._prune_into(0, np.array([2, 2, 1, 3, 2], np.int32), 5, keys, 0, 3, 1.0, False, True, 2, out, *scratch(5))
    assert out.tolist() == [2, 1, -1]
    assert R.prune_ref(0, [2, 2, 1, 3, 2], keys[0], 3, 1.0, False, True, 2) == [2, 1]


# ---------------------------------------------------------------------------------------------------
# roar: connectivity, insertion, out-of-distribution quality
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("graph_per", ["kv_head", "query_head"])
def test_roar_every_key_reachable(graph_per):
    keys, tq, te = R.make_ood_data(n_kv_heads=2, group=2, n_keys=3000, n_train=1500, n_test=10, d=32, seed=41)
    ix = _build("roar", keys, tq, graph_per=graph_per, M=16)
    assert ix.build_stats["covered_frac"] < 0.95  # the projection alone leaves keys uncovered
    for g in range(ix._adj.shape[0]):
        assert R.reachable_ref(ix._adj[g], ix.n_graph, ix._entries[g]).all()


def test_roar_bulk_insert_keeps_recall_and_reachability():
    keys, tq, te = R.make_ood_data(n_kv_heads=1, group=2, n_keys=3000, n_train=1500, n_test=40, d=32, seed=51)
    base, extra = keys[:, :2000], keys[:, 2000:]
    ix = _build("roar", base, tq, insert_threshold=300)
    caps = set()
    for s in range(0, 1000, 50):  # 20 adds; the tail is inserted into the graph when it reaches 300
        ix.add(extra[:, s:s + 50])
        caps.add(ix._keys.shape[1])
    assert len(caps) <= 3, "the key store must grow geometrically"
    assert len(ix) == 3000 and ix.n_graph >= 2600  # the last insertion's graph is applied insert_lag keys later
    ix.finish_insertions()
    assert ix.n_graph >= 2900
    for g in range(ix._adj.shape[0]):
        assert R.reachable_ref(ix._adj[g], ix.n_graph, ix._entries[g]).all()
    true, _ = exact_topk(keys, te, 50, 2)
    full = _build("roar", keys, tq)
    r_ins = R.recall_at_k(ix.search(te, 50, ef=200)[0], true).mean()
    r_full = R.recall_at_k(full.search(te, 50, ef=200)[0], true).mean()
    assert r_ins > r_full - 0.05, (r_ins, r_full)


def _recall_at_fraction(ix, te, true, n, budgets, param, frac, generous_below=False):
    """Recall interpolated at a given scanned fraction from a budget sweep. ``generous_below``: when the
    index cannot scan as little as ``frac``, credit it with its recall at its smallest scan (an upper bound
    of its recall at ``frac``)."""
    pts = []
    for b in budgets:
        ids, _, ns = ix.search(te, true.shape[-1], **{param: b})
        pts.append((ns.mean() / n, R.recall_at_k(ids, true).mean()))
    pts.sort()
    xs, ys = zip(*pts)
    if generous_below and frac < xs[0]:
        return float(ys[0])
    assert xs[0] <= frac <= xs[-1], f"budget sweep {xs} does not bracket {frac}"
    return float(np.interp(frac, xs, ys))


def test_roar_beats_hnsw_on_ood_data():
    n = 6000
    keys, tq, te = R.make_ood_data(n_kv_heads=1, group=2, n_keys=n, n_train=3000, n_test=60, d=64, seed=61)
    true, _ = exact_topk(keys, te, 100, 2)
    roar = _build("roar", keys, tq)
    hnsw = _build("hnsw", keys, tq)
    frac = 0.12  # hnsw scans ~12-13% already at its smallest beam (faiss uses max(ef, k) = 100)
    r_roar = _recall_at_fraction(roar, te, true, n, (48, 64, 100, 128, 200), "ef", frac)
    r_hnsw = _recall_at_fraction(hnsw, te, true, n, (100, 200, 400), "ef", frac, generous_below=True)
    assert r_roar >= r_hnsw + 0.25, (r_roar, r_hnsw)
    assert r_roar >= 0.8, r_roar


@pytest.mark.parametrize("graph_per", ["query_head", "kv_head"])
def test_roar_diverse_entries_reach_a_weakly_linked_region(graph_per):
    """Regression (SmolLM2 32K, layer 14, query-head graph of head 2: recall 0). Keys form three regions A,
    B, C; most training queries retrieve only A (so the mean-query entry lies in A), some retrieve A+C, C+B
    or B. The projection links A-C and C-B, but for a query aimed at B every C key scores far below every A
    key, so a search started in A fills its beam with A keys and never crosses C. The diverse entry points
    (top keys of mutually distant training queries) put an entry into B."""
    rng = np.random.default_rng(0)
    d, n = 16, 3000
    e = np.eye(d)
    regions = [10 * e[0], 10 * e[1], 10 * e[2] - 10 * e[1]]  # A, B, C
    keys = np.concatenate([c + rng.standard_normal((n, d)) for c in regions]).astype(np.float32)
    keys = keys[rng.permutation(len(keys))][None]

    def mode(v, m):
        return v + 0.3 * rng.standard_normal((m, d))

    tq = np.concatenate([mode(3 * e[0], 2100), mode(3 * (e[0] + e[2]), 300), mode(3 * e[1] + 6 * e[2], 300),
                         mode(3 * e[1], 300)]).astype(np.float32)[None]
    te = mode(3 * e[1], 40).astype(np.float32)[None]  # decode queries aimed at B
    truth, _ = exact_topk(keys, te, 50, 1)
    single = _build("roar", keys, tq, n_entry=1, graph_per=graph_per)
    assert R.recall_at_k(single.search(te, 50, ef=64)[0], truth).mean() < 0.1  # the failing condition
    ix = _build("roar", keys, tq, graph_per=graph_per)  # default entries
    assert ix._entries.shape[1] > 1
    assert R.recall_at_k(ix.search(te, 50, ef=64)[0], truth).mean() > 0.9


def test_entry_points_pick_distinct_distant_queries():
    from retrieval_attention.index.roar import diverse_queries, entry_points

    rng = np.random.default_rng(1)
    e = np.eye(8)
    q = np.concatenate([5 * e[i] + 0.1 * rng.standard_normal((n, 8)) for i, n in enumerate((500, 20, 20, 20))])
    picks = diverse_queries(q.astype(np.float32), 3)
    assert sorted(q[picks].argmax(1).tolist()) == [1, 2, 3]  # one query of each minority mode
    top1 = np.repeat(np.arange(4), [500, 20, 20, 20]).astype(np.int32)  # key i = the best key of mode i
    ent = entry_points(1, q, top1, 6)
    assert ent[0] == 1 and sorted(ent[:4].tolist()) == [0, 1, 2, 3] and (ent[4:] == -1).all()


def _projection_inputs(rng, bf16):
    """Random inputs of the projection tests: float32 keys [2 KV heads, 405, 24] (and their bfloat16 bits when
    ``bf16``), 3 graphs (KV heads 0, 1, 1), the kNN lists of 200 shifted random queries per graph among the first
    400 keys -> (keys, stored keys, kv_of_graph, knn_ids, knn_sc, n, R)."""
    from retrieval_attention.index.bf16 import f32_to_bf16_bits
    from retrieval_attention.index.roar import knn_ip

    n, m, kq, R, G, d = 400, 200, 16, 4, 3, 24
    keys = rng.standard_normal((2, n + 5, d)).astype(np.float32)
    kk = f32_to_bf16_bits(keys) if bf16 else keys
    kvg = np.array([0, 1, 1], np.int64)
    knn_ids = np.empty((G, m, kq), np.int32)
    knn_sc = np.empty((G, m, kq), np.float32)
    for g in range(G):
        knn_ids[g], knn_sc[g] = knn_ip(rng.standard_normal((m, d)).astype(np.float32) + 0.5, kk[kvg[g], :n], kq)
    return keys, kk, kvg, knn_ids, knn_sc, n, R


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("by_count", [True, False])
def test_projection_torch_matches_kernel(bf16, by_count):
    """The batched torch projection (for GPUs) builds the compiled kernel's graph on random inputs."""
    from retrieval_attention.index.projection_torch import project_torch

    keys, kk, kvg, knn_ids, knn_sc, n, R = _projection_inputs(np.random.default_rng(7), bf16)
    own = K.owners(knn_ids, knn_sc, n, R)
    for M, max_cand in ((8, 32), (6, 5)):
        want = K.project(knn_ids, own, kk, kvg, n, M, 1.0, False, by_count, max_cand, 2)
        got = project_torch(knn_ids, own, kk, kvg, n, M, 1.0, by_count, max_cand)
        np.testing.assert_array_equal(got, want)
    idx = make_index("roar", M=8, n_query_neighbors=16, projection="torch").build(keys[:, :n], keys[:, :n] + 0.3)
    ref = make_index("roar", M=8, n_query_neighbors=16).build(keys[:, :n], keys[:, :n] + 0.3)
    np.testing.assert_array_equal(idx._adj, ref._adj)
    with pytest.raises(IndexError_, match="projection"):
        make_index("roar", projection="gpu")


def test_roar_background_insertion_is_deterministic(monkeypatch):
    """Insertions run in the background but replace the graph at a fixed key count: a slow job changes no
    result, and insert_lag=0 (synchronous) builds the same graphs."""
    import time as _time

    from retrieval_attention.index import roar as roar_mod

    keys, tq, te = R.make_ood_data(n_kv_heads=1, group=2, n_keys=1600, n_train=600, n_test=6, d=16, seed=8)
    fast = _build("roar", keys[:, :1000], tq, insert_threshold=100, insert_lag=30)
    sync = _build("roar", keys[:, :1000], tq, insert_threshold=100, insert_lag=0)
    slow = _build("roar", keys[:, :1000], tq, insert_threshold=100, insert_lag=30)
    real = roar_mod.RoarIndex._insertion

    def slow_insertion(self, *a):
        _time.sleep(0.2)
        return real(self, *a)

    trace = []
    for s in range(1000, 1600, 10):
        fast.add(keys[:, s:s + 10])
        sync.add(keys[:, s:s + 10])
        monkeypatch.setattr(roar_mod.RoarIndex, "_insertion", slow_insertion)
        slow.add(keys[:, s:s + 10])
        monkeypatch.setattr(roar_mod.RoarIndex, "_insertion", real)
        a, b = fast.search(te, 10, ef=32), slow.search(te, 10, ef=32)
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
        assert fast.n_graph == slow.n_graph
        trace.append(fast.n_graph)
    assert trace[-1] > 1000 and len(set(trace)) > 3  # graphs were swapped in several times
    for ix in (fast, slow, sync):
        ix.finish_insertions()
    np.testing.assert_array_equal(fast._adj[:, :fast.n_graph], slow._adj[:, :slow.n_graph])
    assert sync.n_graph == fast.n_graph == 1600
    np.testing.assert_array_equal(sync._adj[:, :1600], fast._adj[:, :1600])  # same insertion batches
    for g in range(fast._adj.shape[0]):
        assert R.reachable_ref(fast._adj[g], fast.n_graph, fast._entries[g]).all()
    with pytest.raises(IndexError_, match="insert_lag"):
        make_index("roar", insert_lag=-1)


def test_auto_train_queries_rule():
    """The automatic training-query count: the minimum up to the reference size, then square-root growth."""
    from retrieval_attention.index.roar import MIN_TRAIN_QUERIES as MIN, TRAIN_REF_KEYS as REF, auto_train_queries

    assert all(auto_train_queries(n) == MIN for n in (0, 1, 100, REF))
    for n in (REF, 3 * REF + 5, 16 * REF):
        assert auto_train_queries(4 * n) in (2 * auto_train_queries(n), 2 * auto_train_queries(n) + 1)
    vals = [auto_train_queries(n) for n in range(REF, 40 * REF, 997)]
    assert all(a <= b for a, b in zip(vals, vals[1:]))


def test_roar_training_query_count(monkeypatch):
    """Without max_train_queries a graph trains on auto_train_queries(n_keys) queries (when there are that many);
    an explicit count caps it; kv_head graphs draw from their whole group's queries."""
    import retrieval_attention.index.roar as roar_mod

    keys, _, _ = _gauss(709, hkv=2, group=3, n=600)
    tq = np.random.default_rng(710).standard_normal((6, 500, 16)).astype(np.float32)
    monkeypatch.setattr(roar_mod, "auto_train_queries", lambda n: n + 100)  # 700: more than one head's 500
    assert _build("roar", keys, tq).build_stats["n_train"] == 700
    assert _build("roar", keys, tq, graph_per="query_head").build_stats["n_train"] == 500  # all it has
    assert _build("roar", keys, tq, max_train_queries=37).build_stats["n_train"] == 37
    assert make_index("roar").params["max_train_queries"] is None


def test_projection_auto_picks_torch_only_with_cuda(monkeypatch):
    """``projection="auto"`` runs the batched torch projection where CUDA is available, else the kernel; ``fill``
    always takes the kernel (torch does not implement it)."""
    import torch

    auto, fill = make_index("roar"), make_index("roar", fill=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert auto._projection_on() == "kernel" and fill._projection_on() == "kernel"
    assert make_index("roar", projection="torch")._projection_on() == "torch"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert auto._projection_on() == "torch" and fill._projection_on() == "kernel"
    assert make_index("roar", projection="kernel")._projection_on() == "kernel"


@pytest.mark.parametrize("bf16", [False, True])
def test_reverse_edges_torch_matches_kernel(bf16):
    """The batched torch reverse-edge merge (for GPUs) gives the compiled kernels' graph on random inputs, with
    lists that fit (kept in order) and lists that overflow (re-pruned), including a candidate cap below M."""
    from retrieval_attention.index.projection_torch import add_reverse_edges_torch

    for M, max_cand in ((8, 32), (6, 5), (24, 128)):
        _, kk, kvg, knn_ids, knn_sc, n, R = _projection_inputs(np.random.default_rng(M + 100 * bf16), bf16)
        G = len(kvg)
        adj = K.project(knn_ids, K.owners(knn_ids, knn_sc, n, R), kk, kvg, n, M, 1.0, False, True, max_cand, 2)
        got = adj.copy()
        src, dst, cnt = K.reverse_edges(adj, n)
        pool = (adj[:, :n] >= 0).sum(-1) + np.stack([np.bincount(src[g, :cnt[g]], minlength=n) for g in range(G)])
        has_new = np.stack([np.bincount(src[g, :cnt[g]], minlength=n) > 0 for g in range(G)])
        assert (pool > M).any() and (has_new & (pool <= M)).any()  # some lists are re-pruned, some just extended
        K.merge_edges(adj, src, dst, cnt, kk, kvg, n, 1.0, False, max_cand, 2)
        add_reverse_edges_torch(got, kk, kvg, n, 1.0, max_cand)
        np.testing.assert_array_equal(got, adj)


@pytest.mark.parametrize("n,M,max_candidates,graph_per", [(1, 4, None, "kv_head"), (7, 24, 3, "query_head"),
                                                           (300, 4, None, "query_head"), (300, 24, 128, "kv_head")])
def test_roar_torch_build_equals_kernel_build_on_edge_sizes(n, M, max_candidates, graph_per):
    """Whole builds with the torch projection + reverse edges equal the compiled kernels' graphs, also with fewer
    keys than M, a single key, no candidate cap and per-query-head graphs."""
    rng = np.random.default_rng(n + M)
    keys = rng.standard_normal((2, n, 16)).astype(np.float32)
    tq = rng.standard_normal((4, max(n, 5) * 2, 16)).astype(np.float32) + 0.3
    kw = dict(M=M, n_query_neighbors=8, max_candidates=max_candidates, graph_per=graph_per, storage="bfloat16")
    want = make_index("roar", projection="kernel", **kw).build(keys, tq)
    got = make_index("roar", projection="torch", **kw).build(keys, tq)
    np.testing.assert_array_equal(got._adj, want._adj)
    np.testing.assert_array_equal(got.search(tq[:, :6], min(n, 5))[0], want.search(tq[:, :6], min(n, 5))[0])


@pytest.mark.parametrize("helper", ["_candidates", "_pair_dist"])
@pytest.mark.parametrize("fails", ["once", "from then on"])
def test_roar_torch_build_out_of_memory_retries_then_falls_back_to_kernels(monkeypatch, recwarn, helper, fails):
    """A GPU out-of-memory error inside a torch build stage (the projection's candidates, or the reverse edges'
    distances after the first graph is merged) is retried with smaller chunks; when every retry fails too it warns
    and finishes the layer with the CPU kernels. Either way the graph equals the kernel-built one, so a failed try
    left nothing half-written."""
    import torch

    from retrieval_attention.index import projection_torch as PT

    rng = np.random.default_rng(5)
    keys = rng.standard_normal((2, 200, 16)).astype(np.float32)
    tq = rng.standard_normal((4, 300, 16)).astype(np.float32) + 0.3
    kw = dict(M=8, n_query_neighbors=8)
    want = make_index("roar", projection="kernel", **kw).build(keys, tq)
    real, calls = getattr(PT, helper), []

    def fails_from_second_call(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2 or (fails != "once" and len(calls) > 2):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*args, **kwargs)

    monkeypatch.setattr(PT, helper, fails_from_second_call)
    got = make_index("roar", projection="torch", **kw).build(keys, tq)
    fell_back = [w for w in recwarn.list if "ran out of GPU memory" in str(w.message)]
    if fails == "once":
        assert not fell_back and len(calls) > 2
    else:
        assert len(fell_back) == 1 and "CPU kernels" in str(fell_back[0].message)
    np.testing.assert_array_equal(got._adj, want._adj)


@pytest.mark.parametrize("failing_tries", [1, len(SHRINK_STEPS)])
def test_roar_gpu_knn_out_of_memory_retries_smaller_then_falls_back_to_cpu(monkeypatch, recwarn, failing_tries):
    """An out-of-memory error in the GPU kNN of the training queries is retried with smaller score chunks
    (no warning when a retry fits); when every try fails it warns and redoes that KV head on the CPU. Either way:
    the same kNN lists, the same graph (CUDA simulated: the GPU kNN routine raises, then runs on the CPU)."""
    import torch

    from retrieval_attention.index import roar as R

    rng = np.random.default_rng(6)
    keys = rng.standard_normal((2, 300, 16)).astype(np.float32)
    tq = rng.standard_normal((4, 200, 16)).astype(np.float32) + 0.3
    kw = dict(M=8, n_query_neighbors=8, projection="kernel")
    want = make_index("roar", **kw).build(keys, tq)
    real, shrinks = R.knn_ip_torch, []

    def gpu_knn(queries, keys_, k, excl, l2, ids, sc, device, shrink=1):
        shrinks.append(shrink)
        if len(shrinks) <= failing_tries:
            ids[:] = 7  # a failed try may leave partial results behind: the retry must overwrite them
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return real(queries, keys_, k, excl, l2, ids, sc, "cpu", shrink)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(R, "_CUDA_MIN_SCORES", 1)
    monkeypatch.setattr(R, "keys_for_knn", lambda k, dev: torch.from_numpy(np.ascontiguousarray(k, np.float32)))
    monkeypatch.setattr(R, "knn_ip_torch", gpu_knn)
    got = make_index("roar", **kw).build(keys, tq)
    msgs = [str(w.message) for w in recwarn.list if issubclass(w.category, RuntimeWarning)]
    if failing_tries == len(SHRINK_STEPS):  # every try of the first KV head failed: the CPU from then on
        assert shrinks[:len(SHRINK_STEPS)] == list(SHRINK_STEPS)  # (then the repair's small kNNs)
        # (the simulated GPU keys are CPU tensors, so knn_ip's own CPU fallback catches it before the build's)
        assert any("kNN" in m and "ran out of GPU memory" in m and "CPU" in m for m in msgs)
    else:  # the second try fitted; the next KV head starts with full chunks again
        assert shrinks[:3] == [SHRINK_STEPS[0], SHRINK_STEPS[1], SHRINK_STEPS[0]]
        assert not any("ran out of GPU memory" in m for m in msgs)
    np.testing.assert_array_equal(got._adj, want._adj)


@pytest.mark.parametrize("storage", ["float32", "bfloat16"])
def test_nearest_rows_torch_is_the_exact_nearest_with_first_tie(storage):
    """The repair's GPU parent search (run on the CPU device here): for each row its squared-L2 nearest key among
    the candidates, the first in their order among equal distances (small-integer keys: many ties), the same
    with one-row chunks; bfloat16 bits give the same as their float32 values."""
    from retrieval_attention.index.bf16 import f32_to_bf16_bits
    from retrieval_attention.index.roar import nearest_rows_torch

    rng = np.random.default_rng(21)
    keys = rng.integers(-2, 3, (500, 6)).astype(np.float32)
    rows = rng.choice(500, 200, replace=False)
    among = np.sort(rng.choice(np.setdiff1d(np.arange(500), rows), 120, replace=False))
    d2 = ((keys[rows][:, None, :] - keys[among][None, :, :]) ** 2).sum(-1)  # [200, 120], exact integers
    want_ids, want_d = among[d2.argmin(1)], d2.min(1)  # argmin: the first of equal minima
    stored = f32_to_bf16_bits(keys) if storage == "bfloat16" else keys
    for shrink in (1, 1 << 40):
        ids, dist = nearest_rows_torch(stored, rows, among, "cpu", shrink=shrink)
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_array_equal(dist, want_d.astype(np.float32))
    assert len(np.unique(d2.min(1))) > 1 and (np.sort(d2, 1)[:, 1] == d2.min(1)).any()  # ties do occur


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_nearest_rows_on_cuda_match_the_cpu():
    """On a real GPU: the same parents as on the CPU device up to matmul rounding (integer keys: exactly)."""
    from retrieval_attention.index.roar import nearest_rows_torch

    rng = np.random.default_rng(23)
    keys = rng.integers(-3, 4, (5000, 32)).astype(np.float32)
    rows = rng.choice(5000, 3000, replace=False)
    among = np.sort(np.setdiff1d(np.arange(5000), rows))
    got, want = nearest_rows_torch(keys, rows, among, "cuda"), nearest_rows_torch(keys, rows, among, "cpu")
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


def test_roar_repair_on_the_gpu_path_equals_the_cpu_path(monkeypatch):
    """The connectivity repair with its parent search through :func:`nearest_rows_torch` (CUDA simulated on the
    CPU device) links exactly as the CPU kNN path does, on a graph with most nodes cut off (integer keys: exact
    distances, ties)."""
    import torch

    from retrieval_attention.index import roar as R

    rng = np.random.default_rng(22)
    keys = rng.integers(-3, 4, (2, 600, 8)).astype(np.float32)
    tq = rng.integers(-3, 4, (4, 300, 8)).astype(np.float32)
    idx = make_index("roar", M=8, n_query_neighbors=8, projection="kernel").build(keys, tq)
    cut = idx._adj.copy()
    cut[:, 100:] = -1  # nodes 100.. lose their out-edges: everything they alone reached is unreached now
    cpu = cut.copy()
    idx._repair(cpu)
    real, calls = R.nearest_rows_torch, []

    def on_cpu(keys_, rows, among, device, shrink=1):
        calls.append(device)
        return real(keys_, rows, among, "cpu", shrink)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(R, "_CUDA_MIN_SCORES", 1)
    monkeypatch.setattr(R, "keys_for_knn", lambda k, dev: torch.from_numpy(np.ascontiguousarray(k, np.float32)))
    monkeypatch.setattr(R, "nearest_rows_torch", on_cpu)
    gpu = cut.copy()
    idx._repair(gpu)
    assert calls and set(calls) == {"cuda"}
    np.testing.assert_array_equal(gpu, cpu)
    assert (cpu != cut).any()
    assert R.K.reachable(gpu, idx.n_graph, idx._entries).all()


def test_roar_torch_stages_do_not_depend_on_chunk_size():
    """``shrink`` (the chunk divisor of the out-of-memory retries) does not change the torch projection or the
    reverse-edge merge: the same graph with chunks of one pivot / one pair as with the default chunks."""
    from retrieval_attention.index import projection_torch as PT
    from retrieval_attention.index.roar import knn_ip

    rng = np.random.default_rng(8)
    keys = rng.standard_normal((2, 300, 16)).astype(np.float32)
    tq = rng.standard_normal((4, 400, 16)).astype(np.float32) + 0.3
    knn = [knn_ip(tq[g], keys[g // 2], 16) for g in range(4)]
    knn_ids, knn_sc = np.stack([x[0] for x in knn]), np.stack([x[1] for x in knn])
    own = K.owners(knn_ids, knn_sc, 300, 8)
    kv = np.array([0, 0, 1, 1])
    big = 1 << 20
    a1 = PT.project_torch(knn_ids, own, keys, kv, 300, 8, 1.0, True, 128)
    a2 = PT.project_torch(knn_ids, own, keys, kv, 300, 8, 1.0, True, 128, shrink=big)
    np.testing.assert_array_equal(a1, a2)
    b1, b2 = a1.copy(), a1.copy()
    PT.add_reverse_edges_torch(b1, keys, kv, 300, 1.0, 128)
    PT.add_reverse_edges_torch(b2, keys, kv, 300, 1.0, 128, shrink=big)
    np.testing.assert_array_equal(b1, b2)
    assert (b1 != a1).any()  # reverse edges were added


def test_roar_shared_passes_find_more_with_fewer_rows():
    """``share="pairs"``: two heads of a group in one pass score fewer key rows than their two separate searches
    and, each seeing the keys scored for the other, recall at least as much at the same ef (synthetic OOD data);
    the fused decode call and the plain search agree; per-query-head graphs are refused."""
    from retrieval_attention.index.flat import exact_topk
    from retrieval_attention.index.reference import recall_at_k

    keys, tq, test = R.make_ood_data(n_kv_heads=2, group=4, n_keys=4000, n_train=1000, n_test=32, d=32, seed=3)
    sep = make_index("roar").build(keys, tq)
    pair = make_index("roar", share="pairs").build(keys, tq)
    exact = exact_topk(keys, test, 100, 4)[0]
    for ef in (100, 128):
        i0, _, n0 = sep.search(test, 100, ef=ef)
        i1, _, n1 = pair.search(test, 100, ef=ef)
        np.testing.assert_array_equal(n1[0::2], n1[1::2])  # both heads of a pass report its rows
        assert n1[0::2].mean() < 0.95 * (n0[0::2] + n0[1::2]).mean()
        assert recall_at_k(i1, exact).mean() >= recall_at_k(i0, exact).mean()
    values = np.random.default_rng(0).standard_normal((2, 4000, 8)).astype(np.float32)
    out, lse, ns, ids = pair.search_attend(test, 100, values, 0.2, return_ids=True)
    np.testing.assert_array_equal(ids, pair.search(test, 100)[0])
    np.testing.assert_array_equal(ns, pair.search(test, 100)[2])
    i2, _, _ = pair.search(test, 50, ef=40)  # ef < k: separate searches
    np.testing.assert_array_equal(i2, sep.search(test, 50, ef=40)[0])
    with pytest.raises(IndexError_, match="share='pairs' needs graph_per='kv_head'"):
        make_index("roar", share="pairs", graph_per="query_head")
    with pytest.raises(IndexError_, match="share must be one of"):
        make_index("roar", share="group")


def test_roar_partners_are_cached_per_maps_and_recomputed_when_they_change():
    """The shared-pass partners of a layer call are cached: the same maps (the same array, or equal values) give the
    cached partners; other maps or a beam narrower than k give freshly computed ones."""
    keys, tq, _ = R.make_ood_data(n_kv_heads=2, group=4, n_keys=500, n_train=200, n_test=4, d=16, seed=1)
    idx = make_index("roar", share="pairs").build(keys, tq)
    goh, _ = idx._graph_maps(8)
    p, any_pair = idx._partners(goh, 10, 16)
    np.testing.assert_array_equal(p, [1, 0, 3, 2, 5, 4, 7, 6])
    assert any_pair and idx._partners(goh, 10, 16)[0] is p and idx._partners(goh.copy(), 10, 16)[0] is p
    other = np.array([0, 0, 0, 1, 1, 1, 1, 1], np.int64)  # odd group sizes: heads 2 and 7 have no partner
    np.testing.assert_array_equal(idx._partners(other, 10, 16)[0], [1, 0, -1, 4, 3, 6, 5, -1])
    narrow, any_pair = idx._partners(goh, 10, 8)  # ef < k: no shared passes
    assert not any_pair and (narrow == -1).all()
    np.testing.assert_array_equal(idx._partners(goh, 10, 16)[0], p)


def test_roar_share_auto_pairs_heads_only_when_their_top_keys_overlap(tmp_path):
    """``share="auto"``: the build measures how much paired heads' exact top keys overlap. Heads that are
    near copies of each other (as a trained model's group heads partly are) share passes; independent heads (random
    weights) search separately, with exactly the results of ``share="none"``. The decision survives save/load."""
    from retrieval_attention.index import roar as RO

    rng = np.random.default_rng(11)
    keys = rng.standard_normal((2, 1500, 16)).astype(np.float32)
    base = rng.standard_normal((2, 1, 400, 16)).astype(np.float32) + 0.3
    near = (base + 0.05 * rng.standard_normal((2, 2, 400, 16))).reshape(4, 400, 16).astype(np.float32)
    indep = (rng.standard_normal((4, 400, 16)) + 0.3).astype(np.float32)
    test = np.ascontiguousarray(near[:, :8])
    kw = dict(M=8, n_query_neighbors=16)
    paired = make_index("roar", share="auto", **kw).build(keys, near)
    alone = make_index("roar", share="auto", **kw).build(keys, indep)
    assert paired.build_stats["pair_overlap"] > 0.5 and paired._pairs_on
    assert alone.build_stats["pair_overlap"] < RO.PAIR_OVERLAP_MIN and not alone._pairs_on
    ns = paired.search(test, 10)[2]
    np.testing.assert_array_equal(ns[0::2], ns[1::2])  # a pass's rows reported for both heads
    none = make_index("roar", share="none", **kw).build(keys, indep)
    for a, b in zip(alone.search(test, 10), none.search(test, 10)):
        np.testing.assert_array_equal(a, b)
    paired.save(tmp_path / "p.npz")
    alone.save(tmp_path / "a.npz")
    assert KVIndex.load(tmp_path / "p.npz")._pairs_on and not KVIndex.load(tmp_path / "a.npz")._pairs_on
    assert make_index("roar", share="auto", graph_per="query_head", **kw).build(keys, near)._pairs_on is False
    assert make_index("roar", share=None, **kw).share == "none"  # index specs parse "share=none" as None


# ---------------------------------------------------------------------------------------------------
# per-head beam widths (target_recall)
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1])
def test_per_head_widths_equal_separate_searches(seed):
    """A batched search with a width per head returns, for every head, exactly what a search of that head alone
    with that width returns (plain search and the fused decode call, separate and shared passes)."""
    keys, tq, q = _gauss(seed, n=900)
    rng = np.random.default_rng(seed)
    for params in ({}, {"share": "pairs"}):
        idx = _build("roar", keys, tq, **params)
        widths = rng.choice([24, 60, 100, 140, 200], q.shape[0]).astype(np.int64)
        if params:
            widths = np.maximum(widths, 100)  # shared passes need ef >= k
        ids, sc, ns = idx._search(q, 50, ef_of_head=widths)
        values = rng.standard_normal((keys.shape[0], keys.shape[1], 8)).astype(np.float32)
        idx._ef_of_head = widths
        out, lse, ns_f, ids_f = idx.search_attend(q, 50, values, 0.25, return_ids=True)
        idx._ef_of_head = None
        for h in range(q.shape[0]):
            ids_h, sc_h, ns_h = idx.search(q, 50, ef=int(widths[h]))
            if params:  # a pass is shared with the pair's other head: the pair's larger width applies
                continue
            assert np.array_equal(ids[h], ids_h[h]) and np.array_equal(ns[h], ns_h[h])
            assert np.allclose(sc[h], sc_h[h])
        assert np.array_equal(ids_f, ids) and np.array_equal(ns_f, ns)


def test_target_recall_calibrates_widths_per_head(tmp_path):
    """Held-out training queries set each head's width: a higher target never gives a narrower beam, the heads
    reach the target on fresh queries of the same distribution, an explicit ef still applies to all heads, and
    the widths survive save/load."""
    keys, tq, te = R.make_ood_data(n_kv_heads=2, group=2, n_keys=3000, n_train=1200, n_test=40, d=32, seed=7)
    true, _ = exact_topk(keys, te, 100, 2)
    widths = {}
    for target in (0.8, 0.95):
        idx = _build("roar", keys, tq, target_recall=target, calib_queries=48)
        w = idx._ef_of_head
        assert w is not None and w.shape == (4,) and idx.build_stats["calib_s"] > 0
        assert set(w.tolist()) <= set(RO.CALIB_LADDER) and w.max() <= idx.max_ef == 2 * idx.ef
        widths[target] = w
        ids, _, ns = idx.search(te, 100)
        rec = (ids[..., :, None] == true[..., None, :]).any(-1).mean(-1)  # [Hq, nq]
        assert rec.mean() >= target - 0.05, (target, rec.mean(1))
        _, _, ns_all = idx.search(te, 100, ef=64)
        assert not np.array_equal(ns_all, ns)  # the explicit width replaced the calibrated ones
        idx.save(tmp_path / f"r{target}.npz")
        back = KVIndex.load(tmp_path / f"r{target}.npz")
        assert np.array_equal(back._ef_of_head, w) and np.array_equal(back.search(te, 100)[0], ids)
    assert (widths[0.95] >= widths[0.8]).all() and (widths[0.95] > widths[0.8]).any()
    # too few training queries to hold some out: one width for all, as without a target
    few = _build("roar", keys, tq[:, :40], target_recall=0.9)
    assert few._ef_of_head is None


@pytest.mark.parametrize("bad", [{"target_recall": 0}, {"target_recall": 1.5}, {"target_recall": True},
                                 {"calib_queries": 0}, {"max_ef": 0}])
def test_target_recall_bad_params(bad):
    with pytest.raises(IndexError_):
        make_index("roar", **bad)


@pytest.mark.parametrize("storage", ["float32", "bfloat16"])
@pytest.mark.parametrize("resident", [True, False])
def test_keys_on_device_heads_are_the_stored_keys(storage, resident):
    """:class:`KeysOnDevice` (on the CPU device here) gives each KV head's first n stored keys as float32, the
    same whether one resident copy holds them (bfloat16 bits kept as bfloat16) or each head is copied when asked;
    the spare rows after n are not part of it."""
    import torch

    from retrieval_attention.index.bf16 import as_float32, f32_to_bf16_bits
    from retrieval_attention.index.roar import KeysOnDevice

    rng = np.random.default_rng(31)
    full = rng.standard_normal((3, 70, 8)).astype(np.float32)
    stored = f32_to_bf16_bits(full) if storage == "bfloat16" else full
    kd = KeysOnDevice(stored, 50, "cpu", resident)
    assert (kd.resident is not None) == resident
    if resident:
        assert kd.resident.shape == (3, 50, 8)
        assert kd.resident.dtype == (torch.bfloat16 if storage == "bfloat16" else torch.float32)
    for h in (2, 0, 0, 1):
        got = kd.head(h)
        assert got.dtype == torch.float32 and got.shape == (50, 8)
        np.testing.assert_array_equal(got.numpy(), as_float32(stored[h, :50]))
    assert KeysOnDevice(stored, 50, "cpu").resident is None  # "auto": resident only on CUDA


@pytest.mark.parametrize("storage", ["float32", "bfloat16"])
def test_roar_resident_keys_build_the_same_graph(storage):
    """The torch build stages reading one shared copy of the keys (``resident_keys=True``) build the same graph as
    with each stage copying its heads (``False``); other values are refused."""
    rng = np.random.default_rng(32)
    keys = rng.standard_normal((2, 400, 16)).astype(np.float32)
    tq = rng.standard_normal((4, 300, 16)).astype(np.float32) + 0.3
    kw = dict(M=8, n_query_neighbors=16, projection="torch", storage=storage)
    a = make_index("roar", resident_keys=True, **kw).build(keys, tq)
    b = make_index("roar", resident_keys=False, **kw).build(keys, tq)
    assert a.build_stats["resident_keys"] == 1.0 and b.build_stats["resident_keys"] == 0.0
    np.testing.assert_array_equal(a._adj, b._adj)
    with pytest.raises(IndexError_, match="resident_keys"):
        make_index("roar", resident_keys="yes")


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_roar_resident_keys_on_cuda_build_the_same_graph():
    """On a real GPU: ``"auto"`` keeps the keys resident when they fit, and the graph equals
    the one built with a copy per head and stage."""
    from retrieval_attention.index.roar import KeysOnDevice

    rng = np.random.default_rng(33)
    keys = rng.standard_normal((2, 20000, 64)).astype(np.float32)
    tq = rng.standard_normal((8, 3000, 64)).astype(np.float32) + 0.3
    assert KeysOnDevice(keys, 20000, "cuda").resident is not None
    kw = dict(M=16, n_query_neighbors=32, storage="bfloat16")
    a = make_index("roar", **kw).build(keys, tq)
    b = make_index("roar", resident_keys=False, **kw).build(keys, tq)
    assert a.build_stats["resident_keys"] == 1.0 and b.build_stats["resident_keys"] == 0.0
    np.testing.assert_array_equal(a._adj, b._adj)
