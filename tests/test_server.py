"""The OpenAI-compatible server on loopback, driven by the official ``openai`` client and raw HTTP.

A tiny random Llama model and an offline word-level tokenizer with a chat template keep this fast. Answers are
checked against the library's own generation (same tokens), so the server cannot pass by returning anything
plausible.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import threading

import httpx
import pytest
import torch
import transformers as tf

openai = pytest.importorskip("openai")

from retrieval_attention.config import DEFAULT_RESIDUAL_SAMPLES, RetrievalConfig  # noqa: E402
from retrieval_attention.generation import generate, generate_ids  # noqa: E402
from retrieval_attention.server.app import ServerThread, create_app  # noqa: E402
from retrieval_attention.server.contexts import parse_size  # noqa: E402
from retrieval_attention.server.protocol import TextTracker  # noqa: E402

VOCAB = 320
SPECIALS = ["<pad>", "<s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
RC = RetrievalConfig(index="flat", n_sink=8, window=16, top_k=4096, dense_layers=(0,))
NAME = "tiny"


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(VOCAB - len(SPECIALS) - 1)]
    vocab = {t: i for i, t in enumerate(SPECIALS + words + ["</s>"])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>", additional_special_tokens=SPECIALS[3:])
    tok.chat_template = TEMPLATE
    return tok


def tiny_llama(seed: int = 0, max_positions: int = 512):
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=max_positions,
                         eos_token_id=VOCAB - 1, bos_token_id=1, pad_token_id=0)
    model = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    with torch.no_grad():  # a random model repeats one token; sharpen so greedy decoding varies
        model.get_output_embeddings().weight.mul_(8.0)
    return model


def words(seed: int, n: int) -> str:
    g = torch.Generator().manual_seed(seed)
    return " ".join(f"w{int(i)}" for i in torch.randint(0, VOCAB - len(SPECIALS) - 1, (n,), generator=g))


DOC = words(1, 150)
Q1, Q2 = words(2, 6), words(3, 9)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny matmuls: one thread is fastest, and immune to other jobs on the machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def server(model, tok, tmp_path_factory):
    app = create_app(model, tok, RC, model_name=NAME, context_dir=tmp_path_factory.mktemp("ctx"))
    with ServerThread(app) as srv:
        yield srv


def client(srv):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="test", max_retries=0, timeout=120)


def lib_chat(model, tok, content, cfg=RC, n=8):
    """The library's answer to one user message (greedy)."""
    return generate(model, tok, [{"role": "user", "content": content}], cfg, max_new_tokens=n)


def chat(c, content, n=8, **kw):
    return c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": content}], max_tokens=n,
                                     temperature=0, **kw)


