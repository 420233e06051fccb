"""Index-training queries moved to the decode phase: the rotation equals each model family's own RoPE, and the
retrieval cache trains its indexes on exactly the rotated prompt queries."""

import sys

import pytest
import torch

from retrieval_attention.cache import train_positions
from retrieval_attention.config import RetrievalConfig
from retrieval_attention.generation import cache_kwarg
from retrieval_attention.integration import enable, make_cache
from retrieval_attention.prefill import layerwise_prefill
from retrieval_attention.rope import align_to_decode, decode_targets, rope_inv_freq, rope_inv_freq_from_config, rotate

from tiny_models import ARCHS, VOCAB, tiny_model


def _model_rope(model, layer, x, pos):
    """``x [1, H, m, D]`` (pre-RoPE) at positions ``pos [m]`` through the model's own rotary embedding."""
    base = model.get_decoder()
    types = getattr(model.config, "layer_types", None)
    per_type = isinstance(getattr(base.rotary_emb, "rope_type", None), dict)  # e.g. Gemma 3: one RoPE per layer type
    kw = {"layer_type": types[layer]} if types and per_type else {}
    cos, sin = base.rotary_emb(x, pos.view(1, -1), **kw)
    apply = sys.modules[type(base.layers[layer].self_attn).__module__].apply_rotary_pos_emb
    return apply(x, x, cos, sin)[0]


@pytest.mark.parametrize("arch", ARCHS)
def test_rotation_moves_a_query_as_the_models_rope_would(arch):
    """R(t - p) applied to a query the model rotated to position p gives the query it rotates to position t."""
    model = tiny_model(arch, seed=1)
    g = torch.Generator().manual_seed(0)
    for layer in range(model.config.num_hidden_layers):
        inv = rope_inv_freq(model, layer)
        D = 2 * inv.numel()
        x = torch.randn(1, 3, 6, D, generator=g)
        p = torch.tensor([0, 3, 50, 700, 1234, 4000])
        t = torch.tensor([4096, 4100, 4000, 5000, 4096, 4090])
        at_p, at_t = _model_rope(model, layer, x, p), _model_rope(model, layer, x, t)
        moved = rotate(at_p[0], (t - p).double(), inv)
        assert torch.allclose(moved, at_t[0], atol=5e-3), (arch, layer, (moved - at_t[0]).abs().max())
        # a wrong frequency order would not: the check can fail
        assert not torch.allclose(rotate(at_p[0], (t - p).double(), inv.flip(0)), at_t[0], atol=5e-2)


def test_gemma3_layer_types_rotate_differently_and_config_frequencies_match_the_model():
    model = tiny_model("gemma3")
    freqs = [rope_inv_freq(model, i) for i in range(4)]
    assert not torch.equal(freqs[0], freqs[1]) and torch.equal(freqs[0], freqs[2]) and torch.equal(freqs[1], freqs[3])
    from_cfg = rope_inv_freq_from_config(model.config)
    assert all(torch.equal(from_cfg[i], freqs[i]) for i in range(4))
    llama = tiny_model("llama")
    assert torch.equal(rope_inv_freq_from_config(llama.config)[2], rope_inv_freq(llama, 2))


def test_decode_targets_and_errors():
    assert torch.equal(decode_targets(100, 5, 0, seed=3), torch.full((5,), 100.0, dtype=torch.float64))
    t = decode_targets(1000, 4096, 64, seed=3)
    assert t.min() >= 1000 - 32 and t.max() < 1000 + 32 and t.std() > 15  # spread over the whole range
    assert torch.equal(t, decode_targets(1000, 4096, 64, seed=3)) and not torch.equal(t, decode_targets(1000, 4096, 64, 4))
    q = torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match="4 positions for 5 queries"):
        align_to_decode(q, torch.arange(4), 10, torch.ones(4), 0)
    with pytest.raises(ValueError, match="head_dim 6"):
        rotate(q, torch.zeros(5), torch.ones(3))
    # the rotation keeps norms, and a query already at its target is unchanged
    inv = 1.0 / 10000 ** (torch.arange(0, 8, 2) / 8)
    r = align_to_decode(q, torch.arange(5), 9, inv, 0)
    assert torch.allclose(r.norm(dim=-1), q.norm(dim=-1), atol=1e-5)
    assert torch.allclose(align_to_decode(q, torch.full((5,), 9), 9, inv, 0), q)


