"""Generate text with retrieval (or full / streaming) attention, streaming tokens to stdout."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from .config import (BUILD_SCHEDULES, DEFAULT_EXACT_BELOW, DEFAULT_RESIDUAL_REFRESH, DEFAULT_RESIDUAL_SAMPLES, HANDOFFS,
                     RESIDUAL_ON)


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """Model + retrieval options shared by generate, demo, serve and benchmarks."""
    p.add_argument("--model", default="smollm2", help="embedded model (smollm2, gemma3-270m), .gguf file, directory or hub id")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16 (default: fp32 on CPU, bf16 on CUDA)")
    p.add_argument("--attention", default="retrieval", choices=["full", "retrieval", "streaming"], help="attention method")
    p.add_argument("--index", default="roar",
                   help="index for retrieval: roar, flat, ivf, hnsw, with options as name:key=value[:...] "
                        "(e.g. roar:graph_per=query_head, one graph per query head)")
    p.add_argument("--max-train-queries", type=int, default=None,
                   help="prefill queries per query head that train the index (default: automatic, 4,096 up to "
                        "32K tokens, 8,192 at 128K)")
    p.add_argument("--top-k", type=int, default=100, help="keys retrieved per query head per step")
    p.add_argument("--residual-samples", type=int, default=DEFAULT_RESIDUAL_SAMPLES,
                   help="keys drawn per head and step to estimate the attention of the keys not retrieved "
                        "(0 = the published method, which drops them)")
    p.add_argument("--residual-on", default="auto", choices=RESIDUAL_ON,
                   help="where decoding estimates the residual: device (a sample of the draws held on the GPU, "
                        "redrawn every --residual-refresh steps), cpu (fresh draws in the CPU search call), auto "
                        "(device on a GPU; default)")
    p.add_argument("--residual-refresh", type=int, default=DEFAULT_RESIDUAL_REFRESH,
                   help="decode steps between redraws of the device residual's sample (default %(default)s)")
    p.add_argument("--n-sink", type=int, default=128, help="initial tokens kept on the device")
    p.add_argument("--window", type=int, default=512, help="recent tokens kept on the device")
    p.add_argument("--ef", type=int, default=None, help="search beam width of graph indexes (roar/hnsw); nprobe for ivf")
    p.add_argument("--dense-layers", default=None, help="comma-separated layers kept exact (default 0,1); '' for none")
    p.add_argument("--prefill-chunk", type=int, default=2048, help="queries per exact-attention chunk during prefill")
    p.add_argument("--exact-below", type=int, default=DEFAULT_EXACT_BELOW,
                   help="layers with fewer CPU keys than this are searched exactly instead of indexed "
                        "(default %(default)s; 0 = always build --index)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all available cores)")
    p.add_argument("--build-workers", type=int, default=None,
                   help="index builds at once in the background (default: 2 with CUDA, else 1)")
    p.add_argument("--build-schedule", default="overlap", choices=BUILD_SCHEDULES,
                   help="GPU: index builds beside the layer-by-layer prefill (overlap, default) or after it")
    p.add_argument("--handoff", default="auto", choices=HANDOFFS,
                   help="how each prefilled layer's KV reaches host memory: async (pinned non-blocking copies "
                        "landed by a host thread), sync, or auto (default: async on CUDA, else sync)")


def config_from_args(args):
    """The ``RetrievalConfig`` of the shared model options; ``ValueError`` names a bad one (``--index`` options
    included: ``RetrievalConfig`` checks them)."""
    from .bench.common import parse_index_spec
    from .config import RetrievalConfig

    name, index_params = parse_index_spec(args.index)
    search = {}
    if args.ef is not None:
        search = {"nprobe": args.ef} if name == "ivf" else {"ef": args.ef}
    kw = {}
    if args.dense_layers is not None:
        kw["dense_layers"] = tuple(int(x) for x in args.dense_layers.split(",") if x.strip())
    return RetrievalConfig(
        method=args.attention,
        index=name,
        index_params=index_params,
        max_train_queries=getattr(args, "max_train_queries", None),
        top_k=args.top_k,
        residual_samples=args.residual_samples,
        residual_on=getattr(args, "residual_on", "auto"),
        residual_refresh=getattr(args, "residual_refresh", DEFAULT_RESIDUAL_REFRESH),
        n_sink=args.n_sink,
        window=args.window,
        search_params=search,
        prefill_chunk=args.prefill_chunk,
        exact_below=args.exact_below,
        build_workers=getattr(args, "build_workers", None),
        build_schedule=getattr(args, "build_schedule", "overlap"),
        handoff=getattr(args, "handoff", "auto"),
        **kw,
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", nargs="?", help="prompt text (or use --prompt-file, or '-' for stdin)")
    p.add_argument("--prompt-file", help="read the prompt from this file")
    p.add_argument("--context-file", help="a long document placed before the prompt (question)")
    from .server.contexts_cli import add_context_arguments

    add_context_arguments(p)  # --save-context PATH / --load-context PATH
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--no-chat", action="store_true", help="do not apply the model's chat template")
    p.add_argument("--allow-extrapolation", action="store_true", help="allow prompts beyond the model's positions")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stderr")
    add_model_arguments(p)


def read_prompt(args) -> str:
    if args.prompt_file:
        text = Path(args.prompt_file).read_text(encoding="utf-8")
    elif args.prompt == "-" or (args.prompt is None and not sys.stdin.isatty()):
        text = sys.stdin.read()
    elif args.prompt:
        text = args.prompt
    else:
        raise SystemExit("error: give a prompt, --prompt-file FILE, or pipe text on stdin")
    if getattr(args, "context_file", None):
        text = Path(args.context_file).read_text(encoding="utf-8") + "\n\n" + text
    if not text.strip():
        raise SystemExit("error: the prompt is empty")
    return text


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def summary_line(stats: dict) -> str:
    return (
        f"[{stats['method']}{'/' + stats['index'] if stats.get('index') else ''}] "
        f"prompt {stats['prompt_tokens']} tokens | prefill {stats['prefill_s']:.2f} s | "
        f"index build {stats.get('index_build_s', 0.0):.2f} s | "
        f"decode {stats['decode_tokens_per_s']:.2f} tok/s ({stats['new_tokens']} tokens) | "
        f"KV on device {fmt_bytes(stats.get('kv_device_bytes', 0))}, on CPU {fmt_bytes(stats.get('kv_cpu_bytes', 0))}"
        + (f" | scanned {100 * stats['scanned_fraction']:.1f}% of CPU keys" if stats.get("n_searches") else "")
    )


def compile_kernels_for(model, config) -> float:
    """:func:`~retrieval_attention.warmup.compile_kernels` with the model's dtype and head shapes."""
    from .warmup import compile_kernels

    mc = model.config.get_text_config(decoder=True)
    heads = mc.num_attention_heads
    kv = getattr(mc, "num_key_value_heads", None) or heads
    head_dim = getattr(mc, "head_dim", None) or mc.hidden_size // heads
    return compile_kernels(config, next(model.parameters()).dtype, n_kv_heads=kv, group=heads // kv,
                           head_dim=head_dim)


def run(args) -> int:
    from .threads import configure_threads

    configure_threads(args.threads)
    from transformers import TextStreamer

    from .generation import PromptTooLong, generate
    from .models import ModelNotAvailable, load_model

    try:
        config = config_from_args(args)
        no_prompt = args.prompt is None and not args.prompt_file and sys.stdin.isatty()
        prompt = None if (args.save_context and no_prompt) else read_prompt(args)
        model, tok = load_model(args.model, device=args.device, dtype=args.dtype)
    except (ValueError, FileNotFoundError, ModelNotAvailable, NotImplementedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from .server.contexts_cli import handle

    compile_kernels_for(model, config)
    if handle(args, model, tok, config, prompt):  # --save-context / --load-context
        return 0
    streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    try:
        out = generate(
            model,
            tok,
            prompt,
            config,
            max_new_tokens=args.max_new_tokens,
            chat=not args.no_chat,
            allow_extrapolation=args.allow_extrapolation,
            streamer=streamer,
            progress=True,
        )
    except PromptTooLong as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(file=sys.stderr)
    print(json.dumps(out.stats) if args.json else summary_line(out.stats), file=sys.stderr)
    return 0
