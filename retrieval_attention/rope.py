"""Rotary position embedding (RoPE) helpers: index-training queries moved to the decode position.

The keys in the CPU store and the queries that train the roar graph are post-RoPE vectors. A prompt query at
position ``p`` carries the rotation of ``p``; every decode query carries the rotation of a position past the
prompt. Training the graph on the prompt's queries as they are therefore trains it on phases the decode queries
never have: in the slowly rotating channel pairs, a query from early in the prompt points elsewhere than the same
query at the decode position (docs/BENCHMARKS.md, session 14).

:func:`align_to_decode` rotates each training query by RoPE from its own position to the first decode position
(rotations of one channel pair compose: ``R(t - p) R(p) = R(t)``), exactly as if its token had been there, with
targets spread uniformly over ``spread`` positions around it. The spread matters: at a single target position,
the queries' fast-rotating channel pairs all line up and the training queries collapse onto few keys (SmolLM2 8K,
layer 8, query head 1: 6 distinct top-1 keys among 4,096 queries instead of 1,078 as captured, and 83% of the
decode queries' top-100 keys in some training query's top-64 instead of 98%; ``docs/bench/scripts/phase_alignment.py``).
A spread of 64 positions scrambles those channels, as successive decode steps do, while the slow ones stay
aligned (97.5% covered there).

Layout: HF's ``rotate_half`` convention (``x * cos + rotate_half(x) * sin``, frequencies repeated over the two
halves of the head dimension), used by the Llama and Gemma-3 families; tests check it against each supported
family's own ``apply_rotary_pos_emb``.
"""

from __future__ import annotations

import torch

from .gpumem import to_device_async


def _rotary_module(model):
    base = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", model)
    return getattr(base, "rotary_emb", None)


def rope_inv_freq(model, layer_idx: int) -> torch.Tensor | None:
    """Inverse frequencies ``[head_dim / 2]`` float32 (CPU) of the RoPE that attention layer ``layer_idx`` of a
    transformers causal LM applies, from its rotary embedding module (``inv_freq``, or ``<layer type>_inv_freq``
    where layer types rotate differently, e.g. Gemma-3's sliding and full attention). None when the model has
    no rotary embedding this can read."""
    return _inv_freq_of(_rotary_module(model), model.config, layer_idx)


def rope_inv_freq_from_config(model_config) -> dict[int, torch.Tensor | None]:
    """:func:`rope_inv_freq` of every layer of the architecture ``model_config`` describes, without weights (the
    model is laid out on the meta device; only its rotary embedding is built, on the CPU)."""
    import transformers as tf

    with torch.device("meta"):
        model = tf.AutoModelForCausalLM.from_config(model_config)
    rot = _rotary_module(model)
    n_layers = model.config.get_text_config(decoder=True).num_hidden_layers
    if rot is None:
        return {i: None for i in range(n_layers)}
    rot = type(rot)(config=model.config.get_text_config(decoder=True))  # real buffers
    return {i: _inv_freq_of(rot, model.config, i) for i in range(n_layers)}


def _inv_freq_of(rot, model_config, layer_idx: int) -> torch.Tensor | None:
    if rot is None:
        return None
    cfg = model_config.get_text_config(decoder=True)
    types = getattr(cfg, "layer_types", None)
    inv = None
    if types is not None and layer_idx < len(types):
        inv = getattr(rot, f"{types[layer_idx]}_inv_freq", None)
    if inv is None:
        inv = getattr(rot, "inv_freq", None)
    if not isinstance(inv, torch.Tensor) or inv.device.type == "meta":
        return None
    return inv.detach().float().cpu()


def rotate(x: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """``x [..., m, D]`` rotated by RoPE over ``delta [m]`` positions (any sign; rotate_half layout), in float64
    arithmetic, returned in ``x``'s dtype and device. ``inv_freq [D / 2]``."""
    D = x.shape[-1]
    if inv_freq.numel() * 2 != D:
        raise ValueError(f"RoPE frequencies for head_dim {2 * inv_freq.numel()}, vectors have {D}")
    # to_device_async: a blocking copy to a GPU would wait for its queued work (the prefill's)
    ang = (to_device_async(delta.to(torch.float64), x.device).unsqueeze(-1)
           * to_device_async(inv_freq.to(torch.float64), x.device))  # [m, D/2]
    ang = torch.cat([ang, ang], dim=-1)
    xd = x.to(torch.float64)
    half = D // 2
    rot = torch.cat([-xd[..., half:], xd[..., :half]], dim=-1)
    return (xd * ang.cos() + rot * ang.sin()).to(x.dtype)


def decode_targets(n_tokens: int, m: int, spread: int, seed: int) -> torch.Tensor:
    """``m`` target positions (float64) uniform in ``[n_tokens - spread / 2, n_tokens + spread / 2)``
    (deterministic in ``seed``); all ``n_tokens`` when ``spread`` is 0."""
    if spread <= 0:
        return torch.full((m,), float(n_tokens), dtype=torch.float64)
    g = torch.Generator().manual_seed(int(seed))
    return n_tokens + (torch.rand(m, generator=g, dtype=torch.float64) - 0.5) * spread


def align_to_decode(queries: torch.Tensor, positions: torch.Tensor, n_tokens: int, inv_freq: torch.Tensor,
                    spread: int, seed: int = 0) -> torch.Tensor:
    """Training queries ``[H, m, D]`` (post-RoPE, query ``j`` at prompt position ``positions[j]``) moved to the
    decode phase: each rotated to a target drawn by :func:`decode_targets` around ``n_tokens`` (the first
    decode position). Same shape, dtype and device."""
    m = queries.shape[-2]
    if positions.numel() != m:
        raise ValueError(f"{positions.numel()} positions for {m} queries")
    delta = decode_targets(n_tokens, m, spread, seed) - positions.to(torch.float64).cpu()
    return rotate(queries, delta, inv_freq)
