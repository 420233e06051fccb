"""transformers integration: the ``retrieval_attention`` attention function (registered with
``AttentionInterface``) and helpers to switch a model to it and build its cache.

The cache layer and the attention function meet through a thread-local: ``RetrievalLayer.update`` marks
itself active, and the attention call that immediately follows in the same layer picks it up. Layers
without a :class:`~retrieval_attention.cache.RetrievalLayer` (sliding-window, dense, or a plain cache) run
stock SDPA, so the implementation is safe to leave enabled.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import numpy as np
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .attention.chunked import causal_prefix_attention, key_padding, padded_causal_prefix_attention
from .attention.device import attention_with_lse
from .attention.merge import merge_partial
from .config import RetrievalConfig

ATTN_IMPLEMENTATION = "retrieval_attention"
_ACTIVE = threading.local()


def set_active_layer(layer) -> None:
    _ACTIVE.layer = layer


def _pop_active_layer(layer_idx):
    layer = getattr(_ACTIVE, "layer", None)
    _ACTIVE.layer = None
    if layer is not None and layer.layer_idx == layer_idx:
        return layer
    return None


def padding_from_mask(attention_mask, batch: int, device) -> torch.Tensor:
    """Left-padding length of each sequence ``[B]`` from a 4D SDPA mask (None = no padding)."""
    if attention_mask is None or attention_mask.dim() != 4:
        return torch.zeros(batch, dtype=torch.long, device=device)
    last = attention_mask[:, 0, -1, :]  # the last query is always a real token under left padding
    ok = last if last.dtype == torch.bool else last == 0
    return torch.argmax(ok.to(torch.int8), dim=-1).long()


def chunked_causal_attention(module, query, key, value, attention_mask, scaling, chunk, **kwargs):
    """Exact causal SDPA that never materialises a [T, T] score matrix.

    query ``[B, Hq, Tq, D]``, key/value ``[B, Hkv, Tk, D]`` (the last Tq keys belong to the queries).
    Without a mask (no padding) and Tq == Tk, one ``is_causal`` SDPA call runs a fused flash kernel (CPU and
    CUDA), which is memory-efficient by construction. Without a mask and Tk > Tq (a chunk of layer-by-layer
    prefill) the prefix and the causal square run as two fused calls merged by log-sum-exp; a ``[B, 1, 1, Tk]``
    key-padding mask does the same per sequence. With an explicit mask SDPA falls back to kernels that
    build the scores, so queries go ``chunk`` at a time. Returns ``[B, Tq, Hq, D]`` like transformers.
    """
    Tq, Tk = query.shape[2], key.shape[2]
    kwargs.pop("is_causal", None)
    if Tq > 1 and Tk > Tq and attention_mask is None:
        # a chunk after earlier tokens (layer-by-layer prefill): prefix + causal square, merged by log-sum-exp
        return causal_prefix_attention(query, key, value, scaling).transpose(1, 2).contiguous()
    pad = key_padding(attention_mask, Tq)
    if pad is not None:  # [B, 1, 1, Tk] key-padding mask (layer-by-layer prefill of a left-padded batch)
        return padded_causal_prefix_attention(query, key, value, scaling, pad).transpose(1, 2).contiguous()
    if Tq <= chunk or (attention_mask is None and Tq == Tk):
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)[0]
    outs = []
    offset = Tk - Tq
    for q0 in range(0, Tq, chunk):
        q1 = min(q0 + chunk, Tq)
        kend = offset + q1
        if attention_mask is None:
            m = _causal_block(q0, q1, offset, kend, query.device)
        else:
            m = attention_mask[:, :, q0:q1, :kend]
        o, _ = sdpa_attention_forward(
            module, query[:, :, q0:q1], key[:, :, :kend], value[:, :, :kend], m, scaling=scaling, is_causal=False, **kwargs
        )
        outs.append(o)
    return torch.cat(outs, dim=1)


def _causal_block(q0, q1, offset, kend, device):
    qpos = torch.arange(q0, q1, device=device).view(-1, 1) + offset
    kpos = torch.arange(kend, device=device).view(1, -1)
    return (kpos <= qpos).view(1, 1, q1 - q0, kend)


def retrieval_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention function for ``AttentionInterface`` (shapes as transformers: q ``[B,Hq,L,D]``, k/v ``[B,Hkv,S,D]``)."""
    layer = _pop_active_layer(getattr(module, "layer_idx", None))
    if layer is None:
        Tq, Tk = query.shape[2], key.shape[2]
        if Tq > 1 and ((attention_mask is None and Tk > Tq) or key_padding(attention_mask, Tq) is not None):
            # a prefill chunk after earlier tokens (dense layer / plain cache): stock SDPA would misalign is_causal
            scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
            return chunked_causal_attention(module, query, key, value, attention_mask, scaling, Tq, **kwargs), None
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if kwargs.get("softcap") is not None:
        raise NotImplementedError("attention logit soft-capping is not supported by retrieval attention")
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    if not layer.offloaded:
        out = chunked_causal_attention(module, query, key, value, attention_mask, scaling, layer.config.prefill_chunk, **kwargs)
        if layer.defer_offload:  # layer-by-layer prefill: the driver offloads after the layer's last chunk
            layer.collect_prefill_queries(query)
        elif layer.should_offload():
            layer.offload_prefill(query, padding_from_mask(attention_mask, query.shape[0], query.device))
        return out, None
    return decode_attention(layer, query, scaling).transpose(1, 2).contiguous(), None


