"""Layer-by-layer prefill: chunk attention exact vs one SDPA; logits and cache equal the normal forward."""

import time
from types import SimpleNamespace

import pytest
import torch
from transformers import DynamicCache

from retrieval_attention.attention.chunked import _reference_attention_lse, attention_lse, causal_prefix_attention
from retrieval_attention.cache import CPUStore
from retrieval_attention.config import RetrievalConfig
from retrieval_attention.generation import cache_kwarg
from retrieval_attention.integration import chunked_causal_attention, enable, make_cache
from retrieval_attention.prefill import layerwise_prefill, unsupported_reason

from tiny_models import VOCAB, tiny_model

LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3")
_GQA2 = SimpleNamespace(num_key_value_groups=2, is_causal=True)  # attention module stand-in: 4 query / 2 KV heads


def _full_causal(q, k, v, scaling, pad=None):
    """Reference: one SDPA over all keys with an explicit bottom-right causal (+ key padding) mask."""
    B, Hq, Tq, D = q.shape
    Tk = k.shape[2]
    G = Hq // k.shape[1]
    mask = torch.arange(Tk).view(1, -1) <= (torch.arange(Tq) + Tk - Tq).view(-1, 1)
    mask = mask.view(1, 1, Tq, Tk).expand(B, 1, Tq, Tk)
    if pad is not None:
        mask = mask & (torch.arange(Tk).view(1, 1, 1, -1) >= pad.view(-1, 1, 1, 1))
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1), attn_mask=mask, scale=scaling)
    return out.transpose(1, 2)


@pytest.mark.parametrize("Tq,Tk", [(7, 7), (7, 30), (16, 17), (1, 9)])
def test_chunk_attention_exact_vs_one_sdpa(Tq, Tk):
    g = torch.Generator().manual_seed(Tq * 100 + Tk)
    q = torch.randn(2, 4, Tq, 16, generator=g)
    k, v = torch.randn(2, 2, Tk, 16, generator=g), torch.randn(2, 2, Tk, 16, generator=g)
    ref = _full_causal(q, k, v, 0.25)
    out = chunked_causal_attention(_GQA2, q, k, v, None, 0.25, 4)
    assert out.shape == (2, Tq, 4, 16)
    assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()
    # the fused-kernel and the reference (fallback) paths agree, also for a causal square
    for causal, kk, vv in ((False, k, v), (True, k[:, :, -Tq:], v[:, :, -Tq:])):
        o1, l1 = attention_lse(q, kk, vv, 0.25, causal)
        o2, l2 = _reference_attention_lse(q, kk, vv, 0.25, causal)
        assert torch.allclose(o1.float(), o2, atol=1e-5) and torch.allclose(l1, l2, atol=1e-5)


def test_chunk_attention_key_padding_mask():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 4, 6, 8, generator=g)
    k, v = torch.randn(3, 2, 20, 8, generator=g), torch.randn(3, 2, 20, 8, generator=g)
    pad = torch.tensor([0, 5, 17])  # the last sequence's real tokens start inside the query chunk
    key_mask = (torch.arange(20).view(1, -1) >= pad.view(-1, 1)).view(3, 1, 1, 20)
    out = chunked_causal_attention(_GQA2, q, k, v, key_mask, 0.3, 4)
    ref = _full_causal(q, k, v, 0.3, pad)
    assert torch.allclose(out[:2], ref[:2], atol=1e-5)
    assert torch.allclose(out[2, 3:], ref[2, 3:], atol=1e-5)  # queries at padding positions are not compared
    assert torch.equal(out[2, :3], torch.zeros_like(out[2, :3]))


def test_causal_prefix_attention_refuses_fewer_keys():
    with pytest.raises(ValueError, match="at least as many keys"):
        causal_prefix_attention(torch.zeros(1, 2, 5, 4), torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4), 1.0)


def _ids(T, seed=0, B=1):
    return torch.randint(2, VOCAB - 1, (B, T), generator=torch.Generator().manual_seed(seed))


def _builds_in_background(monkeypatch) -> None:
    """CUDA's path, forced on the CPU: every ``CPUStore.build`` runs on the background build workers."""
    orig = CPUStore.build
    monkeypatch.setattr(CPUStore, "build",
                        lambda self, k, v, tq, background=False, group=None, hold=False:
                        orig(self, k, v, tq, True, group, hold))


def _failing_flat_builds(monkeypatch, message: str) -> list:
    """Every ``FlatIndex.build`` raises ``ValueError(message)``; returns the list that gets an entry per call."""
    from retrieval_attention.index.flat import FlatIndex

    calls = []

    def failing_build(self, keys, queries=None):
        calls.append(1)
        raise ValueError(message)

    monkeypatch.setattr(FlatIndex, "build", failing_build)
    return calls


