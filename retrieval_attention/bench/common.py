"""Helpers shared by the ``bench`` sub-commands: machine description, markdown tables, docs sections, specs."""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import re
import shlex
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

DOCS_TITLE = "# Benchmarks"


# ---- machine ------------------------------------------------------------------------------------------------------
def cpu_model() -> str:
    """The CPU model name from ``/proc/cpuinfo`` (``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine_info() -> dict[str, Any]:
    """Cores usable by this process, CPU model, thread setting, library versions and today's date."""
    from ..threads import available_cores

    info: dict[str, Any] = {
        "cores": available_cores(),
        "cpu": cpu_model(),
        "threads": os.environ.get("OMP_NUM_THREADS"),
        "python": platform.python_version(),
        "date": _dt.date.today().isoformat(),
    }
    try:  # other jobs on the machine distort timings: say how busy it was
        info["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - not available
        pass
    for mod in ("torch", "transformers", "numpy", "faiss", "numba"):
        try:
            info[mod] = getattr(__import__(mod), "__version__", "?")
        except Exception:  # noqa: BLE001 - a missing optional library is just not reported
            pass
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001
        pass
    return info


def machine_line(info: dict[str, Any] | None = None) -> str:
    info = info or machine_info()
    s = f"{info['cores']} CPU cores ({info['cpu']})"
    if info.get("gpu"):
        s += f", GPU {info['gpu']}"
    libs = ", ".join(f"{m} {info[m]}" for m in ("torch", "transformers", "faiss", "numba") if m in info)
    s = f"{s}; {libs}" if libs else s
    if info.get("loadavg"):
        s += "; load average {:.1f} / {:.1f} / {:.1f} (1 / 5 / 15 min) at the end of the run".format(*info["loadavg"])
    return s


def command_line(default_args: Sequence[str] | None = None) -> str:
    """The ``retrieval-attention ...`` command that is running (from ``sys.argv``), else from ``default_args``."""
    argv = list(sys.argv)
    if "bench" in argv:
        return "retrieval-attention " + shlex.join(argv[argv.index("bench") :])
    return "retrieval-attention " + shlex.join(default_args or [])


# ---- specs --------------------------------------------------------------------------------------------------------
def parse_value(s: str) -> Any:
    """``"32" -> 32``, ``"0.5" -> 0.5``, ``"true" -> True``, ``"none" -> None``, else the string."""
    low = s.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(s)
        except ValueError:
            pass
    return s.strip()


def parse_index_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"roar:graph_per=kv_head:M=32"`` -> ``("roar", {"graph_per": "kv_head", "M": 32})``."""
    parts = [p for p in spec.strip().split(":")]
    name, params = parts[0].strip(), {}
    if not name:
        raise ValueError(f"empty index name in {spec!r}")
    for p in parts[1:]:
        if "=" not in p:
            raise ValueError(f"index option {p!r} in {spec!r} is not of the form key=value")
        k, v = p.split("=", 1)
        params[k.strip()] = parse_value(v)
    return name, params


def parse_int_list(s: str) -> list[int]:
    """``"0,4,8-11"`` -> ``[0, 4, 8, 9, 10, 11]`` (sorted, unique)."""
    out: set[int] = set()
    for part in s.split(","):
        part = part.strip()
        if not part:
            continue
        m = re.fullmatch(r"(\d+)\s*-\s*(\d+)", part)
        if m:
            a, b = int(m.group(1)), int(m.group(2))
            if b < a:
                raise ValueError(f"empty range {part!r}")
            out.update(range(a, b + 1))
        else:
            out.add(int(part))
    if not out:
        raise ValueError(f"no integers in {s!r}")
    return sorted(out)


def evenly_spaced(items: Sequence[int], n: int) -> list[int]:
    """``n`` items spread evenly over ``items`` (first and last included)."""
    items = list(items)
    if n >= len(items):
        return items
    if n <= 1:
        return items[:1]
    return [items[round(i * (len(items) - 1) / (n - 1))] for i in range(n)]


# ---- output -------------------------------------------------------------------------------------------------------
def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], align: str | None = None) -> str:
    """A GitHub markdown table; ``align`` is one char per column (``l``/``r``), default: first left, rest right."""
    headers = [str(h) for h in headers]
    rows = [[("" if c is None else str(c)) for c in r] for r in rows]
    align = align or ("l" + "r" * (len(headers) - 1))
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]

    def fmt(cells):
        return "| " + " | ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(cells, widths, align)) + " |"

    sep = "|" + "|".join((":" + "-" * (w + 1)) if a == "l" else ("-" * (w + 1) + ":") for w, a in zip(widths, align)) + "|"
    return "\n".join([fmt(headers), sep] + [fmt(r) for r in rows])


def fmt_float(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"{x:.{digits}f}"


def write_json(path, obj) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n", encoding="utf-8")
    return path


def _json_default(o):
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def default_docs_path() -> Path:
    """``docs/BENCHMARKS.md`` of the source checkout this package runs from, else of the working directory."""
    root = Path(__file__).resolve().parents[2]
    if (root / "pyproject.toml").is_file():
        return root / "docs" / "BENCHMARKS.md"
    return Path.cwd() / "docs" / "BENCHMARKS.md"


def update_doc_section(path, heading: str, body: str, title: str = DOCS_TITLE) -> Path:
    """Replace (or append) the ``## heading`` section of a markdown file, keeping every other section.

    The section runs from its ``## heading`` line to the next ``## `` / ``# `` heading (outside code fences) or
    the end of the file. A missing file is created with ``title`` as its first line.
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8") if path.exists() else f"{title}\n"
    lines = text.splitlines()
    head_line = f"## {heading}"
    start = end = None
    in_fence = False
    for i, line in enumerate(lines):
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
            continue
        if in_fence:
            continue
        if start is None and line.strip() == head_line:
            start = i
        elif start is not None and re.match(r"#{1,2} ", line):
            end = i
            break
    section = [head_line, ""] + body.strip("\n").splitlines() + [""]
    if start is None:
        while lines and not lines[-1].strip():
            lines.pop()
        lines = lines + [""] + section
    else:
        end = len(lines) if end is None else end
        lines = lines[:start] + section + lines[end:]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines).rstrip("\n") + "\n", encoding="utf-8")
    return path
