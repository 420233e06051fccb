"""Stacked bars of the 128K index build (H200, Llama-3-8B shape, all 32 layers) by stage, for the committed
``bench decode`` JSON of session 9, with each run's prefill time marked (the issue's target: build <= prefill).
Usage: ``python docs/bench/scripts/plot_build_stages.py [out.png]``."""
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = os.path.join(os.path.dirname(__file__), "..")
RUNS = [("compiled kernels\n(16 CPU threads)", "h200_decode_llama3-8b_128k_s9_kernel.json"),
        ("torch projection, kernel\nreverse edges (other instance)", "h200_decode_llama3-8b_128k_s9_torch_projection_kernel_reverse.json"),
        ("torch projection and\nreverse edges (default)", "h200_decode_llama3-8b_128k_s9_default.json")]
STAGES = [("knn_s", "kNN of training queries (GPU)"), ("projection_s", "projection"), ("reverse_s", "reverse edges"),
          ("repair_s", "connectivity repair"), ("convert_s", "key conversion")]


def main(out):
    labels, rows, prefill = [], [], []
    for label, name in RUNS:
        r = json.load(open(os.path.join(HERE, name)))[0]
        labels.append(label)
        st = r["index_build_stages_s"]
        rows.append([st[k] for k, _ in STAGES] + [r["index_build_s"] - sum(st[k] for k, _ in STAGES)])
        prefill.append(r["prefill_s"])
    fig, ax = plt.subplots(figsize=(7.5, 4.4))
    bottom = [0.0] * len(rows)
    for j, (_, name) in enumerate(STAGES + [("", "rest (outside the recorded stages)")]):
        vals = [row[j] for row in rows]
        ax.bar(labels, vals, bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, vals)]
    for x, (tot, p) in enumerate(zip(bottom, prefill)):
        ax.text(x, tot + 3, f"{tot:.0f} s", ha="center")
        ax.plot([x - 0.4, x + 0.4], [p, p], color="k", ls="--", lw=1, label="prefill" if x == 0 else None)
    ax.set_ylabel("seconds (sum over 32 layers)")
    ax.set_title("Index build at 128K, Llama-3-8B shape, H200 host (session 9)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "h200_build_stages_128k_s9.png"))
