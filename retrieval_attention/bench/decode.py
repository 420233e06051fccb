"""Decode latency, memory and index build at long contexts, per attention method.

Methods: ``full`` (KV on the device, exact SDPA), ``offload`` (exact attention with the KV in CPU memory,
moved to the device each step: transformers' offloaded ``DynamicCache``), ``retrieval`` (this method, any
index) and ``streaming`` (sink + window only). Models: a ``--shape`` preset with random weights (timing
does not need trained weights) or a real model via ``--model``.

Llama-family models prefill layer by layer (``--prefill layerwise``, one layer's KV on the device at a
time) and decode retrieval/streaming steps with :class:`~retrieval_attention.decode_loop.LeanDecoder`
(``--decode lean``; ``--cuda-graphs`` on CUDA); ``--prefill forward`` / ``--decode hf`` run the plain
transformers forward instead.
"""

from __future__ import annotations

import argparse
import gc
import inspect
from contextlib import nullcontext
import os
import statistics
import sys
import time

from ..config import (BUILD_SCHEDULES, HANDOFFS, CUDA_BUILD_WORKERS, DEFAULT_BUILD_WORKERS, DEFAULT_RESIDUAL_SAMPLES,
                      RESIDUAL_ON)
from .kernels import CALL_PARTS

SHAPES = {
    # real Llama-3-8B sizes
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, head_dim=128, vocab_size=128256, rope_theta=500000.0),
    # the embedded models' shapes
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, head_dim=64, vocab_size=49152, rope_theta=100000.0,
                    tie_word_embeddings=True),
    # Gemma-3-270M: 5 sliding-window layers (512 tokens, kept on the device) per global layer (retrieval)
    "gemma3-270m": dict(model_type="gemma3_text", hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                        num_attention_heads=4, num_key_value_heads=1, head_dim=256, vocab_size=262144,
                        query_pre_attn_scalar=256, sliding_window=512,
                        layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 3),
    # for tests / smoke runs on a CPU
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32, vocab_size=1024, rope_theta=10000.0),
    "tiny-gemma3": dict(model_type="gemma3_text", hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=1024,
                        query_pre_attn_scalar=32, sliding_window=64,
                        layer_types=["sliding_attention", "full_attention"] * 2),
}
#: the transformers architecture of a shape without a ``model_type`` entry
DEFAULT_SHAPE_TYPE = "llama"
METHODS = ("full", "offload", "retrieval", "streaming")
#: --dtype spellings -> torch dtype names
DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16",
          "fp32": "float32", "float32": "float32"}


#: decode-time settings a ``--variant`` may change (RetrievalConfig fields; ``ef`` is the roar search budget)
VARIANT_KEYS = ("residual_on", "ef", "residual_samples", "residual_refresh", "top_k", "decode_compile")
#: spellings of a boolean variant value
_BOOL_VALUES = {"1": True, "true": True, "on": True, "0": False, "false": False, "off": False}


def _chunks_note(chunks: dict | None) -> str:
    """The log's note on the builds' GPU chunks, e.g. ``"; smaller chunks in 3/32 builds, 2 out-of-memory
    retries"``; empty when no build reported its chunks or none shrank or retried."""
    if not chunks or not chunks.get("builds") or not (chunks.get("shrunk_builds") or chunks.get("oom_retries")):
        return ""
    return (f"; smaller chunks in {chunks['shrunk_builds']}/{chunks['builds']} builds, "
            f"{chunks['oom_retries']} out-of-memory retries")


def parse_variant(spec: str) -> dict:
    """``"ef=96,residual_on=cpu"`` -> ``{"ef": 96, "residual_on": "cpu"}``; raises ValueError naming the bad part."""
    out = {}
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        key, eq, val = part.partition("=")
        key, val = key.strip(), val.strip()
        if not eq or not val:
            raise ValueError(f"{part!r} is not KEY=VALUE")
        if key not in VARIANT_KEYS:
            raise ValueError(f"unknown key {key!r}; choose from {', '.join(VARIANT_KEYS)}")
        if key == "residual_on":
            if val not in RESIDUAL_ON:
                raise ValueError(f"residual_on must be one of {', '.join(RESIDUAL_ON)}, got {val!r}")
            out[key] = val
            continue
        if key == "decode_compile":
            if val.lower() not in _BOOL_VALUES:
                raise ValueError(f"decode_compile must be 1 or 0 (true/false, on/off), got {val!r}")
            out[key] = _BOOL_VALUES[val.lower()]
            continue
        least = 0 if key == "residual_samples" else 1
        try:
            v = int(val)
        except ValueError:
            raise ValueError(f"{key} must be an integer, got {val!r}") from None
        if v < least:
            raise ValueError(f"{key} must be >= {least}, got {v}")
        out[key] = v
    if not out:
        raise ValueError(f"{spec!r} sets nothing")
    return out


