"""Plot of session 17 (docs/BENCHMARKS.md): left, the 128K decode step of session 16's code and this session's on
one machine (instance B), split into the fused calls' parts and the rest of the step; right, every timed step of
instance C's runs (the 128K run's first steps stalled behind inductor's compile subprocess).
Usage: ``python docs/bench/scripts/plot_s17.py`` -> docs/bench/h100_decode_s17.png."""
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

BENCH = Path(__file__).resolve().parents[1]


def first(name):
    return json.loads((BENCH / name).read_text())[0]


fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [1, 1.6]})
runs = [("session 16's code", first("h100_decode_llama3-8b_128k_s17b_old.json")),
        ("session 17's code", first("h100_decode_llama3-8b_128k_s17b_new.json"))]
parts = [("python", "Python around the calls"), ("start", "until the last worker starts"),
         ("busy_max", "busiest worker"), ("join", "join")]
colors = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3"]
for x, (label, r) in enumerate(runs):
    bottom = 0.0
    c, b = r["search_call_ms"], r["breakdown_ms"]
    rest = [("host_wait_device", "host waits for the device"), ("host_other", "host other"),
            ("device_and_launch", "device + launches")]
    vals = [(lab, c[k]) for k, lab in parts] + [(lab, b[k]) for k, lab in rest]
    for i, (lab, v) in enumerate(vals):
        ax.bar(x, v, bottom=bottom, color=colors[i], label=lab if x == 0 else None, width=0.6)
        bottom += v
    ax.text(x, bottom + 0.8, f"{r['decode_ms_per_token']:.1f} ms (median)", ha="center")
ax.set_xticks(range(len(runs)), [lab for lab, _ in runs])
ax.set_ylabel("ms per token (call parts: means over the 32 layer calls of a step; rest: medians)", fontsize=8)
ax.set_title("128K, Llama-3-8B shape, 24 GB budget: one H100 host (B)")
ax.legend(fontsize=8, loc="upper right")
ax.set_ylim(0, 75)
for name, label in (("h100_decode_llama3-8b_32k_s17c_first.json", "32K, first process"),
                    ("h100_decode_llama3-8b_128k_s17c.json", "128K, second process (stalls)"),
                    ("h100_decode_llama3-8b_32k_s17c_compile_threads1.json", "32K, no compile subprocesses")):
    steps = first(name)["decode_ms_steps"]
    bx.plot(range(1, len(steps) + 1), steps, marker=".", label=label)
bx.set_yscale("log")
bx.set_xlabel("timed decode step (after 4 warm-up steps)")
bx.set_ylabel("ms")
bx.set_title("every timed step, one H100 host (C), session 17's code before the backend fix")
bx.legend(fontsize=8)
fig.tight_layout()
out = BENCH / "h100_decode_s17.png"
fig.savefig(out, dpi=110)
print(out)
