"""The OpenAI API subset: request validation, per-request retrieval settings, response and stream chunks.

Request bodies are validated by hand so every problem becomes an OpenAI error object naming the offending
``param``. Unknown fields are rejected ("Unrecognized request argument supplied"), as OpenAI does, so a typo
in an ``extra_body`` option fails loudly instead of being ignored.

Retrieval-attention extension fields (top level of the JSON body, which is where the ``openai`` client puts
``extra_body``; a nested ``"extra_body": {...}`` object is accepted too):

``attention``    ``full`` | ``retrieval`` | ``streaming``
``top_k``        keys retrieved per query head per decode step (retrieval)
``residual_samples``  keys drawn per head and step to estimate the mass of the keys not retrieved (0 = off)
``index``        ``roar`` | ``flat`` | ``ivf`` | ``hnsw`` (registered index names)
``n_sink``, ``window``  tokens kept on the device
``ef``           search budget of graph indexes (``nprobe`` for ``ivf``)
``dense_layers`` layers kept exact (list of ints)
``context_id``   continue from a persistent context (``POST /v1/contexts``)
``ignore_eos``   keep generating after the end-of-sequence token (benchmarks)
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from ..config import METHODS, RetrievalConfig
from .errors import ApiError, bad_request

#: extension fields that change the retrieval configuration of one request
CONFIG_FIELDS = ("attention", "top_k", "index", "n_sink", "window", "ef", "dense_layers", "residual_samples")
EXTENSION_FIELDS = CONFIG_FIELDS + ("context_id", "ignore_eos")
#: accepted and ignored (bookkeeping fields of the OpenAI API that do not change the output)
IGNORED_FIELDS = ("user", "metadata", "store", "service_tier", "parallel_tool_calls", "stream_options")
MAX_N = 16
MAX_STOP = 16


@dataclass
class GenRequest:
    """A validated chat or completion request."""

    kind: str  # "chat" | "completion"
    model: str
    messages: list[dict] | None = None  # chat: [{"role", "content": str}]
    prompts: list[Any] | None = None  # completion: each a str or a list of token ids
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False
    ignore_eos: bool = False
    context_id: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)  # CONFIG_FIELDS given by the request


# ---- small validators -----------------------------------------------------------------------------------------
def _int(v, name, lo=None, hi=None, allow_none=False):
    if v is None and allow_none:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        else:
            raise bad_request(f"'{name}' must be an integer, got {json.dumps(v)}", param=name, code="invalid_type")
    if lo is not None and v < lo:
        raise bad_request(f"'{name}' must be >= {lo}, got {v}", param=name, code="invalid_value")
    if hi is not None and v > hi:
        raise bad_request(f"'{name}' must be <= {hi}, got {v}", param=name, code="invalid_value")
    return v


def _float(v, name, lo, hi, default):
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise bad_request(f"'{name}' must be a number, got {json.dumps(v)}", param=name, code="invalid_type")
    if not lo <= v <= hi:
        raise bad_request(f"'{name}' must be between {lo} and {hi}, got {v}", param=name, code="invalid_value")
    return float(v)


def _bool(v, name, default=False):
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad_request(f"'{name}' must be a boolean, got {json.dumps(v)}", param=name, code="invalid_type")
    return v


def _str(v, name):
    if not isinstance(v, str):
        raise bad_request(f"'{name}' must be a string, got {json.dumps(v)}", param=name, code="invalid_type")
    return v


def _unsupported(body: dict, name: str, allowed) -> None:
    """Reject OpenAI features this server does not implement unless they carry their no-op value."""
    if name in body and body[name] not in allowed:
        raise bad_request(f"'{name}' is not supported by this server", param=name, code="unsupported_parameter")


def parse_json_body(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad_request(
            f"We could not parse the JSON body of your request ({e}). The body must be a JSON object.",
            code="invalid_json",
        ) from e
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object", code="invalid_json")
    return body


def _merge_extra_body(body: dict) -> dict:
    """Accept raw-HTTP clients that nest extension fields under ``extra_body``."""
    extra = body.get("extra_body")
    if extra is None:
        return body
    if not isinstance(extra, dict):
        raise bad_request("'extra_body' must be an object", param="extra_body", code="invalid_type")
    out = {k: v for k, v in body.items() if k != "extra_body"}
    for k, v in extra.items():
        if k in out and out[k] != v:
            raise bad_request(f"'{k}' is given both in the body and in extra_body", param=k)
        out[k] = v
    return out


def _check_known(body: dict, known: set[str]) -> None:
    for k in body:
        if k not in known:
            raise bad_request(f"Unrecognized request argument supplied: {k}", param=k, code="unrecognized_argument")


def parse_overrides(body: dict) -> dict[str, Any]:
    """The retrieval-configuration extension fields of a request (validated types; ranges by RetrievalConfig)."""
    out: dict[str, Any] = {}
    if body.get("attention") is not None:
        a = _str(body["attention"], "attention")
        if a not in METHODS:
            raise bad_request(f"'attention' must be one of {', '.join(METHODS)}, got {a!r}", param="attention")
        out["attention"] = a
    for name in ("top_k", "n_sink", "window", "ef"):
        if body.get(name) is not None:
            out[name] = _int(body[name], name, lo=1)
    if body.get("residual_samples") is not None:
        out["residual_samples"] = _int(body["residual_samples"], "residual_samples", lo=0)
    if body.get("index") is not None:
        out["index"] = _str(body["index"], "index")
    if body.get("dense_layers") is not None:
        dl = body["dense_layers"]
        if not isinstance(dl, list):
            raise bad_request("'dense_layers' must be a list of layer indices", param="dense_layers", code="invalid_type")
        out["dense_layers"] = tuple(_int(x, "dense_layers", lo=0) for x in dl)
    return out


def config_with_overrides(base: RetrievalConfig, overrides: dict[str, Any]) -> RetrievalConfig:
    """``base`` with a request's extension fields applied (validated by ``RetrievalConfig``)."""
    if not overrides:
        return base
    kw: dict[str, Any] = {}
    if "attention" in overrides:
        kw["method"] = overrides["attention"]
    for name in ("top_k", "index", "n_sink", "window", "dense_layers", "residual_samples"):
        if name in overrides:
            kw[name] = overrides[name]
    index = kw.get("index", base.index)
    if "ef" in overrides:
        kw["search_params"] = {"nprobe": overrides["ef"]} if index == "ivf" else {"ef": overrides["ef"]}
    elif index != base.index:
        kw["search_params"] = {}  # the base budget belongs to another index
    if index != base.index:
        kw["index_params"] = {}
    try:
        return dataclasses.replace(base, **kw)
    except ValueError as e:
        param = next((p for p in ("index", "top_k", "n_sink", "window", "dense_layers", "attention") if p in str(e)), None)
        raise bad_request(str(e), param=param, code="invalid_value") from e


