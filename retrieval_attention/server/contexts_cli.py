"""Persistent contexts from the command line: ``generate --context-file DOC --save-context PATH`` prefills
and indexes the document once and saves it; ``generate --load-context PATH "question"`` answers from it
without prefilling the document again.

The saved directory is the server's format (``meta.json`` + ``kv.safetensors`` + ``server.json``), so a
context saved here into ``--context-dir`` of ``retrieval-attention serve`` is served under the directory's
name as its ``context_id``. The prompt rule is the server's (see :mod:`retrieval_attention.server.prompts`):
with the chat template (default) the document starts the user's turn and the question follows after a blank
line; with ``--no-chat`` the question's tokens follow the document's directly.

Loading checks the format version, checksums and the model identity, and that the retrieval options that
shape the stored state (``--attention``, ``--index``, ``--n-sink``, ``--window``, ``--dense-layers``) equal the
saved ones; ``--top-k`` and ``--ef`` may differ. A mismatch is an error, never silently used.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def add_context_arguments(p: argparse.ArgumentParser) -> None:
    """Add ``--save-context`` / ``--load-context`` (and ``--context-file`` if the parser lacks it); idempotent."""
    have = p._option_string_actions  # noqa: SLF001 - generate already defines --context-file
    if "--context-file" not in have:
        p.add_argument("--context-file", help="a long document placed before the prompt (question)")
    if "--save-context" not in have:
        p.add_argument("--save-context", metavar="PATH",
                       help="prefill + index --context-file once and save it to directory PATH (then answer the "
                            "prompt, if one is given)")
    if "--load-context" not in have:
        p.add_argument("--load-context", metavar="PATH",
                       help="continue from a context saved with --save-context (the document is not prefilled again)")


def _fail(msg: str):
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def read_question(args) -> str | None:
    """The prompt without the document (``None`` if none was given): the positional prompt, ``--prompt-file``
    or stdin (``-``)."""
    if getattr(args, "prompt_file", None):
        return Path(args.prompt_file).read_text(encoding="utf-8")
    if getattr(args, "prompt", None) == "-":
        return sys.stdin.read()
    return getattr(args, "prompt", None)


def _strip_document(args, prompt: str | None) -> str | None:
    """``generation_cli.read_prompt`` prepends the --context-file text + blank line; the question is the rest."""
    if prompt is None or not getattr(args, "context_file", None):
        return prompt
    doc = Path(args.context_file).read_text(encoding="utf-8") + "\n\n"
    return prompt[len(doc):] if prompt.startswith(doc) else prompt


def handle(args, model, tok, config, prompt) -> bool:
    """Run ``--save-context`` / ``--load-context`` if given (returns True), else return False.

    ``prompt`` is the question: a string, or ``None`` (allowed with ``--save-context``: save only). If it starts
    with the ``--context-file`` text + a blank line (as ``read_prompt`` builds it) that prefix is removed.
    Errors print ``error: ...`` and exit with status 2.
    """
    save, load = getattr(args, "save_context", None), getattr(args, "load_context", None)
    if not save and not load:
        return False
    if save and load:
        _fail("give --save-context or --load-context, not both")
    from transformers import TextStreamer

    from ..context import ContextFileError, PrefilledContext
    from ..generation import PromptTooLong, check_length
    from ..generation_cli import fmt_bytes, summary_line
    from .contexts import (ContextInfo, info_from_library_meta, read_server_meta, tokens_digest,
                           write_server_meta)
    from .errors import ApiError
    from .prompts import PromptBuilder

    chat = not getattr(args, "no_chat", False)
    allow = getattr(args, "allow_extrapolation", False)
    builder = PromptBuilder(tok)
    question = _strip_document(args, prompt)
    if question is not None and not question.strip():
        question = None
    try:
        if save:
            if not getattr(args, "context_file", None):
                _fail("--save-context needs the document: --context-file DOC")
            doc = Path(args.context_file).read_text(encoding="utf-8")
            mode = "chat" if chat and builder.has_chat_template else "completion"
            if mode == "chat":
                ids, tprefix = builder.chat_context(doc, None)
            else:
                ids, tprefix = builder.completion_ids(doc, "text"), None
            check_length(model, len(ids), 1, allow)
            ctx = PrefilledContext.prefill(model, ids, config, progress=True)
            path = Path(save)
            ctx.save(path)
            info = ContextInfo(id=path.name, created=int(time.time()), mode=mode, n_tokens=len(ids),
                               config=config.to_dict(), separator="\n\n", template_prefix=tprefix, source="text",
                               tokens_sha256=tokens_digest(ids), fingerprint=ctx.fingerprint,
                               stats={k: v for k, v in ctx.stats.items() if isinstance(v, (int, float, str))},
                               nbytes=ctx.nbytes(), path=path)
            write_server_meta(info, path)
            st = ctx.stats
            print(f"saved context {path}: {len(ids)} tokens ({mode}) | prefill {st.get('prefill_s', 0):.2f} s | "
                  f"index build {st.get('index_build_s', 0):.2f} s | {fmt_bytes(ctx.nbytes())}", file=sys.stderr)
        else:
            if getattr(args, "context_file", None):
                _fail("--load-context already holds the document; drop --context-file")
            path = Path(load)
            if not path.is_dir():
                _fail(f"no saved context at {path}")
            info = read_server_meta(path) if (path / "server.json").exists() else info_from_library_meta(path)
            ctx = PrefilledContext.load(path, model, config)
            if len(ctx.token_ids) != info.n_tokens or tokens_digest(ctx.token_ids) != info.tokens_sha256:
                raise ContextFileError(f"context {path}: the token ids do not match server.json; re-create it")
            if question is None:
                _fail("give a question to ask about the loaded context")
            if info.mode == "chat" and not chat:
                pass  # raw continuation of a chat context: allowed, the question's tokens follow the document
            elif info.mode == "completion" and chat:
                _fail(f"context {path} was saved with --no-chat; pass --no-chat to continue it")
            mode = "chat" if info.mode == "chat" and chat else "completion"
            tprefix = info.template_prefix
        if question is None:
            return True
        if mode == "chat":
            tail = builder.chat_tail([{"role": "user", "content": question}], system=info.system,
                                     separator=info.separator, template_prefix=tprefix, context_id=str(path))
        else:
            tail = builder.completion_tail(question)
        check_length(model, len(ctx.token_ids) + len(tail), args.max_new_tokens, allow)
    except (ContextFileError, PromptTooLong) as e:
        _fail(str(e))
    except ApiError as e:
        _fail(e.message)
    streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    _, stats = ctx.generate(model, tail, max_new_tokens=args.max_new_tokens, streamer=streamer, config=config)
    print(file=sys.stderr)
    stats["context_tokens"] = len(ctx.token_ids)
    print(json.dumps(stats) if getattr(args, "json", False) else
          f"[context {len(ctx.token_ids)} tokens reused] " + summary_line(stats), file=sys.stderr)
    return True
