"""Retrieval decoding inside transformers: exactness against full attention, GQA, batches, methods."""

import zlib

import pytest
import torch
from transformers import DynamicCache

from retrieval_attention.cache import RetrievalCache, RetrievalLayer
from retrieval_attention.config import RetrievalConfig
from retrieval_attention.generation import cache_kwarg
from retrieval_attention.integration import enable, make_cache

from tiny_models import ARCHS, VOCAB, tiny_model


def _generate(model, ids, cfg, n_new, mask=None):
    cache = make_cache(model, cfg)
    kw = {cache_kwarg(model): cache}
    with torch.no_grad():
        if cfg is not None and cfg.method != "full":
            with enable(model):
                out = model.generate(ids, attention_mask=mask, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                                     output_logits=True, return_dict_in_generate=True, pad_token_id=0, **kw)
        else:
            out = model.generate(ids, attention_mask=mask, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True, pad_token_id=0, **kw)
    return out, cache


@pytest.mark.parametrize("arch", ARCHS)
def test_exact_when_topk_covers_cpu_store(arch):
    """flat index + top_k >= CPU keys: logits equal full attention (fp32) over a 64-token greedy generation."""
    model = tiny_model(arch, seed=zlib.crc32(arch.encode()) % 1000)  # hash() is salted per process
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(2, VOCAB - 1, (1, 150), generator=gen)
    cfg = RetrievalConfig(index="flat", n_sink=8, window=32, top_k=4096, dense_layers=(), prefill_chunk=40)
    full, _ = _generate(model, ids, None, 64)
    ret, cache = _generate(model, ids, cfg, 64)
    assert torch.equal(full.sequences, ret.sequences)
    assert full.sequences.shape[1] == 150 + 64, "an early EOS would leave the window test below short"
    diff = max((a - b).abs().max().item() for a, b in zip(full.logits, ret.logits))
    assert diff < 1e-4, diff
    layers = cache.retrieval_layers
    assert layers and all(l.offloaded for l in layers)
    # tokens that left the window were added to the CPU store: prompt middle + generated overflow
    for l in layers:
        assert l.stores[0].n == 150 + 63 - 8 - 32
        assert l.win_k.shape[2] == 32
    if arch == "gemma3":  # sliding-window layers keep the stock transformers layer
        assert not isinstance(cache.layers[0], RetrievalLayer) and isinstance(cache.layers[1], RetrievalLayer)


def test_small_topk_differs_but_streaming_differs_more():
    model = tiny_model("llama", seed=3)
    ids = torch.randint(2, VOCAB - 1, (1, 300), generator=torch.Generator().manual_seed(2))
    full, _ = _generate(model, ids, None, 8)
    errs = {}
    for name, cfg in {
        # no residual estimate: with it, 276 stored keys <= top_k + draws are covered exactly (KL ~ +-1e-7)
        "retrieval": RetrievalConfig(index="flat", n_sink=8, window=16, top_k=64, dense_layers=(), residual_samples=0),
        "streaming": RetrievalConfig(method="streaming", index="flat", n_sink=8, window=16, dense_layers=()),
    }.items():
        out, cache = _generate(model, ids, cfg, 8)
        p = torch.log_softmax(full.logits[1], -1)  # first decode step: same prefix
        q = torch.log_softmax(out.logits[1], -1)
        errs[name] = torch.sum(p.exp() * (p - q)).item()
        if name == "streaming":
            assert all(s.n == 0 for l in cache.retrieval_layers for s in l.stores)
    assert 1e-6 < errs["retrieval"] < errs["streaming"], errs


def test_short_prompt_is_exact_full_attention_without_index():
    model = tiny_model("qwen2", seed=4)
    ids = torch.randint(2, VOCAB - 1, (1, 30))
    cfg = RetrievalConfig(index="flat", n_sink=8, window=32, top_k=1, dense_layers=())
    full, _ = _generate(model, ids, None, 6)
    ret, cache = _generate(model, ids, cfg, 6)
    assert torch.equal(full.sequences, ret.sequences)
    assert not any(l.offloaded for l in cache.retrieval_layers)


def test_batch_matches_one_at_a_time():
    """3 prompts of different lengths (left padding) give the same tokens as each prompt alone."""
    model = tiny_model("llama", seed=5)
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(2, VOCAB - 1, (n,), generator=g) for n in (120, 90, 45)]
    cfg = RetrievalConfig(index="flat", n_sink=8, window=24, top_k=16, dense_layers=(0,), prefill_chunk=32)
    singles = [_generate(model, p.view(1, -1), cfg, 12)[0].sequences[0, len(p):] for p in prompts]
    T = max(len(p) for p in prompts)
    ids = torch.zeros((3, T), dtype=torch.long)
    mask = torch.zeros((3, T), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = p
        mask[i, T - len(p):] = 1
    batch, cache = _generate(model, ids, cfg, 12, mask=mask)
    for i in range(3):
        assert torch.equal(batch.sequences[i, T:], singles[i]), i
    # the shortest sequence (45 tokens) has no middle part at prefill time: its store fills from evictions only
    layer = cache.retrieval_layers[0]
    assert layer.stores[0].n == 120 - 8 - 24 + 11 and layer.stores[2].n == 45 - 8 - 24 + 11 - 0


def test_dense_layers_keep_stock_layers_and_bad_config_errors():
    model = tiny_model("llama")
    cache = RetrievalCache(model.config, RetrievalConfig(index="flat", dense_layers=(0, 1)))
    assert [isinstance(l, RetrievalLayer) for l in cache.layers] == [False, False, True]
    with pytest.raises(ValueError, match="out of range"):
        RetrievalCache(model.config, RetrievalConfig(index="flat", dense_layers=(7,)))
    assert isinstance(make_cache(model, RetrievalConfig(method="full", index="flat")), DynamicCache)


def test_unsupported_architecture_is_refused():
    import transformers as tf

    cfg = tf.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)
    model = tf.GPT2LMHeadModel(cfg)
    with pytest.raises(NotImplementedError, match="supported: llama"):
        make_cache(model, RetrievalConfig(index="flat"))


def test_attention_implementation_restored():
    model = tiny_model("llama")
    with enable(model):
        assert model.config._attn_implementation == "retrieval_attention"
    assert model.config._attn_implementation == "sdpa"


def test_small_stores_are_scanned_exactly():
    """exact_below: a layer whose prompt leaves fewer CPU keys than the threshold gets exact top-k (flat) and
    ignores the index's search budget; at or above it, the configured index; same tokens as flat below."""
    model = tiny_model("llama", seed=7)
    ids = torch.randint(2, VOCAB - 1, (1, 150), generator=torch.Generator().manual_seed(5))
    n_cpu = 150 - 8 - 32
    base = dict(n_sink=8, window=32, top_k=8, dense_layers=(), search_params={"ef": 16}, residual_samples=0)
    out_small, cache = _generate(model, ids, RetrievalConfig(index="roar", exact_below=n_cpu + 1, **base), 8)
    assert all(s.index.name == "flat" for l in cache.retrieval_layers for s in l.stores)
    flat, _ = _generate(model, ids, RetrievalConfig(index="flat", **{**base, "search_params": {}}), 8)
    assert torch.equal(out_small.sequences, flat.sequences)
    _, cache = _generate(model, ids, RetrievalConfig(index="roar", exact_below=n_cpu, **base), 8)
    assert all(s.index.name == "roar" for l in cache.retrieval_layers for s in l.stores)
    with pytest.raises(ValueError, match="exact_below"):
        RetrievalConfig(exact_below=-1)
