"""Layer-by-layer prefill: the whole prompt through layer 0, then layer 1, ... (issue #5).

A normal forward keeps every layer's KV of the prompt on the device until the forward ends. Here all ``T``
tokens go through one decoder layer (``chunk`` tokens at a time, each chunk attending to all earlier tokens
of that layer and causally to itself) before the next layer starts, so the device holds one layer's KV plus
the hidden states ``[B, T, hidden]``; MLP activations are bounded by the chunk. With a
:class:`~retrieval_attention.cache.RetrievalCache` each retrieval layer offloads to the CPU store after its
last chunk (index builds on CUDA run in a background thread, overlapping the next layers).

The model's own modules run unchanged (embeddings, rotary embedding, decoder layers, final norm, lm_head);
attention goes through the ``retrieval_attention`` implementation, whose chunk attention never builds a
``[Tq, Tk]`` mask. Llama-family decoder-only models only (see :data:`LAYERWISE_MODEL_TYPES`).
"""

from __future__ import annotations

import inspect

import torch

from .gpumem import cuda_headroom

# decoder-only models whose decoder layers take (hidden, attention_mask, position_ids, cache /
# past_key_values, use_cache, position_embeddings) and run input norm -> attention -> post norm -> MLP
LAYERWISE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
DEFAULT_CHUNK = 8192
#: ``offload_hidden=None``: the hidden states go to host memory when they would take more than this share of
#: the device memory still free under the process's budget (the layer's KV, activations and a background index
#: build need the rest; 512K tokens of an 8B model are 4 GiB of hidden states, a 24 GB budget leaves ~8 GiB)
HIDDEN_SHARE_OF_HEADROOM = 0.25
_DECODER_PARTS = ("embed_tokens", "layers", "norm", "rotary_emb")
_LAYER_PARTS = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")
_ATTN_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj")


def unsupported_reason(model) -> str | None:
    """Why layer-by-layer prefill / the lean decode loop cannot run ``model`` (None when they can)."""
    cfg = model.config
    mt = getattr(cfg, "model_type", None)
    if mt not in LAYERWISE_MODEL_TYPES:
        return (f"model type {mt!r} is not supported by layer-by-layer prefill / the lean decode loop "
                f"(supported: {', '.join(LAYERWISE_MODEL_TYPES)}; e.g. gemma3 has sliding layers and scaled embeddings)")
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types is not None:
        if any(t != "full_attention" for t in layer_types):
            return f"{mt} model with non-full attention layers ({sorted(set(layer_types))}) is not supported"
    elif getattr(cfg, "sliding_window", None) is not None and (mt == "mistral" or getattr(cfg, "use_sliding_window", False)):
        return f"{mt} model with sliding-window attention (sliding_window={cfg.sliding_window}) is not supported"
    base = getattr(model, "model", None)
    if base is None or any(not hasattr(base, p) for p in _DECODER_PARTS) or not hasattr(model, "lm_head"):
        return f"{type(model).__name__} does not have the expected model.model.{{{','.join(_DECODER_PARTS)}}} + lm_head layout"
    for layer in base.layers:
        if any(not hasattr(layer, p) for p in _LAYER_PARTS) or any(not hasattr(layer.self_attn, p) for p in _ATTN_PARTS):
            return f"decoder layer {type(layer).__name__} does not have the expected Llama-family submodules"
    return None


def check_supported(model) -> None:
    """Raise ``NotImplementedError`` naming the model type when :func:`unsupported_reason` finds a reason."""
    reason = unsupported_reason(model)
    if reason is not None:
        raise NotImplementedError(reason)


def hidden_state_bytes(model, input_ids: torch.Tensor) -> tuple[int, torch.device]:
    """(bytes of the ``[B, T, hidden]`` states layer-by-layer prefill keeps for ``input_ids``, the model's device)."""
    emb = model.model.embed_tokens.weight
    return input_ids.numel() * model.config.hidden_size * emb.element_size(), emb.device


def offload_hidden_auto(hidden_bytes: int, dev: torch.device) -> bool:
    """Whether ``layerwise_prefill(offload_hidden=None)`` keeps the hidden states in host memory: on CUDA, when
    they exceed :data:`HIDDEN_SHARE_OF_HEADROOM` of :func:`cuda_headroom`."""
    return dev.type == "cuda" and hidden_bytes > HIDDEN_SHARE_OF_HEADROOM * cuda_headroom(dev)


def layer_call_kwargs(layer) -> tuple[str, bool]:
    """(name of the decoder layer's cache argument: ``cache`` in transformers >= 5.2x, else
    ``past_key_values``; whether the layer takes ``cache_position``)."""
    params = inspect.signature(layer.forward).parameters
    return ("cache" if "cache" in params else "past_key_values"), "cache_position" in params


