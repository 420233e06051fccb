"""Measurement (docs/BENCHMARKS.md, session 17): the first lean decode step, which compiles the three decode ops,
with the ``inductor_in_process`` backend (``inproc``) or the stock inductor backend (``stock``, compile
subprocesses allowed). Tiny Llama from the tests on the CPU; run it with a fresh ``TORCHINDUCTOR_CACHE_DIR`` for
a cold compile, again with the same directory for a cached one.
Usage: ``TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) python docs/bench/scripts/cold_compile.py inproc|stock``."""
import sys
import time
from pathlib import Path

import torch

from retrieval_attention.threads import configure_threads

configure_threads()
import retrieval_attention.decode_loop as D  # noqa: E402

if sys.argv[1:] == ["stock"]:
    def stock_init(self):
        self.fns = {n: (f, torch.compile(f, dynamic=False, fullgraph=True)) for n, f in D._OPS.items()}
        self.failed = False

    D._CompiledOps.__init__ = stock_init
elif sys.argv[1:] != ["inproc"]:
    sys.exit("usage: cold_compile.py inproc|stock")
sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tests"))
from tiny_models import VOCAB, tiny_model  # noqa: E402

from retrieval_attention.config import RetrievalConfig  # noqa: E402
from retrieval_attention.integration import enable, make_cache  # noqa: E402
from retrieval_attention.prefill import layerwise_prefill  # noqa: E402

model = tiny_model("llama", seed=27)
ids = torch.randint(2, VOCAB - 1, (1, 100), generator=torch.Generator().manual_seed(7))
cfg = RetrievalConfig(index="flat", n_sink=4, window=16, top_k=8, dense_layers=(), decode_compile=True)
cache = make_cache(model, cfg)
with torch.no_grad(), enable(model):
    layerwise_prefill(model, ids, cache, chunk=64)
    dec = D.LeanDecoder(model, cache)
    t = time.perf_counter()
    dec.step(ids[:, -1:])
    print(sys.argv[1], "first decode step (compiles the 3 ops):", round(time.perf_counter() - t, 2), "s")
