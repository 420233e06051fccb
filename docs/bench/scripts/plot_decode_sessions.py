"""Stacked bars of the 128K decode step (Llama-3-8B shape, roar) per run, from the committed JSON.
Usage: ``python docs/bench/scripts/plot_decode_sessions.py [out.png]`` (sessions 4-6, H200) or
``python docs/bench/scripts/plot_decode_sessions.py --s16 [out.png]`` (session 16's runs, H100 host, with the
same machine's full and offload as lines)."""
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = os.path.join(os.path.dirname(__file__), "..")
RUNS = [("session 4", "h200_decode_llama3-8b_roar_128k_s4.json"),
        ("session 5", "h200_decode_llama3-8b_128k_s5_default.json"),
        ("session 6", "h200_decode_llama3-8b_128k_s6_default.json"),
        ("session 6, ef 64\n1,024 train. queries", "h200_decode_llama3-8b_128k_s6_tq1024_ef64_offload.json")]
#: session 16 (H100 host): (label, file, variant of the record or None)
RUNS_S16 = [("defaults then\n(1 build, plain ops)", "h100_decode_llama3-8b_128k_s16_compile.json", None),
            ("plain ops again\\n(third timing)", "h100_decode_llama3-8b_128k_s16_compile.json", "decode_compile=False"),
            ("compiled ops", "h100_decode_llama3-8b_128k_s16_compile.json", "decode_compile=True"),
            ("2 builds", "h100_decode_llama3-8b_128k_s16_two_workers.json", None),
            ("16,384 train.\nqueries", "h100_decode_llama3-8b_128k_s16_train16384.json", None),
            ("compiled + 2 builds\n(new defaults)", "h100_decode_llama3-8b_128k_s16_compile_two_workers.json", None),
            ("same, ef 96", "h100_decode_llama3-8b_128k_s16_compile_two_workers.json", "ef=96")]
REF_S16 = "h100_decode_llama3-8b_128k_s16_ref.json"
PARTS = [("cpu_search", "CPU search + attention + residual"), ("host_other", "host other"),
         ("host_wait_device", "host waits for the device"), ("device_and_launch", "device + launches")]


def _records(name):
    d = json.load(open(os.path.join(HERE, name)))
    return d if isinstance(d, list) else d.get("records", [d])


def main(out, s16=False):
    labels, rows = [], []
    for label, name, *variant in (RUNS_S16 if s16 else RUNS):
        want = variant[0] if variant else None
        r = next(r for r in _records(name) if r.get("method") == "retrieval" and r.get("variant") == want)
        b = dict(r["breakdown_ms"])
        if "host_other" not in b:  # session 4 recorded the rest of the step as one number
            b["device_and_launch"] = b["rest_of_step"]
        labels.append(label)
        rows.append([b.get(k, 0.0) for k, _ in PARTS])
    fig, ax = plt.subplots(figsize=(12, 4.8) if s16 else (7.5, 4.2))
    bottom = [0.0] * len(rows)
    for j, (_, name) in enumerate(PARTS):
        vals = [row[j] for row in rows]
        ax.bar(labels, vals, bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, vals)]
    for x, tot in enumerate(bottom):
        ax.text(x, tot + 1, f"{tot:.1f}", ha="center")
    ax.axhline(40, color="k", ls="--", lw=1)
    ax.text(-0.45, 41, "target 40 ms", ha="left")
    ax.set_ylabel("ms per decoded token (median of 64)")
    if s16:
        ref = {(r["method"], r.get("gpu_memory_budget")): r for r in _records(REF_S16) if not r.get("oom")}
        full = ref[("full", None)]["decode_ms_per_token"]
        ax.axhline(full, color="tab:red", ls=":", lw=1.2)
        ax.text(-0.45, full - 4, f"full attention, no budget: {full:.1f} ms", ha="left", color="tab:red",
                backgroundcolor="white")
        off = ref[("offload", "24GB")]["decode_ms_per_token"]
        ax.set_ylim(0, 95)
        ax.text(-0.45, 88, f"offload (24 GB budget): {off:.0f} ms, off the chart", ha="left", color="tab:gray")
        ax.set_title("128K context, random Llama-3-8B shape, 24 GB budget, H100 host + 16 cores (session 16)")
    else:
        ax.set_title("128K context, random Llama-3-8B shape, 24 GB budget, H200 + 16 cores")
    if s16:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    else:
        ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--s16"]
    s16 = "--s16" in sys.argv[1:]
    default = "h100_decode_llama3-8b_128k_s16.png" if s16 else "h200_decode_llama3-8b_128k_sessions.png"
    main(args[0] if args else os.path.join(HERE, default), s16)
