"""Stacked bars of the decode step (H200 host, Llama-3-8B shape, 24 GB budget, roar at the defaults) at 32K, 128K
and 512K, with full (no budget) and offload of the 128K run as lines, from the committed JSON (sessions 10-11);
and the same records as ms/token against context per method (``bench decode``'s own plot), ``..._vs_context.png``.
Usage: ``python docs/bench/scripts/plot_decode_contexts.py [out.png]``."""
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = os.path.join(os.path.dirname(__file__), "..")
RUNS = [("32K\n(session 10)", "h200_decode_llama3-8b_32k_s10.json"),
        ("128K", "h200_decode_llama3-8b_128k_s11_ratios.json"),
        ("128K, no residual\n(published method)", "h200_decode_llama3-8b_128k_s11_residual0.json"),
        ("512K\n(8,192 train. queries)", "h200_decode_llama3-8b_512k_s11.json")]
PARTS = [("cpu_search", "CPU search + attention (+ residual)"), ("host_other", "host other"),
         ("host_wait_device", "host waits for the device"), ("device_and_launch", "device + launches")]


def records(name):
    d = json.load(open(os.path.join(HERE, name)))
    return d if isinstance(d, list) else d.get("records", [d])


def main(out):
    fig, ax = plt.subplots(figsize=(8, 4.8))
    for x, (label, name) in enumerate(RUNS):
        r = next(r for r in records(name) if r.get("method") == "retrieval")
        bottom = 0.0
        for i, (key, part) in enumerate(PARTS):
            v = r["breakdown_ms"][key]
            ax.bar(x, v, bottom=bottom, color=f"C{i}", label=part if x == 0 else None)
            bottom += v
        ax.text(x, bottom + 1, f"{r['decode_ms_per_token']:.1f} ms\n{100 * r['scanned_fraction']:.2f}% scanned",
                ha="center", va="bottom", fontsize=8)
    ref = {r["method"]: r for r in records(RUNS[1][1]) if not r.get("oom")}
    ax.axhline(ref["full"]["decode_ms_per_token"], color="k", ls="--", lw=1,
               label=f"full, 128K, no budget ({ref['full']['decode_ms_per_token']:.1f} ms)")
    ax.axhline(40, color="r", ls=":", lw=1, label="issue 5 target at 128K (40 ms)")
    ax.set_xticks(range(len(RUNS)), [r[0] for r in RUNS], fontsize=8)
    ax.set_ylabel("decode ms / token (median)")
    ax.set_ylim(0, 125)
    ax.set_title(f"Llama-3-8B shape, H200 + 16 host cores, 24 GB budget; offload at 128K: "
                 f"{ref['offload']['decode_ms_per_token']:.0f} ms", fontsize=9)
    ax.legend(fontsize=7, loc="upper center", ncol=2)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print("wrote", out)
    from retrieval_attention.bench.decode import plot

    recs = [r for _, name in RUNS if "residual0" not in name for r in records(name)]
    out2 = out.replace(".png", "_vs_context.png")
    plot(recs, out2, "8B shape, H200, 24 GB (sessions 10-11)")
    print("wrote", out2)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "h200_decode_contexts_s11.png"))
