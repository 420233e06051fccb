"""Exact attention over the static (sink + window) tokens on the model's device, with log-sum-exp."""

from __future__ import annotations

import torch


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float, valid: torch.Tensor | None):
    """Exact attention returning its log-sum-exp, in float32, GQA-aware.

    q ``[B, Hq, L, D]``; k, v ``[B, Hkv, S, D]`` (Hq a multiple of Hkv); ``valid`` boolean, broadcastable to
    ``[B, 1, L, S]`` (True = attend), or None. Returns ``out [B, Hq, L, D] float32`` and
    ``lse [B, Hq, L] float32``; rows with no valid key give out 0 and lse ``-inf``.
    """
    B, Hq, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = Hq // Hkv
    qg = q.float().reshape(B, Hkv, G * L, D)
    s = torch.matmul(qg, k.float().transpose(-1, -2)) * scaling  # [B, Hkv, G*L, S]
    s = s.view(B, Hkv, G, L, S)
    if valid is not None:
        valid = valid.reshape(valid.shape[0], 1, 1, L, S) if valid.dim() == 4 else valid
        s = s.masked_fill(~valid, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # [B, Hkv, G, L]
    finite = torch.isfinite(lse)
    p = torch.exp(s - torch.where(finite, lse, torch.zeros_like(lse)).unsqueeze(-1))
    out = torch.matmul(p.view(B, Hkv, G * L, S), v.float()).view(B, Hkv, G, L, D)
    out = torch.where(finite.unsqueeze(-1), out, torch.zeros_like(out))
    return out.reshape(B, Hq, L, D), lse.reshape(B, Hq, L)
