"""Stacked bars of the 128K decode step (H200, Llama-3-8B shape, roar at the defaults) per session, from the
committed JSON. Usage: ``python docs/bench/scripts/plot_decode_sessions.py [out.png]``."""
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
PARTS = [("cpu_search", "CPU search + attention + residual"), ("host_other", "host other"),
         ("host_wait_device", "host waits for the device"), ("device_and_launch", "device + launches")]


def main(out):
    labels, rows = [], []
    for label, name in RUNS:
        d = json.load(open(os.path.join(HERE, name)))
        recs = d if isinstance(d, list) else d.get("records", [d])
        r = next(r for r in recs if r.get("method") == "retrieval")
        b = dict(r["breakdown_ms"])
        if "host_other" not in b:  # session 4 recorded the rest of the step as one number
            b["device_and_launch"] = b["rest_of_step"]
        labels.append(label)
        rows.append([b.get(k, 0.0) for k, _ in PARTS])
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
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
    ax.set_title("128K context, random Llama-3-8B shape, 24 GB budget, H200 + 16 cores")
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "h200_decode_llama3-8b_128k_sessions.png"))
