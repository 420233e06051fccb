"""Numba kernels of the ``roar`` index: batched beam search (the decode hot path) and graph construction.

Every kernel works on a *batch of graphs* ``[G, n, M]`` (fixed out-degree ``M``, ``-1`` fill; the valid
entries of a row are a prefix) so one call covers a whole layer. The heavy ones run in parallel over
(head, query) pairs (search), rows (top-k selection) or (graph, node) pairs (projection, re-pruning); the
cheap linear passes (owners, reverse-edge lists, BFS, connectivity repair: a few ms per layer) are serial
loops, which also keeps numba's compile time down. There is no Python loop over nodes anywhere.

Determinism / tie-breaking (mirrored exactly by :mod:`.reference`):

* scores and distances are accumulated in float64 from float32 inputs;
* every ranking of keys by score is descending, ties by smaller id first (heaps included: (score, id)
  keys are unique, so the pop order is fully determined);
* candidate pools for pruning are ordered by squared L2 distance to the pivot ascending (or first by
  co-occurrence count, descending), ties by smaller id.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

_FM = {"reassoc", "contract", "nsz", "arcp"}  # vectorisable reductions, but keep inf semantics

VISIT_MAX = 2**31 - 2  # epoch stamps wrap below int32 max


# ---------------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------------
@njit(fastmath=_FM, nogil=True, cache=True)
def _dot64(q64, keys, h, j):
    s = 0.0
    for t in range(q64.shape[0]):
        s += q64[t] * keys[h, j, t]
    return s


@njit(fastmath=_FM, nogil=True, cache=True)
def _l2(keys, h, a, b):
    s = 0.0
    for t in range(keys.shape[2]):
        x = np.float64(keys[h, a, t]) - np.float64(keys[h, b, t])
        s += x * x
    return s


# ---------------------------------------------------------------------------------------------------
# search (decode hot path)
# ---------------------------------------------------------------------------------------------------
@njit(nogil=True, cache=True)
def _worse(s1, i1, s2, i2):
    """(s1, i1) ranks below (s2, i2): lower score, or equal score and larger id."""
    return s1 < s2 or (s1 == s2 and i1 > i2)


@njit(nogil=True, cache=True)
def _min_push(hs, hi, size, s, i):
    """Push onto a worst-at-root heap; returns the new size."""
    pos = size
    while pos > 0:
        par = (pos - 1) >> 1
        if _worse(s, i, hs[par], hi[par]):
            hs[pos] = hs[par]
            hi[pos] = hi[par]
            pos = par
        else:
            break
    hs[pos] = s
    hi[pos] = i
    return size + 1


@njit(nogil=True, cache=True)
def _min_replace_root(hs, hi, size, s, i):
    """Replace the root (worst) of a worst-at-root heap and restore the heap."""
    pos = 0
    while True:
        l = 2 * pos + 1
        if l >= size:
            break
        w = l
        if l + 1 < size and _worse(hs[l + 1], hi[l + 1], hs[l], hi[l]):
            w = l + 1
        if _worse(hs[w], hi[w], s, i):
            hs[pos] = hs[w]
            hi[pos] = hi[w]
            pos = w
        else:
            break
    hs[pos] = s
    hi[pos] = i


@njit(nogil=True, cache=True)
def _max_push(hs, hi, size, s, i):
    """Push onto a best-at-root heap; returns the new size."""
    pos = size
    while pos > 0:
        par = (pos - 1) >> 1
        if _worse(hs[par], hi[par], s, i):
            hs[pos] = hs[par]
            hi[pos] = hi[par]
            pos = par
        else:
            break
    hs[pos] = s
    hi[pos] = i
    return size + 1


@njit(nogil=True, cache=True)
def _max_pop(hs, hi, size):
    """Remove the root (best) of a best-at-root heap; returns the new size."""
    size -= 1
    s = hs[size]
    i = hi[size]
    pos = 0
    while True:
        l = 2 * pos + 1
        if l >= size:
            break
        w = l
        if l + 1 < size and _worse(hs[l], hi[l], hs[l + 1], hi[l + 1]):
            w = l + 1
        if _worse(s, i, hs[w], hi[w]):
            hs[pos] = hs[w]
            hi[pos] = hi[w]
            pos = w
        else:
            break
    hs[pos] = s
    hi[pos] = i
    return size


@njit(nogil=True, cache=True)
def _offer(hs, hi, size, cap, s, i):
    """Offer (s, i) to a worst-at-root heap bounded to ``cap``; returns (accepted, new size)."""
    if size < cap:
        return True, _min_push(hs, hi, size, s, i)
    if _worse(hs[0], hi[0], s, i):
        _min_replace_root(hs, hi, size, s, i)
        return True, size
    return False, size


@njit(parallel=True, nogil=True, cache=True)
def search_batch(adj, keys, n_graph, n_total, queries, graph_of_head, kv_of_head, entries, k, L,
                 visited, stamps, out_ids, out_sc, out_ns):
    """Best-first beam search of every (query head, query) pair of a layer in one call.

    adj [G, cap, M] int32; keys [Hkv, cap, d] float32 (graph nodes ``0..n_graph-1``, exact-scanned tail
    ``n_graph..n_total-1``); queries [Hq, nq, d]; graph_of_head / kv_of_head [Hq]; entries [G, E] int32
    (-1 padded); visited [T, cap] int32 epoch-stamped (one row per worker); stamps [T] int64. Writes
    out_ids [Hq, nq, k] int64, out_sc float32, out_ns [Hq, nq] int64.

    HNSW-style search: a candidate heap (best first) and a beam of the ``L`` best nodes scored so far
    (worst at its root); the best candidate is expanded until it ranks below the beam's worst. Every key
    scored (graph nodes on the way, then the whole tail) is offered to a top-``k`` result heap, so ``L``
    may be smaller than ``k``: a narrow beam still scores the neighbourhoods of the nodes it expands.
    While fewer than ``k`` keys have been scored, every scored node becomes a candidate and the search
    does not stop, so ``k`` results come back whenever the graph reaches ``k`` keys (with ``L >= k``
    these extra rules never fire).
    """
    Hq, nq, d = queries.shape
    P = Hq * nq
    T = visited.shape[0]
    E = entries.shape[1]
    M = adj.shape[2]
    for t in prange(T):
        c_s = np.empty(n_graph + E + 1, np.float64)  # candidates: at most one push per scored node
        c_i = np.empty(n_graph + E + 1, np.int64)
        w_s = np.empty(L + 1, np.float64)
        w_i = np.empty(L + 1, np.int64)
        r_s = np.empty(k + 1, np.float64)
        r_i = np.empty(k + 1, np.int64)
        q64 = np.empty(d, np.float64)
        nbuf = np.empty(M, np.int64)
        sbuf = np.empty(M, np.float64)
        vis = visited[t]
        for p in range(t, P, T):
            h = p // nq
            i = p - h * nq
            g = graph_of_head[h]
            kv = kv_of_head[h]
            st = stamps[t] + 1
            if st > VISIT_MAX:
                vis[:] = 0
                st = 1
            stamps[t] = st
            for c in range(d):
                q64[c] = queries[h, i, c]
            nc = 0
            nw = 0
            nr = 0
            ns = 0
            for e in range(E):
                nid = entries[g, e]
                if nid < 0 or nid >= n_graph or vis[nid] == st:
                    continue
                vis[nid] = st
                s = _dot64(q64, keys, kv, nid)
                ns += 1
                acc, nr = _offer(r_s, r_i, nr, k, s, nid)
                acc, nw = _offer(w_s, w_i, nw, L, s, nid)
                if acc or nr < k:
                    nc = _max_push(c_s, c_i, nc, s, nid)
            while nc > 0:
                cs = c_s[0]
                node = c_i[0]
                if nw == L and nr == k and _worse(cs, node, w_s[0], w_i[0]):
                    break
                nc = _max_pop(c_s, c_i, nc)
                # gather the unvisited neighbours first, then score them (independent loads overlap)
                nn = 0
                for m in range(M):
                    nb = adj[g, node, m]
                    if nb < 0:
                        break
                    if vis[nb] != st:
                        vis[nb] = st
                        nbuf[nn] = nb
                        nn += 1
                for m in range(nn):
                    sbuf[m] = _dot64(q64, keys, kv, nbuf[m])
                ns += nn
                for m in range(nn):
                    s = sbuf[m]
                    nb = nbuf[m]
                    acc, nr = _offer(r_s, r_i, nr, k, s, nb)
                    acc, nw = _offer(w_s, w_i, nw, L, s, nb)
                    if acc or nr < k:
                        nc = _max_push(c_s, c_i, nc, s, nb)
            # exact scan of the tail (keys added after the graph was built)
            for j in range(n_graph, n_total):
                s = _dot64(q64, keys, kv, j)
                ns += 1
                acc, nr = _offer(r_s, r_i, nr, k, s, j)
            # heap sort the results: the worst goes to the end
            for end in range(nr - 1, -1, -1):
                out_ids[h, i, end] = r_i[0]
                out_sc[h, i, end] = np.float32(r_s[0])
                if end > 0:
                    ls = r_s[end]
                    li = r_i[end]
                    _min_replace_root(r_s, r_i, end, ls, li)
            for r in range(nr, k):
                out_ids[h, i, r] = -1
                out_sc[h, i, r] = -np.inf
            out_ns[h, i] = ns


# ---------------------------------------------------------------------------------------------------
# exact top-k selection over a score matrix (for the kNN steps; the matmul itself is torch)
# ---------------------------------------------------------------------------------------------------
@njit(nogil=True, cache=True)
def _sift_down(hid, hsc, size, pos):
    while True:
        l = 2 * pos + 1
        if l >= size:
            return
        w = l
        r = l + 1
        if r < size and _worse(hsc[r], hid[r], hsc[l], hid[l]):
            w = r
        if _worse(hsc[w], hid[w], hsc[pos], hid[pos]):
            hsc[w], hsc[pos] = hsc[pos], hsc[w]
            hid[w], hid[pos] = hid[pos], hid[w]
            pos = w
        else:
            return


@njit(parallel=True, nogil=True, cache=True)
def topk_merge_rows(S, col0, colmap, colbias, exclude, ids, sc, cnt):
    """Merge the columns of score block S [r, c] into running top-k *heaps* ids [r, k] int32 / sc [r, k]
    float32 (root = worst; ``cnt [r]`` valid entries). Column j of the block is key ``colmap[col0 + j]``
    with score ``S[row, j] - colbias[col0 + j]`` (a bias turns ``2 q.k`` into ``-|q-k|^2 + |q|^2``).
    Column ``exclude[row]`` is skipped (self-matches for key-key kNN; -1 = none). Call
    :func:`topk_finalize` after the last block. Ranking: score descending, ties smaller id first, whatever
    the column order (a random column order avoids the many heap insertions of rows that trend with
    position, as attention scores do)."""
    r, c = S.shape
    k = ids.shape[1]
    for row in prange(r):
        ex = exclude[row]
        hid = ids[row]
        hsc = sc[row]
        size = cnt[row]
        root = hsc[0] if size == k else -np.inf
        for j in range(c):
            s = S[row, j] - colbias[col0 + j]
            if size == k and s < root:
                continue  # fast path: the vast majority of columns
            gid = colmap[col0 + j]
            if gid == ex:
                continue
            if size == k:
                if not _worse(root, hid[0], s, gid):
                    continue
                hsc[0] = s
                hid[0] = gid
                _sift_down(hid, hsc, size, 0)
            else:
                pos = size  # sift up
                size += 1
                while pos > 0:
                    par = (pos - 1) >> 1
                    if _worse(s, gid, hsc[par], hid[par]):
                        hsc[pos] = hsc[par]
                        hid[pos] = hid[par]
                        pos = par
                    else:
                        break
                hsc[pos] = s
                hid[pos] = gid
            if size == k:
                root = hsc[0]
        cnt[row] = size


@njit(parallel=True, nogil=True, cache=True)
def topk_finalize(ids, sc, cnt):
    """Sort the heaps of :func:`topk_merge_rows` into best-first lists (-1 / -inf padded)."""
    r, k = ids.shape
    for row in prange(r):
        size = cnt[row]
        hid = ids[row]
        hsc = sc[row]
        # heap sort: repeatedly move the worst (root) to the end of the shrinking heap
        for end in range(size - 1, 0, -1):
            hsc[0], hsc[end] = hsc[end], hsc[0]
            hid[0], hid[end] = hid[end], hid[0]
            _sift_down(hid, hsc, end, 0)
        for j in range(size, k):
            hid[j] = -1
            hsc[j] = -np.inf


# ---------------------------------------------------------------------------------------------------
# graph construction
# ---------------------------------------------------------------------------------------------------
@njit(nogil=True, cache=True)
def _prune_into(pivot, pool, npool, keys, h, M, alpha2, fill, by_count, out_row, dist_buf, sel_buf):
    """Occlusion pruning of candidate ids pool[:npool] for ``pivot``; writes <= M ids into out_row
    (rest -1). Candidates are visited in order of squared L2 distance to the pivot (ties smaller id) or,
    with ``by_count``, of how often they occur in the pool first (co-occurrence in the owner queries' kNN
    lists; then distance, then id). Candidate p is dropped when an already selected r has
    alpha^2 * d(r, p) < d(pivot, p) (squared L2 between keys). With ``fill`` the row is topped up to M with
    the dropped candidates in the same order. pool is not modified."""
    cand = np.sort(pool[:npool])
    cnt = np.zeros(npool, np.int64)
    nc = 0
    last = -2
    for i in range(npool):
        v = cand[i]
        if v < 0 or v == pivot:
            continue
        if v == last:
            cnt[nc - 1] += 1
            continue
        cand[nc] = v
        cnt[nc] = 1
        nc += 1
        last = v
    for i in range(nc):
        dist_buf[i] = _l2(keys, h, pivot, cand[i])
    order = np.argsort(dist_buf[:nc], kind="mergesort")  # stable: ties keep the smaller id first
    if by_count:
        negc = np.empty(nc, np.int64)
        for i in range(nc):
            negc[i] = -cnt[order[i]]
        order = order[np.argsort(negc, kind="mergesort")]
    nsel = 0
    for oi in range(nc):
        c = cand[order[oi]]
        dpc = dist_buf[order[oi]]
        ok = True
        for r in range(nsel):
            if alpha2 * _l2(keys, h, sel_buf[r], c) < dpc:
                ok = False
                break
        if ok:
            sel_buf[nsel] = c
            nsel += 1
            if nsel == M:
                break
    if fill and nsel < M:
        for oi in range(nc):
            c = cand[order[oi]]
            dup = False
            for r in range(nsel):
                if sel_buf[r] == c:
                    dup = True
                    break
            if not dup:
                sel_buf[nsel] = c
                nsel += 1
                if nsel == M:
                    break
    for r in range(M):
        out_row[r] = sel_buf[r] if r < nsel else -1


@njit(nogil=True, cache=True)
def owners(knn_ids, knn_sc, n, R):
    """For each graph g and key b: the (up to) R training queries that score b highest among those whose kNN
    list contains b, best first (ties: smaller query index); -1 padded. knn_* [G, m, kq] -> [G, n, R] int32."""
    G, m, kq = knn_ids.shape
    own = np.full((G, n, R), -1, np.int32)
    best = np.full((G, n, R), -np.inf, np.float32)
    for g in range(G):
        for q in range(m):
            for j in range(kq):
                b = knn_ids[g, q, j]
                if b < 0:
                    continue
                s = knn_sc[g, q, j]
                if own[g, b, R - 1] >= 0 and not (s > best[g, b, R - 1]):
                    continue
                pos = R - 1
                while pos > 0 and (own[g, b, pos - 1] < 0 or best[g, b, pos - 1] < s):
                    pos -= 1
                for r in range(R - 1, pos, -1):
                    own[g, b, r] = own[g, b, r - 1]
                    best[g, b, r] = best[g, b, r - 1]
                own[g, b, pos] = q
                best[g, b, pos] = s
    return own


@njit(parallel=True, nogil=True, cache=True)
def project(knn_ids, own, keys, kv_of_graph, n, M, alpha, fill, by_count):
    """Project the query->key bipartite kNN graph onto keys: key b (pivot) takes as candidates the keys of
    its owner queries' kNN lists (``own [G, n, R]``), pruned by occlusion to <= M out-edges (visited by
    co-occurrence count first when ``by_count``).
    -> adj [G, n, M] int32."""
    G, m, kq = knn_ids.shape
    R = own.shape[2]
    adj = np.full((G, n, M), -1, np.int32)
    alpha2 = alpha * alpha
    for p in prange(G * n):
        g = p // n
        b = p - g * n
        if own[g, b, 0] < 0:
            continue
        pool = np.empty(R * kq, np.int32)
        npool = 0
        for r in range(R):
            q = own[g, b, r]
            if q < 0:
                break
            for j in range(kq):
                pool[npool] = knn_ids[g, q, j]
                npool += 1
        dist_buf = np.empty(npool, np.float64)
        sel_buf = np.empty(M, np.int32)
        _prune_into(b, pool, npool, keys, kv_of_graph[g], M, alpha2, fill, by_count, adj[g, b], dist_buf, sel_buf)
    return adj


@njit(parallel=True, nogil=True, cache=True)
def merge_edges(adj, src, dst, esize, keys, kv_of_graph, n, alpha, fill):
    """Add edges src[g, :esize[g]] -> dst[g, :esize[g]] to adj [G, cap, M] (in place). A node whose list
    plus new edges fits in M keeps them all (existing first, then new in edge order); otherwise the union
    is re-pruned with occlusion (``_prune_into``), which may drop existing edges."""
    G = adj.shape[0]
    M = adj.shape[2]
    alpha2 = alpha * alpha
    # per graph CSR of incoming new edges, grouped by source node
    ptr = np.zeros((G, n + 1), np.int64)
    for g in prange(G):
        for e in range(esize[g]):
            ptr[g, src[g, e] + 1] += 1
        for v in range(n):
            ptr[g, v + 1] += ptr[g, v]
    maxe = 0
    for g in range(G):
        maxe = max(maxe, esize[g])
    idx = np.empty((G, max(maxe, 1)), np.int32)
    for g in prange(G):
        fillp = ptr[g, :n].copy()
        for e in range(esize[g]):
            s = src[g, e]
            idx[g, fillp[s]] = dst[g, e]
            fillp[s] += 1
    for p in prange(G * n):
        g = p // n
        v = p - g * n
        a, b = ptr[g, v], ptr[g, v + 1]
        if a == b:
            continue
        deg = 0
        while deg < M and adj[g, v, deg] >= 0:
            deg += 1
        pool = np.empty(deg + (b - a), np.int32)
        for r in range(deg):
            pool[r] = adj[g, v, r]
        npool = deg
        for e in range(a, b):
            c = idx[g, e]
            if c == v:
                continue
            dup = False
            for r in range(npool):
                if pool[r] == c:
                    dup = True
                    break
            if not dup:
                pool[npool] = c
                npool += 1
        if npool <= M:
            for r in range(M):
                adj[g, v, r] = pool[r] if r < npool else -1
        else:
            dist_buf = np.empty(npool, np.float64)
            sel_buf = np.empty(M, np.int32)
            _prune_into(v, pool, npool, keys, kv_of_graph[g], M, alpha2, fill, False, adj[g, v], dist_buf, sel_buf)


@njit(nogil=True, cache=True)
def reverse_edges(adj, n):
    """Edge lists (src, dst, esize) of the reversed edges of adj[:, :n] (b -> c becomes c -> b), in order
    of b then slot."""
    G = adj.shape[0]
    M = adj.shape[2]
    cnt = np.zeros(G, np.int64)
    for g in range(G):
        c = 0
        for b in range(n):
            for m in range(M):
                if adj[g, b, m] < 0:
                    break
                c += 1
        cnt[g] = c
    mx = max(1, cnt.max())
    src = np.empty((G, mx), np.int32)
    dst = np.empty((G, mx), np.int32)
    for g in range(G):
        e = 0
        for b in range(n):
            for m in range(M):
                c = adj[g, b, m]
                if c < 0:
                    break
                src[g, e] = c
                dst[g, e] = b
                e += 1
    return src, dst, cnt


@njit(nogil=True, cache=True)
def _bfs(adj, g, n, seeds, nseeds, reached, queue):
    """BFS over adj[g, :n] from seeds (already-reached nodes are skipped); marks ``reached``."""
    head = 0
    tail = 0
    for i in range(nseeds):
        s = seeds[i]
        if s >= 0 and s < n and not reached[s]:
            reached[s] = True
            queue[tail] = s
            tail += 1
    M = adj.shape[2]
    while head < tail:
        v = queue[head]
        head += 1
        for m in range(M):
            c = adj[g, v, m]
            if c < 0:
                break
            if not reached[c]:
                reached[c] = True
                queue[tail] = c
                tail += 1
    return tail


@njit(nogil=True, cache=True)
def reachable(adj, n, entries):
    """reached [G, n] bool: nodes reachable from the entry points of each graph."""
    G = adj.shape[0]
    out = np.zeros((G, n), np.bool_)
    for g in range(G):
        queue = np.empty(n, np.int32)
        _bfs(adj, g, n, entries[g], entries.shape[1], out[g], queue)
    return out


@njit(nogil=True, cache=True)
def link_unreached(adj, keys, kv_of_graph, n, entries, max_rounds):
    """Make every node reachable from the entry points: repeatedly take the first unreached node u, link
    it from its nearest (squared L2) reached node that has a free slot (or, if none has one, overwrite the
    last slot of the nearest reached node), and extend the BFS from u. Rounds repeat until a full BFS
    reaches everything (an overwrite may cut a path). Returns the number of links added per graph."""
    G = adj.shape[0]
    M = adj.shape[2]
    links = np.zeros(G, np.int64)
    for g in range(G):
        h = kv_of_graph[g]
        queue = np.empty(n, np.int32)
        seed = np.empty(1, np.int32)
        for rnd in range(max_rounds):
            reached = np.zeros(n, np.bool_)
            _bfs(adj, g, n, entries[g], entries.shape[1], reached, queue)
            overwrote = False
            for u in range(n):
                if reached[u]:
                    continue
                best_free = -1
                best_free_d = np.inf
                best_any = -1
                best_any_d = np.inf
                for v in range(n):
                    if not reached[v]:
                        continue
                    dv = _l2(keys, h, u, v)
                    if dv < best_any_d:
                        best_any_d = dv
                        best_any = v
                    if adj[g, v, M - 1] < 0 and dv < best_free_d:
                        best_free_d = dv
                        best_free = v
                if best_free >= 0:
                    for m in range(M):
                        if adj[g, best_free, m] < 0:
                            adj[g, best_free, m] = u
                            break
                elif best_any >= 0:
                    adj[g, best_any, M - 1] = u
                    overwrote = True
                else:  # nothing reached at all (entry invalid): make u an extra root
                    pass
                links[g] += 1
                seed[0] = u
                _bfs(adj, g, n, seed, 1, reached, queue)
            if not overwrote:
                break
    return links


@njit(nogil=True, cache=True)
def _link(adj, g, v, c):
    """Add edge v -> c: into a free slot if any, else overwrite the last slot. Returns True on overwrite
    (the overwritten target may lose its only in-edge; callers re-check reachability)."""
    M = adj.shape[2]
    for m in range(M):
        x = adj[g, v, m]
        if x == c:
            return False
        if x < 0:
            adj[g, v, m] = c
            return False
    adj[g, v, M - 1] = c
    return True


@njit(nogil=True, cache=True)
def _append_free(adj, g, v, c):
    M = adj.shape[2]
    for m in range(M):
        x = adj[g, v, m]
        if x == c:
            return
        if x < 0:
            adj[g, v, m] = c
            return


@njit(nogil=True, cache=True)
def attach_trees(adj, parent, pdist, n, branching):
    """Hang every unreached node u (``parent[g, u] >= 0``: its nearest reached node) below its parent:
    the children of a parent v, sorted by distance to v, form a heap-ordered tree of the given branching
    rooted at v (v -> c0, c_i -> c_{B i + 1 .. B i + B}); each child also links back to v where it has a free
    slot. Returns the number of overwritten edges per graph."""
    G = adj.shape[0]
    over = np.zeros(G, np.int64)
    for g in range(G):
        cnt = np.zeros(n + 1, np.int64)
        for u in range(n):
            p = parent[g, u]
            if p >= 0:
                cnt[p + 1] += 1
        for v in range(n):
            cnt[v + 1] += cnt[v]
        kids = np.empty(max(1, cnt[n]), np.int32)
        pos = cnt[:n].copy()
        for u in range(n):  # ascending u: ties in distance keep the smaller id first (stable sort below)
            p = parent[g, u]
            if p >= 0:
                kids[pos[p]] = u
                pos[p] += 1
        for v in range(n):
            a, b = cnt[v], cnt[v + 1]
            if a == b:
                continue
            ch = kids[a:b].copy()
            dd = np.empty(b - a, np.float64)
            for i in range(b - a):
                dd[i] = pdist[g, ch[i]]
            order = np.argsort(dd, kind="mergesort")
            ch = ch[order]
            nc = b - a
            if _link(adj, g, v, ch[0]):
                over[g] += 1
            for i in range(nc):
                for bb in range(1, branching + 1):
                    j = branching * i + bb
                    if j < nc:
                        if _link(adj, g, ch[i], ch[j]):
                            over[g] += 1
                _append_free(adj, g, ch[i], v)
    return over
