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
    assert calls == ["build", "add", "attend", "attend"]
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



_DECODE_AFTER_WARMUP = """
import sys, torch
from numba.core.registry import CPUDispatcher
from retrieval_attention.cache import CPUStore
from retrieval_attention.config import RetrievalConfig
from retrieval_attention.index import decode_kernels, kernels
from retrieval_attention.warmup import compile_kernels

def signatures():
    return {f"{m.__name__}.{n}": len(f.signatures) for m in (kernels, decode_kernels) for n, f in vars(m).items()
            if isinstance(f, CPUDispatcher)}

dtype = getattr(torch, sys.argv[1])
cfg = RetrievalConfig(method="retrieval", exact_below=64, top_k=8, residual_samples=16)
compile_kernels(cfg, dtype, n_kv_heads=2, group=3, head_dim=16, verbose=False)
before = signatures()
g = torch.Generator().manual_seed(5)
keys = torch.randn(3, 500, 32, generator=g).to(dtype)
values = torch.randn(3, 500, 32, generator=g).to(dtype)
store = CPUStore(cfg)
store.build(keys[:, :400], values[:, :400], torch.randn(6, 40, 32, generator=g).to(dtype))
for j in range(400, 420):
    store.add(keys[:, j: j + 1], values[:, j: j + 1], 6)
    q = torch.randn(6, 1, 32, generator=g).numpy()
    store.attend(q, 2, 32 ** -0.5, cfg.top_k, **store.search_budget(cfg))
    store.attend(q, 2, 32 ** -0.5, cfg.top_k, residual_from=store.n - 3, return_ids=True, **store.search_budget(cfg))
print({k: v for k, v in signatures().items() if v != before.get(k)})
"""


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_compile_kernels_leaves_nothing_to_compile_for_decoding(dtype):
    """In a fresh process, after the warm-up, a decode-like sequence on another store (other sizes; build, tokens
    leaving the window, repeated search + attention with the residual, drawn or exact) adds no kernel signature:
    nothing is compiled inside the timed decode (the README demo's first run lost a third of its decode speed
    to a kernel the warm-up had not reached)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _DECODE_AFTER_WARMUP, dtype], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "{}"