def left_padding(attention_mask: torch.Tensor | None, batch: int, length: int) -> torch.Tensor | None:
    """Left-padding lengths ``[B]`` (CPU long) of a ``[B, T]`` 0/1 mask; None when nothing is padded.
    Raises ``ValueError`` for other padding (right or in the middle)."""
    if attention_mask is None:
        return None
    if attention_mask.shape != (batch, length):
        raise ValueError(f"attention_mask must be [B, T] = [{batch}, {length}], got {list(attention_mask.shape)}")
    m = attention_mask.detach().cpu().long()
    if bool((m == 1).all()):
        return None
    if bool(((m != 0) & (m != 1)).any()) or bool((m[:, 1:] < m[:, :-1]).any()):
        raise ValueError("layer-by-layer prefill supports left padding only (each mask row 0...0 1...1)")
    pad = (m == 0).sum(-1)
    if bool((pad >= length).any()):
        raise ValueError("a sequence of the batch is all padding")
    return pad


@torch.no_grad()
def layerwise_prefill(model, input_ids: torch.Tensor, cache, *, chunk: int = DEFAULT_CHUNK, attention_mask=None,
                      progress: bool = False, offload_hidden: bool | None = None) -> torch.Tensor:
    """Prefill ``cache`` with ``input_ids [B, T]`` layer by layer; returns the last position's logits
    ``[B, vocab]`` float32 (as ``model(...).logits[:, -1]``).

    ``cache``: an empty ``DynamicCache`` (also ``offloading=True``) or ``RetrievalCache``. ``chunk`` tokens
    go through a layer at a time. ``attention_mask [B, T]`` may left-pad (positions as ``generate``:
    cumulative count of real tokens). ``offload_hidden`` keeps the ``[B, T, hidden]`` states in (pinned)
    host memory and moves one chunk at a time to the device (very long prompts under a small GPU budget);
    ``None`` (default) decides by size (:func:`offload_hidden_auto`), ``False`` keeps them on the device.
    """
    from .cache import RetrievalLayer
    from .integration import enable

    check_supported(model)
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk <= 0:
        raise ValueError(f"chunk must be a positive integer, got {chunk!r}")
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [B, T] with T > 0, got {list(input_ids.shape)}")
    if cache.get_seq_length() != 0:
        raise ValueError("layer-by-layer prefill needs an empty cache")
    base = model.model
    B, T = input_ids.shape
    dev = base.embed_tokens.weight.device
    input_ids = input_ids.to(dev)
    pad = left_padding(attention_mask, B, T)
    if pad is None:
        positions = torch.arange(T, device=dev).view(1, T)
        key_mask = None
        pad = torch.zeros(B, dtype=torch.long)
    else:
        m = attention_mask.to(dev).long()
        positions = (m.cumsum(-1) - 1).masked_fill(m == 0, 0)
        key_mask = m.bool().view(B, 1, 1, T)
    cache_arg, takes_cache_position = layer_call_kwargs(base.layers[0])
    cuda = dev.type == "cuda"
    if offload_hidden is None:
        offload_hidden = offload_hidden_auto(*hidden_state_bytes(model, input_ids))
    pin = cuda and offload_hidden
    bounds = [(s, min(s + chunk, T)) for s in range(0, T, chunk)]
    # hidden states [B, T, hidden] kept as one tensor per chunk (device, or pinned host memory)
    hidden = []
    for s, e in bounds:
        h = base.embed_tokens(input_ids[:, s:e])
        if offload_hidden:
            host = torch.empty(h.shape, dtype=h.dtype, pin_memory=pin)
            host.copy_(h, non_blocking=pin)
            h = host
        hidden.append(h)
    offloading = bool(getattr(cache, "offloading", False))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(base.layers), desc="layer-by-layer prefill", unit="layer", leave=False)
    try:
        if offloading:
            cache.offloading = False  # the driver offloads each layer after its last chunk instead
        with enable(model):
            for i, layer in enumerate(base.layers):
                cl = cache.layers[i] if i < len(cache.layers) else None
                if isinstance(cl, RetrievalLayer):
                    cl.begin_layerwise(T, pad)
                for c, (s, e) in enumerate(bounds):
                    h = hidden[c].to(dev, non_blocking=True)
                    pos = positions[:, s:e]
                    kw = {cache_arg: cache, "use_cache": True, "position_ids": pos,
                          "position_embeddings": base.rotary_emb(h, pos),
                          "attention_mask": None if key_mask is None else key_mask[..., :e]}
                    if takes_cache_position:
                        kw["cache_position"] = torch.arange(s, e, device=dev)
                    out = layer(h, **kw)
                    if isinstance(out, tuple):  # older transformers return (hidden, ...)
                        out = out[0]
                    if offload_hidden:
                        hidden[c].copy_(out, non_blocking=pin)
                    else:
                        hidden[c] = out
                if isinstance(cl, RetrievalLayer):
                    cl.finish_layerwise()
                if offloading:
                    cache.offload(i, cache.only_non_sliding)
                if bar is not None:
                    bar.update(1)
            last = hidden[-1][:, -1:].to(dev)
            logits = model.lm_head(base.norm(last))[:, -1].float()
    finally:
        try:
            start_builds = getattr(cache, "start_builds", None)
            if start_builds is not None:  # waits for the asynchronous hand-offs, then starts the held builds
                start_builds()
        finally:
            if offloading:
                cache.offloading = True
                if cuda:  # as transformers' own forward leaves it: the first offloaded layer prefetched for decode
                    cache.prefetch_stream.wait_stream(torch.cuda.current_stream(dev))
                    cache.prefetch(0, cache.only_non_sliding)
            if bar is not None:
                bar.close()
    return logits
