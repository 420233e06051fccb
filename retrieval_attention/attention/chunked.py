"""Exact causal attention of a query chunk over a long prefix, without a ``[Tq, Tk]`` mask.

Layer-by-layer prefill runs each layer over the prompt ``chunk`` tokens at a time: the queries of a chunk
attend to every earlier token of the layer plus the chunk itself, causally. That is split into two unmasked
problems that fused (flash) kernels solve with their log-sum-exp, merged exactly:

* the prefix (all earlier keys): every query sees every key, no mask;
* the chunk's own keys: a causal square (``is_causal``).
"""

from __future__ import annotations

import torch

from .device import attention_with_lse
from .merge import merge_partial

# score elements (fp32) of one sub-chunk of the reference fallback: bounds its memory to ~1 GiB
FALLBACK_SCORE_ELEMENTS = 1 << 28
_FLASH_CUDA_DTYPES = (torch.float16, torch.bfloat16)


def causal_prefix_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float) -> torch.Tensor:
    """Causal attention where the queries are the last ``Tq`` of ``Tk`` positions, no padding.

    query ``[B, Hq, Tq, D]``, key/value ``[B, Hkv, Tk, D]`` with ``Tk >= Tq`` (Hq a multiple of Hkv).
    Returns ``[B, Hq, Tq, D]`` in query's dtype.
    """
    Tq, Tk = query.shape[2], key.shape[2]
    if Tk < Tq:
        raise ValueError(f"causal_prefix_attention needs at least as many keys as queries (got {Tk} < {Tq})")
    P = Tk - Tq
    o2, l2 = attention_lse(query, key[:, :, P:], value[:, :, P:], scaling, causal=True)
    if P == 0:
        return o2.to(query.dtype)
    o1, l1 = attention_lse(query, key[:, :, :P], value[:, :, :P], scaling, causal=False)
    out, _ = merge_partial(o1, l1, o2, l2)
    return out.to(query.dtype)


def attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float, causal: bool):
    """Exact attention with its log-sum-exp through a fused kernel when one applies.

    q ``[B, Hq, L, D]``; k, v ``[B, Hkv, S, D]``; ``causal`` needs ``L == S`` (a causal square).
    Returns ``out [B, Hq, L, D]`` (q's dtype or float32) and ``lse [B, Hq, L]`` float32.
    """
    if causal and q.shape[2] != k.shape[2]:
        raise ValueError(f"a causal block must be square (got {q.shape[2]} queries, {k.shape[2]} keys)")
    try:
        return _fused_attention_lse(q, k, v, scaling, causal)
    except (RuntimeError, NotImplementedError):  # unsupported dtype / head dim / device: exact reference
        return _reference_attention_lse(q, k, v, scaling, causal)


def _fused_attention_lse(q, k, v, scaling, causal):
    B, Hq, L, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    if G > 1 and not causal:
        # GQA without a mask: fold each KV head's query group into the query length (no key copies)
        qf = q.reshape(B, Hkv, G * L, D)
        out, lse = _fused_call(qf, k, v, scaling, False)
        return out.reshape(B, Hq, L, -1), lse[..., : G * L].reshape(B, Hq, L)
    if G > 1:  # causal square: its keys are only the chunk's own, cheap to repeat
        k = k.repeat_interleave(G, dim=1)
        v = v.repeat_interleave(G, dim=1)
    out, lse = _fused_call(q, k, v, scaling, causal)
    return out, lse[..., :L]


def _fused_call(q, k, v, scaling, causal):
    """One fused-kernel call with equal head counts -> (out, lse float32)."""
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scaling)
        return out, lse.float()
    if q.device.type == "cuda":
        if q.dtype in _FLASH_CUDA_DTYPES:
            res = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scaling)
        else:
            res = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, causal, scale=scaling)
        return res[0], res[1].float()
    raise NotImplementedError(f"no fused attention with log-sum-exp on {q.device.type}")


def _reference_attention_lse(q, k, v, scaling, causal):
    """Exact fp32 attention in query sub-chunks (bounded score memory); shapes as :func:`attention_lse`."""
    B, Hq, L, D = q.shape
    S = k.shape[2]
    step = max(1, FALLBACK_SCORE_ELEMENTS // max(1, B * Hq * S))
    outs, lses = [], []
    for a in range(0, L, step):
        b = min(a + step, L)
        mask = None
        if causal:
            kend = b  # causal square: query i sees keys <= i
            mask = (torch.arange(kend, device=q.device).view(1, -1) <= torch.arange(a, b, device=q.device).view(-1, 1))
            o, s = attention_with_lse(q[:, :, a:b], k[:, :, :kend], v[:, :, :kend], scaling, mask.view(1, 1, b - a, kend))
        else:
            o, s = attention_with_lse(q[:, :, a:b], k, v, scaling, mask)
        outs.append(o)
        lses.append(s)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def key_padding(attention_mask: torch.Tensor | None, query_len: int) -> torch.Tensor | None:
    """Left-padding lengths ``[B]`` when ``attention_mask`` is a key-padding mask ``[B, 1, 1, Tk]`` (bool,
    True = attend) given with several queries, as layer-by-layer prefill passes it; else None."""
    if attention_mask is None or attention_mask.dim() != 4 or attention_mask.shape[-2] != 1 or query_len <= 1:
        return None
    if attention_mask.dtype != torch.bool:
        raise ValueError("a [B, 1, 1, Tk] key-padding mask must be boolean (True = attend)")
    return torch.argmax(attention_mask[:, 0, 0, :].to(torch.int8), dim=-1)


def padded_causal_prefix_attention(query, key, value, scaling, pad: torch.Tensor) -> torch.Tensor:
    """:func:`causal_prefix_attention` under left padding: ``pad [B]`` leading key positions of each
    sequence are never attended; queries at padding positions get a zero output. Shapes as there."""
    B, Hq, Tq, D = query.shape
    P = key.shape[2] - Tq
    out = torch.zeros_like(query)
    for b, p in enumerate(pad.tolist()):
        q0 = max(0, p - P)  # first query of this sequence that is a real token
        if q0 >= Tq:
            continue
        sl = slice(b, b + 1)
        out[sl, :, q0:] = causal_prefix_attention(query[sl, :, q0:], key[sl, :, p:], value[sl, :, p:], scaling)
    return out
