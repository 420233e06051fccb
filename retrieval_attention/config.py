"""One configuration object for retrieval decoding, validated on construction."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

METHODS = ("full", "retrieval", "streaming")

#: residual draws per query head and step. SmolLM2 at 4K (bench agreement, CPU): 64 draws KL 0.0016 / top-1
#: 98.4%, 256 draws 0.0003 / 99.6%, 1024 draws 0.0001 / 100%; 256 also recovers a needle that 64 and 128 lose
DEFAULT_RESIDUAL_SAMPLES = 256

#: CPU stores with fewer keys than this are scanned exactly (``flat``) instead of indexed: on 2 cores a roar
#: layer of 1,408 keys (SmolLM2, 2K prompt) takes ~0.6 s to build and its search scans ~60% of the keys
#: anyway; exact top-k over that few keys costs no build, answers exactly and searches as fast
DEFAULT_EXACT_BELOW = 2048

#: where the lean decode loop computes the residual estimate: ``auto`` = on the model's device when that is a GPU
RESIDUAL_ON = ("auto", "device", "cpu")
#: decode steps between redraws of the device residual's sample (its keys/values held on the model's device)
DEFAULT_RESIDUAL_REFRESH = 64

#: positions over which the index-training queries' decode-phase targets are spread (``align_spread``). SmolLM2
#: roar recall@100 (docs/BENCHMARKS.md, session 14; 8K: layers 2, 8, 14, 20, 26 at 8% scanned; 32K: layers 2, 14,
#: 26 at 2%): not aligned 0.900 / -; spread 0: 0.940 / 0.909 (worst head 0.57: the queries collapse onto few keys);
#: 16: 0.943; 32: 0.945 / 0.938; 64: 0.947 / 0.945; 128: 0.942 / 0.940; 256: 0.938
DEFAULT_ALIGN_SPREAD = 64
#: background index builds at once (``build_workers``) without CUDA: the builds share the CPU cores, one at a time
DEFAULT_BUILD_WORKERS = 1
#: ... and with CUDA: one layer's CPU stages (owner lists, connectivity repair) overlap another's GPU stages. Llama-3-8B
#: shape at 128K, 24 GB budget, H100 host (docs/BENCHMARKS.md, session 16): the wait for the index after the prefill
#: 62.7 s with one worker, 45.1 / 49.8 s with two; peak GPU memory 20.0 against 21.1 GiB; decode unchanged
CUDA_BUILD_WORKERS = 2
#: ``build_schedule`` values: builds beside the prefill (``overlap``) or after it (``after_prefill``). Llama-3-8B shape
#: at 128K, 24 GB budget, H100 host (docs/BENCHMARKS.md, sessions 20, 22): the prefill took 17.7 s without builds
#: (streaming) and 37.3-43.2 s beside them with the synchronous hand-off; with the asynchronous one, the first
#: decode step came after 66.1 s overlapped (prefill 20.8 s) and 69.9 s after the prefill (18.6 s + 51.3 s of
#: builds, two at a time: 1.6 s per layer against 1.03 s for one layer's build alone)
BUILD_SCHEDULES = ("overlap", "after_prefill")
#: ``handoff`` values: how a prefilled layer's KV reaches the host (CUDA). ``sync``: the prefill waits for the layer's
#: device work, then copies into the stores' pageable memory while the device idles. ``async``: non-blocking copies
#: into pinned memory on the prefill's stream, the next layer queued at once, and a host thread moving the data into
#: the stores. ``auto``: ``async`` on a CUDA device, else ``sync``. Llama-3-8B shape at 128K, 24 GB budget, H100
#: host (docs/BENCHMARKS.md, session 22): prefill 18.6 / 20.8 s with ``async`` against 25.1 / 34.0 s with ``sync``
#: (builds after the prefill / beside it; 17.7 s without builds), the first decode step 5.7-6.8 s sooner
HANDOFFS = ("auto", "sync", "async")


@dataclass
class RetrievalConfig:
    """Settings of retrieval attention (defaults are the method's published ones).

    method          ``full`` (plain transformers cache), ``retrieval`` (this method) or ``streaming``
                    (sink + window only, no retrieval)
    n_sink          initial tokens kept on the model's device
    window          most recent tokens kept on the model's device
    top_k           keys retrieved per query head per step from the CPU store
    index           registered index name (``roar``, ``flat``, ``ivf``, ``hnsw``)
    index_params    constructor parameters of the index (e.g. ``{"M": 32}``)
    search_params   per-search budget (e.g. ``{"ef": 128}``); empty = the index's default
    offload_device  where the retrievable KV lives (``cpu``)
    prefill_chunk   query-chunk size of exact prefill attention (bounds the score matrix)
    dense_layers    layer indices kept exact (full attention) whatever the method
    max_train_queries  prefill queries per query head used to train the index (evenly subsampled); ``None``: 4,096
                    up to 32K tokens, then growing as the square root of the prompt length, 8,192 at 128K
                    (:meth:`train_queries`)
    residual_samples   keys drawn uniformly per query head and step to estimate the attention mass of the
                    keys retrieval did not return (0 = drop it, the published method; see
                    :mod:`retrieval_attention.attention.residual`)
    residual_seed   seed of those draws (deterministic per layer size, head and query)
    residual_on     where the lean decode loop (:class:`~retrieval_attention.decode_loop.LeanDecoder`) computes the
                    residual: ``cpu`` (fresh draws every step, inside the CPU search call), ``device`` (a sample
                    of the same draws held on the model's device, redrawn every ``residual_refresh`` steps and
                    scored there while the CPU searches; :mod:`retrieval_attention.attention.residual_device`), or
                    ``auto`` (``device`` on a GPU, else ``cpu``). The transformers forward path always uses ``cpu``
    residual_refresh  decode steps between redraws of the device residual's sample (1 = every step: the same
                    estimate as ``cpu``)
    exact_below     stores with fewer keys at prefill than this use exact top-k (``flat``) instead of ``index``
                    (0 = always ``index``); a store keeps its kind as it grows
    align_train_queries  rotate each index-training query by RoPE from its prompt position to the decode position
                    (:func:`retrieval_attention.rope.align_to_decode`): the graph learns the phase decode queries
                    have. Needs the model's RoPE frequencies (caches made by ``make_cache(model, ...)``); models
                    without a readable rotary embedding train on the prompt's queries as they are
    align_spread    the decode-phase targets spread uniformly over this many positions around the first decode
                    position (0 = all at it; see :data:`DEFAULT_ALIGN_SPREAD`)
    build_workers   index builds that run at once in the background (on CUDA, overlapping the layer-by-layer
                    prefill; each build is itself multi-threaded). 2 lets one layer's CPU stages (owner lists,
                    connectivity repair) run while another layer's kNN and projection use the GPU, at the cost of
                    two builds' GPU buffers at once (+1.1 GiB at 128K of the 8B shape). ``None`` (default): 2 when
                    CUDA is available (:data:`CUDA_BUILD_WORKERS`), else 1 (:data:`DEFAULT_BUILD_WORKERS`; see
                    :meth:`resolved_build_workers`). Where numba's threading layer cannot run parallel kernels from
                    two threads (``workqueue``) the builds run one at a time whatever this says
    build_priority  CUDA stream priority of the background builds' GPU work: "normal" or "high" (their kernels'
                    blocks are scheduled before the overlapping prefill's pending ones; see
                    :data:`retrieval_attention.threads.STREAM_PRIORITIES`)
    build_schedule  when the background builds (CUDA) run: ``"overlap"`` (default: each layer's build starts as
                    soon as the layer-by-layer prefill has offloaded it, beside the next layers' prefill) or
                    ``"after_prefill"`` (held until the prefill has run every layer, then ``build_workers`` at
                    once; see :data:`BUILD_SCHEDULES`)
    handoff         how each prefilled layer's KV and training queries move to the host (see :data:`HANDOFFS`):
                    ``"async"`` (pinned non-blocking copies, landed into the stores by a host thread while the next
                    layers run; the stores are ready when the prefill returns), ``"sync"`` (the prefill waits for
                    the layer and copies), or ``"auto"`` (default: ``async`` on a CUDA device, else ``sync``; see
                    :meth:`resolved_handoff`). Without CUDA there is nothing to copy, but ``"async"`` still lands
                    the stores on the hand-off thread, which then also runs their builds beside the next layers'
                    prefill
    decode_compile  the lean decode loop (:class:`retrieval_attention.decode_loop.LeanDecoder`) runs its dense
                    per-layer ops (input norm, projections, RoPE; the merge of the attention parts; o_proj, MLP)
                    compiled by ``torch.compile``: fewer, fused kernels between the CPU round trips (8B shape at
                    128K on an H100 host: 61.5 against 67.8 / 70.1 ms/token). The first decode step compiles.
                    ``None`` (default): on when the loop runs on a CUDA device, off on the CPU (where it measured
                    no gain); True / False force it
    """

    method: str = "retrieval"
    n_sink: int = 128
    window: int = 512
    top_k: int = 100
    index: str = "roar"
    index_params: dict[str, Any] = field(default_factory=dict)
    search_params: dict[str, Any] = field(default_factory=dict)
    offload_device: str = "cpu"
    prefill_chunk: int = 2048
    dense_layers: tuple[int, ...] = (0, 1)
    max_train_queries: int | None = None
    residual_samples: int = DEFAULT_RESIDUAL_SAMPLES
    residual_seed: int = 0
    residual_on: str = "auto"
    residual_refresh: int = DEFAULT_RESIDUAL_REFRESH
    exact_below: int = DEFAULT_EXACT_BELOW
    align_train_queries: bool = True
    align_spread: int = DEFAULT_ALIGN_SPREAD
    build_workers: int | None = None
    build_priority: str = "normal"
    build_schedule: str = "overlap"
    handoff: str = "auto"
    decode_compile: bool | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if not isinstance(self.align_train_queries, bool):
            raise ValueError(f"align_train_queries must be True or False, got {self.align_train_queries!r}")
        if self.decode_compile is not None and not isinstance(self.decode_compile, bool):
            raise ValueError(f"decode_compile must be True, False or None (on with CUDA), got {self.decode_compile!r}")
        for name in ("residual_samples", "residual_seed", "exact_below", "align_spread"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {v!r}")
        from .threads import check_stream_priority

        check_stream_priority(self.build_priority)
        if self.build_schedule not in BUILD_SCHEDULES:
            raise ValueError(f"build_schedule must be one of {', '.join(BUILD_SCHEDULES)}, got {self.build_schedule!r}")
        if self.handoff not in HANDOFFS:
            raise ValueError(f"handoff must be one of {', '.join(HANDOFFS)}, got {self.handoff!r}")
        if self.residual_on not in RESIDUAL_ON:
            raise ValueError(f"residual_on must be one of {', '.join(RESIDUAL_ON)}, got {self.residual_on!r}")
        for name in ("n_sink", "window", "top_k", "prefill_chunk", "max_train_queries", "residual_refresh",
                     "build_workers"):
            v = getattr(self, name)
            if v is None and name in ("max_train_queries", "build_workers"):
                continue
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        from .index import available_indexes, make_index

        if self.index not in available_indexes():
            raise ValueError(f"unknown index {self.index!r}; available: {', '.join(available_indexes())}")
        if self.index_params:  # checked now, not when the first store builds its index
            try:
                make_index(self.index, **self.index_params)
            except TypeError as e:  # an option the index does not have
                raise ValueError(f"index_params {self.index_params} for {self.index!r}: {e}") from e
        if self.offload_device != "cpu":
            raise ValueError(f"offload_device must be 'cpu' (got {self.offload_device!r})")
        self.dense_layers = tuple(int(i) for i in (self.dense_layers or ()))
        if any(i < 0 for i in self.dense_layers):
            raise ValueError(f"dense_layers must be non-negative layer indices, got {self.dense_layers}")

    @property
    def n_static(self) -> int:
        """Tokens kept on the device (sink + window)."""
        return self.n_sink + self.window

    def train_queries(self, n_tokens: int) -> int:
        """Prefill queries per query head that train the index of a ``n_tokens``-token prompt: ``max_train_queries``,
        or when that is ``None`` :func:`retrieval_attention.index.roar.auto_train_queries` of ``n_tokens``."""
        if self.max_train_queries is not None:
            return self.max_train_queries
        from .index.roar import auto_train_queries

        return auto_train_queries(n_tokens)

    def resolved_build_workers(self) -> int:
        """Background index builds at once: ``build_workers``, or when that is ``None`` :data:`CUDA_BUILD_WORKERS` if
        CUDA is available (the builds' kNN and projection run there) and :data:`DEFAULT_BUILD_WORKERS` otherwise."""
        if self.build_workers is not None:
            return self.build_workers
        import torch

        return CUDA_BUILD_WORKERS if torch.cuda.is_available() else DEFAULT_BUILD_WORKERS

    def resolved_handoff(self, device) -> str:
        """How a prefilled layer on ``device`` (a ``torch.device`` or its name) reaches the host: ``handoff``, or
        when that is ``"auto"`` ``"async"`` on a CUDA device and ``"sync"`` elsewhere."""
        if self.handoff != "auto":
            return self.handoff
        return "async" if _is_cuda(device) else "sync"

    def resolved_decode_compile(self, device) -> bool:
        """Whether the lean decode loop on ``device`` (a ``torch.device`` or its name) compiles its dense ops:
        ``decode_compile``, or when that is ``None`` whether the device is CUDA."""
        if self.decode_compile is not None:
            return self.decode_compile
        return _is_cuda(device)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["dense_layers"] = list(self.dense_layers)
        return d


def _is_cuda(device) -> bool:
    """Whether ``device`` (a ``torch.device`` or its name, e.g. ``"cuda:1"``) is a CUDA device."""
    return getattr(device, "type", str(device).split(":")[0]) == "cuda"


def split_residual_option(spec: str) -> tuple[str, int | None]:
    """A method spec's ``@r=<m>`` suffix (residual samples): ``"retrieval:roar@r=0"`` -> ``("retrieval:roar", 0)``;
    without a suffix ``(spec, None)``. Shared by ``eval --methods`` and ``bench agreement --methods``."""
    spec, _, opt = spec.partition("@")
    if not opt:
        return spec, None
    key, _, val = opt.partition("=")
    if key != "r" or not val.isdigit():
        raise ValueError(f"bad method option {opt!r}: use @r=<residual samples>, e.g. retrieval:roar@r=0")
    return spec, int(val)

