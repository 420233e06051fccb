"""Fidelity of retrieval decoding to full attention: teacher-forced decode over the last tokens of essay
prompts, mean KL(full || method) per token and top-1 agreement.

For each context length the prompt's first ``context - n_eval`` tokens are prefilled (exact), then the last
``n_eval`` tokens are fed one at a time — real decode steps, with window eviction and retrieval — and each
step's next-token distribution is compared with full attention's (one exact forward over the whole prompt).
"""

from __future__ import annotations

import argparse
import sys
import time
from ..config import DEFAULT_RESIDUAL_REFRESH, DEFAULT_RESIDUAL_SAMPLES, RESIDUAL_ON


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2")
    p.add_argument("--context", default="2048,4096", help="comma-separated prompt lengths in tokens")
    p.add_argument("--n-eval", type=int, default=256, help="teacher-forced decode steps at the end of each prompt")
    p.add_argument("--methods", default="retrieval:roar,retrieval:flat,streaming",
                   help="comma-separated: retrieval:INDEX[@r=M] or streaming; INDEX may carry index options as in "
                        "bench recall (retrieval:roar:M=16); @r=M: residual samples, default "
                        "--residual-samples; @r=0 = the published method")
    p.add_argument("--residual-samples", type=int, default=DEFAULT_RESIDUAL_SAMPLES,
                   help="residual samples of retrieval methods without @r= (default %(default)s)")
    p.add_argument("--decode", default="hf", choices=["hf", "lean"],
                   help="decode steps through the transformers forward (hf, default) or the lean decode loop")
    p.add_argument("--residual-on", default="auto", choices=RESIDUAL_ON,
                   help="where the lean loop estimates the residual (RetrievalConfig.residual_on; the hf path "
                        "always uses the CPU)")
    p.add_argument("--residual-refresh", type=int, default=DEFAULT_RESIDUAL_REFRESH,
                   help="steps between redraws of the device residual's sample (default %(default)s)")
    p.add_argument("--residual-seed", type=int, default=0, help="seed of the residual draws (default 0)")
    p.add_argument("--top-k", type=int, default=100)
    p.add_argument("--exact-below", type=int, default=0,
                   help="RetrievalConfig.exact_below (default 0 here: the named index at every length)")
    p.add_argument("--n-sink", type=int, default=128)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--ef", type=int, default=None, help="search budget of graph indexes")
    p.add_argument("--dense-layers", default="0,1")
    p.add_argument("--offset", type=int, default=0, help="start token in the essay haystack")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="float32", help="model dtype (fp32 by default: differences are the method's, not rounding)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="write records here")
    p.add_argument("--update-docs", action="store_true", help="write the table into docs/BENCHMARKS.md")


def parse_methods(spec: str, residual: int = DEFAULT_RESIDUAL_SAMPLES) -> list[tuple[str, str, int]]:
    """``retrieval:INDEX[@r=M]`` / ``streaming`` specs -> ``(method, index spec, residual_samples)``; the index
    spec may carry options (``roar:M=16``, :func:`.common.parse_index_spec`)."""
    from ..config import split_residual_option

    out = []
    for m in spec.split(","):
        m = m.strip()
        if not m:
            continue
        m, r_given = split_residual_option(m)
        r = residual if r_given is None else r_given
        method, _, index = m.partition(":")
        if method not in ("retrieval", "streaming"):
            raise ValueError(f"unknown method {method!r} in --methods (use retrieval:INDEX or streaming)")
        out.append((method, index or ("roar" if method == "retrieval" else "flat"), r))
    return out


def kl_and_agreement(logp_full, logp_method):
    """Per-token KL(full || method) ``[n]`` and top-1 agreement ``[n]`` from log-probs ``[n, V]``."""
    import torch

    kl = torch.sum(logp_full.exp() * (logp_full - logp_method), dim=-1)
    agree = logp_full.argmax(-1) == logp_method.argmax(-1)
    return kl, agree


def teacher_forced_logprobs(model, ids, config, n_eval: int, decode: str = "hf"):
    """Log-probs ``[n_eval, V]`` predicting tokens after each of the last ``n_eval`` prompt positions, decoding
    them one at a time with ``config``'s cache (prefill of the rest is exact), through the transformers forward
    (``decode="hf"``) or :class:`~retrieval_attention.decode_loop.LeanDecoder` (``"lean"``)."""
    import torch

    from ..decode_loop import LeanDecoder
    from ..generation import cache_kwarg
    from ..integration import enable, make_cache

    cache = make_cache(model, config)
    kw = {cache_kwarg(model): cache}
    n_pre = ids.shape[1] - n_eval
    out = []
    with torch.no_grad(), enable(model):
        logits = model(input_ids=ids[:, :n_pre], use_cache=True, logits_to_keep=1, **kw).logits
        if decode == "lean":
            with LeanDecoder(model, cache) as dec:
                for t in range(n_pre, ids.shape[1]):
                    out.append(torch.log_softmax(dec.step(ids[:, t : t + 1]).float()[0], -1))
            return torch.stack(out), cache
        for t in range(n_pre, ids.shape[1]):
            logits = model(input_ids=ids[:, t : t + 1], use_cache=True, **kw).logits
            out.append(torch.log_softmax(logits[0, -1].float(), -1))
    return torch.stack(out), cache


