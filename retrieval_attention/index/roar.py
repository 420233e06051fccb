"""``roar``: the attention-aware graph index of RetrievalAttention (RoarGraph-style).

Build, per graph (one per KV head, trained on its group's queries, or one per query head: ``graph_per``):

1. exact kNN of each (evenly subsampled, ``max_train_queries``) prefill query among the keys: its top
   ``n_query_neighbors`` keys by inner product (chunked torch matmul, CUDA when available for large
   inputs; numba heap selection);
2. projection of that query->key bipartite graph onto the keys: each key that appears in some query's
   list (the *covered* keys) takes its ``n_owners`` owner queries (those that score it highest) and gets as
   out-neighbour candidates the keys of their lists, visited by co-occurrence count in those lists (keys
   retrieved together by the same queries first; ``order="distance"`` gives the classic L2 order) and
   pruned by occlusion with **squared L2 distance between keys**: candidate p is dropped when an already
   selected r has ``alpha^2 d(r,p) < d(pivot,p)``. L2 rather than an inner-product "distance": the inner
   product is not a metric, and large-norm keys would occlude everything. With ``fill`` the list is
   topped up to ``M`` with the dropped candidates (measured worse per key scanned, so off by default);
3. reverse edges: every edge b->c adds c->b; a list that overflows ``M`` is re-pruned (L2 order);
4. connectivity repair (cheap, no per-node beam search): every key not reachable from the entry point
   (typically 55-75% on real vectors: keys no training query ranks high) finds its nearest reachable key
   (squared L2, one chunked matmul of unreached x reached keys, at most 2048 of the reached keys evenly
   sampled); the unreached keys that share a parent are hung below it as a small tree
   (``repair_branching``, closest first; one slot of the parent, free slots of the children, plus a back
   edge child -> parent); a final pass links any node still unreached (an overwritten slot can cut a
   path) from its nearest reached node, until a BFS from the entry reaches every key.

Entry points (:func:`entry_points`): the key scoring highest against the graph's mean training query, plus
the top-1 keys of ``n_entry - 1`` mutually distant training queries (farthest-point selection). A single
mean-query entry left one query head at recall 0 on SmolLM2 at 32K (layer 14, query-head graphs): its decode
queries' top keys lay in a region the entry's region only reached through low-scoring keys.

Search (:func:`kernels.search_batch`): every query head x query of the layer in one numba call, parallel
over (head, query) pairs. Best-first beam search over the ``ef`` best nodes scored so far: with ``ef >= k`` the
beam is one sorted array and the next node expanded is its best unexpanded entry; with ``ef < k`` (fewer keys
scanned, lower recall) an HNSW-style candidate heap drives it and every key scored is offered to a
top-``k`` result heap. Both expand the same nodes in the same order for ``ef >= k``. Keys added after build (``add``) sit in an exact-scanned
*tail* merged by score; when the tail reaches ``insert_threshold`` keys it is inserted into the graphs in
bulk (exact L2 kNN of the new keys -> out-lists, reverse edges re-pruned, the connectivity repair again), in a
background thread on a copy of the graphs that replaces them ``insert_lag`` added keys later.

Memory: keys ``[n_kv_heads, cap, d]`` (one copy, the tail at its end) in float32 or, with
``storage="bfloat16"``, as uint16 bfloat16 bits (half the bytes; the kernels convert on load, exactly) +
adjacency int32 ``[n_graphs, cap, M]``. Per-worker search scratch (visited bitsets, candidate heaps) is a
process-wide pool shared by all indexes (:func:`.decode_kernels.scratch`).
"""

from __future__ import annotations

import math
import threading
import time

import numba
import numpy as np
import torch

from . import decode_kernels as DK
from . import kernels as K
from .base import IndexError_, KVIndex, Residual, register_index, spare_rows  # noqa: F401 (Residual: annotations)
from ..hostmem import huge_copy, huge_empty, huge_full
from .bf16 import as_float32, bits_as_tensor, f32_to_bf16_bits

GRAPH_PER = ("query_head", "kv_head")
#: how the projection step runs: the compiled CPU kernel, batched torch ops (on the GPU when there is one; same
#: graph, see :mod:`.projection_torch`; 3x faster than the kernel on 16 cores on the H200 host, docs/BENCHMARKS.md
#: session 9), or "auto": torch when CUDA is available, else the kernel
PROJECTION = ("auto", "kernel", "torch")
#: searches of a GQA group's query heads: ``"none"`` (one per head), ``"pairs"`` (two heads of a group in one
#: shared pass over their KV head's graph, :func:`.kernels.search_two`; per-KV-head graphs, ef >= k) or ``"auto"``
#: (pairs when the build measures that paired heads want the same keys: trained models yes, random weights no)
SHARE = ("none", "pairs", "auto")
#: ``share="auto"``: paired heads share their passes when the mean overlap of their exact top-``PAIR_PROBE_K`` keys,
#: at ``PAIR_PROBE_POSITIONS`` prefill positions, is at least this. Measured: real SmolLM2 8K layers 0.12-0.48
#: (mean 0.27), independent random projections (random-weight models) 0.002
PAIR_OVERLAP_MIN = 0.05
PAIR_PROBE_K = 16
PAIR_PROBE_POSITIONS = 32
#: key storage of the index: float32, or bfloat16 (uint16 bits, rounded to nearest even; half the memory)
STORAGE = ("float32", "bfloat16")
#: ``resident_keys`` values: do the GPU build stages share one device copy of a layer's keys (:class:`KeysOnDevice`)
RESIDENT_KEYS = ("auto", True, False)
#: how the fused decode call hands (query head, query) pairs to its workers: ``"snake"`` (fixed ranks by the
#: previous call's cost) or ``"dynamic"`` (a shared atomic counter, longest expected first)
SCHEDULES = ("snake", "dynamic")

#: training queries per graph when ``max_train_queries`` is not given: ``MIN_TRAIN_QUERIES`` at
#: ``TRAIN_REF_KEYS`` keys or fewer, growing with the square root of the key count above (8,192 at 128K keys,
#: 16,384 at 512K). Since the training queries are rotated to the decode phase
#: (``RetrievalConfig.align_train_queries``) fewer of them give the same graph: SmolLM2 recall@100 at equal keys
#: scanned (docs/BENCHMARKS.md session 15), at 32K (6 layers) 0.942 @ 1.87% / 0.965 @ 2.19% with 8,192 per graph
#: (the rule before), 0.947 @ 1.83% / 0.967 @ 2.13% with 4,096, 0.948 @ 1.76% / 0.966 @ 2.05% with 2,048 (build
#: 3.30 / 1.93 / 1.24 s per layer on 2 cores); at 8K 0.947 / 0.950 / 0.955 at 8% with 4,096 / 2,048 / 1,024, but
#: 2,048 gave a slightly higher KL against full attention end to end (0.0018-0.0020 vs 0.0017), so the minimum
#: stays 4,096. Without that rotation recall needed twice as many (session 8, at 128K: 0.924 at 1.9% with 4,096
#: per graph, 0.958 at 2.0% with 8,192, 0.970 at 2.1% with 16,384)
MIN_TRAIN_QUERIES = 4096
TRAIN_REF_KEYS = 32768


