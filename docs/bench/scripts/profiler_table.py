"""Shared by the plot scripts: GPU time per part of a build from the ``torch.profiler`` table that
``layer_build_profile.py`` prints (its 20 operators with the most self CUDA time)."""
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
