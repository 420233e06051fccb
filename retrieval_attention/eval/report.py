"""Reports from per-sample records: ``summary.json``, ``results.md`` and PNG plots.

* ``summary.json``: a list with one record per model x method x task x length: ``method, task, length,
  accuracy`` (percent, mean of the per-sample scores), ``n`` (samples scored), ``agreement`` (percent of
  those samples whose output is identical to full attention's on the same prompt; ``null`` without
  ``full``), ``n_agreement`` and the method's budget (``base_method, index, top_k, n_sink, window``).
* ``results.md``: per model, accuracy with rows = method and columns = task x length, the average of the
  cells and the difference to ``full`` in points (over the cells both have); then the agreement with full
  attention per task.
* ``needle_heatmap_<model>.png``: ``niah`` accuracy by depth x length, one panel per method.
* ``budget_sweep_<model>.png``: average accuracy against top-k for each retrieval index (when a sweep ran),
  with full and streaming as horizontal lines.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from pathlib import Path

from .scoring import same_output

SUMMARY_FILE = "summary.json"
TABLE_FILE = "results.md"


def _ok(records):
    return [r for r in records if not r.get("error") and r.get("score") is not None]


def _mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def _order(records, key):
    seen = []
    for r in records:
        v = r.get(key)
        if v not in seen:
            seen.append(v)
    return seen


def length_label(n: int) -> str:
    if n % 1024 == 0:
        return f"{n // 1024}K"
    if n % 512 == 0:
        return f"{n / 1024:g}K"
    return str(n)


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(str(name)).name if str(name).endswith(".gguf") else str(name)).strip("_")


def _sample_key(r):
    return (r.get("model"), r.get("run"), r.get("task"), r.get("length"), r.get("depth"), r.get("sample"))


def agreement_pairs(records) -> dict[tuple, list[bool]]:
    """``(model, method, task, length) -> [same output as full, ...]`` over samples both finished."""
    ok = _ok(records)
    full = {_sample_key(r): r for r in ok if r.get("base_method") == "full"}
    out: dict[tuple, list[bool]] = defaultdict(list)
    for r in ok:
        f = full.get(_sample_key(r))
        if f is not None:
            out[(r["model"], r["method"], r["task"], r["length"])].append(same_output(r.get("output"), f.get("output")))
    return out


def summarize(records) -> list[dict]:
    """One summary record per model x method x task x length (see the module docstring)."""
    ok = _ok(records)
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in ok:
        groups[(r["model"], r["method"], r["task"], r["length"])].append(r)
    agree = agreement_pairs(records)
    has_full = {r["model"] for r in ok if r.get("base_method") == "full"}
    out = []
    for (model, method, task, length), rs in groups.items():
        a = agree.get((model, method, task, length))
        out.append(
            dict(
                model=model,
                method=method,
                task=task,
                length=length,
                accuracy=round(100.0 * _mean(r["score"] for r in rs), 4),
                n=len(rs),
                agreement=round(100.0 * _mean(a), 4) if a and model in has_full else None,
                n_agreement=len(a) if a else 0,
                base_method=rs[0].get("base_method"),
                index=rs[0].get("index"),
                top_k=rs[0].get("top_k"),
                n_sink=rs[0].get("n_sink"),
                window=rs[0].get("window"),
            )
        )
    order = {k: i for i, k in enumerate(_order(ok, "method"))}
    torder = {k: i for i, k in enumerate(_order(ok, "task"))}
    out.sort(key=lambda s: (str(s["model"]), order.get(s["method"], 0), torder.get(s["task"], 0), s["length"]))
    return out


def _fmt(x, signed=False):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:+.1f}" if signed else f"{x:.1f}"


def markdown_report(summary: list[dict], records: list[dict], meta: dict | None = None) -> str:
    """The ``results.md`` text (see the module docstring)."""
    meta = meta or {}
    st = meta.get("settings", {})
    lines = ["# Long-context evaluation", ""]
    if st:
        lines.append(
            f"Seed {st.get('seed')}; samples per task and length: {st.get('samples')} (niah: spread over depths "
            f"{', '.join(f'{d:g}' for d in st.get('depths', []))}); budgets: {st.get('n_sink')} sink + "
            f"{st.get('window')} window tokens, top-{st.get('top_k')} retrieval. Lengths are prompt tokens "
            "(chat template included). Scores in percent; RULER tasks score the fraction of expected items found."
        )
        lines.append("")
    ok = _ok(records)
    errors = [r for r in records if r.get("error")]
    for model in _order(summary, "model"):
        rows = [s for s in summary if s["model"] == model]
        methods = _order(rows, "method")
        tasks = _order(rows, "task")
        lengths = sorted({s["length"] for s in rows})
        cols = [(t, L) for t in tasks for L in lengths if any(s["task"] == t and s["length"] == L for s in rows)]
        cell = {(s["method"], s["task"], s["length"]): s for s in rows}
        full_label = next((s["method"] for s in rows if s["base_method"] == "full"), None)
        lines += [f"## {model}", "", "### Accuracy (%)", ""]
        header = ["method"] + [f"{t} {length_label(L)}" for t, L in cols] + ["avg", "Δ full"]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" + "---:|" * (len(header) - 1))
        for m in methods:
            vals = [cell[(m, t, L)]["accuracy"] if (m, t, L) in cell else None for t, L in cols]
            avg = _mean(v for v in vals if v is not None)
            if full_label is None or m == full_label:
                delta = None
            else:
                diffs = [cell[(m, t, L)]["accuracy"] - cell[(full_label, t, L)]["accuracy"]
                         for t, L in cols if (m, t, L) in cell and (full_label, t, L) in cell]
                delta = _mean(diffs) if diffs else None
            lines.append("| " + " | ".join([m] + [_fmt(v) for v in vals] + [_fmt(avg), _fmt(delta, True)]) + " |")
        ns = sorted({s["n"] for s in rows})
        lines += ["", f"Samples per cell: {ns[0]}" + (f"–{ns[-1]}" if len(ns) > 1 else "") + ".", ""]
        if full_label is not None and len(methods) > 1:
            pairs = agreement_pairs(ok)
            lines += ["### Agreement with full attention (% of samples with the identical output)", ""]
            header = ["method"] + tasks + ["all"]
            lines.append("| " + " | ".join(header) + " |")
            lines.append("|" + "---|" + "---:|" * (len(header) - 1))
            for m in methods:
                if m == full_label:
                    continue
                vals, allv = [], []
                for t in tasks:
                    v = [x for (mo, me, ta, _), xs in pairs.items() if mo == model and me == m and ta == t for x in xs]
                    allv += v
                    vals.append(100.0 * _mean(v) if v else None)
                lines.append("| " + " | ".join([m] + [_fmt(v) for v in vals] + [_fmt(100.0 * _mean(allv) if allv else None)]) + " |")
            lines.append("")
        timed = [r for r in ok if r.get("model") == model and r.get("time_s") is not None]
        if timed:
            lines += ["### Time per generation (means)", "",
                      "| method | generation (s) | prefill (s) | decode (tokens/s) | new tokens |",
                      "|---|---:|---:|---:|---:|"]
            for m in methods:
                rs = [r for r in timed if r["method"] == m]
                if not rs:
                    continue
                vals = [_mean(r[k] for r in rs if r.get(k) is not None)
                        for k in ("time_s", "prefill_s", "decode_tokens_per_s", "new_tokens")]
                lines.append("| " + " | ".join([m] + [_fmt(v) for v in vals]) + " |")
            lines.append("")
        model_errors = [r for r in errors if r.get("model") == model]
        if model_errors:
            lines += [f"{len(model_errors)} generation(s) failed (see `error` in results.jsonl); they are retried "
                      "on the next run and excluded above.", ""]
    return "\n".join(lines) + "\n"


def plot_needle_heatmap(records, path, model) -> bool:
    """``niah`` accuracy, depth (rows) x length (columns), one panel per method. False if no niah records."""
    rs = [r for r in _ok(records) if r.get("model") == model and r.get("task") == "niah" and r.get("depth") is not None]
    if not rs:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    methods = _order(rs, "method")
    depths = sorted({r["depth"] for r in rs})
    lengths = sorted({r["length"] for r in rs})
    fig, axes = plt.subplots(1, len(methods), figsize=(1.2 + 0.9 * len(lengths) * len(methods) + 1.0 * len(methods),
                                                       1.0 + 0.45 * len(depths)), squeeze=False, sharey=True)
    im = None
    for ax, m in zip(axes[0], methods):
        grid = np.full((len(depths), len(lengths)), np.nan)
        for i, d in enumerate(depths):
            for j, L in enumerate(lengths):
                v = [r["score"] for r in rs if r["method"] == m and r["depth"] == d and r["length"] == L]
                if v:
                    grid[i, j] = 100.0 * sum(v) / len(v)
        im = ax.imshow(grid, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto", origin="upper")
        for i in range(len(depths)):
            for j in range(len(lengths)):
                if not np.isnan(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.0f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(lengths)), [length_label(L) for L in lengths])
        ax.set_yticks(range(len(depths)), [f"{100 * d:.0f}%" for d in depths])
        ax.set_title(m, fontsize=9)
        ax.set_xlabel("prompt length (tokens)")
    axes[0][0].set_ylabel("needle depth")
    fig.colorbar(im, ax=axes[0].tolist(), label="accuracy (%)", shrink=0.9)
    fig.suptitle(f"needle in a haystack: {model}", fontsize=10, y=1.04)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return True


def plot_budget_sweep(summary, path, model) -> bool:
    """Average accuracy vs top-k per retrieval index (full/streaming as lines). False without a sweep."""
    rows = [s for s in summary if s["model"] == model]
    by_index: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for s in rows:
        if s["base_method"] == "retrieval" and s.get("top_k"):
            by_index[s["index"]][s["top_k"]].append(s["accuracy"])
    if not any(len(ks) > 1 for ks in by_index.values()):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for index, ks in by_index.items():
        xs = sorted(ks)
        ax.plot(xs, [_mean(ks[k]) for k in xs], marker="o", label=f"retrieval:{index}")
    for base, style in (("full", "--"), ("streaming", ":")):
        vals = [s["accuracy"] for s in rows if s["base_method"] == base]
        if vals:
            ax.axhline(_mean(vals), linestyle=style, color="gray" if base == "full" else "tab:red", label=base)
    ax.set_xscale("log")
    ticks = sorted({k for ks in by_index.values() for k in ks})
    ax.set_xticks(ticks, [str(k) for k in ticks])
    ax.minorticks_off()
    ax.set_xlabel("top-k (retrieved keys per head and step)")
    ax.set_ylabel("average accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.set_title(f"accuracy vs retrieval budget: {model}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return True


def write_reports(out_dir, records, meta: dict | None = None) -> dict:
    """Write ``summary.json``, ``results.md`` and the plots into ``out_dir``; returns the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(records)
    paths: dict = {}
    p = out_dir / SUMMARY_FILE
    p.write_text(json.dumps(summary, indent=1))
    paths["summary"] = p
    p = out_dir / TABLE_FILE
    p.write_text(markdown_report(summary, records, meta))
    paths["table"] = p
    plots = []
    for model in _order(_ok(records), "model"):
        hp = out_dir / f"needle_heatmap_{slug(model)}.png"
        if plot_needle_heatmap(records, hp, model):
            plots.append(hp)
        bp = out_dir / f"budget_sweep_{slug(model)}.png"
        if plot_budget_sweep(summary, bp, model):
            plots.append(bp)
    paths["plots"] = plots
    return paths
