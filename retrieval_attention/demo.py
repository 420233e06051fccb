"""The main job in one command: a needle question over a long essay prompt, answered with retrieval
attention and with full attention, printing both answers and their summaries."""

from __future__ import annotations

import argparse
import random
import sys

from .generation_cli import add_model_arguments, compile_kernels_for, config_from_args, summary_line


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--context", type=int, default=4096, help="prompt length in tokens")
    p.add_argument("--depth", type=float, default=0.5, help="needle depth in the haystack, 0..1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=24)
    add_model_arguments(p)


def needle_prompt(tokenizer, n_tokens: int, depth: float, seed: int) -> tuple[str, str]:
    """(prompt, answer): a magic number hidden at ``depth`` of ``n_tokens`` tokens of Paul Graham essays."""
    from .data import haystack_tokens

    number = str(random.Random(seed).randint(1_000_000, 9_999_999))
    needle = f" The special magic number is {number}. "
    question = "\n\nWhat is the special magic number mentioned in the text above? Answer with the number only."
    overhead = len(tokenizer(needle + question, add_special_tokens=False)["input_ids"]) + 40  # + chat template
    hay = haystack_tokens(tokenizer, max(n_tokens - overhead, 16))
    cut = int(len(hay) * depth)
    text = tokenizer.decode(hay[:cut]) + needle + tokenizer.decode(hay[cut:]) + question
    return text, number


def run(args) -> int:
    from .threads import configure_threads

    configure_threads(args.threads)
    from .generation import generate
    from .models import ModelNotAvailable, load_model

    try:
        config = config_from_args(args)
        model, tok = load_model(args.model, device=args.device, dtype=args.dtype)
    except (ValueError, FileNotFoundError, ModelNotAvailable, NotImplementedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    prompt, answer = needle_prompt(tok, args.context, args.depth, args.seed)
    print(f"needle: magic number {answer} at depth {args.depth:.0%} of a ~{args.context}-token essay prompt")
    methods = [config] if config.method == "full" else [config, config_from_args(argparse.Namespace(**{**vars(args), "attention": "full"}))]
    compile_kernels_for(model, config)  # so the summaries below time the work, not numba's compilation
    ok = True
    for cfg in methods:
        out = generate(model, tok, prompt, cfg, max_new_tokens=args.max_new_tokens, progress=True)
        hit = answer in out.text
        ok &= hit
        print(f"{cfg.method:>9}: {out.text.strip()!r}  -> {'correct' if hit else 'WRONG'}")
        print(f"           {summary_line(out.stats)}")
    return 0
