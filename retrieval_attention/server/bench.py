"""Server benchmark: time to first token with and without a persistent context, decode throughput under
concurrent clients. Runs the real server in-process on loopback and measures through the ``openai`` client.

    python -m retrieval_attention.server.bench --model smollm2 --context 4096 --clients 1,4,8 \\
        --json bench_server.json --update-docs

1. **TTFT**: streaming chat requests asking a question about a ~``--context``-token document (Paul Graham
   essays with a "magic number" needle) — once with the document in the message (prefill + index build per
   request), once with a persistent context created beforehand (only the question is prefilled).
2. **Concurrency**: ``N`` clients at once, each asking about the context with ``ignore_eos`` and
   ``--max-tokens`` tokens; aggregate tokens/s over the burst, per-request decode tokens/s, TTFT.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import threading
import time

NEEDLE_Q = "What is the special magic number mentioned in the text above? Answer with the number only."
QUESTIONS = [
    NEEDLE_Q,
    "Summarise the text above in one sentence.",
    "Who is the author of the text above, and what is the main topic?",
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..generation_cli import add_model_arguments

    add_model_arguments(p)
    p.add_argument("--context", type=int, default=4096, help="document length in tokens")
    p.add_argument("--questions", type=int, default=3, help="questions timed per TTFT variant (1..3)")
    p.add_argument("--clients", default="1,4,8", help="concurrent client counts")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens generated per request in the concurrency runs")
    p.add_argument("--answer-tokens", type=int, default=24, help="max tokens of the TTFT requests' answers")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--update-docs", action="store_true", help="replace the 'Server' section of docs/BENCHMARKS.md")
    p.add_argument("--docs", default=None, help="markdown file for --update-docs (default docs/BENCHMARKS.md)")
    p.add_argument("--report", default=None, metavar="JSON",
                   help="do not measure: print (and with --update-docs, write) the tables of a saved result")


def _stream_chat(client, model, messages, max_tokens, extra=None):
    """One streaming chat request: (ttft_s, total_s, text, usage, t_first, t_end) measured at the client."""
    t0 = time.perf_counter()
    t_first = None
    parts, usage = [], None
    stream = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body=extra or {})
    for ch in stream:
        if ch.choices and ch.choices[0].delta.content:
            if t_first is None:
                t_first = time.perf_counter()
            parts.append(ch.choices[0].delta.content)
        if ch.usage is not None:
            usage = ch.usage
    t_end = time.perf_counter()
    t_first = t_first or t_end
    return {"ttft_s": t_first - t0, "total_s": t_end - t0, "text": "".join(parts),
            "prompt_tokens": usage.prompt_tokens if usage else None,
            "completion_tokens": usage.completion_tokens if usage else None,
            "cached_tokens": (usage.prompt_tokens_details.cached_tokens
                              if usage and usage.prompt_tokens_details else None),
            "t_start": t0, "t_first": t_first, "t_end": t_end}


def document(tok, n_tokens: int, seed: int = 0) -> tuple[str, str]:
    """(document text, needle answer): ~n_tokens of essays with a magic number at half depth."""
    from ..demo import needle_prompt

    text, answer = needle_prompt(tok, n_tokens, 0.5, seed)
    cut = text.rfind("\n\nWhat is the special magic number")
    return (text[:cut] if cut > 0 else text), answer


def run(args) -> int:
    from ..threads import configure_threads

    if args.report:
        with open(args.report, encoding="utf-8") as f:
            return report(json.load(f), args)
    threads = configure_threads(args.threads)
    import httpx
    import openai

    from ..generation_cli import config_from_args
    from ..models import load_model
    from .app import ServerThread, create_app

    config = config_from_args(args)
    clients = [int(x) for x in args.clients.split(",") if x.strip()]
    t0 = time.perf_counter()
    model, tok = load_model(args.model, device=args.device, dtype=args.dtype)
    threads = configure_threads(args.threads)  # load_model re-applies the default (all cores): --threads wins
    load_s = time.perf_counter() - t0
    doc, answer = document(tok, args.context)
    name = "bench"
    app = create_app(model, tok, config, model_name=name, default_max_tokens=args.max_tokens)
    questions = QUESTIONS[: max(1, min(args.questions, len(QUESTIONS)))]
    out = {"command": command(), "config": config.to_dict(), "model": args.model, "context_tokens_target": args.context,
           "threads": threads, "model_load_s": load_s, "loadavg_start": os.getloadavg()}
    with ServerThread(app) as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="bench", max_retries=0, timeout=3600)
        _stream_chat(c, name, [{"role": "user", "content": "Hello!"}], 4)  # warm-up
        print("TTFT without context ...", file=sys.stderr)
        plain = []
        for q in questions:
            r = _stream_chat(c, name, [{"role": "user", "content": doc + "\n\n" + q}], args.answer_tokens)
            plain.append(r)
            print(f"  {r['ttft_s']:.2f} s  ({r['prompt_tokens']} prompt tokens) {r['text'][:60]!r}", file=sys.stderr)
        print("creating the context ...", file=sys.stderr)
        t = time.perf_counter()
        resp = httpx.post(srv.url + "/v1/contexts", json={"text": doc}, timeout=3600)
        resp.raise_for_status()
        info = resp.json()
        create_s = time.perf_counter() - t
        print(f"  {create_s:.2f} s, {info['tokens']} tokens, {info['bytes'] / 2**20:.1f} MiB", file=sys.stderr)
        print("TTFT with the context ...", file=sys.stderr)
        cached = []
        for q in questions:
            r = _stream_chat(c, name, [{"role": "user", "content": q}], args.answer_tokens, {"context_id": info["id"]})
            cached.append(r)
            print(f"  {r['ttft_s']:.3f} s  ({r['prompt_tokens']} prompt tokens, {r['cached_tokens']} cached) "
                  f"{r['text'][:60]!r}", file=sys.stderr)
        conc = []
        for n in clients:
            res: list = [None] * n
            barrier = threading.Barrier(n)

            def client(i):
                barrier.wait()
                res[i] = _stream_chat(c, name, [{"role": "user", "content": questions[i % len(questions)]}],
                                      args.max_tokens, {"context_id": info["id"], "ignore_eos": True})

            ths = [threading.Thread(target=client, args=(i,)) for i in range(n)]
            for th in ths:
                th.start()
            for th in ths:
                th.join()
            start = min(r["t_start"] for r in res)
            end = max(r["t_end"] for r in res)
            tokens = sum(r["completion_tokens"] for r in res)
            per_req = [(r["completion_tokens"] - 1) / (r["t_end"] - r["t_first"]) for r in res
                       if r["completion_tokens"] > 1 and r["t_end"] > r["t_first"]]
            row = {"clients": n, "tokens": tokens, "wall_s": end - start, "aggregate_tokens_per_s": tokens / (end - start),
                   "per_request_decode_tokens_per_s": statistics.mean(per_req) if per_req else None,
                   "ttft_mean_s": statistics.mean(r["ttft_s"] for r in res),
                   "ttft_max_s": max(r["ttft_s"] for r in res)}
            conc.append(row)
            print(f"  {n} clients: {row['aggregate_tokens_per_s']:.2f} tok/s aggregate, "
                  f"{row['per_request_decode_tokens_per_s']:.2f} tok/s per request, "
                  f"TTFT mean {row['ttft_mean_s']:.2f} s max {row['ttft_max_s']:.2f} s", file=sys.stderr)
    strip = ("t_start", "t_first", "t_end")
    out.update(
        document_tokens=info["tokens"], needle_answer=answer,
        ttft_without_context=[{k: v for k, v in r.items() if k not in strip} for r in plain],
        context_create_s=create_s, context=info,
        ttft_with_context=[{k: v for k, v in r.items() if k not in strip} for r in cached],
        needle_found={"without_context": answer in plain[0]["text"], "with_context": answer in cached[0]["text"]},
        concurrency=conc, loadavg_end=os.getloadavg(),
    )
    from ..bench.common import machine_info, write_json

    out["machine"] = machine_info()
    if args.json:
        write_json(args.json, out)
        print(f"wrote {args.json}", file=sys.stderr)
    return report(out, args)


def report(out: dict, args) -> int:
    md = markdown(out)
    print(md)
    if args.update_docs:
        from ..bench.common import default_docs_path, update_doc_section

        path = update_doc_section(args.docs or default_docs_path(), "Server", md)
        print(f"updated {path}", file=sys.stderr)
    return 0


def command() -> str:
    env = " ".join(f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS") if k in os.environ)
    return (env + " " if env else "") + "python -m retrieval_attention.server.bench " + shlex.join(sys.argv[1:])


def markdown(out: dict) -> str:
    from ..bench.common import machine_line, markdown_table

    med = lambda rows, k: statistics.median(r[k] for r in rows)  # noqa: E731
    cfg = out["config"]
    lines = [
        "Time to first token for a question about a long document, with and without a persistent context, and",
        "decode throughput with concurrent clients asking about that context. One model worker runs requests",
        "one after another: aggregate throughput does not grow with the number of clients, waiting time does.",
        "",
        f"Command: `{out['command']}`",
        "",
        f"Machine: {machine_line(out['machine'])}; {out['threads']} torch/numba threads; 1-min load average "
        f"{out['loadavg_start'][0]:.1f} at the start (other jobs shared the CPU).",
        f"Model `{out['model']}`, {cfg['method']}/{cfg['index']}, top_k {cfg['top_k']}, sink {cfg['n_sink']} + "
        f"window {cfg['window']}; document {out['document_tokens']} tokens.",
        "",
        markdown_table(
            ["", "prompt tokens", "prefilled per request", "TTFT median (s)", "needle answered"],
            [
                ["document in the message", out["ttft_without_context"][0]["prompt_tokens"],
                 out["ttft_without_context"][0]["prompt_tokens"], f"{med(out['ttft_without_context'], 'ttft_s'):.2f}",
                 "yes" if out["needle_found"]["without_context"] else "no"],
                ["persistent context", out["ttft_with_context"][0]["prompt_tokens"],
                 out["ttft_with_context"][0]["prompt_tokens"] - out["ttft_with_context"][0]["cached_tokens"],
                 f"{med(out['ttft_with_context'], 'ttft_s'):.3f}",
                 "yes" if out["needle_found"]["with_context"] else "no"],
            ],
        ),
        "",
        f"Creating the context (prefill + index build, once): {out['context_create_s']:.2f} s, "
        f"{out['context']['bytes'] / 2**20:.1f} MiB. TTFT is the median over {len(out['ttft_with_context'])} questions "
        "(the needle question, a summary, a topic question); 'needle answered' is whether the answer to the needle "
        f"question contains the hidden number ({out['needle_answer']}).",
        *(_needle_note(out)),
        "",
        markdown_table(
            ["clients", "tokens", "aggregate tok/s", "per-request decode tok/s", "TTFT mean (s)", "TTFT max (s)"],
            [[r["clients"], r["tokens"], f"{r['aggregate_tokens_per_s']:.2f}",
              "—" if r["per_request_decode_tokens_per_s"] is None else f"{r['per_request_decode_tokens_per_s']:.2f}",
              f"{r['ttft_mean_s']:.2f}", f"{r['ttft_max_s']:.2f}"] for r in out["concurrency"]],
        ),
    ]
    return "\n".join(lines)


def _needle_note(out: dict) -> list[str]:
    found = out["needle_found"]
    if found["without_context"] == found["with_context"]:
        return []
    return [
        "",
        "The two rows prompt the model with the same token ids, but the question's own tokens are processed",
        "differently: in the first row by exact prefill attention over the whole prompt, in the second on top",
        "of the stored context, i.e. with retrieval attention (top_k keys per head from the CPU store). The",
        "needle answer differs accordingly (a fresh run and a context run agree exactly when top_k covers every",
        "offloaded key; with the default top_k they need not).",
    ]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m retrieval_attention.server.bench", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