# ---- basic endpoints ---------------------------------------------------------------------------------------------
def test_models_chat_and_completions_match_the_library(server, model, tok):
    c = client(server)
    assert [m.id for m in c.models.list().data] == [NAME]
    r = chat(c, Q1)
    ref = lib_chat(model, tok, Q1)
    assert r.choices[0].message.content == ref.text and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == ref.prompt_tokens and r.usage.completion_tokens == len(ref.token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.choices[0].finish_reason == ("stop" if ref.token_ids[-1] == VOCAB - 1 else "length")
    assert r.object == "chat.completion" and r.model == NAME

    ids = tok(Q2)["input_ids"]
    seqs, _ = generate_ids(model, torch.tensor([ids]), RC, max_new_tokens=7)
    want = tok.decode(seqs[0, len(ids):].tolist(), skip_special_tokens=True)
    cr = c.completions.create(model=NAME, prompt=Q2, max_tokens=7, temperature=0)
    assert cr.choices[0].text == want and cr.usage.prompt_tokens == len(ids) and cr.object == "text_completion"
    # token-id prompt and a batch of prompts: one choice per prompt, in order
    assert c.completions.create(model=NAME, prompt=ids, max_tokens=7, temperature=0).choices[0].text == want
    both = c.completions.create(model=NAME, prompt=[Q1, Q2], max_tokens=7, temperature=0)
    assert [ch.index for ch in both.choices] == [0, 1] and both.choices[1].text == want


def test_streaming_equals_non_streaming(server):
    c = client(server)
    full = chat(c, Q2, n=10)
    chunks = list(chat(c, Q2, n=10, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == full.choices[0].message.content
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finals == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert all(ch.id == chunks[0].id and ch.object == "chat.completion.chunk" for ch in chunks)

    comp = c.completions.create(model=NAME, prompt=Q1, max_tokens=9, temperature=0)
    parts = list(c.completions.create(model=NAME, prompt=Q1, max_tokens=9, temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in parts) == comp.choices[0].text
    assert parts[-1].choices[0].finish_reason == comp.choices[0].finish_reason

    # raw server-sent events: data lines, ending with [DONE]
    body = {"model": NAME, "messages": [{"role": "user", "content": Q1}], "max_tokens": 4, "stream": True,
            "temperature": 0}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in resp.iter_lines() if ln]
    assert all(ln.startswith("data: ") for ln in lines) and lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] in ("stop", "length")


def test_stop_sequences_cut_the_text(server):
    c = client(server)
    full = chat(c, Q1, n=12).choices[0].message.content
    stop = full.split(" ")[3]
    want = full[: full.index(stop)]
    r = chat(c, Q1, n=12, stop=[stop, "never-produced"])
    assert r.choices[0].message.content == want and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < 12
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chat(c, Q1, n=12, stop=stop, stream=True)
                       if ch.choices)
    assert streamed == want


def test_text_tracker_holds_back_partial_stop_strings():
    pieces = {1: "ab", 2: "c", 3: "X", 4: "Yd"}
    tr = TextTracker(lambda ids: "".join(pieces[i] for i in ids), ["cXY"])
    assert tr.add([1]) == "ab"
    assert tr.add([2]) == ""  # "c" may start the stop string
    assert tr.add([3]) == ""
    assert tr.add([4]) == "" and tr.stopped and tr.text == "ab"
    tr = TextTracker(lambda ids: "".join(pieces[i] for i in ids), ["cXZ"])
    assert [tr.add([i]) for i in (1, 2, 3, 4)] == ["ab", "", "", "cXYd"]
    tr = TextTracker(lambda ids: "é"[: len(ids)] if len(ids) > 1 else "\ufffd", [])
    assert tr.add([1]) == "" and tr.add([2]) == "é"  # an incomplete character waits for its next token


def test_seeded_sampling_is_reproducible(server):
    c = client(server)

    def sample(seed):
        return c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": Q2}], max_tokens=10,
                                         temperature=1.5, top_p=0.95, seed=seed).choices[0].message.content

    a = [sample(s) for s in (11, 12, 13)]
    assert a == [sample(s) for s in (11, 12, 13)]
    assert len(set(a)) > 1  # the seed matters: sampling is on


def test_per_request_attention_method(server, model, tok):
    c = client(server)
    long_q = words(7, 200)
    full_cfg = RetrievalConfig(method="full", index="flat")
    stream_cfg = RetrievalConfig(method="streaming", index="flat", n_sink=8, window=16, dense_layers=(0,))
    want_full, want_stream = lib_chat(model, tok, long_q, full_cfg, 10), lib_chat(model, tok, long_q, stream_cfg, 10)
    assert want_full.text != want_stream.text  # the prompt is long enough for the methods to differ
    r = chat(c, long_q, n=10, extra_body={"attention": "full"})
    assert r.choices[0].message.content == want_full.text
    assert r.model_extra["retrieval_attention"]["attention"] == "full"
    r = chat(c, long_q, n=10, extra_body={"attention": "streaming"})
    assert r.choices[0].message.content == want_stream.text
    # retrieval with top_k covering every offloaded key is exact
    r = chat(c, long_q, n=10, extra_body={"attention": "retrieval", "top_k": 1000, "index": "flat"})
    assert r.choices[0].message.content == want_full.text
    assert r.model_extra["retrieval_attention"]["top_k"] == 1000


