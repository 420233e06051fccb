"""Plot of session 18 (docs/BENCHMARKS.md), one H100 host: left, the 128K index build of session 17's code and
this session's (builds on CUDA streams of their own) and with the projection on the CPU kernels: the stage times
summed over the 32 layers (two builds run at once beside the prefill) and the user's wait after the prefill;
right, every timed 128K decode step of this session's runs (no stalled steps behind a compile subprocess).
Usage: ``python docs/bench/scripts/plot_s18.py`` -> docs/bench/h100_build_s18.png."""
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

BENCH = Path(__file__).resolve().parents[1]


def first(name):
    return json.loads((BENCH / name).read_text())[0]


runs = [("session 17's code", first("h100_decode_llama3-8b_128k_s18_old.json")),
        ("this session's code", first("h100_decode_llama3-8b_128k_s18.json")),
        ("this code,\nprojection=kernel", first("h100_decode_llama3-8b_128k_s18_kernel_projection.json"))]
stages = [("knn_s", "kNN"), ("projection_s", "projection"), ("reverse_s", "reverse edges"), ("repair_s", "repair"),
          ("convert_s", "convert")]
colors = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3"]
fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [1.2, 1.4]})
w = 0.38
for x, (label, r) in enumerate(runs):
    bottom = 0.0
    for i, (k, lab) in enumerate(stages):
        v = r["index_build_stages_s"][k]
        ax.bar(x - w / 2, v, bottom=bottom, width=w, color=colors[i], label=lab if x == 0 else None)
        bottom += v
    ax.text(x - w / 2, bottom + 3, f"{r['index_build_s']:.0f} s", ha="center", fontsize=8)
    ax.bar(x + w / 2, r["prefill_s"], width=w, color="#bbbbbb", label="prefill" if x == 0 else None)
    ax.bar(x + w / 2, r["index_wait_s"], bottom=r["prefill_s"], width=w, color="#333333",
           label="wait after the prefill" if x == 0 else None)
    ax.text(x + w / 2, r["prefill_s"] + r["index_wait_s"] + 3, f"wait {r['index_wait_s']:.0f} s", ha="center",
            fontsize=8)
ax.set_xticks(range(len(runs)), [lab for lab, _ in runs], fontsize=8)
ax.set_ylabel("seconds (left bar: build stages summed over 32 layers;\nright bar: prefill + wait)", fontsize=8)
ax.set_title("128K index build, Llama-3-8B shape, one H100 host", fontsize=10)
ax.legend(fontsize=7, loc="upper left")
for label, r in runs:
    steps = r["decode_ms_steps"]
    bx.plot(range(1, len(steps) + 1), steps, marker=".", label=f"{label.replace(chr(10), ' ')}: median "
            f"{r['decode_ms_per_token']:.1f} ms")
bx.set_ylim(0, 120)
bx.set_xlabel("timed decode step (after 4 warm-up steps)")
bx.set_ylabel("ms")
bx.set_title("every timed 128K step (warm inductor cache, compile in process)", fontsize=10)
bx.legend(fontsize=8)
fig.tight_layout()
out = BENCH / "h100_build_s18.png"
fig.savefig(out, dpi=110)
print(out)
