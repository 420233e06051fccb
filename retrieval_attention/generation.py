"""High-level generation: prompt -> text with ``full``, ``retrieval`` or ``streaming`` attention.

Generation runs through the normal ``model.generate()``, except for greedy retrieval / streaming generation
on Llama-family models from a fresh cache with a prompt longer than the static tokens: that takes the fast
path, layer-by-layer prefill (:mod:`.prefill`) and the lean decode loop (:mod:`.decode_loop`), which give the
same tokens (tested) with less device memory and framework overhead. ``fast=False`` forces ``generate()``.
:func:`generate_many` answers one prompt under several configurations from one shared exact prefill (the
eval's default: three methods cost about one prefill).
This module also builds the cache, switches the attention implementation, applies the chat template and
measures.
"""

from __future__ import annotations

import inspect
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from .config import RetrievalConfig
from .integration import enable, make_cache


class PromptTooLong(ValueError):
    """The prompt (plus the tokens to generate) exceeds the model's position range."""


@dataclass
class GenerationOutput:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    stats: dict = field(default_factory=dict)


def cache_kwarg(model) -> str:
    """Name of the cache argument of ``model.forward``/``generate``: ``cache`` (transformers >= 5.2x) or
    ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def encode_prompt(tokenizer, prompt, chat: bool = True) -> list[int]:
    """Token ids of ``prompt`` (a string or a list of chat messages), through the chat template by default."""
    if isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], int):
        return list(prompt)
    if chat and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    if not isinstance(prompt, str):
        prompt = "\n".join(m["content"] for m in prompt)
    return tokenizer(prompt)["input_ids"]


def max_positions(model) -> int | None:
    """The model's trained positions (``max_position_embeddings`` of its decoder text config), or None when the
    config does not say (or the model has no config)."""
    cfg = getattr(model, "config", None)
    get_text = getattr(cfg, "get_text_config", None)
    if get_text is not None:
        cfg = get_text(decoder=True)
    return getattr(cfg, "max_position_embeddings", None)


def check_length(model, n_prompt: int, max_new_tokens: int, allow_extrapolation: bool) -> None:
    limit = max_positions(model)
    if limit and n_prompt + max_new_tokens > limit and not allow_extrapolation:
        raise PromptTooLong(
            f"prompt ({n_prompt} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's {limit} positions; "
            "shorten the prompt, or pass allow_extrapolation=True (--allow-extrapolation) to run beyond them anyway"
        )


class _Timer:
    """A streamer that timestamps the first generated token (= end of prefill) and forwards tokens."""

    def __init__(self, inner=None):
        self.inner = inner
        self.calls = 0
        self.t_first = None

    def put(self, value):
        self.calls += 1
        if self.calls == 2 and self.t_first is None:
            self.t_first = time.perf_counter()
        if self.inner is not None:
            self.inner.put(value)

    def end(self):
        if self.inner is not None:
            self.inner.end()


@torch.no_grad()
def generate_ids(
    model,
    input_ids: torch.Tensor,
    config: RetrievalConfig | None = None,
    *,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 64,
    streamer=None,
    progress: bool = False,
    cache=None,
    fast: bool | None = None,
    **gen_kwargs,
):
    """``model.generate`` with the cache and attention of ``config``. Returns ``(sequences, stats)``.

    ``cache``: continue from an existing cache (e.g. a persistent context's fork) instead of a new one.
    ``fast``: ``None`` (default) takes the fast path (layer-by-layer prefill + lean decode loop) whenever
    :func:`fast_path_reason` finds no reason against it; ``False`` always uses ``model.generate``; ``True``
    raises ``ValueError`` with the reason when the fast path cannot run.
    """
    config = config or RetrievalConfig(method="full", index="flat")
    if fast is not False:
        reason = fast_path_reason(model, config, input_ids, cache, gen_kwargs)
        if reason is None:
            return _generate_fast(model, input_ids, config, attention_mask, max_new_tokens, streamer, progress,
                                  gen_kwargs)
        if fast:
            raise ValueError(f"the fast generation path cannot run: {reason}")
    if cache is None:
        cache = make_cache(model, config)
    if progress and hasattr(cache, "set_progress"):
        cache.set_progress(True)
    timer = _Timer(streamer)
    _greedy_defaults(gen_kwargs)
    pad_id = _eos_pad(model, gen_kwargs)[1]
    gen_kwargs.pop("pad_token_id", None)
    t0 = time.perf_counter()
    ctx = enable(model) if config.method != "full" else nullcontext()
    with ctx:
        seqs = model.generate(
            input_ids.to(model.device),
            # explicit: without a mask, generate() infers one from pad_token_id, which masks real prompt
            # tokens when the pad id occurs in the prompt (e.g. SmolLM2's pad = eos = <|im_end|> of the chat
            # template) and eos_token_id=[] lifts its pad-vs-eos guard
            attention_mask=(torch.ones_like(input_ids) if attention_mask is None else attention_mask).to(model.device),
            max_new_tokens=max_new_tokens,
            streamer=timer,
            pad_token_id=pad_id,
            **{cache_kwarg(model): cache},
            **gen_kwargs,
        )
    t_end = time.perf_counter()
    if hasattr(cache, "set_progress"):
        cache.set_progress(False)
    n_new = seqs.shape[1] - input_ids.shape[1]
    return seqs, _generation_stats(config, input_ids, n_new, t0, timer.t_first or t_end, t_end, cache)


#: generation options the fast path implements (greedy decoding; the sampling ones only when unset/off)
_FAST_OPTIONS = {"do_sample", "temperature", "top_p", "top_k", "pad_token_id", "eos_token_id"}


def fast_path_reason(model, config: RetrievalConfig, input_ids: torch.Tensor, cache, gen_kwargs: dict) -> str | None:
    """Why :func:`generate_ids` must use ``model.generate`` instead of the fast path (None: it need not)."""
    from .prefill import unsupported_reason

    if config.method == "full":
        return "method 'full' keeps every token on the device: model.generate"
    if cache is not None:
        return "continuing a given cache"
    if gen_kwargs.get("do_sample"):
        return "sampling (the fast path decodes greedily)"
    other = sorted(k for k, v in gen_kwargs.items() if k not in _FAST_OPTIONS and v is not None)
    if other:
        return f"generation options {other}"
    if input_ids.shape[1] <= config.n_static:
        return f"the prompt ({input_ids.shape[1]} tokens) fits in the {config.n_static} static tokens"
    n_layers = model.config.get_text_config(decoder=True).num_hidden_layers
    if all(i in config.dense_layers for i in range(n_layers)):
        return "every layer is dense"
    return unsupported_reason(model)


def _greedy_defaults(gen_kwargs: dict) -> dict:
    """Greedy unless ``do_sample=True``: unset sampling options become None (so the model's generation
    config does not warn about or apply them). Updates and returns ``gen_kwargs``."""
    gen_kwargs.setdefault("do_sample", False)
    if not gen_kwargs["do_sample"]:
        for name in ("temperature", "top_p", "top_k"):
            gen_kwargs.setdefault(name, None)
    return gen_kwargs


def _eos_pad(model, gen_kwargs) -> tuple[list[int], int]:
    """(EOS ids, pad id) of a greedy generation, as ``model.generate`` resolves them."""
    eos = gen_kwargs.get("eos_token_id", model.generation_config.eos_token_id)
    eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    pad_id = gen_kwargs.get("pad_token_id")
    if pad_id is None:
        pad_id = model.generation_config.pad_token_id
    if pad_id is None:
        pad_id = eos[0] if eos else 0
    return eos, pad_id


class _GreedyTokens:
    """The new tokens of a greedy generation: finished sequences (EOS) are padded as ``model.generate`` pads."""

    def __init__(self, B: int, eos: list[int], pad_id: int, device, streamer=None):
        self.eos = torch.tensor(eos, dtype=torch.long, device=device)
        self.pad_id = pad_id
        self.finished = torch.zeros(B, dtype=torch.bool, device=device)
        self.streamer = streamer
        self.new: list[torch.Tensor] = []

    def emit(self, tok: torch.Tensor) -> torch.Tensor:  # tok [B, 1]
        tok = torch.where(self.finished.view(-1, 1), torch.full_like(tok, self.pad_id), tok)
        self.new.append(tok)
        if self.streamer is not None:
            self.streamer.put(tok.view(-1).cpu())
        self.finished = self.finished | torch.isin(tok.view(-1), self.eos)
        return tok

    def done(self, max_new_tokens: int) -> bool:
        return len(self.new) >= max_new_tokens or bool(self.finished.all())


def _lean_decode(model, cache, toks: _GreedyTokens, tok: torch.Tensor, max_new_tokens: int) -> None:
    """Greedy decode with :class:`~.decode_loop.LeanDecoder` from the first new token ``tok [B, 1]``."""
    from .decode_loop import LeanDecoder

    if not LeanDecoder.supports(model, cache):  # not expected after fast_path_reason: say why
        from .decode_loop import unsupported_reason

        raise RuntimeError(f"lean decode loop unavailable after prefill: {unsupported_reason(model, cache)}")
    with LeanDecoder(model, cache) as dec:
        while not toks.done(max_new_tokens):
            tok = toks.emit(dec.step(tok).argmax(-1, keepdim=True))


def _generation_stats(config, ids, n_new, t0, t_first, t_end, cache) -> dict:
    """The stats of a generation: method, token counts, prefill seconds (start ``t0`` to first token
    ``t_first``), decode tokens/s, and the cache's own stats (KV bytes, index build, searches)."""
    stats = {
        "method": config.method,
        "index": config.index if config.method == "retrieval" else None,
        "prompt_tokens": int(ids.shape[1]),
        "new_tokens": int(n_new),
        "prefill_s": t_first - t0,
        "decode_tokens_per_s": (n_new - 1) / (t_end - t_first) if n_new > 1 and t_end > t_first else float("nan"),
    }
    if hasattr(cache, "stats"):
        stats.update(cache.stats())
    else:
        stats.update(index_build_s=0.0, kv_device_bytes=_dense_bytes(cache), kv_cpu_bytes=0)
    return stats


def _generate_fast(model, input_ids, config, attention_mask, max_new_tokens, streamer, progress, gen_kwargs):
    """Greedy generation by layer-by-layer prefill + :class:`~.decode_loop.LeanDecoder` (see the module
    docstring); same return value as :func:`generate_ids`. Finished sequences (EOS) are padded like
    ``model.generate`` does, and the loop stops when all are finished."""
    from .prefill import layerwise_prefill

    dev = model.device
    eos, pad_id = _eos_pad(model, gen_kwargs)
    cache = make_cache(model, config)
    if progress:
        cache.set_progress(True)
    ids = input_ids.to(dev)
    mask = None if attention_mask is None else attention_mask.to(dev)
    toks = _GreedyTokens(ids.shape[0], eos, pad_id, dev, streamer)
    t0 = time.perf_counter()
    if streamer is not None:
        streamer.put(ids.cpu())
    logits = layerwise_prefill(model, ids, cache, chunk=config.prefill_chunk, attention_mask=mask)
    tok = toks.emit(logits.argmax(-1, keepdim=True))
    t_first = time.perf_counter()
    if progress:
        cache.set_progress(False)
    _lean_decode(model, cache, toks, tok, max_new_tokens)
    if streamer is not None:
        streamer.end()
    t_end = time.perf_counter()
    seqs = torch.cat([ids] + toks.new, dim=1)
    stats = _generation_stats(config, ids, len(toks.new), t0, t_first, t_end, cache)
    stats["generation_path"] = "fast"
    return seqs, stats


_FULL = RetrievalConfig(method="full", index="flat")


def shared_prefill_reason(model, configs: list[RetrievalConfig], input_ids: torch.Tensor,
                          gen_kwargs: dict | None = None) -> str | None:
    """Why :func:`generate_ids_many` must run ``configs`` one by one (None: one prefill serves them all).
    A ``None`` configuration means full attention (as in :func:`generate_ids`)."""
    from .prefill import unsupported_reason

    gen_kwargs = gen_kwargs or {}
    if len(configs) < 2:
        return "fewer than two methods"
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        return "a batch (the shared prefill takes one unpadded sequence)"
    configs = [_FULL if c is None else c for c in configs]
    chunks = {c.prefill_chunk for c in configs if c.method != "full"}  # full's own prefill is model.generate's
    if len(chunks) > 1:
        return f"different prefill_chunk values {sorted(chunks)}"
    trains = {c.max_train_queries for c in configs if c.method == "retrieval"}
    if len(trains) > 1:
        return f"different max_train_queries values {sorted(trains)}"
    for c in configs:
        if c.method == "full":
            if gen_kwargs.get("do_sample"):
                return "sampling"
            continue
        reason = fast_path_reason(model, c, input_ids, None, gen_kwargs)
        if reason is not None:
            return f"{c.method}: {reason}"
    return unsupported_reason(model)


@torch.no_grad()
def generate_ids_many(model, input_ids: torch.Tensor, configs: list[RetrievalConfig], *,
                      max_new_tokens: int = 64, shared: bool | None = None, **gen_kwargs) -> list[tuple]:
    """Greedy generation of one prompt ``input_ids [1, T]`` under several configurations (methods, budgets,
    indexes) from **one** exact prefill. Returns ``[(sequences, stats), ...]`` in the order of ``configs``.

    The prompt runs once layer by layer (:func:`~.prefill.layerwise_prefill`) with every layer keeping its
    keys, values and index-training queries; then each configuration takes them as its own prefill would
    have left them (``retrieval`` / ``streaming``: :meth:`~.cache.RetrievalLayer.load_prefill`, i.e. offload
    + index build; ``full``: a ``DynamicCache``) and decodes greedily from the prefill's first token
    (retrieval / streaming with the lean decode loop, full with ``model.generate``). The tokens equal
    :func:`generate_ids` for retrieval / streaming (same prefill, same offload, same decode); for ``full`` the
    prefill is the layer-by-layer one instead of ``model.generate``'s single forward (same exact attention,
    float rounding may differ). ``stats["prefill_s"]`` counts the shared prefill plus the method's own offload
    and build; ``stats["shared_prefill_s"]`` the shared part. When :func:`shared_prefill_reason` finds a
    reason (or ``shared=False``) each configuration runs through :func:`generate_ids` instead; ``shared=True``
    raises ``ValueError`` with the reason then.
    """

    from .cache import RetrievalLayer
    from .prefill import layerwise_prefill

    configs = [_FULL if c is None else c for c in configs]
    if shared is not False:
        reason = shared_prefill_reason(model, configs, input_ids, gen_kwargs)
        if reason is not None and shared:
            raise ValueError(f"one shared prefill cannot serve these configurations: {reason}")
    else:
        reason = "shared=False"
    if reason is not None:
        return [generate_ids(model, input_ids, c, max_new_tokens=max_new_tokens, **gen_kwargs) for c in configs]

    dev = model.device
    eos, pad_id = _eos_pad(model, gen_kwargs)
    ids = input_ids.to(dev)
    train = next((c.max_train_queries for c in configs if c.method == "retrieval"), RetrievalConfig.max_train_queries)
    chunk = next((c.prefill_chunk for c in configs if c.method != "full"), RetrievalConfig.prefill_chunk)
    capture = make_cache(model, RetrievalConfig(index="flat", dense_layers=(), prefill_chunk=chunk,
                                                max_train_queries=train, residual_samples=0))
    for layer in capture.layers:
        layer.keep_prefill = True
    t0 = time.perf_counter()
    logits = layerwise_prefill(model, ids, capture, chunk=chunk)
    first = logits.argmax(-1, keepdim=True)
    snaps = [layer.prefill_snapshot for layer in capture.layers]
    del capture
    shared_s = time.perf_counter() - t0

    results = []
    for config in configs:
        t1 = time.perf_counter()
        cache = make_cache(model, config)
        toks = _GreedyTokens(1, eos, pad_id, dev)
        if config.method == "full":
            for i, (k, v, _, _) in enumerate(snaps):
                cache.update(k, v, i)
            tok = toks.emit(first)
            t_first = time.perf_counter()
            if not toks.done(max_new_tokens):
                kw = _greedy_defaults({k: v for k, v in gen_kwargs.items() if k not in ("pad_token_id", "eos_token_id")})
                seq = torch.cat([ids, tok], dim=1)
                out = model.generate(seq, attention_mask=torch.ones_like(seq), max_new_tokens=max_new_tokens - 1,
                                     pad_token_id=pad_id, eos_token_id=eos,
                                     **{cache_kwarg(model): cache}, **kw)
                for j in range(seq.shape[1], out.shape[1]):
                    toks.emit(out[:, j : j + 1])
        else:
            for i, (k, v, q, pad) in enumerate(snaps):
                layer = cache.layers[i]
                if isinstance(layer, RetrievalLayer):
                    layer.load_prefill(k, v, q, pad)
                else:
                    layer.update(k, v)
            tok = toks.emit(first)
            t_first = time.perf_counter()
            _lean_decode(model, cache, toks, tok, max_new_tokens)
        t_end = time.perf_counter()
        seqs = torch.cat([ids] + toks.new, dim=1)
        stats = _generation_stats(config, ids, len(toks.new), t1 - shared_s, t_first, t_end, cache)
        stats.update(shared_prefill_s=shared_s, generation_path="shared-prefill", elapsed_s=shared_s + t_end - t1)
        results.append((seqs, stats))
        del cache
    return results


def _dense_bytes(cache) -> int:
    total = 0
    for layer in getattr(cache, "layers", []):
        k = getattr(layer, "keys", None)
        if k is not None:
            total += 2 * k.numel() * k.element_size()
    return total


def generate(
    model,
    tokenizer,
    prompt,
    config: RetrievalConfig | None = None,
    *,
    max_new_tokens: int = 64,
    chat: bool = True,
    allow_extrapolation: bool = False,
    streamer=None,
    progress: bool = False,
    **gen_kwargs,
) -> GenerationOutput:
    """Generate an answer to ``prompt`` (string, chat messages or token ids). Greedy unless ``do_sample=True``."""
    ids = encode_prompt(tokenizer, prompt, chat)
    check_length(model, len(ids), max_new_tokens, allow_extrapolation)
    seqs, stats = generate_ids(
        model,
        torch.tensor([ids]),
        config,
        max_new_tokens=max_new_tokens,
        streamer=streamer,
        progress=progress,
        **gen_kwargs,
    )
    new = seqs[0, len(ids) :].tolist()
    return GenerationOutput(tokenizer.decode(new, skip_special_tokens=True), new, len(ids), stats)


def generate_many(
    model,
    tokenizer,
    prompt,
    configs: list[RetrievalConfig],
    *,
    max_new_tokens: int = 64,
    chat: bool = True,
    allow_extrapolation: bool = False,
    **gen_kwargs,
) -> list[GenerationOutput]:
    """Greedy answers to one ``prompt`` under several configurations from one shared prefill (see
    :func:`generate_ids_many`); one :class:`GenerationOutput` per configuration, in order."""
    ids = encode_prompt(tokenizer, prompt, chat)
    check_length(model, len(ids), max_new_tokens, allow_extrapolation)
    outs = []
    for seqs, stats in generate_ids_many(model, torch.tensor([ids]), configs, max_new_tokens=max_new_tokens,
                                         **gen_kwargs):
        new = seqs[0, len(ids) :].tolist()
        outs.append(GenerationOutput(tokenizer.decode(new, skip_special_tokens=True), new, len(ids), stats))
    return outs


def generate_batch(
    model,
    tokenizer,
    prompts: list,
    config: RetrievalConfig | None = None,
    *,
    max_new_tokens: int = 64,
    chat: bool = True,
    allow_extrapolation: bool = False,
    **gen_kwargs,
) -> list[GenerationOutput]:
    """Generate for several prompts at once (left padding; each sequence has its own CPU store and index)."""
    enc = [encode_prompt(tokenizer, p, chat) for p in prompts]
    for e in enc:
        check_length(model, len(e), max_new_tokens, allow_extrapolation)
    T = max(len(e) for e in enc)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.full((len(enc), T), pad, dtype=torch.long)
    mask = torch.zeros((len(enc), T), dtype=torch.long)
    for i, e in enumerate(enc):
        ids[i, T - len(e) :] = torch.tensor(e)
        mask[i, T - len(e) :] = 1
    seqs, stats = generate_ids(model, ids, config, attention_mask=mask, max_new_tokens=max_new_tokens, **gen_kwargs)
    outs = []
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, (list, tuple)) else [eos])
    for i, e in enumerate(enc):
        new = seqs[i, T:].tolist()
        for j, t in enumerate(new):  # cut at the first end-of-sequence token (padding after it)
            if t in eos:
                new = new[: j + 1]
                break
        outs.append(GenerationOutput(tokenizer.decode(new, skip_special_tokens=True), new, len(e), dict(stats)))
    return outs
