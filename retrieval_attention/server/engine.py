"""The model worker: one thread owns the model and runs jobs from a FIFO queue, one at a time.

Only this thread calls the model (prefill, decode, context building and loading), so concurrent requests
never interleave on a cache, on the attention-implementation switch of :func:`~retrieval_attention.enable`,
or on torch's global random generator (each request seeds it right before sampling, so a ``seed`` gives the
same answer whatever else is queued). Jobs report back to the asyncio side through ``call_soon_threadsafe``.

Events of a generation job: ``("start", info)``, ``("delta", index, text)``, ``("finish", index, reason,
n_tokens, stats)``, then ``("done", usage, extra)`` — or ``("error", ApiError)`` at any point.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import secrets
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from ..config import RetrievalConfig
from ..generation import generate_ids, max_positions
from .errors import ApiError
from .protocol import GenRequest, TextTracker, error_for_exception, usage

log = logging.getLogger("retrieval_attention.server")


class Job:
    """A unit of model work; results go to an asyncio queue on the event loop that submitted it."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.submitted = time.perf_counter()

    def emit(self, event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is gone (server shutting down): nobody is listening
            self.cancelled.set()

    async def next(self):
        return await self.events.get()

    def cancel(self) -> None:
        self.cancelled.set()

    def run(self, engine: "Engine") -> None:  # pragma: no cover - abstract
        raise NotImplementedError


@dataclass
class Prepared:
    """A validated, tokenised generation request."""

    req: GenRequest
    config: RetrievalConfig
    items: list[list[int]]  # per prompt: full ids, or the tail after the context
    max_tokens: list[int]  # per prompt
    context_id: str | None = None
    n_context: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class _Sink:
    """``model.generate`` streamer: skips the prompt, feeds generated tokens to a :class:`TextTracker`."""

    def __init__(self, tracker: TextTracker, on_text):
        self.tracker = tracker
        self.on_text = on_text
        self.prompt_seen = False
        self.t_first: float | None = None

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        if self.t_first is None:
            self.t_first = time.perf_counter()
        ids = value.reshape(-1).tolist() if hasattr(value, "reshape") else list(value)
        delta = self.tracker.add(ids)
        if delta:
            self.on_text(delta)

    def end(self) -> None:
        pass


class _StopWhen(StoppingCriteria):
    def __init__(self, predicate):
        self.predicate = predicate

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), bool(self.predicate()), dtype=torch.bool, device=input_ids.device)


class GenerateJob(Job):
    def __init__(self, loop, prep: Prepared):
        super().__init__(loop)
        self.prep = prep

    def run(self, engine: "Engine") -> None:
        p, req = self.prep, self.prep.req
        t_start = time.perf_counter()
        ctx = engine.store.acquire(p.context_id) if p.context_id else None
        self.emit(("start", {"queue_s": t_start - self.submitted}))
        prompt_tokens = completion_tokens = 0
        first_stats: dict = {}
        ttft = None
        for pi, ids in enumerate(p.items):
            prompt_tokens += p.n_context + len(ids)
            for j in range(req.n):
                index = pi * req.n + j
                if self.cancelled.is_set():
                    engine.cancelled_count += 1
                    return
                seed = req.seed + index if req.seed is not None else secrets.randbits(63)
                n_new, reason, stats, t_first = engine.generate_one(self, ctx, ids, p.config, p.max_tokens[pi], req,
                                                                     index, seed)
                if self.cancelled.is_set():  # the client went away mid-generation
                    engine.cancelled_count += 1
                    return
                completion_tokens += n_new
                if index == 0:
                    first_stats = stats
                    ttft = None if t_first is None else t_first - self.submitted
                self.emit(("finish", index, reason, n_new, stats))
        extra = dict(p.extra)
        extra.update(
            queue_s=round(t_start - self.submitted, 6),
            ttft_s=None if ttft is None else round(ttft, 6),
            prefill_s=first_stats.get("prefill_s"),
            decode_tokens_per_s=first_stats.get("decode_tokens_per_s"),
        )
        if extra["decode_tokens_per_s"] != extra["decode_tokens_per_s"]:  # NaN (a single token) is not JSON
            extra["decode_tokens_per_s"] = None
        self.emit(("done", usage(prompt_tokens, completion_tokens, p.n_context * len(p.items)), extra))


