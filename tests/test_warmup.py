"""The kernel warm-up runs the real CPU-store path for the model's dtype, and nothing for full attention."""

import pytest
import torch

from retrieval_attention.config import RetrievalConfig
from retrieval_attention.warmup import compile_kernels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compile_kernels_runs_the_store_path(dtype, capsys, monkeypatch):
    from retrieval_attention import cache

    calls = []
    for name in ("build", "add", "attend"):
        real = getattr(cache.CPUStore, name)
        monkeypatch.setattr(cache.CPUStore, name,
                            lambda self, *a, _real=real, _name=name, **k: (calls.append(_name), _real(self, *a, **k))[1])
    cfg = RetrievalConfig(method="retrieval", exact_below=64, top_k=8)
    assert compile_kernels(cfg, dtype, n_kv_heads=2, group=3, head_dim=16) > 0
    assert calls == ["build", "add", "attend"]
    assert "compiling the CPU kernels" in capsys.readouterr().err


def test_compile_kernels_skips_full_attention(capsys):
    assert compile_kernels(RetrievalConfig(method="full", index="flat"), torch.float32) == 0.0
    assert capsys.readouterr().err == ""


def test_compile_kernels_for_uses_the_models_heads_and_dtype(monkeypatch):
    """The warm-up store gets the model's KV heads, GQA group, head dim and parameter dtype."""
    import retrieval_attention.warmup as warmup
    from retrieval_attention.generation_cli import compile_kernels_for
    from tiny_models import tiny_model

    seen = {}
    monkeypatch.setattr(warmup, "compile_kernels", lambda cfg, dtype, **kw: seen.update(dtype=dtype, **kw) or 1.0)
    model = tiny_model("llama")
    mc = model.config
    assert compile_kernels_for(model, RetrievalConfig()) == 1.0
    assert seen == {"dtype": next(model.parameters()).dtype, "n_kv_heads": mc.num_key_value_heads,
                    "group": mc.num_attention_heads // mc.num_key_value_heads, "head_dim": mc.head_dim}
