"""The FastAPI application: OpenAI-compatible endpoints plus persistent contexts.

``create_app(model, tokenizer, config, ...)`` builds the app from an already loaded ``(model, tokenizer)``
pair (tests use a tiny random model; ``retrieval-attention serve`` loads a real one). :class:`ServerThread`
runs it with uvicorn on a background thread (tests, benchmarks, notebooks).

Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions`` (both with
``stream``), ``POST /v1/contexts``, ``GET /v1/contexts``, ``GET /v1/contexts/{id}``,
``DELETE /v1/contexts/{id}``, ``GET /health``. Errors are OpenAI error objects.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import socket
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..config import RetrievalConfig
from ..generation import max_positions
from .contexts import ContextStore, check_request_config, new_info
from .engine import CreateContextJob, Engine, GenerateJob, Prepared
from .errors import ApiError, bad_request, not_found
from .prompts import PromptBuilder
from .protocol import (
    SSE_DONE,
    GenRequest,
    chat_chunk,
    chat_response,
    completion_chunk,
    completion_response,
    config_with_overrides,
    new_id,
    parse_chat,
    parse_completion,
    parse_context_create,
    parse_json_body,
    sse,
)

log = logging.getLogger("retrieval_attention.server")
DISCONNECT_POLL_S = 1.0


class ServerState:
    """Everything the endpoints share: model worker, prompt builder, contexts, limits."""

    def __init__(
        self,
        model,
        tokenizer,
        config: RetrievalConfig | None = None,
        *,
        model_name: str = "retrieval-attention",
        context_dir: str | Path | None = None,
        context_memory: int = 8 << 30,
        default_max_tokens: int = 512,
        allow_extrapolation: bool = False,
    ):
        self.model = model
        self.config = config or RetrievalConfig()
        self.model_name = model_name
        self.default_max_tokens = int(default_max_tokens)
        self.allow_extrapolation = allow_extrapolation
        self.limit = max_positions(model)
        self.builder = PromptBuilder(tokenizer)
        self.store = ContextStore(model, context_memory, context_dir)
        self.engine = Engine(model, self.builder, self.store, allow_extrapolation=allow_extrapolation)
        self.started = int(time.time())
        ident = self.store.model_fingerprint + json.dumps(self.config.to_dict(), sort_keys=True)
        self.fingerprint = "ra-" + hashlib.sha256(ident.encode()).hexdigest()[:12]

    # ---- request preparation (thread pool: tokenisation, validation, limits) -----------------------------
    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise not_found(f"The model '{name}' does not exist (this server serves '{self.model_name}')",
                            param="model", code="model_not_found")

    def max_tokens(self, n_prompt: int, requested: int | None, param: str) -> int:
        limit = None if self.allow_extrapolation else self.limit
        if requested is None:
            mt = self.default_max_tokens if limit is None else min(self.default_max_tokens, limit - n_prompt)
            if mt < 1:
                raise bad_request(
                    f"This model's maximum context length is {limit} tokens. However, your {param} has "
                    f"{n_prompt} tokens, leaving no room for the completion. Please reduce the length of the {param}.",
                    param=param, code="context_length_exceeded")
            return mt
        if limit is not None and n_prompt + requested > limit:
            raise bad_request(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{n_prompt + requested} tokens ({n_prompt} in the {param}, {requested} in the completion). "
                f"Please reduce the length of the {param} or completion.",
                param=param, code="context_length_exceeded")
        return requested

    def prepare(self, req: GenRequest) -> Prepared:
        self.check_model(req.model)
        param = "messages" if req.kind == "chat" else "prompt"
        extra: dict = {}
        n_ctx = 0
        if req.context_id is not None:
            info = self.store.get(req.context_id)
            if info.mode == "?":
                raise ApiError(409, f"context {info.id!r} cannot be used: {info.error}", param="context_id",
                               code="context_file_invalid")
            check_request_config(info, req.overrides)
            per_request = {k: v for k, v in req.overrides.items() if k in ("top_k", "ef", "residual_samples")}
            config = config_with_overrides(info.retrieval_config(), per_request)
            if req.kind == "chat":
                if info.mode != "chat":
                    raise bad_request(f"context {info.id} is a {info.mode} context; use /v1/completions with it, or "
                                      "create the context with mode 'chat'", param="context_id",
                                      code="context_mode_mismatch")
                items = [self.builder.chat_tail(req.messages, system=info.system, separator=info.separator,
                                                template_prefix=info.template_prefix, context_id=info.id)]
            else:
                items = [self.builder.completion_tail(p, param) for p in req.prompts]
            n_ctx = info.n_tokens
            extra["context_id"] = info.id
        else:
            config = config_with_overrides(self.config, req.overrides)
            if req.kind == "chat":
                items = [self.builder.chat_ids(req.messages)]
            else:
                items = [self.builder.completion_ids(p, param) for p in req.prompts]
        max_tokens = [self.max_tokens(n_ctx + len(ids), req.max_tokens, param) for ids in items]
        extra.update(attention=config.method, index=config.index if config.method == "retrieval" else None,
                     top_k=config.top_k if config.method == "retrieval" else None)
        return Prepared(req=req, config=config, items=items, max_tokens=max_tokens, context_id=req.context_id,
                        n_context=n_ctx, extra=extra)

    def prepare_context(self, body: dict, loop) -> CreateContextJob:
        p = parse_context_create(body)
        self.check_model(p["model"])
        config = config_with_overrides(self.config, p["overrides"])
        if p["text"] is not None:
            mode = p["mode"] or ("chat" if self.builder.has_chat_template else "completion")
            if mode == "chat":
                ids, tprefix = self.builder.chat_context(p["text"], p["system"])
            else:
                ids, tprefix = self.builder.completion_ids(p["text"], "text"), None
            source = "text"
        else:
            mode, tprefix, source = "completion", None, "token_ids"
            ids = list(p["token_ids"])
            self.builder.check_ids(ids, "token_ids")
        info = new_info(self.store, mode=mode, n_tokens=len(ids), config=config, system=p["system"],
                        separator=p["separator"], template_prefix=tprefix, source=source, token_ids=ids)
        return CreateContextJob(loop, ids, info, config)


# ---- app --------------------------------------------------------------------------------------------------------
def _error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def create_app(model, tokenizer, config: RetrievalConfig | None = None, **kwargs) -> FastAPI:
    """The server app for a loaded ``(model, tokenizer)``; ``kwargs`` go to :class:`ServerState`
    (``model_name``, ``context_dir``, ``context_memory`` bytes, ``default_max_tokens``, ``allow_extrapolation``)."""
    state = ServerState(model, tokenizer, config, **kwargs)

    @asynccontextmanager
    async def lifespan(app):
        state.engine.start()
        try:
            yield
        finally:
            await run_in_threadpool(state.engine.stop)

    app = FastAPI(title="retrieval-attention", lifespan=lifespan)
    app.state.ra = state

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return _error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, e: RequestValidationError):
        errs = e.errors()
        param = ".".join(str(x) for x in errs[0].get("loc", ())) if errs else None
        return _error_response(bad_request(f"invalid request: {errs}", param=param, code="invalid_request"))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        msg = f"{e.detail}: {request.method} {request.url.path}" if e.status_code in (404, 405) else str(e.detail)
        return _error_response(ApiError(e.status_code, msg, code=code))

    @app.exception_handler(Exception)
    async def _internal(request, e: Exception):
        log.exception("unhandled error")
        return _error_response(ApiError(500, f"internal error: {type(e).__name__}: {e}"))

    async def body_of(request: Request) -> dict:
        return parse_json_body(await request.body())

    # ---- models / health -------------------------------------------------------------------------------
    def model_card() -> dict:
        return {"id": state.model_name, "object": "model", "created": state.started, "owned_by": "retrieval-attention",
                "max_model_len": state.limit}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str):
        state.check_model(name)
        return model_card()

    @app.get("/health")
    async def health():
        return {"status": "ok", "pending": state.engine.pending, "completed": state.engine.jobs_done,
                "cancelled": state.engine.cancelled_count, "contexts": len(state.store.entries),
                "context_bytes": state.store.loaded_bytes()}

    # ---- contexts ----------------------------------------------------------------------------------------
    @app.post("/v1/contexts")
    async def create_context(request: Request):
        body = await body_of(request)
        job = await run_in_threadpool(state.prepare_context, body, asyncio.get_running_loop())
        state.engine.submit(job)
        ev = await job.next()
        if ev[0] == "error":
            raise ev[1]
        return ev[1]

    @app.get("/v1/contexts")
    async def list_contexts():
        return {"object": "list", "data": await run_in_threadpool(state.store.list)}

    @app.get("/v1/contexts/{cid}")
    async def get_context(cid: str):
        return state.store.get(cid).public(state.store.model_fingerprint)

    @app.delete("/v1/contexts/{cid}")
    async def delete_context(cid: str):
        return await run_in_threadpool(state.store.delete, cid)

    # ---- generation ---------------------------------------------------------------------------------------
    async def generate(request: Request, parse):
        req = parse(await body_of(request))
        prep = await run_in_threadpool(state.prepare, req)
        job = GenerateJob(asyncio.get_running_loop(), prep)
        state.engine.submit(job)
        try:
            first = await _next_or_disconnect(job, request)
        except BaseException:
            job.cancel()
            raise
        if first is None:
            return Response(status_code=499)
        if first[0] == "error":
            raise first[1]
        n_choices = len(prep.items) * req.n
        rid = new_id("chatcmpl" if req.kind == "chat" else "cmpl")
        if req.stream:
            return StreamingResponse(
                _stream(job, req, rid, n_choices), media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        texts: dict[int, list[str]] = {i: [] for i in range(n_choices)}
        reasons: dict[int, str] = {}
        try:
            while True:
                ev = await _next_or_disconnect(job, request)
                if ev is None:
                    return Response(status_code=499)
                if ev[0] == "delta":
                    texts[ev[1]].append(ev[2])
                elif ev[0] == "finish":
                    reasons[ev[1]] = ev[2]
                elif ev[0] == "error":
                    raise ev[1]
                elif ev[0] == "done":
                    usage_, extra = ev[1], ev[2]
                    break
        except BaseException:
            job.cancel()
            raise
        choices = [{"index": i, "text": "".join(texts[i]), "finish_reason": reasons.get(i, "stop")}
                   for i in range(n_choices)]
        build = chat_response if req.kind == "chat" else completion_response
        return build(rid, state.model_name, state.fingerprint, choices, usage_, extra)

    async def _stream(job, req: GenRequest, rid: str, n_choices: int):
        created = int(time.time())
        chat = req.kind == "chat"
        finished = False

        def chunk(**kw):
            f = chat_chunk if chat else completion_chunk
            return sse(f(rid, created, state.model_name, state.fingerprint, **kw))

        try:
            if chat:
                for i in range(n_choices):
                    yield chunk(index=i, delta={"role": "assistant", "content": ""})
            while True:
                ev = await job.next()
                if ev[0] == "delta":
                    yield chunk(index=ev[1], delta={"content": ev[2]}) if chat else chunk(index=ev[1], text=ev[2])
                elif ev[0] == "finish":
                    yield chunk(index=ev[1], delta={}, finish_reason=ev[2]) if chat else chunk(
                        index=ev[1], text="", finish_reason=ev[2])
                elif ev[0] == "error":
                    yield sse(ev[1].body())
                    break
                elif ev[0] == "done":
                    if req.include_usage:
                        yield chunk(usage_=ev[1])
                    break
            finished = True
            yield SSE_DONE
        finally:
            if not finished:
                job.cancel()  # the client went away: stop generating for it

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, parse_chat)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, parse_completion)

    return app


async def _next_or_disconnect(job, request: Request):
    """The job's next event, or ``None`` (job cancelled) once the client has disconnected."""
    task = asyncio.ensure_future(job.next())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                job.cancel()
                return None
    finally:
        if not task.done():
            task.cancel()


# ---- running in a thread --------------------------------------------------------------------------------------
def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerThread:
    """Run an app with uvicorn on a background thread: ``with ServerThread(app) as srv: srv.url``."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn

        self.host = host
        self.port = port or free_port(host)
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=self.port, log_level=log_level,
                                                    lifespan="on", timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 60.0) -> "ServerThread":
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server thread ended during start-up")
            if time.monotonic() - t0 > timeout:
                raise TimeoutError("the server did not start")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