class CreateContextJob(Job):
    def __init__(self, loop, ids: list[int], info, config: RetrievalConfig):
        super().__init__(loop)
        self.ids, self.info, self.config = ids, info, config

    def run(self, engine: "Engine") -> None:
        from ..context import PrefilledContext

        limit = max_positions(engine.model)
        if limit and len(self.ids) + 1 > limit and not engine.allow_extrapolation:
            raise ApiError(
                400,
                f"This model's maximum context length is {limit} tokens. However, the context has "
                f"{len(self.ids)} tokens, leaving no room for a question.",
                param="text", code="context_length_exceeded",
            )
        t0 = time.perf_counter()
        ctx = PrefilledContext.prefill(engine.model, self.ids, self.config)
        info = engine.store.add(self.info, ctx)
        out = info.public(engine.store.model_fingerprint)
        out["create_s"] = round(time.perf_counter() - t0, 6)
        self.emit(("done", out))


class Engine:
    """Owns the model; runs :class:`Job` objects sequentially on one thread."""

    def __init__(self, model, builder, store, *, allow_extrapolation: bool = False):
        self.model = model
        self.builder = builder
        self.store = store
        self.allow_extrapolation = allow_extrapolation
        eos = model.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, (list, tuple)) else ([] if eos is None else [eos]))
        self.queue: queue.Queue = queue.Queue()
        self.thread: threading.Thread | None = None
        self.num_threads = torch.get_num_threads()  # applied on the worker (numba's setting is per thread)
        self.busy = False
        self.current: Job | None = None
        self.jobs_done = 0
        self.cancelled_count = 0

    def start(self) -> None:
        if self.thread is None or not self.thread.is_alive():
            self.thread = threading.Thread(target=self._loop, name="retrieval-attention-model", daemon=True)
            self.thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel queued and running jobs, then end the worker thread."""
        while True:
            try:
                job = self.queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancel()
        if self.current is not None:
            self.current.cancel()
        if self.thread is not None and self.thread.is_alive():
            self.queue.put(None)
            self.thread.join(timeout)
        self.thread = None

    def submit(self, job: Job) -> Job:
        self.queue.put(job)
        return job

    @property
    def pending(self) -> int:
        return self.queue.qsize() + (1 if self.busy else 0)

    def _loop(self) -> None:
        torch.set_num_threads(self.num_threads)
        try:
            import numba

            numba.set_num_threads(min(self.num_threads, numba.config.NUMBA_NUM_THREADS))
        except Exception:  # noqa: BLE001 - numba missing or a smaller pool: keep its default
            pass
        while True:
            job = self.queue.get()
            if job is None:
                return
            if job.cancelled.is_set():  # its client left while it was queued
                self.cancelled_count += 1
                continue
            self.busy, self.current = True, job
            try:
                job.run(self)
            except ApiError as e:
                job.emit(("error", e))
            except Exception as e:  # noqa: BLE001 - one failing request must not stop the worker
                log.error("request failed:\n%s", traceback.format_exc())
                job.emit(("error", error_for_exception(e)))
            finally:
                self.busy, self.current = False, None
                self.jobs_done += 1

    # ---- one generation (worker thread) ---------------------------------------------------------------------
    def generate_one(self, job: Job, ctx, ids, config, max_tokens: int, req: GenRequest, index: int, seed: int):
        tracker = TextTracker(self.builder.decode, req.stop)
        sink = _Sink(tracker, lambda text: job.emit(("delta", index, text)))
        kw: dict[str, Any] = {"stopping_criteria": StoppingCriteriaList([_StopWhen(
            lambda: tracker.stopped or job.cancelled.is_set())])}
        if req.temperature > 0:
            kw.update(do_sample=True, temperature=req.temperature, top_p=req.top_p, top_k=0)
        else:
            kw["do_sample"] = False
        if req.ignore_eos:
            kw["eos_token_id"] = []
        torch.manual_seed(seed)
        if ctx is not None:
            new, stats = ctx.generate(self.model, ids, max_new_tokens=max_tokens, streamer=sink, config=config, **kw)
        else:
            seqs, stats = generate_ids(self.model, torch.tensor([ids]), config, max_new_tokens=max_tokens,
                                       streamer=sink, **kw)
            new = seqs[0, len(ids):].tolist()
        rest = tracker.flush()
        if rest:
            job.emit(("delta", index, rest))
        if tracker.stopped:
            reason = "stop"
        elif new and new[-1] in self.eos and not req.ignore_eos:
            reason = "stop"
        elif len(new) >= max_tokens:
            reason = "length"
        else:
            reason = "stop"
        clean = {k: v for k, v in stats.items() if isinstance(v, (int, float, str)) and v == v}
        return len(new), reason, clean, sink.t_first
