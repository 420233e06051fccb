"""Plot of session 20 (docs/BENCHMARKS.md), one H100 host: left, one standalone 128K layer build's GPU time by part
with the layer's keys resident on the GPU for all build stages (the default) and with a copy per stage
(``layer_build_profile.py``; "other" holds the operators below the profiler's top 20); middle, the 128K prefill
and the wait for the index after it (``bench decode``: the defaults twice, the builds' streams at high priority,
one build worker, and the streaming method, which builds nothing); right, decode ms/token split as ``bench decode``
reports it, with the full-attention reference (no budget) and offload. Usage:
``python docs/bench/scripts/plot_s20.py`` -> docs/bench/h100_s20.png."""
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import profiler_table  # noqa: E402  (docs/bench/scripts/)

BENCH = Path(__file__).resolve().parents[1]
#: operator-name patterns of the profiler table -> the part of the build they belong to (first match wins)
PARTS = [("pruning (Triton)", r"^prune_kernel"), ("host->GPU copies", r"^Memcpy HtoD"),
         ("GPU->host copies", r"^Memcpy DtoH"), ("kNN matmul", r"^aten::mm$"),
         ("top-k (group maxima, topk)", r"^aten::(amax|topk)$"), ("sort", r"^aten::sort$"),
         ("gathers / indexing", r"^aten::(index|gather)$")]


def record(name: str, method: str | None = None) -> dict:
    recs = json.loads((BENCH / name).read_text())
    return next(r for r in recs if method is None or (r["method"] == method and not r.get("oom")))


fig, (ax, bx, cx) = plt.subplots(1, 3, figsize=(18, 5.2), gridspec_kw={"width_ratios": [1.1, 1.3, 1.3]})
builds = [("keys resident\n(default)", "h100_layer_build_s20.log"),
          ("a copy per stage", "h100_layer_build_s20_copies.log")]
profiler_table.stack_build_parts(ax, [(label, BENCH / log) for label, log in builds], PARTS)
ax.set_xticks(range(len(builds)), [b[0] for b in builds])
ax.set_ylabel("GPU time of one layer's build, ms")
ax.set_ylim(0, 1250)
ax.set_title("standalone 128K layer build (8 graphs)")
ax.legend(fontsize=7, loc="upper left")

runs = [("defaults", "h100_decode_llama3-8b_128k_s20.json"), ("defaults\n(again)", "h100_decode_llama3-8b_128k_s20_2.json"),
        ("builds at high\nstream priority", "h100_decode_llama3-8b_128k_s20_high_priority.json"),
        ("one build\nworker", "h100_decode_llama3-8b_128k_s20_one_build_worker.json"),
        ("streaming\n(no index)", "h100_decode_llama3-8b_128k_s20_streaming.json")]
for x, (label, name) in enumerate(runs):
    r = record(name)
    wait = r.get("index_wait_s") or 0.0
    bx.bar(x, r["prefill_s"], 0.55, color="#4c72b0", label="prefill" if x == 0 else None)
    bx.bar(x, wait, 0.55, bottom=r["prefill_s"], color="#dd8452", label="wait for the index after it" if x == 0 else None)
    build = f"\nbuild {r['index_build_s']:.0f} s\nsummed" if r.get("index_build_s") else ""
    bx.text(x, r["prefill_s"] + wait + 1, f"{r['prefill_s'] + wait:.1f} s{build}", ha="center", fontsize=7)
bx.set_xticks(range(len(runs)), [r[0] for r in runs], fontsize=8)
bx.set_ylabel("seconds")
bx.set_ylim(0, 110)
bx.set_title("128K, 24 GB budget: time to the first decode step")
bx.legend(fontsize=8, loc="upper right")

dec = runs[:4] + [("streaming", "h100_decode_llama3-8b_128k_s20_streaming.json")]
full = next(r for r in json.loads((BENCH / "h100_decode_llama3-8b_128k_s20_ref.json").read_text())
            if r["method"] == "full" and not r.get("oom"))
off = record("h100_decode_llama3-8b_128k_s20_ref.json", "offload")
profiler_table.stack_decode_breakdown(cx, [record(name) for _, name in dec], full)
cx.axhline(40, color="k", ls=":", lw=1)
cx.text(len(dec) + 0.4, 40.8, "target 40", ha="right", fontsize=8)
cx.set_xticks(range(len(dec) + 1), [d[0] for d in dec] + ["full\n(no budget)"], fontsize=8)
cx.set_ylabel("decode ms/token (median of 64 steps)")
cx.set_ylim(0, 62)
cx.set_title(f"128K decode, 24 GB budget (offload: {off['decode_ms_per_token']:.0f} ms/token)")
cx.legend(fontsize=7, loc="upper right")
fig.tight_layout()
out = BENCH / "h100_s20.png"
fig.savefig(out, dpi=100)
print(out)
