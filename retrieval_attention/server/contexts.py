"""Persistent contexts of the server: a host-memory budget with LRU eviction, and an optional directory.

Each context lives in ``<context-dir>/<id>/``: the library's files (``meta.json`` + ``kv.safetensors``, written
by :meth:`PrefilledContext.save` with a format version, the model/config identity and a sha256 checksum)
plus ``server.json`` (this module's format version, the prompt rule's parameters — mode, system message,
separator, template prefix — a sha256 of the token ids, and a checksum over its own content).

On startup the directory is listed without loading anything; a context is loaded the first time a request
names it. Loading checks every checksum and the model/config identity; a corrupt or mismatched context is
rejected with :class:`ContextFileError` (HTTP 409), never used. When the loaded contexts exceed the budget the
least recently used ones leave memory: with a directory they stay on disk (and are loaded again on demand),
without one they are dropped.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import RetrievalConfig
from .errors import ApiError, bad_request, not_found

SERVER_META = "server.json"
SERVER_META_VERSION = 1
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str | int) -> int:
    """``"8GB"``, ``"512MiB"``, ``"1.5G"``, ``"1000000"`` -> bytes (K/M/G/T are powers of 1024)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGTkmgt]?)(i?[Bb])?\s*", str(text))
    if not m:
        raise ValueError(f"cannot parse memory size {text!r} (examples: 8GB, 512MiB, 2G, 1000000)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def tokens_digest(ids: list[int]) -> str:
    return hashlib.sha256(json.dumps(list(ids)).encode()).hexdigest()


def _meta_checksum(d: dict) -> str:
    body = {k: v for k, v in d.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _context_file_error():
    from ..context import ContextFileError as E

    return E


@dataclass
class ContextInfo:
    """What the server knows about one context (the heavy state is in ``ctx`` while loaded)."""

    id: str
    created: int
    mode: str  # "chat" | "completion"
    n_tokens: int
    config: dict[str, Any]
    system: str | None = None
    separator: str = "\n\n"
    template_prefix: str | None = None
    source: str = "text"  # "text" | "token_ids"
    tokens_sha256: str = ""
    fingerprint: str = ""
    stats: dict[str, Any] = field(default_factory=dict)
    nbytes: int = 0
    path: Path | None = None
    ctx: Any = None  # PrefilledContext while loaded
    error: str | None = None  # last load / listing problem

    def retrieval_config(self) -> RetrievalConfig:
        c = dict(self.config)
        c["dense_layers"] = tuple(c.get("dense_layers", ()))
        return RetrievalConfig(**c)

    def server_meta(self) -> dict:
        d = {
            "format_version": SERVER_META_VERSION,
            "id": self.id,
            "created": self.created,
            "mode": self.mode,
            "n_tokens": self.n_tokens,
            "config": self.config,
            "system": self.system,
            "separator": self.separator,
            "template_prefix": self.template_prefix,
            "source": self.source,
            "tokens_sha256": self.tokens_sha256,
            "fingerprint": self.fingerprint,
            "stats": self.stats,
            "nbytes": self.nbytes,
        }
        d["sha256"] = _meta_checksum(d)
        return d

    def public(self, model_fingerprint: str | None = None) -> dict:
        c = self.config
        d = {
            "id": self.id,
            "object": "context",
            "created": self.created,
            "mode": self.mode,
            "tokens": self.n_tokens,
            "attention": c.get("method"),
            "index": c.get("index"),
            "top_k": c.get("top_k"),
            "n_sink": c.get("n_sink"),
            "window": c.get("window"),
            "system": self.system,
            "separator": self.separator,
            "bytes": self.nbytes,
            "loaded": self.ctx is not None,
            "on_disk": self.path is not None,
            "stats": {k: self.stats.get(k) for k in ("prefill_s", "index_build_s", "kv_device_bytes", "kv_cpu_bytes")
                      if k in self.stats},
        }
        if model_fingerprint is not None and self.fingerprint:
            d["compatible"] = self.fingerprint == model_fingerprint
        if self.error:
            d["error"] = self.error
        return d


def read_server_meta(directory: Path) -> ContextInfo:
    """Read and verify ``server.json`` (raises the library's ContextFileError)."""
    E = _context_file_error()
    f = directory / SERVER_META
    try:
        d = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise E(f"cannot read {f}: {e}") from e
    if not isinstance(d, dict) or d.get("format_version") != SERVER_META_VERSION:
        v = d.get("format_version") if isinstance(d, dict) else None
        raise E(f"{f} has format version {v}, this server reads {SERVER_META_VERSION}; re-create the context")
    if d.get("sha256") != _meta_checksum(d):
        raise E(f"checksum mismatch for {f}: the file is corrupt or was modified; re-create the context")
    try:
        return ContextInfo(
            id=d["id"], created=int(d["created"]), mode=d["mode"], n_tokens=int(d["n_tokens"]), config=d["config"],
            system=d["system"], separator=d["separator"], template_prefix=d["template_prefix"], source=d["source"],
            tokens_sha256=d["tokens_sha256"], fingerprint=d["fingerprint"], stats=d.get("stats", {}),
            nbytes=int(d.get("nbytes", 0)), path=directory,
        )
    except (KeyError, TypeError, ValueError) as e:
        raise E(f"{f} is missing fields ({e}); re-create the context") from e


def info_from_library_meta(directory: Path) -> ContextInfo:
    """A context saved by the Python API (``PrefilledContext.save``, no ``server.json``): a completion context."""
    E = _context_file_error()
    f = directory / "meta.json"
    try:
        d = json.loads(f.read_text(encoding="utf-8"))
        ids = [int(t) for t in d["token_ids"]]
        return ContextInfo(
            id=directory.name, created=int(f.stat().st_mtime), mode="completion", n_tokens=len(ids),
            config=d["config"], source="token_ids", tokens_sha256=tokens_digest(ids),
            fingerprint=d.get("model_fingerprint", ""), stats=d.get("stats", {}), path=directory,
        )
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
        raise E(f"cannot read context metadata {f}: {e}") from e


def write_server_meta(info: ContextInfo, directory: Path) -> None:
    tmp = directory / (SERVER_META + ".tmp")
    tmp.write_text(json.dumps(info.server_meta(), indent=1), encoding="utf-8")
    tmp.replace(directory / SERVER_META)


def load_context(info: ContextInfo, model):
    """Load a saved context and check it against ``server.json`` (raises the library's ContextFileError)."""
    from ..context import PrefilledContext

    E = _context_file_error()
    ctx = PrefilledContext.load(info.path, model, info.retrieval_config())
    if len(ctx.token_ids) != info.n_tokens or tokens_digest(ctx.token_ids) != info.tokens_sha256:
        raise E(f"context {info.path}: the token ids do not match {SERVER_META}; re-create the context")
    return ctx


class ContextStore:
    """Contexts by id: metadata always, prefilled state within ``budget`` bytes (LRU), files in ``directory``.

    Heavy operations (prefill, load, save) run on the model worker thread; listing and deletion may run on
    any thread (``lock`` guards the tables).
    """

    def __init__(self, model, budget: int, directory: str | Path | None = None):
        self.model = model
        self.budget = int(budget)
        self.directory = Path(directory) if directory else None
        self.lock = threading.RLock()
        self.entries: OrderedDict[str, ContextInfo] = OrderedDict()  # least recently used first
        self.evicted: set[str] = set()  # dropped for memory without a directory (for the 404 message)
        self.scan_errors: list[str] = []
        self._fingerprint: str | None = None
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            self.scan()

    @property
    def model_fingerprint(self) -> str:
        if self._fingerprint is None:
            from ..context import model_fingerprint

            self._fingerprint = model_fingerprint(self.model)
        return self._fingerprint

    # ---- directory -----------------------------------------------------------------------------------------
    def scan(self) -> None:
        """List the saved contexts (metadata only; nothing is loaded)."""
        E = _context_file_error()
        for d in sorted(p for p in self.directory.iterdir() if p.is_dir() and not p.name.endswith(".tmp")):
            if not ((d / SERVER_META).exists() or (d / "meta.json").exists()):
                continue
            if not ID_RE.match(d.name):
                continue
            try:
                info = read_server_meta(d) if (d / SERVER_META).exists() else info_from_library_meta(d)
                info.id = d.name  # the directory name is the id (a saved context may be copied / renamed)
            except E as e:
                # listed (so the client sees why it cannot be used) but never loaded
                info = ContextInfo(id=d.name, created=int(d.stat().st_mtime), mode="?", n_tokens=0, config={},
                                   path=d, error=str(e))
                self.scan_errors.append(str(e))
            with self.lock:
                self.entries[info.id] = info

    # ---- queries (any thread) ------------------------------------------------------------------------------
    def get(self, cid: str) -> ContextInfo:
        with self.lock:
            info = self.entries.get(cid)
            if info is None:
                if cid in self.evicted:
                    raise not_found(
                        f"context {cid!r} was evicted to stay within the context memory budget (no --context-dir "
                        "to keep it on disk); create it again", param="context_id", code="context_evicted")
                raise not_found(f"context {cid!r} does not exist", param="context_id", code="context_not_found")
            return info

    def list(self) -> list[dict]:
        fp = self.model_fingerprint
        with self.lock:
            return [i.public(fp) for i in sorted(self.entries.values(), key=lambda i: (i.created, i.id))]

    def loaded_bytes(self) -> int:
        with self.lock:
            return sum(i.nbytes for i in self.entries.values() if i.ctx is not None)

    def delete(self, cid: str) -> dict:
        with self.lock:
            info = self.get(cid)
            del self.entries[cid]
            info.ctx = None
        if info.path is not None:
            shutil.rmtree(info.path, ignore_errors=True)
        return {"id": cid, "object": "context.deleted", "deleted": True}

    # ---- worker-thread operations -------------------------------------------------------------------------
    def new_id(self) -> str:
        return "ctx-" + uuid.uuid4().hex[:20]

    def add(self, info: ContextInfo, ctx) -> ContextInfo:
        """Register a freshly prefilled context (saved first when there is a directory)."""
        info.ctx = ctx
        info.nbytes = int(ctx.nbytes())
        info.fingerprint = ctx.fingerprint
        info.stats = {k: v for k, v in ctx.stats.items() if isinstance(v, (int, float, str))}
        if info.nbytes > self.budget:
            raise ApiError(
                400,
                f"the context needs {info.nbytes / 2**20:.1f} MiB of memory, more than the server's context memory "
                f"budget ({self.budget / 2**20:.1f} MiB, --context-memory)",
                param="text", code="context_memory_exceeded",
            )
        if self.directory is not None:
            final = self.directory / info.id
            tmp = self.directory / (info.id + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            ctx.save(tmp)
            write_server_meta(info, tmp)
            tmp.replace(final)
            info.path = final
        with self.lock:
            self.entries[info.id] = info
            self.entries.move_to_end(info.id)
            self._evict(keep=info.id)
        return info

    def acquire(self, cid: str):
        """The loaded context (loading it from disk if needed); marks it most recently used."""
        E = _context_file_error()
        info = self.get(cid)
        if info.ctx is None:
            if info.path is None:  # pragma: no cover - entries without files are always loaded
                raise not_found(f"context {cid!r} is not available", param="context_id", code="context_not_found")
            if info.error and info.mode == "?":
                raise ApiError(409, f"context {cid!r} cannot be used: {info.error}", param="context_id",
                               code="context_file_invalid")
            try:
                ctx = load_context(info, self.model)
            except E as e:
                with self.lock:
                    gone = cid not in self.entries
                    if not gone:
                        info.error = str(e)
                if gone:
                    raise not_found(f"context {cid!r} was deleted", param="context_id", code="context_not_found")
                raise ApiError(409, f"context {cid!r} cannot be used: {e}", param="context_id",
                               code="context_file_invalid") from e
            nbytes = int(ctx.nbytes())
            if nbytes > self.budget:
                raise ApiError(409, f"context {cid!r} needs {nbytes / 2**20:.1f} MiB, more than the context memory "
                               f"budget ({self.budget / 2**20:.1f} MiB, --context-memory)", param="context_id",
                               code="context_memory_exceeded")
            with self.lock:
                if cid not in self.entries:
                    raise not_found(f"context {cid!r} was deleted", param="context_id", code="context_not_found")
                info.ctx, info.nbytes, info.error = ctx, nbytes, None
        with self.lock:
            if cid in self.entries:
                self.entries.move_to_end(cid)
            self._evict(keep=cid)
        return info.ctx

    def _evict(self, keep: str) -> None:
        total = sum(i.nbytes for i in self.entries.values() if i.ctx is not None)
        for cid in list(self.entries):
            if total <= self.budget:
                break
            info = self.entries[cid]
            if cid == keep or info.ctx is None:
                continue
            total -= info.nbytes
            info.ctx = None
            if info.path is None:
                del self.entries[cid]
                self.evicted.add(cid)


def new_info(store: ContextStore, *, mode: str, n_tokens: int, config: RetrievalConfig, system, separator,
             template_prefix, source: str, token_ids: list[int]) -> ContextInfo:
    return ContextInfo(
        id=store.new_id(), created=int(time.time()), mode=mode, n_tokens=n_tokens, config=config.to_dict(),
        system=system, separator=separator, template_prefix=template_prefix, source=source,
        tokens_sha256=tokens_digest(token_ids),
    )


def check_request_config(info: ContextInfo, overrides: dict[str, Any]) -> None:
    """A request on a context may change ``top_k`` / ``ef`` / ``residual_samples`` only (decode-time settings);
    other settings must match the context."""
    c = info.config
    fixed = {"attention": c.get("method"), "index": c.get("index"), "n_sink": c.get("n_sink"),
             "window": c.get("window"), "dense_layers": tuple(c.get("dense_layers", ()))}
    for k, v in overrides.items():
        if k in fixed and (tuple(v) if k == "dense_layers" else v) != fixed[k]:
            raise bad_request(
                f"context {info.id} was built with {k}={fixed[k]!r}; a request on it can change only top_k, ef "
                f"and residual_samples "
                f"(got {k}={v!r})", param=k, code="context_config_mismatch")
