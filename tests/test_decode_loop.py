"""LeanDecoder: the same logits as the transformers path step by step (ring-buffer window, evictions to
the CPU store, LSE merge), and a cache the transformers path continues correctly after close()."""

import warnings

import pytest
import torch
from transformers import DynamicCache

from retrieval_attention.config import RetrievalConfig
from retrieval_attention.decode_loop import LeanDecoder, unsupported_reason
from retrieval_attention.generation import cache_kwarg
from retrieval_attention.integration import enable, make_cache
from retrieval_attention.prefill import layerwise_prefill

from tiny_models import VOCAB, tiny_model

N_STEPS = 44  # > window: every window slot is overwritten and evicted at least twice
ATOL = 1e-4


def _prefill(model, cfg, ids, mask=None, pos=None, layerwise=False):
    cache = make_cache(model, cfg)
    if layerwise:
        return cache, layerwise_prefill(model, ids, cache, chunk=32, attention_mask=mask)
    return cache, model(input_ids=ids, attention_mask=mask, position_ids=pos, **{cache_kwarg(model): cache}).logits[:, -1]


def _hf(model, cache, tok, mask=None, pos=None):
    return model(input_ids=tok, attention_mask=mask, position_ids=pos, **{cache_kwarg(model): cache}).logits[:, -1]


def _compare(model, cfg, ids, n_steps=N_STEPS, n_after=4, layerwise=False, cuda_graphs=False, atol=ATOL):
    """Cache A: transformers path only. Cache B: LeanDecoder for n_steps, then the transformers path."""
    with torch.no_grad(), enable(model):
        ref_cache, logits = _prefill(model, cfg, ids)
        cache, _ = _prefill(model, cfg, ids, layerwise=layerwise)
        tok = logits.argmax(-1, keepdim=True)
        assert LeanDecoder.supports(model, cache)
        with LeanDecoder(model, cache, cuda_graphs=cuda_graphs) as dec:
            for step in range(n_steps):
                a, b = _hf(model, ref_cache, tok), dec.step(tok)
                assert b.shape == a.shape and b.dtype == torch.float32
                assert torch.allclose(a, b, atol=atol), (step, (a - b).abs().max())
                tok = a.argmax(-1, keepdim=True)
        assert dec.closed and dec.head == 0
        for ra, rb in zip(ref_cache.retrieval_layers, cache.retrieval_layers):
            assert (ra.total, ra.win_start) == (rb.total, rb.win_start)
            assert torch.allclose(ra.static_k, rb.static_k, atol=1e-5) and torch.equal(ra.static_valid, rb.static_valid)
            assert [s.n for s in ra.stores] == [s.n for s in rb.stores]
        for _ in range(n_after):  # the transformers path continues after close()
            a, b = _hf(model, ref_cache, tok), _hf(model, cache, tok)
            assert torch.allclose(a, b, atol=ATOL)
            tok = a.argmax(-1, keepdim=True)
    return ref_cache, cache


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_lean_equals_transformers_path_exact_retrieval(arch):
    model = tiny_model(arch, seed=21)
    ids = torch.randint(2, VOCAB - 1, (1, 100), generator=torch.Generator().manual_seed(1))
    cfg = RetrievalConfig(index="flat", n_sink=4, window=16, top_k=4096, dense_layers=())
    _, cache = _compare(model, cfg, ids)
    layer = cache.retrieval_layers[0]
    assert layer.stores[0].n == 100 - 4 - 16 + N_STEPS + 4
    assert layer.stats.n_searches > 0 and layer.stats.search_s > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_lean_on_cuda_equals_transformers_path(cuda_graphs):
    """On a GPU (pinned host buffers, event-ordered copies, optionally CUDA graphs): the same logits as the
    transformers path, with the window's evictions going to the CPU store."""
    model = tiny_model("llama", seed=21).cuda()
    ids = torch.randint(2, VOCAB - 1, (1, 100), generator=torch.Generator().manual_seed(1)).cuda()
    cfg = RetrievalConfig(index="flat", n_sink=4, window=16, top_k=4096, dense_layers=())
    _, cache = _compare(model, cfg, ids, layerwise=True, cuda_graphs=cuda_graphs, atol=1e-3)
    assert cache.retrieval_layers[0].stores[0].n == 100 - 4 - 16 + N_STEPS + 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_lean_on_cuda_device_residual_equals_cpu_residual(cuda_graphs):
    """On a GPU the residual is estimated on the device by default (redrawn every step here): the same logits as
    the transformers path's CPU estimate, also when CUDA graphs replay the scoring and the merge."""
    model = tiny_model("llama", seed=21).cuda()
    ids = torch.randint(2, VOCAB - 1, (1, 100), generator=torch.Generator().manual_seed(1)).cuda()
    cfg = RetrievalConfig(index="flat", n_sink=4, window=16, top_k=8, dense_layers=(), residual_samples=8,
                          residual_refresh=1)
    _compare(model, cfg, ids, layerwise=True, cuda_graphs=cuda_graphs, atol=1e-3)