def variant_label(v: dict) -> str:
    return ",".join(f"{k}={x}" for k, x in v.items())


def parse_size(s: str) -> int:
    """``"24GB"`` -> bytes (GB = 2**30)."""
    s = s.strip().upper().replace("IB", "B")
    for unit, mul in (("TB", 1 << 40), ("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10), ("B", 1)):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mul)
    return int(float(s))


def parse_contexts(s: str) -> list[int]:
    out = []
    for part in s.split(","):
        part = part.strip().upper()
        if not part:
            continue
        mul = 1024 if part.endswith("K") else (1 << 20 if part.endswith("M") else 1)
        out.append(int(float(part.rstrip("KM")) * mul))
    if not out:
        raise ValueError("no context lengths given")
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES), help="random-weight model of this shape")
    p.add_argument("--model", default=None, help="a real model instead of --shape (name, path, hub id)")
    p.add_argument("--context", default="8K,32K,128K", help="comma-separated prompt lengths (K = 1024)")
    p.add_argument("--methods", default="full,offload,retrieval,streaming")
    p.add_argument("--index", default="roar", help="index of the retrieval method (comma list for several)")
    p.add_argument("--top-k", type=int, default=100)
    p.add_argument("--n-sink", type=int, default=128)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--dense-layers", default="", help="layers kept exact (default none for timing)")
    p.add_argument("--residual-samples", type=int, default=None,
                   help="residual draws per query head and step (default: the library's, "
                        f"{DEFAULT_RESIDUAL_SAMPLES}; 0 = the published method)")
    p.add_argument("--residual-on", default=None, choices=RESIDUAL_ON,
                   help="where the lean decode loop estimates the residual: device (a sample held on the GPU, "
                        "scored while the CPU searches), cpu (fresh draws inside the CPU search call), auto "
                        "(the default: device on a GPU)")
    p.add_argument("--ef", type=int, default=None, help="beam width of the roar search (default: the index's)")
    p.add_argument("--max-train-queries", type=int, default=None,
                   help="prefill queries per query head that train the index (default: RetrievalConfig's, "
                        "4,096 up to 32K tokens, 8,192 at 128K: roar.auto_train_queries)")
    p.add_argument("--no-align", action="store_true",
                   help="train the index on the prompt's queries as prefilled, not rotated to the decode position "
                        "(RetrievalConfig.align_train_queries=False)")
    p.add_argument("--build-workers", type=int, default=None,
                   help="background index builds at once (default: RetrievalConfig's, "
                        f"{CUDA_BUILD_WORKERS} with CUDA, else {DEFAULT_BUILD_WORKERS})")
    p.add_argument("--build-priority", choices=("normal", "high"), default=None,
                   help="CUDA stream priority of the background index builds (RetrievalConfig.build_priority; "
                        "default: RetrievalConfig's)")
    p.add_argument("--build-schedule", choices=BUILD_SCHEDULES, default=None,
                   help="background index builds beside the layer-by-layer prefill (overlap) or after it "
                        "(after_prefill) (RetrievalConfig.build_schedule; default: RetrievalConfig's)")
    p.add_argument("--handoff", choices=HANDOFFS, default=None,
                   help="each prefilled layer's move to the host: synchronous, asynchronous (pinned non-blocking "
                        "copies landed by a host thread), or auto (async on CUDA) (RetrievalConfig.handoff; default: "
                        "RetrievalConfig's)")
    p.add_argument("--steps", type=int, default=64, help="timed decode steps (median reported)")
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                   help="model dtype (default bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--gpu-memory-budget", default=None, help="emulate a smaller GPU, e.g. 24GB")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None)
    p.add_argument("--markdown", default=None)
    p.add_argument("--update-docs", action="store_true")
    p.add_argument("--prefill", default=None, choices=("layerwise", "forward"),
                   help="layerwise: all tokens through one layer at a time (default for Llama-family models); "
                        "forward: one transformers forward")
    p.add_argument("--prefill-chunk", type=int, default=8192, help="tokens per layer-by-layer prefill chunk")
    p.add_argument("--prefill-offload-hidden", action="store_true",
                   help="layer-by-layer prefill keeps the [T, hidden] states in pinned host memory (default: when "
                        "they would take over a quarter of the GPU memory left under the budget, e.g. 512K tokens of "
                        "the 8B shape at 24 GB)")
    p.add_argument("--decode", default=None, choices=("lean", "hf"),
                   help="retrieval/streaming decode steps: lean (LeanDecoder, default when supported) or hf "
                        "(the transformers forward)")
    p.add_argument("--cuda-graphs", action="store_true", help="lean decode: capture device segments in CUDA graphs")
    p.add_argument("--compile", dest="compile", action="store_const", const=True, default=None,
                   help="lean decode: compile the dense per-layer ops with torch.compile "
                        "(RetrievalConfig.decode_compile; the first step compiles). Default: on with CUDA, off on "
                        "the CPU")
    p.add_argument("--no-compile", dest="compile", action="store_const", const=False,
                   help="lean decode: run the dense per-layer ops uncompiled (also with CUDA)")
    p.add_argument("--variant", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                   help="after the retrieval run's timed steps, time the decode again with these settings on the same "
                        "prefilled cache and built index (no second prefill or build), one record per --variant; "
                        f"keys: {', '.join(VARIANT_KEYS)}; e.g. --variant residual_on=cpu --variant ef=96")
    p.add_argument("--unbudgeted-reference", action="store_true",
                   help="re-run a method that is OOM under --gpu-memory-budget without the budget (the whole GPU), "
                        "as the speed reference of the ratios (recorded with gpu_memory_budget null)")