def auto_train_queries(n_keys: int) -> int:
    """Training queries per graph (or per query head) for ``n_keys`` keys when no count is given:
    ``max(MIN_TRAIN_QUERIES, MIN_TRAIN_QUERIES * sqrt(n_keys / TRAIN_REF_KEYS))`` (integer square root)."""
    return max(MIN_TRAIN_QUERIES, math.isqrt(MIN_TRAIN_QUERIES * MIN_TRAIN_QUERIES * int(n_keys) // TRAIN_REF_KEYS))


#: beam widths the per-head calibration (``target_recall``) chooses from
CALIB_LADDER = (16, 24, 32, 40, 48, 56, 64, 80, 100, 128, 160, 200, 256, 320, 400, 512, 640, 800, 1024)
#: the calibration measures recall@CALIB_K against exact top-CALIB_K (the method's top-k)
CALIB_K = 100
#: at least this many held-out queries per query head, else no calibration (uniform ``ef``)
CALIB_MIN = 8


#: "no cap" for the kernels' candidate limit
_NO_CAP = 2**62
#: bytes of float32 score matrix per matmul chunk in the kNN steps
_CHUNK_BYTES = 64 << 20
#: kNN problems with at least this many query x key scores run on the GPU when there is one
_CUDA_MIN_SCORES = 1 << 24
#: bytes of float32 score matrix per GPU chunk (rows of all keys at once, then torch.topk)
_CUDA_CHUNK_BYTES = 1 << 30
#: at most this many reached keys are candidate parents of unreached keys in the repair (cost bound)
_REPAIR_PARENTS = 2048


def _pos_int(name, v, minimum=1):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
        raise IndexError_(f"roar: {name} must be an integer >= {minimum}, got {v!r}")
    return int(v)


#: value dtypes the compiled fused call takes (float32; uint16 = bfloat16 bits); others take the generic path
_FUSED_VALUE_DTYPES = (np.dtype(np.float32), np.dtype(np.uint16))

_INSERT_WORKER = None


def _submit_insertion(fn, *args):
    """Run a bulk insertion in the background worker (one for every roar index; each insertion is itself
    parallel; the thread exits when no insertion is queued, see :class:`~retrieval_attention.threads.TransientWorkers`)
    and return its Future. numba's ``workqueue`` threading layer cannot run parallel kernels from two threads at
    once: there the insertion runs now, in the caller (the Future is returned done)."""
    from concurrent.futures import Future

    global _INSERT_WORKER
    from ..threads import TransientWorkers, parallel_kernels_concurrent

    if not parallel_kernels_concurrent():
        done: Future = Future()
        done.set_result(fn(*args))
        return done
    if _INSERT_WORKER is None:
        _INSERT_WORKER = TransientWorkers(1, "ra-roar-insert")
    return _INSERT_WORKER.submit(fn, *args)


def _torch_fallback(stage: str, err: Exception,
                    then: str = "this layer's graphs are finished with the CPU kernels instead (the same graph, "
                                "slower). Free GPU memory, or pass projection='kernel' to build the graphs on the "
                                "CPU from the start") -> bool:
    """Warn that a build stage ran out of GPU memory (even with smaller chunks) and continues on the CPU (the
    compiled kernels: the same graph); returns False (off the GPU from then on)."""
    import warnings

    warnings.warn(f"roar: the {stage} ran out of GPU memory ({str(err).splitlines()[0][:160]}); {then}.",
                  RuntimeWarning, stacklevel=3)
    return False


#: chunk-size divisors a GPU build stage is retried with after an out-of-memory error (another thread, e.g. the
#: layer-by-layer prefill, may hold most of a small budget for a moment) before it gives up
SHRINK_STEPS = (1, 4, 16)


#: a GPU build stage's transient buffers (a kNN score chunk of :data:`_CUDA_CHUNK_BYTES` and about as much work
#: space for its top-k; the projection's pools of :data:`.projection_torch.POOL_BYTES` are smaller) may take at most
#: this share of the device memory still allocatable: under a tight budget the stages start with smaller chunks
#: (the builds' out-of-memory errors are retried, but the prefill they overlap has no such fallback: the 8B shape
#: at 512K under 24 GB ran out of memory in its 5th layer with two builds at full chunk size, session 19)
BUILD_SHARE_OF_HEADROOM = 0.25


def first_shrink() -> int:
    """The first of :data:`SHRINK_STEPS` whose chunks fit :data:`BUILD_SHARE_OF_HEADROOM` of the current CUDA
    device's headroom (:func:`retrieval_attention.gpumem.cuda_headroom`); the first step without CUDA in use."""
    from ..gpumem import cuda_headroom, cuda_in_use

    if not cuda_in_use():
        return SHRINK_STEPS[0]

    room = BUILD_SHARE_OF_HEADROOM * cuda_headroom(torch.cuda.current_device())
    for s in SHRINK_STEPS:
        if 2 * _CUDA_CHUNK_BYTES / s <= room:
            return s
    return SHRINK_STEPS[-1]


#: per thread: the chunk record of the build running on it (:func:`chunk_record`), or None
_CHUNKS = threading.local()


class chunk_record:
    """Context manager: what :func:`with_smaller_chunks` did on this thread meanwhile, as a dict: ``calls``
    (GPU stages run), ``max_shrink`` (the largest chunk divisor a stage started or finished with, 1 = full-size
    chunks) and ``oom_retries`` (out-of-memory errors retried with smaller chunks; each releases the allocator's
    cached blocks, which waits for the whole device). Under a tight GPU budget these say whether a build ran with
    smaller chunks than when it runs alone."""

    def __enter__(self) -> dict:
        self._outer = getattr(_CHUNKS, "record", None)
        _CHUNKS.record = self.record = {"calls": 0, "max_shrink": 0, "oom_retries": 0}
        return self.record

    def __exit__(self, *exc) -> None:
        _CHUNKS.record = self._outer
        if self._outer is not None:  # a nested record's counts belong to the outer one too
            self._outer["calls"] += self.record["calls"]
            self._outer["oom_retries"] += self.record["oom_retries"]
            self._outer["max_shrink"] = max(self._outer["max_shrink"], self.record["max_shrink"])


def with_smaller_chunks(fn, *args, **kwargs):
    """``fn(*args, shrink=s, **kwargs)`` for ``s`` in :data:`SHRINK_STEPS` from :func:`first_shrink` on (``fn``
    divides its chunk sizes by ``s``) until one call runs without a CUDA out-of-memory error; the cached blocks
    are released between tries. The last try's error propagates. ``fn`` must leave its outputs unchanged or
    wholly rewritten on a retry. Counted in the thread's :class:`chunk_record`, if any."""
    steps = SHRINK_STEPS[SHRINK_STEPS.index(first_shrink()):]
    record = getattr(_CHUNKS, "record", None)
    if record is not None:
        record["calls"] += 1
    for i, s in enumerate(steps):
        if record is not None:
            record["max_shrink"] = max(record["max_shrink"], s)
        try:
            return fn(*args, shrink=s, **kwargs)
        except torch.OutOfMemoryError:
            if i == len(steps) - 1:
                raise
            if record is not None:
                record["oom_retries"] += 1
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def _worth_cuda(m: int, n: int) -> bool:
    """Whether a kNN-like problem of ``m`` query rows over ``n`` keys runs on the GPU: CUDA is available and it
    has at least :data:`_CUDA_MIN_SCORES` scores (smaller ones cost more in transfers than they save)."""
    return torch.cuda.is_available() and m * n >= _CUDA_MIN_SCORES


def knn_ip(queries: np.ndarray, keys, k: int, exclude: np.ndarray | None = None, l2: bool = False,
           allow_cuda: bool = True):
    """Exact top-k keys per query. queries [m, d] float32, keys [n, d] float32 or uint16 bfloat16 bits (or
    a float32 torch tensor, e.g. already on the GPU: see :func:`keys_for_knn`) -> ids [m, k] int32, scores
    [m, k] float32.

    ``l2=True`` ranks by smallest squared L2 distance instead (score ``2 q.k - |k|^2``, same order).
    ``exclude [m]``: a key id to skip per query (self-matches). On the CPU: torch matmul, selection by a numba
    heap kernel over the columns in a fixed random order (ties: smaller id first). With CUDA (and a large
    problem) matmul and ``torch.topk`` both run on the GPU and only the top-k come back (ties within the
    top-k: smaller id first; which of several keys tied at the k-th score is kept is unspecified); out of GPU
    memory it retries with smaller chunks (:func:`with_smaller_chunks`), then numpy keys fall back to the CPU
    path with a warning (a GPU tensor's error propagates). ``allow_cuda=False`` keeps numpy keys on the CPU path."""
    m, d = queries.shape
    n = keys.shape[0]
    ids = np.full((m, k), -1, np.int32)
    sc = np.full((m, k), -np.inf, np.float32)
    if m == 0 or n == 0:
        return ids, sc
    excl = np.full(m, -1, np.int64) if exclude is None else np.ascontiguousarray(exclude, np.int64)
    if isinstance(keys, torch.Tensor):
        if keys.device.type != "cpu":
            return with_smaller_chunks(knn_ip_torch, queries, keys, k, excl, l2, ids, sc, keys.device)
        keys = keys.numpy()
    if allow_cuda and _worth_cuda(m, n):
        try:
            return with_smaller_chunks(knn_ip_torch, queries, keys, k, excl, l2, ids, sc, "cuda")
        except torch.OutOfMemoryError as e:
            _torch_fallback("exact kNN", e, "this kNN runs on the CPU instead (the same result, slower); free GPU "
                                            "memory to keep it on the GPU")
    keys = as_float32(keys)
    cnt = np.zeros(m, np.int64)
    dev = "cpu"
    perm = np.random.default_rng(n).permutation(n).astype(np.int64)
    kp = keys[perm]
    bias = (kp * kp).sum(1, dtype=np.float32) if l2 else np.zeros(n, np.float32)
    Kt = torch.from_numpy(kp).to(dev)
    Qt = torch.from_numpy(2 * queries if l2 else queries).to(dev)
    col_chunk = n if n * 4 * 256 <= _CHUNK_BYTES else max(1024, _CHUNK_BYTES // (4 * 256))
    row_chunk = max(256, _CHUNK_BYTES // (4 * col_chunk))
    for r0 in range(0, m, row_chunk):
        r1 = min(m, r0 + row_chunk)
        for c0 in range(0, n, col_chunk):
            c1 = min(n, c0 + col_chunk)
            S = (Qt[r0:r1] @ Kt[c0:c1].T).cpu().numpy()
            K.topk_merge_rows(S, c0, perm, bias, excl[r0:r1], ids[r0:r1], sc[r0:r1], cnt[r0:r1])
    K.topk_finalize(ids, sc, cnt)
    return ids, sc


def keys_for_knn(keys, device) -> torch.Tensor:
    """keys [n, d] (float32, uint16 bfloat16 bits, or a tensor) as a float32 tensor on ``device``; bfloat16
    bits travel as bfloat16 (half the bytes) and are converted there."""
    if isinstance(keys, torch.Tensor):
        return keys.to(device).float()
    if keys.dtype == np.uint16:
        return bits_as_tensor(np.ascontiguousarray(keys)).to(device).float()
    return torch.from_numpy(np.ascontiguousarray(keys, np.float32)).to(device)


class KeysOnDevice:
    """A layer's keys ``[Hkv, >= n, d]`` (numpy float32, or uint16 bfloat16 bits) for the GPU build stages
    (kNN, projection, reverse edges, repair), read one KV head at a time: :meth:`head` ``(h) -> [n, d]`` float32
    on ``device``. ``resident=True`` copies every head's first ``n`` keys to the device once, as stored (bfloat16
    stays bfloat16: half the bytes; converted per :meth:`head`, on the device), so the four stages share one
    host->device copy; otherwise each :meth:`head` call copies its head unless it is the last one asked for.
    ``resident="auto"``: on CUDA, when the copy fits :data:`BUILD_SHARE_OF_HEADROOM` of the headroom. Session 19's
    profile of one 128K layer build: the keys crossed four times (~110 of its 149 ms of host->device copies, of
    703 ms of GPU time). Consumers must not write into the returned tensor (float32 storage returns a view)."""

    def __init__(self, keys: np.ndarray, n: int, device, resident="auto"):
        self.keys, self.n, self.device = keys, n, torch.device(device)
        self._last: tuple[int, torch.Tensor] | None = None
        Hkv, d = keys.shape[0], keys.shape[2]
        nbytes = Hkv * n * d * keys.dtype.itemsize
        if resident == "auto":
            resident = self.device.type == "cuda" and nbytes <= self._room()
        self.resident: torch.Tensor | None = None
        if resident:
            dt = torch.bfloat16 if keys.dtype == np.uint16 else torch.float32
            self.resident = torch.empty((Hkv, n, d), dtype=dt, device=self.device)
            for h in range(Hkv):  # rows 0..n-1 of one head are contiguous (the spare rows follow them)
                src = np.ascontiguousarray(keys[h, :n])
                self.resident[h].copy_(bits_as_tensor(src) if keys.dtype == np.uint16 else torch.from_numpy(src))

    def _room(self) -> float:
        """Bytes a resident copy may take: :data:`BUILD_SHARE_OF_HEADROOM` of the device's headroom (0 where
        CUDA cannot report it: a build with CUDA simulated, or torch without CUDA)."""
        from ..gpumem import cuda_headroom

        try:
            return BUILD_SHARE_OF_HEADROOM * cuda_headroom(self.device)
        except (AssertionError, RuntimeError):
            return 0.0

    def head(self, h: int) -> torch.Tensor:
        """KV head ``h``'s keys ``[n, d]`` float32 on the device."""
        if self.resident is not None:
            return self.resident[h].float()
        if self._last is None or self._last[0] != h:
            self._last = (h, keys_for_knn(self.keys[h, :self.n], self.device))
        return self._last[1]


def knn_ip_torch(queries, keys, k, excl, l2, ids, sc, device, shrink: int = 1):
    """GPU body of :func:`knn_ip` (matmul + ``torch.topk`` on ``device``; same outputs): ``excl [m]`` int64
    (-1 = none), ``ids [m, k]`` / ``sc [m, k]`` its -1 / -inf initialised result arrays, filled and returned.
    Score chunks of :data:`_CUDA_CHUNK_BYTES` / ``shrink``."""
    m, n = queries.shape[0], keys.shape[0]
    kk = min(k, n)
    Kt = keys_for_knn(keys, device)
    Qt = torch.from_numpy(np.ascontiguousarray(queries)).to(device)
    if l2:
        Qt = 2 * Qt
        bias = (Kt * Kt).sum(1)
    ex = torch.from_numpy(excl).to(device)
    rows = max(1, _CUDA_CHUNK_BYTES // shrink // (4 * n))
    for r0 in range(0, m, rows):
        r1 = min(m, r0 + rows)
        S = Qt[r0:r1] @ Kt.T
        if l2:
            S -= bias
        e = ex[r0:r1]
        has = e >= 0
        if bool(has.any()):
            S[torch.nonzero(has).flatten(), e[has]] = float("-inf")
        v, i = topk_rows(S, kk)
        # best first, ties smaller id, on the device: ids ascending, then a stable sort by score (was a host
        # np.lexsort per chunk)
        i, o = torch.sort(i, dim=1)
        v, o = torch.sort(torch.gather(v, 1, o), dim=1, descending=True, stable=True)
        i = torch.gather(i, 1, o)
        v, i = v.cpu().numpy(), i.cpu().numpy()
        ids[r0:r1, :kk] = np.where(np.isneginf(v), -1, i)  # -inf: an excluded key (only when k >= n), last
        sc[r0:r1, :kk] = v
    return ids, sc


def nearest_rows_torch(keys, rows: np.ndarray, among: np.ndarray, device, shrink: int = 1):
    """For each key ``rows [u]`` (int64 ids into ``keys [n, d]``: float32 or uint16 bfloat16 bits, or a float32
    tensor already on ``device``), the nearest key of ``among [r]`` by squared L2 (ties: the first in ``among``'s
    order) -> ``(ids [u] int64 from among, squared distances [u] float32)``. The keys go to ``device`` once
    (bfloat16 travels as such) and every row is gathered there; scores ``2 k_u . k_r - |k_r|^2`` in chunks of
    :data:`_CUDA_CHUNK_BYTES` / ``shrink``. The repair's parent search on the GPU: the CPU path gathered and
    converted the unreached keys' rows on the host and copied them to the device, for every graph (~36 MB at
    128K keys when 55% of them are unreached)."""
    kh = keys_for_knn(keys, device)
    ku = kh[torch.from_numpy(np.ascontiguousarray(rows, np.int64)).to(kh.device)]
    kr = kh[torch.from_numpy(np.ascontiguousarray(among, np.int64)).to(kh.device)]
    bias = (kr * kr).sum(1)
    step = max(1, _CUDA_CHUNK_BYTES // shrink // (4 * max(1, kr.shape[0])))
    best = torch.empty(ku.shape[0], dtype=torch.long, device=kh.device)
    dist = torch.empty(ku.shape[0], dtype=torch.float32, device=kh.device)
    for r0 in range(0, ku.shape[0], step):
        x = ku[r0:r0 + step]
        sc, j = torch.max(2.0 * (x @ kr.T) - bias, dim=1)  # first of equal maxima
        best[r0:r0 + step] = j
        dist[r0:r0 + step] = (x * x).sum(1) - sc
    return among[best.cpu().numpy()], dist.cpu().numpy()


#: :func:`topk_rows` selects through group maxima when its groups hold at least this many columns
_TOPK_MIN_GROUP = 4


def topk_rows(S: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` values of each row of ``S [r, n]`` (``k <= n``) and their column indices, each ``[r, k]``, values
    largest first, as ``torch.topk`` gives them (which of several columns tied at the k-th value is kept is
    unspecified), through group maxima: the columns split into groups of ``gs`` (a power of two near
    ``sqrt(n / k)``); every top-k value lies in a group whose maximum is at least the k-th value, and fewer than
    ``k`` groups have a larger maximum, so the ``k`` groups of the largest maxima hold the top-k values. One pass
    over ``S`` (the maxima) and two small selections (``n / gs`` maxima, ``k * gs`` gathered values) instead of a
    selection over all ``n`` columns. Per 1 GiB score chunk on an H100 host: 1.6 ms against 3.2 ms for
    ``torch.topk`` (docs/BENCHMARKS.md, session 19; ``docs/bench/scripts/knn_topk.py``)."""
    r, n = S.shape
    gs = 1 << max(0, round(math.log2(math.sqrt(n / max(k, 1))))) if k < n else 1
    G = n // gs
    if gs < _TOPK_MIN_GROUP or G < k:
        return torch.topk(S, k, dim=1)
    main = S[:, : G * gs].view(r, G, gs)
    top_g = torch.topk(main.amax(dim=2), k, dim=1).indices  # [r, k] groups
    cand = torch.gather(main, 1, top_g.unsqueeze(2).expand(r, k, gs)).reshape(r, k * gs)
    cols = (top_g.unsqueeze(2) * gs + torch.arange(gs, device=S.device)).reshape(r, k * gs)
    if G * gs < n:  # the last columns, fewer than a group: candidates as they are
        cand = torch.cat([cand, S[:, G * gs:]], dim=1)
        cols = torch.cat([cols, torch.arange(G * gs, n, device=S.device).expand(r, -1)], dim=1)
    v, pos = torch.topk(cand, k, dim=1)
    return v, torch.gather(cols, 1, pos)


def diverse_queries(queries: np.ndarray, n_pick: int) -> np.ndarray:
    """Indices of ``n_pick`` mutually distant queries ``[m, d]`` (farthest-point selection on the unit sphere,
    cosine distance, starting from the query farthest from the mean direction) -> ``[<= n_pick]`` int64."""
    u = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), np.finfo(np.float32).tiny)
    mu = u.mean(0)
    mu /= max(float(np.linalg.norm(mu)), np.finfo(np.float32).tiny)
    dist = 1.0 - u @ mu
    picks = []
    for _ in range(min(n_pick, len(u))):
        j = int(np.argmax(dist))
        picks.append(j)
        dist = np.minimum(dist, 1.0 - u @ u[j])
    return np.asarray(picks, np.int64)


def entry_points(mean_best: int, queries: np.ndarray, top1: np.ndarray, n_entry: int) -> np.ndarray:
    """Entry points of one graph ``[n_entry]`` int32 (-1 padded when fewer distinct keys): the key scoring
    highest against the mean training query (``mean_best``), then the best keys
    (``top1 [m]``, each training query's top-1 key) of ``n_entry - 1`` mutually distant training queries
    ``[m, d]`` (:func:`diverse_queries`). Distinct entries make the graph's separate regions (e.g. keys of
    different prompt parts retrieved by different queries, weakly linked by the projection) all starting
    points of the search: a single entry in the wrong region can leave a query head at recall 0."""
    out = np.full(n_entry, -1, np.int32)
    out[0] = mean_best
    e = 1
    for j in diverse_queries(queries, n_entry - 1):
        c = int(top1[j])
        if c >= 0 and c not in out[:e]:
            out[e] = c
            e += 1
    return out


@register_index("roar")
class RoarIndex(KVIndex):
    """Attention-aware graph over the keys of one layer (see the module docstring).

    Parameters (defaults chosen by measurement on SmolLM2-135M post-RoPE vectors, 8K context):

    M                  out-degree cap of the graph
    n_query_neighbors  keys per training query in the bipartite kNN graph
    alpha              occlusion-pruning factor (>= 1 keeps more edges)
    ef                 default beam width of search, the budget param of ``search`` (may be < k)
    graph_per          ``"query_head"`` (one graph per query head, trained on its queries) or
                       ``"kv_head"`` (one per KV head, trained on its group's queries; G x less memory)
    max_train_queries  training queries per graph (evenly subsampled); ``None``: :func:`auto_train_queries` of the
                       number of keys (4,096 up to 32K keys, then growing as its square root: 8,192 at 128K)
    n_entry            entry points per graph (:func:`entry_points`; 4 fixed a recall-0 head at 32K, was
                       neutral elsewhere at equal keys scanned; 8 lost recall on one head)
    fill               top pruned lists up to ``M`` with the occluded candidates
    n_owners           training queries (the ones scoring a key highest) whose kNN lists give its candidates
    order              candidate order for pruning: ``"count"`` (co-occurrence in those lists, then
                       distance) or ``"distance"`` (L2 to the pivot, the classic RNG order)
    repair_branching   branching of the trees that hang unreached keys below their nearest reached key
    insert_threshold   tail size (keys per head) at which added keys are inserted into the graphs
    insert_lag         keys added after an insertion starts (in a background thread) before its graph replaces
                       the current one (default ``insert_threshold // 2``; 0: insert synchronously). The swap
                       happens at that count on every run, so results do not depend on the job's speed; a
                       128K-key layer's insertion took 17 s on 2 idle cores, which decoding no longer waits for
    schedule           pair-to-worker assignment of the fused decode call (:data:`SCHEDULES`); the same results
    max_candidates     at most this many candidates (the first by the ``order`` ranking) are pruned per node,
                       in the projection and when lists are re-pruned (None: all). Bounds the build cost;
                       128 measured no recall loss at equal keys scanned (SmolLM2 8K: +0.006 / +0.004
                       recall@100 at 8% / 10% scanned vs no cap)
    storage            ``"float32"`` or ``"bfloat16"``: dtype the keys are kept in (bfloat16 halves the
                       memory and the search bandwidth; exact for keys of a bfloat16 model)
    share              ``"none"``, ``"pairs"`` or ``"auto"``: query heads 0-1, 2-3, ... of a GQA group search their KV head's
                       graph in one shared pass (one visited set, each key row loaded once and scored for both;
                       34-37% fewer key rows at equal recall on real SmolLM2 vectors, each head also gaining
                       the keys found for the other). Needs ``graph_per="kv_head"``; with ``ef < k`` heads
                       search separately. Keys scanned are reported per head as the whole pass's. ``"auto"``
                       pairs them when the build finds that paired heads' top keys overlap
                       (:data:`PAIR_OVERLAP_MIN`; ``build_stats["pair_overlap"]``): on trained models, not on
                       random-weight ones, whose heads are independent and gain nothing from sharing. Default
                       ``"none"``: on the 2-core dev VM sharing bought recall at equal ef (+0.9-1.4 points,
                       SmolLM2 8K) but not time per head at equal recall (docs/BENCHMARKS.md, session 10).
    target_recall      per-head beam widths (None: ``ef`` for every head). The build holds out ``calib_queries``
                       training queries per query head, measures their recall@100 against their exact top-100
                       and gives each head the smallest width of :data:`CALIB_LADDER` (up to ``max_ef``,
                       default ``2 * ef``) whose recall reaches this target (bisection over the ladder, a few
                       batched searches). Hard heads get wider beams, easy ones narrower: at the same mean keys
                       scanned, the worst head's recall rises (SmolLM2 8K, 30 layers, aligned queries, 0.93: mean
                       0.950 at 8.08% scanned, worst head 0.911, against 0.826-0.878 at 7.5-8.9% with one ``ef``;
                       with ``graph_per="query_head"``: 0.950 at 7.24%, worst 0.908; docs/BENCHMARKS.md, session 14). A ``search(ef=...)`` still applies that width to every head
    calib_queries      held-out training queries per query head for ``target_recall``
    max_ef             widest beam the calibration may give a head (None: ``2 * ef``)
    projection         ``"kernel"`` (compiled, CPU threads), ``"torch"`` (batched tensor ops on the GPU when
                       there is one, :mod:`.projection_torch`; same graph up to float rounding) or ``"auto"``
                       (torch when CUDA is available, else the kernel). ``fill`` always uses the kernel.
                       Measured on the H200 host: 0.18 s per 128K-key graph with torch against 0.55 s for
                       the kernel on its 16 cores.
    prune              where the torch projection's occlusion pruning runs: ``"triton"`` (one kernel,
                       :mod:`.prune_triton`), ``"torch"`` (tensor ops, the reference) or ``"auto"`` (Triton where it
                       can run: CUDA with Triton installed); see :data:`.projection_torch.PRUNE_WITH`
    resident_keys      ``True``: the GPU build stages share one device copy of the layer's keys
                       (:class:`KeysOnDevice`); ``False``: each stage copies one KV head at a time; ``"auto"``:
                       shared on CUDA when the copy fits a share of the free GPU memory. The same graph either way
    """

    budget_params = ("ef",)

    def __init__(self, M: int = 24, n_query_neighbors: int = 64, alpha: float = 1.0, ef: int = 128,
                 graph_per: str = "kv_head", max_train_queries: int | None = None, n_entry: int = 4,
                 fill: bool = False, n_owners: int = 8, order: str = "count", repair_branching: int = 4,
                 insert_threshold: int = 4096, storage: str = "float32",
                 max_candidates: int | None = 128, projection: str = "auto", insert_lag: int | None = None,
                 schedule: str = "snake", share: str = "none", target_recall: float | None = None,
                 calib_queries: int = 64, max_ef: int | None = None, prune: str = "auto",
                 resident_keys: str | bool = "auto") -> None:
        super().__init__(M=M, n_query_neighbors=n_query_neighbors, alpha=alpha, ef=ef, graph_per=graph_per,
                         max_train_queries=max_train_queries, n_entry=n_entry, fill=fill, n_owners=n_owners, order=order,
                         repair_branching=repair_branching, insert_threshold=insert_threshold, storage=storage,
                         max_candidates=max_candidates, projection=projection, insert_lag=insert_lag,
                         schedule=schedule, share=share, target_recall=target_recall, calib_queries=calib_queries,
                         max_ef=max_ef, prune=prune, resident_keys=resident_keys)
        if schedule not in SCHEDULES:
            raise IndexError_(f"roar: schedule must be one of {SCHEDULES}, got {schedule!r}")
        self.schedule = schedule
        self.M = _pos_int("M", M)
        self.n_query_neighbors = _pos_int("n_query_neighbors", n_query_neighbors, 2)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not np.isfinite(alpha) or alpha < 1.0:
            raise IndexError_(f"roar: alpha must be a finite number >= 1, got {alpha!r}")
        self.alpha = float(alpha)
        self.ef = _pos_int("ef", ef)
        if target_recall is not None and (isinstance(target_recall, bool) or not isinstance(target_recall, (int, float))
                                          or not 0.0 < target_recall <= 1.0):
            raise IndexError_(f"roar: target_recall must be a number in (0, 1] or None, got {target_recall!r}")
        self.target_recall = None if target_recall is None else float(target_recall)
        self.calib_queries = _pos_int("calib_queries", calib_queries)
        self.max_ef = 2 * self.ef if max_ef is None else _pos_int("max_ef", max_ef)
        self._ef_of_head: np.ndarray | None = None  # [Hq] int64 beam widths from the calibration
        if graph_per not in GRAPH_PER:
            raise IndexError_(f"roar: graph_per must be one of {GRAPH_PER}, got {graph_per!r}")
        self.graph_per = graph_per
        share = "none" if share is None else share  # (index specs parse "share=none" as None)
        if share not in SHARE:
            raise IndexError_(f"roar: share must be one of {SHARE}, got {share!r}")
        if share == "pairs" and graph_per != "kv_head":
            raise IndexError_("roar: share='pairs' needs graph_per='kv_head' (the paired heads search one graph)")
        self.share = share
        self._pairs_on = share == "pairs"  # "auto": decided by the build (:meth:`_pair_overlap`)
        self._partner_cache = None  # (shared?, graph_of_head, partner [Hq], any pair) of the last call
        self._plan_cache: dict = {}  # nq -> the fused call's task plan for those partners (:meth:`_plan`)
        self._maps_cache: dict = {}  # (Hq, graphs, KV heads) -> :meth:`_graph_maps`
        self.max_train_queries = None if max_train_queries is None else _pos_int("max_train_queries", max_train_queries)
        self.n_entry = _pos_int("n_entry", n_entry)
        self.fill = bool(fill)
        self.n_owners = _pos_int("n_owners", n_owners)
        if order not in ("count", "distance"):
            raise IndexError_(f"roar: order must be 'count' or 'distance', got {order!r}")
        self.order = order
        self.repair_branching = _pos_int("repair_branching", repair_branching)
        self.insert_threshold = _pos_int("insert_threshold", insert_threshold)
        if insert_lag is None:
            insert_lag = self.insert_threshold // 2
        if isinstance(insert_lag, bool) or not isinstance(insert_lag, (int, np.integer)) or insert_lag < 0:
            raise IndexError_(f"roar: insert_lag must be an integer >= 0, got {insert_lag!r}")
        self.insert_lag = int(insert_lag)
        self._pending_insert = None  # (keys it covers, Future of the new graph) of a background insertion
        if storage not in STORAGE:
            raise IndexError_(f"roar: storage must be one of {STORAGE}, got {storage!r}")
        self.storage = storage
        self._key_dtype = np.uint16 if storage == "bfloat16" else np.float32
        self.max_candidates = None if max_candidates is None else _pos_int("max_candidates", max_candidates)
        if projection not in PROJECTION:
            raise IndexError_(f"roar: projection must be one of {PROJECTION}, got {projection!r}")
        self.projection = projection
        from .projection_torch import PRUNE_WITH

        if prune not in PRUNE_WITH:
            raise IndexError_(f"roar: prune must be one of {PRUNE_WITH}, got {prune!r}")
        if prune == "triton":
            from .prune_triton import triton_missing

            if triton_missing():
                raise IndexError_("roar: prune='triton' needs the triton package (pip install triton); use "
                                  "prune='auto' to fall back to the torch pruning without it")
        self.prune = prune
        if not (resident_keys == "auto" or isinstance(resident_keys, bool)):
            raise IndexError_(f"roar: resident_keys must be one of {RESIDENT_KEYS}, got {resident_keys!r}")
        self.resident_keys = resident_keys
        self._lock = threading.Lock()
        self.build_stats: dict[str, float] = {}
        self._last_scanned: np.ndarray | None = None  # keys scanned per pair by the last search_attend call

    # ---- build ------------------------------------------------------------------------------------
    def _build(self, keys, train_queries):
        with chunk_record() as chunks:
            self._build_graphs(keys, train_queries)
        self.build_stats.update({"gpu_stage_calls": float(chunks["calls"]),
                                 "max_shrink": float(chunks["max_shrink"]),
                                 "oom_retries": float(chunks["oom_retries"])})

    def _build_graphs(self, keys, train_queries):
        t0 = time.perf_counter()
        Hkv, n, d = keys.shape
        if train_queries is None:  # no prefill queries: degrade to a key->key graph trained on the keys
            train_queries = keys
        Hq = train_queries.shape[0]
        group = Hq // Hkv
        calib = None
        self._ef_of_head = None
        if self.target_recall is not None:  # held out of the training set: the calibration's queries
            c = min(self.calib_queries, train_queries.shape[1] // 8)
            if c >= CALIB_MIN:
                step = train_queries.shape[1] / c
                rows = (np.arange(c) * step + step / 2).astype(np.int64)  # between the evenly subsampled ones
                calib = np.ascontiguousarray(train_queries[:, rows], np.float32)
                train_queries = np.delete(train_queries, rows, axis=1)
        if self.graph_per == "query_head":
            G = Hq
            kv_of_graph = np.arange(G, dtype=np.int64) // group
            tq = [train_queries[g] for g in range(G)]
        else:
            G = Hkv
            kv_of_graph = np.arange(G, dtype=np.int64)
            tq = [train_queries[h * group:(h + 1) * group].reshape(-1, d) for h in range(Hkv)]
        cap = auto_train_queries(n) if self.max_train_queries is None else self.max_train_queries
        m = min(cap, min(t.shape[0] for t in tq))
        sel = [np.unique(np.linspace(0, t.shape[0] - 1, m).round().astype(np.int64)) for t in tq]
        m = min(len(s) for s in sel)
        tq = np.stack([t[s[:m]] for t, s in zip(tq, sel)])  # [G, m, d]
        kq = min(self.n_query_neighbors, n)

        # the graph is built over the keys as stored (bfloat16: rounded; the compiled kernels read the bits,
        # the torch matmuls get a transient float32 copy of one KV head at a time)
        stored = huge_empty((Hkv, n + spare_rows(n), d), self._key_dtype)  # spare rows for added keys
        if self.storage == "bfloat16":  # rounded to nearest even by torch, written in place (no extra copy)
            bits_as_tensor(stored)[:, :n].copy_(torch.from_numpy(keys))
        else:
            stored[:, :n] = keys
        knn_ids = np.empty((G, m, kq), np.int32)
        knn_sc = np.empty((G, m, kq), np.float32)
        entries = np.full((G, self.n_entry), -1, np.int32)
        on_gpu = _worth_cuda(m + 1, n)
        on_torch = self._projection_on() == "torch"
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        kd = None  # the keys on the device, shared by the build stages (one host->device copy per layer)
        if on_gpu or on_torch:
            try:
                kd = KeysOnDevice(stored, n, dev, self.resident_keys)
            except torch.OutOfMemoryError:  # then every stage copies its heads
                kd = KeysOnDevice(stored, n, dev, False)

        def knn_of_head(h, kh, allow_cuda):
            for g in np.nonzero(kv_of_graph == h)[0]:
                # the graph's mean training query rides along as an extra row: its top key is the first entry
                ids, sc = knn_ip(np.concatenate([tq[g], tq[g].mean(0, keepdims=True)]), kh, kq, allow_cuda=allow_cuda)
                knn_ids[g], knn_sc[g] = ids[:-1], sc[:-1]
                entries[g] = entry_points(int(ids[-1, 0]), tq[g], ids[:-1, 0], self.n_entry)

        for h in range(Hkv):
            if not on_gpu:
                knn_of_head(h, stored[h, :n], False)
                continue
            try:
                knn_of_head(h, kd.head(h), True)
            except torch.OutOfMemoryError as e:
                on_gpu = _torch_fallback("kNN of the training queries", e)
                knn_of_head(h, stored[h, :n], False)
        keys = stored
        t1 = time.perf_counter()

        own = K.owners(knn_ids, knn_sc, n, self.n_owners)
        adj = None
        if on_torch:
            from .projection_torch import add_reverse_edges_torch, project_torch

            try:
                adj = with_smaller_chunks(project_torch, knn_ids, own, kd, kv_of_graph, n, self.M, self.alpha,
                                          self.order == "count", self._cand_cap, dev, prune=self.prune)
            except torch.OutOfMemoryError as e:
                on_torch = _torch_fallback("projection", e)
        if adj is None:
            adj = K.project(knn_ids, own, keys, kv_of_graph, n, self.M, self.alpha, self.fill,
                            self.order == "count", self._cand_cap, numba.get_num_threads())
        t_proj = time.perf_counter()
        if on_torch:
            try:  # writes adj only once every graph is done: an out-of-memory error leaves it as projected
                with_smaller_chunks(add_reverse_edges_torch, adj, kd, kv_of_graph, n, self.alpha, self._cand_cap,
                                    dev, prune=self.prune)
            except torch.OutOfMemoryError as e:
                on_torch = _torch_fallback("reverse edges", e)
        if not on_torch:
            src, dst, cnt = K.reverse_edges(adj, n)
            K.merge_edges(adj, src, dst, cnt, keys, kv_of_graph, n, self.alpha, self.fill, self._cand_cap,
                          numba.get_num_threads())
        t2 = time.perf_counter()

        self._keys = keys  # [Hkv, cap, d] float32 or uint16 bits; graph nodes 0..n_graph-1, tail n_graph..
        self._adj = adj
        self._entries = entries
        self._kv_of_graph = kv_of_graph
        self.n_graph = n
        links = self._repair(device_keys=kd if kd is not None and kd.device.type == "cuda" else None)
        resident = kd is not None and kd.resident is not None
        del kd  # the device copy goes back to the allocator
        t3 = time.perf_counter()
        self.build_stats = {"knn_s": t1 - t0, "graph_s": t2 - t1, "repair_s": t3 - t2, "total_s": t3 - t0,
                            "projection_s": t_proj - t1, "reverse_s": t2 - t_proj,
                            "n_train": float(m), "repair_links": float(links), "resident_keys": float(resident),
                            "covered_frac": float((own[:, :, 0] >= 0).mean())}
        if calib is not None:
            t4 = time.perf_counter()
            self._calibrate(calib)
            self.build_stats["calib_s"] = time.perf_counter() - t4
            self.build_stats["ef_of_head_mean"] = float(self._ef_of_head.mean())
        if self.share == "auto":
            overlap = self._pair_overlap(stored, n, train_queries, group)
            self._pairs_on = overlap is not None and overlap >= PAIR_OVERLAP_MIN
            self.build_stats["pair_overlap"] = float("nan") if overlap is None else overlap
            self.build_stats["pair_probe_s"] = time.perf_counter() - t3

    def _pair_overlap(self, keys, n, train_queries, group) -> float | None:
        """Mean overlap of the exact top-:data:`PAIR_PROBE_K` keys of the heads the decode call would pair
        (:func:`.decode_kernels.pair_partners`) at :data:`PAIR_PROBE_POSITIONS` evenly spaced prefill positions
        (train_queries ``[Hq, T, d]``); None when no heads pair up."""
        partner = DK.pair_partners(np.arange(train_queries.shape[0]) // group)
        if self.graph_per != "kv_head" or n == 0 or not (partner >= 0).any():
            return None
        T, d = train_queries.shape[1], train_queries.shape[2]
        pos = np.unique(np.linspace(0, T - 1, PAIR_PROBE_POSITIONS).round().astype(np.int64))
        k = min(PAIR_PROBE_K, n)
        overlaps = []
        for h in range(keys.shape[0]):  # one kNN per KV head over its group's probe queries
            q = np.ascontiguousarray(train_queries[h * group:(h + 1) * group, pos].reshape(-1, d), np.float32)
            ids = knn_ip(q, keys[h, :n], k)[0].reshape(group, len(pos), k)
            for a in range(group):
                b = partner[h * group + a] - h * group
                if b > a:
                    overlaps.append((ids[a][:, :, None] == ids[b][:, None, :]).any(-1).mean())
        return float(np.mean(overlaps))

    def _calibrate(self, cq: np.ndarray) -> None:
        """Per-head beam widths for ``target_recall`` from held-out queries ``cq [Hq, c, d]`` float32 (see the
        class docstring): bisection over :data:`CALIB_LADDER` (up to ``max_ef``), all heads in each batched search."""
        Hq, c, d = cq.shape
        k = min(CALIB_K, self.n_graph)
        group = Hq // self.n_kv_heads
        exact = np.empty((Hq, c, k), np.int64)
        for h in range(self.n_kv_heads):
            heads = slice(h * group, (h + 1) * group)
            ids, _ = knn_ip(cq[heads].reshape(-1, d), self._f32(self._keys[h, : self.n_graph]), k)
            exact[heads] = ids.reshape(group, c, k)
        ladder = np.array([e for e in CALIB_LADDER if e <= self.max_ef] or [self.max_ef], np.int64)
        lo = np.zeros(Hq, np.int64)
        hi = np.full(Hq, len(ladder) - 1, np.int64)
        while (lo < hi).any():
            mid = (lo + hi) // 2
            ids, _, _ = self._search(cq, k, ef_of_head=ladder[mid])
            hit = (ids[..., :, None] == exact[..., None, :]).any(-1).sum(-1)  # [Hq, c]
            ok = hit.mean(1) / k >= self.target_recall
            open_ = lo < hi
            hi = np.where(open_ & ok, mid, hi)
            lo = np.where(open_ & ~ok, mid + 1, lo)
        self._ef_of_head = ladder[lo]

    def _projection_on(self) -> str:
        """Where the projection step runs: ``"torch"`` or ``"kernel"`` (see the ``projection`` option)."""
        if self.fill or self.projection == "kernel":
            return "kernel"
        if self.projection == "auto":
            return "torch" if torch.cuda.is_available() else "kernel"
        return "torch"

    def _repair(self, adj=None, n=None, keys=None, device_keys: KeysOnDevice | None = None) -> int:
        """Connectivity repair over nodes 0..n-1 of ``adj`` (default: the index's graph, ``n_graph`` nodes; see
        module docstring). Returns the number of edges added by the final per-node linking pass (normally a
        handful). ``device_keys``: the same keys already on the GPU (:class:`KeysOnDevice` over ``n`` keys)."""
        adj = self._adj if adj is None else adj
        n = self.n_graph if n is None else n
        keys = self._keys if keys is None else keys
        kvg = self._kv_of_graph
        G = adj.shape[0]
        reached = K.reachable(adj, n, self._entries)
        if not reached.all():
            parent = np.full((G, n), -1, np.int32)
            pdist = np.zeros((G, n), np.float32)
            gpu_ok = True  # until an out-of-memory error
            kd = device_keys if device_keys is not None else KeysOnDevice(keys, n, "cuda", False)
            for g in range(G):
                un = np.nonzero(~reached[g])[0]
                rr = np.nonzero(reached[g])[0]
                if len(un) == 0 or len(rr) == 0:
                    continue
                if len(rr) > _REPAIR_PARENTS:  # parents from an even sample of the reached keys: bounded cost
                    rr = rr[np.linspace(0, len(rr) - 1, _REPAIR_PARENTS).astype(np.int64)]
                if gpu_ok and _worth_cuda(len(un), len(rr)):
                    try:
                        near, d2 = with_smaller_chunks(nearest_rows_torch, kd.head(int(kvg[g])), un, rr, "cuda")
                        parent[g, un], pdist[g, un] = near, d2
                        continue
                    except torch.OutOfMemoryError as e:
                        gpu_ok = _torch_fallback("connectivity repair", e, "it continues on the CPU (the same "
                                                 "result, slower); free GPU memory to keep it on the GPU")
                ku = self._f32(keys[kvg[g], un])
                nn, sc = knn_ip(ku, keys[kvg[g], rr], 1, l2=True, allow_cuda=False)
                parent[g, un] = rr[nn[:, 0]]
                pdist[g, un] = (ku * ku).sum(1) - sc[:, 0]
            K.attach_trees(adj, parent, pdist, n, self.repair_branching)
        links = K.link_unreached(adj, keys, kvg, n, self._entries, 8)
        return int(links.sum())

    # ---- search -----------------------------------------------------------------------------------
    def _graph_maps(self, Hq: int):
        """``(graph_of_head [Hq], kv_of_head [Hq])`` int64, cached per head count and graph count (callers must not
        write to them; they stay writeable arrays because numba compiles read-only arrays as another type)."""
        key = (Hq, self._adj.shape[0], self.n_kv_heads)
        got = self._maps_cache.get(key)
        if got is None:
            got = self._maps_cache[key] = self._graph_maps_uncached(Hq)
        return got

    def _graph_maps_uncached(self, Hq: int):
        G = self._adj.shape[0]
        kv_of_head = np.arange(Hq, dtype=np.int64) // (Hq // self.n_kv_heads)
        if G == Hq:
            graph_of_head = np.arange(Hq, dtype=np.int64)
        elif G == self.n_kv_heads:
            graph_of_head = kv_of_head
        else:
            raise IndexError_(
                f"roar index has one graph per query head ({G} graphs); queries have {Hq} heads"
            )
        return graph_of_head, kv_of_head

    def _partners(self, graph_of_head: np.ndarray, k: int, L: int) -> tuple[np.ndarray, bool]:
        """``(partner [Hq], any pair)`` for the compiled calls: pairs of heads sharing a pass (``share="pairs"``,
        ``L >= k``), else all -1."""
        shared = self._pairs_on and L >= k
        cache = self._partner_cache
        # per layer call: keep it cheap. The maps come from _graph_maps's cache, so the same heads are the same
        # array object; any other array is compared by value (a tuple of numpy ints costs ~10 us in place)
        if cache is None or cache[0] != shared or (cache[1] is not graph_of_head
                                                   and not np.array_equal(cache[1], graph_of_head)):
            p = DK.pair_partners(graph_of_head) if shared else np.full(len(graph_of_head), -1, np.int64)
            cache = self._partner_cache = (shared, graph_of_head, p, bool((p >= 0).any()))
            self._plan_cache = {}
        return cache[2:]

    def _plan(self, partner: np.ndarray, nq: int) -> tuple:
        """``(tasks [n], mates [n], filled_by_other [Hq * nq])`` of the fused call for the current partners
        (:func:`.decode_kernels.task_plan`; without shared passes every pair is a task of its own), cached per
        ``nq``: it is the same at every decode step."""
        plan = self._plan_cache.get(nq)
        if plan is None:
            plan = self._plan_cache[nq] = DK.task_plan(partner, nq)
        return plan

    def _widths(self, Hq: int, ef, ef_of_head=None):
        """(widest beam, sizing the scratch; narrowest beam, deciding shared passes; per-head widths [Hq] int64 or
        None): an explicit ``ef`` for every head, else the calibrated widths (``target_recall``) when they fit these
        heads, else the default ``ef``."""
        if ef is not None:
            L = _pos_int("ef", ef)
            return L, L, None
        w = self._ef_of_head if ef_of_head is None else np.ascontiguousarray(ef_of_head, np.int64)
        if w is None or len(w) != Hq:
            return self.ef, self.ef, None
        return int(w.max()), int(w.min()), w

    def _search(self, queries, k, ef=None, ef_of_head=None):
        Hq, nq, _ = queries.shape
        L, L_min, L_of_head = self._widths(Hq, ef, ef_of_head)
        graph_of_head, kv_of_head = self._graph_maps(Hq)
        ids = np.empty((Hq, nq, k), np.int64)
        sc = np.empty((Hq, nq, k), np.float32)
        ns = np.empty((Hq, nq), np.int64)
        partner, paired = self._partners(graph_of_head, k, L_min)
        if paired:  # shared passes: through the fused call (its attention output is not used)
            values = np.zeros((self.n_kv_heads, self.n_keys, 1), np.float32)
            out = np.empty((Hq, nq, 1), np.float32)
            lse = np.empty((Hq, nq), np.float32)
            order = DK.task_order(partner, nq, None)
            T = max(1, min(numba.get_num_threads(), len(order)))
            with self._lock, DK.scratch(T, self.n_graph) as w:
                DK.search_attend_batch(self._adj, self._keys, values, self.n_graph, self.n_keys, queries,
                                       graph_of_head, kv_of_head, self._entries, k, L, 1.0, w.visited[:T],
                                       w.cand_s[:T], w.cand_i[:T], out, lse, ns, ids, sc, order, self._keys, 0, 0, 0,
                                       w.taken[:T], np.empty(Hq * nq, np.int64), False, partner, -1, L_of_head)
            return ids, sc, ns
        T = max(1, min(numba.get_num_threads(), Hq * nq))
        with self._lock, DK.scratch(T, self.n_graph) as w:
            K.search_batch(self._adj, self._keys, self.n_graph, self.n_keys, queries, graph_of_head, kv_of_head,
                           self._entries, k, L, w.visited[:T], w.cand_s[:T], w.cand_i[:T], ids, sc, ns, L_of_head)
        return ids, sc, ns

    def search_attend(self, queries, k: int, values: np.ndarray, scaling: float, ef=None, return_ids: bool = False,
                      residual: Residual | None = None, **budget):
        """Fused search + attention (:func:`.decode_kernels.search_attend_batch`); shapes as
        :meth:`KVIndex.search_attend`. float32 and bfloat16-bits values (and residual keys) take the compiled
        path, with the residual estimate inside the same call; others (float16) the generic one."""
        w0 = time.perf_counter()
        values = self._check_values(values)
        res = residual if residual is not None and residual.active else None
        res_keys = None if res is None else np.asarray(res.keys)
        if values.dtype not in _FUSED_VALUE_DTYPES or budget or (
                res_keys is not None and res_keys.dtype not in _FUSED_VALUE_DTYPES):
            self.last_call_loads, self.last_call_timing = None, {}  # the generic path measures neither
            return super().search_attend(queries, k, values, scaling, return_ids=return_ids, residual=residual,
                                         **({} if ef is None else {"ef": ef}), **budget)
        q, k = self._check_search(queries, k, {})
        Hq, nq, _ = q.shape
        L, L_min, L_of_head = self._widths(Hq, ef)
        graph_of_head, kv_of_head = self._graph_maps(Hq)
        out = np.empty((Hq, nq, values.shape[2]), np.float32)
        lse = np.empty((Hq, nq), np.float32)
        ids = np.empty((Hq, nq, k), np.int64)
        sc = np.empty((Hq, nq, k), np.float32)
        ns = np.empty((Hq, nq), np.int64)
        worker = np.empty(Hq * nq, np.int64)
        partner, _ = self._partners(graph_of_head, k, L_min)
        # the previous call's keys scanned per pair predict this one's cost: the longest are handed out first
        tasks, mates, filled_by_other = self._plan(partner, nq)
        last = self._last_scanned
        order = tasks if last is None or len(last) != Hq * nq else DK.order_tasks(tasks, mates, last)
        T = max(1, min(numba.get_num_threads(), len(order)))
        if res is not None:
            if res_keys.ndim != 3 or res_keys.shape[0] != self.n_kv_heads or res_keys.shape[2] != self.head_dim or \
                    res_keys.shape[1] < res.n or res.n > values.shape[1]:
                raise IndexError_(f"residual keys must have shape [{self.n_kv_heads}, >= n={res.n}, {self.head_dim}] "
                                  f"and values a row for every drawn id; got keys {tuple(res_keys.shape)}, "
                                  f"values {tuple(values.shape)}")
        n_vis = max(self.n_graph, self.n_keys, res.n if res is not None else 0)
        cycles = np.zeros((T, 3), np.int64) if DK.CYCLE_COUNTER else None
        w = DK.borrow_scratch(T, n_vis)
        self._lock.acquire()
        try:
            c0 = DK.cycle_counter() if cycles is not None else 0
            DK.search_attend_batch(self._adj, self._keys, values, self.n_graph, self.n_keys, q, graph_of_head,
                                   kv_of_head, self._entries, k, L, float(scaling), w.visited[:T],
                                   w.cand_s[:T], w.cand_i[:T], out, lse, ns, ids, sc, order,
                                   self._keys if res is None else res_keys, 0 if res is None else int(res.n),
                                   0 if res is None else int(res.m), 0 if res is None else int(res.seed),
                                   w.taken[:T], worker, self.schedule == "dynamic", partner,
                                   -1 if res is None or res.lo is None else int(res.lo), L_of_head, cycles)
            c1 = DK.cycle_counter() if cycles is not None else 0
        finally:
            self._lock.release()
            DK.return_scratch(w)
        self._last_scanned = ns.reshape(-1)
        # a shared pass's rows were loaded once, by its task's worker
        #: (most, mean) keys scanned by one worker in the last fused call: its load balance
        self.last_call_loads = DK.worker_load_extremes(self._last_scanned, filled_by_other, worker, T)
        timing = DK.call_timing(c0, c1, cycles) if cycles is not None else {}
        timing["wall_s"] = time.perf_counter() - w0
        if "kernel_s" in timing:
            timing["python_s"] = timing["wall_s"] - timing["kernel_s"]
        #: where the last fused call's time went (seconds; :func:`.decode_kernels.call_timing`, plus ``wall_s``: the
        #: whole method, and ``python_s``: its time outside the kernel); only ``wall_s`` where the cycle counter is
        #: not read
        self.last_call_timing = timing
        return (out, lse, ns, ids) if return_ids else (out, lse, ns)

    # ---- insertion --------------------------------------------------------------------------------
    def add_stored(self, new_keys: np.ndarray) -> bool:
        """Append keys ``[n_kv_heads, m, head_dim]`` already in the storage dtype (uint16 bfloat16 bits for
        ``storage="bfloat16"``, float32 otherwise) without conversion: the decode loop's per-token path. Returns
        False (nothing added) when the dtype or shape does not match; NaN/inf keys raise as in ``add``."""
        if (self.n_keys == 0 or new_keys.dtype != self._key_dtype or new_keys.ndim != 3
                or new_keys.shape[0] != self.n_kv_heads or new_keys.shape[2] != self.head_dim):
            return False
        if new_keys.shape[1] == 0:
            return True
        self._add_rows(new_keys, checked=True)
        self.n_keys += new_keys.shape[1]
        return True

    def _add(self, new_keys):
        self._add_rows(self._to_storage(new_keys))

    def _add_rows(self, rows, checked: bool = False):
        """Append rows already in the storage dtype; bulk-insert the tail into the graphs when it is full.
        ``checked``: refuse NaN/inf rows (nothing added) in the same compiled pass as the copy."""
        n, m = self.n_keys, rows.shape[1]
        with self._lock:
            cap = self._keys.shape[1]
            if n + m > cap:  # amortised growth of the key store (the tail lives at its end)
                cap = max(n + m, 2 * cap)
                grown = huge_empty((self.n_kv_heads, cap, self.head_dim), self._key_dtype)
                grown[:, :n] = self._keys[:, :n]
                self._keys = grown
            if checked:
                if not K.copy_rows_checked(self._keys, n, np.ascontiguousarray(rows)):
                    raise IndexError_("new_keys contains NaN or inf; check the model's dtype/overflow")
            else:
                self._keys[:, n:n + m] = rows
        total = n + m
        if self._pending_insert is None and total - self.n_graph >= self.insert_threshold:
            # insert the whole tail in the background; until the job is applied (below) the tail stays exactly
            # scanned, so what a search returns never depends on how fast the job runs
            keys, adj, lo = self._keys, self._adj, self.n_graph
            if self.insert_lag == 0:
                self._apply_insert(total, self._insertion(keys, adj, lo, total))
            else:
                self._pending_insert = (total, _submit_insertion(self._insertion, keys, adj, lo, total))
        if self._pending_insert is not None and total - self._pending_insert[0] >= self.insert_lag:
            self.finish_insertions()

    def finish_insertions(self) -> None:
        """Wait for a background bulk insertion and put its graph in place (decoding does this by itself
        ``insert_lag`` keys after the insertion started, at the same point on every run)."""
        if self._pending_insert is None:
            return
        hi, job = self._pending_insert
        self._pending_insert = None
        self._apply_insert(hi, job.result())

    def _apply_insert(self, hi: int, adj: np.ndarray) -> None:
        with self._lock:
            self._adj = adj
            self.n_graph = hi

    def _insertion(self, keys: np.ndarray, adj_old: np.ndarray, lo: int, hi: int) -> np.ndarray:
        """The graphs with keys lo..hi-1 inserted (bulk; exact L2 kNN of the new keys -> out-lists, reverse
        edges re-pruned, connectivity repair), computed on a copy: ``keys`` rows below ``hi`` and ``adj_old``
        rows below ``lo`` are only read, so searches keep running on the current graph meanwhile."""
        G, cap_a, M = adj_old.shape
        adj = huge_full((G, max(hi, cap_a), M), -1, np.int32)
        adj[:, :lo] = adj_old[:, :lo]
        kvg = self._kv_of_graph
        new = np.arange(lo, hi)
        r = min(M, hi - 1)
        srcs, dsts = [], []
        nn_kv = {}
        for h in np.unique(kvg):
            nn, _ = knn_ip(self._f32(keys[h, lo:hi]), keys[h, :hi], r, exclude=new, l2=True)
            nn_kv[int(h)] = nn
        for g in range(G):
            nn = nn_kv[int(kvg[g])]
            s = np.repeat(new, r).astype(np.int32)
            d = nn.reshape(-1)
            ok = d >= 0
            srcs.append(np.concatenate([s[ok], d[ok]]))
            dsts.append(np.concatenate([d[ok], s[ok]]))
        ne = np.array([len(s) for s in srcs], np.int64)
        src = np.zeros((G, max(1, int(ne.max()))), np.int32)
        dst = np.zeros_like(src)
        for g in range(G):
            src[g, : ne[g]] = srcs[g]
            dst[g, : ne[g]] = dsts[g]
        # out-lists of new nodes are empty: merge prunes them to M; old nodes get reverse edges re-pruned
        K.merge_edges(adj, src, dst, ne, keys, kvg, hi, self.alpha, self.fill, self._cand_cap, numba.get_num_threads())
        self._repair(adj, hi, keys)
        return adj

    @property
    def _cand_cap(self) -> int:
        """``max_candidates`` for the kernels (no cap: a count no pool reaches)."""
        return _NO_CAP if self.max_candidates is None else self.max_candidates

    # ---- key storage ------------------------------------------------------------------------------
    def _to_storage(self, x: np.ndarray) -> np.ndarray:
        """float32 keys (any shape) in the storage dtype (bfloat16: uint16 bits, round to nearest even)."""
        return f32_to_bf16_bits(x) if self.storage == "bfloat16" else x

    def _f32(self, x: np.ndarray) -> np.ndarray:
        """Stored keys (a slice of ``_keys``) as float32 (a copy for bfloat16 storage, for torch matmuls)."""
        return np.ascontiguousarray(as_float32(x))

    def stored_keys(self) -> np.ndarray:
        """The keys ``[n_kv_heads, n_keys, head_dim]`` as the index holds them: float32, or uint16 bfloat16
        bits with ``storage="bfloat16"`` (a view, no copy; do not modify)."""
        return self._keys[:, : self.n_keys]

    def key_buffer(self) -> np.ndarray:
        """The index's key array itself, ``[n_kv_heads, >= n_keys, head_dim]`` (rows from ``n_keys`` on are
        spare capacity), as :meth:`stored_keys` without creating a view; replaced when the index grows, so
        take it anew for each use. Do not modify."""
        return self._keys

    # ---- accounting / persistence -------------------------------------------------------------------
    def memory_bytes(self) -> int:
        b = self._keys.nbytes + self._adj.nbytes + self._entries.nbytes
        return int(b)

    def state(self):
        return {
            "keys": np.ascontiguousarray(self._keys[:, : self.n_keys]),
            "adj": np.ascontiguousarray(self._adj[:, : self.n_graph]),
            "entries": self._entries,
            "kv_of_graph": self._kv_of_graph,
            "n_graph": np.array([self.n_graph], np.int64),
            "pairs_on": np.array([self._pairs_on], np.bool_),
            **({} if self._ef_of_head is None else {"ef_of_head": self._ef_of_head}),
        }

    def load_state(self, arrays):
        keys = np.asarray(arrays["keys"])
        if self.storage == "bfloat16":
            if keys.dtype not in (np.uint16, np.int16):
                raise IndexError_(f"roar index file: bfloat16 keys must be stored as 16-bit integers, got {keys.dtype}")
            self._keys = huge_copy(keys).view(np.uint16)
        else:
            self._keys = huge_copy(np.asarray(keys, np.float32))
        self._adj = huge_copy(np.asarray(arrays["adj"], np.int32))
        self._entries = np.ascontiguousarray(arrays["entries"], np.int32)
        self._kv_of_graph = np.ascontiguousarray(arrays["kv_of_graph"], np.int64)
        self.n_graph = int(arrays["n_graph"][0])
        # files from before share="auto": the option decides
        self._pairs_on = bool(arrays["pairs_on"][0]) if "pairs_on" in arrays else self.share == "pairs"
        self._ef_of_head = np.ascontiguousarray(arrays["ef_of_head"], np.int64) if "ef_of_head" in arrays else None
        if self._keys.shape[1] != self.n_keys or self._adj.shape[1] != self.n_graph:
            raise IndexError_("roar index file is inconsistent (key / graph sizes do not match its metadata)")
