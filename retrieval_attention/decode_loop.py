"""Lean decode loop: one token per step through a prefilled retrieval-attention cache, without the
transformers forward (issue #5).

Per step and layer only the needed ops run, through the model's own modules: input norm, q/k/v projections
(+ q/k norms of Qwen3), RoPE, then for a :class:`~retrieval_attention.cache.RetrievalLayer`

* the new key/value overwrite the oldest window slot of the static tokens **in place** (a ring buffer over
  the window slots, no concatenation per step); the token it held goes to the layer's CPU store (method
  ``retrieval``, only if that slot held a real token);
* the query goes to pinned host memory, an event is recorded, and only then the device attention over the
  static slots is queued, so the CPU store's top-k retrieval + attention (``store.attend``) overlaps it;
* the two parts merge exactly by log-sum-exp (fp32); with the residual estimate on the device
  (``RetrievalConfig.residual_on``, the default on a GPU) the CPU part returns its retrieved ids too and a
  third part, the residual over a sample of the store held on the device
  (:mod:`~retrieval_attention.attention.residual_device`), is merged in first;

then o_proj, residual, post norm, MLP, residual. Dense layers (plain ``DynamicLayer``) run ``update`` +
exact SDPA. While a :class:`LeanDecoder` is open the window is kept in ring order; :meth:`LeanDecoder.close`
restores the chronological layout (sink, then window oldest first) so the transformers path, context saving
and forking continue correctly.

``cuda_graphs=True`` (CUDA only, optional) captures the device work between host round trips in CUDA graphs
after one eager warm-up step; host<->device copies and events stay outside the graphs. If capture fails the
loop warns and stays eager. ``RetrievalConfig.decode_compile`` (on with CUDA by default) runs the dense ops (:func:`qkv_block`,
:func:`merged_attention`, :func:`post_block`) compiled by ``torch.compile`` (also inside the graphs).
"""

from __future__ import annotations

import sys
import time
import warnings

import numpy as np
import torch

from .attention.device import attention_with_lse
from .attention.merge import merge_partial
from .attention.residual_device import draw_sample, residual_partial, sample_capacity
from .prefill import unsupported_reason as _model_unsupported_reason

_DEV, _HOST = "device", "host"  # op kinds: device ops are capturable, host ops run between graphs


def merged_attention(od, ld, oc, lc, res=None):
    """The layer's attention output from its parts, merged exactly by log-sum-exp (fp32): the device part over
    the static tokens ``od [B, Hq, 1, D]`` / ``ld [B, Hq, 1]``, the CPU part ``oc`` / ``lc`` (same shapes) and,
    with the residual estimate on the device, ``res`` = the arguments of
    :func:`~.attention.residual_device.residual_partial` (merged into the CPU part first, as the CPU kernel does).
    Returns ``[B, Hq, 1, D]`` float32."""
    if res is not None:
        oc, lc = merge_partial(oc, lc, *residual_partial(*res))
    return merge_partial(od, ld, oc, lc)[0]


def post_block(layer, x, attn_out):
    """x += o_proj(attn_out); x += mlp(post_norm(x)) for a decoder ``layer``. x ``[B, 1, hidden]``, attn_out
    ``[B, 1, Hq * D]`` in the model's dtype."""
    x = x + layer.self_attn.o_proj(attn_out)
    return x + layer.mlp(layer.post_attention_layernorm(x))


def qkv_block(layer, x, cos, sin, rope, head_dim: int):
    """q ``[B, Hq, 1, D]``, k / v ``[B, Hkv, 1, D]`` of ``layer`` for hidden states ``x [B, 1, hidden]``: input
    norm, projections (+ the q/k norms of Qwen3), RoPE (``rope`` = the model's ``apply_rotary_pos_emb``)."""
    attn = layer.self_attn
    h = layer.input_layernorm(x)
    shape = (x.shape[0], 1, -1, head_dim)
    q = attn.q_proj(h).view(shape)
    k = attn.k_proj(h).view(shape)
    v = attn.v_proj(h).view(shape).transpose(1, 2)
    if hasattr(attn, "q_norm"):  # Qwen3: RMSNorm over the head dim before RoPE
        q, k = attn.q_norm(q), attn.k_norm(k)
    return (*rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin), v)


