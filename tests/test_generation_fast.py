"""generate_ids' fast path (layer-by-layer prefill + lean decode loop) gives model.generate's tokens."""

import pytest
import torch

from retrieval_attention.config import RetrievalConfig
from retrieval_attention.generation import fast_path_reason, generate_ids

from tiny_models import VOCAB, tiny_model


def _cfg(**kw):
    d = dict(index="flat", n_sink=4, window=16, top_k=8, dense_layers=(0,), prefill_chunk=24, exact_below=0)
    d.update(kw)
    return RetrievalConfig(**d)


class Recorder:
    def __init__(self):
        self.calls = []

    def put(self, v):
        self.calls.append(v.clone())

    def end(self):
        self.calls.append("end")


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("cfg", [_cfg(), _cfg(index="roar", residual_samples=0), _cfg(residual_samples=16),
                                 _cfg(method="streaming")], ids=["flat", "roar", "flat+residual", "streaming"])
def test_fast_equals_generate(arch, cfg):
    model = tiny_model(arch)
    ids = torch.randint(0, VOCAB, (1, 70), generator=torch.Generator().manual_seed(1))
    assert fast_path_reason(model, cfg, ids, None, {}) is None
    rec_fast, rec_hf = Recorder(), Recorder()
    fast, st_fast = generate_ids(model, ids, cfg, max_new_tokens=30, streamer=rec_fast, fast=True)
    slow, st_slow = generate_ids(model, ids, cfg, max_new_tokens=30, streamer=rec_hf, fast=False)
    assert torch.equal(fast, slow)
    assert st_fast["generation_path"] == "fast" and "generation_path" not in st_slow
    assert st_fast["new_tokens"] == st_slow["new_tokens"] == 30
    # the streamer sees the same calls: the prompt, then one token at a time, then end()
    assert len(rec_fast.calls) == len(rec_hf.calls)
    assert torch.equal(rec_fast.calls[0].view(-1), rec_hf.calls[0].view(-1)) and rec_fast.calls[-1] == "end"


def test_fast_batch_left_padding_and_eos():
    model = tiny_model("llama")
    g = torch.Generator().manual_seed(2)
    a = torch.randint(1, VOCAB, (60,), generator=g)
    b = torch.randint(1, VOCAB, (45,), generator=g)
    pad = 0
    ids = torch.full((2, 60), pad)
    ids[0], ids[1, 15:] = a, b
    mask = (torch.arange(60).view(1, -1) >= torch.tensor([[0], [15]])).long()
    cfg = _cfg()
    slow, _ = generate_ids(model, ids, cfg, attention_mask=mask, max_new_tokens=12, fast=False, pad_token_id=pad)
    # stop sequence 0 early: its 4th generated token becomes EOS, sequence 1 continues (padded after EOS)
    eos = int(slow[0, 60 + 3])
    slow, _ = generate_ids(model, ids, cfg, attention_mask=mask, max_new_tokens=12, fast=False, pad_token_id=pad,
                           eos_token_id=eos)
    fast, _ = generate_ids(model, ids, cfg, attention_mask=mask, max_new_tokens=12, fast=True, pad_token_id=pad,
                           eos_token_id=eos)
    assert torch.equal(fast, slow)


def test_fast_path_reasons():
    model = tiny_model("llama")
    long = torch.zeros(1, 70, dtype=torch.long)
    assert "full" in fast_path_reason(model, RetrievalConfig(method="full", index="flat"), long, None, {})
    assert "static" in fast_path_reason(model, _cfg(), long[:, :20], None, {})
    assert "sampling" in fast_path_reason(model, _cfg(), long, None, {"do_sample": True})
    assert "options" in fast_path_reason(model, _cfg(), long, None, {"stopping_criteria": [1]})
    assert "given cache" in fast_path_reason(model, _cfg(), long, object(), {})
    with pytest.raises(ValueError, match="fast generation path cannot run"):
        generate_ids(model, long[:, :20], _cfg(), max_new_tokens=2, fast=True)
    gemma = tiny_model("gemma3")
    assert fast_path_reason(gemma, _cfg(), long, None, {}) is not None


