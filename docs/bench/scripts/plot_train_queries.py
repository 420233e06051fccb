"""Recall@100 vs keys scanned at 128K tokens (SmolLM2, H200 host, session 8) per training-query count and graph
layout, from the committed JSON. Usage: ``python docs/bench/scripts/plot_train_queries.py [out.png]``."""
import json
import os
import sys

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = os.path.join(os.path.dirname(__file__), "..")
FILES = ["h200host_recall_smollm2_128k_s8_ef32-200.json", "h200host_recall_smollm2_128k_s8_ef256-1536.json",
         "h200host_recall_smollm2_128k_s8_train16k.json", "h200host_recall_smollm2_128k_s8_train8k_32k.json"]
LABELS = {"roar": "per KV head, 4,096 training queries (old default)",
          "roar:max_train_queries=8192": "per KV head, 8,192",
          "roar:max_train_queries=16384": "per KV head, 16,384 (new default at 128K)",
          "roar:max_train_queries=32768": "per KV head, 32,768",
          "roar:graph_per=query_head": "per query head, 4,096",
          "roar:graph_per=query_head:max_train_queries=16384": "per query head, 16,384"}


def main(out):
    curves = {}
    for name in FILES:
        for r in json.load(open(os.path.join(HERE, name))):
            curves.setdefault(r["index"], []).append((100 * r["scanned_fraction"], r["recall_at_100"]))
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for key, label in LABELS.items():
        pts = sorted(set(curves.get(key, [])))
        if pts:
            ax.plot(*zip(*pts), marker="o", ms=3, ls="--" if "query_head" in key else "-", label=label)
    ax.axhline(0.95, color="gray", lw=0.8)
    ax.axvline(2, color="gray", lw=0.8, ls=":")
    ax.axvline(3, color="gray", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_xticks([0.3, 0.5, 1, 2, 3, 4])
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlim(0.25, 5)
    ax.set_ylim(0.5, 1.0)
    ax.set_xlabel("keys scanned (%)")
    ax.set_ylabel("recall@100 (6 layers, 9 query heads, 32 decode steps)")
    ax.set_title("roar at 128K tokens, SmolLM2-135M vectors (H200 host)")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print("wrote", out)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "h200host_recall_smollm2_128k_train_queries.png"))