#: the dense per-layer ops of a decode step, by name (plain, or compiled by :class:`_CompiledOps`)
_OPS = {f.__name__: f for f in (merged_attention, post_block, qkv_block)}


def inductor_in_process(gm, example_inputs):
    """``torch.compile`` backend: inductor, with its compile jobs run in this process (``compile_threads=1`` for
    this compilation only). The stock backend starts a pool of compile subprocesses at the first compile, even
    when every kernel then comes from inductor's on-disk cache; on the GPU host those processes, importing torch,
    held a core for seconds while the first decode steps ran, and the fused CPU search calls, which need every
    core, stalled: 500+ ms per token for the first steps (docs/BENCHMARKS.md, session 17). Without the pool a
    cold compile is serial, once per machine (the cache keeps it)."""
    from torch._inductor import config as inductor_config
    from torch._inductor.compile_fx import compile_fx

    with inductor_config.patch(compile_threads=1):
        return compile_fx(gm, example_inputs)


class _CompiledOps:
    """:func:`merged_attention`, :func:`post_block` and :func:`qkv_block` compiled with ``torch.compile``
    (``RetrievalConfig.decode_compile``, backend :func:`inductor_in_process`): their many small elementwise ops
    fused into few kernels. Compiled once for all layers (same shapes; layers are inlined as inputs); the first
    call of each compiles. If compiling fails the decoder warns once and uses the plain functions from then on."""

    def __init__(self):
        opts = dict(dynamic=False, fullgraph=True, backend=inductor_in_process)
        self.fns = {name: (f, torch.compile(f, **opts)) for name, f in _OPS.items()}
        self.failed = False

    def __call__(self, name, *args):
        plain, compiled = self.fns[name]
        if self.failed:
            return plain(*args)
        try:
            return compiled(*args)
        except Exception as e:  # noqa: BLE001 - any compile problem: warn once, run the plain ops
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                raise  # never fall back silently inside a CUDA graph capture (it captures the failure instead)
            self.failed = True
            warnings.warn(f"decode_compile: torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                          "decoding with the plain ops", RuntimeWarning, stacklevel=3)
            return plain(*args)


def _plain_ops(name, *args):
    return _OPS[name](*args)


def residual_placement(config, device) -> str:
    """Where :class:`LeanDecoder` estimates the residual for ``config`` on a model on ``device``: ``"device"`` or
    ``"cpu"`` (``residual_on="auto"``: the device when it is a GPU)."""
    if config.residual_on != "auto":
        return config.residual_on
    return "device" if torch.device(device).type == "cuda" else "cpu"


def unsupported_reason(model, cache) -> str | None:
    """Why :class:`LeanDecoder` cannot run ``model`` with ``cache`` (None when it can)."""
    from transformers.cache_utils import DynamicLayer

    from .cache import RetrievalCache, RetrievalLayer

    reason = _model_unsupported_reason(model)
    if reason is not None:
        return reason
    if not isinstance(cache, RetrievalCache):
        return f"the lean decode loop needs a RetrievalCache (got {type(cache).__name__})"
    layers = cache.layers
    n_model = len(model.model.layers)
    if len(layers) != n_model:
        return f"the cache has {len(layers)} layers, the model {n_model}"
    rl = cache.retrieval_layers
    if not rl:
        return "the cache has no retrieval layers"
    if not all(l.offloaded for l in rl):
        return "the cache's retrieval layers are not offloaded (prefill first; prompts up to n_sink + window stay dense)"
    S = rl[0].config.n_static
    dev = model.model.embed_tokens.weight.device
    for l in rl:
        if l.static_k.shape[2] != S:
            return f"layer {l.layer_idx} holds {l.static_k.shape[2]} static tokens, not n_sink + window = {S}"
        if l.total != rl[0].total or l.win_start != rl[0].win_start:
            return "the retrieval layers are not at the same position"
        if l.static_k.device != dev:
            return f"layer {l.layer_idx}'s static tokens are on {l.static_k.device}, the model on {dev}"
    for i, l in enumerate(layers):
        if not isinstance(l, RetrievalLayer):
            if type(l) is not DynamicLayer or not getattr(l, "is_initialized", False) or l.keys is None:
                return f"layer {i} is a {type(l).__name__} (dense layers must be prefilled DynamicLayers)"
            if l.keys.device != dev:
                return f"dense layer {i}'s KV is on {l.keys.device}, the model on {dev}"
    return None


class LeanDecoder:
    """Decode ``[B, 1]`` tokens through ``model`` with its prefilled, offloaded ``RetrievalCache``.

    Use as a context manager (or call :meth:`close`): ``with LeanDecoder(model, cache) as dec: logits =
    dec.step(tok)``. Do not run the transformers forward on the cache while the decoder is open.
    """

    def __init__(self, model, cache, *, cuda_graphs: bool = False):
        reason = unsupported_reason(model, cache)
        if reason is not None:
            raise NotImplementedError(reason) if _model_unsupported_reason(model) else ValueError(reason)
        from .cache import RetrievalLayer

        self.model, self.cache = model, cache
        self.base = model.model
        self.dev = self.base.embed_tokens.weight.device
        self.cuda = self.dev.type == "cuda"
        rl = cache.retrieval_layers
        cfg = rl[0].config
        self.S1, self.W = cfg.n_sink, cfg.window
        self.B = rl[0].static_k.shape[0]
        attn0 = self.base.layers[0].self_attn
        self.D = attn0.head_dim
        self.Hq = model.config.num_attention_heads
        self.Hkv = rl[0].static_k.shape[1]
        self.group = self.Hq // self.Hkv
        self._rope = sys.modules[type(attn0).__module__].apply_rotary_pos_emb
        self.kinds = []  # per layer: "dense" | "stream" | "retrieve"
        for l in cache.layers:
            self.kinds.append("dense" if not isinstance(l, RetrievalLayer) else ("retrieve" if l.retrieve else "stream"))
        # private copies of the static tensors: they are written in place below, and forks share the originals
        for l in rl:
            l.static_k, l.static_v, l.static_valid = l.static_k.clone(), l.static_v.clone(), l.static_valid.clone()
        self._valid_host = {i: l.static_valid.cpu().numpy().copy()
                            for i, l in enumerate(cache.layers) if self.kinds[i] == "retrieve"}
        self.head = 0  # window slot holding the oldest window token (ring order)
        pad = (rl[0].sink_end.to(self.dev) - self.S1).long()  # [B] left padding of each sequence
        self._pad = pad
        self._padded = bool((pad > 0).any())
        self._pos = (rl[0].total - pad).view(self.B, 1)  # [B, 1] position of the next token
        self._slot = torch.full((1,), self.S1, dtype=torch.long, device=self.dev)  # static column being written
        pin = self.cuda
        B, Hq, Hkv, D = self.B, self.Hq, self.Hkv, self.D
        dtype = rl[0].static_k.dtype
        self._q_host = torch.empty((B, Hq, 1, D), dtype=torch.float32, pin_memory=pin)
        self._old_k_host = torch.empty((B, Hkv, 1, D), dtype=dtype, pin_memory=pin)
        self._old_v_host = torch.empty((B, Hkv, 1, D), dtype=dtype, pin_memory=pin)
        # the residual estimate on the device: each retrieval layer holds a sample of its stores' draws
        m_res, self.top_k = cfg.residual_samples, cfg.top_k
        self.residual_on_device = m_res > 0 and "retrieve" in self.kinds and residual_placement(cfg, self.dev) == "device"
        self._res_refresh = cfg.residual_refresh
        # the CPU part's output, log-sum-exp and (device residual) retrieved ids as int32 bits side by side
        # ([..., :D], [..., D], [..., D + 1:]): one copy to the device
        E = D + 1 + (self.top_k if self.residual_on_device else 0)
        self._olc_host = torch.empty((B, Hq, 1, E), dtype=torch.float32, pin_memory=pin)
        # numpy views for the per-layer host work: right after the search call a torch op costs tens of us, a numpy
        # op a few (dev VM, docs/bench/scripts/host_part.py: host work besides the search ~330 -> ~190 us per layer)
        self._q_np, self._olc_np = self._q_host.numpy(), self._olc_host.numpy()
        self._ids_np = self._olc_np[..., D + 1:].view(np.int32)  # [B, Hq, 1, top_k] (device residual)
        self._res_n: dict[int, list] = {}  # layer -> per sequence: keys its sample was drawn from (None: not yet)
        self._res_next: dict[int, int] = {}  # layer -> step of its next redraw
        self._event = torch.cuda.Event() if self.cuda else None
        self._t: dict[str, torch.Tensor] = {"pos": self._pos}
        for i, kind in enumerate(self.kinds):
            if kind == "retrieve":  # CPU results land here (persistent: graphs read them by address)
                if self.cuda:
                    olc = torch.zeros((B, Hq, 1, E), dtype=torch.float32, device=self.dev)
                    olc[..., D] = float("-inf")
                else:  # on the CPU the ops run in order: every layer reads the host buffer itself, no copy
                    olc = self._olc_host
                self._t[f"olc{i}"] = olc
                self._t[f"oc{i}"], self._t[f"lc{i}"] = olc[..., :D], olc[..., D]
                if self.residual_on_device:  # persistent (graphs read them by address), redrawn in place
                    C = sample_capacity(m_res, self.top_k)
                    self._t[f"tk{i}"] = olc[..., D + 1:].view(torch.int32)
                    self._t[f"rk{i}"] = torch.zeros((B, Hkv, C, D), dtype=torch.float32, device=self.dev)
                    self._t[f"rv{i}"] = torch.zeros((B, Hkv, C, D), dtype=torch.float32, device=self.dev)
                    self._t[f"rid{i}"] = torch.full((B, Hkv, C), -1, dtype=torch.int32, device=self.dev)
                    self._t[f"rlw{i}"] = torch.zeros((B,), dtype=torch.float32, device=self.dev)
                    self._res_n[i] = [None] * B
                    self._res_next[i] = 0
        self.compiled = cfg.resolved_decode_compile(self.dev)
        self._f = _CompiledOps() if self.compiled else _plain_ops
        self._ops = self._build_ops()
        self._graphs = None  # list of ("graph", CUDAGraph) / (_HOST, fn) once captured
        self._want_graphs = False
        if cuda_graphs:
            if not self.cuda:
                warnings.warn("cuda_graphs needs a CUDA device; decoding eagerly", stacklevel=2)
            elif "dense" in self.kinds:
                warnings.warn("cuda_graphs: dense layers grow their KV every step and cannot be captured; "
                              "decoding eagerly", stacklevel=2)
            else:
                self._want_graphs = True
        self.closed = False
        self.steps = 0

    @staticmethod
    def supports(model, cache) -> bool:
        """Whether ``LeanDecoder(model, cache)`` can run (Llama-family model, offloaded RetrievalCache)."""
        return unsupported_reason(model, cache) is None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- the step -----------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, input_ids: torch.Tensor) -> torch.Tensor:
        """One decode step: ``input_ids [B, 1]`` -> logits ``[B, vocab]`` float32."""
        if self.closed:
            raise RuntimeError("this LeanDecoder is closed")
        if input_ids.shape != (self.B, 1):
            raise ValueError(f"input_ids must be [B, 1] = [{self.B}, 1], got {list(input_ids.shape)}")
        if self._graphs is not None:
            self._t["ids"].copy_(input_ids, non_blocking=True)
            for kind, obj in self._graphs:
                obj.replay() if kind == "graph" else obj()
            logits = self._t["logits"].clone()
        elif self._want_graphs:
            logits = self._warmup_and_capture(input_ids)
        else:
            self._t["ids"] = input_ids.to(self.dev)
            for _, fn in self._ops:
                fn()
            logits = self._t["logits"]
        self._advance()
        return logits

    def residual_bytes(self) -> int:
        """Device bytes of the residual samples (0 unless the residual is estimated on the device)."""
        return sum(t.numel() * t.element_size() for name, t in self._t.items()
                   if name.startswith(("rk", "rv", "rid", "rlw")))

    def _advance(self) -> None:
        """Bookkeeping after a step: the ring head, positions, and each layer's counters."""
        self.head = (self.head + 1) % self.W
        self._pos.add_(1)
        self._slot.fill_(self.S1 + self.head)
        for l in self.cache.retrieval_layers:
            l.total += 1
            l.win_start += 1  # the oldest window token's padded position
        self.steps += 1

    def _build_ops(self):
        ops = [(_DEV, self._op_embed)]
        for i, kind in enumerate(self.kinds):
            if kind == "dense":
                ops.append((_DEV, lambda i=i: self._op_dense(i)))
                continue
            ops.append((_DEV, lambda i=i: self._op_pre(i)))
            if kind == "retrieve":
                ops.append((_HOST, lambda i=i: self._op_to_host(i)))
            ops.append((_DEV, lambda i=i: self._op_static_attention(i)))
            if kind == "retrieve":
                ops.append((_HOST, lambda i=i: self._op_cpu_part(i)))
            ops.append((_DEV, lambda i=i: self._op_post(i)))
        ops.append((_DEV, self._op_final))
        return ops

    # ---- device ops (capturable: no host syncs, no CPU tensors) --------------------------------------
    def _op_embed(self):
        t = self._t
        t["x"] = self.base.embed_tokens(t["ids"])
        t["cos"], t["sin"] = self.base.rotary_emb(t["x"], t["pos"])

    def _qkv(self, i):
        """q ``[B, Hq, 1, D]``, k/v ``[B, Hkv, 1, D]`` of layer ``i`` after RoPE."""
        return self._f("qkv_block", self.base.layers[i], self._t["x"], self._t["cos"], self._t["sin"], self._rope,
                       self.D)

    def _op_pre(self, i):
        """Projections, RoPE, old slot contents out, new token into the slot (in place)."""
        t, cl = self._t, self.cache.layers[i]
        q, k, v = self._qkv(i)
        if self.kinds[i] == "retrieve":
            t[f"qf{i}"] = q.float().contiguous()
            t[f"ok{i}"] = cl.static_k.index_select(2, self._slot)  # the token leaving the window
            t[f"ov{i}"] = cl.static_v.index_select(2, self._slot)
        cl.static_k.index_copy_(2, self._slot, k)
        cl.static_v.index_copy_(2, self._slot, v)
        cl.static_valid.index_fill_(1, self._slot, True)
        t[f"q{i}"] = q

    def _op_static_attention(self, i):
        t, cl = self._t, self.cache.layers[i]
        S = cl.static_k.shape[2]
        scaling = self.base.layers[i].self_attn.scaling
        t[f"od{i}"], t[f"ld{i}"] = attention_with_lse(t[f"q{i}"], cl.static_k, cl.static_v, scaling,
                                                      cl.static_valid.view(self.B, 1, 1, S))

    def _op_post(self, i):
        t = self._t
        layer = self.base.layers[i]
        if self.kinds[i] == "retrieve":
            res = None
            if self.residual_on_device:  # the retrieved partial and the residual first, as the CPU kernel does
                res = (t[f"qf{i}"], t[f"rk{i}"], t[f"rv{i}"], t[f"rid{i}"], t[f"rlw{i}"], t[f"tk{i}"],
                       layer.self_attn.scaling)
            out = self._f("merged_attention", t[f"od{i}"], t[f"ld{i}"], t[f"oc{i}"], t[f"lc{i}"], res)
        else:
            out = t[f"od{i}"]
        self._residual_mlp(layer, out.to(t["x"].dtype).transpose(1, 2).reshape(self.B, 1, -1))

    def _residual_mlp(self, layer, attn_out):
        """x += o_proj(attn_out); x += mlp(post_norm(x)). attn_out ``[B, 1, Hq * D]``."""
        self._t["x"] = self._f("post_block", layer, self._t["x"], attn_out)

    def _op_dense(self, i):
        """A dense layer: ``update`` (concatenation) + exact SDPA, as the transformers path (eager only)."""
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        layer = self.base.layers[i]
        q, k, v = self._qkv(i)
        keys, values = self.cache.layers[i].update(k, v)
        mask = None
        if self._padded:  # left padding is never attended
            mask = (torch.arange(keys.shape[2], device=self.dev).view(1, -1) >= self._pad.view(-1, 1)).view(self.B, 1, 1, -1)
        out = sdpa_attention_forward(layer.self_attn, q, keys, values, mask, scaling=layer.self_attn.scaling)[0]
        self._residual_mlp(layer, out.reshape(self.B, 1, -1))

    def _op_final(self):
        x = self.base.norm(self._t["x"])
        self._t["logits"] = self.model.lm_head(x)[:, -1].float()

    # ---- host ops -------------------------------------------------------------------------------------
    def _op_to_host(self, i):
        """Query and leaving token to (pinned) host memory, then an event: queued before the device
        attention so the CPU part only waits for these copies."""
        t = self._t
        self._q_host.copy_(t[f"qf{i}"], non_blocking=self.cuda)
        self._old_k_host.copy_(t[f"ok{i}"], non_blocking=self.cuda)
        self._old_v_host.copy_(t[f"ov{i}"], non_blocking=self.cuda)
        if self.cuda:
            self._event.record()

    def _op_cpu_part(self, i):
        """Evict the overwritten token to the CPU store, then top-k retrieval + attention per sequence."""
        cl = self.cache.layers[i]
        cfg = cl.config
        st = cl.stats
        t_in = time.perf_counter()
        if self.cuda:
            self._event.synchronize()
        t_ready = time.perf_counter()
        st.wait_s += t_ready - t_in  # the device finishing this layer's q/k/v (not host overhead)
        slot = self.S1 + self.head
        valid = self._valid_host[i]
        for b, store in enumerate(cl.stores):
            if valid[b, slot]:
                store.add(self._old_k_host[b], self._old_v_host[b], cl.n_query_heads)  # copied by the store
        valid[:, slot] = True
        olc, D = self._olc_np, self.D
        on_dev = self.residual_on_device
        if on_dev:  # before the search: the CPU covers exactly what the sample does not (keys added since its draw)
            self._redraw_residual(i, cl)
        for b, store in enumerate(cl.stores):
            if store.index is None or store.n == 0:
                olc[b, ..., :D] = 0.0
                olc[b, ..., D] = -np.inf
                if on_dev:
                    self._ids_np[b] = -1
                continue
            t0 = time.perf_counter()
            got = store.attend(self._q_np[b], self.group, self.base.layers[i].self_attn.scaling, cfg.top_k,
                               residual_from=self._res_n[i][b] if on_dev else None, return_ids=on_dev,
                               **store.search_budget(cfg))
            o, s, n_scanned = got[:3]
            olc[b, ..., :D] = o
            olc[b, ..., D] = s
            if on_dev:  # the retrieved ids: the device residual leaves them out
                kk = got[3].shape[-1]
                self._ids_np[b, ..., :kk] = got[3]
                self._ids_np[b, ..., kk:] = -1
            st.search_s += time.perf_counter() - t0  # fused retrieval + attention, booked as search (as decode_attention)
            n_pairs = n_scanned.size
            st.n_searches += n_pairs
            st.n_scanned += int(n_scanned.sum())
            st.n_cpu_keys_at_search += n_pairs * store.n
            loads = getattr(store.index, "last_call_loads", None)
            if loads is not None:
                st.worker_keys_max += loads[0]
                st.worker_keys_mean += loads[1]
            for part, sec in (getattr(store.index, "last_call_timing", None) or {}).items():
                st.call_s[part] = st.call_s.get(part, 0.0) + sec
        if self.cuda:
            self._t[f"olc{i}"].copy_(self._olc_host, non_blocking=True)
        st.host_s += time.perf_counter() - t_ready

    def _redraw_residual(self, i, cl) -> None:
        """Redraw layer ``i``'s device residual sample of each sequence when due: on the first step, then every
        ``residual_refresh`` steps (the layers' turns spread over those steps, so no step pays for all of them),
        and every step while a store is small enough for the exact residual (all its keys) or has just gained
        its first residual keys. Runs after the step's evictions, so a redraw draws what the CPU estimate would
        draw in this step. Keys added after a draw (ids from ``_res_n``, the store size it was drawn at) are
        outside the sample: the CPU search call adds their exact residual (``attend(residual_from=...)``)."""
        k, m = self.top_k, cl.config.residual_samples
        t = self._t
        due = self.steps >= self._res_next[i]
        if due:
            R = self._res_refresh
            # the first redraw after step 0 comes at R + this layer's share of R
            phase = (list(self._res_next).index(i) * R) // len(self._res_next) if self.steps == 0 else 0
            self._res_next[i] = self.steps + R + phase
        for b, store in enumerate(cl.stores):
            pop = store.residual_population(k)
            n = 0 if pop is None else pop[2]
            prev = self._res_n[i][b]
            if not (prev is None or due or (n != prev and (n <= k + m or prev == 0))):
                continue
            self._res_n[i][b] = n
            if pop is None:
                t[f"rid{i}"][b].fill_(-1)
                continue
            keys, values, n, seed = pop
            ids, k_rows, v_rows, log_w = draw_sample(keys, values, n, m, k, seed)
            cnt = k_rows.shape[1]
            t[f"rid{i}"][b].copy_(ids)
            t[f"rk{i}"][b, :, :cnt].copy_(k_rows)
            t[f"rv{i}"][b, :, :cnt].copy_(v_rows)
            t[f"rlw{i}"][b].fill_(log_w)

    # ---- CUDA graphs ----------------------------------------------------------------------------------
    def _warmup_and_capture(self, input_ids):
        """First step with ``cuda_graphs``: run it eagerly on a side stream (lazy initialisations), then
        capture each run of device ops between host ops; on failure warn and stay eager."""
        cur = torch.cuda.current_stream(self.dev)
        side = torch.cuda.Stream(self.dev)
        side.wait_stream(cur)
        with torch.cuda.stream(side):
            self._t["ids"] = input_ids.to(self.dev)
            for _, fn in self._ops:
                fn()
            logits = self._t["logits"].clone()
        cur.wait_stream(side)
        torch.cuda.synchronize(self.dev)
        self._want_graphs = False
        ids_buf = torch.zeros((self.B, 1), dtype=torch.long, device=self.dev)
        try:
            self._t["ids"] = ids_buf
            pool = torch.cuda.graph_pool_handle()
            segments, run = [], []

            def flush():
                if run:
                    g = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(g, pool=pool, stream=side, capture_error_mode="thread_local"):
                        for fn in run:
                            fn()
                    segments.append(("graph", g))
                    run.clear()

            # capturing records the device work without running it: the cache is not touched here
            for kind, fn in self._ops:
                if kind == _DEV:
                    run.append(fn)
                else:
                    flush()
                    segments.append((kind, fn))
            flush()
            torch.cuda.synchronize(self.dev)
            self._graphs = segments
        except Exception as e:  # noqa: BLE001 - any capture problem: stay eager
            warnings.warn(f"CUDA graph capture failed ({type(e).__name__}: {e}); decoding eagerly", stacklevel=3)
            self._graphs = None
            torch.cuda.synchronize(self.dev)
        return logits

    # ---- closing --------------------------------------------------------------------------------------
    def close(self) -> None:
        """Restore the chronological static layout (sink, then window oldest first); idempotent."""
        if self.closed:
            return
        self.closed = True
        self._graphs = None
        if self.head:
            W, S1 = self.W, self.S1
            order = torch.cat([torch.arange(S1), S1 + (torch.arange(W) + self.head) % W]).to(self.dev)
            for l in self.cache.retrieval_layers:
                l.static_k = l.static_k.index_select(2, order)
                l.static_v = l.static_v.index_select(2, order)
                l.static_valid = l.static_valid.index_select(1, order)
        self.head = 0