@pytest.mark.parametrize("arch", LLAMA_FAMILY)
@pytest.mark.parametrize("chunk", [40, 512])  # 40 does not divide 150; 512 > T
def test_layerwise_full_cache_equals_forward(arch, chunk):
    model = tiny_model(arch, seed=11)
    ids = _ids(150)
    with torch.no_grad():
        ref_cache = DynamicCache(config=model.config)
        ref = model(input_ids=ids, **{cache_kwarg(model): ref_cache}).logits[:, -1]
        cache = DynamicCache(config=model.config)
        logits = layerwise_prefill(model, ids, cache, chunk=chunk)
    assert logits.shape == (1, VOCAB) and logits.dtype == torch.float32
    assert torch.allclose(logits, ref, atol=1e-4), (logits - ref).abs().max()
    assert cache.get_seq_length() == 150
    for a, b in zip(ref_cache.layers, cache.layers):
        assert torch.allclose(a.keys, b.keys, atol=1e-5) and torch.allclose(a.values, b.values, atol=1e-5)
    assert model.config._attn_implementation == "sdpa"  # restored


def test_layerwise_offloading_dynamic_cache():
    """DynamicCache(offloading=True): each layer is offloaded after its last chunk, the flag restored
    (hidden states in host memory, progress bar on)."""
    model = tiny_model("llama", seed=12)
    ids = _ids(90, seed=1)
    with torch.no_grad():
        ref_cache = DynamicCache(config=model.config)
        ref = model(input_ids=ids, **{cache_kwarg(model): ref_cache}).logits[:, -1]
        cache = DynamicCache(config=model.config, offloading=True)
        logits = layerwise_prefill(model, ids, cache, chunk=32, offload_hidden=True, progress=True)
    assert cache.offloading
    assert torch.allclose(logits, ref, atol=1e-4)
    for a, b in zip(ref_cache.layers, cache.layers):
        assert torch.allclose(a.keys, b.keys, atol=1e-5)


@pytest.mark.parametrize("arch", LLAMA_FAMILY)
def test_layerwise_retrieval_cache_equals_forward(arch):
    """flat index + top_k covering the store: same logits, same static/CPU split, same decode steps."""
    model = tiny_model(arch, seed=13)
    ids = _ids(150, seed=2)
    cfg = RetrievalConfig(index="flat", n_sink=8, window=32, top_k=4096, dense_layers=(0,))
    kw = cache_kwarg(model)
    with torch.no_grad(), enable(model):
        ref_cache = make_cache(model, cfg)
        ref = model(input_ids=ids, **{kw: ref_cache}).logits[:, -1]
        cache = make_cache(model, cfg)
        logits = layerwise_prefill(model, ids, cache, chunk=37)
        assert torch.allclose(logits, ref, atol=1e-4)
        for a, b in zip(ref_cache.retrieval_layers, cache.retrieval_layers):
            assert b.offloaded and not b.defer_offload and b.total == a.total == 150 and b.win_start == a.win_start
            assert torch.allclose(a.static_k, b.static_k, atol=1e-5) and torch.equal(a.static_valid, b.static_valid)
            assert b.stores[0].n == a.stores[0].n == 150 - 8 - 32
            assert torch.allclose(a.stores[0].keys[:, : a.stores[0].n], b.stores[0].keys[:, : b.stores[0].n], atol=1e-5)
        tok = ref.argmax(-1, keepdim=True)
        for _ in range(8):
            a = model(input_ids=tok, **{kw: ref_cache}).logits[:, -1]
            b = model(input_ids=tok, **{kw: cache}).logits[:, -1]
            assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
            tok = a.argmax(-1, keepdim=True)