def run(args) -> int:
    from ..threads import configure_threads

    configure_threads(args.threads)
    import torch
    from tqdm.auto import tqdm

    from ..config import RetrievalConfig
    from ..data import haystack_tokens
    from ..decode_loop import residual_placement
    from ..models import load_model
    from .common import (command_line, default_docs_path, machine_line, markdown_table, parse_index_spec,
                         update_doc_section, write_json)

    contexts = [int(c) for c in str(args.context).split(",") if c.strip()]
    if args.n_eval <= 0 or any(c <= args.n_eval + args.n_sink + args.window for c in contexts):
        print("error: every --context must exceed --n-eval + --n-sink + --window, and --n-eval must be positive",
              file=sys.stderr)
        return 2
    for flag, v, least in (("--residual-refresh", args.residual_refresh, 1), ("--residual-seed", args.residual_seed, 0)):
        if v < least:  # checked here, not blamed on --methods by the configs below
            print(f"error: {flag} must be >= {least}, got {v}", file=sys.stderr)
            return 2
    dense = tuple(int(x) for x in args.dense_layers.split(",") if x.strip())
    # every method's config is made (and its index options checked) before the model loads
    try:
        methods = []
        for method, index, residual in parse_methods(args.methods, args.residual_samples):
            index_name, index_params = parse_index_spec(index)
            search = {}
            if args.ef is not None:
                search = {"nprobe": args.ef} if index_name == "ivf" else {"ef": args.ef}
            cfg = RetrievalConfig(method=method, index=index_name, index_params=index_params, top_k=args.top_k,
                                  n_sink=args.n_sink, window=args.window, dense_layers=dense, search_params=search,
                                  residual_samples=residual, exact_below=args.exact_below,
                                  residual_on=args.residual_on, residual_refresh=args.residual_refresh,
                                  residual_seed=args.residual_seed)
            methods.append((method, index, residual, cfg))
    except ValueError as e:
        print(f"error: --methods {args.methods!r}: {e}", file=sys.stderr)
        return 2
    model, tok = load_model(args.model, device=args.device, dtype=args.dtype)
    records = []
    for ctx_len in contexts:
        ids = torch.tensor([haystack_tokens(tok, ctx_len + args.offset)[args.offset :]], device=model.device)
        with torch.no_grad():
            # step t of the teacher-forced loop feeds token t and predicts token t + 1: full positions [-n_eval:]
            full_logits = model(input_ids=ids).logits[0, -args.n_eval :].float()
        logp_full = torch.log_softmax(full_logits, -1)
        for method, index, residual, cfg in tqdm(methods, desc=f"agreement @ {ctx_len}", unit="method"):
            t0 = time.perf_counter()
            logp, cache = teacher_forced_logprobs(model, ids, cfg, args.n_eval, decode=args.decode)
            kl, agree = kl_and_agreement(logp_full, logp)
            st = cache.stats()
            records.append({
                "method": method,
                "index": index if method == "retrieval" else None,
                "residual_samples": residual if method == "retrieval" else None,
                "decode": args.decode,
                # where the residual ran: the lean loop's choice (auto: device on a GPU), the CPU on the hf path
                "residual_on": (None if method != "retrieval" or not residual else
                                "cpu" if args.decode == "hf" else residual_placement(cfg, model.device)),
                "residual_refresh": args.residual_refresh,
                "residual_seed": args.residual_seed,
                "context": ctx_len,
                "kl_mean": float(kl.mean()),
                "kl_p95": float(kl.quantile(0.95)),
                "top1_agreement": float(agree.float().mean()),
                "top_k": args.top_k,
                "n_static": args.n_sink + args.window,
                "scanned_fraction": st["scanned_fraction"] if st["n_searches"] else None,
                "seconds": time.perf_counter() - t0,
            })
            r = records[-1]
            print(f"{ctx_len:>6} {method:>9} {r['index'] or '-':>5} r={r['residual_samples']} ({r['residual_on']})  KL {r['kl_mean']:.4f}  top-1 {r['top1_agreement']:.3f}",
                  file=sys.stderr)
    rows = [[r["context"], r["method"], (r["index"] or "—") + ("" if r["method"] != "retrieval" else f" (r={r['residual_samples']}"
                                                                   + (f", {r['residual_on']}" if r["residual_on"] else "") + ")"), f"{r['kl_mean']:.4f}", f"{r['kl_p95']:.4f}",
             f"{100 * r['top1_agreement']:.1f}%",
             "—" if r["scanned_fraction"] is None else f"{100 * r['scanned_fraction']:.1f}%"] for r in records]
    table = markdown_table(["context", "method", "index", "KL mean (nats)", "KL p95", "top-1 agreement", "keys scanned"], rows)
    print(table)
    if args.json:
        write_json(args.json, records)
    if args.update_docs:
        body = (
            f"Teacher-forced decode of the last {args.n_eval} tokens of Paul Graham essay prompts with {args.model}; "
            f"static {args.n_sink}+{args.window} tokens, top-{args.top_k}, dense layers {list(dense)}. "
            f"KL(full ‖ method) per token and top-1 agreement with full attention.\n\n"
            f"Command: `{command_line()}`  \nMachine: {machine_line()}\n\n{table}\n"
        )
        update_doc_section(default_docs_path(), "Agreement with full attention", body)
    return 0
