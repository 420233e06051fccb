"""Plain Python/numpy reference implementations of the ``roar`` kernels (same algorithms, same
tie-breaking, see :mod:`.kernels`), used by the tests to check the compiled code, plus a synthetic
out-of-distribution query/key generator for tests and quick measurements.

These are slow on purpose (straightforward loops); never use them on the decode path.
"""

from __future__ import annotations

import heapq
from collections import deque

import numpy as np


def beam_search_ref(adj_g, keys_h, n_graph, n_total, q, entries, k, L):
    """One query on one graph. adj_g [cap, M]; keys_h [cap, d]; entries [E]. Returns (ids [k], scores
    [k] float32, n_scanned). Same algorithm as :func:`kernels.search_batch` (HNSW-style best-first search
    with a candidate heap and a beam of the L best scored nodes; the result is the top-k of every key scored,
    the tail ``n_graph..n_total-1`` included). Ranking everywhere: score desc, then smaller id; (score, id)
    keys are unique, so heapq pops in exactly the kernel's order."""
    q64 = q.astype(np.float64)
    visited: set[int] = set()
    cand: list = []  # (-s, id): best first
    beam: list = []  # (s, -id): worst first
    res: list = []  # (s, -id): worst first
    ns = 0

    def offer(heap, cap, s, i):
        if len(heap) < cap:
            heapq.heappush(heap, (s, -i))
            return True
        if heap[0] < (s, -i):
            heapq.heapreplace(heap, (s, -i))
            return True
        return False

    def visit(j):
        nonlocal ns
        s = float(np.dot(q64, keys_h[j].astype(np.float64)))
        ns += 1
        offer(res, k, s, j)
        if offer(beam, L, s, j) or len(res) < k:
            heapq.heappush(cand, (-s, j))

    for e in entries:
        e = int(e)
        if 0 <= e < n_graph and e not in visited:
            visited.add(e)
            visit(e)
    while cand:
        s, node = cand[0]
        if len(beam) == L and len(res) == k and (-s, -node) < beam[0]:
            break
        heapq.heappop(cand)
        for nb in _new_neighbours(adj_g[node], visited):
            visit(nb)
    for j in range(n_graph, n_total):
        s = float(np.dot(q64, keys_h[j].astype(np.float64)))
        ns += 1
        offer(res, k, s, j)
    ids = np.full(k, -1, np.int64)
    sc = np.full(k, -np.inf, np.float32)
    for r, (s, mi) in enumerate(sorted(res, reverse=True)):
        ids[r] = -mi
        sc[r] = np.float32(s)
    return ids, sc, ns


def _new_neighbours(row, visited: set):
    """The not yet visited ids of adjacency ``row`` (up to its first -1), each marked visited as it is yielded."""
    for nb in row:
        nb = int(nb)
        if nb < 0:
            break
        if nb not in visited:
            visited.add(nb)
            yield nb


def beam_search_two_ref(adj_g, keys_h, n_graph, n_total, qa, qb, entries, k, L):
    """Two queries in one shared pass (``L >= k``): plain reference of :func:`kernels.search_two`. One visited
    set; every key scored is offered to both beams (the ``L`` best (score desc, id asc) with an "expanded" flag);
    the heads expand their best unexpanded entry in turn (a head with none yields) until both beams are fully
    expanded; each head's result is the top-``k`` of its beam and the tail. Returns ``((ids_a, sc_a), (ids_b,
    sc_b), n_scanned)`` with ids [k] int64 / scores [k] float32 (-1 / -inf padded)."""
    qs = [np.asarray(qa, np.float64), np.asarray(qb, np.float64)]
    beams: list[list] = [[], []]  # entries [score, id, expanded], best first
    visited: set[int] = set()
    ns = 0

    def score(j):
        nonlocal ns
        ns += 1
        row = keys_h[j].astype(np.float64)
        for b in range(2):
            beams[b].append([float(np.dot(qs[b], row)), j, False])
            beams[b].sort(key=lambda e: (-e[0], e[1]))
            del beams[b][L:]

    for e in entries:
        e = int(e)
        if 0 <= e < n_graph and e not in visited:
            visited.add(e)
            score(e)
    turn = 0
    while True:
        best = [next((e for e in beams[b] if not e[2]), None) for b in range(2)]
        if best[0] is None and best[1] is None:
            break
        b = 0 if (turn == 0 and best[0] is not None) or best[1] is None else 1
        turn ^= 1
        best[b][2] = True
        for nb in _new_neighbours(adj_g[best[b][1]], visited):
            score(nb)
    out = []
    for b in range(2):
        res = [(e[0], e[1]) for e in beams[b][:k]]
        for j in range(n_graph, n_total):
            res.append((float(np.dot(qs[b], keys_h[j].astype(np.float64))), j))
        res.sort(key=lambda e: (-e[0], e[1]))
        ids = np.full(k, -1, np.int64)
        sc = np.full(k, -np.inf, np.float32)
        for r, (sv, j) in enumerate(res[:k]):
            ids[r], sc[r] = j, np.float32(sv)
        out.append((ids, sc))
    return out[0], out[1], ns + (n_total - n_graph)