@pytest.mark.parametrize("max_train_queries", [23, None])
def test_layerwise_collects_the_same_training_queries(monkeypatch, build_queries, max_train_queries):
    """The index is trained on the same evenly subsampled prompt queries as the single-forward prefill, with a
    fixed count and with the automatic one (a rule of the prompt length, here made small: n // 4 = 32)."""
    import retrieval_attention.index.roar as roar_mod

    monkeypatch.setattr(roar_mod, "auto_train_queries", lambda n: n // 4)
    seen = build_queries
    model = tiny_model("llama", seed=14)
    ids = _ids(130, seed=3)
    cfg = RetrievalConfig(index="flat", n_sink=8, window=16, top_k=4096, dense_layers=(),
                          max_train_queries=max_train_queries)
    with torch.no_grad(), enable(model):
        model(input_ids=ids, **{cache_kwarg(model): make_cache(model, cfg)})
        n = len(seen)
        layerwise_prefill(model, ids, make_cache(model, cfg), chunk=29)
    assert n == 3 and len(seen) == 6
    m = 23 if max_train_queries is not None else 130 // 4
    for a, b in zip(seen[:3], seen[3:]):
        assert a.shape == b.shape == (4, m, 16)
        assert torch.allclose(a, b, atol=1e-5)


def test_layerwise_streaming_and_short_prompt():
    model = tiny_model("qwen2", seed=15)
    kw = cache_kwarg(model)
    with torch.no_grad(), enable(model):
        cfg = RetrievalConfig(method="streaming", index="flat", n_sink=4, window=16, dense_layers=())
        cache = make_cache(model, cfg)
        ids = _ids(60, seed=4)
        ref = model(input_ids=ids, **{kw: make_cache(model, cfg)}).logits[:, -1]
        assert torch.allclose(layerwise_prefill(model, ids, cache, chunk=16), ref, atol=1e-4)
        assert all(l.offloaded and l.stores[0].n == 0 for l in cache.retrieval_layers)
        short = make_cache(model, RetrievalConfig(index="flat", n_sink=4, window=16, dense_layers=()))
        layerwise_prefill(model, _ids(15, seed=5), short, chunk=4)  # shorter than n_sink + window: stays dense
        assert not any(l.offloaded for l in short.retrieval_layers)
        assert short.get_seq_length() == 15 and short.retrieval_layers[0].keys.shape[2] == 15


@pytest.mark.parametrize("handoff", ["sync", "async"])
def test_layerwise_left_padded_batch(handoff):
    """A left-padded batch of two: the layer-by-layer prefill equals the single forward (both hand-off modes, in
    both prefill paths), and so do the decode steps after it."""
    model = tiny_model("llama", seed=16)
    kw = cache_kwarg(model)
    g = torch.Generator().manual_seed(6)
    T = 120
    ids = torch.zeros((2, T), dtype=torch.long)
    mask = torch.zeros((2, T), dtype=torch.long)
    for i, n in enumerate((120, 75)):
        ids[i, T - n:] = torch.randint(2, VOCAB - 1, (n,), generator=g)
        mask[i, T - n:] = 1
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    cfg = RetrievalConfig(index="flat", n_sink=8, window=16, top_k=4096, dense_layers=(0,), handoff=handoff)
    with torch.no_grad(), enable(model):
        ref_cache = make_cache(model, cfg)
        ref = model(input_ids=ids, attention_mask=mask, position_ids=pos, **{kw: ref_cache}).logits[:, -1]
        cache = make_cache(model, cfg)
        logits = layerwise_prefill(model, ids, cache, chunk=50, attention_mask=mask)
        assert torch.allclose(logits, ref, atol=1e-4)
        assert [s.n for s in cache.retrieval_layers[0].stores] == [s.n for s in ref_cache.retrieval_layers[0].stores]
        tok, p = ref.argmax(-1, keepdim=True), pos[:, -1:]
        for _ in range(5):
            mask, p = torch.cat([mask, torch.ones((2, 1), dtype=torch.long)], 1), p + 1
            a = model(input_ids=tok, attention_mask=mask, position_ids=p, **{kw: ref_cache}).logits[:, -1]
            b = model(input_ids=tok, attention_mask=mask, position_ids=p, **{kw: cache}).logits[:, -1]
            assert torch.allclose(a, b, atol=1e-4)
            tok = a.argmax(-1, keepdim=True)
    for c in (ref_cache, cache):  # the asynchronous mode did land on its thread, in both prefill paths
        assert all((l.stats.handoff_land_s > 0) == (handoff == "async") for l in c.retrieval_layers)


def test_layerwise_errors():
    gemma = tiny_model("gemma3")
    assert "gemma3" in unsupported_reason(gemma)
    with pytest.raises(NotImplementedError, match="gemma3"):
        layerwise_prefill(gemma, _ids(10), DynamicCache(config=gemma.config))
    sliding = tiny_model("mistral")
    sliding.config.sliding_window = 24  # a Mistral-7B-v0.1-style sliding window: not plain causal attention
    assert "sliding" in unsupported_reason(sliding)
    model = tiny_model("llama")
    right = torch.ones((1, 10), dtype=torch.long)
    right[0, -2:] = 0
    with pytest.raises(ValueError, match="left padding"):
        layerwise_prefill(model, _ids(10), DynamicCache(config=model.config), attention_mask=right)
    cache = DynamicCache(config=model.config)
    layerwise_prefill(model, _ids(10), cache, chunk=4)
    with pytest.raises(ValueError, match="empty cache"):
        layerwise_prefill(model, _ids(10), cache)
    with pytest.raises(ValueError, match="chunk"):
        layerwise_prefill(model, _ids(10), DynamicCache(config=model.config), chunk=0)


def test_hidden_states_offload_decided_by_gpu_budget(monkeypatch):
    """``offload_hidden=None``: hidden states go to host memory when they exceed a quarter of the device memory
    still allocatable under the process's budget (simulated CUDA numbers: a 24 GiB budget on a 140 GiB card with
    16 GiB of weights allocated); never on the CPU."""
    from retrieval_attention import prefill as P

    G = 1 << 30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev=None: (120 * G, 140 * G))
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda dev=None: 24 / 140, raising=False)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda dev=None: 17 * G)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda dev=None: 16 * G)
    cuda = torch.device("cuda", 0)
    assert abs(P.cuda_headroom(cuda) - 8 * G) < G // 1000  # 24 - 17 reserved + 1 cached free
    hidden_8b = lambda tokens: tokens * 4096 * 2  # noqa: E731 - bfloat16 [T, 4096]
    assert not P.offload_hidden_auto(hidden_8b(128 * 1024), cuda)  # 1 GiB of 8
    assert P.offload_hidden_auto(hidden_8b(512 * 1024), cuda)  # 4 GiB of 8
    assert not P.offload_hidden_auto(hidden_8b(512 * 1024), torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda dev=None: 1.0, raising=False)
    assert not P.offload_hidden_auto(hidden_8b(512 * 1024), cuda)  # no budget: 104 GiB free


