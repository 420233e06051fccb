"""``retrieval-attention`` command line: generate, eval, serve, bench {recall, agreement, decode, kernels}.

Each sub-command lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``;
modules keep heavy imports inside ``run`` so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "demo": ("retrieval_attention.demo", "needle question over a long essay prompt: retrieval vs full attention"),
    "generate": ("retrieval_attention.generation_cli", "generate text with retrieval (or full/streaming) attention"),
    "eval": ("retrieval_attention.eval.cli", "long-context evaluation: needles, RULER-style tasks, kv retrieval"),
    "serve": ("retrieval_attention.server.cli", "OpenAI-compatible HTTP server with persistent contexts"),
}
BENCH_COMMANDS = {
    "demo": ("retrieval_attention.demo", "needle question over a long essay prompt: retrieval vs full attention"),
    "recall": ("retrieval_attention.bench.recall", "index recall vs scanned keys on real model vectors"),
    "agreement": ("retrieval_attention.bench.agreement", "KL / top-1 agreement of retrieval decoding with full attention"),
    "decode": ("retrieval_attention.bench.decode", "decode latency, memory and index build at long contexts"),
    "kernels": ("retrieval_attention.bench.kernels",
                "index build and per-layer search + attention time on synthetic keys of a model's shape"),
}


def _add(sub, name, module, help_, selected: bool):
    p = sub.add_parser(name, help=help_, description=help_)
    if selected:  # import only the chosen sub-command (others may need optional dependencies)
        mod = importlib.import_module(module)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    words = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")]
    cmd = words[0] if words else None
    sub_cmd = words[1] if len(words) > 1 else None
    parser = argparse.ArgumentParser(prog="retrieval-attention", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_) in COMMANDS.items():
        _add(sub, name, module, help_, cmd == name)
    bench = sub.add_parser("bench", help="benchmarks writing JSON, a markdown table and plots")
    bsub = bench.add_subparsers(dest="bench_command", required=True)
    for name, (module, help_) in BENCH_COMMANDS.items():
        _add(bsub, name, module, help_, cmd == "bench" and sub_cmd == name)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser(argv).parse_args(argv)
    args._argv = list(sys.argv[1:] if argv is None else argv)  # the command line, for commands that re-launch themselves
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
