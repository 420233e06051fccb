"""``retrieval-attention serve``: the OpenAI-compatible HTTP server with persistent contexts."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..generation_cli import add_model_arguments

    add_model_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--served-model-name", default=None,
                   help="model id reported by /v1/models and expected in requests (default: the --model value)")
    p.add_argument("--context-memory", default="8GB",
                   help="memory budget of loaded persistent contexts, e.g. 8GB, 512MiB (LRU eviction; default 8GB)")
    p.add_argument("--context-dir", default=None,
                   help="directory where contexts are saved and loaded from (survive restarts; loaded lazily)")
    p.add_argument("--max-tokens-default", type=int, default=512,
                   help="completion length of chat requests without max_tokens (clamped to the model's positions)")
    p.add_argument("--allow-extrapolation", action="store_true", help="accept requests beyond the model's positions")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def served_name(model_arg: str) -> str:
    p = Path(model_arg)
    return p.stem if p.suffix == ".gguf" else (p.name if p.exists() else model_arg)


def run(args) -> int:
    from ..threads import configure_threads

    configure_threads(args.threads)
    import uvicorn

    from ..generation_cli import compile_kernels_for, config_from_args
    from ..models import ModelNotAvailable, load_model
    from .app import create_app
    from .contexts import parse_size

    try:
        config = config_from_args(args)
        budget = parse_size(args.context_memory)
        if args.max_tokens_default < 1:
            raise ValueError("--max-tokens-default must be >= 1")
        model, tok = load_model(args.model, device=args.device, dtype=args.dtype)
        configure_threads(args.threads)  # load_model re-applies the default (all cores): --threads wins
    except (ValueError, FileNotFoundError, ModelNotAvailable, NotImplementedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    compile_kernels_for(model, config)  # before the first request, not during it
    name = args.served_model_name or served_name(args.model)
    app = create_app(
        model, tok, config, model_name=name, context_dir=args.context_dir, context_memory=budget,
        default_max_tokens=args.max_tokens_default, allow_extrapolation=args.allow_extrapolation,
    )
    store = app.state.ra.store
    print(f"serving {name!r} ({config.method}{'/' + config.index if config.method == 'retrieval' else ''}) on "
          f"http://{args.host}:{args.port}/v1 ; contexts: {len(store.entries)} listed"
          + (f" in {args.context_dir}" if args.context_dir else " (memory only)"), file=sys.stderr)
    for err in store.scan_errors:
        print(f"warning: unusable saved context: {err}", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    return 0