@pytest.mark.parametrize("method,index,dense", [("retrieval", "roar", ()), ("streaming", "flat", ()),
                                                ("retrieval", "flat", (0,))])
def test_lean_other_methods_indexes_and_dense_layers(method, index, dense):
    model = tiny_model("llama", seed=22)
    ids = torch.randint(2, VOCAB - 1, (1, 120), generator=torch.Generator().manual_seed(2))
    cfg = RetrievalConfig(method=method, index=index, n_sink=4, window=16, top_k=8, dense_layers=dense, exact_below=0)
    _, cache = _compare(model, cfg, ids, layerwise=True)
    if method == "streaming":
        assert all(s.n == 0 for l in cache.retrieval_layers for s in l.stores)
    imb = cache.stats()["worker_imbalance"]
    if index == "roar" and method == "retrieval":  # the fused calls record their workers' loads
        assert imb is not None and imb >= 1.0
    else:
        assert imb is None


@pytest.mark.parametrize("index,m", [("roar", 8), ("flat", 8), ("flat", 256)])  # m 256: the exact residual
def test_lean_device_residual_redrawn_every_step_equals_cpu_residual(index, m):
    """residual_on="device" with a redraw every step is the CPU estimate (same draws, weight, exclusions): the
    same logits as the transformers path, whose residual runs in the CPU search call."""
    model = tiny_model("llama", seed=26)
    ids = torch.randint(2, VOCAB - 1, (1, 120), generator=torch.Generator().manual_seed(6))
    kw = dict(index=index, n_sink=4, window=16, top_k=8, dense_layers=(), exact_below=0, residual_samples=m)
    ref_cfg = RetrievalConfig(**kw)
    cfg = RetrievalConfig(**kw, residual_on="device", residual_refresh=1)
    with torch.no_grad(), enable(model):
        ref_cache, logits = _prefill(model, ref_cfg, ids)
        cache, _ = _prefill(model, cfg, ids, layerwise=True)
        tok = logits.argmax(-1, keepdim=True)
        with LeanDecoder(model, cache) as dec:
            assert dec.residual_on_device and dec.residual_bytes() > 0
            for step in range(24):
                a, b = _hf(model, ref_cache, tok), dec.step(tok)
                assert torch.allclose(a, b, atol=ATOL), (step, (a - b).abs().max())
                tok = a.argmax(-1, keepdim=True)
        with LeanDecoder(model, ref_cache) as dec:  # "auto" off a GPU: the CPU estimate, nothing on the device
            assert not dec.residual_on_device and dec.residual_bytes() == 0


def test_lean_device_residual_redraws_when_due(monkeypatch):
    """residual_refresh=R: each layer's sample is drawn on the first step, then exactly every R steps (the layers'
    turns spread over the R steps), not between: the store is past the exact residual."""
    import retrieval_attention.decode_loop as DL

    model = tiny_model("llama", seed=27)
    ids = torch.randint(2, VOCAB - 1, (1, 120), generator=torch.Generator().manual_seed(7))
    R = 6
    cfg = RetrievalConfig(index="flat", n_sink=4, window=16, top_k=8, dense_layers=(), residual_samples=8,
                          residual_on="device", residual_refresh=R)
    draws = []  # (step, layer, n)
    real = DL.draw_sample
    step = [0]

    def spy(keys, values, n, m, k, seed):
        draws.append((step[0], seed % 1_000_003, n))  # residual seed 0: the store's seed is its layer index
        return real(keys, values, n, m, k, seed)

    monkeypatch.setattr(DL, "draw_sample", spy)
    from retrieval_attention import cache as C

    attends = []  # (step, layer, residual_from, n): the CPU's exact part covers the keys added since the draw
    real_attend = C.CPUStore.attend

    def attend_spy(self, *a, residual_from=None, **kw):
        attends.append((step[0], self.residual_seed % 1_000_003, residual_from, self.n))
        return real_attend(self, *a, residual_from=residual_from, **kw)

    monkeypatch.setattr(C.CPUStore, "attend", attend_spy)
    with torch.no_grad(), enable(model):
        cache, logits = _prefill(model, cfg, ids, layerwise=True)
        tok = logits.argmax(-1, keepdim=True)
        layers = [l.layer_idx for l in cache.retrieval_layers]
        with LeanDecoder(model, cache) as dec:
            for step[0] in range(4 * R):
                tok = dec.step(tok).argmax(-1, keepdim=True)
                assert torch.isfinite(dec._t["x"]).all()
    assert len(layers) == 3
    n0 = 120 - 4 - 16 + 1  # the first step's store: the prompt's CPU keys + the token leaving the window
    for layer in layers:
        at = [(s, n) for s, l, n in draws if l == layer]
        assert at[0] == (0, n0) and all(n == n0 + s for s, n in at)  # drawn from the store of that step
        gaps = [b[0] - a[0] for a, b in zip(at, at[1:])]
        assert R <= gaps[0] < 2 * R and all(g == R for g in gaps[1:]) and len(at) >= 3
    later = [s for s, _, _ in draws if s > 0]
    assert len(set(later)) > 1  # the layers take turns: not all redrawn in one step
    assert len(attends) == 4 * R * len(layers)
    for s, layer, frm, n in attends:
        drawn_at = max(d for d in draws if d[1] == layer and d[0] <= s)[2]
        assert frm == drawn_at and n == n0 + s  # the sample covers ids < frm, the CPU frm..n-1 exactly