@pytest.mark.parametrize("schedule", ["overlap", "after_prefill"])
def test_wait_for_builds_waits_for_background_builds(monkeypatch, schedule):
    """``RetrievalCache.wait_for_builds``: every store's background build (CUDA's path, forced here on the CPU and
    queued behind a job that holds the build worker) is finished when it returns, with a progress bar. With
    ``build_schedule="after_prefill"`` every build is still held when the prefill's last layer is done (none
    started beside the prefill) and the prefill releases them."""
    import threading

    from retrieval_attention import cache as C

    _builds_in_background(monkeypatch)
    release = threading.Event()
    cfg = RetrievalConfig(index="flat", n_sink=8, window=16, dense_layers=(), build_schedule=schedule)
    ex = C._build_executor(cfg.resolved_build_workers(), cfg.build_priority)
    blockers = [ex.submit(release.wait, 10) for _ in range(ex.max_workers)]  # every worker held
    model = tiny_model("llama", seed=15)
    cache = make_cache(model, cfg)
    held_at_release = []
    real_start = cache.start_builds
    monkeypatch.setattr(cache, "start_builds", lambda: held_at_release.append(cache.builds.held) or real_start())
    with torch.no_grad(), enable(model):
        layerwise_prefill(model, _ids(90, seed=4), cache, chunk=32)
    assert held_at_release == [len(cache.retrieval_layers) if schedule == "after_prefill" else 0]
    assert cache.builds.held == 0
    stores = [s for l in cache.retrieval_layers for s in l.stores]
    assert stores and all(s._pending is not None and not s._pending.done() for s in stores)
    release.set()
    assert cache.wait_for_builds(progress=True) >= 0
    assert all(b.done() for b in blockers) and all(s._pending is None for s in stores)
    assert all(s.index is not None and s.index.n_keys == 90 - 8 - 16 for s in stores)


@pytest.mark.parametrize("workers", [1, 2])
def test_build_workers_run_builds_at_once(monkeypatch, workers):
    """``RetrievalConfig.build_workers``: with 2 the first two layers' background builds run at the same time (both
    reach a two-party barrier inside ``build``); with 1 never more than one build runs at a time. The indexes are
    the same either way."""
    import threading

    from retrieval_attention.index.flat import FlatIndex
    from retrieval_attention.threads import parallel_kernels_concurrent

    if workers > 1 and not parallel_kernels_concurrent():
        pytest.skip("numba's threading layer runs one parallel kernel at a time")
    _builds_in_background(monkeypatch)
    barrier, lock = threading.Barrier(2, timeout=30), threading.Lock()
    running, seen = [0], []
    flat_build = FlatIndex.build

    def build(self, keys, queries=None):
        with lock:
            running[0] += 1
            seen.append(running[0])
            first_two = len(seen) <= 2
        try:
            if workers == 2 and first_two:
                barrier.wait()  # breaks (BrokenBarrierError) unless both builds run at once
            return flat_build(self, keys, queries)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(FlatIndex, "build", build)
    model = tiny_model("llama", seed=15)
    cache = make_cache(model, RetrievalConfig(index="flat", n_sink=8, window=16, dense_layers=(),
                                              build_workers=workers))
    with torch.no_grad(), enable(model):
        layerwise_prefill(model, _ids(90, seed=4), cache, chunk=32)
    cache.wait_for_builds()
    stores = [s for l in cache.retrieval_layers for s in l.stores]
    assert len(stores) >= 2 and all(s.index.n_keys == 90 - 8 - 16 for s in stores)
    assert max(seen) == workers