def l2sq(a, b) -> float:
    x = a.astype(np.float64) - b.astype(np.float64)
    return float(np.dot(x, x))


def prune_ref(pivot, pool, keys_h, M, alpha, fill, by_count=False, max_candidates=None):
    """Occlusion pruning (see :func:`kernels._prune_into`): returns a list of <= M ids. Only the first
    ``max_candidates`` candidates of the ranking (count desc if ``by_count``, distance, id) are considered."""
    counts: dict[int, int] = {}
    for c in pool:
        if c >= 0 and c != pivot:
            counts[int(c)] = counts.get(int(c), 0) + 1
    cand = sorted(counts)
    d = [l2sq(keys_h[pivot], keys_h[c]) for c in cand]
    if by_count:
        order = sorted(range(len(cand)), key=lambda i: (-counts[cand[i]], d[i], cand[i]))
    else:
        order = sorted(range(len(cand)), key=lambda i: (d[i], cand[i]))
    if max_candidates is not None:
        order = order[:max_candidates]
    sel: list[int] = []
    a2 = alpha * alpha
    for i in order:
        c = cand[i]
        if all(not (a2 * l2sq(keys_h[r], keys_h[c]) < d[i]) for r in sel):
            sel.append(c)
            if len(sel) == M:
                break
    if fill:
        for i in order:
            if len(sel) >= M:
                break
            if cand[i] not in sel:
                sel.append(cand[i])
    return sel


def owners_ref(knn_ids, knn_sc, n, R=1):
    """[n, R]: the R queries scoring each key highest among those listing it (ties smaller query), -1 pad."""
    cands: dict[int, list] = {}
    for q in range(knn_ids.shape[0]):
        for j in range(knn_ids.shape[1]):
            b = int(knn_ids[q, j])
            if b >= 0:
                cands.setdefault(b, []).append((-float(knn_sc[q, j]), q))
    own = np.full((n, R), -1, np.int64)
    for b, lst in cands.items():
        best = sorted(lst)[:R]
        own[b, : len(best)] = [q for _, q in best]
    return own


def project_ref(knn_ids, knn_sc, keys_h, n, M, alpha, fill, R=1, by_count=False, max_candidates=None):
    """Projection of one graph: adj [n, M] int32 with -1 fill."""
    own = owners_ref(knn_ids, knn_sc, n, R)
    adj = np.full((n, M), -1, np.int32)
    for b in range(n):
        if own[b, 0] >= 0:
            pool = np.concatenate([knn_ids[q] for q in own[b] if q >= 0])
            sel = prune_ref(b, pool, keys_h, M, alpha, fill, by_count, max_candidates)
            adj[b, : len(sel)] = sel
    return adj


def merge_edges_ref(adj, src, dst, keys_h, n, alpha, fill, max_candidates=None):
    """Reference of :func:`kernels.merge_edges` for one graph (returns a new adj)."""
    adj = adj.copy()
    M = adj.shape[1]
    new: dict[int, list[int]] = {}
    for s, t in zip(src, dst):
        new.setdefault(int(s), []).append(int(t))
    for v, extra in new.items():
        pool = [int(c) for c in adj[v] if c >= 0]
        for c in extra:
            if c != v and c not in pool:
                pool.append(c)
        if len(pool) <= M:
            row = pool
        else:
            row = prune_ref(v, pool, keys_h, M, alpha, fill, False, max_candidates)
        adj[v] = -1
        adj[v, : len(row)] = row
    return adj


