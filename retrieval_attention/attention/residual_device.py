"""The residual estimate (:mod:`.residual`) computed on the model's device by the lean decode loop.

The CPU estimate draws ``m`` stratified key ids per KV head and step from the store and reads those rows from
host memory at random: on a 16-core host that is ~10% of the decode step's CPU time (5.7 ms/token at 128K
for the Llama-3-8B shape, docs/BENCHMARKS.md session 11), spent while the GPU idles. Here the same draws
(:func:`~.residual_kernels.draw_ids` with the store's ``n``, seed and KV head, query 0) are taken once and their
key / value rows held on the device (``[Hkv, m + k, D]`` float32 per layer and sequence: ~3 MB per layer of
the 8B shape, 0.5% of its 128K KV). Each step scores them there, drops the ids the CPU search retrieved, and
merges the weighted partial like the CPU one. The sample is redrawn every ``residual_refresh`` steps (and every
step while the store is small enough for the exact residual); the keys the store gained since the draw (at most
``residual_refresh`` per KV head, the tokens that left the window) are not in it: the CPU search call adds their
exact attention instead (``CPUStore.attend(residual_from=n at the draw)``, a few rows per query head).

With a redraw every step the estimate is the CPU one (the same ids, weight and exclusions; tests compare
them). Between redraws each step's estimate is still unbiased (the sample does not depend on the queries); its
errors are correlated across those steps instead of independent. Left out, the keys added since the draw made
the 8K agreement measurably worse (KL +20% over three seeds, docs/BENCHMARKS.md session 13).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..index.bf16 import as_float32
from .residual_kernels import draw_ids


def sample_capacity(m: int, k: int) -> int:
    """Rows of a device sample for ``m`` draws and top-``k`` retrieval: the exact residual (``n <= k + m``)
    holds every key."""
    return m + k


def draw_sample(keys: np.ndarray, values: torch.Tensor, n: int, m: int, k: int, seed: int):
    """The residual's draws of one store and their rows, as :func:`.residual.residual_attention` takes them.

    keys ``[Hkv, >= n, D]`` numpy float32 or uint16 (bfloat16 bits); values ``[Hkv, >= n, Dv]`` torch. Returns
    ``ids [Hkv, C] int32`` (-1 padding, ``C = m + k``: :func:`sample_capacity`), the rows of the first ``cnt``
    ids, ``k_rows [Hkv, cnt, D]`` and ``v_rows [Hkv, cnt, Dv]`` float32 torch, and the log weight: ``cnt = m``
    draws with weight ``n / m``, or for the exact residual (``n <= k + m``) every key, ``cnt = n``, weight 1."""
    Hkv, D, Dv = keys.shape[0], keys.shape[2], values.shape[2]
    ids = np.full((Hkv, sample_capacity(m, k)), -1, np.int64)
    exact = n <= k + m
    cnt = n if exact else m
    if exact:
        ids[:, :n] = np.arange(n)
    else:
        buf = np.empty(m, np.int64)
        for h in range(Hkv):
            draw_ids(seed, n, h, 0, m, buf)  # query 0: the draws of a one-token decode step
            ids[h, :m] = buf
    heads = np.repeat(np.arange(Hkv), cnt)
    rows = ids[:, :cnt].reshape(-1)
    k_rows = torch.from_numpy(as_float32(keys[heads, rows])).view(Hkv, cnt, D)
    v_rows = values[torch.from_numpy(heads), torch.from_numpy(rows)].float().view(Hkv, cnt, Dv)
    log_w = 0.0 if exact else math.log(n / m)
    return torch.from_numpy(ids.astype(np.int32)), k_rows, v_rows, log_w


def residual_partial(q: torch.Tensor, k_rows: torch.Tensor, v_rows: torch.Tensor, ids: torch.Tensor,
                     log_w: torch.Tensor, topk_ids: torch.Tensor, scaling: float):
    """Residual partial attention of a sample (any device; no host syncs, so CUDA graphs can capture it).

    q ``[B, Hq, L, D]`` float32; k_rows / v_rows ``[B, Hkv, C, D]`` float32; ids ``[B, Hkv, C]`` int32 (-1 =
    empty row); log_w ``[B]`` float32; topk_ids ``[B, Hq, L, k]`` int32 (the retrieved ids, -1 padding).
    A sampled id that the query head retrieved contributes nothing (it is in the retrieved partial). Returns
    ``out [B, Hq, L, Dv]`` and ``lse [B, Hq, L]`` float32 (0 and -inf where nothing contributes), the lse
    including the weight, for :func:`.merge.merge_partial`."""
    B, Hq, L, D = q.shape
    Hkv, C = k_rows.shape[1], k_rows.shape[2]
    G = Hq // Hkv
    s = torch.matmul(q.reshape(B, Hkv, G * L, D), k_rows.transpose(-1, -2)) * scaling  # [B, Hkv, G L, C]
    tk = topk_ids.reshape(B, Hkv, G * L, 1, -1)
    drop = (ids.view(B, Hkv, 1, C, 1) == tk).any(-1) | (ids < 0).view(B, Hkv, 1, C)
    s = s.masked_fill(drop, float("-inf"))
    mx = s.amax(-1, keepdim=True)
    mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    w = torch.exp(s - mx)
    z = w.sum(-1, keepdim=True)
    nz = z > 0
    out = torch.matmul(w, v_rows) / torch.where(nz, z, torch.ones_like(z))
    lse = torch.where(nz, mx + torch.log(torch.where(nz, z, torch.ones_like(z))) + log_w.view(B, 1, 1, 1),
                      torch.full_like(z, float("-inf")))
    return out.view(B, Hq, L, -1), lse.view(B, Hq, L)