def _stop(v) -> list[str]:
    if v is None:
        return []
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise bad_request("'stop' must be a string or a list of strings", param="stop", code="invalid_type")
    if len(items) > MAX_STOP:
        raise bad_request(f"'stop' accepts at most {MAX_STOP} sequences", param="stop", code="invalid_value")
    if any(s == "" for s in items):
        raise bad_request("'stop' sequences must not be empty", param="stop", code="invalid_value")
    return list(dict.fromkeys(items))


def _common(body: dict, kind: str) -> GenRequest:
    model = body.get("model")
    if model is None:
        raise bad_request("you must provide a model parameter", param="model", code="missing_required_parameter")
    model = _str(model, "model")
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _int(body.get(name), name, lo=1, allow_none=True)
    so = body.get("stream_options")
    stream = _bool(body.get("stream"), "stream")
    include_usage = False
    if so is not None:
        if not isinstance(so, dict):
            raise bad_request("'stream_options' must be an object", param="stream_options", code="invalid_type")
        if not stream:
            raise bad_request("'stream_options' is only allowed when 'stream' is true", param="stream_options")
        include_usage = _bool(so.get("include_usage"), "stream_options.include_usage")
    for name in ("frequency_penalty", "presence_penalty"):
        _unsupported(body, name, (None, 0, 0.0))
    _unsupported(body, "logit_bias", (None, {}))
    ctx = body.get("context_id")
    if ctx is not None:
        ctx = _str(ctx, "context_id")
    return GenRequest(
        kind=kind,
        model=model,
        max_tokens=max_tokens,
        temperature=_float(body.get("temperature"), "temperature", 0.0, 2.0, 1.0),
        top_p=_float(body.get("top_p"), "top_p", 0.0, 1.0, 1.0),
        n=_int(1 if body.get("n") is None else body["n"], "n", lo=1, hi=MAX_N),
        stop=_stop(body.get("stop")),
        seed=_int(body.get("seed"), "seed", allow_none=True),
        stream=stream,
        include_usage=include_usage,
        ignore_eos=_bool(body.get("ignore_eos"), "ignore_eos"),
        context_id=ctx,
        overrides=parse_overrides(body),
    )


