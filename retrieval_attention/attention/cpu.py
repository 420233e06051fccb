"""Attention over the keys retrieved from the CPU store, with log-sum-exp."""

from __future__ import annotations

import numpy as np
import torch


def retrieved_attention(scores: np.ndarray, ids: np.ndarray, values: torch.Tensor, scaling: float):
    """Softmax attention over retrieved keys.

    ``scores [Hq, L, k]`` raw inner products q.key from the index (``-inf`` padding), ``ids [Hq, L, k]``
    (``-1`` padding), ``values [Hq, L, k, D]`` the values of the retrieved ids (any float dtype).
    Returns ``out [Hq, L, D] float32`` and ``lse [Hq, L] float32`` (``-inf`` where nothing was retrieved).
    """
    s = torch.from_numpy(np.ascontiguousarray(scores, dtype=np.float32)) * scaling
    v = values.float()
    s = s.masked_fill(torch.from_numpy(ids < 0), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    finite = torch.isfinite(lse)
    p = torch.exp(s - torch.where(finite, lse, torch.zeros_like(lse)).unsqueeze(-1))
    out = torch.einsum("hlk,hlkd->hld", p, v)
    out = torch.where(finite.unsqueeze(-1), out, torch.zeros_like(out))
    return out, lse