# ---- errors ------------------------------------------------------------------------------------------------------
def test_errors_are_openai_objects_and_the_server_keeps_serving(server):
    c = client(server)
    with pytest.raises(openai.NotFoundError) as e:
        chat(c, Q1, extra_body={"context_id": "ctx-missing"})
    assert e.value.body["code"] == "context_not_found" and e.value.body["param"] == "context_id"
    with pytest.raises(openai.BadRequestError) as e:
        chat(c, words(4, 600))
    assert e.value.body["code"] == "context_length_exceeded" and "512" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        chat(c, Q1, n=510)  # 9 prompt tokens + 510 > 512 positions
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError) as e:
        c.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": Q1}])
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        chat(c, Q1, extra_body={"attention": "sparse"})
    assert e.value.body["param"] == "attention"
    with pytest.raises(openai.BadRequestError) as e:
        chat(c, Q1, extra_body={"index": "nope"})
    assert e.value.body["param"] == "index"
    with pytest.raises(openai.BadRequestError) as e:
        chat(c, Q1, extra_body={"topk": 5})  # a typo is not silently ignored
    assert "Unrecognized request argument" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": Q1}], temperature=3)
    assert e.value.body["param"] == "temperature"

    url = server.url + "/v1/chat/completions"
    for raw, status in ((b'{"model": "tiny", "messages": [', 400), (b"[1, 2]", 400), (b"\xff\xfe", 400)):
        r = httpx.post(url, content=raw, headers={"content-type": "application/json"}, timeout=30)
        assert r.status_code == status
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    r = httpx.post(url, json={"model": NAME}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = httpx.post(server.url + "/v1/completions", json={"model": NAME, "prompt": [1, "a"]}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = httpx.get(server.url + "/v1/nothing", timeout=30)
    assert r.status_code == 404 and "error" in r.json()
    # after all these errors the server still answers
    assert chat(c, Q1).choices[0].message.content


# ---- contexts ----------------------------------------------------------------------------------------------------
def create_context(srv, **body):
    r = httpx.post(srv.url + "/v1/contexts", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("attention", ["retrieval", "full"])
def test_chat_context_answer_equals_answer_without_context(server, attention):
    c = client(server)
    info = create_context(server, text=DOC, attention=attention)
    assert info["mode"] == "chat" and info["attention"] == attention and info["loaded"]
    if attention == "retrieval":  # small sink/window: the document really was offloaded and indexed
        assert info["stats"]["kv_cpu_bytes"] > 0
    for q in (Q1, Q2, Q1):
        plain = chat(c, DOC + "\n\n" + q, n=10, extra_body={"attention": attention})
        withc = chat(c, q, n=10, extra_body={"context_id": info["id"]})
        assert withc.choices[0].message.content == plain.choices[0].message.content
        assert withc.usage.prompt_tokens == plain.usage.prompt_tokens
        assert withc.usage.prompt_tokens_details.cached_tokens == info["tokens"]
    # streaming from the context gives the same text
    s = "".join(ch.choices[0].delta.content or "" for ch in chat(c, Q2, n=10, stream=True,
                                                                   extra_body={"context_id": info["id"]}) if ch.choices)
    assert s == chat(c, DOC + "\n\n" + Q2, n=10, extra_body={"attention": attention}).choices[0].message.content


def test_completion_context_and_system_rules(server):
    c = client(server)
    info = create_context(server, text=DOC, mode="completion")
    plain = c.completions.create(model=NAME, prompt=DOC + " " + Q2, max_tokens=9, temperature=0)
    withc = c.completions.create(model=NAME, prompt=" " + Q2, max_tokens=9, temperature=0,
                                 extra_body={"context_id": info["id"]})
    assert withc.choices[0].text == plain.choices[0].text and withc.usage.prompt_tokens == plain.usage.prompt_tokens
    with pytest.raises(openai.BadRequestError) as e:  # a completion context cannot start a chat turn
        chat(c, Q1, extra_body={"context_id": info["id"]})
    assert e.value.body["code"] == "context_mode_mismatch"
    with pytest.raises(openai.BadRequestError) as e:  # settings that shaped the stored state are fixed
        chat(c, Q1, extra_body={"context_id": info["id"], "window": 32})
    assert e.value.body["code"] == "context_config_mismatch" and e.value.body["param"] == "window"

    sys_info = create_context(server, text=DOC, system="w9 w8")
    msgs = [{"role": "system", "content": "w9 w8"}, {"role": "user", "content": DOC + "\n\n" + Q1}]
    plain = c.chat.completions.create(model=NAME, messages=msgs, max_tokens=8, temperature=0)
    for m in ([{"role": "user", "content": Q1}], [{"role": "system", "content": "w9 w8"}, {"role": "user", "content": Q1}]):
        r = c.chat.completions.create(model=NAME, messages=m, max_tokens=8, temperature=0,
                                      extra_body={"context_id": sys_info["id"]})
        assert r.choices[0].message.content == plain.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=NAME, messages=[{"role": "system", "content": "w1"},
                                                        {"role": "user", "content": Q1}],
                                  max_tokens=4, extra_body={"context_id": sys_info["id"]})
    assert e.value.body["code"] == "context_system_mismatch"


def test_context_listing_and_delete(server):
    info = create_context(server, text=words(5, 60))
    listed = {d["id"]: d for d in httpx.get(server.url + "/v1/contexts", timeout=30).json()["data"]}
    assert listed[info["id"]]["tokens"] == info["tokens"] and listed[info["id"]]["on_disk"]
    r = httpx.delete(server.url + f"/v1/contexts/{info['id']}", timeout=30)
    assert r.status_code == 200 and r.json()["deleted"] is True
    assert httpx.get(server.url + f"/v1/contexts/{info['id']}", timeout=30).status_code == 404
    assert httpx.delete(server.url + f"/v1/contexts/{info['id']}", timeout=30).json()["error"]["code"] == \
        "context_not_found"
    r = httpx.post(server.url + "/v1/contexts", json={"text": words(6, 600)}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = httpx.post(server.url + "/v1/contexts", json={"text": DOC, "token_ids": [1, 2]}, timeout=30)
    assert r.status_code == 400


# ---- concurrency -------------------------------------------------------------------------------------------------
def test_concurrent_clients_get_the_sequential_answers(server):
    ctx = create_context(server, text=DOC)["id"]
    c = client(server)
    jobs = [
        lambda: chat(c, Q1, n=12).choices[0].message.content,
        lambda: chat(c, Q2, n=12, extra_body={"context_id": ctx}).choices[0].message.content,
        lambda: "".join(ch.choices[0].delta.content or "" for ch in chat(c, Q1, n=12, stream=True,
                                                                           extra_body={"context_id": ctx}) if ch.choices),
        lambda: c.completions.create(model=NAME, prompt=Q2, max_tokens=12, temperature=0).choices[0].text,
        lambda: chat(c, words(8, 120), n=12, extra_body={"attention": "streaming"}).choices[0].message.content,
        lambda: c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": Q2}], max_tokens=12,
                                          temperature=1.2, seed=5).choices[0].message.content,
        lambda: chat(c, Q1, n=12, extra_body={"attention": "full"}).choices[0].message.content,
        lambda: chat(c, Q2, n=12, extra_body={"context_id": ctx, "top_k": 4}).choices[0].message.content,
    ]
    sequential = [j() for j in jobs]
    for _ in range(2):
        got = [None] * len(jobs)
        errors = []
        barrier = threading.Barrier(len(jobs))

        def worker(i):
            try:
                barrier.wait()
                got[i] = jobs[i]()
            except Exception as e:  # noqa: BLE001
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(jobs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors
        assert got == sequential


# ---- persistence -------------------------------------------------------------------------------------------------
def test_restart_loads_saved_contexts_and_rejects_bad_ones(tok, tmp_path):
    d = tmp_path / "contexts"
    m1 = tiny_llama(seed=0)
    with ServerThread(create_app(m1, tok, RC, model_name=NAME, context_dir=d)) as srv:
        a = create_context(srv, text=DOC)
        b = create_context(srv, text=words(9, 100))
        before = [chat(client(srv), q, n=10, extra_body={"context_id": a["id"]}).choices[0].message.content
                  for q in (Q1, Q2)]
    assert (d / a["id"] / "kv.safetensors").exists() and (d / a["id"] / "server.json").exists()
    # corrupt b's tensors
    f = d / b["id"] / "kv.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))

    m2 = tiny_llama(seed=0)  # a fresh process would load the same weights again
    with ServerThread(create_app(m2, tok, RC, model_name=NAME, context_dir=d)) as srv:
        listed = {x["id"]: x for x in httpx.get(srv.url + "/v1/contexts", timeout=30).json()["data"]}
        assert set(listed) == {a["id"], b["id"]} and not listed[a["id"]]["loaded"] and listed[a["id"]]["compatible"]
        c = client(srv)
        after = [chat(c, q, n=10, extra_body={"context_id": a["id"]}).choices[0].message.content for q in (Q1, Q2)]
        assert after == before
        assert httpx.get(srv.url + f"/v1/contexts/{a['id']}", timeout=30).json()["loaded"]
        with pytest.raises(openai.ConflictError) as e:
            chat(c, Q1, extra_body={"context_id": b["id"]})
        assert e.value.body["code"] == "context_file_invalid" and "checksum" in e.value.body["message"]
        assert chat(c, Q1).choices[0].message.content  # still serving

    # another model (other weights) must not use a's state
    with ServerThread(create_app(tiny_llama(seed=1), tok, RC, model_name=NAME, context_dir=d)) as srv:
        listed = {x["id"]: x for x in httpx.get(srv.url + "/v1/contexts", timeout=30).json()["data"]}
        assert listed[a["id"]]["compatible"] is False
        with pytest.raises(openai.ConflictError) as e:
            chat(client(srv), Q1, extra_body={"context_id": a["id"]})
        assert "another model" in e.value.body["message"]

    # tampered server metadata (other build config) is rejected too
    meta = json.loads((d / a["id"] / "server.json").read_text())
    meta["config"]["window"] = 32
    (d / a["id"] / "server.json").write_text(json.dumps(meta))
    with ServerThread(create_app(m2, tok, RC, model_name=NAME, context_dir=d)) as srv:
        with pytest.raises(openai.ConflictError) as e:
            chat(client(srv), Q1, extra_body={"context_id": a["id"]})
        assert "checksum" in e.value.body["message"]


def test_memory_budget_evicts_least_recently_used(tok, tmp_path, model):
    one = None
    for directory in (None, tmp_path / "ctx"):
        app = create_app(model, tok, RC, model_name=NAME, context_dir=directory, context_memory=10**9)
        with ServerThread(app) as srv:
            a = create_context(srv, text=DOC)
            one = a["bytes"]
        app = create_app(model, tok, RC, model_name=NAME, context_dir=directory,
                         context_memory=int(2.5 * one))  # room for two contexts of DOC's size
        with ServerThread(app) as srv:
            c = client(srv)
            ids = [create_context(srv, text=DOC + " " + w)["id"] for w in ("w1", "w2")]
            want = chat(c, Q1, extra_body={"context_id": ids[0]}).choices[0].message.content  # ids[0] is now recent
            ids.append(create_context(srv, text=DOC + " w3")["id"])  # evicts ids[1], the least recently used
            listed = {x["id"]: x for x in httpx.get(srv.url + "/v1/contexts", timeout=30).json()["data"]}
            assert app.state.ra.store.loaded_bytes() <= int(2.5 * one)
            if directory is None:
                assert ids[1] not in listed
                with pytest.raises(openai.NotFoundError) as e:
                    chat(c, Q1, extra_body={"context_id": ids[1]})
                assert e.value.body["code"] == "context_evicted"
            else:
                assert listed[ids[0]]["loaded"] and not listed[ids[1]]["loaded"] and listed[ids[2]]["loaded"]
                assert chat(c, Q1, extra_body={"context_id": ids[1]}).choices[0].message.content  # reloaded
                listed = {x["id"]: x for x in httpx.get(srv.url + "/v1/contexts", timeout=30).json()["data"]}
                assert listed[ids[1]]["loaded"] and not listed[ids[0]]["loaded"]
                assert chat(c, Q1, extra_body={"context_id": ids[0]}).choices[0].message.content == want


def test_parse_size():
    assert parse_size("8GB") == 8 << 30 and parse_size("512MiB") == 512 << 20 and parse_size("1000") == 1000
    assert parse_size("1.5k") == 1536
    with pytest.raises(ValueError):
        parse_size("lots")


# ---- CLI ---------------------------------------------------------------------------------------------------------
def cli_args(**kw):
    from retrieval_attention.generation_cli import add_arguments
    from retrieval_attention.server.contexts_cli import add_context_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    add_context_arguments(p)
    argv = []
    for k, v in kw.items():
        if v is True:
            argv.append(f"--{k.replace('_', '-')}")
        elif k == "prompt":
            continue
        else:
            argv += [f"--{k.replace('_', '-')}", str(v)]
    if "prompt" in kw:
        argv.insert(0, kw["prompt"])
    return p.parse_args(argv)


def test_cli_save_and_load_context(model, tok, tmp_path, capsys):
    from retrieval_attention.generation_cli import config_from_args
    from retrieval_attention.server.contexts_cli import handle

    doc = tmp_path / "doc.txt"
    doc.write_text(DOC)
    opts = dict(index="flat", n_sink=8, window=16, top_k=4096, dense_layers="0", max_new_tokens=8)
    want = lib_chat(model, tok, DOC + "\n\n" + Q1).text

    args = cli_args(context_file=doc, save_context=tmp_path / "saved", **opts)
    assert handle(args, model, tok, config_from_args(args), None) is True
    assert (tmp_path / "saved" / "server.json").exists()
    capsys.readouterr()

    args = cli_args(prompt=Q1, load_context=tmp_path / "saved", **opts)
    assert handle(args, model, tok, config_from_args(args), Q1) is True
    out = capsys.readouterr()
    assert out.out.strip() == want.strip() and "reused" in out.err

    args = cli_args(prompt=Q1, load_context=tmp_path / "saved", **{**opts, "window": 32})
    with pytest.raises(SystemExit) as e:
        handle(args, model, tok, config_from_args(args), Q1)
    assert e.value.code == 2 and "another configuration" in capsys.readouterr().err

    # without --save/--load-context nothing happens
    args = cli_args(prompt=Q1, **opts)
    assert handle(args, model, tok, config_from_args(args), Q1) is False

    # a context saved by the CLI into a server's --context-dir is served under its directory name
    d = tmp_path / "served"
    d.mkdir()
    shutil.copytree(tmp_path / "saved", d / "mydoc")
    with ServerThread(create_app(model, tok, RC, model_name=NAME, context_dir=d)) as srv:
        r = chat(client(srv), Q1, extra_body={"context_id": "mydoc"})
        assert r.choices[0].message.content == want

    # through the real command line: retrieval-attention generate --save-context / --load-context
    from retrieval_attention.cli import main

    copy.deepcopy(model).save_pretrained(tmp_path / "m")  # (save_pretrained edits the config it saves)
    tok.save_pretrained(tmp_path / "m")
    common = ["--model", str(tmp_path / "m"), "--index", "flat", "--n-sink", "8", "--window", "16", "--top-k", "4096",
              "--dense-layers", "0", "--max-new-tokens", "8", "--threads", "1"]
    try:
        assert main(["generate", "--context-file", str(doc), "--save-context", str(tmp_path / "c2"), Q2] + common) == 0
        first = capsys.readouterr()
        assert main(["generate", "--load-context", str(tmp_path / "c2"), Q2] + common) == 0
        second = capsys.readouterr()
    finally:
        torch.set_num_threads(1)  # load_model re-applied the default thread count
    want2 = lib_chat(model, tok, DOC + "\n\n" + Q2).text.strip()
    assert first.out.strip() == want2 and second.out.strip() == want2 and "saved context" in first.err


def test_serve_command_end_to_end(model, tok, tmp_path):
    """``retrieval-attention serve`` in a subprocess on a saved tiny model: same answer as the library."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from retrieval_attention.server.app import free_port

    copy.deepcopy(model).save_pretrained(tmp_path / "m")  # (save_pretrained edits the config it saves)
    tok.save_pretrained(tmp_path / "m")
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "retrieval_attention.cli", "serve", "--model", str(tmp_path / "m"), "--port",
           str(port), "--served-model-name", NAME, "--index", "flat", "--n-sink", "8", "--window", "16",
           "--top-k", "4096", "--dense-layers", "0", "--threads", "1", "--context-dir", str(tmp_path / "ctx"),
           "--context-memory", "64MB", "--log-level", "warning"]
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        t0 = time.monotonic()
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() - t0 < 120, "the server did not come up"
            time.sleep(0.3)
        c = openai.OpenAI(base_url=url + "/v1", api_key="test", max_retries=0, timeout=120)
        assert c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": Q1}], max_tokens=8,
                                         temperature=0).choices[0].message.content == lib_chat(model, tok, Q1).text
        info = httpx.post(url + "/v1/contexts", json={"text": DOC}, timeout=120).json()
        assert (tmp_path / "ctx" / info["id"] / "server.json").exists()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    assert proc.returncode in (0, -signal.SIGINT, 130), (tmp_path / "serve.log").read_text()
    assert "serving 'tiny'" in (tmp_path / "serve.log").read_text()


def test_client_disconnect_stops_generation(model, tok):
    import time

    with ServerThread(create_app(model, tok, RC, model_name=NAME)) as srv:
        body = {"model": NAME, "messages": [{"role": "user", "content": Q1}], "max_tokens": 500, "stream": True,
                "temperature": 0, "ignore_eos": True}
        with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, timeout=60) as resp:
            lines = resp.iter_lines()
            got = [next(lines) for _ in range(6)]  # a few tokens, then hang up
        assert all(ln.startswith("data: ") or not ln for ln in got)
        t0 = time.monotonic()
        while True:
            h = httpx.get(srv.url + "/health", timeout=30).json()
            if h["pending"] == 0:
                break
            assert time.monotonic() - t0 < 120
            time.sleep(0.05)
        assert h["cancelled"] == 1  # stopped early instead of generating 500 tokens for nobody
        r = chat(client(srv), Q1)  # and the next client is served
        assert r.choices[0].message.content == lib_chat(model, tok, Q1).text


def test_residual_samples_is_a_per_request_setting():
    from retrieval_attention.server.contexts import check_request_config
    from retrieval_attention.server.errors import ApiError
    from retrieval_attention.server.protocol import config_with_overrides, parse_overrides

    ov = parse_overrides({"residual_samples": 0, "top_k": 7})
    cfg = config_with_overrides(RC, ov)
    assert cfg.residual_samples == 0 and cfg.top_k == 7 and RC.residual_samples == DEFAULT_RESIDUAL_SAMPLES
    with pytest.raises(ApiError):
        parse_overrides({"residual_samples": -1})

    class Info:  # a context's recorded settings: decode-time ones may change per request
        id = "ctx-x"
        config = RC.to_dict()

    check_request_config(Info, {"residual_samples": 16, "top_k": 3, "ef": 8})
    with pytest.raises(ApiError, match="residual_samples"):
        check_request_config(Info, {"window": 99})
