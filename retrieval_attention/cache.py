"""The transformers ``Cache`` of retrieval attention.

Each full-attention layer that is not kept dense gets a :class:`RetrievalLayer`:

* **prefill** (first forward): behaves like a ``DynamicLayer`` — all keys/values on the device, exact attention.
  When the prompt is longer than ``n_sink + window``, the attention function calls :meth:`RetrievalLayer.offload_prefill`
  right after the layer's exact attention: the static tokens (first ``n_sink`` real tokens of each sequence and the
  last ``window`` positions) stay on the device, the others move to a per-sequence :class:`CPUStore` whose index is
  built from the prompt's post-RoPE queries. Layer-by-layer prefill (:mod:`retrieval_attention.prefill`) runs a
  layer in chunks instead: :meth:`RetrievalLayer.begin_layerwise` defers the offload to the layer's last chunk.
* **decode**: new tokens join the window; the oldest window tokens leave it and are added to the CPU store and its
  index (method ``retrieval``) or dropped (method ``streaming``).

Sliding-window layers (Gemma-3) and ``dense_layers`` keep the stock transformers layers.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from .config import RetrievalConfig
from .gpumem import release_if_tight, to_device_async
from .hostmem import huge_tensor
from .index import KVIndex, make_index
from .index.base import Residual, spare_rows
from .index.bf16 import tensor_as_numpy


@dataclass
class LayerStats:
    search_s: float = 0.0
    cpu_attention_s: float = 0.0
    n_searches: int = 0
    n_scanned: int = 0
    n_cpu_keys_at_search: int = 0
    #: lean decode loop: seconds waiting for the device's query copy / in the host part after it
    wait_s: float = 0.0
    host_s: float = 0.0
    #: seconds of the synchronous prefill hand-off (static split, device -> host copies) of this layer, of which
    #: ``handoff_wait_s`` waiting for the layer's queued device work (CUDA; the first copy would wait for it anyway)
    handoff_s: float = 0.0
    handoff_wait_s: float = 0.0
    #: ``handoff="async"``: seconds the hand-off thread spent landing this layer (waiting for its copies, moving
    #: them from pinned into the stores' memory, starting the builds), beside the next layers' prefill
    handoff_land_s: float = 0.0
    #: fused layer calls: keys scanned by the most loaded worker / by the average worker, summed over calls
    worker_keys_max: float = 0.0
    worker_keys_mean: float = 0.0
    #: fused layer calls (roar): seconds summed over calls, per part of the call (``RoarIndex.last_call_timing``:
    #: wall_s, kernel_s, python_s, start_s, busy_max_s, busy_mean_s, join_s, idle_s)
    call_s: dict = field(default_factory=dict)


def host_copy(t: torch.Tensor, rows: int | None = None) -> torch.Tensor:
    """``t [H, n, D]`` in host memory, with capacity for ``rows >= n`` rows along dim 1 (``rows`` None: n).

    From a device the destination is pageable memory whose pages are first touched by a parallel fill: a
    device-to-host copy into fresh pages faults them in one by one (H200 host: 157 ms for a 256 MiB
    ``.to("cpu")``, against 19 ms touch + 16 ms copy). Pinned memory is not used: the store is only read by
    the CPU, and pinning a layer's worth per layer costs more than it saves. A host tensor without extra
    rows is returned as it is (no copy), unless it is pinned (an asynchronous hand-off's staging memory, which
    goes back to torch's pinned-memory cache for the next layer)."""
    H, n, D = t.shape
    rows = n if rows is None else max(rows, n)
    if t.device.type == "cpu" and rows == n and not _is_pinned(t):
        return t.detach()
    out = huge_tensor((H, rows, D), t.dtype)  # read at random by the decode kernels: huge pages
    if t.device.type != "cpu":
        out.zero_()
    out[:, :n].copy_(t.detach())
    return out


def _to_host_async(t: torch.Tensor) -> torch.Tensor:
    """``t`` copied to pinned host memory without blocking (a device tensor: ready once an event recorded after
    this call on the current stream has completed); a host tensor as it is (``to`` returns it unchanged)."""
    return t.detach().to("cpu", non_blocking=True)


def _copies_done_event(device: torch.device):
    """An event recorded now on ``device``'s current stream (CUDA): done once the copies queued before it are; None
    elsewhere (copies to the host are synchronous there). Its ``synchronize()`` waits for it."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    ev = torch.cuda.Event()
    ev.record(torch.cuda.current_stream(device))
    return ev


def _is_pinned(t: torch.Tensor) -> bool:
    """``t.is_pinned()`` where CUDA is present (without it nothing is pinned, and torch may refuse the query)."""
    return torch.cuda.is_available() and t.is_pinned()


class HandOff:
    """The asynchronous prefill hand-off of one :class:`RetrievalCache` (``RetrievalConfig.handoff="async"``, which
    ``"auto"``, the default, resolves to on CUDA).

    :meth:`RetrievalLayer.offload_prefill` queues non-blocking device -> pinned-host copies of the layer's CPU part
    (keys, values, training queries) on the prefill's own stream (ordered after the layer's work, so the device
    memory they read is freed in stream order), records an event and returns: the next layer is queued at once.
    :meth:`submit` runs the landing (wait for the event, copy pinned -> the stores' pageable memory, start the
    build) on one host thread, layer after layer. The pinned buffers return to torch's pinned-memory cache when a
    landing drops them, so one or two layers' worth is pinned at a time, not the KV.

    * A layer's :attr:`RetrievalLayer.stores` waits for its own landing (and raises its error) on first use.
    * :meth:`drain` waits for every landing (the prefill calls it through :meth:`RetrievalCache.start_builds`
      before it returns: the stores are complete when the prefill is).
    * :meth:`raise_if_failed`: the prefill stops at its next layer when a landing has failed.
    * :meth:`wait_for_room`: at most :data:`MAX_LANDINGS_IN_FLIGHT` layers queued and not landed."""

    def __init__(self):
        self._pending: list = []  # futures of the landings not yet drained, in layer order
        self._lock = threading.Lock()

    def wait_for_room(self) -> None:
        """Back-pressure, before a layer's copies are queued: while :data:`MAX_LANDINGS_IN_FLIGHT` landings are
        unfinished, wait for the oldest (the host would otherwise run ahead of the device by many layers, each
        holding a layer's CPU part in pinned memory)."""
        while True:
            with self._lock:
                busy = [f for f in self._pending if not f.done()]
            if len(busy) < MAX_LANDINGS_IN_FLIGHT:
                return
            busy[0].exception()  # waits; its error is raised by raise_if_failed / drain / the layer's stores

    def submit(self, land):
        """Run ``land()`` on the hand-off thread after the landings queued before it; returns its Future."""
        from .threads import TransientWorkers

        global _HANDOFF_WORKER
        if _HANDOFF_WORKER is None:
            _HANDOFF_WORKER = TransientWorkers(1, "ra-handoff")
        fut = _HANDOFF_WORKER.submit(land)
        with self._lock:
            self._pending.append(fut)
        return fut

    @property
    def pending(self) -> int:
        """Landings not finished yet."""
        with self._lock:
            return sum(not f.done() for f in self._pending)

    def raise_if_failed(self) -> None:
        """Raise the first error of a finished landing (``RuntimeError`` naming it)."""
        with self._lock:
            failed = next((f for f in self._pending if f.done() and f.exception() is not None), None)
        if failed is not None:
            err = failed.exception()
            raise RuntimeError(f"a prefill hand-off to the host failed ({type(err).__name__}: {err}); the prefill "
                               "stops here") from err

    def drain(self) -> None:
        """Wait for every queued landing; raises the first error (after waiting for all of them)."""
        with self._lock:
            pending, self._pending = self._pending, []
        first = None
        for f in pending:
            try:
                f.result()
            except BaseException as e:  # noqa: BLE001 (re-raised below, after the others are done)
                first = first or e
        if first is not None:
            raise RuntimeError(f"a prefill hand-off to the host failed ({type(first).__name__}: {first})") from first


#: asynchronous hand-offs queued and not landed yet at most (:meth:`HandOff.wait_for_room` waits for the oldest):
#: the layer being landed plus the one just queued; each holds a layer's CPU part in pinned staging memory (576 MiB
#: per 128K-token layer of the Llama-3-8B shape)
MAX_LANDINGS_IN_FLIGHT = 2

#: the one thread that lands asynchronous hand-offs (shared by every cache: landings are host memory copies, one
#: at a time keeps them in layer order)
_HANDOFF_WORKER = None


class BuildGroup:
    """The background index builds of one :class:`RetrievalCache`.

    * Held builds (``RetrievalConfig.build_schedule="after_prefill"``) wait for :meth:`release`: the prefill runs
      every layer first, with the GPU and the cores to itself, then the builds run ``build_workers`` at a time.
      Waiting for any held build releases the whole group, so nothing waits on a build that was never started.
    * :meth:`raise_if_failed`: the prefill stops at its next layer when a build has failed, instead of going on for
      minutes while the failed builds' inputs stay referenced by their errors."""

    def __init__(self):
        self._lock = threading.Lock()
        self._held: list[HeldBuild] = []  # not started yet, in submission order (layer order)
        self._failure = None  # the future of the first build that raised (successful ones are not kept)

    def submit(self, submit, job, hold: bool = False):
        """``submit(job)`` (-> Future) now, or on :meth:`release` when ``hold``; returns a Future-like handle."""
        if not hold:
            return self._watch(submit(job))
        b = HeldBuild(self, submit, job)
        with self._lock:
            self._held.append(b)
        return b

    def _watch(self, fut):
        fut.add_done_callback(self._finished)
        return fut

    def _finished(self, fut) -> None:
        if not fut.cancelled() and fut.exception() is not None:
            with self._lock:
                if self._failure is None:
                    self._failure = fut

    @property
    def held(self) -> int:
        """Builds not started yet."""
        return len(self._held)

    def release(self) -> None:
        """Start every held build, in the order they were held."""
        with self._lock:
            held, self._held = self._held, []
        for b in held:
            b.start()

    def raise_if_failed(self) -> None:
        """Raise the first error of a build that has failed (``RuntimeError`` naming the build's own error)."""
        failed = self._failure
        if failed is not None:
            err = failed.exception()
            raise RuntimeError(f"a background index build failed ({type(err).__name__}: {err}); the prefill "
                               "stops here") from err


class HeldBuild:
    """One held build of a :class:`BuildGroup`: a Future-like handle (``result()``, ``done()``)."""

    def __init__(self, group: BuildGroup, submit, job):
        self._group, self._submit, self._job = group, submit, job
        self._future = None
        self._lock = threading.Lock()

    def start(self):
        with self._lock:
            if self._future is None:
                self._future = self._group._watch(self._submit(self._job))
        return self._future

    def done(self) -> bool:
        return self._future is not None and self._future.done()

    def result(self):
        self._group.release()  # its group's builds start together (the workers run them in layer order)
        return self.start().result()


class CPUStore:
    """Offloaded keys/values of one sequence in one layer, with the index over its keys.

    values ``[Hkv, capacity, D]`` torch tensor in the model dtype (pageable host memory, spare rows past the
    prompt), grown by doubling;
    keys live inside the index (ids = row numbers of ``values``; ``roar`` keeps bfloat16 keys of a bfloat16
    model as bfloat16, else float32), and in :attr:`keys` only for indexes that do not keep them exactly.
    """

    def __init__(self, config: RetrievalConfig, layer_idx: int = 0):
        self.config = config
        #: seed of the residual draws: the configured one mixed with the layer, so layers draw different keys
        self.residual_seed = config.residual_seed * _LAYER_SEED_STRIDE + layer_idx
        self._index: KVIndex | None = None
        self._pending = None  # Future (or HeldBuild) of a background build (CUDA: after or beside the prefill)
        self._keys: torch.Tensor | None = None  # [Hkv, capacity, D], model dtype; None when the index holds them
        self._index_spec: tuple[str, dict] | None = None  # (name, params) of the index built / being built
        self._key_dtype: torch.dtype | None = None
        self.values: torch.Tensor | None = None
        self._numpy_views: dict = {}  # attribute name -> (tensor, numpy view of it): see :meth:`_numpy_view`
        self.n = 0
        self.build_s = 0.0
        #: seconds per build stage (host conversion + the index's own build_stats: knn, graph, repair)
        self.build_stages: dict[str, float] = {}

    @property
    def keys(self) -> torch.Tensor | None:
        """Host keys ``[Hkv, >= n, D]`` in the model dtype. When the index keeps them exactly (``roar``) they
        are not stored twice: this is then a tensor over the index's own copy (a view for matching dtypes)."""
        if self._keys is not None or not self._keys_in_index(self._key_dtype):
            return self._keys
        from .index.bf16 import bits_as_tensor

        arr = self.index.stored_keys()
        t = bits_as_tensor(arr) if arr.dtype == np.uint16 else torch.from_numpy(arr)
        return t if t.dtype == self._key_dtype else t.to(self._key_dtype)

    @keys.setter
    def keys(self, value: torch.Tensor | None) -> None:
        self._keys = value
        self._numpy_views.pop("_keys", None)  # a kept view must not hold on to the array being dropped

    def _keys_in_index(self, dtype: torch.dtype | None) -> bool:
        """Whether the index (built, being built or loaded) keeps its own exact copy of keys of ``dtype``."""
        if self._index_spec is None or dtype is None:
            return False
        name, params = self._index_spec
        if name != "roar":
            return False
        if params.get("storage", "float32") == "bfloat16":
            return dtype == torch.bfloat16
        return dtype in (torch.float32, torch.float16, torch.bfloat16)

    @property
    def index(self) -> KVIndex | None:
        if self._pending is not None:
            self._index, self.build_s, self.build_stages = self._pending.result()
            self._pending = None
        return self._index

    def wait(self) -> float:
        """Wait for a background build; returns the build seconds."""
        _ = self.index
        return self.build_s

    @index.setter
    def index(self, value) -> None:
        self._pending = None
        self._index = value
        self._index_spec = None if value is None else (value.name, dict(value.params))

    def _append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append ``[Hkv, m, D]`` keys/values to the host arrays (spare rows past the first fill, then doubling).

        Exact attention over the whole store (several new tokens at once, e.g. a question after a
        persistent context) reads the keys (:attr:`keys`): they are kept here in the model dtype unless the
        index keeps an exact copy itself (``roar``; set the index spec first, see :meth:`build`).
        """
        m = k.shape[1]
        self._key_dtype = k.dtype
        own_keys = not self._keys_in_index(k.dtype)
        if self.values is None:  # first fill: one copy into an array with spare rows
            self.values = host_copy(v, m + spare_rows(m))
            if own_keys:
                self._keys = host_copy(k, m + spare_rows(m))
            return
        if self.n + m > self.values.shape[1]:
            cap = max(self.n + m, 2 * self.values.shape[1])
            self.values = host_copy(self.values[:, : self.n], cap)
            if own_keys:
                self._keys = host_copy(self._keys[:, : self.n], cap)
        for name, src in (("_keys", k), ("values", v)) if own_keys else (("values", v),):
            dst = getattr(self, name)
            if dst.dtype == src.dtype:  # numpy views: the per-token path, cheaper than a torch slice assignment
                self._numpy_view(name)[:, self.n : self.n + m] = tensor_as_numpy(src)
            else:
                dst[:, self.n : self.n + m] = src

    def _numpy_view(self, name: str) -> np.ndarray:
        """:func:`tensor_as_numpy` of the host tensor in attribute ``name`` (``"values"`` / ``"_keys"``), kept
        until that attribute holds another tensor: every layer of every decode step reads it, and right after
        a search kernel has run a fresh torch -> numpy view cost ~35 us (dev VM) against < 1 us for the lookup."""
        t = getattr(self, name)
        got = self._numpy_views.get(name)
        if got is None or got[0] is not t:
            got = self._numpy_views[name] = (t, tensor_as_numpy(t))
        return got[1]

    def build(self, keys: torch.Tensor, values: torch.Tensor, train_queries: torch.Tensor | None,
              background: bool = False, group: BuildGroup | None = None, hold: bool = False) -> float:
        """keys/values ``[Hkv, n, D]`` (any device), train_queries ``[Hq, m, D]``.

        Returns the build seconds, or 0 when ``background`` (the build then runs in a worker thread and
        :attr:`index` waits for it on first use; ``build_s`` holds its time afterwards). ``group``: the cache's
        :class:`BuildGroup` a background build joins; ``hold``: it starts only when that group is released (its
        data is on the host already).
        """
        if train_queries is None or train_queries.shape[1] == 0:
            # no prompt queries (e.g. first eviction of a short sequence): the keys stand in for them
            train_queries = keys
        if train_queries.shape[0] % keys.shape[0] != 0:
            raise ValueError(f"train queries have {train_queries.shape[0]} heads for {keys.shape[0]} KV heads")
        # the synchronous part (on CUDA it holds up the next layer's prefill) only moves data off the device,
        # in the model's dtype (bfloat16: half the bytes of float32); the float32 copies for the build are
        # made by the build job (a background thread on CUDA)
        k_host = host_copy(keys)
        tq_host = host_copy(train_queries)
        name, params = self.index_choice(keys.shape[1])
        if name == "roar" and keys.dtype == torch.bfloat16:
            params.setdefault("storage", "bfloat16")  # exact for bfloat16 keys, half the host memory
        self._index_spec = (name, params)
        self._append(k_host, values.detach())  # values go straight into the host array
        self.n = keys.shape[1]

        def job():
            t0 = time.perf_counter()
            k32 = k_host.float().numpy()  # torch: multi-threaded conversion
            tq = tq_host.float().numpy()
            t1 = time.perf_counter()
            idx = make_index(name, **params).build(k32, tq)
            release_if_tight()  # this build's cached GPU blocks, when the budget is tight
            stages = {"convert_s": t1 - t0}
            for key, v in (getattr(idx, "build_stats", None) or {}).items():
                if key.endswith("_s") and key != "total_s":
                    stages[key] = float(v)
            return idx, time.perf_counter() - t0, stages

        if background:
            workers = _build_executor(self.config.resolved_build_workers(), self.config.build_priority)
            self._pending = workers.submit(job) if group is None else group.submit(workers.submit, job, hold)
            return 0.0
        self._index, self.build_s, self.build_stages = job()
        return self.build_s

    def index_choice(self, n: int) -> tuple[str, dict]:
        """(index name, constructor params) for a store of ``n`` keys: the configured index, or ``flat``
        (exact) below ``config.exact_below`` keys."""
        if n < self.config.exact_below and self.config.index != "flat":
            return "flat", {}
        return self.config.index, dict(self.config.index_params)

    def search_budget(self, config: RetrievalConfig) -> dict:
        """``config.search_params`` (``ef``, ``nprobe``) when this store uses ``config.index``; nothing for a
        store that fell back to exact search (``exact_below``)."""
        if self._index_spec is not None and self._index_spec[0] != config.index:
            return {}
        return config.search_params

    def add(self, keys: torch.Tensor, values: torch.Tensor, n_query_heads: int) -> None:
        """Append ``[Hkv, m, D]`` keys/values (tokens leaving the window)."""
        if keys.shape[1] == 0:
            return
        if self.index is None:
            group = n_query_heads // keys.shape[0]
            keys, values = keys.detach().cpu().clone(), values.detach().cpu().clone()  # the store keeps them
            self.build(keys, values, keys.float().repeat_interleave(group, dim=0))
            return
        if keys.device.type != "cpu" or keys.requires_grad or values.requires_grad:
            keys, values = keys.detach().cpu(), values.detach().cpu()
        fast = getattr(self.index, "add_stored", None)
        if fast is None or not fast(tensor_as_numpy(keys)):  # the per-token path: no conversion when the
            self.index.add(keys.float().numpy())  # index stores the model's dtype
        self._append(keys, values)
        self.n += keys.shape[1]

    def search(self, queries: np.ndarray, k: int, **budget):
        """Top-k over the store: queries ``[Hq, L, D]`` float32 -> ids, scores ``[Hq, L, k]``, n_scanned ``[Hq, L]``."""
        return self.index.search(queries, k, **budget)

    def gather_values(self, ids: np.ndarray, group: int) -> torch.Tensor:
        """Values of retrieved ids ``[Hq, L, k]`` (-1 padding reads row 0) -> ``[Hq, L, k, D]``."""
        Hq, L, k = ids.shape
        idx = torch.from_numpy(np.ascontiguousarray(ids)).clamp_min(0).reshape(-1)
        kv_head = (torch.arange(Hq) // group).repeat_interleave(L * k)
        return self.values[kv_head, idx].view(Hq, L, k, -1)

    def attend(self, queries: np.ndarray, group: int, scaling: float, k: int, residual_from: int | None = None,
               return_ids: bool = False, **budget):
        """Top-``k`` retrieval + softmax attention over the retrieved keys.

        queries ``[Hq, L, D]`` float32 (C-contiguous); ``group`` query heads per KV head; scores are
        ``scaling * q.key``. Returns ``out [Hq, L, D] float32`` (0 where nothing was retrieved),
        ``lse [Hq, L] float32`` (-inf there) and ``n_scanned [Hq, L] int64``, and with ``return_ids`` the
        retrieved ids ``[Hq, L, k] int64`` (-1 padding). The residual estimate over :meth:`residual_population`
        is merged in (``config.residual_samples`` draws); ``residual_from``: instead of draws,
        the exact residual over ids ``residual_from..n-1`` only (the rest is estimated on the device:
        :mod:`.attention.residual_device`). One ``index.search_attend`` call (fused compiled search + attention
        for ``roar`` with float32 or bfloat16 values; search + numpy attention otherwise).
        """
        idx = self.index
        if queries.shape[0] != group * idx.n_kv_heads:
            raise ValueError(f"{queries.shape[0]} query heads for {idx.n_kv_heads} KV heads and group {group}")
        values = self._numpy_view("values")
        res, _ = _residual_of(self, k, residual_from)
        # the residual estimate is merged in the same call (roar: inside the fused compiled kernel)
        return idx.search_attend(queries, k, values, scaling, return_ids=return_ids, residual=res, **budget)

    def residual_population(self, k: int):
        """What the residual estimate draws from when retrieving top-``k``: ``(keys, values, n, seed)`` with keys
        ``[Hkv, >= n, D]`` numpy float32 or uint16 bfloat16 bits and values ``[Hkv, >= n, Dv]`` torch, ids
        ``0..n-1``; None when there is no residual (``residual_samples`` 0, or no more than ``k`` keys: retrieval
        returns them all)."""
        if self.config.residual_samples <= 0 or self.n <= k or self.index is None:
            return None
        return self.key_array(), self.values, self.n, self.residual_seed

    def key_array(self) -> np.ndarray:
        """Host keys ``[Hkv, >= n, D]`` as numpy for the compiled kernels: float32, or uint16 bfloat16 bits (the
        index's own copy when it keeps one; no copy)."""
        idx = self.index
        if self._keys is None and hasattr(idx, "key_buffer"):
            return idx.key_buffer()  # the index's whole array (rows past n unused): no new view per call
        if self._keys is None and hasattr(idx, "stored_keys"):
            return idx.stored_keys()
        return tensor_as_numpy(self.keys)

    def exact_attention(self, queries: torch.Tensor, group: int, scaling: float):
        """Exact attention over every stored key: queries ``[Hq, L, D]`` float32 -> out ``[Hq, L, D]``, lse ``[Hq, L]``."""
        return _exact_attention(queries, self.keys[:, : self.n], self.values[:, : self.n], group, scaling)

    def fork(self) -> "ForkedStore":
        return ForkedStore(self)

    def nbytes(self) -> int:
        v = 0 if self.values is None else self.n * self.values.shape[0] * self.values.shape[2] * self.values.element_size()
        if self._keys is not None:  # a host copy of the keys besides the index's own
            v += self.n * self._keys.shape[0] * self._keys.shape[2] * self._keys.element_size()
        return v + (self.index.memory_bytes() if self.index is not None else 0)


def _residual_of(store, k: int, residual_from: int | None):
    """``(Residual, values [Hkv, >= n, Dv] torch)`` of an ``attend`` call (see :meth:`CPUStore.attend`), or
    ``(None, None)`` when there is nothing to estimate."""
    pop = store.residual_population(k)
    if pop is None:
        return None, None
    keys, values, n, seed = pop
    res = Residual(keys, n, store.config.residual_samples, seed, lo=residual_from)
    return (res, values) if res.active else (None, None)


def _attend_by_search(store, queries: np.ndarray, group: int, scaling: float, k: int,
                      residual_from: int | None = None, return_ids: bool = False, **budget):
    """Generic ``attend``: ``store.search`` + ``store.gather_values`` + :func:`retrieved_attention`
    (shapes and options as :meth:`CPUStore.attend`), plus the residual estimate over a fork's base store."""
    from .attention.cpu import retrieved_attention
    from .attention.residual import add_residual_into

    ids, scores, n_scanned = store.search(queries, k, **budget)
    out, lse = retrieved_attention(scores, ids, store.gather_values(ids, group), scaling)
    out, lse = np.ascontiguousarray(out.numpy(), np.float32), np.ascontiguousarray(lse.numpy(), np.float32)
    res, values = _residual_of(store, k, residual_from)
    if res is not None:  # the base's non-retrieved keys (retrieved tail ids are >= base_n: never drawn)
        kv_of_head = np.arange(queries.shape[0]) // group
        add_residual_into(out, lse, res.keys, tensor_as_numpy(values), queries, kv_of_head, ids, res.n, res.m,
                          scaling, res.seed, lo=res.lo)
    return (out, lse, n_scanned, ids) if return_ids else (out, lse, n_scanned)


_BUILD_WORKERS: dict = {}  # (worker count, stream priority) -> TransientWorkers of background index builds
#: residual seeds of layers: residual_seed * stride + layer index (distinct for any layer count below it)
_LAYER_SEED_STRIDE = 1_000_003


def _build_executor(workers: int, priority: str = "normal"):
    """The workers of background index builds (``RetrievalConfig.resolved_build_workers()``, their CUDA streams of
    ``RetrievalConfig.build_priority``; one pool per worker count and priority, shared by every cache; each build is
    itself multi-threaded). Their threads exit once no build is queued
    (:class:`~retrieval_attention.threads.TransientWorkers`: an idle thread's OpenMP team would slow the decode
    loop's parallel calls). One worker where numba's threading layer cannot run parallel kernels from two threads
    at once."""
    from .threads import TransientWorkers, parallel_kernels_concurrent

    if workers > 1 and not parallel_kernels_concurrent():
        workers = 1
    ex = _BUILD_WORKERS.get((workers, priority))
    if ex is None:
        ex = _BUILD_WORKERS[workers, priority] = TransientWorkers(workers, "ra-index-build", priority)
    return ex


def _exact_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: int, scaling: float):
    from .attention.device import attention_with_lse

    Hq, L, D = q.shape
    out, lse = attention_with_lse(q.view(1, Hq, L, D), k.unsqueeze(0), v.unsqueeze(0), scaling, None)
    return out[0], lse[0]


class ForkedStore:
    """A private continuation of a shared :class:`CPUStore` (persistent contexts).

    The base store (keys, values, index) is only read; keys added to the fork go to a local tail that is
    scanned exactly and merged into the results, so the base can serve many forks at once.
    Ids ``< base.n`` address the base, larger ids the local tail.
    """

    def __init__(self, base: CPUStore):
        self.base = base
        self.base_n = base.n
        self.config = base.config
        self.tail = CPUStore(base.config)  # this fork's own keys/values, no index: scanned exactly

    @property
    def m(self) -> int:
        return self.tail.n

    @property
    def n(self) -> int:
        return self.base_n + self.m

    @property
    def index(self):  # truthy when anything is searchable
        return self if self.n > 0 else None

    def search_budget(self, config: RetrievalConfig) -> dict:
        return self.base.search_budget(config)

    def add(self, keys: torch.Tensor, values: torch.Tensor, n_query_heads: int) -> None:
        m = keys.shape[1]
        if m == 0:
            return
        self.tail._append(keys.detach().cpu(), values.detach().cpu())
        self.tail.n += m

    def search(self, queries: np.ndarray, k: int, **budget):
        from .index.flat import exact_topk

        Hq, L, _ = queries.shape
        parts = []
        n_scanned = np.zeros((Hq, L), dtype=np.int64)
        if self.base_n and self.base.index is not None:
            ids, sc, ns = self.base.search(queries, k, **budget)
            parts.append((ids, sc))
            n_scanned += ns
        if self.m:
            tail_k = self.tail.keys[:, : self.m].float().contiguous().numpy()
            ids, sc = exact_topk(tail_k, queries, k, Hq // tail_k.shape[0])
            parts.append((np.where(ids >= 0, ids + self.base_n, -1), sc))
            n_scanned += self.m
        if len(parts) == 1:
            return parts[0][0], parts[0][1], n_scanned
        ids = np.concatenate([p[0] for p in parts], -1)
        sc = np.concatenate([p[1] for p in parts], -1)
        order = np.argsort(-sc, axis=-1, kind="stable")[..., :k]
        return np.take_along_axis(ids, order, -1), np.take_along_axis(sc, order, -1), n_scanned

    def gather_values(self, ids: np.ndarray, group: int) -> torch.Tensor:
        Hq, L, k = ids.shape
        flat = torch.from_numpy(np.ascontiguousarray(ids)).clamp_min(0).reshape(-1)
        kv_head = (torch.arange(Hq) // group).repeat_interleave(L * k)
        in_base = flat < self.base_n
        D = (self.base.values if self.base.values is not None else self.tail.values).shape[-1]
        dtype = (self.base.values if self.base.values is not None else self.tail.values).dtype
        out = torch.empty((flat.numel(), D), dtype=dtype)
        if in_base.any():
            out[in_base] = self.base.values[kv_head[in_base], flat[in_base]]
        if (~in_base).any():
            out[~in_base] = self.tail.values[kv_head[~in_base], flat[~in_base] - self.base_n].to(dtype)
        return out.view(Hq, L, k, D)

    def attend(self, queries: np.ndarray, group: int, scaling: float, k: int, residual_from: int | None = None,
               return_ids: bool = False, **budget):
        """As :meth:`CPUStore.attend`, over the base store's keys and this fork's tail (top-``k`` of both)."""
        kw = dict(residual_from=residual_from, return_ids=return_ids)
        if self.m == 0 and self.base_n:  # nothing added yet: the base store's (fused) path
            return self.base.attend(queries, group, scaling, k, **kw, **budget)
        return _attend_by_search(self, queries, group, scaling, k, **kw, **budget)

    def residual_population(self, k: int):
        """As :meth:`CPUStore.residual_population`: the base store's keys (the fork's own tail is scanned
        exactly, never drawn)."""
        b = self.base
        if self.config.residual_samples <= 0 or self.base_n <= k or b.index is None:
            return None
        return b.key_array(), b.values, self.base_n, b.residual_seed

    def exact_attention(self, queries: torch.Tensor, group: int, scaling: float):
        from .attention.merge import merge_partial

        parts = []
        if self.base_n:
            parts.append(self.base.exact_attention(queries, group, scaling))
        if self.m:
            parts.append(self.tail.exact_attention(queries, group, scaling))
        out, lse = parts[0]
        for o, l in parts[1:]:
            out, lse = merge_partial(out, lse, o, l)
        return out, lse

    def fork(self) -> "ForkedStore":
        raise NotImplementedError("fork the context's cache, not a fork of it")

    def nbytes(self) -> int:
        return self.tail.nbytes()


class RetrievalLayer(DynamicLayer):
    """Cache layer of one retrieval-attention layer (see the module docstring)."""

    def __init__(self, layer_idx: int, config: RetrievalConfig, rope_inv_freq: torch.Tensor | None = None, **kwargs):
        super().__init__(**kwargs)
        self.layer_idx = layer_idx
        self.config = config
        # the layer's RoPE frequencies [D / 2] (align_train_queries); None: training queries stay as prefilled
        self.rope_inv_freq = rope_inv_freq
        self.retrieve = config.method == "retrieval"
        self.offloaded = False
        self.total = 0  # tokens seen (padded positions), drives positions and masks
        self.stats = LayerStats()
        # set when offloaded:
        # static tokens on the device, sink slots first then the window (oldest first):
        self.static_k = self.static_v = None  # [B, Hkv, n_sink + W, D]
        self.static_valid = None  # [B, n_sink + W] bool: slot holds a real token of that sequence
        self.win_start = 0  # padded position of window column 0
        self.sink_end = None  # [B] padded position where each sequence's sink ends
        self._landing = None  # Future of this layer's asynchronous hand-off (handoff="async"), until it is waited for
        self.stores: list[CPUStore] = []
        self.n_query_heads = 0
        self.on_offloaded = None  # callback(layer) after offload_prefill (progress reporting)
        #: the cache's background builds (held until the prefill ends with build_schedule="after_prefill")
        self.builds: BuildGroup | None = None
        #: the cache's asynchronous hand-off (handoff="async"); None: the hand-off is synchronous
        self.handoff: HandOff | None = None
        # layer-by-layer prefill (see begin_layerwise): offload after the layer's last chunk, not its first
        self.defer_offload = False
        self._lw_len = 0  # prompt length the dense K/V buffers are preallocated for
        self._lw_pad = None  # [B] left padding (CPU)
        self._lw_pick = None  # per sequence: prompt positions kept as index-training queries (CPU long)
        self._lw_pick_dev = None  # the same on the queries' device
        self._lw_queries = None  # per sequence: list of [Hq, m, D] collected queries
        self._lw_kbuf = self._lw_vbuf = None  # [B, Hkv, prompt_len, D] preallocated dense K/V
        self._lw_heads = None  # (Hq, D, dtype) of the collected queries
        # keep_prefill: finish_layerwise keeps (keys, values, queries, pad) in prefill_snapshot instead of
        # offloading (one prefill shared by several methods: retrieval_attention.generation.generate_ids_many)
        self.keep_prefill = False
        self.prefill_snapshot = None

    @property
    def stores(self) -> list:
        """The per-sequence :class:`CPUStore` objects (after an asynchronous hand-off: once it has landed; its
        error, if any, is raised here)."""
        if self._landing is not None:
            self._landing.result()
            self._landing = None
        return self._stores

    @stores.setter
    def stores(self, value: list) -> None:
        self._stores = value

    # ---- transformers API -------------------------------------------------------------------------
    def update(self, key_states, value_states, *args, **kwargs):
        from .integration import set_active_layer

        set_active_layer(self)
        L = key_states.shape[-2]
        if not self.offloaded:
            self.total += L
            if self.defer_offload:
                return self._update_preallocated(key_states, value_states, *args, **kwargs)
            return super().update(key_states, value_states, *args, **kwargs)
        S1 = self.config.n_sink
        n = max(0, self.win_k.shape[2] + L - self.config.window)
        self._evict(n)
        # one concatenation per tensor and step: keep the sink, drop the evicted, append the new tokens
        new_valid = torch.ones((key_states.shape[0], L), dtype=torch.bool, device=self.static_valid.device)
        self.static_k = torch.cat([self.static_k[:, :, :S1], self.static_k[:, :, S1 + n :], key_states], dim=2)
        self.static_v = torch.cat([self.static_v[:, :, :S1], self.static_v[:, :, S1 + n :], value_states], dim=2)
        self.static_valid = torch.cat([self.static_valid[:, :S1], self.static_valid[:, S1 + n :], new_valid], dim=1)
        self.total += L
        return self.static_kv()

    def get_seq_length(self) -> int:
        return self.total

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.total + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        cb, builds, handoff = self.on_offloaded, self.builds, self.handoff  # the cache's, kept across resets
        self.__init__(self.layer_idx, self.config, self.rope_inv_freq)
        self.on_offloaded, self.builds, self.handoff = cb, builds, handoff

    def crop(self, tokens_to_remove: int) -> None:
        if self.offloaded:
            raise NotImplementedError("cropping a retrieval-attention cache after offload is not supported")
        super().crop(tokens_to_remove)
        self.total = self.get_seq_length_dense()

    def get_seq_length_dense(self) -> int:
        return 0 if self.keys is None or self.keys.numel() == 0 else self.keys.shape[-2]

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.offloaded:
            raise NotImplementedError("beam search / num_return_sequences > 1 is not supported after offload")
        super().batch_repeat_interleave(repeats)

    def reorder_cache(self, beam_idx) -> None:
        if self.offloaded:
            raise NotImplementedError("beam search is not supported by the retrieval-attention cache")
        super().reorder_cache(beam_idx)

    # ---- retrieval-attention state ----------------------------------------------------------------
    def static_kv(self):
        """Static keys/values on the device: ``[B, Hkv, n_sink + W, D]`` each (sink first, then window)."""
        return self.static_k, self.static_v

    # views of the two parts of the static tokens
    @property
    def sink_k(self):
        return self.static_k[:, :, : self.config.n_sink]

    @property
    def win_k(self):
        return self.static_k[:, :, self.config.n_sink :]

    @property
    def win_v(self):
        return self.static_v[:, :, self.config.n_sink :]

    @property
    def win_valid(self):
        return self.static_valid[:, self.config.n_sink :]

    def should_offload(self) -> bool:
        return not self.offloaded and self.total > self.config.n_static

    def offload_prefill(self, queries, pad: torch.Tensor) -> None:
        """Split the prefilled KV into static (device) and CPU parts and build the indexes.

        queries ``[B, Hq, T, D]`` post-RoPE prompt queries, or a list of ``B`` per-sequence ``[Hq, m, D]``
        index-training queries without padding (collected by layer-by-layer prefill); ``pad [B]`` left-padding
        length of each sequence.
        """
        cfg = self.config
        if self.builds is not None:  # an earlier layer's background build failed: stop before this layer's
            self.builds.raise_if_failed()
        K, V = self.keys, self.values  # [B, Hkv, T, D]
        B, Hkv, T, D = K.shape
        dev = K.device
        per_seq = isinstance(queries, (list, tuple))
        self.n_query_heads = queries[0].shape[0] if per_seq else queries.shape[1]
        pos = torch.arange(cfg.n_sink, device=dev)
        pad_dev = to_device_async(pad.detach(), dev)
        sink_pos = pad_dev.view(B, 1) + pos.view(1, -1)  # [B, n_sink]
        self.sink_end = pad_dev + cfg.n_sink
        win_start = max(T - cfg.window, 0)
        # sink of sequence b: its first n_sink real tokens [pad_b, pad_b + n_sink), minus any that are in the window
        sink_valid = sink_pos < win_start
        gather = sink_pos.clamp_max(T - 1).view(B, 1, cfg.n_sink, 1).expand(B, Hkv, cfg.n_sink, D)
        self.win_start = win_start
        self.static_k = torch.cat([torch.gather(K, 2, gather), K[:, :, win_start:]], dim=2)
        self.static_v = torch.cat([torch.gather(V, 2, gather), V[:, :, win_start:]], dim=2)
        wpos = torch.arange(win_start, T, device=dev).view(1, -1)
        win_valid = wpos >= pad_dev.view(B, 1)  # left padding is never attended
        self.static_valid = torch.cat([sink_valid, win_valid], dim=1)
        t_handoff = time.perf_counter()
        on_cuda = torch.cuda.is_available() and dev.type == "cuda"
        landing = self.retrieve and self.handoff is not None and cfg.resolved_handoff(dev) == "async"
        if landing:  # at most MAX_LANDINGS_IN_FLIGHT layers in pinned memory, this one included
            self.handoff.wait_for_room()
        if self.handoff is not None:  # an earlier layer's landing failed: stop before this layer's
            self.handoff.raise_if_failed()
        if on_cuda and self.retrieve and not landing:  # timed apart: the device finishing the layer
            torch.cuda.current_stream(dev).synchronize()
            self.stats.handoff_wait_s += time.perf_counter() - t_handoff
        pad_host = pad.detach().cpu()  # the CPU parts' bounds without reading device tensors (no synchronisation)
        hold = cfg.build_schedule == "after_prefill"
        stores, parts = [], []  # parts: (store, keys, values, training queries) of the stores that land later
        for b in range(B):
            lo, hi = int(pad_host[b]) + cfg.n_sink, win_start
            store = CPUStore(cfg, self.layer_idx)
            if self.retrieve and hi > lo:
                n_real = T - int(pad_host[b])
                m = cfg.train_queries(n_real)
                if per_seq:  # collected at the positions begin_layerwise picked (the same rule)
                    tq, where = queries[b], train_positions(n_real, m)
                else:  # query rows are the padded positions T - L .. T - 1 (L = T unless a later chunk offloads)
                    rows = queries[b, :, int(pad_host[b]) :]
                    pick = train_positions(rows.shape[1], m)
                    tq, where = rows[:, to_device_async(pick, rows.device)], (T - queries.shape[2]) + pick
                tq = self._aligned(tq, where, n_real)
                if landing:  # pinned, non-blocking on this stream: queued after the layer's work, no wait here
                    parts.append((store, *(_to_host_async(t) for t in (K[b, :, lo:hi], V[b, :, lo:hi], tq))))
                else:
                    # on CUDA the build runs in the background, beside the next layers' prefill or after the
                    # whole prefill (build_schedule); on CPU it would compete for the cores
                    store.build(K[b, :, lo:hi], V[b, :, lo:hi], tq, background=on_cuda, group=self.builds,
                                hold=hold)
            stores.append(store)
        self.stores = stores
        if parts:
            ready = _copies_done_event(dev)
            stats = self.stats

            def land():
                t0 = time.perf_counter()
                if ready is not None:
                    ready.synchronize()
                while parts:  # pop: each store's pinned staging goes back to torch's cache as soon as it has landed
                    store, k, v, tq = parts.pop(0)
                    store.build(host_copy(k), v, host_copy(tq), background=on_cuda, group=self.builds, hold=hold)
                    del k, v, tq
                stats.handoff_land_s += time.perf_counter() - t0

            self._landing = self.handoff.submit(land)
        self.keys = self.values = None  # the dense copy is gone: CPU store + static parts hold everything
        self.offloaded = True
        self.stats.handoff_s += time.perf_counter() - t_handoff
        if self.on_offloaded is not None:
            self.on_offloaded(self)

    def _aligned(self, tq: torch.Tensor, positions: torch.Tensor, n_real: int) -> torch.Tensor:
        """Index-training queries ``tq [Hq, m, D]`` (at real prompt positions ``positions [m]``) rotated to the
        decode phase (:func:`~retrieval_attention.rope.align_to_decode`) when ``align_train_queries`` is on and
        the layer knows its RoPE frequencies; else unchanged."""
        cfg = self.config
        if not cfg.align_train_queries or self.rope_inv_freq is None or positions.numel() != tq.shape[1]:
            return tq
        from .rope import align_to_decode

        return align_to_decode(tq, positions, n_real, self.rope_inv_freq, cfg.align_spread, seed=self.layer_idx)

    # ---- layer-by-layer prefill (retrieval_attention.prefill) --------------------------------------
    def begin_layerwise(self, prompt_len: int, pad: torch.Tensor) -> None:
        """Prefill this layer chunk by chunk: K/V go to buffers sized for ``prompt_len`` tokens, each chunk's
        attention collects its share of an even subsample of the prompt's queries (index training), and
        :meth:`finish_layerwise` offloads after the last chunk. ``pad [B]`` left padding of each sequence."""
        if self.offloaded or self.total:
            raise ValueError(f"layer {self.layer_idx}: layer-by-layer prefill needs an empty cache layer")
        self._lw_len = int(prompt_len)
        self._lw_pad = pad.detach().cpu().long()
        self._lw_pick = []
        for p in self._lw_pad.tolist():
            n = self._lw_len - p
            self._lw_pick.append(p + train_positions(n, self.config.train_queries(n)))
        self._lw_pick_dev = None
        self._lw_queries = [[] for _ in self._lw_pick]
        self._lw_kbuf = self._lw_vbuf = None
        self._lw_heads = None
        self.defer_offload = True

    def _update_preallocated(self, key_states, value_states, *args, **kwargs):
        """``update`` of a layer-by-layer prefill chunk (``total`` already counts it): writes into the
        preallocated ``[B, Hkv, prompt_len, D]`` buffers and returns views of the filled part."""
        end = self.total
        start = end - key_states.shape[-2]
        if end > self._lw_len:
            raise ValueError(f"layer {self.layer_idx}: {end} prefill tokens for a {self._lw_len}-token layer-by-layer prefill")
        if self._lw_kbuf is None:
            if start != 0:
                raise RuntimeError("layer-by-layer prefill: the first chunk must start at position 0")
            super().update(key_states, value_states, *args, **kwargs)  # transformers' lazy initialisation
            B, H, _, D = key_states.shape
            self._lw_kbuf = key_states.new_empty((B, H, self._lw_len, D))
            self._lw_vbuf = value_states.new_empty((B, H, self._lw_len, value_states.shape[-1]))
        self._lw_kbuf[:, :, start:end] = key_states
        self._lw_vbuf[:, :, start:end] = value_states
        self.keys, self.values = self._lw_kbuf[:, :, :end], self._lw_vbuf[:, :, :end]
        return self.keys, self.values

    def collect_prefill_queries(self, query: torch.Tensor) -> None:
        """Keep this chunk's share of the index-training queries: query ``[B, Hq, L, D]`` post-RoPE, the
        chunk's last position being ``total - 1``."""
        B, Hq, L, D = query.shape
        self._lw_heads = (Hq, D, query.dtype)
        if not self.retrieve:  # streaming builds no index
            return
        end = self.total
        start = end - L
        if self._lw_pick_dev is None:  # once per layer: an index copy per chunk could wait for the device each time
            self._lw_pick_dev = [to_device_async(p, query.device) for p in self._lw_pick]
        for b, pick in enumerate(self._lw_pick):
            i0, i1 = (int(i) for i in torch.searchsorted(pick, torch.tensor([start, end])))  # pick is sorted
            if i1 > i0:
                self._lw_queries[b].append(query[b][:, self._lw_pick_dev[b][i0:i1] - start])

    def finish_layerwise(self) -> None:
        """After the layer's last prefill chunk: leave defer mode and offload (prompt longer than the static
        tokens) with the collected queries, like the single-forward prefill does."""
        if not self.defer_offload:
            return
        if self.total != self._lw_len:
            raise RuntimeError(f"layer {self.layer_idx}: prefilled {self.total} of {self._lw_len} tokens")
        if self._lw_heads is None:
            raise RuntimeError(f"layer {self.layer_idx}: no prefill queries reached the layer; run it with the "
                               "retrieval_attention implementation (retrieval_attention.integration.enable)")
        queries, pad = self._lw_queries, self._lw_pad
        Hq, D, dtype = self._lw_heads
        self.defer_offload = False
        self._lw_kbuf = self._lw_vbuf = self._lw_pick = self._lw_pick_dev = self._lw_queries = None
        empty = torch.empty((Hq, 0, D), dtype=dtype, device=self.keys.device)
        queries = [torch.cat(q, dim=1) if q else empty for q in queries]
        if self.keep_prefill:
            self.prefill_snapshot = (self.keys, self.values, queries, pad)
            return
        if self.should_offload():
            self.offload_prefill(queries, pad)

    def load_prefill(self, keys: torch.Tensor, values: torch.Tensor, queries: list[torch.Tensor],
                     pad: torch.Tensor) -> None:
        """Take a finished prefill computed elsewhere (a ``keep_prefill`` layer's ``prefill_snapshot``) and
        offload it as this layer's own prefill would: keys/values ``[B, Hkv, T, D]`` (not modified: the
        layer keeps references or copies), queries a list of ``B`` ``[Hq, m, D]`` index-training queries,
        ``pad [B]`` left padding (CPU long)."""
        if self.offloaded or self.total:
            raise ValueError(f"layer {self.layer_idx}: load_prefill needs an empty cache layer")
        DynamicLayer.update(self, keys, values)
        self.total = keys.shape[-2]
        if self.should_offload():
            self.offload_prefill(queries, pad)

    def _evict(self, n: int) -> None:
        """Hand the ``n`` oldest window columns to the CPU stores (when retrieving); ``update`` drops them."""
        if n <= 0:
            return
        if self.retrieve:
            k_old = self.win_k[:, :, :n]
            v_old = self.win_v[:, :, :n]
            valid = self.win_valid[:, :n].cpu()
            for b, store in enumerate(self.stores):
                sel = valid[b].nonzero().flatten()
                if sel.numel():
                    store.add(k_old[b][:, sel.to(k_old.device)], v_old[b][:, sel.to(v_old.device)], self.n_query_heads)
        self.win_start += n  # the caller drops the n columns from the static tensors

    def fork(self) -> "RetrievalLayer":
        """A continuation that shares this layer's tensors and CPU stores read-only."""
        import copy

        twin = copy.copy(self)
        twin.stats = LayerStats()
        twin.on_offloaded = None
        twin.stores = [s.fork() for s in self.stores]
        return twin

    # ---- accounting -------------------------------------------------------------------------------
    def device_bytes(self) -> int:
        if not self.offloaded:
            return 0 if self.keys is None else 2 * self.keys.numel() * self.keys.element_size()
        return sum(t.numel() * t.element_size() for t in (self.static_k, self.static_v))

    def cpu_bytes(self) -> int:
        return sum(s.nbytes() for s in self.stores)


def _ratio(num: float, den: float) -> float | None:
    """num / den, or None when nothing was recorded (den 0)."""
    return num / den if den > 0 else None


def _built_stores(layers):
    """Every :class:`CPUStore` of ``layers`` (forked stores left out), each after its background build is done."""
    for l in layers:
        for s in l.stores:
            if isinstance(s, CPUStore):
                s.wait()
                yield s


def _sum_build_stages(layers) -> dict:
    """Build seconds per stage (host copy / conversion, kNN, graph, repair) summed over every store whose index
    reports them (``build_stats``); waits for background builds."""
    tot: dict[str, float] = {}
    for s in _built_stores(layers):
        for k, v in s.build_stages.items():
            tot[k] = tot.get(k, 0.0) + v
    return tot


def _sum_build_chunks(layers) -> dict:
    """How the GPU stages of the stores' index builds chunked their work (the indexes that report it, ``roar``;
    waits for background builds): ``builds``, ``shrunk_builds`` (builds whose stages started or retried with
    smaller chunks than full size: a tight GPU budget) and ``oom_retries`` (out-of-memory errors retried)."""
    tot = {"builds": 0, "shrunk_builds": 0, "oom_retries": 0}
    for s in _built_stores(layers):
        st = getattr(s.index, "build_stats", None) or {}
        if "max_shrink" not in st:
            continue
        tot["builds"] += 1
        tot["shrunk_builds"] += int(st["max_shrink"] > 1)
        tot["oom_retries"] += int(st["oom_retries"])
    return tot


def train_positions(n: int, m: int) -> torch.Tensor:
    """Which of ``n`` prompt queries train the index: all when ``n <= m``, else ``m`` evenly spaced (always the
    first and the last); CPU long ``[min(n, m)]``. The grid is computed in float64 (float32 rounds positions near
    ``n = 2**17`` to the wrong side of ``.5``), so ``bench recall`` trains on exactly these positions."""
    if n <= m:
        return torch.arange(n)
    return torch.linspace(0, n - 1, m, dtype=torch.float64).round().long()


class RetrievalCache(DynamicCache):
    """A ``DynamicCache`` whose eligible full-attention layers are :class:`RetrievalLayer` objects.

    Pass it to ``model.generate(past_key_values=cache)`` (or a forward call) while the model uses the
    ``retrieval_attention`` attention implementation (see :func:`retrieval_attention.integration.enable`).
    """

    def __init__(self, model_config, config: RetrievalConfig, rope_inv_freq: dict | None = None):
        """``rope_inv_freq``: layer index -> that layer's RoPE inverse frequencies ``[head_dim / 2]`` (see
        :func:`retrieval_attention.rope.rope_inv_freq`; ``make_cache(model, config)`` passes them), for
        ``config.align_train_queries``; layers without them train on the prompt's queries as they are."""
        if config.method == "full":
            raise ValueError("method 'full' uses the plain transformers cache; build a RetrievalCache for retrieval/streaming")
        super().__init__(config=model_config)
        self.config = config
        text_cfg = model_config.get_text_config(decoder=True)
        n_layers = text_cfg.num_hidden_layers
        bad = [i for i in config.dense_layers if i >= n_layers]
        if bad:
            raise ValueError(f"dense_layers {bad} out of range: the model has {n_layers} layers")
        if not self.layers:
            self.layers = [DynamicLayer() for _ in range(n_layers)]
            self.layer_class_to_replicate = None
        for i, layer in enumerate(self.layers):
            if type(layer) is DynamicLayer and i not in config.dense_layers:
                self.layers[i] = RetrievalLayer(i, config, (rope_inv_freq or {}).get(i))
        #: the background index builds (held until the prefill ends with build_schedule="after_prefill":
        #: :meth:`start_builds`)
        self.builds = BuildGroup()
        #: the asynchronous prefill hand-off (config.handoff="async"), drained by :meth:`start_builds`
        self.handoff = HandOff()
        for layer in self.retrieval_layers:
            layer.builds = self.builds
            layer.handoff = self.handoff
        self._bar = None

    def start_builds(self) -> None:
        """Start the background index builds held back during the prefill (``build_schedule="after_prefill"``;
        a no-op otherwise). The layer-by-layer prefill calls it when its last layer is done; waiting for an index
        calls it too. First it waits for the asynchronous hand-offs still landing (``handoff="async"``): their
        builds join the group as they land."""
        try:
            self.handoff.drain()
        finally:
            self.builds.release()

    def set_progress(self, on: bool) -> None:
        """Show a progress bar over layers during prefill + offload + index build."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if not on:
            return
        from tqdm.auto import tqdm

        desc = "prefill + index build" if self.config.method == "retrieval" else "prefill + offload"
        self._bar = tqdm(total=len(self.retrieval_layers), desc=desc, unit="layer", leave=False)

        def tick(layer):
            if self._bar is not None:
                self._bar.update(1)
                # the stores as created (``_stores``): ``stores`` would wait for an asynchronous hand-off to land
                self._bar.set_postfix(index_s=f"{sum(s.build_s for l in self.retrieval_layers for s in l._stores):.1f}")

        for layer in self.retrieval_layers:
            layer.on_offloaded = tick

    def wait_for_builds(self, progress: bool = False) -> float:
        """Block until every layer's background index build is done (``progress``: a bar over the stores still
        building); returns the seconds waited."""
        t0 = time.perf_counter()
        self.start_builds()
        pending = [s for l in self.retrieval_layers for s in l.stores if isinstance(s, CPUStore) and s._pending is not None]
        bar = None
        if progress and pending:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(pending), desc="waiting for index builds", unit="store", leave=False)
        for s in pending:
            s.wait()
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        return time.perf_counter() - t0

    def fork(self) -> "RetrievalCache":
        """A cache that continues after this one's tokens without changing it (persistent contexts).

        Device tensors are shared (the cache replaces tensors, never writes into them) and the CPU stores
        and indexes are shared read-only; each fork keeps its own window and an exact-scanned tail.
        """
        import copy

        if any(isinstance(s, ForkedStore) for l in self.retrieval_layers for s in l.stores):
            raise ValueError("cannot fork a forked cache; fork the original context's cache")
        twin = copy.copy(self)
        twin._bar = None
        twin.layers = [l.fork() if isinstance(l, RetrievalLayer) else copy.copy(l) for l in self.layers]
        return twin

    @property
    def retrieval_layers(self) -> list[RetrievalLayer]:
        return [layer for layer in self.layers if isinstance(layer, RetrievalLayer)]

    def stats(self) -> dict:
        rl = self.retrieval_layers
        dev = sum(l.device_bytes() for l in rl)
        for layer in self.layers:
            if not isinstance(layer, RetrievalLayer) and getattr(layer, "keys", None) is not None:
                dev += 2 * layer.keys.numel() * layer.keys.element_size()
        return {
            "retrieval_layers": len(rl),
            "offloaded_layers": sum(l.offloaded for l in rl),
            "index_build_s": sum(s.build_s for s in _built_stores(rl)),
            "search_s": sum(l.stats.search_s for l in rl),
            "wait_s": sum(l.stats.wait_s for l in rl),
            "host_s": sum(l.stats.host_s for l in rl),
            "handoff_s": sum(l.stats.handoff_s for l in rl),
            "handoff_wait_s": sum(l.stats.handoff_wait_s for l in rl),
            "handoff_land_s": sum(l.stats.handoff_land_s for l in rl),
            "index_build_stages_s": _sum_build_stages(rl),
            "index_build_chunks": _sum_build_chunks(rl),
            "cpu_attention_s": sum(l.stats.cpu_attention_s for l in rl),
            # keys scanned by a layer call's most loaded worker over the average worker's (1 = balanced; the
            # call waits for the most loaded one); None when no fused call recorded it
            "worker_imbalance": _ratio(sum(l.stats.worker_keys_max for l in rl),
                                       sum(l.stats.worker_keys_mean for l in rl)),
            "n_searches": sum(l.stats.n_searches for l in rl),
            "scanned_fraction": (
                sum(l.stats.n_scanned for l in rl) / max(1, sum(l.stats.n_cpu_keys_at_search for l in rl))
            ),
            "kv_device_bytes": dev,
            "kv_cpu_bytes": sum(l.cpu_bytes() for l in rl),
        }
