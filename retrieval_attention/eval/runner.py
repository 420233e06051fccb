"""The evaluation loop: plan (models x lengths x tasks x samples x methods), resume, generate, score.

Each finished generation is appended to ``<out>/results.jsonl`` (flushed and synced), so an interrupted run
resumes where it stopped: a work item whose id is already in the file (without an error) is skipped. The id
holds everything that changes the answer: model, method and its budget, task, length, depth, sample index
and a fingerprint of the seed, haystack text, answer-prefix setting and token limit.

Samples are generated once per (task, length, depth, index) and given to every method, so the methods see
the same prompts; the prompt's token hash is stored with each record to check that.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import math
import os
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..generation import max_positions
from .tasks import DEFAULT_TASKS, TASKS, Haystack, LengthTooSmall, make_task, prompt_ids, sample_rng
from ..config import DEFAULT_EXACT_BELOW, DEFAULT_RESIDUAL_SAMPLES

RESULTS_FILE = "results.jsonl"
FORMAT_VERSION = 1
METHOD_NAMES = ("full", "retrieval", "streaming")


# --------------------------------------------------------------------------- methods


@dataclass(frozen=True)
class MethodSpec:
    """One attention method with its budget. ``label`` names it in records, tables and plots."""

    method: str
    index: str | None = None
    top_k: int | None = None
    n_sink: int | None = None
    window: int | None = None
    label: str = ""
    residual: int | None = None  # residual_samples of retrieval methods
    exact_below: int = 0  # RetrievalConfig.exact_below of retrieval methods (0: always the index)

    @property
    def fingerprint(self) -> str:
        if self.method == "full":
            return "full"
        if self.method == "streaming":
            return f"streaming[s{self.n_sink},w{self.window}]"
        x = f",x{self.exact_below}" if self.exact_below else ""  # records from before exact_below keep their ids
        return f"retrieval:{self.index}[s{self.n_sink},w{self.window},k{self.top_k},r{self.residual}{x}]"

    def config(self):
        """The :class:`~retrieval_attention.config.RetrievalConfig` (``None`` = plain full attention)."""
        if self.method == "full":
            return None
        from ..config import RetrievalConfig

        if self.method == "streaming":
            return RetrievalConfig(method="streaming", n_sink=self.n_sink, window=self.window, index="flat")
        return RetrievalConfig(
            method="retrieval", n_sink=self.n_sink, window=self.window, top_k=self.top_k, index=self.index,
            residual_samples=self.residual, exact_below=self.exact_below,
        )


def parse_methods(
    specs: list[str], n_sink: int = 128, window: int = 512, top_k: int = 100, budget_sweep: list[int] | None = None,
    residual: int = DEFAULT_RESIDUAL_SAMPLES, exact_below: int = 0,
) -> list[MethodSpec]:
    """Method specs -> :class:`MethodSpec` list.

    ``full``, ``streaming``, ``retrieval`` (= ``retrieval:roar``), ``retrieval:<index>`` or a bare index name
    (``roar``, ``flat``, ``ivf``, ``hnsw``); a retrieval spec may end in ``@r=<m>`` to set its residual samples
    (``retrieval:roar@r=0`` = the published method without the residual estimate; default ``residual``).
    With ``budget_sweep``, every retrieval method also runs at each listed top-k (labelled
    ``retrieval:<index>@k=<k>``; the ``--top-k`` run keeps the plain label).
    """
    from ..config import split_residual_option
    from ..index import available_indexes

    indexes = available_indexes()
    out: list[MethodSpec] = []
    for raw in specs:
        spec = raw.strip().lower()
        if not spec:
            continue
        spec, r_given = split_residual_option(spec)
        r = residual if r_given is None else r_given
        name, _, index = spec.partition(":")
        if name in indexes and not index:
            name, index = "retrieval", name
        if name not in METHOD_NAMES:
            raise ValueError(f"unknown method {raw!r}; use full, streaming, retrieval or retrieval:<index> "
                             f"(indexes: {', '.join(indexes)})")
        if name == "retrieval":
            index = index or "roar"
            if index not in indexes:
                raise ValueError(f"unknown index {index!r} in method {raw!r}; available: {', '.join(indexes)}")
            base = f"retrieval:{index}" + ("" if r_given is None else f"@r={r}")
            out.append(MethodSpec("retrieval", index, top_k, n_sink, window, base, r, exact_below))
            for k in budget_sweep or []:
                if k != top_k:
                    out.append(MethodSpec("retrieval", index, k, n_sink, window, f"{base}@k={k}", r, exact_below))
        elif r_given is not None:
            raise ValueError(f"method {name!r} takes no @r= option (got {raw!r})")
        elif index:
            raise ValueError(f"method {name!r} takes no index (got {raw!r})")
        elif name == "streaming":
            out.append(MethodSpec("streaming", None, None, n_sink, window, "streaming"))
        else:
            out.append(MethodSpec("full", label="full"))
    seen, uniq = set(), []
    for m in out:
        if m.label not in seen:
            seen.add(m.label)
            uniq.append(m)
    if not uniq:
        raise ValueError("no methods given")
    if budget_sweep and not any(m.method == "retrieval" for m in uniq):
        raise ValueError("--budget-sweep needs a retrieval method in --methods")
    for m in uniq:
        m.config()  # validates budgets (positive integers) early
    return uniq


# --------------------------------------------------------------------------- settings and plan


@dataclass
class EvalSettings:
    out_dir: str | Path
    models: list[str] = field(default_factory=lambda: ["smollm2"])
    tasks: list[str] = field(default_factory=lambda: list(DEFAULT_TASKS))
    methods: list[str] = field(default_factory=lambda: ["full", "retrieval", "streaming"])
    lengths: list[int] = field(default_factory=lambda: [1024, 2048, 4096])
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    samples: int = 20
    seed: int = 0
    n_sink: int = 128
    window: int = 512
    top_k: int = 100
    residual_samples: int = DEFAULT_RESIDUAL_SAMPLES
    exact_below: int = DEFAULT_EXACT_BELOW
    budget_sweep: list[int] = field(default_factory=list)
    max_new_tokens: int | None = None
    haystack_files: list[str] | None = None
    answer_prefix: bool = True
    device: str | None = None
    dtype: str | None = None
    allow_extrapolation: bool = False
    progress: bool = True
    #: ``(i, n)``: run only the samples of shard ``i`` of ``n`` (parallel workers sharing one ``out_dir``)
    shard: tuple[int, int] | None = None
    #: run a sample's methods from one shared prefill (:func:`retrieval_attention.generation.generate_many`)
    #: when the default generation function is used and the methods allow it
    shared_prefill: bool = True

    def validate(self) -> None:
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown task(s) {', '.join(unknown)}; available: {', '.join(TASKS)}")
        if not self.tasks or not self.models or not self.lengths:
            raise ValueError("tasks, models and lengths must not be empty")
        if any(int(n) < 64 for n in self.lengths):
            raise ValueError(f"lengths must be at least 64 tokens, got {self.lengths}")
        if any(not 0.0 <= d <= 1.0 for d in self.depths) or not self.depths:
            raise ValueError(f"depths must be fractions in [0, 1], got {self.depths}")
        if self.samples < 1:
            raise ValueError("samples must be >= 1")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if self.shard is not None:
            i, n = self.shard
            if not (isinstance(n, int) and n >= 1 and isinstance(i, int) and 0 <= i < n):
                raise ValueError(f"shard must be I/N with 0 <= I < N, got {i}/{n}")


@dataclass(frozen=True)
class SampleKey:
    task: str
    length: int
    depth: float | None
    index: int

    @property
    def text(self) -> str:
        d = "rand" if self.depth is None else f"{self.depth:g}"
        return f"{self.task}|L{self.length}|d{d}|i{self.index}"


def task_sample_keys(task_cls, length: int, samples: int, depths: list[float]) -> list[SampleKey]:
    """Depth-grid tasks (``niah``) spread their samples over the depths (at least one per depth); other tasks
    draw their needle positions at random."""
    if task_cls.depth_grid:
        n = max(samples, len(depths))
        return [SampleKey(task_cls.name, length, float(depths[i % len(depths)]), i) for i in range(n)]
    return [SampleKey(task_cls.name, length, None, i) for i in range(samples)]


def shard_of(key: SampleKey, n: int) -> int:
    """Shard (0..n-1) of a sample: a stable hash of its key, so every method of a sample runs in one worker
    (its prompt is built once) and the assignment does not depend on the plan's order."""
    return int(hashlib.sha1(key.text.encode()).hexdigest()[:8], 16) % n


