"""Persistent contexts: fork = same answer as a fresh run, shared state untouched, save/load checks."""

import json

import pytest
import torch

from retrieval_attention.config import RetrievalConfig
from retrieval_attention.context import ContextFileError, PrefilledContext
from retrieval_attention.generation import generate_ids

from tiny_models import VOCAB, tiny_model


@pytest.fixture(scope="module")
def setup():
    model = tiny_model("llama", seed=11)
    g = torch.Generator().manual_seed(3)
    doc = torch.randint(2, VOCAB - 1, (140,), generator=g).tolist()
    questions = [torch.randint(2, VOCAB - 1, (n,), generator=g).tolist() for n in (5, 9)]
    return model, doc, questions


@pytest.mark.parametrize("method", ["retrieval", "full"])
def test_context_answers_equal_fresh_runs_and_context_is_unchanged(setup, method):
    model, doc, questions = setup
    cfg = RetrievalConfig(method=method, index="flat", n_sink=8, window=16, top_k=4096, dense_layers=(0,))
    ctx = PrefilledContext.prefill(model, doc, cfg)
    before = ctx.nbytes()
    for q in questions * 2:  # each question twice: the context must not drift
        got, _ = ctx.generate(model, q, max_new_tokens=10)
        ref, _ = generate_ids(model, torch.tensor([doc + q]), cfg, max_new_tokens=10)
        assert got == ref[0, len(doc) + len(q):].tolist()
    assert ctx.nbytes() == before
    if method == "retrieval":
        assert all(l.offloaded and l.stores[0].n == 140 - 8 - 16 for l in ctx.cache.retrieval_layers)


def test_save_load_roundtrip_and_rejections(setup, tmp_path):
    model, doc, questions = setup
    cfg = RetrievalConfig(index="flat", n_sink=8, window=16, top_k=32, dense_layers=(0,))
    ctx = PrefilledContext.prefill(model, doc, cfg)
    want, _ = ctx.generate(model, questions[0], max_new_tokens=8)
    ctx.save(tmp_path / "c")
    loaded = PrefilledContext.load(tmp_path / "c", model)
    got, _ = loaded.generate(model, questions[0], max_new_tokens=8)
    assert got == want and loaded.token_ids == doc
    # other build configuration
    with pytest.raises(ContextFileError, match="another configuration"):
        PrefilledContext.load(tmp_path / "c", model, RetrievalConfig(index="flat", n_sink=4, window=16))
    # other model
    with pytest.raises(ContextFileError, match="another model"):
        PrefilledContext.load(tmp_path / "c", tiny_model("llama", seed=12))
    # corrupt tensor file
    f = tmp_path / "c" / "kv.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(ContextFileError, match="checksum"):
        PrefilledContext.load(tmp_path / "c", model)
    # other format version
    ctx.save(tmp_path / "d")
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    meta["format_version"] = 999
    (tmp_path / "d" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ContextFileError, match="format version"):
        PrefilledContext.load(tmp_path / "d", model)
    with pytest.raises(ContextFileError, match="cannot read"):
        PrefilledContext.load(tmp_path / "missing", model)


def test_question_on_a_context_attends_exactly_like_a_fresh_prefill(setup):
    """The request's own tokens (several at once) must not go through top-k retrieval: with a tiny top_k the
    first answer token still equals a fresh exact prefill of document + question."""
    model, doc, questions = setup
    q = questions[1]
    cfg = RetrievalConfig(index="flat", n_sink=8, window=16, top_k=2, dense_layers=())
    ctx = PrefilledContext.prefill(model, doc, cfg)
    got, _ = ctx.generate(model, q, max_new_tokens=1)
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([doc + q])).logits[0, -1].argmax().item()
    assert got == [ref]


def test_training_query_count_compares_by_its_effective_value(setup, tmp_path):
    """A context saved with the count the automatic rule gives (4,096 was the fixed default) loads under the
    automatic default; a different count is another build."""
    model, doc, _ = setup
    base = dict(index="flat", n_sink=8, window=16, top_k=32, dense_layers=(0,))
    PrefilledContext.prefill(model, doc, RetrievalConfig(**base, max_train_queries=4096)).save(tmp_path / "c")
    meta = json.loads((tmp_path / "c" / "meta.json").read_text())
    assert meta["build"]["max_train_queries"] == 4096
    PrefilledContext.load(tmp_path / "c", model, RetrievalConfig(**base))  # None -> 4096 for 140 tokens
    with pytest.raises(ContextFileError, match="max_train_queries"):
        PrefilledContext.load(tmp_path / "c", model, RetrievalConfig(**base, max_train_queries=23))