def host_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


#: share of the available host memory a run may plan to use (the rest: the process, allocator slack)
HOST_MEMORY_SHARE = 0.9


def available_host_bytes() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` (None where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def host_bytes_needed(model_config, method: str, ctx: int, dtype_bytes: int) -> int:
    """Host memory the CPU-resident KV of ``method`` needs at ``ctx`` tokens: keys + values of every layer
    (``offload``, ``retrieval``) plus one roar graph per KV head and layer (``retrieval``); 0 for methods that
    keep their KV on the device."""
    cfg = model_config
    heads = cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv = 2 * cfg.num_hidden_layers * heads * ctx * d * dtype_bytes
    if method == "offload":
        return kv
    if method == "retrieval":
        from ..index.roar import RoarIndex

        degree = inspect.signature(RoarIndex).parameters["M"].default  # the index's default out-degree
        return kv + cfg.num_hidden_layers * heads * ctx * degree * 4  # int32 adjacency rows
    return 0


def shape_config(name: str):
    """The transformers config of shape preset ``name`` (:data:`SHAPES`), positions up to 2M tokens."""
    import transformers as tf

    kw = dict(SHAPES[name])
    model_type = kw.pop("model_type", DEFAULT_SHAPE_TYPE)
    return tf.AutoConfig.for_model(model_type, **kw, max_position_embeddings=1 << 21)


def build_model(args, device, dtype):
    import torch
    import transformers as tf

    if args.model:
        from ..models import load_model

        model, _ = load_model(args.model, device=device, dtype=dtype)
        return model, args.model
    cfg = shape_config(args.shape)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = tf.AutoModelForCausalLM.from_config(cfg)
    finally:
        torch.set_default_dtype(prev)
    model.eval()
    model.set_attn_implementation("sdpa")
    return model, f"random {args.shape}"


def run_one(model, method, index, ctx, args, device):
    """Prefill ``ctx`` random tokens with ``method`` then time ``steps`` greedy decode steps."""
    import torch
    from transformers import DynamicCache

    from ..config import RetrievalConfig
    from ..generation import cache_kwarg
    from ..gpumem import cuda_alloc_retries
    from ..decode_loop import LeanDecoder
    from ..decode_loop import unsupported_reason as lean_unsupported_reason
    from ..integration import enable, make_cache
    from ..prefill import (DEFAULT_CHUNK, check_supported, hidden_state_bytes, layerwise_prefill, offload_hidden_auto,
                           unsupported_reason)

    cuda = str(device).startswith("cuda")
    dense = tuple(int(x) for x in args.dense_layers.split(",") if x.strip())
    rec = {"method": method, "index": index if method == "retrieval" else None, "context": ctx, "oom": False}
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    retries0 = cuda_alloc_retries(cuda)
    gen = torch.Generator().manual_seed(ctx)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, ctx), generator=gen).to(device)
    if method == "full":
        cache, ctxm = DynamicCache(config=model.config), nullcontext()
    elif method == "offload":
        cache, ctxm = DynamicCache(config=model.config, offloading=True), nullcontext()
    else:
        residual = getattr(args, "residual_samples", None)
        residual_on = getattr(args, "residual_on", None)
        ef = getattr(args, "ef", None)
        train = getattr(args, "max_train_queries", None)
        from .common import parse_index_spec

        name, index_params = parse_index_spec(index) if index else ("flat", {})  # e.g. roar:projection=torch
        cfg = RetrievalConfig(method=method, index=name, index_params=index_params, top_k=args.top_k,
                              n_sink=args.n_sink, window=args.window,
                              dense_layers=dense, search_params={"ef": ef} if ef is not None and name == "roar" else {},
                              exact_below=0,  # time the named index at every context
                              align_train_queries=not getattr(args, "no_align", False),
                              decode_compile=getattr(args, "compile", None),
                              **({} if getattr(args, "build_workers", None) is None
                                 else {"build_workers": args.build_workers}),
                              **({} if getattr(args, "build_priority", None) is None
                                 else {"build_priority": args.build_priority}),
                              **({} if getattr(args, "build_schedule", None) is None
                                 else {"build_schedule": args.build_schedule}),
                              **({} if getattr(args, "handoff", None) is None else {"handoff": args.handoff}),
                              **({} if residual is None else {"residual_samples": residual}),
                              **({} if residual_on is None else {"residual_on": residual_on}),
                              **({} if train is None else {"max_train_queries": train}))
        if method == "retrieval":
            rec["residual_samples"], rec["search_params"] = cfg.residual_samples, dict(cfg.search_params)
            rec["top_k"] = cfg.top_k
            rec["max_train_queries"] = cfg.train_queries(ctx)  # per query head (the automatic count when not given)
            rec["align_train_queries"] = cfg.align_train_queries
            rec["build_workers"] = cfg.resolved_build_workers()
            rec["build_priority"] = cfg.build_priority
            rec["build_schedule"] = cfg.build_schedule
            rec["handoff"] = cfg.resolved_handoff(device)
            rec["decode_compile"] = cfg.resolved_decode_compile(device)
        cache, ctxm = make_cache(model, cfg), enable(model)
    kw = {cache_kwarg(model): cache}
    prefill_mode = getattr(args, "prefill", None) or ("layerwise" if unsupported_reason(model) is None else "forward")
    if prefill_mode == "layerwise":
        check_supported(model)
    rec["prefill_mode"], rec["decode_mode"] = prefill_mode, None
    decoder = None
    variants = []  # the --variant records (same prefill and index, decoded again)
    timing = rec  # the record being measured (an out-of-memory error marks it)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    try:
        with torch.no_grad(), ctxm:
            t0 = time.perf_counter()
            if prefill_mode == "layerwise":
                offload = bool(getattr(args, "prefill_offload_hidden", False)) or offload_hidden_auto(
                    *hidden_state_bytes(model, ids))
                rec["prefill_offload_hidden"] = offload
                # progress over layers: the retrieval cache's bar (prefill + offload + build), else the prefill's
                cache_bar = hasattr(cache, "set_progress")
                if cache_bar:
                    cache.set_progress(True)
                logits = layerwise_prefill(model, ids, cache, chunk=getattr(args, "prefill_chunk", DEFAULT_CHUNK),
                                           offload_hidden=offload, progress=not cache_bar)
                if cache_bar:
                    cache.set_progress(False)
            else:
                logits = model(input_ids=ids, use_cache=True, logits_to_keep=1, **kw).logits[:, -1]
            sync()
            rec["prefill_s"] = time.perf_counter() - t0
            print(f"{ctx:>8} {method:>9}: prefill {rec['prefill_s']:.1f} s", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            if hasattr(cache, "wait_for_builds"):
                cache.wait_for_builds(progress=True)
            st0 = cache.stats() if hasattr(cache, "stats") else {}  # waits for background index builds
            rec["index_build_s"] = st0.get("index_build_s", 0.0)
            rec["index_wait_s"] = time.perf_counter() - t0
            # the caching allocator's out-of-memory retries (each frees every cached block and waits for the whole
            # device) from the run's start to the first decode step: prefill and index builds under the budget
            rec["cuda_alloc_retries_to_first_step"] = cuda_alloc_retries(cuda) - retries0
            if "handoff_s" in st0:
                rec["prefill_handoff_s"] = st0["handoff_s"]
                rec["prefill_handoff_wait_s"] = st0.get("handoff_wait_s", 0.0)  # of it: the device finishing layers
                rec["prefill_handoff_land_s"] = st0.get("handoff_land_s", 0.0)  # async: the host thread's, beside
                rec["index_build_stages_s"] = st0.get("index_build_stages_s", {})
                rec["index_build_chunks"] = st0.get("index_build_chunks", {})  # smaller chunks under the budget
            tok = logits.argmax(-1, keepdim=True)
            decode_mode = "hf"
            if method in ("retrieval", "streaming") and getattr(args, "decode", None) != "hf":
                if LeanDecoder.supports(model, cache):
                    decoder = LeanDecoder(model, cache, cuda_graphs=getattr(args, "cuda_graphs", False))
                    decode_mode = "lean"
                elif getattr(args, "decode", None) == "lean":
                    print(f"note: lean decode not available ({lean_unsupported_reason(model, cache)}); "
                          "using the transformers forward", file=sys.stderr)
            rec["decode_mode"] = decode_mode
            tok = _time_decode(rec, method, model, cache, decoder, kw, tok, args, sync)
            specs = (getattr(args, "variant", None) or []) if method == "retrieval" else []
            if specs:
                base = config_settings(cache.retrieval_layers[0].config)
                rec["variant"] = None
            for spec in specs:
                if decoder is not None:  # a fresh decoder reads the new settings (buffers, CUDA graphs)
                    decoder.close()
                    decoder = None
                    gc.collect()
                    if cuda:
                        torch.cuda.empty_cache()
                v = parse_variant(spec)
                apply_variant(cache, v, base)
                vrec = {k: x for k, x in rec.items() if k not in DECODE_FIELDS}
                vrec["variant"] = variant_label(v)
                variants.append(vrec)
                timing = vrec
                # the variant decodes on from where the previous timing left the cache (positions ctx + steps ...)
                vrec["decode_start"] = ctx + len(variants) * (args.warmup + args.steps)
                if decode_mode == "lean":
                    decoder = LeanDecoder(model, cache, cuda_graphs=getattr(args, "cuda_graphs", False))
                c0 = cache.retrieval_layers[0].config
                vrec["residual_samples"], vrec["search_params"] = c0.residual_samples, dict(c0.search_params)
                vrec["top_k"], vrec["decode_compile"] = c0.top_k, c0.resolved_decode_compile(device)
                tok = _time_decode(vrec, method, model, cache, decoder, kw, tok, args, sync)
    except torch.OutOfMemoryError as e:
        timing["oom"] = True
        timing["error"] = str(e).splitlines()[0][:200]
    finally:
        if decoder is not None:
            decoder.close()
    for r in [rec] + variants:
        r["peak_gpu_bytes"] = torch.cuda.max_memory_allocated() if cuda else 0
        # what the budget (the memory fraction) caps: allocations plus the allocator's cached blocks, which it
        # keeps per CUDA stream (the background builds have streams of their own)
        r["peak_gpu_reserved_bytes"] = torch.cuda.max_memory_reserved() if cuda else 0
        r["cuda_alloc_retries"] = cuda_alloc_retries(cuda) - retries0  # the whole run (all variants)
        r["host_bytes"] = host_rss()
    del cache
    gc.collect()
    return [rec] + variants


#: the record fields one decode timing fills (:func:`_time_decode`); a ``--variant`` record gets its own
DECODE_FIELDS = ("decode_ms_per_token", "decode_ms_p90", "decode_ms_steps", "breakdown_ms", "search_call_ms",
                 "residual_on", "residual_device_bytes", "kv_device_bytes", "kv_cpu_bytes", "scanned_fraction",
                 "worker_imbalance", "variant")
#: the retrieval layers' counters whose difference over a timing gives its keys scanned and worker balance
_COUNTERS = ("n_searches", "n_scanned", "n_cpu_keys_at_search", "worker_keys_max", "worker_keys_mean")


def _counters(cache) -> dict:
    layers = getattr(cache, "retrieval_layers", [])
    out = {c: sum(getattr(l.stats, c) for l in layers) for c in _COUNTERS}
    for l in layers:  # the fused calls' time per part (roar), summed over layers
        for part, sec in l.stats.call_s.items():
            out["call_" + part] = out.get("call_" + part, 0.0) + sec
    return out


#: ``search_call_ms`` parts: where the lean loop's fused search calls spend a token's CPU search time
#: (``RoarIndex.last_call_timing``: the whole method, the kernel, the Python around it, then
#: :func:`retrieval_attention.index.decode_kernels.call_timing`'s parts of the kernel)
SEARCH_CALL_PARTS = ("wall", "kernel") + CALL_PARTS


def apply_variant(cache, v: dict, base: dict) -> None:
    """Give the RetrievalConfig(s) of ``cache``'s layers (read by the stores at every search call, and by a new
    LeanDecoder) the settings ``base`` (:func:`config_settings` of the run's own config) changed by a
    ``--variant``'s ``v`` (:func:`parse_variant`): variants do not accumulate."""
    for c in {id(l.config): l.config for l in cache.retrieval_layers}.values():
        for key, val in {**base, **v}.items():
            if key == "ef":
                c.search_params = {k: x for k, x in c.search_params.items() if k != "ef"}
                if val is not None:
                    c.search_params["ef"] = val
            else:
                setattr(c, key, val)


def config_settings(config) -> dict:
    """The :data:`VARIANT_KEYS` settings of a RetrievalConfig (``ef`` None: the index's default)."""
    return {k: config.search_params.get("ef") if k == "ef" else getattr(config, k) for k in VARIANT_KEYS}


def _time_decode(rec, method, model, cache, decoder, kw, tok, args, sync):
    """Time ``args.warmup + args.steps`` greedy steps from ``tok`` (``decoder`` or the transformers forward) and
    fill ``rec``'s :data:`DECODE_FIELDS` (median ms/token, p90, the step's breakdown, memory, keys scanned over
    these steps); returns the last token."""
    times, search, cpu_attn, waits, hosts = [], [], [], [], []
    c_start = _counters(cache)
    c_timed = c_start
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            c_timed = _counters(cache)  # the search calls' parts: timed steps only (warm-up steps may compile)
        s0 = cache.stats() if hasattr(cache, "stats") else None
        sync()
        t0 = time.perf_counter()
        if decoder is not None:
            tok = decoder.step(tok).argmax(-1, keepdim=True)
        else:
            out = model(input_ids=tok, use_cache=True, **kw)
            tok = out.logits[:, -1:].argmax(-1)
        sync()
        dt = time.perf_counter() - t0
        if step >= args.warmup:
            times.append(dt)
            if s0 is not None:
                s1 = cache.stats()
                search.append(s1["search_s"] - s0["search_s"])
                cpu_attn.append(s1["cpu_attention_s"] - s0["cpu_attention_s"])
                waits.append(s1["wait_s"] - s0["wait_s"])
                hosts.append(s1["host_s"] - s0["host_s"])
    c_end = _counters(cache)
    c = {k: x - c_start.get(k, 0.0) for k, x in c_end.items()}
    ct = {k: x - c_timed.get(k, 0.0) for k, x in c_end.items()}
    if ct.get("call_kernel_s") and args.steps:  # per token, the mean over the timed steps
        rec["search_call_ms"] = {p: 1000 * ct.get(f"call_{p}_s", 0.0) / args.steps for p in SEARCH_CALL_PARTS}
    if decoder is not None and method == "retrieval":  # where the residual ran, and its device sample
        rec["residual_on"] = "device" if decoder.residual_on_device else "cpu"
        rec["residual_device_bytes"] = decoder.residual_bytes()
    med = statistics.median(times)
    rec["decode_ms_per_token"] = 1000 * med
    rec["decode_ms_p90"] = 1000 * sorted(times)[int(0.9 * (len(times) - 1))]
    rec["decode_ms_steps"] = [round(1000 * t, 2) for t in times]  # each timed step, in order (stalls show here)
    if search:
        rec["breakdown_ms"] = {
            "cpu_search": 1000 * statistics.median(search),
            "cpu_attention": 1000 * statistics.median(cpu_attn),
            "rest_of_step": 1000 * (med - statistics.median(search) - statistics.median(cpu_attn)),
        }
        if decoder is not None and any(hosts):  # lean loop: where the host part's time goes
            rec["breakdown_ms"].update({
                "host_wait_device": 1000 * statistics.median(waits),  # host blocked on the device's q copies
                "host_other": 1000 * (statistics.median(hosts) - statistics.median(search)),  # evict, copies, Python
                "device_and_launch": 1000 * (med - statistics.median(waits) - statistics.median(hosts)),
            })
    if hasattr(cache, "stats"):
        st = cache.stats()
    else:  # plain transformers cache: all KV on the device (full) or in host memory (offload)
        from ..generation import _dense_bytes

        n = _dense_bytes(cache)
        st = {"kv_device_bytes": n, "kv_cpu_bytes": 0} if method == "full" else {"kv_device_bytes": 0, "kv_cpu_bytes": n}
    rec["kv_device_bytes"] = st.get("kv_device_bytes")
    if rec["kv_device_bytes"] is not None and rec.get("residual_device_bytes"):
        rec["kv_device_bytes"] += rec["residual_device_bytes"]  # the residual's sample: KV rows on the device
    rec["kv_cpu_bytes"] = st.get("kv_cpu_bytes")
    rec["scanned_fraction"] = c["n_scanned"] / max(1, c["n_cpu_keys_at_search"]) if c["n_searches"] else None
    if c["worker_keys_mean"] > 0:  # the fused layer calls' most / average worker load
        rec["worker_imbalance"] = c["worker_keys_max"] / c["worker_keys_mean"]
    return tok


def run(args) -> int:
    from ..threads import configure_threads

    configure_threads(args.threads)
    import torch

    from .common import command_line, default_docs_path, machine_line, markdown_table, update_doc_section, write_json

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        print(f"error: unknown method(s) {bad}; choose from {', '.join(METHODS)}", file=sys.stderr)
        return 2
    for flag, v, least in (("--residual-samples", args.residual_samples, 0), ("--ef", args.ef, 1),
                           ("--max-train-queries", args.max_train_queries, 1),
                           ("--build-workers", getattr(args, "build_workers", None), 1)):
        if v is not None and v < least:
            print(f"error: {flag} must be >= {least}, got {v}", file=sys.stderr)
            return 2
    from .common import parse_index_spec

    try:
        index_names = [parse_index_spec(i)[0] for i in args.index.split(",") if i.strip()]
    except ValueError as e:
        print(f"error: --index: {e}", file=sys.stderr)
        return 2
    if args.ef is not None and "roar" not in index_names:
        print(f"error: --ef is the beam width of roar; --index {args.index} has no roar (add it, or drop --ef)",
              file=sys.stderr)
        return 2
    variants = []
    for spec in args.variant:
        try:
            variants.append(parse_variant(spec))
        except ValueError as e:
            print(f"error: --variant {spec!r}: {e}", file=sys.stderr)
            return 2
    if variants and "retrieval" not in methods:
        print("error: --variant re-times the retrieval method; add retrieval to --methods (or drop --variant)",
              file=sys.stderr)
        return 2
    if any("ef" in v for v in variants) and "roar" not in index_names:
        print(f"error: --variant ef=... is the beam width of roar; --index {args.index} has no roar", file=sys.stderr)
        return 2
    if "offload" in methods and not device.startswith("cuda"):
        print("note: 'offload' needs a CUDA device (KV moves host -> device each step); skipped on CPU", file=sys.stderr)
        methods = [m for m in methods if m != "offload"]
    contexts = parse_contexts(args.context)
    model, label = build_model(args, device, dtype)
    if getattr(args, "prefill", None) == "layerwise":
        from ..prefill import unsupported_reason

        reason = unsupported_reason(model)
        if reason is not None:
            print(f"error: --prefill layerwise: {reason}; use --prefill forward (or leave --prefill out)",
                  file=sys.stderr)
            return 2
    fraction = None
    if args.gpu_memory_budget and device.startswith("cuda"):
        budget = parse_size(args.gpu_memory_budget)
        total = torch.cuda.get_device_properties(0).total_memory
        fraction = min(1.0, budget / total)
        torch.cuda.set_per_process_memory_fraction(fraction)
    runs = [(m, i) for m in methods for i in (args.index.split(",") if m == "retrieval" else [None])]
    records = []

    def one(method, index, ctx, budget_label):
        need = host_bytes_needed(model.config, method, ctx, torch.tensor([], dtype=dtype).element_size())
        avail = available_host_bytes()
        if need and avail is not None and need > HOST_MEMORY_SHARE * avail:
            # a host OOM would kill the whole run (and its JSON): record the method as not fitting instead
            rec = {"method": method, "index": index if method == "retrieval" else None, "context": ctx, "oom": True,
                   "oom_reason": "host memory", "host_bytes_needed": need, "host_bytes_available": avail,
                   "error": f"needs ~{need / 2**30:.0f} GiB of host memory, {avail / 2**30:.0f} GiB available",
                   "peak_gpu_bytes": 0, "peak_gpu_reserved_bytes": 0, "host_bytes": host_rss(), "prefill_mode": None,
                   "decode_mode": None}
            return report(rec, budget_label)
        recs = run_one(model, method, index, ctx, args, device)
        for rec in recs:
            report(rec, budget_label)
        return recs[0]

    def report(rec, budget_label):
        """Label, keep (JSON after every record: a run stopped by a time limit keeps what it measured) and print."""
        method, index, ctx = rec["method"], rec["index"], rec["context"]
        rec.update(model=label, dtype=str(dtype).replace("torch.", ""), device=device, gpu_memory_budget=budget_label,
                   cuda_graphs=bool(getattr(args, "cuda_graphs", False)) and rec.get("decode_mode") == "lean")
        records.append(rec)
        if args.json:
            write_json(args.json, records)
        msg = f"OOM ({rec.get('oom_reason', 'GPU memory')})" if rec["oom"] else (f"{rec['decode_ms_per_token']:.1f} ms/token ({rec['decode_mode']} decode), "
                                        f"prefill {rec['prefill_s']:.1f} s ({rec['prefill_mode']})"
                                        + (f", scanned {100 * rec['scanned_fraction']:.2f}%" if rec.get("scanned_fraction") else "")
                                        + (f", worker imbalance {rec['worker_imbalance']:.2f}" if rec.get("worker_imbalance") else "")
                                        + (f", search/attn {rec['breakdown_ms']['cpu_search']:.1f}/{rec['breakdown_ms']['cpu_attention']:.1f} ms"
                                           if rec.get("breakdown_ms") else "")
                                        + ("".join(f", {k} {v:.1f} ms" for k, v in rec["breakdown_ms"].items()
                                                   if k in ("host_wait_device", "host_other", "device_and_launch"))
                                           if rec.get("breakdown_ms") else "")
                                        + (" (search calls: " + ", ".join(f"{k} {v:.1f}" for k, v in rec["search_call_ms"].items())
                                           + " ms)" if rec.get("search_call_ms") else "")
                                        + (f", index build {rec['index_build_s']:.1f} s (waited {rec['index_wait_s']:.1f} s; "
                                           + ", ".join(f"{k} {v:.1f}" for k, v in rec.get("index_build_stages_s", {}).items())
                                           + _chunks_note(rec.get("index_build_chunks"))
                                           + (f"; {rec['cuda_alloc_retries_to_first_step']} allocator retries"
                                              if rec.get("cuda_alloc_retries_to_first_step") else "")
                                           + f"), hand-off {rec['prefill_handoff_s']:.1f} s (of it waiting for the device "
                                           f"{rec.get('prefill_handoff_wait_s', 0.0):.1f} s)" if rec.get("prefill_handoff_s") is not None
                                           and rec.get("index_build_s") else ""))
        tag = ("" if budget_label == args.gpu_memory_budget else " [no budget]") + (
            f" [{rec['variant']}]" if rec.get("variant") else "")
        print(f"{ctx:>8} {method:>9} {index or '':>5}{tag}: {msg}", file=sys.stderr, flush=True)
        return rec

    for ctx in contexts:
        for method, index in runs:
            rec = one(method, index, ctx, args.gpu_memory_budget)
            if (rec["oom"] and rec.get("oom_reason") != "host memory" and fraction is not None
                    and getattr(args, "unbudgeted_reference", False)):
                torch.cuda.set_per_process_memory_fraction(1.0)
                try:
                    one(method, index, ctx, None)
                finally:
                    torch.cuda.set_per_process_memory_fraction(fraction)
    ratios = ratio_lines(records)
    for line in ratios:
        print(line, file=sys.stderr)
    rows = []
    for r in records:
        b = r.get("breakdown_ms") or {}
        mode = r.get("decode_mode") or "hf"
        mode += " + graphs" if r.get("cuda_graphs") else ""
        rows.append([
            r["context"], r["method"] + (f"/{r['index']}" if r["index"] else "")
            + (f" {{{r['variant']}}}" if r.get("variant") else "")
            + ("" if r.get("gpu_memory_budget") == args.gpu_memory_budget else " (no budget)") + f" [{mode}]",
            (f"OOM ({r['oom_reason']})" if r.get("oom_reason") else "OOM") if r["oom"] else f"{r['decode_ms_per_token']:.1f}",
            "—" if r["oom"] else f"{r['prefill_s']:.1f}", "—" if r["oom"] else f"{r['index_build_s']:.1f}",
            f"{b['cpu_search']:.1f} / {b['cpu_attention']:.1f} / {b['rest_of_step']:.1f}" if b else "—",
            f"{r['peak_gpu_bytes'] / 2**30:.1f}" if r["peak_gpu_bytes"] else "—",
            f"{r['host_bytes'] / 2**30:.1f}",
        ])
    table = markdown_table(["context", "method [decode]", "decode ms/token", "prefill s", "index build s",
                            "search / CPU attn / rest ms", "peak GPU GiB", "host GiB"], rows)
    if ratios:
        table += "\n\n" + "\n".join(f"- {line}" for line in ratios)
    print(table)
    if args.json:
        write_json(args.json, records)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n")
    if args.plot:
        plot(records, args.plot, label)
    if args.update_docs:
        body = f"Model: {label}, {records[0]['dtype'] if records else ''}.  \nCommand: `{command_line()}`  \nMachine: {machine_line()}\n\n{table}\n"
        update_doc_section(default_docs_path(), f"Decode latency ({label}, {device})", body)
    return 0


def ratio_lines(records) -> list[str]:
    """Per context, each retrieval record against ``full`` (the budgeted run, else its unbudgeted re-run) and
    ``offload`` of the same run: decode-time ratios and the device KV memory fraction."""
    lines = []
    for ctx in sorted({r["context"] for r in records}):
        rs = [r for r in records if r["context"] == ctx and not r["oom"]]
        full = [r for r in rs if r["method"] == "full"]
        off = [r for r in rs if r["method"] == "offload"]
        for r in (r for r in rs if r["method"] == "retrieval"):
            parts = []
            if full:
                f = full[0]
                ref = "full" + ("" if f.get("gpu_memory_budget") == r.get("gpu_memory_budget") else " (no budget)")
                parts.append(f"{r['decode_ms_per_token'] / f['decode_ms_per_token']:.2f}x the time of {ref}")
                if f.get("kv_device_bytes") and r.get("kv_device_bytes") is not None:
                    parts.append(f"device KV {100 * r['kv_device_bytes'] / f['kv_device_bytes']:.2f}% of full's")
            if off:
                parts.append(f"{off[0]['decode_ms_per_token'] / r['decode_ms_per_token']:.1f}x faster than offload")
            if parts:
                name = f"retrieval/{r['index']}" + (f" {{{r['variant']}}}" if r.get("variant") else "")
                lines.append(f"{ctx}: {name} {r['decode_ms_per_token']:.1f} ms/token = " + ", ".join(parts))
    return lines


def plot(records, path, label) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    budgets = {r.get("gpu_memory_budget") for r in records}
    keys = sorted({(r["method"], r["index"], r.get("variant"), r.get("gpu_memory_budget")) for r in records}, key=str)
    for m, i, v, b in keys:
        pts = sorted((r["context"], r["decode_ms_per_token"]) for r in records
                     if (r["method"], r["index"], r.get("variant"), r.get("gpu_memory_budget")) == (m, i, v, b)
                     and not r["oom"])
        if pts:
            name = (m + (f"/{i}" if i else "") + (f" {{{v}}}" if v else "")
                    + (" (no budget)" if b is None and len(budgets) > 1 else ""))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", linestyle="--" if b is None else "-",
                    label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("decode ms / token (median)")
    ax.set_title(f"Decode latency: {label}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