@pytest.mark.parametrize("layerwise", [False, True])
def test_cache_trains_on_prompt_queries_rotated_to_the_decode_position(build_queries, layerwise):
    """Left-padded batch: each sequence's index gets its own subsampled prompt queries, each rotated from its real
    position to that sequence's first decode position (spread by the layer's seed); off: the raw queries."""
    seen = build_queries
    model = tiny_model("llama", seed=3)
    T, lens = 140, (140, 95)
    g = torch.Generator().manual_seed(1)
    ids = torch.zeros((2, T), dtype=torch.long)
    mask = torch.zeros((2, T), dtype=torch.long)
    for i, n in enumerate(lens):
        ids[i, T - n:] = torch.randint(2, VOCAB - 1, (n,), generator=g)
        mask[i, T - n:] = 1
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    m = 24
    got = {}
    for align in (True, False):
        cfg = RetrievalConfig(index="flat", n_sink=8, window=16, dense_layers=(0,), max_train_queries=m,
                              align_train_queries=align, align_spread=32)
        seen.clear()
        with torch.no_grad(), enable(model):
            cache = make_cache(model, cfg)
            if layerwise:
                layerwise_prefill(model, ids, cache, chunk=33, attention_mask=mask)
            else:
                model(input_ids=ids, attention_mask=mask, position_ids=pos, **{cache_kwarg(model): cache})
        got[align] = list(seen)
    assert len(got[True]) == len(got[False]) == 2 * 2  # layers 1 and 2, two sequences each
    k = 0
    for layer in (1, 2):
        inv = rope_inv_freq(model, layer)
        for n in lens:
            raw, aligned = got[False][k], got[True][k]
            assert raw.shape == aligned.shape == (4, m, 16)
            want = align_to_decode(raw, train_positions(n, m), n, inv, 32, seed=layer)
            assert torch.allclose(aligned, want, atol=1e-5)
            assert not torch.allclose(aligned, raw, atol=1e-2)
            k += 1


def test_alignment_needs_the_models_frequencies():
    """A cache built without the model (no RoPE frequencies) keeps the raw queries; streaming reads none."""
    from retrieval_attention.cache import RetrievalCache

    model = tiny_model("llama", seed=3)
    cache = RetrievalCache(model.config, RetrievalConfig(index="flat"))
    assert all(l.rope_inv_freq is None for l in cache.retrieval_layers)
    made = make_cache(model, RetrievalConfig(index="flat", dense_layers=()))
    assert all(torch.equal(l.rope_inv_freq, rope_inv_freq(model, l.layer_idx)) for l in made.retrieval_layers)
    off = make_cache(model, RetrievalConfig(index="flat", dense_layers=(), align_train_queries=False))
    assert all(l.rope_inv_freq is None for l in off.retrieval_layers)
    l0 = made.retrieval_layers[0]
    l0.reset()
    assert l0.rope_inv_freq is not None  # a reset keeps them
    # a model whose rotary embedding cannot be read: a warning that names the fallback and the option
    rot = model.get_decoder().rotary_emb
    del model.get_decoder().rotary_emb
    try:
        with pytest.warns(RuntimeWarning, match="align_train_queries=False"):
            blind = make_cache(model, RetrievalConfig(index="flat", dense_layers=()))
    finally:
        model.get_decoder().rotary_emb = rot
    assert all(l.rope_inv_freq is None for l in blind.retrieval_layers)


def test_config_validates_alignment_options():
    with pytest.raises(ValueError, match="align_spread"):
        RetrievalConfig(align_spread=-1)
    with pytest.raises(ValueError, match="align_train_queries"):
        RetrievalConfig(align_train_queries="yes")