def run_fingerprint(settings: EvalSettings, haystack_fp: str) -> str:
    d = dict(v=FORMAT_VERSION, seed=settings.seed, haystack=haystack_fp, answer_prefix=settings.answer_prefix,
             max_new_tokens=settings.max_new_tokens)
    return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]


def record_id(model: str, method: MethodSpec, key: SampleKey, run_fp: str) -> str:
    return f"{model}|{method.fingerprint}|{key.text}|{run_fp}"


# --------------------------------------------------------------------------- results file


def read_results(path: str | Path) -> list[dict]:
    """Records of a results JSONL; a partially written last line (interrupted run) is dropped from the file."""
    path = Path(path)
    if not path.exists():
        return []
    raw = path.read_bytes()
    if raw and not raw.endswith(b"\n"):
        cut = raw.rfind(b"\n") + 1
        with open(path, "r+b") as f:
            f.truncate(cut)
        raw = raw[:cut]
    out = []
    for line in raw.decode("utf-8", "replace").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def append_result(path: Path, record: dict) -> None:
    """Append one record as one ``write`` on an ``O_APPEND`` descriptor: lines of parallel workers (shards)
    sharing the file never interleave."""
    line = (json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        view = memoryview(line)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    try:
        return float(v)
    except (TypeError, ValueError):
        return str(v)


# --------------------------------------------------------------------------- generation adapter


def default_generate_fn() -> Callable:
    from ..generation import generate

    return generate


def default_generate_many_fn() -> Callable:
    from ..generation import generate_many

    return generate_many


def call_generate(fn, model, tokenizer, ids, config, max_new_tokens, allow_extrapolation):
    """Run one generation through ``fn`` (the contract of :func:`retrieval_attention.generation.generate`),
    given prompt token ids. Returns ``(text, new_token_count, stats)``."""
    out = fn(model, tokenizer, list(ids), config, max_new_tokens=max_new_tokens, chat=False,
             allow_extrapolation=allow_extrapolation)
    if isinstance(out, str):
        return out, None, {}
    stats = dict(getattr(out, "stats", None) or {})
    token_ids = getattr(out, "token_ids", None)
    return out.text, (len(token_ids) if token_ids is not None else stats.get("new_tokens")), stats


_STAT_KEYS = ("prefill_s", "decode_tokens_per_s", "index_build_s", "kv_device_bytes", "kv_cpu_bytes",
              "shared_prefill_s")


# --------------------------------------------------------------------------- the run


@dataclass
class RunResult:
    out_dir: Path
    results_path: Path
    records: list[dict]
    n_generated: int
    n_skipped: int
    n_errors: int
    reports: dict[str, Any] = field(default_factory=dict)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_eval(
    settings: EvalSettings,
    *,
    generate_fn: Callable | None = None,
    load_model_fn: Callable | None = None,
    write_reports: bool = True,
) -> RunResult:
    """Run (or resume) the evaluation described by ``settings``; returns the records of this plan.

    ``generate_fn``: the generation function (default :func:`retrieval_attention.generation.generate`).
    ``load_model_fn(name, device=..., dtype=...) -> (model, tokenizer)``: default
    :func:`retrieval_attention.models.load_model`.
    """
    settings.validate()
    methods = parse_methods(settings.methods, settings.n_sink, settings.window, settings.top_k,
                            settings.budget_sweep, settings.residual_samples, settings.exact_below)
    out_dir = Path(settings.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results_path = out_dir / RESULTS_FILE
    haystack = Haystack.essays(settings.haystack_files)
    run_fp = run_fingerprint(settings, haystack.fingerprint)
    tasks = {name: make_task(name, haystack, answer_prefix=settings.answer_prefix) for name in settings.tasks}

    meta = dict(
        settings={k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(settings).items()
                  if k != "shard"},
        methods=[dataclasses.asdict(m) for m in methods],
        run=run_fp,
        haystack=dict(name=haystack.name, fingerprint=haystack.fingerprint, chars=len(haystack.text)),
    )
    (out_dir / "run.json").write_text(json.dumps(meta, indent=2))

    existing = read_results(results_path)
    done = {r["id"] for r in existing if r.get("id") and not r.get("error")}

    plan: list[tuple[str, SampleKey, MethodSpec, str]] = []
    for model_name in settings.models:
        for length in settings.lengths:
            for tname in settings.tasks:
                for key in task_sample_keys(TASKS[tname], int(length), settings.samples, settings.depths):
                    for m in methods:
                        plan.append((model_name, key, m, record_id(model_name, m, key, run_fp)))
    if settings.shard is not None:
        plan = [p for p in plan if shard_of(p[1], settings.shard[1]) == settings.shard[0]]
    plan_ids = {p[3] for p in plan}
    pending = [p for p in plan if p[3] not in done]
    n_skipped = len(plan) - len(pending)
    if n_skipped:
        _log(f"resuming: {n_skipped} of {len(plan)} generations already in {results_path}")

    many_fn = default_generate_many_fn() if generate_fn is None and settings.shared_prefill else None
    generate_fn = generate_fn or default_generate_fn()
    if load_model_fn is None:
        from ..models import load_model as load_model_fn

    n_generated = n_errors = 0
    pbar = None
    try:
        if pending:
            from tqdm.auto import tqdm

            pbar = tqdm(total=len(pending), unit="gen", desc="eval", disable=not settings.progress,
                        dynamic_ncols=True, file=sys.stderr)
        for model_name in settings.models:
            todo = [p for p in pending if p[0] == model_name]
            if not todo:
                continue
            _log(f"loading model {model_name} ...")
            t0 = time.perf_counter()
            model, tokenizer = load_model_fn(model_name, device=settings.device, dtype=settings.dtype)
            _log(f"model {model_name} loaded in {time.perf_counter() - t0:.1f} s")
            limit = max_positions(model)
            by_sample: dict[SampleKey, list[tuple[MethodSpec, str]]] = {}
            for _, key, m, rid in todo:
                by_sample.setdefault(key, []).append((m, rid))
            skipped_lengths: set[int] = set()
            for key, items in by_sample.items():
                task = tasks[key.task]
                max_new = settings.max_new_tokens or task.max_new_tokens
                target = key.length
                if limit and not settings.allow_extrapolation:
                    if key.length > limit:
                        if key.length not in skipped_lengths:
                            skipped_lengths.add(key.length)
                            _log(f"skipping length {key.length} for {model_name}: beyond its {limit} positions "
                                 "(use --allow-extrapolation to run it anyway)")
                        if pbar is not None:
                            pbar.update(len(items))
                        continue
                    target = min(key.length, limit - max_new)
                if pbar is not None:
                    pbar.set_postfix_str(f"{model_name} {key.task} L={key.length}", refresh=False)
                base = dict(model=model_name, task=key.task, length=key.length, depth=key.depth, sample=key.index,
                            seed=settings.seed, run=run_fp)
                try:
                    sample = task.make_sample(sample_rng(settings.seed, key.text), tokenizer, target, key.depth)
                except LengthTooSmall as e:
                    _log(f"cannot build {key.text}: {e}")
                    for m, rid in items:
                        rec = dict(id=rid, **base, **_method_fields(m), error=f"LengthTooSmall: {e}")
                        append_result(results_path, rec)
                        existing.append(rec)
                        n_errors += 1
                        if pbar is not None:
                            pbar.update(1)
                    continue
                ids = prompt_ids(tokenizer, sample)
                prompt_sha = hashlib.sha1(json.dumps(ids).encode()).hexdigest()[:12]
                shared = None
                if many_fn is not None and len(items) > 1:
                    try:  # one prefill for all methods of this sample
                        shared = many_fn(model, tokenizer, list(ids), [m.config() for m, _ in items],
                                         max_new_tokens=max_new, chat=False,
                                         allow_extrapolation=settings.allow_extrapolation)
                    except (KeyboardInterrupt, SystemExit):
                        raise
                    except Exception as e:  # each method then runs (and fails or not) on its own
                        _log(f"shared prefill failed for {key.text}: {type(e).__name__}: {e}; running methods one by one")
                for j, (m, rid) in enumerate(items):
                    rec = dict(id=rid, **base, **_method_fields(m), prompt_tokens=len(ids), prompt_sha=prompt_sha,
                               depth_actual=sample.meta.get("depth_actual"), answers=sample.answers,
                               max_new_tokens=max_new)
                    t1 = time.perf_counter()
                    try:
                        if shared is not None:
                            out = shared[j]
                            text, n_new, stats = out.text, len(out.token_ids), dict(out.stats)
                            t1 -= stats.get("elapsed_s", 0.0)  # time_s = shared prefill + this method's part
                        else:
                            text, n_new, stats = call_generate(generate_fn, model, tokenizer, ids, m.config(),
                                                               max_new, settings.allow_extrapolation)
                    except (KeyboardInterrupt, SystemExit):
                        raise
                    except Exception as e:  # keep going; the record is retried on resume
                        n_errors += 1
                        rec.update(error=f"{type(e).__name__}: {e}", time_s=time.perf_counter() - t1)
                        _log(f"generation failed for {rid}: {rec['error']}\n{traceback.format_exc(limit=3)}")
                    else:
                        rec.update(output=text, score=float(task.score(text, sample)), new_tokens=n_new,
                                   time_s=time.perf_counter() - t1,
                                   **{k: stats.get(k) for k in _STAT_KEYS if k in stats})
                        n_generated += 1
                    rec = _clean(rec)
                    append_result(results_path, rec)
                    existing.append(rec)
                    if pbar is not None:
                        pbar.update(1)
            del model, tokenizer
            gc.collect()
    finally:
        if pbar is not None:
            pbar.close()
        records = _latest(r for r in existing if r.get("id") in plan_ids)
        result = RunResult(out_dir, results_path, records, n_generated, n_skipped, n_errors)
        if write_reports and records:
            from .report import write_reports as _write

            try:
                result.reports = _write(out_dir, records, meta)
            except Exception as e:  # never lose the run because a plot failed
                warnings.warn(f"writing reports failed: {type(e).__name__}: {e}")
    return result


def _method_fields(m: MethodSpec) -> dict:
    return dict(method=m.label, base_method=m.method, index=m.index, top_k=m.top_k, n_sink=m.n_sink,
                window=m.window, residual_samples=m.residual,
                exact_below=m.exact_below if m.method == "retrieval" else None)


def _latest(records) -> list[dict]:
    """One record per id: the last one written (a successful retry replaces an earlier error)."""
    by_id: dict[str, dict] = {}
    for r in records:
        prev = by_id.get(r["id"])
        if prev is None or not (r.get("error") and not prev.get("error")):
            by_id[r["id"]] = r
    return list(by_id.values())