@pytest.mark.parametrize("index", ["roar", "flat"])
def test_store_numpy_views_follow_growth(index):
    """``CPUStore`` keeps its numpy views of the host arrays (and roar's whole key buffer) between calls: after the
    store grows past its capacity token by token they are views of the new arrays, and retrieval + attention equal
    the results with fresh views (and, for roar, with ``stored_keys`` instead of the key buffer)."""
    import numpy as np

    from retrieval_attention.index.bf16 import tensor_as_numpy

    g = torch.Generator().manual_seed(41)
    Hkv, group, d, n0, extra = 2, 2, 16, 300, 1500
    keys = torch.randn(Hkv, n0 + extra, d, generator=g).bfloat16()
    vals = torch.randn(Hkv, n0 + extra, d, generator=g).bfloat16()
    tq = torch.randn(Hkv * group, 64, d, generator=g)
    q = torch.randn(Hkv * group, 1, d, generator=g).numpy()
    cfg = RetrievalConfig(index=index, exact_below=0, residual_samples=16)
    st = CPUStore(cfg)
    st.build(keys[:, :n0], vals[:, :n0], tq)
    st.attend(q, group, 0.25, 8)  # views taken
    cap0 = st.values.shape[1]
    for j in range(n0, n0 + extra):  # token by token, as decoding appends: past the first capacity
        st.add(keys[:, j: j + 1], vals[:, j: j + 1], Hkv * group)
    assert st.values.shape[1] > cap0 and st.n == n0 + extra
    view = st._numpy_view("values")
    assert np.shares_memory(view, tensor_as_numpy(st.values)) and view.shape == tuple(st.values.shape)
    np.testing.assert_array_equal(view[:, : st.n], tensor_as_numpy(vals))
    ka = st.key_array()
    assert ka.shape[1] >= st.n
    np.testing.assert_array_equal(ka[:, : st.n], tensor_as_numpy(keys))
    for residual_from in (None, st.n - 4):
        got = st.attend(q, group, 0.25, 8, residual_from=residual_from, return_ids=True)
        st._numpy_views.clear()
        for a, b in zip(got, st.attend(q, group, 0.25, 8, residual_from=residual_from, return_ids=True)):
            np.testing.assert_array_equal(a, b)  # fresh views: the same arrays, the same results
        if index == "roar":  # the exact-size view of the keys, as before the buffer: the same retrieval; the
            st.key_array = lambda: st.index.stored_keys()  # kernel compiled for a strided array may round differently
            want = st.attend(q, group, 0.25, 8, residual_from=residual_from, return_ids=True)
            del st.key_array
            np.testing.assert_array_equal(got[3], want[3])
            np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(got[1], want[1], rtol=1e-6, atol=1e-6)
    if index == "flat":  # the store owns its keys: dropping them drops the kept view as well (no hidden copy alive)
        st.add(keys[:, :1], vals[:, :1], Hkv * group)
        assert "_keys" in st._numpy_views
        st.keys = None
        assert "_keys" not in st._numpy_views


def test_builds_start_on_release_in_order_and_when_waited_for():
    """:class:`BuildGroup`: nothing runs before :meth:`release`; releasing starts every held build in order
    (once); waiting for one build releases its whole group."""
    from concurrent.futures import ThreadPoolExecutor

    from retrieval_attention.cache import BuildGroup

    ran = []
    with ThreadPoolExecutor(1) as pool:
        group = BuildGroup()
        a = group.submit(pool.submit, lambda: ran.append("a") or "A", hold=True)
        b = group.submit(pool.submit, lambda: ran.append("b") or "B", hold=True)
        assert group.held == 2 and not a.done() and ran == []
        assert b.result() == "B" and a.result() == "A"  # waiting for b released a too, first
        assert ran == ["a", "b"] and group.held == 0 and a.done()
        group.release()  # a second release starts nothing again
        assert ran == ["a", "b"]


