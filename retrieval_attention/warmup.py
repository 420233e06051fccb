"""Compile the CPU kernels before the timed work.

The index build and the decode call are numba kernels compiled on first use (about 20 s each on 2 cores) and
cached on disk afterwards. Without a warm-up the first run of a process books that compilation as prefill,
index build and decode time (the README's demo reported 1 token/s instead of 11 on a fresh install). The
warm-up runs the real code path (:class:`~retrieval_attention.cache.CPUStore`: build, eviction into the store,
fused search + attention with the residual estimate) on a tiny random store with the model's dtype, so every
kernel signature the real run needs is compiled (or loaded from the cache) here.
"""

from __future__ import annotations

import sys
import time

import torch

from .config import RetrievalConfig

#: keys of the warm-up store: above ``exact_below`` so the configured index (not ``flat``) is built
_MIN_KEYS = 64


def compile_kernels(config: RetrievalConfig, dtype: torch.dtype, n_kv_heads: int = 2, group: int = 2,
                    head_dim: int = 64, verbose: bool = True) -> float:
    """Run ``config``'s CPU store once on random ``dtype`` keys/values; returns the seconds it took (a second
    or two when the kernels are already in numba's on-disk cache). A no-op for methods without a CPU store."""
    from .cache import CPUStore

    if config.method != "retrieval":
        return 0.0
    t0 = time.perf_counter()
    if verbose:
        print("compiling the CPU kernels (first run only; cached afterwards) ...", end="", file=sys.stderr, flush=True)
    n = max(_MIN_KEYS, config.exact_below, 2 * config.top_k)
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(n_kv_heads, n, head_dim, generator=g).to(dtype)
    values = torch.randn(n_kv_heads, n, head_dim, generator=g).to(dtype)
    train = torch.randn(n_kv_heads * group, 4 * n_kv_heads, head_dim, generator=g).to(dtype)
    store = CPUStore(config)
    store.build(keys, values, train)
    store.add(keys[:, :1].clone(), values[:, :1].clone(), n_kv_heads * group)  # a token leaving the window
    queries = torch.randn(n_kv_heads * group, 1, head_dim, generator=g).numpy()
    for _ in range(2):  # the second call hands out its tasks by the first's costs (another small kernel)
        store.attend(queries, group, head_dim ** -0.5, config.top_k, **store.search_budget(config))
    dt = time.perf_counter() - t0
    if verbose:
        print(f" {dt:.1f} s", file=sys.stderr, flush=True)
    return dt
