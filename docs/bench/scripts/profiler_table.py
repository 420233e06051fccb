"""Shared by the plot scripts: GPU time per part of a build from the ``torch.profiler`` table that
``layer_build_profile.py`` prints (its 20 operators with the most self CUDA time), and its stacked bars; the
stacked decode-step breakdown of ``bench decode`` records."""
import re
from pathlib import Path


def device_ms(log: Path, parts: list[tuple[str, str]]) -> tuple[dict, float]:
    """(milliseconds of self CUDA time per part, the table's total) from the log ``log``. ``parts``: (part name,
    regex over the operator name) pairs; the first match wins, and operators matching none are left out."""
    text = Path(log).read_text()
    total = float(re.search(r"Self CUDA time total: ([\d.]+)ms", text).group(1))
    out = dict.fromkeys([p for p, _ in parts], 0.0)
    for line in text.splitlines():
        cols = re.split(r"\s{2,}", line.strip())
        if len(cols) < 10 or not cols[-5].endswith("s"):
            continue
        name, self_cuda = cols[0], cols[-5]
        ms = float(self_cuda[:-2]) / (1000.0 if self_cuda.endswith("us") else 1.0)
        for part, pat in parts:
            if re.search(pat, name):
                out[part] += ms
                break
    return out, total


#: colours of a build's parts in :func:`stack_build_parts`, in the order of ``parts``, then "other"
PART_COLORS = ["#c44e52", "#4c72b0", "#8172b3", "#55a868", "#dd8452", "#937860", "#da8bc3", "#bbbbbb"]


def stack_build_parts(ax, builds: list[tuple[str, Path]], parts: list[tuple[str, str]]) -> None:
    """One stacked bar per ``(label, log)`` of ``builds`` on the matplotlib axes ``ax`` (at x = 0, 1, ...): the
    build's GPU time per part (:func:`device_ms`), "other" for the operators not matched or below the table's top
    20, and the total above the bar. The legend labels come from the first bar."""
    for x, (_, log) in enumerate(builds):
        by_part, total = device_ms(log, parts)
        by_part["other"] = total - sum(by_part.values())
        bottom = 0.0
        for (part, ms), c in zip(by_part.items(), PART_COLORS):
            ax.bar(x, ms, 0.5, bottom=bottom, color=c, label=part if x == 0 else None)
            bottom += ms
        ax.text(x, bottom + 8, f"{total:.0f} ms", ha="center")


#: (``breakdown_ms`` key, legend label, colour) of the decode step's parts in :func:`stack_decode_breakdown`
DECODE_PARTS = [("cpu_search", "CPU search + attention", "#c44e52"),
                ("host_wait_device", "host waits for the GPU", "#8172b3"),
                ("host_other", "other host work", "#937860"),
                ("device_and_launch", "device work and launches", "#55a868")]


def stack_decode_breakdown(ax, records: list[dict], full: dict) -> None:
    """One stacked bar per ``bench decode`` record of ``records`` on the axes ``ax`` (at x = 0, 1, ...): its
    ``breakdown_ms`` parts (:data:`DECODE_PARTS`), "rest of the step" up to its ``decode_ms_per_token``, and the
    ms/token above the bar; then the full-attention record ``full`` as one bar at x = ``len(records)``. The legend
    labels come from the first bar."""
    for x, r in enumerate(records):
        bd, bottom = r.get("breakdown_ms") or {}, 0.0
        for key, lab, c in DECODE_PARTS:
            v = bd.get(key, 0.0) or 0.0
            ax.bar(x, v, 0.55, bottom=bottom, color=c, label=lab if x == 0 else None)
            bottom += v
        ax.bar(x, r["decode_ms_per_token"] - bottom, 0.55, bottom=bottom, color="#bbbbbb",
               label="rest of the step" if x == 0 else None)
        ax.text(x, r["decode_ms_per_token"] + 0.8, f"{r['decode_ms_per_token']:.1f}", ha="center", fontsize=8)
    x = len(records)
    ax.bar(x, full["decode_ms_per_token"], 0.55, color="#4c72b0", label="full attention, no budget (hf decode)")
    ax.text(x, full["decode_ms_per_token"] + 0.8, f"{full['decode_ms_per_token']:.1f}", ha="center", fontsize=8)