def test_store_build_held_until_released_equals_a_direct_build():
    """A background :meth:`CPUStore.build` with ``hold`` leaves the index unbuilt until its group is released
    (here: by the first wait), then gives the same index as a synchronous build."""
    from retrieval_attention.cache import BuildGroup

    g = torch.Generator().manual_seed(3)
    k, v = (torch.randn(2, 3000, 16, generator=g) for _ in range(2))
    q = torch.randn(4, 600, 16, generator=g)
    cfg = RetrievalConfig(index="roar", index_params={"M": 8}, exact_below=0)
    direct = CPUStore(cfg)
    direct.build(k, v, q)
    group, held = BuildGroup(), CPUStore(cfg)
    held.build(k, v, q, background=True, group=group, hold=True)
    assert group.held == 1 and held._index is None
    assert held.wait() > 0 and group.held == 0
    assert (held.index._adj == direct.index._adj).all()


def test_layerwise_prefill_releases_the_caches_builds():
    """build_schedule="after_prefill": the layer-by-layer prefill starts the builds it held back once its last
    layer is done (on the CPU builds run inline, so a held stand-in build shows the release); bad values refused."""
    model = tiny_model("llama", seed=16)
    cfg = RetrievalConfig(index="flat", n_sink=8, window=32, dense_layers=(0,), build_schedule="after_prefill")
    ran = []
    with torch.no_grad(), enable(model):
        cache = make_cache(model, cfg)
        assert all(l.builds is cache.builds for l in cache.retrieval_layers)
        cache.builds.submit(lambda job: job() or SimpleNamespace(add_done_callback=lambda fn: None),
                            lambda: ran.append(1), hold=True)
        assert ran == []
        layerwise_prefill(model, _ids(100, seed=3), cache, chunk=32)
    assert ran == [1] and cache.builds.held == 0
    with pytest.raises(ValueError, match="build_schedule must be one of overlap, after_prefill"):
        RetrievalConfig(build_schedule="later")


def test_a_failed_background_build_stops_the_prefill_at_its_next_layer(monkeypatch):
    """A background build that raises (session 20: every GPU build failed and the 512K prefill went on for minutes,
    until the host ran out of memory) stops the layer-by-layer prefill at the next layer's offload with an error
    that names it; the builds it had started are not left half-run."""
    _builds_in_background(monkeypatch)
    calls = _failing_flat_builds(monkeypatch, "Expected a torch.device with a specified index")
    model = tiny_model("llama", seed=17)
    cfg = RetrievalConfig(index="flat", n_sink=8, window=16, dense_layers=(), build_workers=1)
    cache = make_cache(model, cfg)
    offloaded = []
    for layer in cache.retrieval_layers:
        layer.on_offloaded = lambda l: (offloaded.append(l.layer_idx), l.stores[0]._pending.exception())
    with torch.no_grad(), enable(model), pytest.raises(RuntimeError, match="background index build failed .*"
                                                                           "ValueError: Expected a torch.device"):
        layerwise_prefill(model, _ids(90, seed=4), cache, chunk=32)
    assert offloaded == [0] and len(calls) == 1 < len(cache.retrieval_layers)


def _prefill_and_decode(model, cfg, ids, steps=6, layerwise=True):
    """Prefill of ``ids`` into a fresh cache of ``cfg`` (layer by layer, or ``layerwise=False``: the model's single
    forward, as ``generate()`` runs it), then greedy decode steps: (cache, logits of the prefill and of each step)."""
    kw = cache_kwarg(model)
    with torch.no_grad(), enable(model):
        cache = make_cache(model, cfg)
        if layerwise:
            out = [layerwise_prefill(model, ids, cache, chunk=29)]
        else:
            out = [model(input_ids=ids, **{kw: cache}).logits[:, -1]]
        for _ in range(steps):
            out.append(model(input_ids=out[-1].argmax(-1, keepdim=True), **{kw: cache}).logits[:, -1])
    return cache, out


@pytest.mark.parametrize("schedule", ["overlap", "after_prefill"])
def test_async_handoff_equals_the_synchronous_one(monkeypatch, schedule):
    """``handoff="async"``: each layer's stores are landed (copied to host memory and built) on the hand-off thread,
    not the prefill's, and are complete when the prefill returns; the static split, the stores' keys and values and
    every decode step equal the synchronous hand-off's."""
    import threading

    threads = []
    orig = CPUStore.build

    def build(self, keys, values, train_queries, background=False, group=None, hold=False):
        threads.append(threading.current_thread().name)
        return orig(self, keys, values, train_queries, background, group, hold)

    monkeypatch.setattr(CPUStore, "build", build)
    model = tiny_model("llama", seed=18)
    ids = _ids(150, seed=5)
    base = dict(index="flat", n_sink=8, window=32, top_k=4096, dense_layers=(0,), build_schedule=schedule)
    ref_cache, ref = _prefill_and_decode(model, RetrievalConfig(**base, handoff="sync"), ids)
    assert threads and all(t == threading.current_thread().name for t in threads)
    threads.clear()
    cache, got = _prefill_and_decode(model, RetrievalConfig(**base, handoff="async"), ids)
    assert threads and all(t.startswith("ra-handoff") for t in threads)
    assert cache.handoff.pending == 0 and cache.builds.held == 0
    for a, b in zip(ref, got):
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    for a, b in zip(ref_cache.retrieval_layers, cache.retrieval_layers):
        assert b.stats.handoff_wait_s == 0 and b.stats.handoff_land_s > 0 and a.stats.handoff_land_s == 0
        sa, sb = a.stores[0], b.stores[0]
        assert sa.n == sb.n > 0
        assert torch.equal(sa.keys[:, : sa.n], sb.keys[:, : sb.n]) and torch.equal(sa.values[:, : sa.n], sb.values[:, : sb.n])
        assert torch.equal(a.static_k, b.static_k) and torch.equal(a.static_valid, b.static_valid)
    with pytest.raises(ValueError, match="handoff must be one of auto, sync, async"):
        RetrievalConfig(handoff="later")