def test_lean_left_padded_batch():
    model = tiny_model("qwen3", seed=23)
    g = torch.Generator().manual_seed(3)
    T = 90
    ids = torch.zeros((2, T), dtype=torch.long)
    mask = torch.zeros((2, T), dtype=torch.long)
    for i, n in enumerate((90, 10)):  # the short sequence's first window holds 6 padding slots
        ids[i, T - n:] = torch.randint(2, VOCAB - 1, (n,), generator=g)
        mask[i, T - n:] = 1
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    cfg = RetrievalConfig(index="flat", n_sink=4, window=16, top_k=4096, dense_layers=(1,))
    with torch.no_grad(), enable(model):
        ref_cache, logits = _prefill(model, cfg, ids, mask, pos)
        cache, _ = _prefill(model, cfg, ids, mask, layerwise=True)
        tok, p = logits.argmax(-1, keepdim=True), pos[:, -1:]
        with LeanDecoder(model, cache) as dec:
            for step in range(30):
                mask, p = torch.cat([mask, torch.ones((2, 1), dtype=torch.long)], 1), p + 1
                a, b = _hf(model, ref_cache, tok, mask, p), dec.step(tok)
                assert torch.allclose(a, b, atol=ATOL), (step, (a - b).abs().max())
                tok = a.argmax(-1, keepdim=True)
        for _ in range(3):
            mask, p = torch.cat([mask, torch.ones((2, 1), dtype=torch.long)], 1), p + 1
            a, b = _hf(model, ref_cache, tok, mask, p), _hf(model, cache, tok, mask, p)
            assert torch.allclose(a, b, atol=ATOL)
            tok = a.argmax(-1, keepdim=True)
    # the short sequence: 6 padding slots in its first window never enter the store, the 27 later evictions do
    assert [s.n for s in cache.retrieval_layers[0].stores] == [s.n for s in ref_cache.retrieval_layers[0].stores]
    assert cache.retrieval_layers[0].stores[1].n == 33 - 6


def test_lean_on_a_fork_leaves_the_base_untouched():
    model = tiny_model("llama", seed=24)
    ids = torch.randint(2, VOCAB - 1, (1, 80), generator=torch.Generator().manual_seed(4))
    cfg = RetrievalConfig(index="flat", n_sink=4, window=16, top_k=4096, dense_layers=())
    with torch.no_grad(), enable(model):
        base, logits = _prefill(model, cfg, ids)
        before = [l.static_k.clone() for l in base.retrieval_layers]
        hf_fork, lean_fork = base.fork(), base.fork()
        tok = logits.argmax(-1, keepdim=True)
        with LeanDecoder(model, lean_fork) as dec:
            for _ in range(20):
                a, b = _hf(model, hf_fork, tok), dec.step(tok)
                assert torch.allclose(a, b, atol=ATOL)
                tok = a.argmax(-1, keepdim=True)
    for l, k in zip(base.retrieval_layers, before):
        assert torch.equal(l.static_k, k) and l.total == 80
    assert all(s.n == 80 - 20 for l in base.retrieval_layers for s in l.stores)


def test_supports_and_errors():
    model = tiny_model("llama", seed=25)
    cfg = RetrievalConfig(index="flat", n_sink=4, window=16, dense_layers=())
    assert not LeanDecoder.supports(model, DynamicCache(config=model.config))
    with torch.no_grad(), enable(model):
        fresh = make_cache(model, cfg)
        assert "not offloaded" in unsupported_reason(model, fresh)
        with pytest.raises(ValueError, match="not offloaded"):
            LeanDecoder(model, fresh)
        cache, logits = _prefill(model, cfg, torch.randint(2, VOCAB - 1, (1, 40)))
        dec = LeanDecoder(model, cache)
        with pytest.raises(ValueError, match=r"\[B, 1\]"):
            dec.step(torch.zeros((1, 2), dtype=torch.long))
        dec.close()
        with pytest.raises(RuntimeError, match="closed"):
            dec.step(torch.zeros((1, 1), dtype=torch.long))
        with warnings.catch_warnings(record=True) as w:  # no CUDA here: warns and decodes eagerly
            warnings.simplefilter("always")
            with LeanDecoder(model, cache, cuda_graphs=True) as dec:
                dec.step(logits.argmax(-1, keepdim=True))
        assert any("cuda_graphs" in str(x.message) for x in w)
    gemma = tiny_model("gemma3")
    assert not LeanDecoder.supports(gemma, make_cache(gemma, RetrievalConfig(index="flat", dense_layers=())))


