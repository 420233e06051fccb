"""The roar projection step (:func:`.kernels.project`) as batched torch ops, for a GPU.

On the CPU the projection costs ~30 us per covered key and thread (pool of the owner queries' kNN lists,
counting, up to ``max_cand`` distances, occlusion pruning): at 128K keys it is most of a layer's build
(docs/BENCHMARKS.md, session 5). Here every step is a tensor operation over a chunk of pivots:

1. pool ``[P, R * kq]`` = the kNN lists of each pivot's owner queries; ids sorted per row, duplicates
   counted (run lengths), the pivot itself and padding dropped;
2. squared L2 distance of every pool entry to its pivot (float32, direct differences);
3. ranking by (count desc, distance asc, id asc) through three stable sorts; the first ``max_cand`` are the
   candidates (exactly the candidates of :func:`.kernels._prune_into`, up to float rounding of distances);
4. occlusion pruning, vectorised over pivots and sequential over the candidate rank (the greedy is
   inherently ordered): candidate ``c`` is kept unless an already kept ``r`` has
   ``alpha^2 d(r, c) < d(pivot, c)`` (compared in float64 as the kernel does), until ``M`` are kept.

Results equal the compiled kernel's except where two distances differ only in their last float32 bits
(summation order); the tests compare them on random data. ``fill`` is not supported (the kernel handles it).

Measured on the H200 (docs/BENCHMARKS.md, session 6): one 128K-key layer (8 graphs) takes 23 s here against
8 s for the compiled kernel on the host's 16 cores: step 4's sequential rank loop makes it launch-bound. Kept
as an option and as a second, independently written implementation the kernel is tested against.
"""

from __future__ import annotations

import numpy as np
import torch

#: pivots per chunk of steps 1-3 (their gathered rows dominate: chunk x R*kq x d float32)
POOL_CHUNK = 1024
#: pivots per chunk of step 4 (its pairwise distances: chunk x max_cand^2 float32)
PRUNE_CHUNK = 8192