def test_handoff_auto_is_async_on_cuda_devices_only():
    """``handoff="auto"`` (the default) resolves to ``async`` for a CUDA device (measured faster there, session 22)
    and to ``sync`` elsewhere (nothing to copy); an explicit choice stays as given on every device."""
    auto = RetrievalConfig()
    assert auto.handoff == "auto"
    assert auto.resolved_handoff(torch.device("cuda", 0)) == auto.resolved_handoff("cuda") == "async"
    assert auto.resolved_handoff(torch.device("cpu")) == auto.resolved_handoff("meta") == "sync"
    for mode in ("sync", "async"):
        cfg = RetrievalConfig(handoff=mode)
        assert cfg.resolved_handoff("cuda") == cfg.resolved_handoff("cpu") == mode


def test_a_layers_stores_wait_for_its_landing_and_a_failed_landing_stops_the_prefill(monkeypatch):
    """A layer's ``stores`` blocks until its asynchronous hand-off has landed; a landing that raises stops the
    layer-by-layer prefill at the next layer's offload with an error that names it, and its layer's ``stores``
    raises it too."""
    calls = _failing_flat_builds(monkeypatch, "host memory is exhausted")
    model = tiny_model("llama", seed=19)
    cache = make_cache(model, RetrievalConfig(index="flat", n_sink=8, window=16, dense_layers=(), handoff="async"))
    layers = cache.retrieval_layers
    with torch.no_grad(), enable(model), pytest.raises(RuntimeError, match="prefill hand-off to the host failed "
                                                                           ".*ValueError: host memory is exhausted"):
        layerwise_prefill(model, _ids(90, seed=4), cache, chunk=32)
    assert 1 <= len(calls) < len(layers)
    with pytest.raises(ValueError, match="host memory is exhausted"):
        layers[0].stores


def test_handoff_holds_at_most_max_landings_in_flight():
    """``HandOff.wait_for_room`` waits for the oldest unfinished landing while ``MAX_LANDINGS_IN_FLIGHT`` are queued
    (the prefill may not run ahead of the device by more, each landing holding a layer in pinned memory); ``drain``
    waits for all and raises the first error after the others are done."""
    import threading

    from retrieval_attention.cache import MAX_LANDINGS_IN_FLIGHT, HandOff

    gates = [threading.Event() for _ in range(MAX_LANDINGS_IN_FLIGHT + 1)]
    done = []
    h = HandOff()
    for i in range(MAX_LANDINGS_IN_FLIGHT):
        h.wait_for_room()
        h.submit(lambda i=i: (gates[i].wait(10), done.append(i)))
    submitted = threading.Event()
    extra = threading.Thread(target=lambda: (h.wait_for_room(), h.submit(lambda: done.append("last")),
                                             submitted.set()))
    extra.start()
    assert not submitted.wait(0.3) and h.pending == MAX_LANDINGS_IN_FLIGHT  # held back
    gates[0].set()
    assert submitted.wait(10) and done[0] == 0
    for g in gates:
        g.set()
    extra.join(10)
    h.drain()
    assert done == list(range(MAX_LANDINGS_IN_FLIGHT)) + ["last"] and h.pending == 0

    def fail():
        raise OSError("no memory")

    h.submit(fail)
    h.submit(lambda: done.append("after"))
    with pytest.raises(RuntimeError, match="prefill hand-off to the host failed .*OSError: no memory"):
        h.drain()
    assert done[-1] == "after" and h.pending == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (pinned memory, events)")
