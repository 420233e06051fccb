"""Plot of session 22 (docs/BENCHMARKS.md), one H100 host: left, the time to the first decode step at 128K (prefill,
then the wait for the index) for the four combinations of hand-off (sync, async) and build schedule (overlap,
after_prefill), with full attention's prefill (no index, no budget) for reference; middle, decode ms/token split as
``bench decode`` reports it for the same runs and 512K, with full attention (no budget) and the 40 / 60 ms targets;
right, the occlusion-pruning kernel's time per call by warps per program against the torch ops
(``prune_bench.py``). Usage: ``python docs/bench/scripts/plot_s22.py`` -> docs/bench/h100_s22.png."""
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import profiler_table  # noqa: E402  (docs/bench/scripts/)

BENCH = Path(__file__).resolve().parents[1]


def record(name: str, method: str | None = None, budget: bool = True) -> dict:
    recs = json.loads((BENCH / name).read_text())
    return next(r for r in recs if (method is None or r["method"] == method) and not r.get("oom")
                and (r.get("gpu_memory_budget") is not None) == budget)


runs = [("sync,\noverlap", "h100_decode_llama3-8b_128k_s22.json"),
        ("async,\noverlap", "h100_decode_llama3-8b_128k_s22_async.json"),
        ("sync,\nafter prefill", "h100_decode_llama3-8b_128k_s22_after.json"),
        ("async,\nafter prefill", "h100_decode_llama3-8b_128k_s22_after_async.json")]
full = record("h100_decode_llama3-8b_128k_s22_ref.json", "full", budget=False)
off = record("h100_decode_llama3-8b_128k_s22_ref.json", "offload")

fig, (ax, bx, cx) = plt.subplots(1, 3, figsize=(18, 5.2), gridspec_kw={"width_ratios": [1.2, 1.4, 1.0]})
for x, (label, name) in enumerate(runs):
    r = record(name)
    wait, pf, ho = r["index_wait_s"], r["prefill_s"], r["prefill_handoff_s"]
    ax.bar(x, pf - ho, 0.55, color="#4c72b0", label="prefill, less the hand-off" if x == 0 else None)
    ax.bar(x, ho, 0.55, bottom=pf - ho, color="#8172b3", label="hand-off (in the prefill)" if x == 0 else None)
    ax.bar(x, wait, 0.55, bottom=pf, color="#dd8452", label="wait for the index after it" if x == 0 else None)
    ax.text(x, pf + wait + 1, f"{pf + wait:.1f} s\n(prefill {pf:.1f})", ha="center", fontsize=8)
ax.axhline(full["prefill_s"], color="k", ls=":", lw=1)
ax.text(len(runs) - 0.5, full["prefill_s"] + 1, f"full attention's prefill {full['prefill_s']:.1f} s", ha="right",
        fontsize=8)
ax.set_xticks(range(len(runs)), [r[0] for r in runs], fontsize=8)
ax.set_ylabel("seconds")
ax.set_ylim(0, 95)
ax.set_title("128K, 24 GB budget: time to the first decode step")
ax.legend(fontsize=8, loc="upper left")

dec = [(label.replace("\n", " ").replace(", ", ",\n"), name) for label, name in runs] + [
    ("512K: sync,\nafter prefill", "h100_decode_llama3-8b_512k_s22_after.json")]
profiler_table.stack_decode_breakdown(bx, [record(name) for _, name in dec], full)
bx.plot([-0.4, len(dec) - 1.6], [40, 40], color="k", ls=":", lw=1)
bx.text(-0.4, 41, "128K target 40", fontsize=8)
bx.plot([len(dec) - 1.4, len(dec) - 0.6], [60, 60], color="k", ls="--", lw=1)
bx.text(len(dec) - 1.4, 61, "512K target 60", fontsize=8)
bx.set_xticks(range(len(dec) + 1), [d[0] for d in dec] + ["128K full\n(no budget)"], fontsize=7)
bx.set_ylabel("decode ms/token (median)")
bx.set_ylim(0, 85)
bx.set_title(f"decode, 24 GB budget (128K offload: {off['decode_ms_per_token']:.0f} ms/token)")
bx.legend(fontsize=7, loc="upper left", ncol=2)

pb = json.loads((BENCH / "h100_prune_bench_s22.json").read_text())
# this run's default (``triton_ms``) was 4 warps, timed apart from the other counts
bars = [(f"{w} warp{'s' if w > 1 else ''}", pb[f"triton_{w}_warps_ms"] if w != 4 else pb["triton_ms"]) for w in (1, 2, 4, 8)]
bars.append(("torch ops", pb["torch_ms"]))
colors = ["#55a868", "#55a868", "#8c8c8c", "#8c8c8c", "#c44e52"]
for x, ((label, ms), c) in enumerate(zip(bars, colors)):
    cx.bar(x, ms, 0.6, color=c)
    cx.text(x, ms + 0.4, f"{ms:.1f}", ha="center", fontsize=8)
cx.set_xticks(range(len(bars)), [b[0] for b in bars], fontsize=8)
cx.set_ylabel("ms per call (median of 7)")
a = pb["args"]
cx.set_title(f"occlusion pruning: {a['pivots']:,} pivots x {a['cand']} candidates\n"
             f"over {a['keys']:,} keys (Triton kernel; 4 warps before, 1 now)", fontsize=10)
fig.tight_layout()
out = BENCH / "h100_s22.png"
fig.savefig(out, dpi=100)
print(out)