def test_prompt_tokens_equal_to_pad_are_not_masked():
    """model.generate infers a mask from pad_token_id when given none; a prompt token equal to the pad id
    (SmolLM2: pad = eos = <|im_end|>, in every chat prompt) must still be attended, also with eos_token_id=[]."""
    model = tiny_model("llama")
    ids = torch.randint(3, VOCAB, (1, 70), generator=torch.Generator().manual_seed(3))
    ids[0, 5:65:3] = 2  # "pad" tokens inside the prompt
    cfg = _cfg(method="streaming")
    a, _ = generate_ids(model, ids, cfg, max_new_tokens=16, fast=False, pad_token_id=2, eos_token_id=[])
    b, _ = generate_ids(model, ids, cfg, max_new_tokens=16, fast=True, pad_token_id=2, eos_token_id=[])
    c, _ = generate_ids(model, ids, cfg, max_new_tokens=16, fast=False, pad_token_id=2, eos_token_id=2)
    assert torch.equal(a, b)
    n = min(a.shape[1], c.shape[1])
    assert torch.equal(a[:, :n], c[:, :n])


# ---- one shared prefill for several configurations (generate_ids_many; the eval's default) -----------------
from retrieval_attention.generation import generate_ids_many, shared_prefill_reason  # noqa: E402


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_shared_prefill_equals_separate_runs(arch):
    """Every configuration gets the tokens (and retrieval stats) of its own run from one shared prefill."""
    model = tiny_model(arch, seed=5)
    ids = torch.randint(0, VOCAB, (1, 90), generator=torch.Generator().manual_seed(3))
    cfgs = [RetrievalConfig(method="full", index="flat", prefill_chunk=24), _cfg(index="roar", residual_samples=16),
            _cfg(), _cfg(top_k=2, dense_layers=()), _cfg(method="streaming"), _cfg(n_sink=8, window=8)]
    assert shared_prefill_reason(model, cfgs, ids) is None
    many = generate_ids_many(model, ids, cfgs, max_new_tokens=20, shared=True)
    assert len(many) == len(cfgs)
    for cfg, (seqs, stats) in zip(cfgs, many):
        alone, st = generate_ids(model, ids, cfg, max_new_tokens=20)
        assert torch.equal(seqs, alone), cfg
        assert stats["generation_path"] == "shared-prefill" and stats["shared_prefill_s"] > 0
        assert stats["prefill_s"] >= stats["shared_prefill_s"]
        if cfg.method == "retrieval":  # same stores, same searches
            assert stats["kv_cpu_bytes"] == st["kv_cpu_bytes"] and stats["n_searches"] == st["n_searches"]
    # the configurations really differ (the test would be void if all generated the same tokens)
    assert len({tuple(s[0].tolist()) for s, _ in many}) > 1


def test_shared_prefill_eos_and_fallbacks():
    model = tiny_model("llama", seed=6)
    ids = torch.randint(0, VOCAB, (1, 70), generator=torch.Generator().manual_seed(4))
    cfgs = [RetrievalConfig(method="full", index="flat", prefill_chunk=24), _cfg()]
    ref = [generate_ids(model, ids, c, max_new_tokens=12)[0] for c in cfgs]
    eos = int(ref[0][0, 70 + 2])  # full's third token: full stops there, retrieval wherever it emits it
    many = generate_ids_many(model, ids, cfgs, max_new_tokens=12, eos_token_id=eos, shared=True)
    for c, (seqs, _) in zip(cfgs, many):
        alone, _ = generate_ids(model, ids, c, max_new_tokens=12, eos_token_id=eos)
        assert torch.equal(seqs, alone)
    assert many[0][0].shape[1] == 70 + 3
    # reasons to run one by one: said, and the results still come (from separate runs)
    assert "prefill_chunk" in shared_prefill_reason(model, [cfgs[1], _cfg(prefill_chunk=16)], ids)
    assert shared_prefill_reason(model, [None, _cfg(prefill_chunk=16)], ids) is None  # full: any chunk
    assert "batch" in shared_prefill_reason(model, cfgs, ids.repeat(2, 1))
    assert "static tokens" in shared_prefill_reason(model, cfgs, ids[:, :10])
    with pytest.raises(ValueError, match="prefill_chunk"):
        generate_ids_many(model, ids, [cfgs[1], _cfg(prefill_chunk=16)], max_new_tokens=4, shared=True)
    out = generate_ids_many(model, ids, [cfgs[1], _cfg(prefill_chunk=16)], max_new_tokens=4)
    assert all(st.get("generation_path") == "fast" for _, st in out)