def _compiler_missing() -> bool:
    """torch.compile on the CPU needs a C++ compiler (inductor's CPU backend)."""
    import shutil

    return shutil.which("g++") is None and shutil.which("c++") is None


@pytest.mark.skipif(_compiler_missing(), reason="torch.compile on the CPU needs a C++ compiler")
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_lean_compiled_ops_equal_transformers_path(arch):
    """``decode_compile``: the norm/projection/RoPE block, the merge of the attention parts (with the device
    residual) and the o_proj/MLP block run compiled, once for all layers, with the transformers path's logits."""
    import torch._dynamo.utils as dynamo_utils

    torch._dynamo.reset()
    dynamo_utils.counters.clear()
    model = tiny_model(arch, seed=27)
    ids = torch.randint(2, VOCAB - 1, (1, 100), generator=torch.Generator().manual_seed(7))
    cfg = RetrievalConfig(index="flat", n_sink=4, window=16, top_k=8, dense_layers=(), residual_samples=8,
                          residual_on="device", residual_refresh=1, decode_compile=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a failed compile warns: it must not happen here
        _compare(model, cfg, ids, n_steps=20, layerwise=True)
    # one graph per compiled function, not one per layer (the tiny model has 2 layers; 3 functions)
    assert dynamo_utils.counters["stats"]["unique_graphs"] == 3


@pytest.mark.skipif(_compiler_missing(), reason="torch.compile on the CPU needs a C++ compiler")
def test_lean_compiled_ops_compile_in_process(monkeypatch):
    """The compiled ops go through ``inductor_in_process``: inductor runs with ``compile_threads=1`` (no pool of
    compile subprocesses competing with the CPU search for cores), and the setting is restored afterwards."""
    import torch._inductor.compile_fx as cfx
    from torch._inductor import config as inductor_config

    seen = []
    real = cfx.compile_fx

    def recording(gm, example_inputs, *a, **k):
        seen.append(inductor_config.compile_threads)
        return real(gm, example_inputs, *a, **k)

    monkeypatch.setattr(cfx, "compile_fx", recording)
    before = inductor_config.compile_threads
    torch._dynamo.reset()
    model = tiny_model("llama", seed=28)
    ids = torch.randint(2, VOCAB - 1, (1, 60), generator=torch.Generator().manual_seed(8))
    cfg = RetrievalConfig(index="flat", n_sink=4, window=16, top_k=8, dense_layers=(), decode_compile=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        _compare(model, cfg, ids, n_steps=4, layerwise=True)
    assert seen == [1, 1, 1]  # the three ops, each compiled once, in process
    assert inductor_config.compile_threads == before


def test_lean_compiled_ops_fall_back_to_plain_ops(monkeypatch):
    """When torch.compile fails the decoder warns once and decodes with the plain ops: same logits."""
    def broken_compile(fn, **kw):
        def run(*a, **k):
            raise RuntimeError("no backend")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    model = tiny_model("llama", seed=27)
    ids = torch.randint(2, VOCAB - 1, (1, 100), generator=torch.Generator().manual_seed(7))
    cfg = RetrievalConfig(index="flat", n_sink=4, window=16, top_k=8, dense_layers=(), decode_compile=True)
    with pytest.warns(RuntimeWarning, match="decode_compile: torch.compile failed"):
        _compare(model, cfg, ids, n_steps=6, layerwise=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_lean_on_cuda_compiled_ops(cuda_graphs):
    """On a GPU the compiled ops (Triton kernels) also replay inside the CUDA graphs: transformers-path logits."""
    torch._dynamo.reset()
    model = tiny_model("llama", seed=21).cuda()
    ids = torch.randint(2, VOCAB - 1, (1, 100), generator=torch.Generator().manual_seed(1)).cuda()
    cfg = RetrievalConfig(index="flat", n_sink=4, window=16, top_k=8, dense_layers=(), residual_samples=8,
                          residual_refresh=1, decode_compile=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        _compare(model, cfg, ids, layerwise=True, cuda_graphs=cuda_graphs, atol=1e-3)