def test_async_handoff_on_cuda_equals_the_synchronous_one():
    """On CUDA: the non-blocking pinned copies land the same stores as the synchronous hand-off, and the stores
    hold pageable copies (the pinned staging goes back to torch's cache)."""
    model = tiny_model("llama", seed=18).cuda()
    ids = _ids(150, seed=5).cuda()
    base = dict(index="flat", n_sink=8, window=32, top_k=4096, dense_layers=(0,))
    ref_cache, ref = _prefill_and_decode(model, RetrievalConfig(**base, handoff="sync"), ids)
    cache, got = _prefill_and_decode(model, RetrievalConfig(**base), ids)  # "auto": async on CUDA
    assert all(layer.stats.handoff_land_s > 0 for layer in cache.retrieval_layers)
    for a, b in zip(ref, got):
        assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
    for a, b in zip(ref_cache.retrieval_layers, cache.retrieval_layers):
        sa, sb = a.stores[0], b.stores[0]
        assert not sb.values.is_pinned() and not sb.keys.is_pinned()
        assert torch.equal(sa.keys[:, : sa.n], sb.keys[:, : sb.n]) and torch.equal(sa.values[:, : sa.n], sb.values[:, : sb.n])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (pinned memory, events)")
def test_default_handoff_in_the_single_forward_on_cuda_equals_the_synchronous_one():
    """On CUDA the default (``auto`` = async) also runs in the single-forward prefill (what ``generate()`` does):
    every layer lands on the hand-off thread, and the logits of the prefill and of the decode steps, and the
    stores, equal the synchronous hand-off's."""
    model = tiny_model("llama", seed=21).cuda()
    ids = _ids(150, seed=6).cuda()
    base = dict(index="flat", n_sink=8, window=32, top_k=4096, dense_layers=(0,))
    ref_cache, ref = _prefill_and_decode(model, RetrievalConfig(**base, handoff="sync"), ids, 4, layerwise=False)
    cache, got = _prefill_and_decode(model, RetrievalConfig(**base), ids, 4, layerwise=False)
    for a, b in zip(ref, got):
        assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
    for a, b in zip(ref_cache.retrieval_layers, cache.retrieval_layers):
        assert b.stats.handoff_land_s > 0 == a.stats.handoff_land_s
        sa, sb = a.stores[0], b.stores[0]
        assert torch.equal(sa.keys[:, : sa.n], sb.keys[:, : sb.n]) and torch.equal(sa.values[:, : sa.n], sb.values[:, : sb.n])


def test_async_handoff_lands_only_after_the_copies_are_done(monkeypatch):
    """The landing waits for the event recorded after the layer's copies (CUDA's; a stand-in here that the test
    completes): until then no store has its keys and a layer's ``stores`` blocks; the prefill itself does not wait
    beyond ``MAX_LANDINGS_IN_FLIGHT`` layers; once the events complete every store lands."""
    import threading

    from retrieval_attention import cache as C

    class Event:  # the stand-in of a CUDA event: synchronize() blocks until the test sets it
        def __init__(self):
            self.done = threading.Event()

        def synchronize(self):
            assert self.done.wait(30)

    events = []
    monkeypatch.setattr(C, "_copies_done_event", lambda dev: events.append(Event()) or events[-1])
    model = tiny_model("llama", seed=20)
    cache = make_cache(model, RetrievalConfig(index="flat", n_sink=8, window=16, top_k=4096, dense_layers=(),
                                              handoff="async"))
    layers = cache.retrieval_layers
    assert len(layers) > C.MAX_LANDINGS_IN_FLIGHT
    with torch.no_grad(), enable(model):
        layer0 = layers[0]
        done = threading.Event()
        errors = []

        def prefill():
            try:
                layerwise_prefill(model, _ids(90, seed=4), cache, chunk=32)
            except BaseException as e:  # noqa: BLE001
                errors.append(e)
            done.set()

        t = threading.Thread(target=prefill)
        t.start()
        deadline = time.monotonic() + 30
        while len(events) < C.MAX_LANDINGS_IN_FLIGHT and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)
        # every queued layer waits for its copies: nothing landed, and the prefill is held at the in-flight bound
        assert len(events) == C.MAX_LANDINGS_IN_FLIGHT and not done.is_set()
        assert all(s.n == 0 and s.values is None for l in layers[: len(events)] for s in l._stores)
        reader = threading.Thread(target=lambda: layer0.stores)
        reader.start()
        reader.join(0.2)
        assert reader.is_alive()  # the layer's stores wait for its landing
        while not done.is_set():  # complete the events as they come, as the device would
            for e in list(events):
                e.done.set()
            time.sleep(0.01)
        t.join(30)
        reader.join(30)
    assert not errors and len(events) == len(layers)
    assert all(s.n == 90 - 8 - 16 and s.index.n_keys == s.n for l in layers for s in l.stores)