def _rows(keys: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """keys ``[n, d]`` float32 rows of ``ids`` (any shape, -1 = padding -> row 0)."""
    return keys[ids.clamp_min(0)]


def project_torch(knn_ids: np.ndarray, own: np.ndarray, keys: np.ndarray, kv_of_graph: np.ndarray, n: int, M: int,
                  alpha: float, by_count: bool, max_cand: int, device: str | torch.device = "cpu") -> np.ndarray:
    """Same inputs and output as :func:`.kernels.project` with ``fill=False``: knn_ids ``[G, m, kq]`` int32,
    own ``[G, n, R]`` int32, keys ``[Hkv, >= n, d]`` float32 or uint16 bfloat16 bits, kv_of_graph ``[G]``
    -> adj ``[G, n, M]`` int32 (-1 padded). Runs on ``device``."""
    from .roar import keys_for_knn

    G, m, kq = knn_ids.shape
    R = own.shape[2]
    adj = np.full((G, n, M), -1, np.int32)
    alpha2 = float(alpha) * float(alpha)
    knn_t = torch.from_numpy(np.ascontiguousarray(knn_ids)).to(device).long()
    kh_of = None  # the KV head whose keys are on the device (graphs of one KV head are consecutive)
    for g in range(G):
        h = int(kv_of_graph[g])
        if h != kh_of:
            kh, kh_of = keys_for_knn(keys[h, :n], device), h
        own_g = torch.from_numpy(np.ascontiguousarray(own[g])).to(device).long()  # [n, R]
        piv_all = torch.nonzero(own_g[:, 0] >= 0).flatten()
        if piv_all.numel() == 0:
            continue
        cands, dists = [], []
        for c0 in range(0, piv_all.numel(), POOL_CHUNK):
            piv = piv_all[c0:c0 + POOL_CHUNK]
            c, d = _candidates(knn_t[g], own_g[piv], piv, kh, n, by_count, max_cand)
            cands.append(c)
            dists.append(d)
        C = max(x.shape[1] for x in cands)
        cand = torch.cat([torch.nn.functional.pad(x, (0, C - x.shape[1]), value=-1) for x in cands])
        dpc = torch.cat([torch.nn.functional.pad(x, (0, C - x.shape[1]), value=float("inf")) for x in dists])
        rows_out = []
        for c0 in range(0, cand.shape[0], PRUNE_CHUNK):
            rows_out.append(_prune(cand[c0:c0 + PRUNE_CHUNK], dpc[c0:c0 + PRUNE_CHUNK], kh, M, alpha2))
        adj[g, piv_all.cpu().numpy()] = torch.cat(rows_out).cpu().numpy()
    return adj


def _candidates(knn_g, own_p, piv, kh, n, by_count, max_cand):
    """Steps 1-3 for pivots ``piv [P]`` with owners ``own_p [P, R]``: -> candidate ids ``[P, C]`` (-1 padded,
    best first) and their float32 squared distances to the pivot ``[P, C]`` (+inf at padding)."""
    P, R = own_p.shape
    pool = knn_g[own_p.clamp_min(0)]  # [P, R, kq]
    pool = pool.masked_fill((own_p < 0).unsqueeze(-1), -1).reshape(P, -1)
    pool = pool.masked_fill(pool == piv.unsqueeze(1), -1)
    s = torch.where(pool < 0, n, pool).sort(dim=1).values  # ids ascending, padding (n) last
    valid = s < n
    start = torch.ones_like(valid)
    start[:, 1:] = s[:, 1:] != s[:, :-1]
    start &= valid
    run = (start.long().cumsum(1) - 1).clamp_min(0)  # run (distinct id) index of each entry
    counts = torch.zeros_like(s).scatter_add_(1, run, valid.long())
    cnt = counts.gather(1, run) if by_count else valid.long()
    diff = _rows(kh, torch.where(valid, s, 0)) - kh[piv].unsqueeze(1)  # [P, L, d]
    dist = (diff * diff).sum(-1)  # float32
    # rank: count desc, distance asc, id asc (entries are id-ascending already: stable sorts keep that order)
    dist = torch.where(start, dist, torch.full_like(dist, float("inf")))
    o = torch.sort(dist, dim=1, stable=True).indices
    key_cnt = torch.where(start, cnt, torch.full_like(cnt, -1)).gather(1, o)
    o2 = torch.sort(-key_cnt, dim=1, stable=True).indices
    order = o.gather(1, o2)
    C = min(max_cand, s.shape[1])
    top = order[:, :C]
    ok = start.gather(1, top)
    cand = torch.where(ok, s.gather(1, top), torch.full_like(top, -1))
    return cand, torch.where(ok, dist.gather(1, top), torch.full_like(dist[:, :C], float("inf")))


def _prune(cand, dpc, kh, M, alpha2):
    """Step 4: occlusion pruning of ranked candidates ``cand [P, C]`` (distances ``dpc``) -> ``[P, M]`` int32."""
    P, C = cand.shape
    x = _rows(kh, cand)  # [P, C, d]
    D = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist").square()  # [P, C, C] float32
    dpc64 = dpc.double()
    valid = cand >= 0
    sel = torch.zeros((P, C), dtype=torch.bool, device=cand.device)
    nsel = torch.zeros(P, dtype=torch.long, device=cand.device)
    for c in range(C):
        occluded = (sel & (alpha2 * D[:, :, c].double() < dpc64[:, c:c + 1])).any(1)
        keep = valid[:, c] & ~occluded & (nsel < M)
        sel[:, c] = keep
        nsel += keep.long()
    rank = sel.long().cumsum(1) - 1  # slot of each kept candidate
    out = torch.full((P, M + 1), -1, dtype=torch.long, device=cand.device)
    out.scatter_(1, torch.where(sel, rank, torch.full_like(rank, M)), torch.where(sel, cand, torch.full_like(cand, -1)))
    return out[:, :M].to(torch.int32)
