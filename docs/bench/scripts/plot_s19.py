"""Plot of session 19 (docs/BENCHMARKS.md), one H100 host: left, where one standalone layer build's GPU time goes
(``torch.profiler`` of ``layer_build_profile.py``: 8 graphs over 128K keys, 8,192 training queries each) with the
occlusion pruning as one Triton kernel and as torch ops (the profiler lists its 20 costliest operators, so "other"
holds the rest: with the torch pruning most of it is that pruning's smaller operators, masks, copies and its
sequential rounds); right, the 128K prefill and the wait for the index after it, with each pruning (``bench
decode``, two processes on the machine). Usage: ``python docs/bench/scripts/plot_s19.py`` ->
docs/bench/h100_build_s19.png."""
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import profiler_table  # noqa: E402  (docs/bench/scripts/)

BENCH = Path(__file__).resolve().parents[1]
#: operator-name patterns of the profiler table -> the part of the build they belong to (first match wins; rows
#: of kernels are skipped where their aten operator is already counted)
PARTS = [("pruning", r"^(prune_kernel|aten::baddbmm|aten::bitwise_and|aten::any|aten::bmm)$"),
         ("host->GPU copies", r"^Memcpy HtoD"), ("GPU->host copies", r"^Memcpy DtoH"),
         ("kNN matmul", r"^aten::mm$"), ("top-k (group maxima, topk)", r"^aten::(amax|topk)$"),
         ("sort", r"^aten::sort$"), ("gathers / indexing", r"^aten::(index|gather)$")]


fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [1.3, 1.0]})
profiler_table.stack_build_parts(ax, [("pruning in Triton\n(default)", BENCH / "h100_layer_build_s19.log"),
                                      ("pruning as torch ops", BENCH / "h100_layer_build_s19_torch_prune.log")], PARTS)
ax.set_xticks([0, 1], ["pruning in Triton\n(default)", "pruning as torch ops"])
ax.set_ylabel("GPU time of one layer's build, ms")
ax.set_title("standalone 128K layer build (8 graphs), GPU time by part")
ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
runs = [("pruning in Triton\n(first process)", "h100_decode_llama3-8b_128k_s19.json"),
        ("pruning as torch ops\n(later process)", "h100_decode_llama3-8b_128k_s19_torch_prune.json")]
for x, (label, name) in enumerate(runs):
    r = json.loads((BENCH / name).read_text())[0]
    bx.bar(x, r["prefill_s"], 0.5, color="#4c72b0", label="prefill" if x == 0 else None)
    bx.bar(x, r["index_wait_s"], 0.5, bottom=r["prefill_s"], color="#dd8452",
           label="wait for the index after it" if x == 0 else None)
    bx.text(x, r["prefill_s"] + r["index_wait_s"] + 1, f"{r['prefill_s'] + r['index_wait_s']:.1f} s\n"
            f"(build {r['index_build_s']:.0f} s summed)", ha="center", fontsize=9)
bx.set_xticks(range(len(runs)), [r[0] for r in runs])
bx.set_ylabel("seconds")
bx.set_ylim(0, 95)
bx.set_title("128K, 24 GB budget: time to the first decode step")
bx.legend(fontsize=8, loc="lower right")
fig.tight_layout()
out = BENCH / "h100_build_s19.png"
fig.savefig(out, dpi=110)
print(out)