_COMMON_FIELDS = {
    "model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stream", "stop", "seed",
    "frequency_penalty", "presence_penalty", "logit_bias", *IGNORED_FIELDS, *EXTENSION_FIELDS,
}
CHAT_FIELDS = _COMMON_FIELDS | {"messages", "logprobs", "top_logprobs", "tools", "tool_choice", "functions",
                                "function_call", "response_format"}
COMPLETION_FIELDS = _COMMON_FIELDS | {"prompt", "echo", "suffix", "best_of", "logprobs"}
ROLES = ("system", "developer", "user", "assistant")


def message_text(content, i: int) -> str:
    """A message's content as text (strings, or lists of ``{"type": "text"}`` parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for p in content:
            if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                raise bad_request(
                    "only text content parts are supported", param=f"messages.[{i}].content", code="unsupported_content"
                )
            parts.append(p["text"])
        return "".join(parts)
    raise bad_request("message content must be a string or a list of text parts", param=f"messages.[{i}].content",
                      code="invalid_type")


def parse_chat(body: dict) -> GenRequest:
    body = _merge_extra_body(body)
    _check_known(body, CHAT_FIELDS)
    _unsupported(body, "logprobs", (None, False))
    _unsupported(body, "top_logprobs", (None, 0))
    _unsupported(body, "tools", (None, []))
    _unsupported(body, "functions", (None, []))
    _unsupported(body, "tool_choice", (None, "none"))
    _unsupported(body, "function_call", (None, "none"))
    rf = body.get("response_format")
    if rf is not None and not (isinstance(rf, dict) and rf.get("type") == "text"):
        raise bad_request("only response_format {'type': 'text'} is supported", param="response_format",
                          code="unsupported_parameter")
    req = _common(body, "chat")
    msgs = body.get("messages")
    if msgs is None:
        raise bad_request("you must provide a messages parameter", param="messages", code="missing_required_parameter")
    if not isinstance(msgs, list) or not msgs:
        raise bad_request("'messages' must be a non-empty list", param="messages", code="invalid_value")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise bad_request("each message must be an object", param=f"messages.[{i}]", code="invalid_type")
        role = m.get("role")
        if role not in ROLES:
            raise bad_request(f"unsupported role {role!r}; supported: {', '.join(ROLES)}", param=f"messages.[{i}].role",
                              code="invalid_value")
        if "content" not in m or m["content"] is None:
            raise bad_request("message content is required", param=f"messages.[{i}].content",
                              code="missing_required_parameter")
        out.append({"role": "system" if role == "developer" else role, "content": message_text(m["content"], i)})
    req.messages = out
    return req


def parse_completion(body: dict) -> GenRequest:
    body = _merge_extra_body(body)
    _check_known(body, COMPLETION_FIELDS)
    _unsupported(body, "echo", (None, False))
    _unsupported(body, "suffix", (None, ""))
    _unsupported(body, "best_of", (None, 1))
    _unsupported(body, "logprobs", (None,))
    req = _common(body, "completion")
    p = body.get("prompt")
    if p is None:
        raise bad_request("you must provide a prompt parameter", param="prompt", code="missing_required_parameter")
    if isinstance(p, str):
        prompts = [p]
    elif isinstance(p, list) and p and all(isinstance(x, int) and not isinstance(x, bool) for x in p):
        prompts = [list(p)]
    elif isinstance(p, list) and p and all(isinstance(x, str) for x in p):
        prompts = list(p)
    elif (isinstance(p, list) and p and all(isinstance(x, list) and x for x in p)
          and all(isinstance(t, int) and not isinstance(t, bool) for x in p for t in x)):
        prompts = [list(x) for x in p]
    else:
        raise bad_request("'prompt' must be a string, a list of strings, a list of token ids or a list of such lists",
                          param="prompt", code="invalid_type")
    if len(prompts) * req.n > MAX_N:
        raise bad_request(f"at most {MAX_N} choices per request (prompts x n)", param="n", code="invalid_value")
    req.prompts = prompts
    if req.max_tokens is None:
        req.max_tokens = 16  # the OpenAI default of the completions endpoint
    return req


def parse_context_create(body: dict) -> dict[str, Any]:
    """``POST /v1/contexts``: ``{"text" | "token_ids", "mode", "system", "separator", config fields}``."""
    body = _merge_extra_body(body)
    known = {"text", "token_ids", "mode", "system", "separator", "model", *CONFIG_FIELDS}
    _check_known(body, known)
    text, ids = body.get("text"), body.get("token_ids")
    if (text is None) == (ids is None):
        raise bad_request("give exactly one of 'text' or 'token_ids'", param="text", code="missing_required_parameter")
    if text is not None:
        text = _str(text, "text")
        if not text:
            raise bad_request("'text' is empty", param="text", code="invalid_value")
    if ids is not None:
        if not isinstance(ids, list) or not ids or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise bad_request("'token_ids' must be a non-empty list of integers", param="token_ids", code="invalid_type")
    mode = body.get("mode")
    if mode is not None and mode not in ("chat", "completion"):
        raise bad_request("'mode' must be 'chat' or 'completion'", param="mode", code="invalid_value")
    if ids is not None and mode == "chat":
        raise bad_request("a context made from token_ids is a completion context; give 'text' for mode 'chat'",
                          param="mode", code="invalid_value")
    system = body.get("system")
    if system is not None:
        system = _str(system, "system")
        if mode == "completion" or ids is not None:
            raise bad_request("'system' applies to chat contexts only", param="system")
    sep = body.get("separator")
    sep = "\n\n" if sep is None else _str(sep, "separator")
    if body.get("model") is not None:
        _str(body["model"], "model")
    return {"text": text, "token_ids": ids, "mode": mode, "system": system, "separator": sep,
            "model": body.get("model"), "overrides": parse_overrides(body)}


# ---- responses ------------------------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def chat_response(rid, model, fingerprint, choices, usage_, extra) -> dict:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": fingerprint,
        "choices": [
            {
                "index": c["index"],
                "message": {"role": "assistant", "content": c["text"], "refusal": None},
                "logprobs": None,
                "finish_reason": c["finish_reason"],
            }
            for c in choices
        ],
        "usage": usage_,
        "retrieval_attention": extra,
    }


def completion_response(rid, model, fingerprint, choices, usage_, extra) -> dict:
    return {
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": fingerprint,
        "choices": [
            {"index": c["index"], "text": c["text"], "logprobs": None, "finish_reason": c["finish_reason"]}
            for c in choices
        ],
        "usage": usage_,
        "retrieval_attention": extra,
    }


def chat_chunk(rid, created, model, fingerprint, index=None, delta=None, finish_reason=None, usage_=None) -> dict:
    choices = [] if index is None else [
        {"index": index, "delta": delta or {}, "logprobs": None, "finish_reason": finish_reason}
    ]
    d = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
         "system_fingerprint": fingerprint, "choices": choices}
    if usage_ is not None:
        d["usage"] = usage_
    return d


def completion_chunk(rid, created, model, fingerprint, index=None, text="", finish_reason=None, usage_=None) -> dict:
    choices = [] if index is None else [
        {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}
    ]
    d = {"id": rid, "object": "text_completion", "created": created, "model": model,
         "system_fingerprint": fingerprint, "choices": choices}
    if usage_ is not None:
        d["usage"] = usage_
    return d


def sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


def error_for_exception(e: Exception) -> ApiError:
    return e if isinstance(e, ApiError) else ApiError(500, f"internal error: {type(e).__name__}: {e}")


# ---- incremental detokenisation with stop strings -----------------------------------------------------------
class TextTracker:
    """Turns generated token ids into text deltas, honouring stop strings.

    The whole generated sequence is decoded at each step (decoding is not prefix-stable token by token).
    Text that could still become the start of a stop string, or an incomplete UTF-8 character (U+FFFD at the
    end), is held back until it is resolved; when a stop string appears the text is cut before it.
    """

    def __init__(self, decode, stop: list[str]):
        self.decode = decode
        self.stop = list(stop)
        self.max_stop = max((len(s) for s in self.stop), default=0)
        self.ids: list[int] = []
        self.sent = 0
        self.text = ""
        self.stopped = False

    def add(self, ids: list[int]) -> str:
        """Add generated tokens; returns the text that became final (possibly empty)."""
        if self.stopped:
            return ""
        self.ids.extend(ids)
        text = self.decode(self.ids)
        self.text = text
        if self.stop:
            start = max(0, self.sent - self.max_stop)
            hits = [p for p in (text.find(s, start) for s in self.stop) if p >= 0]
            if hits:
                cut = min(hits)
                self.stopped = True
                self.text = text[:cut]
                delta = text[self.sent : cut] if cut > self.sent else ""
                self.sent = max(self.sent, cut)
                return delta
        hold = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), hold, -1):
                if text.endswith(s[:k]):
                    hold = k
                    break
        end = len(text) - hold
        while end > self.sent and text[end - 1] == "\ufffd":
            end -= 1
        if end <= self.sent:
            return ""
        delta = text[self.sent : end]
        self.sent = end
        return delta

    def flush(self) -> str:
        """At the end of generation: the held-back rest (nothing after a stop string)."""
        if self.stopped or self.sent >= len(self.text):
            return ""
        delta = self.text[self.sent :]
        self.sent = len(self.text)
        return delta