def decode_attention(layer, query: torch.Tensor, scaling: float) -> torch.Tensor:
    """Static-token attention on the device merged with retrieved-token attention on the CPU.

    query ``[B, Hq, L, D]`` (L new tokens, already appended to the window). Returns ``[B, Hq, L, D]`` in query's dtype.
    """
    cfg = layer.config
    B, Hq, L, D = query.shape
    dev = query.device
    # 1. queries to the CPU first (the only thing the CPU part waits for), then queue the device part
    cuda = dev.type == "cuda"
    if layer.retrieve:
        q_host = torch.empty((B, Hq, L, D), dtype=torch.float32, pin_memory=cuda)
        q_host.copy_(query.detach().float(), non_blocking=cuda)
        if cuda:
            copied = torch.cuda.Event()
            copied.record()
    k_s, v_s = layer.static_kv()
    S = k_s.shape[2]
    valid = layer.static_valid  # [B, S]
    # causal among the L new tokens, which are the last L window columns
    col = torch.arange(S, device=dev).view(1, S)
    row = torch.arange(L, device=dev).view(L, 1)
    causal = col <= (S - L + row)  # [L, S]
    mask = valid.view(B, 1, 1, S) & causal.view(1, 1, L, S)
    out_d, lse_d = attention_with_lse(query, k_s, v_s, scaling, mask)
    if not layer.retrieve:
        return out_d.to(query.dtype)
    # 2. CPU retrieval + attention for each sequence while the device works
    if cuda:
        copied.synchronize()
    out_c = torch.zeros((B, Hq, L, D), dtype=torch.float32)
    lse_c = torch.full((B, Hq, L), float("-inf"), dtype=torch.float32)
    group = Hq // k_s.shape[1]
    for b, store in enumerate(layer.stores):
        if store.index is None or store.n == 0:
            continue
        if L > 1:
            # several new tokens at once (a prompt continued after offload, e.g. a question on a persistent
            # context): they are prompt tokens, so they attend exactly, like prefill
            out_c[b], lse_c[b] = store.exact_attention(q_host[b], group, scaling)
            continue
        t0 = time.perf_counter()
        # fused top-k retrieval + attention over the retrieved keys: its time is all booked as search_s
        o, s, n_scanned = store.attend(q_host[b].numpy(), group, scaling, cfg.top_k, **store.search_budget(cfg))
        out_c[b], lse_c[b] = torch.from_numpy(o), torch.from_numpy(s)
        st = layer.stats
        st.search_s += time.perf_counter() - t0
        n_pairs = int(np.prod(n_scanned.shape))
        st.n_searches += n_pairs
        st.n_scanned += int(n_scanned.sum())
        st.n_cpu_keys_at_search += n_pairs * store.n
    # 3. exact merge (fp32, max-subtracted)
    out, _ = merge_partial(out_d, lse_d, out_c.to(dev, non_blocking=cuda), lse_c.to(dev, non_blocking=cuda))
    return out.to(query.dtype)


_REGISTERED = False


def register() -> None:
    """Register ``retrieval_attention`` with transformers' attention and mask interfaces (idempotent)."""
    global _REGISTERED
    if not _REGISTERED:
        AttentionInterface.register(ATTN_IMPLEMENTATION, retrieval_attention_forward)
        AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
        _REGISTERED = True


@contextmanager
def enable(model):
    """Switch ``model`` to the ``retrieval_attention`` implementation; restores the previous one on exit."""
    register()
    prev = model.config._attn_implementation
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    try:
        yield model
    finally:
        model.set_attn_implementation(prev)


def make_cache(model, config: RetrievalConfig | None):
    """The cache for ``config.method``: ``None``-equivalent plain ``DynamicCache`` for ``full``, else a RetrievalCache."""
    from transformers import DynamicCache

    from .cache import RetrievalCache
    from .models import check_supported

    check_supported(model.config)
    if config is None or config.method == "full":
        return DynamicCache(config=model.config)
    rope = None
    if config.align_train_queries and config.method == "retrieval":
        from .rope import rope_inv_freq

        n_layers = model.config.get_text_config(decoder=True).num_hidden_layers
        rope = {i: rope_inv_freq(model, i) for i in range(n_layers)}
        if all(f is None for f in rope.values()):
            import warnings

            warnings.warn("align_train_queries: no RoPE frequencies could be read from this model's rotary embedding; "
                          "the index trains on the prompt's queries as they are (lower recall per key scanned). Pass "
                          "align_train_queries=False to silence this", RuntimeWarning, stacklevel=2)
    return RetrievalCache(model.config, config, rope_inv_freq=rope)
