"""Exact merge of partial attentions computed over disjoint key sets, via their log-sum-exps."""

from __future__ import annotations

import torch


def merge_partial(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor):
    """Combine two normalised partial attentions into the attention over the union of their keys.

    out_* ``[..., D]`` and lse_* ``[...]`` (log-sum-exp of the scaled scores of that part; ``-inf`` when the
    part is empty). Computed in float32 with the maximum subtracted. Returns ``(out [..., D], lse [...])``
    in float32; where both parts are empty the output is 0 and the lse ``-inf``.
    """
    out_a, out_b = out_a.float(), out_b.float()
    lse_a, lse_b = lse_a.float(), lse_b.float()
    m = torch.maximum(lse_a, lse_b)
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    wa = torch.exp(lse_a - m_safe)  # exp(-inf) = 0 for an empty part
    wb = torch.exp(lse_b - m_safe)
    denom = wa + wb
    safe = torch.where(denom > 0, denom, torch.ones_like(denom))
    out = (wa.unsqueeze(-1) * out_a + wb.unsqueeze(-1) * out_b) / safe.unsqueeze(-1)
    lse = torch.where(denom > 0, m_safe + torch.log(safe), torch.full_like(m, float("-inf")))
    return out, lse


def merge_reference(scores_a, values_a, scores_b, values_b):
    """Plain reference: softmax over the concatenated (scaled) scores. scores [..., n], values [..., n, D]."""
    s = torch.cat([scores_a, scores_b], -1).double()
    v = torch.cat([values_a, values_b], -2).double()
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse.unsqueeze(-1).where(torch.isfinite(lse.unsqueeze(-1)), torch.zeros_like(lse.unsqueeze(-1))))
    p = torch.where(torch.isfinite(s), p, torch.zeros_like(p))
    out = (p.unsqueeze(-1) * v).sum(-2)
    return out, lse