def reachable_ref(adj_g, n, entries):
    seen = np.zeros(n, bool)
    dq = deque()
    for e in entries:
        if 0 <= e < n and not seen[e]:
            seen[e] = True
            dq.append(int(e))
    while dq:
        v = dq.popleft()
        for c in adj_g[v]:
            if c < 0:
                break
            if not seen[c]:
                seen[c] = True
                dq.append(int(c))
    return seen


def topk_ref(S, k, exclude=None):
    """Row-wise top-k of a score matrix (desc score, ties smaller column), -1 / -inf padded."""
    r, c = S.shape
    ids = np.full((r, k), -1, np.int32)
    sc = np.full((r, k), -np.inf, np.float32)
    for i in range(r):
        cols = [j for j in range(c) if exclude is None or j != exclude[i]]
        cols.sort(key=lambda j: (-S[i, j], j))
        cols = cols[:k]
        ids[i, : len(cols)] = cols
        sc[i, : len(cols)] = S[i, cols]
    return ids, sc


# ---------------------------------------------------------------------------------------------------
# synthetic out-of-distribution data
# ---------------------------------------------------------------------------------------------------
def make_ood_data(n_kv_heads=1, group=1, n_keys=8192, n_train=4096, n_test=256, d=64, seed=0,
                  n_clusters=64):
    """Synthetic post-RoPE-like keys and queries whose distributions differ.

    Keys: a large shared offset ``mu_k`` + one of ``n_clusters`` cluster centres + anisotropic noise whose
    scales decay over a random rotation ``R`` (a few high-variance directions). Queries live mostly in the
    keys' *low-variance* directions (reversed spectrum over the same rotation, their own offset and
    clusters), with a small negative component along ``mu_k``. So a query's top inner-product keys are
    decided by directions in which keys barely differ, unlike the keys' own L2 neighbourhoods: the
    out-of-distribution setting in which key-only graphs (HNSW) need far more scanning. Test queries are
    fresh draws from the query distribution, as decode queries are from the prefill ones.

    Returns keys [Hkv, n_keys, d], train_queries [Hkv*group, n_train, d], test_queries [Hkv*group, n_test, d]
    (float32).
    """
    rng = np.random.default_rng(seed)
    keys = np.empty((n_kv_heads, n_keys, d), np.float32)
    tq = np.empty((n_kv_heads * group, n_train, d), np.float32)
    te = np.empty((n_kv_heads * group, n_test, d), np.float32)
    for h in range(n_kv_heads):
        Rk, _ = np.linalg.qr(rng.standard_normal((d, d)))
        spec_k = np.exp(-np.linspace(0, 3, d))
        mu_k = rng.standard_normal(d)
        mu_k *= 6.0 / np.linalg.norm(mu_k)
        cent_k = (rng.standard_normal((n_clusters, d)) * spec_k * 1.2) @ Rk
        lab = rng.integers(0, n_clusters, n_keys)
        keys[h] = mu_k + cent_k[lab] + (rng.standard_normal((n_keys, d)) * spec_k) @ Rk
        for gq in range(group):
            spec_q = spec_k[::-1] * (0.5 + rng.random(d))
            low = np.zeros(d)
            low[d // 2:] = rng.standard_normal(d - d // 2)
            mu_q = 4.0 * (low / np.linalg.norm(low)) @ Rk - 0.1 * mu_k
            cent_q = (rng.standard_normal((max(4, n_clusters // 4), d)) * spec_q * 1.5) @ Rk
            for arr, m in ((tq, n_train), (te, n_test)):
                lq = rng.integers(0, cent_q.shape[0], m)
                arr[h * group + gq] = mu_q + cent_q[lq] + (rng.standard_normal((m, d)) * spec_q) @ Rk
    return keys, tq, te


def recall_at_k(ids, true_ids) -> np.ndarray:
    """Per-query recall of ids [..., k] against the exact true_ids [..., k] (-1 ignored in the truth)."""
    H, Q, k = true_ids.shape
    out = np.zeros((H, Q))
    for h in range(H):
        for i in range(Q):
            t = set(int(x) for x in true_ids[h, i] if x >= 0)
            out[h, i] = len(t & set(int(x) for x in ids[h, i])) / max(1, len(t))
    return out
